"""Rollout: left padding, position ids, temperature-scaled logprobs from one forward, stop tokens, early stop."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from hfpg import AutoModelForCausalLMWithValueHead, PGConfig
from hfpg.forward import sequence_forward
from hfpg.rollout import build_generation_config, decode_completions, generate_responses, tokenize_prompts

ARCHS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def _force_token(model, token_id: int):
    """Make the LM put (almost) all its mass on ``token_id`` by adding to that logit in a forward hook."""

    def hook(_module, _inputs, output):
        output = output.clone()
        output[..., token_id] += 50.0
        return output

    return model.get_output_embeddings().register_forward_hook(hook)


def test_tokenize_prompts_left_pads_and_keeps_the_last_tokens(tokenizer):
    tokenizer.padding_side = "right"
    ids, mask = tokenize_prompts(tokenizer, ["the cat sat on the mat", "hello"])
    assert tokenizer.padding_side == "right"  # restored
    assert mask[1, 0] == 0 and mask[1, -1] == 1  # short prompt is padded on the left
    assert ids[1, 0] == tokenizer.pad_token_id
    full = tokenizer("the cat sat on the mat")["input_ids"]
    ids, mask = tokenize_prompts(tokenizer, ["the cat sat on the mat"], max_prompt_length=3)
    assert ids[0].tolist() == full[-3:]


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_left_padded_prompt_scores_like_the_unpadded_one(arch, pad_is_eos, tokenizer, tokenizer_pad_is_eos):
    """docs/design.md detail 1: position ids come from the attention mask, so padding changes nothing."""
    tok = tokenizer_pad_is_eos if pad_is_eos else tokenizer
    model = AutoModelForCausalLMWithValueHead(ARCHS[arch](tok))
    torch.nn.init.normal_(model.v_head.summary.weight)
    prompt = tok("the cat sat", return_tensors="pt")["input_ids"]
    response = tok(" on the mat", return_tensors="pt")["input_ids"]
    r_mask = torch.ones_like(response, dtype=torch.bool)
    pad = torch.full((1, 4), tok.pad_token_id)
    padded_prompt = torch.cat([pad, prompt], 1)
    padded_mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(prompt)], 1)
    a = sequence_forward(model, prompt, torch.ones_like(prompt), response, r_mask, 1.0, with_values=True)
    b = sequence_forward(model, padded_prompt, padded_mask, response, r_mask, 1.0, with_values=True)
    torch.testing.assert_close(a["logprobs"], b["logprobs"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["values"], b["values"], atol=1e-5, rtol=1e-5)


def test_padding_without_position_ids_would_differ(tokenizer):
    """Negative control: GPT-2 fed default positions on a left-padded prompt scores differently."""
    model = tiny_gpt2(tokenizer)
    prompt = tokenizer("the cat sat on the", return_tensors="pt")["input_ids"]
    padded = torch.cat([torch.full((1, 4), tokenizer.pad_token_id), prompt], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(prompt)], 1)
    a = model(prompt).logits[:, -1]
    b = model(padded, attention_mask=mask, position_ids=torch.arange(padded.shape[1])[None]).logits[:, -1]
    assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_values_and_entropy_from_one_forward_match_a_manual_computation(temperature, tokenizer):
    model = AutoModelForCausalLMWithValueHead(tiny_gpt2(tokenizer))
    torch.nn.init.normal_(model.v_head.summary.weight)
    q, qm = tokenize_prompts(tokenizer, ["the cat sat", "a good"])
    resp = torch.tensor([[5, 9, 13], [7, 11, 3]])
    rmask = torch.tensor([[True, True, True], [True, True, False]])
    got = sequence_forward(model, q, qm, resp, rmask, temperature, with_values=True, with_entropy=True)
    full_ids = torch.cat([q, resp], 1)
    att = torch.cat([qm, rmask.long()], 1)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    out = model(full_ids, attention_mask=att, position_ids=pos)
    P = q.shape[1]
    logp = torch.log_softmax(out.logits[:, P - 1 : -1] / temperature, -1)
    want = logp.gather(-1, resp[..., None]).squeeze(-1) * rmask
    torch.testing.assert_close(got["logprobs"], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["values"], out.values[:, P - 1 : -1] * rmask, atol=1e-6, rtol=1e-6)
    ent = -(logp.exp() * logp).sum(-1) * rmask
    torch.testing.assert_close(got["entropy"], ent, atol=1e-5, rtol=1e-5)
    assert got["logprobs"][1, 2] == 0 and got["values"][1, 2] == 0  # padding carries nothing


def test_generation_config_overrides_checkpoint_defaults(tokenizer):
    cfg = PGConfig(temperature=0.7, top_k=0, top_p=0.9, max_new_tokens=7, min_new_tokens=2)
    gen = build_generation_config(cfg, tokenizer, [tokenizer.eos_token_id])
    assert gen.do_sample and gen.temperature == 0.7 and gen.top_k == 0 and gen.top_p == 0.9
    assert gen.max_new_tokens == 7 and gen.min_new_tokens == 2
    assert gen.repetition_penalty == 1.0 and gen.eos_token_id == [tokenizer.eos_token_id]
    # a checkpoint's own generation_config (say repetition_penalty=5) must not leak into sampling
    model = tiny_gpt2(tokenizer)
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.top_k = 3
    processors = model._get_logits_processor(
        generation_config=model._prepare_generation_config(gen)[0],
        input_ids_seq_length=3,
        encoder_input_ids=None,
        prefix_allowed_tokens_fn=None,
        logits_processor=None,
        device="cpu",
    )
    names = {type(p).__name__ for p in processors}
    assert "RepetitionPenaltyLogitsProcessor" not in names and "TopKLogitsWarper" not in names
    assert "TemperatureLogitsWarper" in names and "TopPLogitsWarper" in names


def test_generation_stops_early_once_every_sequence_has_ended(tokenizer):
    model = tiny_gpt2(tokenizer)
    handle = _force_token(model, tokenizer.eos_token_id)
    q, qm = tokenize_prompts(tokenizer, ["the cat", "hello world"])
    gen = build_generation_config(PGConfig(max_new_tokens=20), tokenizer, [tokenizer.eos_token_id])
    resp, mask, has_stop = generate_responses(model, q, qm, gen, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    handle.remove()
    assert resp.shape[1] == 1  # not 20
    assert mask.tolist() == [[True], [True]]  # the EOS itself is a real token
    assert has_stop.all()
    assert decode_completions(tokenizer, resp, mask) == ["", ""]


def test_min_new_tokens_delays_the_stop_token(tokenizer):
    model = tiny_gpt2(tokenizer)
    handle = _force_token(model, tokenizer.eos_token_id)
    q, qm = tokenize_prompts(tokenizer, ["the cat"])
    gen = build_generation_config(PGConfig(max_new_tokens=10, min_new_tokens=4), tokenizer, [tokenizer.eos_token_id])
    resp, mask, has_stop = generate_responses(model, q, qm, gen, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    handle.remove()
    assert resp.shape[1] == 5 and mask.all() and has_stop.all()
    assert (resp[0, :4] != tokenizer.eos_token_id).all() and resp[0, 4] == tokenizer.eos_token_id


def test_tokens_after_a_custom_stop_token_become_padding(tokenizer):
    """Row 0 is forced to emit the custom stop token at once; row 1 never stops and runs to max_new_tokens."""
    model = tiny_gpt2(tokenizer)
    stop = tokenizer.convert_tokens_to_ids("Ġcat")

    def hook(_module, _inputs, output):
        output = output.clone()
        output[0, ..., stop] += 50.0
        output[1, ..., stop] -= 50.0
        output[1, ..., tokenizer.eos_token_id] -= 50.0
        return output

    handle = model.get_output_embeddings().register_forward_hook(hook)
    q, qm = tokenize_prompts(tokenizer, ["the", "a good"])
    gen = build_generation_config(PGConfig(max_new_tokens=6), tokenizer, [stop])
    resp, mask, has_stop = generate_responses(model, q, qm, gen, [stop], tokenizer.pad_token_id)
    handle.remove()
    assert resp.shape[1] == 6
    assert resp[0, 0] == stop and mask[0].tolist() == [True] + [False] * 5
    assert (resp[0, 1:] == tokenizer.pad_token_id).all()
    assert mask[1].all()
    assert has_stop.tolist() == [True, False]


def test_rollout_select_keeps_the_rows_asked_for():
    import torch

    from hfpg.rollout import Rollout

    r = Rollout(
        prompt_ids=torch.arange(8).view(4, 2),
        prompt_mask=torch.ones(4, 2, dtype=torch.bool),
        response_ids=torch.arange(12).view(4, 3),
        response_mask=torch.ones(4, 3, dtype=torch.bool),
        has_stop=torch.tensor([True, False, True, False]),
        scores=torch.tensor([0.0, 1.0, 2.0, 3.0]),
        components={"a": torch.tensor([5.0, 6.0, 7.0, 8.0])},
        prompts=["p0", "p1", "p2", "p3"],
        completions=["c0", "c1", "c2", "c3"],
        columns={"row": [0, 1, 2, 3]},
    )
    s = r.select(slice(2, 4))
    assert s.batch_size == 2 and s.response_ids.tolist() == [[6, 7, 8], [9, 10, 11]]
    assert s.scores.tolist() == [2.0, 3.0] and s.components["a"].tolist() == [7.0, 8.0]
    assert s.prompts == ["p2", "p3"] and s.completions == ["c2", "c3"] and s.columns == {"row": [2, 3]}
    assert s.logprobs is None and s.has_stop.tolist() == [True, False]
    assert r.select([3, 0]).columns["row"] == [3, 0]
