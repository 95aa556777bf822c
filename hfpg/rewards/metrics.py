"""Reference-metric rewards: each completion scored against its row's reference(s) with BLEU, chrF, TER or ROUGE.

References come from a dataset column (``references`` unless told otherwise): one string per row, or a list of
strings when a row has several references. Each reward builds its metric object once and scores the whole batch in
one call; the value of a row is exactly what the reference implementation returns for that row, times ``scale``.

Empty strings score 0 with every metric here (even an empty completion against an empty reference), except TER, which
gives 0 (= perfect) when both are empty and -100 × scale (-1 by default) when only one of them is.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

from .base import Reward, RewardError, get_column, get_references

ROUGE_TYPES = (*(f"rouge{n}" for n in range(1, 10)), "rougeL", "rougeLsum")
ROUGE_MEASURES = ("precision", "recall", "fmeasure")


def _check_common(cls: str, references_column: str, scale: float | None = None) -> None:
    if not isinstance(references_column, str) or not references_column:
        raise ValueError(f"{cls} references_column must be a non-empty column name, got {references_column!r}")
    if scale is not None and not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{cls} scale must be a finite number > 0, got {scale!r}")


class BLEUReward(Reward):
    """Sentence BLEU (sacrebleu) against the row's reference(s), times ``scale``.

    Equal to ``sacrebleu.sentence_bleu(completion, refs, smooth_method, smooth_value, lowercase, tokenize,
    use_effective_order).score * scale``. Range [0, 1] with the default ``scale=0.01`` (an exact match may read
    1.0000000000000004: sacrebleu computes 100 through exp/log).

    smooth_method: ``exp`` | ``floor`` | ``add-k`` | ``none``; ``smooth_value`` = None takes sacrebleu's default
        (0.1 for floor, 1 for add-k). tokenize: ``13a`` (default), ``intl``, ``char``, ``zh``, ``none``, or one of
        sacrebleu's tokenizers that need extra packages (``ja-mecab``, ``ko-mecab``, ``spm``, ``flores101`` …).
    Sentence BLEU is harsh on short texts: one missing 4-gram order is smoothed, but a completion without a single
    matching word scores 0, and so does an empty completion or reference.
    """

    def __init__(
        self,
        references_column: str = "references",
        smooth_method: str = "exp",
        smooth_value: float | None = None,
        tokenize: str = "13a",
        lowercase: bool = False,
        use_effective_order: bool = True,
        scale: float = 0.01,
        name: str = "bleu",
    ):
        from sacrebleu.metrics import BLEU
        from sacrebleu.metrics.base import Metric

        _check_common("BLEUReward", references_column, scale)
        if smooth_method not in BLEU.SMOOTH_DEFAULTS:
            raise ValueError(
                f"BLEUReward smooth_method must be one of {list(BLEU.SMOOTH_DEFAULTS)}, got {smooth_method!r}"
            )
        if smooth_value is not None and not (isinstance(smooth_value, numbers.Real) and smooth_value >= 0):
            raise ValueError(f"BLEUReward smooth_value must be None or a number >= 0, got {smooth_value!r}")
        if tokenize not in BLEU.TOKENIZERS:
            raise ValueError(f"BLEUReward tokenize must be one of {list(BLEU.TOKENIZERS)}, got {tokenize!r}")
        self.references_column, self.scale, self.name = references_column, scale, name
        # configured as sacrebleu.sentence_bleu configures its own (compat.py; force only silences a corpus warning)
        self.bleu = BLEU(
            lowercase=lowercase,
            tokenize=tokenize,
            force=False,
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            effective_order=use_effective_order,
        )
        # BLEU.sentence_score = Metric.sentence_score plus a log line per call when effective_order is off
        self._sentence_score = functools.partial(Metric.sentence_score, self.bleu)

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        refs = get_references(columns, self.references_column, self.name, len(completions))
        return [self._sentence_score(c, r).score * self.scale for c, r in zip(completions, refs)]


class ChrFReward(Reward):
    """Sentence chrF / chrF++ (sacrebleu) against the row's reference(s), times ``scale``.

    Equal to ``sacrebleu.sentence_chrf(completion, refs, char_order, word_order, beta,
    remove_whitespace=not whitespace, eps_smoothing).score * scale`` (``lowercase`` is the ``CHRF`` class's option,
    which ``sentence_chrf`` does not expose). Range [0, 1] with the default ``scale=0.01``; several references: the
    best one counts.

    word_order=2 is chrF++ (character 1..6-grams plus word 1..2-grams); the name is then ``chrf++``. chrF gives
    partial credit for shared character n-grams, so it is denser than BLEU on short texts, morphology and
    languages written without spaces.
    """

    def __init__(
        self,
        references_column: str = "references",
        char_order: int = 6,
        word_order: int = 0,
        beta: int = 2,
        lowercase: bool = False,
        whitespace: bool = False,
        eps_smoothing: bool = False,
        scale: float = 0.01,
        name: str | None = None,
    ):
        from sacrebleu.metrics import CHRF

        _check_common("ChrFReward", references_column, scale)
        for arg, value in (("char_order", char_order), ("word_order", word_order)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ChrFReward {arg} must be an int >= 0, got {value!r}")
        if char_order + word_order < 1:
            raise ValueError("ChrFReward needs char_order + word_order >= 1")
        if not (isinstance(beta, numbers.Real) and beta >= 0):
            raise ValueError(f"ChrFReward beta must be a number >= 0, got {beta!r}")
        self.references_column, self.scale = references_column, scale
        self.name = name or ("chrf++" if word_order == 2 else "chrf")
        self.chrf = CHRF(
            char_order=char_order,
            word_order=word_order,
            beta=beta,
            lowercase=lowercase,
            whitespace=whitespace,
            eps_smoothing=eps_smoothing,
        )

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        refs = get_references(columns, self.references_column, self.name, len(completions))
        return [self.chrf.sentence_score(c, r).score * self.scale for c, r in zip(completions, refs)]


class TERReward(Reward):
    """Minus the translation edit rate (sacrebleu) against the row's reference(s), times ``scale``.

    TER = edits (insertions, deletions, substitutions, block shifts) / reference words, in percent — lower is
    better, so the reward is ``-sacrebleu.sentence_ter(completion, refs, normalized, no_punct, asian_support,
    case_sensitive).score * scale``. Range (-inf, 0]: 0 = perfect; -1 (at ``scale=0.01``) = as many edits as
    reference words, which an empty completion gets; a long rambling completion goes far below -1.
    Case-insensitive unless ``case_sensitive``; several references: the closest one counts.
    """

    def __init__(
        self,
        references_column: str = "references",
        normalized: bool = False,
        no_punct: bool = False,
        asian_support: bool = False,
        case_sensitive: bool = False,
        scale: float = 0.01,
        name: str = "ter",
    ):
        from sacrebleu.metrics import TER

        _check_common("TERReward", references_column, scale)
        self.references_column, self.scale, self.name = references_column, scale, name
        self.ter = TER(
            normalized=normalized, no_punct=no_punct, asian_support=asian_support, case_sensitive=case_sensitive
        )

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        refs = get_references(columns, self.references_column, self.name, len(completions))
        # 0.0 - x rather than -x: a perfect match reads 0.0, not -0.0
        return [0.0 - self.ter.sentence_score(c, r).score * self.scale for c, r in zip(completions, refs)]


class ROUGEReward(Reward):
    """ROUGE (Google's ``rouge_score``) of the completion against the row's reference(s). Range [0, 1].

    rouge_type: ``rouge1`` … ``rouge9`` (n-gram overlap), ``rougeL`` (longest common subsequence) or ``rougeLsum``
        (summary-level LCS over sentences, one per line, or split with nltk when ``split_summaries`` — that needs
        nltk's ``punkt_tab`` data, checked here at construction).
    measure: ``precision``, ``recall`` or ``fmeasure``. One reference: ``scorer.score(ref, completion)``; several:
        ``scorer.score_multi(refs, completion)``, which keeps the reference with the best *F-measure*, so with
        ``measure="precision"`` you get that reference's precision, not the best precision.

    Non-English text: rouge_score's default tokenizer lowercases, replaces everything outside ``[a-z0-9]`` with
    spaces and (``use_stemmer``) applies the Porter stemmer — accented letters split words, and CJK, Cyrillic or
    Arabic text vanishes entirely, so "猫が座った" scores 0 even against itself. Pass ``tokenizer``: any object
    with ``.tokenize(text) -> list[str]`` (e.g. a wrapper around a Hugging Face tokenizer) to fix that.
    """

    def __init__(
        self,
        references_column: str = "references",
        rouge_type: str = "rougeL",
        measure: str = "fmeasure",
        use_stemmer: bool = False,
        split_summaries: bool = False,
        tokenizer=None,
        name: str | None = None,
    ):
        from rouge_score.rouge_scorer import RougeScorer

        _check_common("ROUGEReward", references_column)
        if rouge_type not in ROUGE_TYPES:
            raise ValueError(f"ROUGEReward rouge_type must be one of {list(ROUGE_TYPES)}, got {rouge_type!r}")
        if measure not in ROUGE_MEASURES:
            raise ValueError(f"ROUGEReward measure must be one of {list(ROUGE_MEASURES)}, got {measure!r}")
        if tokenizer is not None and not callable(getattr(tokenizer, "tokenize", None)):
            raise ValueError(f"ROUGEReward tokenizer must have a .tokenize(text) method, got {type(tokenizer)}")
        if split_summaries and rouge_type == "rougeLsum":
            _check_sentence_splitter()
        self.references_column, self.rouge_type, self.measure = references_column, rouge_type, measure
        self.name = name or (rouge_type if measure == "fmeasure" else f"{rouge_type}_{measure}")
        self.scorer = RougeScorer(
            [rouge_type], use_stemmer=use_stemmer, split_summaries=split_summaries, tokenizer=tokenizer
        )

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        refs = get_references(columns, self.references_column, self.name, len(completions))
        out = []
        for c, r in zip(completions, refs):
            score = self.scorer.score(r[0], c) if len(r) == 1 else self.scorer.score_multi(r, c)
            out.append(float(getattr(score[self.rouge_type], self.measure)))
        return out


def _check_sentence_splitter() -> None:
    """rougeLsum with split_summaries calls nltk.sent_tokenize, which needs nltk data that may not be installed."""
    import nltk

    try:
        nltk.sent_tokenize("One. Two.")
    except LookupError as e:
        raise ValueError(
            "ROUGEReward(rouge_type='rougeLsum', split_summaries=True) splits sentences with nltk, whose 'punkt_tab' "
            "data is not installed: run `python -m nltk.downloader punkt_tab`, or put one sentence per line in "
            "completions and references and keep split_summaries=False"
        ) from e


class EvaluateMetricReward(Reward):
    """Any Hugging Face ``evaluate`` metric, computed on each completion separately, times ``scale``.

    metric: a loaded ``evaluate`` module, or a string for ``evaluate.load`` — a Hub name (``"meteor"``,
        ``"bertscore"``; needs network or the Hub cache) or a local script: ``path/to/my_metric.py`` or a folder
        ``path/to/my_metric/`` holding ``my_metric.py`` (works offline).
    Row i scores ``metric.compute(predictions=[completion_i], references=[value_i], **compute_kwargs)``, where
    ``value_i`` is the row's raw column value, passed as-is (a string, or a list if the metric takes several
    references per prediction).
    key: the entry of the result dict to use; default: the entry named like the metric (``metric.name``) if there is
        one, else the only numeric entry. scale: any non-zero factor — negative for error rates such as ``wer``.
    Range: the metric's own, times ``scale``. One ``compute`` per row: simple, but slow for model-based metrics
    (BERTScore); write a batched reward function for those.
    """

    def __init__(
        self,
        metric,
        references_column: str = "references",
        key: str | None = None,
        scale: float = 1.0,
        compute_kwargs: dict | None = None,
        name: str | None = None,
    ):
        _check_common("EvaluateMetricReward", references_column)
        if not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale != 0):
            raise ValueError(f"EvaluateMetricReward scale must be a finite non-zero number, got {scale!r}")
        if compute_kwargs is not None and not isinstance(compute_kwargs, dict):
            raise ValueError(f"EvaluateMetricReward compute_kwargs must be a dict, got {type(compute_kwargs)}")
        if isinstance(metric, str):
            import evaluate  # several seconds to import: only when a metric must be loaded

            metric = evaluate.load(metric)
        if not callable(getattr(metric, "compute", None)):
            raise TypeError(
                f"EvaluateMetricReward metric must be an evaluate module or a name/path for "
                f"evaluate.load, got {type(metric).__name__}"
            )
        self.metric, self.references_column, self.key, self.scale = metric, references_column, key, scale
        self.compute_kwargs = dict(compute_kwargs or {})
        self.name = name or getattr(metric, "name", None) or "evaluate"

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        values = get_column(columns, self.references_column, self.name, len(completions))
        out = []
        for i, (c, ref) in enumerate(zip(completions, values)):
            result = self.metric.compute(predictions=[c], references=[ref], **self.compute_kwargs)
            out.append(float(self._pick(result, i)) * self.scale)
        return out

    def _pick(self, result, row: int):
        """The value of ``key`` (or the default entry) in the metric's result dict for ``row``."""
        if not isinstance(result, dict):
            raise RewardError(
                f"reward {self.name!r}: metric.compute returned {type(result).__name__} for row {row}, expected a dict"
            )
        key = self.key
        if key is None:
            numeric = [k for k, v in result.items() if _is_number(v)]
            if getattr(self.metric, "name", None) in result:
                key = self.metric.name
            elif len(numeric) == 1:
                key = numeric[0]
            else:
                raise RewardError(
                    f"reward {self.name!r}: the metric returned {sorted(result)} ({len(numeric)} "
                    f"numeric); pass key=<one of them> to choose the value to use"
                )
        if key not in result:
            raise RewardError(f"reward {self.name!r}: key {key!r} is not in the metric's result {sorted(result)}")
        if not _is_number(result[key]):
            raise RewardError(f"reward {self.name!r}: result[{key!r}] = {result[key]!r} at row {row} is not a number")
        return result[key]


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)
