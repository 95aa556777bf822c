"""CombinedReward arithmetic and normalisation, shaping terms, YAML rewards, and the trainer's reward metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_trainer import PROMPTS, make_trainer

from hfpg import ConfigError, PGConfig
from hfpg.rewards import CombinedReward, LengthPenalty, RepetitionPenalty, RewardError
from hfpg.rewards.registry import build_reward

P = ["p1", "p2", "p3", "p4"]
C = ["a", "bb", "ccc", "dddd"]


def length(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def const(prompts, completions, **kw):
    return [2.0] * len(completions)


class Scaled:
    """A class-instance reward with a name attribute."""

    name = "scaled"

    def __init__(self, k: float):
        self.k = k

    def __call__(self, prompts, completions, **kw):
        return [self.k * len(c) for c in completions]


# ---- CombinedReward --------------------------------------------------------------------------------------------------
def test_weighted_sum_and_components():
    reward = CombinedReward({length: 0.5, const: -1.0, Scaled(10.0): 0.1})
    total = reward(P, C)
    assert total == pytest.approx([0.5 * n - 2.0 + 1.0 * n for n in (1, 2, 3, 4)])
    assert list(reward.last_components) == ["length", "const", "scaled"]
    assert reward.last_components["length"].tolist() == [1.0, 2.0, 3.0, 4.0]  # raw, before weighting


def test_pairs_and_duplicate_names():
    reward = CombinedReward([(length, 1.0), (length, 2.0)])
    assert reward.names == ["length", "length_2"]
    assert reward(P, C) == pytest.approx([3.0, 6.0, 9.0, 12.0])


def test_batch_normalisation_is_a_z_score_per_part():
    reward = CombinedReward({length: 1.0, Scaled(100.0): 1.0}, normalize="batch")
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    z = (x - x.mean()) / x.std()
    # both parts have the same z-scores whatever their scale
    assert reward(P, C) == pytest.approx((2 * z).tolist(), abs=1e-6)
    constant = CombinedReward({const: 1.0}, normalize="batch")
    assert constant(P, C) == [0.0] * 4  # no spread: no signal, never a division by zero


def test_running_normalisation_uses_everything_seen_so_far():
    reward = CombinedReward({length: 1.0}, normalize="running")
    reward(P, ["a", "bbb"] * 2)  # lengths 1, 3, 1, 3
    second = reward(P, ["bb"] * 4)  # running over 8 values: mean 2, population var 0.5
    assert second == pytest.approx([0.0] * 4, abs=1e-6)
    third = reward(P, ["dddd"] * 4)  # 12 values: 1,3,1,3,2,2,2,2,4,4,4,4 -> mean 2.5833
    seen = torch.tensor([1, 3, 1, 3, 2, 2, 2, 2, 4, 4, 4, 4], dtype=torch.float64)
    want = (4 - seen.mean()) / seen.std()
    assert third == pytest.approx([want.item()] * 4, rel=1e-6)
    state = reward.state_dict()
    fresh = CombinedReward({length: 1.0}, normalize="running")
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert fresh(P, ["a"] * 4) == pytest.approx(reward(P, ["a"] * 4))


def test_gather_makes_statistics_global():
    """With a gather hook (the trainer passes accelerator.gather), statistics cover every process's scores."""
    reward = CombinedReward({length: 1.0}, normalize="batch")
    other_process = torch.tensor([10.0, 20.0, 30.0, 40.0])
    reward.setup(gather=lambda x: torch.cat([x, other_process]))
    everything = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0], dtype=torch.float64)
    want = (torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64) - everything.mean()) / everything.std()
    assert reward(P, C) == pytest.approx(want.tolist(), rel=1e-6)


def test_clip_applies_to_the_total():
    reward = CombinedReward({length: 1.0}, clip=2.5)
    assert reward(P, C) == [1.0, 2.0, 2.5, 2.5]


def test_nan_is_an_error_naming_the_part():
    def flaky(prompts, completions, **kw):
        return [1.0, float("nan"), 1.0, float("inf")]

    with pytest.raises(RewardError, match=r"'flaky' returned 2 non-finite.*part 'flaky' of 'combined'"):
        CombinedReward({length: 1.0, flaky: 1.0})(P, C)


def test_nan_can_be_replaced_and_counted():
    def flaky(prompts, completions, **kw):
        return [1.0, float("nan"), 1.0, float("inf")]

    reward = CombinedReward({flaky: 2.0}, nonfinite=-1.0)
    assert reward(P, C) == [2.0, -2.0, 2.0, -2.0]
    assert reward.last_nonfinite == {"flaky": 2}


def test_wrong_length_and_bad_signature_name_the_part():
    def short(prompts, completions, **kw):
        return [1.0]

    def no_kwargs(prompts, completions):  # gets only what its signature names (TRL's contract, filtered)
        return [float(len(c)) for c in completions]

    def needs_solution(completions, solution):
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"'short' returned 1 values for a batch of 4.*part 'short'"):
        CombinedReward({short: 1.0})(P, C)
    assert CombinedReward({no_kwargs: 1.0})(P, C, references=["x"] * 4) == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(RewardError, match=r"'needs_solution'.*needs 'solution'.*columns \['references'\]"):
        CombinedReward({needs_solution: 1.0})(P, C, references=["x"] * 4)


def test_constructor_errors():
    with pytest.raises(ValueError, match="at least one"):
        CombinedReward({})
    with pytest.raises(ValueError, match="normalize must be one of"):
        CombinedReward({length: 1.0}, normalize="minmax")
    with pytest.raises(ValueError, match="weight of reward 'length' must be a finite number"):
        CombinedReward({length: float("nan")})
    with pytest.raises(TypeError, match="not callable"):
        CombinedReward([("bleu", 1.0)])


# ---- shaping ---------------------------------------------------------------------------------------------------------
def test_length_penalty_hand_values(tokenizer):
    words = LengthPenalty(target=4)
    assert words(P[:3], ["a b c d", "a b", "a b c d e f g h"]) == [0.0, -0.5, -1.0]
    assert LengthPenalty(target=4, power=2)(P[:1], ["a b"]) == [-0.25]
    assert LengthPenalty(target=2, unit="chars")(P[:1], ["abcd"]) == [-1.0]
    n = len(tokenizer("the cat sat", add_special_tokens=False)["input_ids"])
    assert LengthPenalty(target=n, unit="tokens", tokenizer=tokenizer)(P[:1], ["the cat sat"]) == [0.0]
    with pytest.raises(ValueError, match="needs a tokenizer"):
        LengthPenalty(target=3, unit="tokens")


def test_repetition_penalty_hand_values():
    rep = RepetitionPenalty(n=2)
    # "a b a b": bigrams ab, ba, ab -> 2 distinct of 3 -> -(1 - 2/3)
    assert rep(P[:4], ["a b a b", "a b c d", "a", ""]) == pytest.approx([-1 / 3, 0.0, 0.0, 0.0])
    assert RepetitionPenalty(n=1, unit="chars")(P[:1], ["aaaa"]) == [-0.75]


# ---- YAML ------------------------------------------------------------------------------------------------------------
def test_rewards_declared_in_yaml_build_a_combined_reward(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, limit=3, **kw):\n    return [float(len(c) <= limit) for c in completions]\n"
    )
    (tmp_path / "run.yaml").write_text(
        "rewards:\n"
        "  - name: my_rewards.py:brevity\n"
        "    weight: 2.0\n"
        "    kwargs: {limit: 2}\n"
        "  - name: repetition_penalty\n"
        "    weight: 1.0\n"
        "    kwargs: {n: 1, unit: chars}\n"
        "    label: rep\n"
        "reward_normalize: none\n"
        "reward_clip: 1.5\n"
    )
    monkeypatch.chdir(tmp_path.parent)  # the file is found next to the YAML, not only in the cwd
    cfg = PGConfig.from_yaml(tmp_path / "run.yaml")
    reward = build_reward(cfg.rewards, cfg.reward_normalize, cfg.reward_clip, base_dir=cfg.base_dir)
    assert reward.names == ["brevity", "rep"]
    # brevity: 2·[1, 1, 0, 0]; rep (chars, n=1): "bb" -> -0.5, "ccc" -> -2/3, "dddd" -> -0.75; clipped at 1.5
    assert reward(P, C) == pytest.approx([1.5, 1.5, -2 / 3, -0.75])


def test_module_function_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "shaped_rewards_mod.py").write_text(
        "def ones(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    reward = build_reward([{"name": "shaped_rewards_mod:ones", "weight": 3}])
    assert reward(P, C) == [3.0] * 4


def test_yaml_reward_errors_are_caught_up_front():
    with pytest.raises(ConfigError) as err:
        PGConfig.from_dict(
            {
                "rewards": [
                    {"name": "blue"},
                    {"name": "rouge", "wieght": 1},
                    {"weight": 1},
                    {"name": "bleu", "weight": "high"},
                ]
            }
        )
    msg = str(err.value)
    assert "rewards[0]: unknown reward 'blue'; did you mean 'bleu'?" in msg
    assert "rewards[1] has an unknown key 'wieght'; did you mean 'weight'?" in msg
    assert "rewards[2] needs a 'name'" in msg
    assert "rewards[3]: weight must be a number" in msg
    with pytest.raises(ConfigError, match="no 'nope'; it defines"):
        build_reward([{"name": "hfpg.rewards.shaping:nope"}])
    with pytest.raises(ConfigError, match=r"reward file 'missing\.py' not found"):
        build_reward([{"name": "missing.py:f"}])


# ---- in the trainer --------------------------------------------------------------------------------------------------
def test_trainer_logs_each_part_and_builds_rewards_from_the_config(tokenizer, tmp_path):
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        max_steps=2,
        rewards=[
            {"name": "length_penalty", "weight": 1.0, "kwargs": {"target": 3, "unit": "chars"}},
            {"name": "repetition_penalty", "weight": 0.5, "kwargs": {"n": 1, "unit": "chars"}},
        ],
        reward_normalize="running",
    )
    assert isinstance(trainer.reward_fn, CombinedReward)
    trainer.train()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in (
        "reward/length_penalty/mean",
        "reward/length_penalty/std",
        "reward/repetition_penalty/mean",
        "reward/repetition_penalty/std",
    ):
        assert key in lines[-1] and math.isfinite(lines[-1][key])
    assert lines[-1]["reward/length_penalty/mean"] <= 0.0  # raw part values, before normalisation
    m = trainer.evaluate([{"prompt": p} for p in PROMPTS])
    assert "eval/reward/length_penalty/mean" in m


def test_reward_fn_and_config_rewards_together_is_an_error(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match=r"both reward_fn and config\.rewards"):
        make_trainer(tokenizer, tmp_path, reward=length, rewards=[{"name": "repetition_penalty"}])


def test_running_reward_statistics_resume_with_the_checkpoint(tokenizer, tmp_path):
    kw = dict(
        max_steps=2,
        save_steps=1,
        reward_normalize="running",
        rewards=[{"name": "length_penalty", "kwargs": {"target": 3, "unit": "chars"}}],
    )
    trainer = make_trainer(tokenizer, tmp_path, **kw)
    trainer.train()
    seen = trainer.reward_fn.moments["length_penalty"].count
    assert seen == 16
    again = make_trainer(tokenizer, tmp_path, **kw)
    again.load_checkpoint(str(tmp_path / "run" / "checkpoint-1"))
    assert again.reward_fn.moments["length_penalty"].count == 8


# ---- learning against a reference metric, and model rewards inside the trainer -------------------------------------
def test_ppo_raises_a_bleu_reward_against_fixed_references(tokenizer, tmp_path):
    """A random tiny policy learns to write the reference's characters: character-level sacrebleu BLEU rises."""
    from hfpg import BLEUReward

    data = [{"prompt": p, "references": ["the cat sat on the mat"]} for p in PROMPTS]
    reward = CombinedReward({BLEUReward(tokenize="char"): 1.0})
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        dataset=data,
        reward=reward,
        max_steps=50,
        rollout_batch_size=32,
        mini_batch_size=16,
        ppo_epochs=4,
        max_new_tokens=8,
    )
    trainer.train()
    bleu = [r["reward/bleu/mean"] for r in trainer.log_history]
    start, end = sum(bleu[:3]) / 3, sum(bleu[-5:]) / 5
    assert end > 0.15 and end > 3 * start, bleu
    assert all(math.isfinite(r["objective/kl"]) for r in trainer.log_history)


def test_reward_models_are_set_up_on_the_device_frozen_and_outside_ddp(tokenizer, tmp_path):
    from conftest import tiny_gpt2
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from hfpg import LMLikelihoodReward, RewardModelReward

    torch.manual_seed(0)
    rm = GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=128,
            n_embd=32,
            n_layer=1,
            n_head=2,
            num_labels=1,
            pad_token_id=tokenizer.pad_token_id,
            resid_pdrop=0.3,
        )
    ).train()
    scorer = tiny_gpt2(tokenizer, seed=1).train()
    parts = {RewardModelReward(rm, tokenizer): 1.0, LMLikelihoodReward(scorer, tokenizer): 0.1}
    trainer = make_trainer(tokenizer, tmp_path, reward=CombinedReward(parts), max_steps=1)
    for model in (rm, scorer):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
        assert next(model.parameters()).device == trainer.accelerator.device
        assert all(model is not m for m in trainer.accelerator._models)  # never prepared / wrapped by DDP
    before = {k: v.clone() for k, v in rm.state_dict().items()}
    m = trainer.train()
    assert {"reward/reward_model/mean", "reward/lm_likelihood/mean"} <= set(m)
    assert m["reward/lm_likelihood/mean"] < 0  # mean log-probabilities
    assert all(torch.equal(before[k], v) for k, v in rm.state_dict().items())
