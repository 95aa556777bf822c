"""DAPO's dynamic sampling: prompt groups whose samples all scored the same are dropped and the batch refilled."""

from __future__ import annotations

import pytest
import torch
from test_checkpoints import StopAt
from test_trainer import make_trainer, params, target_share

from hfpg import ConfigError, PGConfig, ops

GROUPED = dict(algorithm="reinforce", advantage_estimator="returns", baseline="group_norm", num_samples_per_prompt=2)
FLAT = ["flat one", "flat two", "flat three", "flat four"]
VARIED = ["the cat", "a good day", "hello world", "policy gradient"]


def test_groups_with_spread_matches_a_hand_computation():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 0.0, 5.0, 5.0 + 1e-9])
    assert ops.groups_with_spread(scores, 2).tolist() == [False, True, True, False]  # 5 and 5+1e-9 are equal
    assert ops.groups_with_spread(scores, 4).tolist() == [True, True]
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    # the group (1, 0) has one scorable sample left: nothing to compare it with
    assert ops.groups_with_spread(scores, 2, valid).tolist() == [False, False, True, False]
    assert ops.groups_with_spread(torch.tensor([0.3, 0.3, 0.3, 0.31]), 4).tolist() == [True]


def prompt_reward(prompts, completions, **columns):
    """1 for every sample of a 'flat' prompt (a group with no spread); otherwise the sample's position in the batch
    plus its length (so the samples of a group always differ)."""
    return [
        1.0 if p.startswith("flat") else i / 10 + len(c) / 100 for i, (p, c) in enumerate(zip(prompts, completions))
    ]


def _seen(trainer):
    """The prompts of the batch the last step trained on."""
    return list(trainer.last_rollout.prompts)


def test_groups_without_spread_are_dropped_and_the_batch_refilled(tokenizer, tmp_path):
    data = [{"prompt": p} for p in FLAT + VARIED]  # half the prompts give groups of equal scores
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        dataset=data,
        reward=prompt_reward,
        max_steps=3,
        rollout_batch_size=8,
        mini_batch_size=8,
        dynamic_sampling=True,
        dynamic_sampling_max_rounds=3,
        **GROUPED,
    )
    calls = []
    original = trainer.make_rollout
    trainer.make_rollout = lambda rows, *a, **kw: calls.append([r["prompt"] for r in rows]) or original(rows, *a, **kw)
    trainer.train()
    assert len(trainer.log_history) == 3
    for metrics in trainer.log_history:
        assert metrics["dynamic_sampling/filled_groups"] == 0.0  # 8 prompts per pass: enough varied ones
        rounds = metrics["dynamic_sampling/rounds"]
        assert rounds >= 1 and metrics["dynamic_sampling/generated_samples"] == 8 * rounds
    seen = _seen(trainer)
    assert len(seen) == 8 and not any(p.startswith("flat") for p in seen)
    assert seen[0::2] == seen[1::2]  # whole groups of 2, in order
    # every round drew a fresh batch of 4 prompts × 2 samples from the sampler; the dropped ones were all flat
    drawn = sum(len(c) for c in calls) // 2
    total_rounds = sum(m["dynamic_sampling/rounds"] for m in trainer.log_history)
    assert drawn == 4 * total_rounds
    dropped = sum(
        m["dynamic_sampling/dropped_fraction"] * 4 * m["dynamic_sampling/rounds"] for m in trainer.log_history
    )
    flat_drawn = sum(p.startswith("flat") for c in calls for p in c[0::2])
    kept_extra = sum(not p.startswith("flat") for c in calls for p in c[0::2]) - 4 * 3  # varied groups cut to size
    assert round(dropped) == flat_drawn and kept_extra >= 0


def test_when_rounds_run_out_groups_without_spread_fill_the_batch(tokenizer, tmp_path):
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        dataset=[{"prompt": p} for p in FLAT],  # nothing ever differs
        reward=prompt_reward,
        max_steps=1,
        rollout_batch_size=8,
        mini_batch_size=8,
        dynamic_sampling=True,
        dynamic_sampling_max_rounds=2,
        **GROUPED,
    )
    before = params(trainer.unwrapped_model)
    m = trainer.train()
    assert m["dynamic_sampling/rounds"] == 3.0  # the first round and 2 extra ones
    assert m["dynamic_sampling/filled_groups"] == 4.0 and m["dynamic_sampling/dropped_fraction"] == 1.0
    assert m["dynamic_sampling/generated_samples"] == 24.0
    assert trainer.last_rollout.batch_size == 8
    after = params(trainer.unwrapped_model)
    # every advantage is 0 (equal scores, no KL): the policy gets no gradient and AdamW without decay stays put
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("v_head"))


def test_dynamic_sampling_needs_groups():
    with pytest.raises(ConfigError, match=r"dynamic_sampling=true drops.*num_samples_per_prompt >= 2"):
        PGConfig(dynamic_sampling=True)
    with pytest.raises(ConfigError, match="dynamic_sampling_max_rounds"):
        PGConfig(dynamic_sampling=True, dynamic_sampling_max_rounds=-1, **GROUPED)
    assert not PGConfig().dynamic_sampling and PGConfig().dynamic_sampling_max_rounds == 3


def test_dynamic_sampling_resumes_exactly(tokenizer, tmp_path):
    """The extra rounds draw prompts from the checkpointed sampler: a resumed run trains on the same batches."""
    data = [{"prompt": p} for p in FLAT + VARIED]
    kw = dict(
        dataset=data,
        reward=prompt_reward,
        max_steps=4,
        save_steps=2,
        rollout_batch_size=8,
        mini_batch_size=4,
        dynamic_sampling=True,
        **GROUPED,
    )
    straight = make_trainer(tokenizer, tmp_path / "a", **kw)
    straight.train()
    interrupted = make_trainer(tokenizer, tmp_path / "b", **kw)
    interrupted.callbacks.append(StopAt(2))
    interrupted.train()
    resumed = make_trainer(tokenizer, tmp_path / "b", **kw)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.global_step == 4
    assert _seen(straight) == _seen(resumed)
    a, b = params(straight.unwrapped_model), params(resumed.unwrapped_model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for ra, rb in zip(straight.log_history[2:], resumed.log_history):
        for key in ("objective/scores", "loss/policy", "dynamic_sampling/rounds", "dynamic_sampling/dropped_fraction"):
            assert ra[key] == rb[key], key


def test_dapo_style_with_dynamic_sampling_raises_the_toy_reward(tokenizer, tmp_path):
    """The sparse toy reward leaves most groups at 0 early on: dynamic sampling trains on the ones that differ."""
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        max_steps=30,
        rollout_batch_size=32,
        mini_batch_size=16,
        max_new_tokens=8,
        algorithm="ppo",
        ppo_epochs=2,
        advantage_estimator="returns",
        baseline="group_norm",
        num_samples_per_prompt=4,
        clip_range_high=0.28,
        dynamic_sampling=True,
        reward=target_share(tokenizer),
    )
    trainer.train()
    history = trainer.log_history
    generated = [r["objective/scores"] for r in history]
    assert history[0]["dynamic_sampling/dropped_fraction"] > 0.5  # most groups scored 0 everywhere at the start
    assert sum(generated[-3:]) / 3 > 0.5, generated
