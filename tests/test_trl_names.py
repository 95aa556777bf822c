"""TRL's config names get an exact hint in hfpg's terms (hfpg/trl_names.py), not a misleading did-you-mean."""

from __future__ import annotations

import dataclasses

import pytest

from hfpg import ConfigError, PGConfig
from hfpg.recipe import recipe_from_dict
from hfpg.schema import build, unknown_keys
from hfpg.trl_names import TRL_KEY_HINTS, trl_hint


def config_error(data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        PGConfig.from_dict(data)
    return str(e.value)


def recipe_error(training: dict) -> str:
    raw = {"model": {"name_or_path": "gpt2"}, "data": {"path": "json", "data_files": "p.jsonl"}, **training}
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(raw)
    return str(e.value)


# (TRL key, value, what the message must say)
CASES = [
    ("num_generations", 4, ["num_samples_per_prompt: 4"]),
    ("max_completion_length", 256, ["max_new_tokens: 256"]),
    ("response_length", 53, ["max_new_tokens: 53"]),
    ("beta", 0.04, ["kl_coef: 0.04", "kl_penalty: loss, kl_estimator: k3", "k3 per token to the *loss*", "RLOO"]),
    ("num_iterations", 2, ["ppo_epochs: 2", "algorithm: ppo"]),
    ("num_ppo_epochs", 4, ["ppo_epochs: 4"]),
    ("epsilon", 0.2, ["clip_range: 0.2"]),
    ("epsilon_high", 0.28, ["clip_range_high: 0.28", "null = clip_range"]),
    ("cliprange", 0.1, ["clip_range: 0.1"]),
    ("cliprange_value", 0.3, ["clip_range_value: 0.3"]),
    ("bf16", True, ["mixed_precision: bf16"]),
    ("fp16", True, ["mixed_precision: fp16"]),
    ("bf16", False, ["mixed_precision: no"]),
    (
        "per_device_train_batch_size",
        8,
        ["rollout_batch_size = 8 × processes × gradient_accumulation_steps", "rollout_batch_size: 8 for 1 process"],
    ),
    (
        "num_mini_batches",
        4,
        ["mini_batch_size = rollout_batch_size / 4", "rollout_batch_size: 64, mini_batch_size: 16"],
    ),
    ("total_episodes", 10000, ["max_steps = 10000 / rollout_batch_size", "max_steps: 157"]),
    ("local_rollout_forward_batch_size", 32, ["forward_batch_size: 32"]),
    ("stop_token", "eos", ["stop_token_ids: null"]),
    ("stop_token_id", 2, ["stop_token_ids: [2]"]),
    ("num_train_epochs", 3, ["max_steps = 3 × prompts in the dataset × num_samples_per_prompt / rollout_batch_size"]),
    ("scale_rewards", "group", ["baseline: group_norm", "whiten_advantages: false"]),
    ("scale_rewards", True, ["baseline: group_norm"]),
    ("scale_rewards", False, ["baseline: leave_one_out", "k/(k−1)"]),
    ("scale_rewards", "none", ["baseline: leave_one_out"]),
    ("scale_rewards", "batch", ["baseline: leave_one_out and whiten_advantages: true"]),
    ("vllm_importance_sampling_cap", 2.0, ["vllm_importance_sampling_clip_max: 2"]),
    ("vllm_tensor_parallel_size", 2, ["own shard of prompts"]),
    ("vllm_server_host", "10.0.0.1", ["server mode is not available", "vllm_mode: colocate"]),
    ("per_device_eval_batch_size", 8, ["one completion per eval prompt"]),
    ("repetition_penalty", 1.1, ["name: repetition_penalty", "kept off"]),
    ("ds3_gather_for_generation", False, ["gather_for_generation: false"]),
    ("entropy_coef", 0.01, ["ent_coef: 0.01"]),
    ("normalize_advantages", True, ["whiten_advantages: true"]),
    ("reward_clip_range", [-2, 5], ["reward_clip: 5"]),
    ("generation_batch_size", 64, ["rollout_batch_size: 64"]),
    ("reward_model_path", "me/rm", ["name: reward_model", "model: me/rm"]),
]


@pytest.mark.parametrize("key, value, parts", CASES, ids=[f"{k}={v}" for k, v, _ in CASES])
def test_each_trl_name_gets_its_exact_hint_through_the_config_and_a_recipe(key, value, parts):
    for message in (config_error({key: value}), recipe_error({key: value})):
        assert f"unknown key {key!r} (TRL's name): " in message
        assert "did you mean" not in message
        for part in parts:
            assert part in message, (part, message)


def test_num_generations_no_longer_suggests_gather_for_generation():
    message = config_error({"num_generations": 4})
    assert "num_samples_per_prompt" in message and "gather_for_generation" not in message
    assert message == (
        "invalid hfpg config: unknown key 'num_generations' (TRL's name): num_samples_per_prompt: 4 — completions "
        "sampled per prompt, the same unit (rollout_batch_size must be a multiple of it; baseline: leave_one_out or "
        "group_norm compare them)"
    )


def test_ordinary_typos_still_get_a_did_you_mean_next_to_trl_hints():
    message = config_error({"learnig_rate": 1e-5, "num_generations": 4, "mini_batch_size": 5})
    assert "unknown key 'learnig_rate'; did you mean 'learning_rate'?" in message
    assert "unknown key 'num_generations' (TRL's name): num_samples_per_prompt: 4" in message
    assert "mini_batch_size=5" in message  # the other problems are still listed together
    message = recipe_error({"learnig_rate": 1e-5})
    assert "unknown key 'learnig_rate'; did you mean 'learning_rate'?" in message


def test_hints_never_shadow_a_pgconfig_key():
    names = {f.name for f in dataclasses.fields(PGConfig)}
    assert "KEY_HINTS" not in names  # a ClassVar: neither a field nor a YAML key
    for name in set(TRL_KEY_HINTS) & names:  # a key hfpg has is read as hfpg's key, never hinted
        PGConfig.from_dict({name: PGConfig().to_dict()[name]})
    assert PGConfig.from_dict({"learning_rate": 1e-6, "temperature": 0.7}).temperature == 0.7


def test_unknown_keys_takes_hints_as_functions_or_strings_and_build_reads_key_hints():
    hints = {"old": lambda v: f"new: {v}", "gone": "no longer needed"}
    assert unknown_keys({"old": 3, "gone": 1, "sise": 1}, ["size"], hints=hints) == [
        "unknown key 'old' (TRL's name): new: 3",
        "unknown key 'gone' (TRL's name): no longer needed",
        "unknown key 'sise'; did you mean 'size'?",
    ]
    assert unknown_keys(["old"], ["size"], hints=hints) == ["unknown key 'old' (TRL's name): new: None"]

    @dataclasses.dataclass
    class Section:
        size: int = 1
        KEY_HINTS = {"width": lambda v: f"size: {v}"}  # noqa: RUF012 - a class attribute, as PGConfig's

    assert build(Section, {"width": 2}, where="part")[1] == ["unknown key 'part.width' (TRL's name): size: 2"]


def test_every_hint_renders_without_a_value():
    for key, hint in TRL_KEY_HINTS.items():
        text = hint(None)
        assert isinstance(text, str) and text and "None" not in text, key
    assert trl_hint("num_generations", 8).startswith("num_samples_per_prompt: 8")
    assert trl_hint("learning_rate", 1e-5) is None


def test_trl_loss_names_that_hfpg_shares_pass_through():
    cfg = PGConfig.from_dict(
        {"loss_type": "dr_grpo", "mask_truncated_completions": True, "importance_sampling_level": "sequence"}
    )
    assert (cfg.loss_type, cfg.mask_truncated_completions, cfg.importance_sampling_level) == (
        "dr_grpo",
        True,
        "sequence",
    )
    assert not {"loss_type", "mask_truncated_completions", "importance_sampling_level"} & set(TRL_KEY_HINTS)
    message = config_error({"loss_type": "bnpo"})
    assert "loss_type=bnpo is TRL's per-process token mean; use loss_type: dapo" in message
