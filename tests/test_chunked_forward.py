"""Logprobs and entropy from the hidden states in chunks of positions (``logits_chunk_size``): the same numbers and
gradients as the full (B, T, V) logits, for every kind of model hfpg scores, with one chunk of logits kept at most."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_tokenizer, tiny_gpt2, tiny_llama
from peft import LoraConfig, get_peft_model
from test_trainer import make_trainer
from transformers import LlamaForCausalLM

from hfpg import AutoModelForCausalLMWithValueHead, ConfigError, PGConfig
from hfpg.forward import DEFAULT_LOGITS_CHUNK_SIZE, output_head, rollout_forward, sequence_forward
from hfpg.modeling import disable_dropout, reference_context
from hfpg.rollout import Rollout

TOK = make_tokenizer()
V = len(TOK)
TEMPERATURE = 0.7


def _batch(seed: int = 0):
    """Left-padded prompts (B, P) and right-padded responses (B, T): full, cut short, one token, empty."""
    g = torch.Generator().manual_seed(seed)
    B, P, T = 4, 5, 7
    prompt = torch.randint(2, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    prompt_mask[2, :4] = 0
    prompt[prompt_mask == 0] = TOK.pad_token_id
    response = torch.randint(2, V, (B, T), generator=g)
    lengths = torch.tensor([T, 4, 1, 0])
    response_mask = torch.arange(T)[None] < lengths[:, None]
    response[~response_mask] = TOK.pad_token_id
    return prompt, prompt_mask, response, response_mask


def _model(kind: str, wrapper: str):
    """kind: gpt2 (tied), llama-tied, llama-untied; wrapper: plain (the reference path), value-head, lora (a PEFT
    policy with a value head, LoRA also on the LM head), lora-plain (a PEFT causal LM: its reference path)."""
    model = tiny_gpt2(TOK) if kind == "gpt2" else tiny_llama(TOK, tie_word_embeddings=kind == "llama-tied")
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == (kind != "llama-untied")
    if wrapper.startswith("lora"):
        targets = ["c_attn", "lm_head"] if kind == "gpt2" else ["q_proj", "v_proj", "lm_head"]
        torch.manual_seed(1)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        model = get_peft_model(model, config)
    if wrapper in ("value-head", "lora"):
        model = AutoModelForCausalLMWithValueHead(model)
        torch.nn.init.normal_(model.v_head.summary.weight, std=0.05)  # not zero: values get gradients (of size 1)
    disable_dropout(model)
    return model.train()


def _forward_and_grads(model, chunk, with_values, batch):
    model.zero_grad(set_to_none=True)
    prompt, prompt_mask, response, response_mask = batch
    out = sequence_forward(
        model,
        prompt,
        prompt_mask,
        response,
        response_mask,
        TEMPERATURE,
        with_values=with_values,
        with_entropy=True,
        logits_chunk_size=chunk,
    )
    weights = torch.linspace(-1.0, 1.0, response.shape[1])  # a loss with both signs, every term
    loss = (out["logprobs"] * weights).sum() + 0.3 * out["entropy"].sum()
    if with_values:
        loss = loss + 0.5 * (out["values"] ** 2).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.mark.parametrize("wrapper", ["plain", "value-head", "lora", "lora-plain"])
@pytest.mark.parametrize("kind", ["gpt2", "llama-tied", "llama-untied"])
def test_chunked_logprobs_entropy_values_and_gradients_equal_the_full_logits(kind, wrapper):
    model = _model(kind, wrapper)
    with_values = wrapper in ("value-head", "lora")
    batch = _batch()
    assert output_head(model) is not None  # the chunked path is taken, not the fallback
    want, want_grads = _forward_and_grads(model, None, with_values, batch)
    assert len(want_grads) > 4
    for chunk in (3, 1000):  # many chunks (one cut mid-row, the last one short) and one chunk
        got, grads = _forward_and_grads(model, chunk, with_values, batch)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=f"{k}, chunk {chunk}")
            assert (got[k][~batch[3]] == 0).all()  # zero on padding
        assert grads.keys() == want_grads.keys()
        for n in want_grads:
            torch.testing.assert_close(grads[n], want_grads[n], atol=1e-5, rtol=1e-5, msg=f"{n}, chunk {chunk}")


def test_no_grad_forwards_and_entropy_without_graph_match():
    """The rollout's no-grad policy / reference forwards, and the update's entropy measured without a graph."""
    model, lora = _model("llama-untied", "value-head"), _model("llama-tied", "lora")
    prompt, prompt_mask, response, response_mask = _batch(1)
    rollout = Rollout(prompt, prompt_mask, response, response_mask, torch.ones(4, dtype=torch.bool))
    with torch.no_grad():
        full = rollout_forward(model, rollout, TEMPERATURE, with_values=True, with_entropy=True, logits_chunk_size=None)
        for chunk_rows in (None, 2):
            got = rollout_forward(model, rollout, TEMPERATURE, True, True, chunk_size=chunk_rows, logits_chunk_size=2)
            for k in full:
                torch.testing.assert_close(got[k], full[k], atol=1e-5, rtol=1e-5)
    with torch.no_grad(), reference_context(lora, None) as ref:  # a PEFT policy's reference: adapters off
        want = rollout_forward(ref, rollout, TEMPERATURE, False, logits_chunk_size=None)["logprobs"]
        got = rollout_forward(ref, rollout, TEMPERATURE, False, logits_chunk_size=2)["logprobs"]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        adapted = rollout_forward(lora, rollout, TEMPERATURE, False, logits_chunk_size=2)["logprobs"]
    assert not torch.allclose(adapted, got)  # the adapter (on the LM head too) was really off
    out = rollout_forward(model, rollout, TEMPERATURE, False, True, entropy_grad=False, logits_chunk_size=2)
    assert out["logprobs"].requires_grad and not out["entropy"].requires_grad
    torch.testing.assert_close(out["entropy"], full["entropy"], atol=1e-5, rtol=1e-5)


def test_the_head_runs_under_the_autocast_of_the_models_own_forward():
    """Accelerate's mixed precision autocasts inside the model's forward only: the chunks' projections, made outside
    it, must use the same precision, or old and new logprobs would differ (PPO's first ratio must be exactly 1)."""
    model = _model("llama-untied", "value-head")
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)  # as Accelerate wraps it
    head = model.pretrained_model.lm_head
    dtypes = []
    handle = head.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    batch = _batch()
    with torch.no_grad():
        want = sequence_forward(model, *batch, TEMPERATURE, False, True, logits_chunk_size=None)
        dtypes.clear()
        got = sequence_forward(model, *batch, TEMPERATURE, False, True, logits_chunk_size=3)
    handle.remove()
    assert len(dtypes) > 2 and set(dtypes) == {torch.bfloat16}
    for k in want:  # bf16 logits: equal up to bf16 rounding of a differently blocked matmul
        torch.testing.assert_close(got[k], want[k], atol=3e-2, rtol=3e-2)


def test_a_batch_without_real_tokens_still_backpropagates_zero():
    model = _model("gpt2", "value-head")
    prompt, prompt_mask, response, response_mask = _batch()
    response_mask = torch.zeros_like(response_mask)
    out = sequence_forward(model, prompt, prompt_mask, response, response_mask, 1.0, True, True, logits_chunk_size=4)
    assert (out["logprobs"] == 0).all() and (out["entropy"] == 0).all()
    (out["logprobs"].sum() + out["entropy"].sum()).backward()  # DDP needs every micro-batch to reach the weights
    assert all((p.grad == 0).all() for p in model.parameters() if p.grad is not None)


def _saved_vocab_floats(model, chunk, batch) -> int:
    """Floats of (…, V)-shaped tensors autograd keeps for the backward of one training forward (not counting views
    of the weights: the LM head's transposed weight ends in V too)."""
    saved = []
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.dim() and t.shape[-1] == V and t.untyped_storage().data_ptr() not in weights:
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sequence_forward(model, *batch, TEMPERATURE, with_values=True, with_entropy=True, logits_chunk_size=chunk)
    (out["logprobs"].sum() + out["entropy"].sum()).backward()
    return sum(saved)


def test_autograd_keeps_one_chunk_of_logits_at_most():
    model = _model("llama-untied", "value-head")
    batch = _batch()
    B, T = batch[2].shape
    full = _saved_vocab_floats(model, None, batch)
    assert full >= B * T * V  # the whole (B, T, V) logits at least once (really several fp32 copies)
    chunk = 2
    chunked = _saved_vocab_floats(model, chunk, batch)
    n_real = int(batch[3].sum())
    assert n_real > 3 * chunk
    # the last chunk's logits and a few fp32 copies (logsumexp, softmax), whatever B and T are
    assert chunked <= 8 * chunk * V
    assert chunked < full / 5


class DoubledLogits(LlamaForCausalLM):
    """A model whose logits are not its LM head's output and whose config does not say so."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_models_whose_logits_are_not_the_head_output_fall_back_to_full_logits(caplog):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    batch = _batch()
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            final_logit_softcapping=1.0,  # small: soft-capping really changes the logprobs
            pad_token_id=TOK.pad_token_id,
        )
    ).eval()
    assert output_head(gemma) is None  # known from its config
    llama = tiny_llama(TOK)
    llama.config.logit_scale = 0.5
    assert output_head(llama) is None
    llama.config.logit_scale = 1.0  # a scale of 1 changes nothing
    assert output_head(llama) is not None

    doubled = DoubledLogits(tiny_llama(TOK).config).eval()
    assert output_head(doubled) is not None  # not known in advance: found out at the first forward
    for model in (gemma, doubled, doubled):
        with torch.no_grad():
            want = sequence_forward(model, *batch, TEMPERATURE, False, True, logits_chunk_size=None)
            with caplog.at_level(logging.WARNING, logger="hfpg.forward"):
                got = sequence_forward(model, *batch, TEMPERATURE, False, True, logits_chunk_size=3)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6)
    assert output_head(doubled) is None  # remembered: no second try
    assert sum("not exactly its output embedding" in r.message for r in caplog.records) == 1


def test_ddp_wrapped_policy_gets_the_same_gradients(tmp_path):
    """The forward still goes through DDP's own forward (its reducer sees every gradient)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _model("llama-untied", "value-head")
        ddp = DistributedDataParallel(model)
        assert output_head(ddp) is model.pretrained_model.lm_head
        batch = _batch()
        want, want_grads = _forward_and_grads(ddp, None, True, batch)
        got, grads = _forward_and_grads(ddp, 3, True, batch)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
        for n in want_grads:
            torch.testing.assert_close(grads[n], want_grads[n], atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


def test_update_gradients_are_the_same_with_and_without_logits_chunks(tmp_path):
    """PPO with a critic, an entropy bonus and KL as a loss, through the trainer: the first optimizer step's gradients
    (later weights are not comparable: Adam turns float noise in near-zero gradients into full steps)."""
    grads = {}
    for chunk in (None, 3):
        trainer = make_trainer(
            TOK,
            tmp_path / str(chunk),
            max_steps=1,
            mini_batch_size=4,
            ppo_epochs=1,
            ent_coef=0.01,
            kl_penalty="loss",
            temperature=TEMPERATURE,
            logits_chunk_size=chunk,
        )
        captured, step = {}, trainer.optimizer.step

        def capture(*args, _step=step, _trainer=trainer, _grads=captured, **kwargs):
            if not _grads:
                named = _trainer.unwrapped_model.named_parameters()
                _grads.update({n: p.grad.clone() for n, p in named if p.grad is not None})
            return _step(*args, **kwargs)

        trainer.optimizer.step = capture
        trainer.train()
        grads[chunk] = captured
    assert grads[None].keys() == grads[3].keys() and len(grads[None]) > 10
    for n, want in grads[None].items():
        torch.testing.assert_close(grads[3][n], want, atol=1e-5, rtol=1e-4, msg=n)


def test_logits_chunk_size_config():
    assert PGConfig().logits_chunk_size == DEFAULT_LOGITS_CHUNK_SIZE  # on by default
    assert PGConfig(logits_chunk_size=None).logits_chunk_size is None
    for bad in (0, -4):
        with pytest.raises(ConfigError, match="logits_chunk_size"):
            PGConfig(logits_chunk_size=bad)
