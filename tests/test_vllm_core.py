"""The vLLM backend's parts that need no engine (they run in `make test`): the weights it is sent, the importance
correction, the per-completion seeds, the config keys and the error when vLLM is not installed. The real engine is
tested in test_vllm.py (`make test-vllm`)."""

from __future__ import annotations

import math
import types

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from peft import LoraConfig, get_peft_model
from test_trainer import make_trainer

from hfpg import AutoModelForCausalLMWithValueHead, PGConfig
from hfpg.errors import ConfigError
from hfpg.vllm_backend import hf_named_weights, is_vllm_available, kv_cache_bytes, request_seeds, sampler_correction


# ---- the weights the engine gets --------------------------------------------------------------------------------
def test_a_full_policy_sends_its_checkpoint_names_and_tensors_without_the_value_head(tokenizer):
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2(tokenizer))
    sent = dict(hf_named_weights(policy))
    expected = policy.pretrained_model.state_dict()
    assert sent.keys() == expected.keys()
    assert not any("v_head" in k for k in sent)
    assert all(torch.equal(sent[k], expected[k]) for k in expected)


def _lora_policy(tokenizer, **lora):
    base = tiny_llama(tokenizer)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, **lora)
    model = get_peft_model(base, cfg)
    torch.manual_seed(3)
    with torch.no_grad():  # a trained adapter (lora_B starts at 0, which would hide a wrong merge)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    return AutoModelForCausalLMWithValueHead.from_pretrained(model)


def test_a_lora_policy_sends_w_plus_delta_w_equal_to_peft_merge_and_unload(tokenizer):
    policy = _lora_policy(tokenizer)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    sent = dict(hf_named_weights(policy))
    import copy

    merged = copy.deepcopy(policy.pretrained_model).merge_and_unload().state_dict()
    assert sent.keys() == merged.keys()  # base names, no lora_ or base_layer tensors
    for k in merged:
        torch.testing.assert_close(sent[k], merged[k], rtol=0, atol=1e-6)
    assert any(
        not torch.equal(sent[k], policy.base_model.state_dict()[k.replace("q_proj.", "q_proj.base_layer.")])
        for k in sent
        if "q_proj.weight" in k
    )  # the adapter did change what is sent ...
    after = policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # ... and the policy was never merged in place


def test_modules_to_save_are_sent_under_their_original_names(tokenizer):
    policy = _lora_policy(tokenizer, modules_to_save=["lm_head"])
    lm = policy.pretrained_model
    with torch.no_grad():
        lm.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    sent = dict(hf_named_weights(policy))
    trained = lm.base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.equal(sent["lm_head.weight"], trained)
    assert not any("modules_to_save" in k or "original_module" in k for k in sent)


def test_dora_is_refused_with_the_reason(tokenizer):
    policy = _lora_policy(tokenizer, use_dora=True)
    with pytest.raises(ConfigError, match="DoRA"):
        dict(hf_named_weights(policy))


# ---- importance correction -------------------------------------------------------------------------------------
def _rollout(train, sampler, mask):
    return types.SimpleNamespace(
        logprobs=torch.tensor(train), sampler_logprobs=torch.tensor(sampler), response_mask=torch.tensor(mask)
    )


class _OneProcess:
    num_processes = 1
    device = torch.device("cpu")


def _weights(mode, lo=None, hi=3.0):
    cfg = PGConfig(
        vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=lo, vllm_importance_sampling_clip_max=hi
    )
    r = _rollout(
        [[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]],
        [[-1.0, -2.5, -0.5], [-1.5, -2.0, 0.0]],
        [[True, True, True], [True, True, False]],
    )
    return sampler_correction(r, cfg, _OneProcess())


def test_token_truncate_clips_each_ratio():
    w, m = _weights("token_truncate", lo=0.5, hi=3.0)
    # ratios exp(0), exp(0.5), exp(0) | exp(1.4) -> 3 (clipped), exp(-1) -> 0.5 (clipped); padding 0
    expected = torch.tensor([[1.0, math.exp(0.5), 1.0], [3.0, 0.5, 0.0]])
    torch.testing.assert_close(w, expected)
    assert m["vllm/logprob_abs_diff"] == pytest.approx((0 + 0.5 + 0 + 1.4 + 1.0) / 5)
    assert m["vllm/logprob_abs_diff_max"] == pytest.approx(1.4)
    assert m["vllm/is_clipped_fraction"] == pytest.approx(2 / 5)
    assert m["vllm/is_weight"] == pytest.approx(float(expected.sum()) / 5)


def test_token_mask_zeroes_ratios_outside_the_bounds():
    w, _ = _weights("token_mask", lo=0.5, hi=3.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, math.exp(0.5), 1.0], [0.0, 0.0, 0.0]]))


def test_sequence_modes_use_the_product_of_the_token_ratios():
    w, _ = _weights("sequence_truncate", hi=3.0)
    # sequence 1: exp(0.5) for all three tokens; sequence 2: exp(1.4 - 1.0) = exp(0.4) on its two real tokens
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5)] * 3, [math.exp(0.4)] * 2 + [0.0]]))
    w, _ = _weights("sequence_mask", hi=1.6)  # exp(0.5) = 1.65 > 1.6: the first sequence is dropped
    torch.testing.assert_close(w, torch.tensor([[0.0] * 3, [math.exp(0.4)] * 2 + [0.0]]))


def test_identical_logprobs_give_weights_of_exactly_one():
    cfg = PGConfig()
    lp = torch.tensor([[-1.0, -2.0], [-0.3, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    r = types.SimpleNamespace(logprobs=lp, sampler_logprobs=lp.clone(), response_mask=mask)
    w, m = sampler_correction(r, cfg, _OneProcess())
    assert torch.equal(w, mask.float())
    assert m["vllm/logprob_abs_diff"] == 0.0 and m["vllm/is_weight"] == 1.0


# ---- seeds, sizes, config --------------------------------------------------------------------------------------
def test_request_seeds_are_a_pure_function_of_run_process_step_phase_and_row():
    a = request_seeds(0, 0, 5, 8)
    assert a == request_seeds(0, 0, 5, 8)  # a resumed run asks for the same samples
    assert len(set(a)) == 8  # every completion its own stream (one shared seed would repeat the same sample)
    others = [
        request_seeds(1, 0, 5, 8),
        request_seeds(0, 1, 5, 8),
        request_seeds(0, 0, 6, 8),
        request_seeds(0, 0, 5, 8, 1),
    ]
    assert all(set(o).isdisjoint(a) for o in others)
    assert all(0 <= s < 2**31 for s in a)


def test_kv_cache_bytes_of_a_grouped_query_model():
    cfg = types.SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    # SmolLM2-135M: 2 (k, v) × 30 layers × 3 kv heads × 64 dims × 4 bytes = 46,080 bytes per token in fp32
    assert kv_cache_bytes(cfg, 100, torch.float32) == 46_080 * 100
    assert kv_cache_bytes(cfg, 100, torch.bfloat16) == 23_040 * 100


def test_use_vllm_is_trls_spelling_of_the_backend_and_bounds_are_checked():
    assert PGConfig(use_vllm=True).generation_backend == "vllm"
    assert PGConfig().generation_backend == "hf"
    with pytest.raises(ConfigError, match="clip_min"):
        PGConfig(vllm_importance_sampling_clip_min=2.0, vllm_importance_sampling_clip_max=1.0)
    with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization"):
        PGConfig(vllm_gpu_memory_utilization=1.5)
    with pytest.raises(ConfigError, match="vllm_mode='server' is not available"):
        PGConfig(use_vllm=True, vllm_mode="server")
    with pytest.raises(ConfigError, match="generation_backend"):
        PGConfig(generation_backend="sglang")


@pytest.mark.skipif(is_vllm_available(), reason="vLLM is installed here (test_vllm.py covers the engine)")
def test_without_vllm_the_backend_fails_before_training_with_the_install_hint(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match=r"make test-vllm.*generation_backend=hf"):
        make_trainer(tokenizer, tmp_path, generation_backend="vllm")
    assert not (tmp_path / "run").exists()  # nothing written
