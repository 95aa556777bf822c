"""Model-based rewards: LM likelihood and learned reward models, checked against plain per-sample computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CORPUS, tiny_gpt2, tiny_llama
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    PreTrainedTokenizerFast,
)

from hfpg.rewards.models import LMLikelihoodReward, RewardModelReward

PROMPTS = ["the cat sat", "a good day is", "", "policy gradient methods", "hello world, this is"]
COMPLETIONS = [" on the mat", " a day with good food and good friends", " hello", "", " tiny"]


def other_tokenizer() -> PreTrainedTokenizerFast:
    """A second byte-level BPE with a different vocabulary and no pad token (GPT-2 style)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=290, min_frequency=1, show_progress=False, special_tokens=["</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="</s>")


# ---- manual references ---------------------------------------------------------------------------------------------
def manual_lm(model, tok, prompt, completion, condition_on_prompt=True):
    """(sum, mean) of log p(completion tokens | context), one sample at a time, no padding."""
    ctx = tok(prompt).input_ids if condition_on_prompt else []
    if not ctx:
        ctx = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    target = tok(completion, add_special_tokens=False).input_ids or [tok.eos_token_id]
    return manual_lm_ids(model, ctx, target)


def manual_lm_ids(model, ctx, target):
    ids = ctx + target
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    token_logps = [logp[len(ctx) - 1 + j, target[j]].item() for j in range(len(target))]
    return sum(token_logps), sum(token_logps) / len(token_logps)


def manual_rm(model, enc):
    with torch.no_grad():
        return model(**{k: torch.tensor([v]) for k, v in enc.items()}).logits[0].float()


def gpt2_classifier(tok, num_labels=1, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = {
        "vocab_size": len(tok),
        "n_positions": 64,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "num_labels": num_labels,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.eos_token_id,
    }
    return GPT2ForSequenceClassification(GPT2Config(**{**cfg, **overrides})).eval()


def bert_classifier(tok, num_labels=1, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "num_labels": num_labels,
        "pad_token_id": tok.pad_token_id,
    }
    return BertForSequenceClassification(BertConfig(**{**cfg, **overrides})).eval()


def three_labels(model):
    model.config.id2label = {0: "neg", 1: "neu", 2: "pos"}
    model.config.label2id = {"neg": 0, "neu": 1, "pos": 2}
    return model


# ---- LMLikelihoodReward --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("condition_on_prompt", [True, False])
@pytest.mark.parametrize("output", ["mean_logprob", "sum_logprob", "neg_perplexity"])
def test_lm_likelihood_matches_manual(tokenizer, output, condition_on_prompt):
    model = tiny_gpt2(tokenizer)
    reward = LMLikelihoodReward(model, tokenizer=tokenizer, output=output, condition_on_prompt=condition_on_prompt)
    scores = reward(PROMPTS, COMPLETIONS)
    expected = []
    for p, c in zip(PROMPTS, COMPLETIONS):
        total, mean = manual_lm(model, tokenizer, p, c, condition_on_prompt)
        expected.append({"sum_logprob": total, "mean_logprob": mean, "neg_perplexity": -math.exp(-mean)}[output])
    assert all(type(s) is float for s in scores)
    assert scores == pytest.approx(expected, rel=1e-5, abs=1e-5)
    if output == "mean_logprob":
        assert all(s <= 0 for s in scores)
    if output == "neg_perplexity":
        assert all(s <= -1 for s in scores)


def test_lm_likelihood_prompt_changes_scores(tokenizer):
    model = tiny_gpt2(tokenizer)
    with_prompt = LMLikelihoodReward(model, tokenizer=tokenizer)(PROMPTS[:2], COMPLETIONS[:2])
    without = LMLikelihoodReward(model, tokenizer=tokenizer, condition_on_prompt=False)(PROMPTS[:2], COMPLETIONS[:2])
    assert with_prompt != pytest.approx(without)


def test_lm_likelihood_other_scoring_tokenizer(tokenizer):
    """The scoring LM re-tokenises text with its own tokenizer (here: another vocabulary, no pad token)."""
    scorer_tok = other_tokenizer()
    assert scorer_tok.pad_token is None and len(scorer_tok) != len(tokenizer)
    model = tiny_llama(scorer_tok, pad_token_id=None)
    reward = LMLikelihoodReward(model, tokenizer=scorer_tok, batch_size=2)
    expected = [manual_lm(model, scorer_tok, p, c)[1] for p, c in zip(PROMPTS, COMPLETIONS)]
    assert reward(PROMPTS, COMPLETIONS) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_lm_likelihood_pad_is_eos_tokenizer(tokenizer_pad_is_eos):
    tok = tokenizer_pad_is_eos
    model = tiny_llama(tok)
    reward = LMLikelihoodReward(model, tokenizer=tok, output="sum_logprob", batch_size=3)
    expected = [manual_lm(model, tok, p, c)[0] for p, c in zip(PROMPTS, COMPLETIONS)]
    assert reward(PROMPTS, COMPLETIONS) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_lm_likelihood_batching_does_not_leak_padding(tokenizer):
    model = tiny_llama(tokenizer)
    big = LMLikelihoodReward(model, tokenizer=tokenizer, batch_size=16)(PROMPTS, COMPLETIONS)
    small = LMLikelihoodReward(model, tokenizer=tokenizer, batch_size=2)(PROMPTS, COMPLETIONS)
    one = [LMLikelihoodReward(model, tokenizer=tokenizer)([p], [c])[0] for p, c in zip(PROMPTS, COMPLETIONS)]
    assert small == pytest.approx(big, rel=1e-5, abs=1e-6)
    assert one == pytest.approx(big, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("prompt", ["the cat sat", ""])
def test_lm_likelihood_empty_completion_is_logp_of_eos(tokenizer, prompt):
    model = tiny_gpt2(tokenizer)
    ctx = tokenizer(prompt).input_ids or [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([ctx])).logits[0, -1]
    logp_eos = torch.log_softmax(logits.float(), -1)[tokenizer.eos_token_id].item()
    for output, expected in [
        ("mean_logprob", logp_eos),
        ("sum_logprob", logp_eos),
        ("neg_perplexity", -math.exp(-logp_eos)),
    ]:
        score = LMLikelihoodReward(model, tokenizer=tokenizer, output=output)([prompt], [""])[0]
        assert score == pytest.approx(expected, rel=1e-5)


def test_lm_likelihood_truncation_keeps_completion(tokenizer):
    model = tiny_gpt2(tokenizer, n_positions=12)  # default max_length = max_position_embeddings = 12
    prompt = "reinforcement learning fine tunes language models with rewards and the cat sat on the mat"
    short, long = " good", " a good day is a day with good food and good friends and the dog sat on the log"
    prompt_ids = tokenizer(prompt).input_ids
    short_ids, long_ids = (tokenizer(c, add_special_tokens=False).input_ids for c in (short, long))
    assert len(prompt_ids) > 12 and len(long_ids) > 12 and len(short_ids) == 1
    reward = LMLikelihoodReward(model, tokenizer=tokenizer, output="sum_logprob")
    expected = [
        manual_lm_ids(model, prompt_ids[-11:], short_ids)[0],  # context cut from the left
        manual_lm_ids(model, prompt_ids[-1:], long_ids[:11])[0],
    ]  # 1 context token, completion cut right
    assert reward([prompt, prompt], [short, long]) == pytest.approx(expected, rel=1e-5)
    tiny = LMLikelihoodReward(model, tokenizer=tokenizer, output="sum_logprob", max_length=4)([prompt], [short])
    assert tiny == pytest.approx([manual_lm_ids(model, prompt_ids[-3:], short_ids)[0]], rel=1e-5)


def test_lm_likelihood_loads_lazily_from_a_local_directory(tokenizer, tmp_path):
    model = tiny_gpt2(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reward = LMLikelihoodReward(str(tmp_path), batch_size=2)
    assert reward.model is None and reward.tokenizer is None  # construction loads nothing
    assert LMLikelihoodReward("no/such-model").model is None  # a config naming any model validates without loading
    expected = [manual_lm(model, tokenizer, p, c)[1] for p, c in zip(PROMPTS, COMPLETIONS)]
    assert reward(PROMPTS, COMPLETIONS) == pytest.approx(expected, rel=1e-5, abs=1e-5)  # first call loads
    other = LMLikelihoodReward(tmp_path, model_kwargs={"dtype": "float32"})
    other.setup(device="cpu")
    assert other.model is not None and not other.model.training
    assert other(PROMPTS, COMPLETIONS) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_lm_likelihood_validates_arguments():
    with pytest.raises(ValueError, match="output must be one of"):
        LMLikelihoodReward("gpt2", output="perplexity")
    with pytest.raises(ValueError, match="max_length"):
        LMLikelihoodReward("gpt2", max_length=1)
    with pytest.raises(ValueError, match="batch_size"):
        LMLikelihoodReward("gpt2", batch_size=0)


def _check_frozen(model):
    assert not model.training and not any(m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())
    assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))
    assert all(p.grad is None for p in model.parameters())


def test_setup_freezes_the_model_and_builds_no_graph(tokenizer):
    model = tiny_gpt2(tokenizer, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5).train()
    assert any(m.p > 0 for m in model.modules() if isinstance(m, nn.Dropout))
    reward = LMLikelihoodReward(model, tokenizer=tokenizer)
    reward.setup(device="cpu", gather=None)
    _check_frozen(model)
    assert reward.device == torch.device("cpu")
    first, second = reward(PROMPTS, COMPLETIONS), reward(PROMPTS, COMPLETIONS)
    assert first == second and all(type(s) is float for s in first)  # deterministic: dropout is off
    _check_frozen(model)


def test_first_call_without_setup_prepares_the_model(tokenizer):
    model = bert_classifier(tokenizer, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5).train()
    reward = RewardModelReward(model, tokenizer=tokenizer)
    scores = reward(PROMPTS, COMPLETIONS)
    _check_frozen(model)
    assert all(type(s) is float for s in scores)
    assert reward(PROMPTS, COMPLETIONS) == scores


# ---- RewardModelReward ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("input_format", ["concat", "completion"])
def test_reward_model_logit_matches_manual(tokenizer, input_format):
    model = gpt2_classifier(tokenizer)
    reward = RewardModelReward(model, tokenizer=tokenizer, input_format=input_format, batch_size=2)
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS)] if input_format == "concat" else COMPLETIONS
    texts, prompts = texts[:3] + texts[4:], PROMPTS[:3] + PROMPTS[4:]  # row 3 has an empty completion
    completions = COMPLETIONS[:3] + COMPLETIONS[4:]
    expected = [manual_rm(model, {"input_ids": tokenizer(t).input_ids})[0].item() for t in texts]
    scores = reward(prompts, completions)
    assert scores == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert RewardModelReward(model, tokenizer=tokenizer, input_format=input_format)(
        prompts, completions
    ) == pytest.approx(scores, rel=1e-5, abs=1e-6)


def test_reward_model_tokenizer_without_pad_token_uses_eos():
    tok = other_tokenizer()
    model = gpt2_classifier(tok, pad_token_id=None)
    reward = RewardModelReward(model, tokenizer=tok, batch_size=5)
    scores = reward(PROMPTS, COMPLETIONS)
    assert model.config.pad_token_id == tok.eos_token_id
    expected = [manual_rm(model, {"input_ids": tok(p + c).input_ids})[0].item() for p, c in zip(PROMPTS, COMPLETIONS)]
    assert scores == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_reward_model_pair_format_cross_encoder(tokenizer):
    from tokenizers.processors import TemplateProcessing

    # a cross-encoder tokenizer: the completion is segment 1 (token_type_ids), as BERT's tokenizer does for pairs
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    model = bert_classifier(tokenizer)
    reward = RewardModelReward(model, tokenizer=tokenizer, input_format="pair", batch_size=2)
    encodings = [dict(tokenizer(p, c)) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert any(1 in enc["token_type_ids"] for enc in encodings)
    expected = [manual_rm(model, enc)[0].item() for enc in encodings]
    assert reward(PROMPTS, COMPLETIONS) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    no_segments = [manual_rm(model, {"input_ids": enc["input_ids"]})[0].item() for enc in encodings]
    assert expected != pytest.approx(no_segments, rel=1e-5, abs=1e-5)  # the segment ids did reach the model


@pytest.mark.parametrize("label", [2, "pos"])
def test_reward_model_label_outputs(tokenizer, label):
    model = three_labels(gpt2_classifier(tokenizer, num_labels=3))
    prob = RewardModelReward(model, tokenizer=tokenizer, output="label_prob", label=label, batch_size=2)
    logit = RewardModelReward(model, tokenizer=tokenizer, output="label_logit", label=label)
    logits = [manual_rm(model, {"input_ids": tokenizer(p + c).input_ids}) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert logit(PROMPTS, COMPLETIONS) == pytest.approx([x[2].item() for x in logits], rel=1e-5, abs=1e-5)
    expected = [torch.softmax(x, -1)[2].item() for x in logits]
    assert prob(PROMPTS, COMPLETIONS) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_reward_model_label_errors(tokenizer):
    model = three_labels(gpt2_classifier(tokenizer, num_labels=3))
    with pytest.raises(ValueError, match=r"num_labels=3.*label_logit.*label_prob"):
        RewardModelReward(model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"unknown label 'happy'.*'neg', 'neu', 'pos'"):
        RewardModelReward(model, tokenizer=tokenizer, output="label_prob", label="happy")
    with pytest.raises(ValueError, match="not a class index"):
        RewardModelReward(model, tokenizer=tokenizer, output="label_logit", label=3)
    with pytest.raises(ValueError, match="needs label="):
        RewardModelReward(model, tokenizer=tokenizer, output="label_prob")
    with pytest.raises(ValueError, match="input_format"):
        RewardModelReward(model, tokenizer=tokenizer, input_format="prompt")


def test_reward_model_label_error_at_lazy_load(tokenizer, tmp_path):
    three_labels(gpt2_classifier(tokenizer, num_labels=3)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reward = RewardModelReward(str(tmp_path), output="label_prob", label="happy")  # nothing loaded yet
    with pytest.raises(ValueError, match="unknown label"):
        reward.setup(device="cpu")
    good = RewardModelReward(str(tmp_path), output="label_prob", label="neu")
    assert good.model is None
    assert all(0 < s < 1 for s in good(PROMPTS, COMPLETIONS))


CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"


def test_reward_model_chat_format(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    model = gpt2_classifier(tokenizer)
    reward = RewardModelReward(model, tokenizer=tokenizer, input_format="chat", batch_size=2)
    expected = []
    for p, c in zip(PROMPTS, COMPLETIONS):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False
        )
        assert text.startswith("<user> ")
        expected.append(manual_rm(model, {"input_ids": tokenizer(text, add_special_tokens=False).input_ids})[0].item())
    assert reward(PROMPTS, COMPLETIONS) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_reward_model_chat_format_needs_a_template(tokenizer):
    assert not tokenizer.chat_template
    reward = RewardModelReward(gpt2_classifier(tokenizer), tokenizer=tokenizer, input_format="chat")
    with pytest.raises(ValueError, match="chat template"):
        reward(PROMPTS, COMPLETIONS)


def test_reward_model_truncates_from_the_left(tokenizer):
    model = gpt2_classifier(tokenizer)
    text = PROMPTS[1] + COMPLETIONS[1]
    ids = tokenizer(text).input_ids
    assert len(ids) > 5
    score = RewardModelReward(model, tokenizer=tokenizer, max_length=5)([PROMPTS[1]], [COMPLETIONS[1]])[0]
    assert score == pytest.approx(manual_rm(model, {"input_ids": ids[-5:]})[0].item(), rel=1e-5)
    assert tokenizer.truncation_side == "right"  # the tokenizer is left as it was


# ---- normalisation (detail 16) -------------------------------------------------------------------------------------
REF_PROMPTS = ["the cat", "a good day", "hello", "policy", "the dog", "good food", "reinforcement", "tiny"]
REF_COMPLETIONS = [
    " sat on the mat",
    " with friends",
    " world",
    " gradient",
    " sat on the log",
    " and good friends",
    " learning",
    " corpus",
]


def test_fit_normalization_standardises_reference_samples(tokenizer):
    model = gpt2_classifier(tokenizer)
    raw_reward = RewardModelReward(model, tokenizer=tokenizer)
    reward = RewardModelReward(model, tokenizer=tokenizer, batch_size=3)
    raw_ref = torch.tensor(raw_reward(REF_PROMPTS, REF_COMPLETIONS), dtype=torch.float64)
    stats = reward.fit_normalization(REF_PROMPTS, REF_COMPLETIONS)
    assert stats["n"] == 8
    assert stats["mean"] == pytest.approx(raw_ref.mean().item(), rel=1e-6, abs=1e-7)  # batch size 3 vs all
    assert stats["std"] == pytest.approx(raw_ref.std().item(), rel=1e-6)
    normed = torch.tensor(reward(REF_PROMPTS, REF_COMPLETIONS), dtype=torch.float64)
    assert normed.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert normed.std().item() == pytest.approx(1.0, rel=1e-5)
    raw_other = raw_reward(PROMPTS, COMPLETIONS)
    expected = [(x - stats["mean"]) / stats["std"] for x in raw_other]
    assert reward(PROMPTS, COMPLETIONS) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert reward.raw_scores(PROMPTS, COMPLETIONS) == pytest.approx(raw_other, rel=1e-6)
    explicit = RewardModelReward(model, tokenizer=tokenizer, normalization={"mean": stats["mean"], "std": stats["std"]})
    assert explicit(PROMPTS, COMPLETIONS) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # with several processes the statistics come from every process's samples (here: a fake 2-process gather)
    gathered = RewardModelReward(model, tokenizer=tokenizer)
    gathered.setup(device="cpu", gather=lambda t: torch.cat([t, t + 1.0]))
    both = torch.cat([raw_ref, raw_ref + 1.0])
    assert gathered.fit_normalization(REF_PROMPTS, REF_COMPLETIONS) == pytest.approx(
        {"mean": both.mean().item(), "std": both.std().item(), "n": 16}
    )


def test_saved_normalization_is_picked_up_from_the_model_directory(tokenizer, tmp_path):
    model = gpt2_classifier(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reward = RewardModelReward(model, tokenizer=tokenizer)
    stats = reward.fit_normalization(REF_PROMPTS, REF_COMPLETIONS)
    path = reward.save_normalization(tmp_path)
    with open(path) as f:
        assert json.load(f) == pytest.approx({"mean": stats["mean"], "std": stats["std"], "n": 8})
    reloaded = RewardModelReward(str(tmp_path))
    assert reloaded.normalization is None  # read when the model loads
    reloaded.setup(device="cpu")
    assert reloaded.normalization["mean"] == pytest.approx(stats["mean"])
    assert reloaded(PROMPTS, COMPLETIONS) == pytest.approx(reward(PROMPTS, COMPLETIONS), rel=1e-5, abs=1e-5)
    raw = RewardModelReward(str(tmp_path), normalization=False)
    assert raw(PROMPTS, COMPLETIONS) == pytest.approx(reward.raw_scores(PROMPTS, COMPLETIONS), rel=1e-5, abs=1e-5)
    from_file = RewardModelReward(model, tokenizer=tokenizer, normalization=path)
    assert from_file.normalization["std"] == pytest.approx(stats["std"])


def test_normalization_errors(tokenizer):
    model = gpt2_classifier(tokenizer)
    reward = RewardModelReward(model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="std 0"):
        reward.fit_normalization(["the cat"] * 8, [" sat"] * 8)  # identical samples: every score is the same
    with pytest.raises(ValueError, match="at least 2"):
        reward.fit_normalization(["the cat"], [" sat"])
    with pytest.raises(ValueError, match="no normalisation to save"):
        reward.save_normalization("unused")
    with pytest.raises(ValueError, match="std > 0"):
        RewardModelReward(model, tokenizer=tokenizer, normalization={"mean": 0.0, "std": 0.0})
    with pytest.raises(ValueError, match="must be"):
        RewardModelReward(model, tokenizer=tokenizer, normalization={"mean": 0.0})


def test_mismatched_lengths_raise(tokenizer):
    from hfpg.rewards.base import RewardError

    with pytest.raises(RewardError, match="2 prompts for 1 completions"):
        LMLikelihoodReward(tiny_gpt2(tokenizer), tokenizer=tokenizer)(["a", "b"], ["c"])
