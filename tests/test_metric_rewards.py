"""Reference-metric rewards (:mod:`hfpg.rewards.metrics`) against sacrebleu, rouge_score and evaluate called directly.

Every reward is called once on the whole batch of CASES; each row must equal (``==``, bit for bit) what the reference
implementation returns for that row alone.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import textwrap

import nltk
import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import CHRF

from hfpg.rewards.base import RewardError
from hfpg.rewards.metrics import BLEUReward, ChrFReward, EvaluateMetricReward, ROUGEReward, TERReward

LONG = " ".join(["the cat sat on the mat while the dog slept by the door"] * 60)  # 780 words

# (completion, references): one row each
CASES = [
    ("the cat sat on the mat", ["the cat sat on the mat"]),  # exact match
    ("the cat sat on a mat today", ["the cat sat on the mat"]),  # partial overlap
    ("completely different words here", ["the cat sat on the mat"]),  # no overlap
    ("", ["the cat sat on the mat"]),  # empty completion
    ("the cat sat", [""]),  # empty reference
    ("", [""]),  # both empty
    ("Le café était très chaud, n'est-ce pas ?", ["Le café était chaud."]),  # accents
    ("猫が座った", ["猫が座った"]),  # CJK, exact
    ("猫がマットの上に座っていた", ["猫が座った"]),  # CJK, partial
    ("I love pizza 🍕🍕! 😀", ["I love pizza 🍕!"]),  # emoji
    ("Hello, world!!! How are you?", ["Hello world how are you"]),  # punctuation
    ("THE CAT SAT ON THE MAT", ["the cat sat on the mat"]),  # casing
    ("the dog ran in the park", ["a dog runs in a park", "the dog ran in the park today", "dogs run"]),  # 3 refs
    ("the cat is on the mat", ["there is a cat on the mat", "the cat sits on the mat"]),  # 2 refs
    (LONG, ["the cat sat on the mat", "a dog slept by the door"]),  # very long completion
    ("first sentence here.\nand the second one.", ["the first sentence here.\nthe second one follows."]),  # lines
]
COMPLETIONS = [c for c, _ in CASES]
REFERENCES = [r for _, r in CASES]
PROMPTS = ["p"] * len(CASES)


def scores(reward, references=REFERENCES, column="references"):
    out = reward(PROMPTS, COMPLETIONS, **{column: references, "prompt_id": list(range(len(CASES)))})
    assert isinstance(out, list) and len(out) == len(CASES) and all(isinstance(v, float) for v in out)
    return out


# --------------------------------------------------------------------------------------------------------------
# sacrebleu: BLEU, chrF, chrF++, TER
# --------------------------------------------------------------------------------------------------------------
BLEU_CONFIGS = [
    {},
    {"smooth_method": "floor"},
    {"smooth_method": "floor", "smooth_value": 0.3},
    {"smooth_method": "add-k"},
    {"smooth_method": "add-k", "smooth_value": 2},
    {"smooth_method": "none"},
    {"tokenize": "char"},
    {"tokenize": "intl"},
    {"tokenize": "zh"},
    {"tokenize": "none", "smooth_method": "floor"},
    {"lowercase": True},
    {"lowercase": True, "tokenize": "intl", "smooth_method": "add-k"},
    {"use_effective_order": False},
]


@pytest.mark.parametrize("kwargs", BLEU_CONFIGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
@pytest.mark.parametrize("scale", [0.01, 1.0])
def test_bleu_equals_sacrebleu_sentence_bleu(kwargs, scale):
    got = scores(BLEUReward(scale=scale, **kwargs))
    for (c, refs), g in zip(CASES, got):
        assert g == sacrebleu.sentence_bleu(c, refs, **kwargs).score * scale, (c, refs)


def test_bleu_sanity_values():
    got = scores(BLEUReward())
    assert got[0] == pytest.approx(1.0) and got[2] == 0.0 and got[3] == 0.0 and got[5] == 0.0
    assert 0.0 < got[1] < 1.0 and all(0.0 <= g <= 1.0 + 1e-12 for g in got)
    assert scores(BLEUReward(tokenize="zh"))[7] == pytest.approx(1.0)  # CJK exact match with the zh tokenizer
    assert scores(BLEUReward(lowercase=True))[11] == pytest.approx(1.0)


CHRF_CONFIGS = [
    {},
    {"word_order": 2},  # chrF++
    {"word_order": 1, "char_order": 4, "beta": 1},
    {"beta": 3, "eps_smoothing": True},
    {"word_order": 2, "eps_smoothing": True},
    {"whitespace": True},
    {"lowercase": True},
    {"lowercase": True, "word_order": 2, "whitespace": True},
]


@pytest.mark.parametrize("kwargs", CHRF_CONFIGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_chrf_equals_sacrebleu_sentence_chrf(kwargs):
    scale = 0.01
    got = scores(ChrFReward(**kwargs))
    sacre = dict(kwargs)
    lowercase = sacre.pop("lowercase", False)
    whitespace = sacre.pop("whitespace", False)
    for (c, refs), g in zip(CASES, got):
        if lowercase:  # sentence_chrf has no lowercase argument: the CHRF class does
            expected = CHRF(lowercase=True, whitespace=whitespace, **sacre).sentence_score(c, refs).score
        else:
            expected = sacrebleu.sentence_chrf(c, refs, remove_whitespace=not whitespace, **sacre).score
        assert g == expected * scale, (c, refs)


def test_chrf_names_and_values():
    assert ChrFReward().name == "chrf" and ChrFReward(word_order=2).name == "chrf++"
    assert ChrFReward(word_order=1).name == "chrf" and ChrFReward(name="x").name == "x"
    got = scores(ChrFReward())
    assert got[0] == 1.0 and got[7] == 1.0 and got[3] == 0.0 and got[5] == 0.0 and 0.0 < got[8] < 1.0


TER_CONFIGS = [
    {},
    {"normalized": True},
    {"no_punct": True},
    {"asian_support": True},
    {"case_sensitive": True},
    {"normalized": True, "no_punct": True, "asian_support": True, "case_sensitive": True},
]


@pytest.mark.parametrize("kwargs", TER_CONFIGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
@pytest.mark.parametrize("scale", [0.01, 0.5])
def test_ter_is_minus_sacrebleu_sentence_ter(kwargs, scale):
    got = scores(TERReward(scale=scale, **kwargs))
    for (c, refs), g in zip(CASES, got):
        assert g == -sacrebleu.sentence_ter(c, refs, **kwargs).score * scale, (c, refs)


def test_ter_range():
    got = scores(TERReward())
    assert got[0] == 0.0 and str(got[0]) == "0.0"  # perfect = 0.0 (not -0.0)
    assert got[11] == 0.0  # case-insensitive by default
    assert got[3] == -1.0  # empty completion: every reference word is an edit
    assert got[14] < -10.0 and all(g <= 0.0 for g in got)  # long rambling completion: far below -1


# --------------------------------------------------------------------------------------------------------------
# rouge_score
# --------------------------------------------------------------------------------------------------------------
def rouge_expected(scorer, rouge_type, measure, c, refs):
    score = scorer.score(refs[0], c) if len(refs) == 1 else scorer.score_multi(refs, c)
    return getattr(score[rouge_type], measure)


@pytest.mark.parametrize("rouge_type", ["rouge1", "rouge2", "rougeL", "rougeLsum"])
@pytest.mark.parametrize("measure", ["precision", "recall", "fmeasure"])
@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_equals_rouge_score(rouge_type, measure, use_stemmer):
    got = scores(ROUGEReward(rouge_type=rouge_type, measure=measure, use_stemmer=use_stemmer))
    scorer = RougeScorer([rouge_type], use_stemmer=use_stemmer)
    for (c, refs), g in zip(CASES, got):
        assert g == rouge_expected(scorer, rouge_type, measure, c, refs), (c, refs)


def test_rouge_other_types_names_and_values():
    for rouge_type in ("rouge3", "rouge9"):
        got = scores(ROUGEReward(rouge_type=rouge_type))
        scorer = RougeScorer([rouge_type])
        assert got == [rouge_expected(scorer, rouge_type, "fmeasure", c, refs) for c, refs in CASES]
    assert ROUGEReward().name == "rougeL" and ROUGEReward(rouge_type="rouge2").name == "rouge2"
    assert ROUGEReward(measure="precision").name == "rougeL_precision"
    assert ROUGEReward(name="r").name == "r"
    got = scores(ROUGEReward())
    assert got[0] == 1.0 and got[11] == 1.0 and got[3] == 0.0 and got[5] == 0.0
    assert got[7] == 0.0  # default tokenizer keeps only [a-z0-9]: Japanese vanishes, even on an exact match


class CharTokenizer:
    """Every non-space character is a token: makes ROUGE work for text without spaces."""

    def tokenize(self, text):
        return [ch for ch in text if not ch.isspace()]


def test_rouge_custom_tokenizer_handles_cjk():
    got = scores(ROUGEReward(rouge_type="rouge1", tokenizer=CharTokenizer()))
    scorer = RougeScorer(["rouge1"], tokenizer=CharTokenizer())
    assert got == [rouge_expected(scorer, "rouge1", "fmeasure", c, refs) for c, refs in CASES]
    assert got[7] == 1.0 and 0.0 < got[8] < 1.0


def test_rouge_split_summaries(monkeypatch):
    # nltk's punkt data may be missing offline: split on ". " instead, for the reward and the reference alike
    monkeypatch.setattr(nltk, "sent_tokenize", lambda text: text.replace(". ", ".\n").split("\n"))
    got = scores(ROUGEReward(rouge_type="rougeLsum", split_summaries=True))
    scorer = RougeScorer(["rougeLsum"], split_summaries=True)
    assert got == [rouge_expected(scorer, "rougeLsum", "fmeasure", c, refs) for c, refs in CASES]

    def missing(text):
        raise LookupError("Resource 'punkt_tab' not found.")

    monkeypatch.setattr(nltk, "sent_tokenize", missing)
    with pytest.raises(ValueError, match="punkt_tab"):
        ROUGEReward(rouge_type="rougeLsum", split_summaries=True)
    ROUGEReward(rouge_type="rouge1", split_summaries=True)  # the flag only matters for rougeLsum


# --------------------------------------------------------------------------------------------------------------
# references: plain strings, other columns, errors
# --------------------------------------------------------------------------------------------------------------
ALL_REWARDS = [
    BLEUReward,
    ChrFReward,
    lambda **k: ChrFReward(word_order=2, **k),
    TERReward,
    ROUGEReward,
    lambda **k: ROUGEReward(rouge_type="rouge2", measure="recall", **k),
]


@pytest.mark.parametrize("make", ALL_REWARDS)
def test_string_reference_is_a_one_element_list(make):
    one = [refs[0] for refs in REFERENCES]
    assert scores(make(), one) == scores(make(), [[r] for r in one])
    assert scores(make(), tuple(one)) == scores(make(), one)
    assert scores(make(references_column="answer"), one, column="answer") == scores(make(), one)


@pytest.mark.parametrize("make", ALL_REWARDS)
def test_missing_column_and_bad_rows(make):
    reward = make()
    with pytest.raises(RewardError) as e:
        reward(["p", "q"], ["a", "b"], answer=["a", "b"], prompt_id=[0, 1])
    assert "'references'" in str(e.value) and "['answer', 'prompt_id']" in str(e.value)
    for bad in (3, None, [], ["ok", 5]):
        with pytest.raises(RewardError, match="row 1"):
            reward(["p", "q"], ["a", "b"], references=["a", bad])
    with pytest.raises(RewardError, match="1 values for 2 completions"):
        reward(["p", "q"], ["a", "b"], references=["a"])


def test_empty_batch():
    for make in ALL_REWARDS:
        assert make()([], [], references=[]) == []


# --------------------------------------------------------------------------------------------------------------
# constructor validation
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: BLEUReward(smooth_method="laplace"), "smooth_method"),
        (lambda: BLEUReward(smooth_value=-1), "smooth_value"),
        (lambda: BLEUReward(tokenize="spacy"), "tokenize"),
        (lambda: BLEUReward(scale=0), "scale"),
        (lambda: BLEUReward(scale=-0.01), "scale"),
        (lambda: BLEUReward(scale=float("nan")), "scale"),
        (lambda: BLEUReward(references_column=""), "references_column"),
        (lambda: ChrFReward(char_order=-1), "char_order"),
        (lambda: ChrFReward(word_order=1.5), "word_order"),
        (lambda: ChrFReward(char_order=0, word_order=0), "char_order \\+ word_order"),
        (lambda: ChrFReward(beta=-1), "beta"),
        (lambda: ChrFReward(scale=0), "scale"),
        (lambda: TERReward(scale=-1), "scale"),
        (lambda: TERReward(references_column=None), "references_column"),
        (lambda: ROUGEReward(rouge_type="rougeW"), "rouge_type"),
        (lambda: ROUGEReward(rouge_type="rouge0"), "rouge_type"),
        (lambda: ROUGEReward(measure="f1"), "measure"),
        (lambda: ROUGEReward(tokenizer=str.split), "tokenize"),
        (lambda: EvaluateMetricReward(FakeMetric(), scale=0), "scale"),
        (lambda: EvaluateMetricReward(FakeMetric(), compute_kwargs=[1]), "compute_kwargs"),
    ],
)
def test_constructor_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_evaluate_metric_must_have_compute():
    with pytest.raises(TypeError, match="evaluate module"):
        EvaluateMetricReward(object())


def test_default_names():
    assert [BLEUReward().name, TERReward().name, BLEUReward(name="b").name] == ["bleu", "ter", "b"]
    assert EvaluateMetricReward(FakeMetric()).name == "fake"
    assert EvaluateMetricReward(FakeMetric(), name="f").name == "f"


# --------------------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------------------
class FakeMetric:
    """Stands in for an evaluate module: records its calls, returns the dict it is given per call."""

    name = "fake"

    def __init__(self, result=None):
        self.result, self.calls = result or {"fake": 0.25}, []

    def compute(self, predictions, references, **kwargs):
        self.calls.append((predictions, references, kwargs))
        return dict(self.result)


def test_evaluate_reward_with_a_stand_in_metric():
    metric = FakeMetric({"fake": 0.25, "other": 3.0, "label": "x"})
    reward = EvaluateMetricReward(metric, compute_kwargs={"lang": "en"}, scale=2.0)
    assert reward(["p", "q"], ["a", ""], references=["x", ["y", "z"]]) == [0.5, 0.5]
    # one compute per row, the raw column value wrapped in a one-element list, compute_kwargs passed through
    assert metric.calls == [(["a"], ["x"], {"lang": "en"}), ([""], [["y", "z"]], {"lang": "en"})]
    assert EvaluateMetricReward(metric, key="other", scale=-1)(["p"], ["a"], references=["x"]) == [-3.0]
    single = FakeMetric({"score": 7, "flag": True, "label": "x", "per_item": [1.0]})
    assert EvaluateMetricReward(single)(["p"], ["a"], references=["x"]) == [7.0]  # the only number (bool is not)
    with pytest.raises(RewardError, match=r"\['flag', 'label', 'per_item', 'score'\]"):
        EvaluateMetricReward(single, key="missing")(["p"], ["a"], references=["x"])
    with pytest.raises(RewardError, match="not a number"):
        EvaluateMetricReward(single, key="label")(["p"], ["a"], references=["x"])
    with pytest.raises(RewardError) as e:
        EvaluateMetricReward(metric)(["p"], ["a"], refs=["x"])
    assert "'references'" in str(e.value) and "['refs']" in str(e.value)
    with pytest.raises(RewardError, match="2 values for 1 completions"):
        EvaluateMetricReward(metric)(["p"], ["a"], references=["x", "y"])


CHAR_MATCH = textwrap.dedent('''
    """Share of positions holding the same character (a test metric)."""
    import datasets
    import evaluate


    class CharMatch(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(
                description="share of equal characters", citation="", inputs_description="",
                features=datasets.Features({"predictions": datasets.Value("string"),
                                            "references": datasets.Value("string")}),
            )

        def _compute(self, predictions, references, mode="named"):
            shares = [sum(a == b for a, b in zip(p, r)) / max(len(p), len(r), 1)
                      for p, r in zip(predictions, references)]
            share = sum(shares) / len(shares)
            if mode == "named":
                return {"char_match": share, "count": len(shares), "note": "chars"}
            if mode == "single":
                return {"share": share, "note": "chars"}
            return {"share": share, "miss": 1.0 - share}
''')

BEST_CHAR_MATCH = textwrap.dedent('''
    """Best share of equal characters over several references per prediction (a test metric)."""
    import datasets
    import evaluate


    class BestCharMatch(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(
                description="best share of equal characters", citation="", inputs_description="",
                features=datasets.Features({"predictions": datasets.Value("string"),
                                            "references": datasets.Sequence(datasets.Value("string"))}),
            )

        def _compute(self, predictions, references):
            best = [max(sum(a == b for a, b in zip(p, r)) / max(len(p), len(r), 1) for r in refs)
                    for p, refs in zip(predictions, references)]
            return {"best_char_match": sum(best) / len(best)}
''')


@pytest.fixture(scope="module")
def metric_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    (root / "char_match").mkdir()
    (root / "char_match" / "char_match.py").write_text(CHAR_MATCH)
    (root / "best_char_match.py").write_text(BEST_CHAR_MATCH)
    return str(root / "char_match"), str(root / "best_char_match.py")


PREDS = ["abcd", "abxx", "", "abc", "xbcy", "é猫"]
REFS = ["abcd", "abcd", "ab", "xyz", "abc", "é犬"]
SHARES = [1.0, 0.5, 0.0, 0.0, 0.5, 0.5]  # by hand: equal characters / longer length


def test_evaluate_local_metric_from_path_and_module(metric_paths):
    import evaluate

    folder, _ = metric_paths
    from_path = EvaluateMetricReward(folder)
    assert from_path.name == "char_match"
    assert from_path(["p"] * 6, PREDS, references=REFS) == SHARES
    module = evaluate.load(os.path.join(folder, "char_match.py"))
    from_module = EvaluateMetricReward(module, references_column="gold", scale=10.0, name="cm")
    assert from_module(["p"] * 6, PREDS, gold=REFS) == [10 * s for s in SHARES] and from_module.name == "cm"


def test_evaluate_key_selection(metric_paths):
    import evaluate

    module = evaluate.load(metric_paths[0])
    single = EvaluateMetricReward(module, compute_kwargs={"mode": "single"})
    assert single(["p"] * 6, PREDS, references=REFS) == SHARES  # the only numeric entry
    miss = EvaluateMetricReward(module, key="miss", compute_kwargs={"mode": "pair"})
    assert miss(["p"] * 6, PREDS, references=REFS) == [1.0 - s for s in SHARES]
    assert EvaluateMetricReward(module, key="count")(["p"] * 2, PREDS[:2], references=REFS[:2]) == [1.0, 1.0]
    with pytest.raises(RewardError, match=r"\['miss', 'share'\].*key="):  # two numbers, none named char_match
        EvaluateMetricReward(module, compute_kwargs={"mode": "pair"})(["p"], ["a"], references=["a"])


def test_evaluate_several_references_per_row(metric_paths):
    reward = EvaluateMetricReward(metric_paths[1])
    assert reward.name == "best_char_match"
    out = reward(["p"] * 3, ["abcd", "", "xyz"], references=[["zzzz", "abzz", "abcd"], ["a"], ["xya", "qqq"]])
    assert out == [1.0, 0.0, 2 / 3]
