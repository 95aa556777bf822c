"""benchmarks/bench_learning.py: the summary over seeds, the target against TRL's best, the run-time estimate and the
hfpg worker's recipe on hand-made results (no training, no TRL)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_learning  # noqa: E402
import bench_learning_hfpg  # noqa: E402


def run(method, seed, curve, wall=100.0, steps=(10.0, 12.0, 14.0)):
    """A finished run: curve = [(samples, reward, kl), ...]."""
    evals = [
        {"samples": n, "reward": r, "kl": k, "kl_k3": k / 2, "length": 20.0, "components": {"positivity": r + 0.1}}
        for n, r, k in curve
    ]
    return {
        "name": f"{method}-s{seed}",
        "method": method,
        "seed": seed,
        "evaluations": evals,
        "wall_seconds": wall,
        "train_seconds": wall / 2,
        "step_seconds": list(steps),
    }


def test_summary_averages_the_seeds_final_evaluation_and_the_curve_point_by_point():
    runs = [
        run("hfpg-rloo", 0, [(0, 0.0, 0.0), (64, 0.2, 1.0), (128, 0.4, 3.0)], wall=100.0),
        run("hfpg-rloo", 1, [(0, 0.0, 0.0), (64, 0.4, 2.0), (128, 0.6, 5.0)], wall=200.0, steps=(20.0,)),
        {"name": "hfpg-ppo-s0", "method": "hfpg-ppo", "seed": 0, "error": "Traceback ... KeyError"},
    ]
    s = bench_learning.summarize(runs)
    rloo = s["hfpg-rloo"]
    assert rloo["runs"] == 2 and rloo["failed"] == 0
    assert rloo["reward"] == pytest.approx({"mean": 0.5, "min": 0.4, "max": 0.6})
    assert rloo["kl"] == pytest.approx({"mean": 4.0, "min": 3.0, "max": 5.0})
    assert rloo["components"]["positivity"] == pytest.approx(0.6)
    assert rloo["wall_seconds"] == 150.0
    assert rloo["step_seconds_median"] == 13.0  # median of 10, 12, 14, 20
    assert [c["samples"] for c in rloo["curve"]] == [0, 64, 128]
    assert rloo["curve"][1]["reward_mean"] == pytest.approx(0.3)
    assert (rloo["curve"][1]["kl_min"], rloo["curve"][1]["kl_max"]) == (1.0, 2.0)
    assert s["hfpg-ppo"]["runs"] == 0 and "KeyError" in s["hfpg-ppo"]["error"]


def summary_of(**curves):
    return bench_learning.summarize([run(m.replace("_", "-"), 0, c) for m, c in curves.items()])


def test_target_met_needs_at_least_trl_best_reward_at_no_more_kl():
    s = summary_of(
        hfpg_dapo=[(0, 0.0, 0.0), (128, 0.55, 6.0)],
        trl_grpo=[(0, 0.0, 0.0), (128, 0.50, 7.0)],
        trl_rloo=[(0, 0.0, 0.0), (128, 0.30, 2.0)],
    )
    t = bench_learning.check_target(s)
    assert t["met"] is True and (t["hfpg"], t["trl"]) == ("hfpg-dapo", "trl-grpo")
    assert t["equal_samples"]


def test_target_missed_when_the_higher_reward_costs_more_kl_and_the_frontier_is_reported():
    s = summary_of(
        hfpg_ppo_critic=[(0, 0.0, 0.0), (64, 0.45, 6.5), (128, 0.75, 25.0)],
        hfpg_grpo=[(0, 0.0, 0.0), (64, 0.1, 1.0), (128, 0.30, 3.0)],
        trl_grpo=[(0, 0.0, 0.0), (64, 0.2, 3.0), (128, 0.50, 7.0)],
    )
    t = bench_learning.check_target(s)
    assert t["met"] is False and t["hfpg"] == "hfpg-ppo-critic"
    assert t["detail"].startswith("MISSED")
    # the best evaluation of each hfpg rule at a KL no larger than TRL's best (7.0)
    assert t["best_reward_within_trl_kl"] == {"hfpg-ppo-critic": 0.45, "hfpg-grpo": 0.30}
    assert "hfpg-ppo-critic +0.450" in t["detail"]


def test_target_not_evaluated_without_both_sides():
    t = bench_learning.check_target(summary_of(hfpg_rloo=[(0, 0.0, 0.0), (64, 0.2, 1.0)]))
    assert t["met"] is None and "not evaluated" in t["detail"]


def test_default_methods_leave_the_optional_variants_out():
    args = bench_learning.parse_args([])
    optional = {m for m, spec in bench_learning.METHODS.items() if spec.get("optional")}
    assert optional == {
        "hfpg-ppo-critic-kl0.3",
        "hfpg-ppo-critic-klloss",
        "hfpg-ppo-critic-klloss0.15",
        "hfpg-ppo-critic-klloss0.18",
        "hfpg-ppo-critic-klloss0.2",
        "hfpg-ppo-critic-klloss0.3",
        "hfpg-grpo-unwhitened",
    }
    assert not optional & set(args.methods)
    # a variant is its base with the named overrides and nothing else changed
    base, unwhitened = bench_learning.METHODS["hfpg-grpo"], bench_learning.METHODS["hfpg-grpo-unwhitened"]
    assert unwhitened["config"] == {**base["config"], "whiten_advantages": False}
    assert "whiten_advantages" not in base["config"] and unwhitened["side"] == "hfpg"
    critic, klloss = bench_learning.METHODS["hfpg-ppo-critic"], bench_learning.METHODS["hfpg-ppo-critic-klloss0.2"]
    assert klloss["config"] == {**critic["config"], "kl_penalty": "loss", "kl_coef": 0.2}
    assert klloss["minibatches"] == critic["minibatches"] and klloss["label"].endswith("kl_coef 0.2")
    assert set(args.methods) == set(bench_learning.METHODS) - optional
    named = bench_learning.parse_args(["--methods", "hfpg-grpo-unwhitened,trl-grpo"])
    assert named.methods == ["hfpg-grpo-unwhitened", "trl-grpo"]
    with pytest.raises(SystemExit):
        bench_learning.parse_args(["--methods", "hfpg-nonexistent"])


def test_the_estimate_counts_evaluations_and_packs_runs_onto_the_slots():
    args = bench_learning.parse_args(["--steps", "16", "--eval-every", "8", "--methods", "hfpg-rloo"])
    # evaluations at 0, 128 and 256 samples
    expected = (
        bench_learning.SETUP_SECONDS
        + 16 * bench_learning.STEP_SECONDS["hfpg-rloo"]
        + 3 * args.eval_prompts * bench_learning.EVAL_SECONDS_PER_PROMPT
    )
    assert bench_learning.estimate_run_seconds(args, "hfpg-rloo") == pytest.approx(expected)
    # a variant is estimated as the method it varies
    assert bench_learning.estimate_run_seconds(args, "hfpg-grpo-unwhitened") == pytest.approx(
        bench_learning.estimate_run_seconds(args, "hfpg-grpo")
    )
    # first free slot takes the next run: [5, 3] then 2 -> slot 2 (3 + 2), then 4 -> slot 1 (5 + 4)
    assert bench_learning.schedule_seconds([5.0, 3.0, 2.0, 4.0], 2) == 9.0
    assert bench_learning.schedule_seconds([5.0, 3.0, 2.0, 4.0], 1) == 14.0


def test_hfpg_worker_applies_the_method_overrides_last():
    recipe = Path(bench_learning.RECIPE)
    spec = {
        "recipe": str(recipe),
        "model_dir": "some/model",
        "peft": {"r": 16},
        "train_file": "train.jsonl",
        "rewards": [{"name": "lm_likelihood"}],
        "settings": {
            "samples_per_step": 16,
            "max_new_tokens": 24,
            "temperature": 1.0,
            "learning_rate": 5e-4,
            "beta": 0.1,
        },
    }
    method = bench_learning.METHODS["hfpg-ppo-critic-kl0.3"]
    raw = bench_learning_hfpg.build_recipe_dict(
        spec,
        {
            "config": method["config"],
            "minibatches": method["minibatches"],
            "seed": 3,
            "max_steps": 24,
            "output_dir": "o",
        },
    )
    assert raw["kl_coef"] == 0.3 and raw["value_model"] == "policy"  # the method's beta beats the shared --beta
    assert (raw["rollout_batch_size"], raw["mini_batch_size"], raw["seed"]) == (16, 8, 3)
    assert raw["model"] == {"name_or_path": "some/model", "peft": {"r": 16}}
    spec["settings"]["samples_per_step"] = 10
    k4 = bench_learning.METHODS["hfpg-grpo-unwhitened"]
    with pytest.raises(SystemExit, match="not a multiple of num_samples_per_prompt=4"):
        bench_learning_hfpg.build_recipe_dict(
            spec, {"config": k4["config"], "seed": 0, "max_steps": 24, "output_dir": "o"}
        )


def test_plot_draws_reward_and_kl_against_samples_and_reward_against_kl(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    s = bench_learning.summarize(
        [
            run("hfpg-rloo", 0, [(0, 0.0, 0.0), (64, 0.2, 1.0), (128, 0.4, 3.0)]),
            run("trl-grpo", 0, [(0, 0.0, 0.0), (64, 0.3, 2.0), (128, 0.5, 4.0)]),
            {"name": "hfpg-ppo-s0", "method": "hfpg-ppo", "seed": 0, "error": "KeyError"},  # no curve: not drawn
        ]
    )
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to inspect it
    path = bench_learning.plot(s, str(tmp_path / "bl.png"))
    assert path and (tmp_path / "bl.png").read_bytes()[:4] == b"\x89PNG"
    (fig,) = figures
    reward, kl, frontier = fig.axes
    assert [list(line.get_ydata()) for line in reward.get_lines()] == [[0.0, 0.2, 0.4], [0.0, 0.3, 0.5]]
    assert [list(line.get_ydata()) for line in kl.get_lines()] == [[0.0, 1.0, 3.0], [0.0, 2.0, 4.0]]
    # reward against KL: the curve and a star at the end of the budget, per method; TRL dashed
    lines = frontier.get_lines()
    assert [list(line.get_xdata()) for line in lines] == [[0.0, 1.0, 3.0], [3.0], [0.0, 2.0, 4.0], [4.0]]
    assert list(lines[3].get_ydata()) == [0.5] and lines[2].get_linestyle() == "--"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [s["hfpg-rloo"]["label"], s["trl-grpo"]["label"]]
    monkeypatch.undo()
    plt.close(fig)
