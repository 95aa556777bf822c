"""No NaN steps: non-finite config numbers are refused by key, a non-finite loss or gradient skips the optimizer step
(weights bit-identical, ``policy/nonfinite_steps`` counts it), a run that keeps going non-finite stops with a
:class:`TrainingError`, and :func:`hfpg.guards.nonfinite_parameters` names broken weights."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.utils import DistributedType
from conftest import small_run, tiny_gpt2

from hfpg import PGConfig, PGTrainer, TrainerCallback
from hfpg.algorithms.ppo import PPO
from hfpg.algorithms.trpo import TRPO
from hfpg.errors import ConfigError, TrainingError
from hfpg.guards import check_finite, nonfinite_parameters, nonfinite_streak
from hfpg.schema import build
from hfpg.stats import MetricSums

NAN, INF = float("nan"), float("inf")
PROMPTS = ["the cat", "a good day", "hello world", "policy gradient"]

# ---- config numbers --------------------------------------------------------------------------------------------------

BAD_VALUES = [  # (key, Python value, the same value written in YAML)
    ("learning_rate", INF, ".inf"),
    ("max_grad_norm", NAN, ".nan"),
    ("score_clip", NAN, ".NaN"),
    ("missing_eos_penalty", NAN, ".nan"),
    ("temperature", INF, ".inf"),
    ("temperature", -INF, "-.inf"),
    ("adam_epsilon", -1.0, "-1"),
    ("learning_rate", "nan", '"nan"'),  # a string: what YAML gives for an unquoted `nan` too
    ("reward_nonfinite", INF, ".inf"),
    ("baseline_ema", NAN, ".nan"),
]


def only_problem(err: pytest.ExceptionInfo, key: str) -> str:
    """The one problem of a ConfigError, which must name ``key``."""
    problems = err.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{key}="), problems[0]
    return problems[0]


@pytest.mark.parametrize("key,value,yaml_value", BAD_VALUES)
def test_a_bad_number_is_refused_by_key_from_python_a_dict_and_yaml(tmp_path, key, value, yaml_value):
    with pytest.raises(ConfigError) as python:
        PGConfig(**{key: value})
    with pytest.raises(ConfigError) as from_dict:
        PGConfig.from_dict({key: value})
    path = tmp_path / "run.yaml"
    path.write_text(f"max_steps: 3\n{key}: {yaml_value}\n")
    with pytest.raises(ConfigError) as from_yaml:
        PGConfig.from_yaml(path)
    with pytest.raises(ConfigError) as override:
        PGConfig.from_dict({}, overrides=[f"{key}={yaml_value}"])
    messages = [only_problem(e, key) for e in (python, from_dict, from_yaml, override)]
    expected = "must be > 0" if key == "adam_epsilon" else "must be a finite number"
    assert all(expected in m for m in messages), messages


def test_an_unquoted_nan_in_yaml_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: nan\nmax_grad_norm: -.inf\n")  # YAML: the string 'nan' and the float -inf
    with pytest.raises(ConfigError) as err:
        PGConfig.from_yaml(path)
    assert sorted(p.split("=")[0] for p in err.value.problems) == ["learning_rate", "max_grad_norm"]


def test_every_bad_number_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        PGConfig.from_dict({k: v for k, v, _ in BAD_VALUES if k not in ("learning_rate", "temperature")})
    keys = {p.split("=")[0] for p in err.value.problems}
    assert keys == {"max_grad_norm", "score_clip", "missing_eos_penalty", "adam_epsilon", "reward_nonfinite",
                    "baseline_ema"}  # fmt: skip


def test_a_wrong_type_in_python_is_a_config_error_naming_the_key():
    for key, value in (("learning_rate", "abc"), ("max_steps", "3"), ("max_steps", 2.5), ("whiten_advantages", 1)):
        with pytest.raises(ConfigError) as err:
            PGConfig(**{key: value})
        only_problem(err, key)
    with pytest.raises(ConfigError) as err:  # every wrong type at once, and nothing deeper fails on them
        PGConfig(learning_rate="abc", ppo_epochs=None, top_p="x")
    assert {p.split("=")[0].split(" ")[0] for p in err.value.problems} == {"learning_rate", "ppo_epochs", "top_p"}


def test_python_values_are_converted_as_the_loader_converts_them():
    cfg = PGConfig(learning_rate=1, max_steps=np.int64(5), temperature=np.float32(0.5), kl_coef="1e-3")
    assert type(cfg.learning_rate) is float and cfg.learning_rate == 1.0
    assert type(cfg.max_steps) is int and cfg.max_steps == 5
    assert type(cfg.temperature) is float and cfg.temperature == 0.5
    assert cfg.kl_coef == 1e-3
    assert PGConfig().max_nonfinite_steps == 3 and PGConfig(max_nonfinite_steps=0).max_nonfinite_steps == 0
    with pytest.raises(ConfigError) as err:
        PGConfig(max_nonfinite_steps=-1)
    only_problem(err, "max_nonfinite_steps")
    with pytest.raises(ConfigError) as err:
        PGConfig(adam_epsilon=0.0)  # 0 / 0 where a gradient is 0
    only_problem(err, "adam_epsilon")


def test_problems_refuses_a_non_finite_value_set_after_construction():
    cfg = PGConfig()
    assert cfg.problems() == []
    cfg.learning_rate = NAN
    cfg.score_clip = INF
    found = cfg.problems()
    assert any(p.startswith("learning_rate=nan must be a finite number") for p in found), found
    assert any(p.startswith("score_clip=inf must be a finite number") for p in found), found


def test_every_dataclass_the_schema_loads_refuses_non_finite_floats():
    @dataclasses.dataclass
    class Section:
        scale: float = 1.0
        size: int | float = 0
        margin: float | None = None

    obj, problems = build(Section, {"scale": ".inf", "size": NAN, "margin": "-inf"}, where="section")
    assert obj is None
    assert sorted(p.split("=")[0] for p in problems) == ["section.margin", "section.scale", "section.size"]
    assert all("must be a finite number" in p for p in problems), problems
    obj, problems = build(Section, {"scale": "1e-3", "size": 16, "margin": 2})
    assert problems == [] and obj == Section(1e-3, 16, 2.0)


# ---- nonfinite_parameters / check_finite / nonfinite_streak ---------------------------------------------------------


def test_nonfinite_parameters_names_an_injected_nan_and_inf(tokenizer):
    model = tiny_gpt2(tokenizer)
    assert nonfinite_parameters(model) == []
    check_finite(model, "saving")  # nothing to say
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 5] = NAN
        model.lm_head.weight[0, 0] = -INF  # tied to the input embeddings: one tensor, found under its first name
    bad = nonfinite_parameters(model)
    assert bad == ["transformer.wte.weight", "transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(TrainingError, match=r"saving checkpoint-7: 2 parameter\(s\)/buffer\(s\).*h\.1\.mlp\.c_fc"):
        check_finite(model, "saving checkpoint-7")


def test_nonfinite_parameters_checks_float_buffers_and_skips_integer_ones():
    model = torch.nn.BatchNorm1d(3)
    model.running_var[1] = NAN  # num_batches_tracked is an int64 buffer: always finite
    assert nonfinite_parameters(model) == ["running_var"]


def test_nonfinite_streak_counts_consecutive_updates_and_stops_at_the_limit():
    cfg = SimpleNamespace(max_nonfinite_steps=3, learning_rate=1e-5, max_grad_norm=None)
    bad, good = {"policy/nonfinite_steps": 2.0}, {"policy/nonfinite_steps": 0.0}
    streak = 0
    for metrics in (bad, bad, good, bad, bad):  # an update without skipped steps resets the count
        streak = nonfinite_streak(streak, metrics, cfg)
    assert streak == 2
    with pytest.raises(TrainingError, match=r"3 updates in a row.*learning_rate \(now 1e-05\).*max_grad_norm is not"):
        nonfinite_streak(streak, {**bad, "objective/scores": 1e38}, cfg)
    assert nonfinite_streak(99, bad, SimpleNamespace(max_nonfinite_steps=0)) == 100  # 0 = never stop


# ---- skipped steps in training -------------------------------------------------------------------------------------


def snapshot(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Snapshots(TrainerCallback):
    """The weights and the metrics after every step."""

    def __init__(self):
        self.weights, self.metrics = [], []

    def on_train_begin(self, trainer):
        self.weights.append(snapshot(trainer))

    def on_step_end(self, trainer, step, metrics):
        self.weights.append(snapshot(trainer))
        self.metrics.append(metrics)


def make_trainer(tokenizer, tmp_path, reward=None, **overrides):
    cfg = small_run(tmp_path, **{"kl_coef": 0.01, **overrides})
    return PGTrainer(
        tiny_gpt2(tokenizer),
        tokenizer,
        PGConfig(**cfg),
        train_dataset=[{"prompt": p} for p in PROMPTS],
        reward_fn=reward or (lambda prompts, completions, **kw: [len(c) / 10 for c in completions]),
    )


def nan_policy_loss_at(monkeypatch, cls, calls: set[int] | None):
    """Make ``cls.policy_loss`` NaN (with a gradient) at the given 1-based calls; None = at every call."""
    original, seen = cls.policy_loss, []

    def policy_loss(self, *args):
        loss, stats = original(self, *args)
        seen.append(1)
        if calls is None or len(seen) in calls:
            loss = loss * NAN
        return loss, stats

    monkeypatch.setattr(cls, "policy_loss", policy_loss)
    return seen


def test_a_huge_reward_skips_the_step_and_the_run_continues(tokenizer, tmp_path):
    """A reward of 1e38 makes the value loss infinite: that update takes no step (weights bit-identical, value head
    included), the next batch's sensible rewards train as usual."""
    batches = []

    def huge_then_sane(prompts, completions, **kw):
        batches.append(1)
        return [1e38 if len(batches) == 1 else len(c) / 10 for c in completions]

    spy = Snapshots()
    trainer = make_trainer(tokenizer, tmp_path, reward=huge_then_sane)
    trainer.callbacks.append(spy)
    trainer.train()
    first, second = spy.metrics
    assert first["objective/scores"] > 1e37 and not math.isfinite(first["loss/value"])
    assert first["policy/nonfinite_steps"] == 1.0 and first["policy/optimizer_steps"] == 0.0
    assert same(spy.weights[0], spy.weights[1])
    assert second["policy/nonfinite_steps"] == 0.0 and second["policy/optimizer_steps"] == 1.0
    assert not same(spy.weights[1], spy.weights[2]) and trainer.global_step == 2
    assert trainer.scheduler.last_epoch == 1  # the skipped step did not advance the schedule
    assert nonfinite_parameters(trainer.unwrapped_model) == []


def test_a_nan_loss_in_one_micro_batch_skips_exactly_that_optimizer_step(tokenizer, tmp_path, monkeypatch):
    """2 epochs × 2 minibatches × 2 micro-batches: the 3rd micro-batch (2nd minibatch, epoch 1) has a NaN loss, so 3
    of the 4 optimizer steps are taken, and AdamW / the scheduler saw exactly 3."""
    nan_policy_loss_at(monkeypatch, PPO, {3})
    spy = Snapshots()
    trainer = make_trainer(
        tokenizer, tmp_path, max_steps=1, rollout_batch_size=8, mini_batch_size=4, gradient_accumulation_steps=2,
        ppo_epochs=2,
    )  # fmt: skip
    trainer.callbacks.append(spy)
    trainer.train()
    (m,) = spy.metrics
    assert m["policy/nonfinite_steps"] == 1.0 and m["policy/optimizer_steps"] == 3.0
    steps = {float(s["step"]) for s in trainer.optimizer.optimizer.state.values()}
    assert steps == {3.0}
    assert trainer.scheduler.last_epoch == 3
    assert math.isfinite(m["policy/grad_norm"])  # the mean of the 3 finite norms
    assert nonfinite_parameters(trainer.unwrapped_model) == []


def test_a_nan_micro_batch_leaves_the_weights_bit_identical(tokenizer, tmp_path, monkeypatch):
    """One optimizer step per update, its 2nd micro-batch NaN: the update changes nothing; the next one trains."""
    nan_policy_loss_at(monkeypatch, PPO, {2})
    spy = Snapshots()
    trainer = make_trainer(tokenizer, tmp_path, gradient_accumulation_steps=2, ppo_epochs=1)
    trainer.callbacks.append(spy)
    trainer.train()
    assert [m["policy/nonfinite_steps"] for m in spy.metrics] == [1.0, 0.0]
    assert same(spy.weights[0], spy.weights[1])
    assert not same(spy.weights[1], spy.weights[2])
    assert trainer.optimizer.optimizer.state  # the second update did step


def test_a_nan_gradient_with_a_finite_loss_is_caught_without_clipping(tokenizer, tmp_path):
    """max_grad_norm=None: the global norm is still measured, and a NaN gradient (finite loss) skips the step."""
    spy = Snapshots()
    trainer = make_trainer(tokenizer, tmp_path, max_grad_norm=None, max_steps=2)
    trainer.callbacks.append(spy)
    weight = trainer.unwrapped_model.pretrained_model.transformer.h[0].attn.c_attn.weight
    hooked = []
    weight.register_hook(lambda g: (hooked.append(1), g * NAN)[1] if len(hooked) < 1 else g)
    trainer.train()
    first, second = spy.metrics
    assert hooked and math.isfinite(first["loss/policy"])
    assert first["policy/nonfinite_steps"] == 1.0 and same(spy.weights[0], spy.weights[1])
    assert second["policy/nonfinite_steps"] == 0.0 and math.isfinite(second["policy/grad_norm"])
    assert second["policy/grad_norm"] > 0 and not same(spy.weights[1], spy.weights[2])


def test_nan_every_step_stops_after_max_nonfinite_steps_with_finite_weights(tokenizer, tmp_path, monkeypatch):
    nan_policy_loss_at(monkeypatch, PPO, None)
    trainer = make_trainer(tokenizer, tmp_path, max_steps=10, max_nonfinite_steps=2, learning_rate=0.05)
    before = snapshot(trainer)
    updates = []
    original = trainer.algorithm.update
    trainer.algorithm.update = lambda *a, **kw: updates.append(1) or original(*a, **kw)
    with pytest.raises(TrainingError, match=r"2 updates in a row .*NaN or infinite.*lower learning_rate \(now 0\.05\)"):
        trainer.train()
    assert len(updates) == 2 and trainer.global_step == 1  # stopped inside the 2nd step, before it was logged
    assert nonfinite_parameters(trainer.unwrapped_model) == []
    assert same(before, snapshot(trainer))
    logged = [r["step"] for r in trainer.log_history]
    assert logged == [1]


def test_max_nonfinite_steps_0_never_stops(tokenizer, tmp_path, monkeypatch):
    nan_policy_loss_at(monkeypatch, PPO, None)
    trainer = make_trainer(tokenizer, tmp_path, max_steps=3, max_nonfinite_steps=0)
    before = snapshot(trainer)
    metrics = trainer.train()
    assert trainer.global_step == 3 and metrics["policy/nonfinite_steps"] == 1.0
    assert same(before, snapshot(trainer))


def test_trpo_takes_no_step_on_a_non_finite_surrogate(tokenizer, tmp_path, monkeypatch):
    original = TRPO._surrogate
    calls = []

    def surrogate(self, *args):
        calls.append(1)
        return original(self, *args) * NAN

    monkeypatch.setattr(TRPO, "_surrogate", surrogate)
    trainer = make_trainer(
        tokenizer, tmp_path, algorithm="trpo", advantage_estimator="returns", max_steps=1, kl_coef=0.0
    )
    before = snapshot(trainer)
    metrics = trainer.train()
    assert calls and metrics["policy/nonfinite_steps"] == 1.0 and metrics["trpo/accepted"] == 0.0
    assert metrics["trpo/line_search_tries"] == 0.0  # no direction was even tried
    assert same(before, snapshot(trainer))


def test_trpo_skips_value_head_steps_on_an_infinite_value_loss(tokenizer, tmp_path):
    """A reward of 1e38 makes the value loss infinite: the value head keeps its weights, every skipped value step is
    counted."""
    trainer = make_trainer(
        tokenizer, tmp_path, reward=lambda prompts, completions, **kw: [1e38] * len(completions), algorithm="trpo",
        max_steps=1, kl_coef=0.0, value_epochs=2, max_nonfinite_steps=0,
    )  # fmt: skip
    before = snapshot(trainer)
    metrics = trainer.train()
    assert metrics["policy/nonfinite_steps"] >= 2.0  # both value-head epochs (and the policy step, if it was NaN)
    assert same(before, snapshot(trainer))


class ScaledAccelerator:
    """The parts of an fp16 Accelerator that the step decision uses, on the CPU: torch's GradScaler, unscaled by
    ``clip_grad_norm_`` and stepped + updated by the optimizer's step, as Accelerate does."""

    num_processes = 1
    mixed_precision = "fp16"
    distributed_type = DistributedType.NO

    def __init__(self, optimizer):
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        self.inner = optimizer

    def clip_grad_norm_(self, parameters, max_norm):
        self.scaler.unscale_(self.inner)
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)


class ScaledOptimizer:
    def __init__(self, accelerator):
        self.accelerator = accelerator

    def step(self):
        self.accelerator.scaler.step(self.accelerator.inner)
        self.accelerator.scaler.update()

    def zero_grad(self, set_to_none=True):
        self.accelerator.inner.zero_grad(set_to_none=set_to_none)


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_fp16_loss_scaling_overflow_is_the_scalers_and_a_nan_loss_is_non_finite(max_grad_norm):
    """An overflow of scaled gradients (finite loss) is skipped and lowers the scale, as the scaler does, without
    counting as non-finite; a NaN loss is a non-finite step; after both, the scaler steps normally again."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
    acc = ScaledAccelerator(inner)
    optimizer = ScaledOptimizer(acc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lambda step: 1.0)
    rule = PPO(PGConfig(max_grad_norm=max_grad_norm))
    x = torch.randn(8, 4)

    def finish(loss: torch.Tensor) -> str:
        acc.scaler.scale(loss).backward()
        loss_bad = ~torch.isfinite(loss.detach())
        return rule._finish_minibatch(model, optimizer, scheduler, acc, loss_bad, MetricSums())

    before = snapshot_module(model)
    assert finish(model(x).sum() * 1e36) == "overflow"  # finite in fp32, but ×1024 overflows the gradients
    assert acc.scaler.get_scale() == 2.0**9 and scheduler.last_epoch == 0
    assert same(before, snapshot_module(model))
    assert finish(model(x).sum() * NAN) == "nonfinite"
    assert acc.scaler.get_scale() == 2.0**8 and scheduler.last_epoch == 0
    assert same(before, snapshot_module(model)) and all(p.grad is None for p in model.parameters())
    assert finish(model(x).pow(2).mean()) == "stepped"  # the scaler's per-step state was reset: no error here
    assert scheduler.last_epoch == 1 and not same(before, snapshot_module(model))


def snapshot_module(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
