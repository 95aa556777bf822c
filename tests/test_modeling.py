"""AutoModelForCausalLMWithValueHead: forward, fp32 value head at zero, exact save/load, generate, checkpointing,
and the frozen reference (a copy, or the PEFT base with adapters disabled)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from peft import LoraConfig

from hfpg import AutoModelForCausalLMWithValueHead, create_reference_model
from hfpg.modeling import VALUE_HEAD_FILE, disable_dropout, reference_context

ARCHS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def _batch(tokenizer, texts=("the cat sat", "a good day is here")):
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_forward_returns_base_logits_and_zero_values(arch, tokenizer):
    base = ARCHS[arch](tokenizer)
    model = AutoModelForCausalLMWithValueHead(base)
    ids, mask = _batch(tokenizer)
    out = model(ids, attention_mask=mask)
    assert out.logits.shape == (*ids.shape, len(tokenizer))
    assert out.values.shape == ids.shape
    assert out.values.dtype == torch.float32
    assert torch.equal(out.values, torch.zeros_like(out.values))  # the critic starts neutral
    torch.testing.assert_close(out.logits, base(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_to_keep_matches_full_forward(arch, tokenizer):
    model = AutoModelForCausalLMWithValueHead(ARCHS[arch](tokenizer))
    torch.nn.init.normal_(model.v_head.summary.weight)
    ids, mask = _batch(tokenizer)
    full = model(ids, attention_mask=mask)
    part = model(ids, attention_mask=mask, logits_to_keep=3)
    torch.testing.assert_close(part.logits, full.logits[:, -3:])
    torch.testing.assert_close(part.values, full.values[:, -3:])


def test_value_head_runs_in_fp32_on_a_bf16_model(tokenizer):
    model = AutoModelForCausalLMWithValueHead(tiny_gpt2(tokenizer).to(torch.bfloat16))
    torch.nn.init.normal_(model.v_head.summary.weight)
    ids, mask = _batch(tokenizer)
    out = model(ids, attention_mask=mask)
    assert out.logits.dtype == torch.bfloat16
    assert out.values.dtype == torch.float32
    assert model.v_head.summary.weight.dtype == torch.float32


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_save_and_load_round_trip_exactly(arch, tokenizer, tmp_path):
    model = AutoModelForCausalLMWithValueHead(ARCHS[arch](tokenizer))
    torch.nn.init.normal_(model.v_head.summary.weight)
    torch.nn.init.normal_(model.v_head.summary.bias)
    model.save_pretrained(tmp_path)
    assert (tmp_path / VALUE_HEAD_FILE).is_file()
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    ids, mask = _batch(tokenizer)
    a, b = model(ids, attention_mask=mask), loaded.eval()(ids, attention_mask=mask)
    assert torch.equal(a.values, b.values) and torch.equal(a.logits, b.logits)


def test_from_pretrained_without_value_head_starts_at_zero(tokenizer, tmp_path):
    tiny_gpt2(tokenizer).save_pretrained(tmp_path)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    assert torch.count_nonzero(model.v_head.summary.weight) == 0


def test_generate_delegates_to_the_wrapped_model(tokenizer):
    base = tiny_gpt2(tokenizer)
    model = AutoModelForCausalLMWithValueHead(base)
    ids, mask = _batch(tokenizer, ["the cat"])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(
        model.generate(input_ids=ids, attention_mask=mask, **kw),
        base.generate(input_ids=ids, attention_mask=mask, **kw),
    )


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    ids, mask = _batch(tokenizer)

    def grads(checkpointing: bool):
        model = AutoModelForCausalLMWithValueHead(tiny_gpt2(tokenizer)).train()
        torch.nn.init.normal_(model.v_head.summary.weight)
        disable_dropout(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        out = model(ids, attention_mask=mask)
        (out.logits.float().logsumexp(-1).mean() + out.values.mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for k in plain:
        torch.testing.assert_close(plain[k], ckpt[k], rtol=1e-4, atol=1e-6)


def test_reference_is_a_frozen_eval_copy(tokenizer):
    model = AutoModelForCausalLMWithValueHead(tiny_gpt2(tokenizer))
    ref = create_reference_model(model)
    assert not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    policy_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in ref.parameters()}  # a copy, not shared storage
    with torch.no_grad():
        next(model.pretrained_model.parameters()).add_(1.0)
    assert not torch.equal(next(model.pretrained_model.parameters()), next(ref.parameters()))


def test_peft_policy_uses_its_base_as_reference(tokenizer):
    base = tiny_gpt2(tokenizer)
    ids, mask = _batch(tokenizer)
    base_logits = base(ids, attention_mask=mask).logits.detach()
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False
    )  # non-zero B so the adapter changes the outputs
    model = AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=lora)
    assert model.is_peft_model
    assert create_reference_model(model) is None  # no second copy of the base weights
    policy_logits = model(ids, attention_mask=mask).logits
    assert not torch.allclose(policy_logits, base_logits)
    with reference_context(model, None) as ref:
        ref_logits = ref(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ref_logits, base_logits)
    # adapters are back on afterwards
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, policy_logits)


def test_disable_dropout_zeroes_modules_and_functional_rates(tokenizer):
    gpt = tiny_gpt2(tokenizer, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    llama = tiny_llama(tokenizer, attention_dropout=0.5)
    ids, mask = _batch(tokenizer)
    for m in (gpt, llama):
        m.train()
        disable_dropout(m)
        a = m(ids, attention_mask=mask).logits
        b = m(ids, attention_mask=mask).logits
        assert torch.equal(a, b)  # train mode, yet deterministic
    assert all(mod.p == 0.0 for mod in gpt.modules() if isinstance(mod, torch.nn.Dropout))
    assert all(a.self_attn.attention_dropout == 0.0 for a in llama.model.layers)


def test_dropout_left_on_is_not_deterministic(tokenizer):
    """Negative control for the test above: with dropout on, two train-mode forwards differ."""
    m = tiny_gpt2(tokenizer, resid_pdrop=0.5).train()
    ids, mask = _batch(tokenizer)
    assert not torch.equal(m(ids, attention_mask=mask).logits, m(ids, attention_mask=mask).logits)
