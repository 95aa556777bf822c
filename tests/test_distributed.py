"""A real 2-process run on CPU (torchrun + gloo): prompts are sharded, seeds differ per process (docs/design.md,
detail 14), and DDP keeps the replicas identical after an update."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import torchrun

SCRIPT = Path(__file__).parent / "scripts" / "two_process_step.py"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    torchrun(str(SCRIPT), str(out), env=env)
    return [{**json.loads((out / f"rank{r}.json").read_text()), "out_dir": str(out)} for r in (0, 1)]


def test_two_processes_share_the_batch_and_sample_differently(two_ranks):
    r0, r1 = two_ranks
    assert r0["num_processes"] == r1["num_processes"] == 2
    assert "MULTI_CPU" in r0["distributed_type"]
    assert len(r0["rows"]) == len(r1["rows"]) == 4  # 8 rows, half each, no overlap
    assert sorted(r0["rows"] + r1["rows"]) == list(range(8))
    # every row holds the same prompt and the model is the same: only seed + rank makes the samples differ
    assert r0["completions"] != r1["completions"]


def test_ddp_keeps_replicas_identical_after_the_update(two_ranks):
    r0, r1 = two_ranks
    assert r0["weights_head"] == r1["weights_head"]
    assert r0["weights_sum"] == pytest.approx(r1["weights_sum"], rel=1e-9)


def test_evaluate_and_save_work_after_training_with_trackers(two_ranks, tmp_path_factory):
    out = Path(two_ranks[0]["out_dir"])
    m0 = json.loads((out / "rank0.eval.json").read_text())
    m1 = json.loads((out / "rank1.eval.json").read_text())
    assert m0 == m1  # reduced over both processes
    assert m0["eval/num_samples"] == 5  # 3 rows on rank 0, 2 on rank 1
    assert (out / "final" / "value_head.safetensors").is_file()
    assert list((out / "run" / "runs").rglob("events.out.tfevents.*"))  # written once, by the main process


# ---- 2 processes vs 1: the same update, learning, resume (tests/scripts/multi_process_checks.py) -------------------
CHECKS = Path(__file__).parent / "scripts" / "multi_process_checks.py"


def _torchrun(mode: str, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # plain torchrun on a CPU machine must form the group by itself
    torchrun(str(CHECKS), mode, str(out), env=env, timeout=600)
    return [json.loads((out / f"{mode}.rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def checks_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("multi_process_checks", CHECKS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("equivalence")
    return out, _torchrun("equivalence", out)


@pytest.mark.parametrize("variant", ["ppo", "rloo", "grpo", "dr_grpo"])
def test_two_process_update_equals_the_one_process_update(variant, equivalence_runs, checks_module, tmp_path):
    """Same global batch, same seed and weights: 2 processes × 4 sequences give the update of 1 process × 8 — with
    shards of different token counts, whitened scores/advantages, gradient accumulation, clipping and 2 epochs."""
    import torch

    out2, (r0, r1) = equivalence_runs
    one = checks_module.equivalence(str(tmp_path), variant)  # this process, alone
    assert one["num_processes"] == 1 and r0[variant]["num_processes"] == 2
    lengths = one["response_lengths"]
    assert r0[variant]["response_lengths"] == lengths  # the same global batch was sampled everywhere
    assert sum(lengths[:4]) != sum(lengths[4:])  # the shards hold different numbers of tokens
    w1 = torch.load(tmp_path / f"eq-{variant}.rank0.pt")
    w2 = [torch.load(out2 / f"eq-{variant}.rank{r}.pt") for r in (0, 1)]
    assert torch.equal(w1["before"], w2[0]["before"])
    assert torch.equal(w2[0]["after"], w2[1]["after"])  # DDP kept the replicas identical
    step1, step2 = w1["after"] - w1["before"], w2[0]["after"] - w2[0]["before"]
    assert step1.abs().max() > 1e-2  # a real update ...
    assert (step2 - step1).abs().max() < 1e-6  # ... and the same one
    m1, m2 = one["metrics"], r0[variant]["metrics"]
    untimed = [k for k in m1 if not k.startswith("time/") and k != "tokens_per_second"]  # wall times are local
    assert {k: m2[k] for k in untimed} == {k: r1[variant]["metrics"][k] for k in untimed}  # reduced everywhere
    for key in untimed:
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-5), key  # global means, as on one process
    assert "policy/grad_norm" in untimed and "loss/policy" in untimed


def test_a_short_two_process_run_learns(tmp_path):
    r0, r1 = _torchrun("learn", tmp_path)
    scores = r0["scores"]
    start, end = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert start < 0.05 and end > 0.5, scores
    assert r0["scores"] == r1["scores"]  # reduced over both processes
    # rewards are computed where the samples are: each process scores its 16 of the 32 sequences
    assert r0["reward_calls"] == r1["reward_calls"] == [16]
    # the logged score is the mean over both processes' samples
    local = r0["local_last_scores"] + r1["local_last_scores"]
    assert scores[-1] == pytest.approx(sum(local) / len(local), rel=1e-6)
    ckpt = tmp_path / "learn" / "checkpoint-30"
    assert (ckpt / "trainer_state.json").is_file()
    assert {p.name for p in ckpt.glob("hfpg_state_*.json")} == {"hfpg_state_0.json", "hfpg_state_1.json"}
    assert not list(ckpt.glob("*.pkl"))  # every process's state, and no pickle
    assert len(list(ckpt.glob("model*.safetensors"))) == 1  # the model is written once


def test_a_separate_critic_stays_in_sync_across_processes(tmp_path):
    r0, r1 = _torchrun("critic", tmp_path)
    assert r0["critic_moved"] > 0 and r1["critic_moved"] > 0  # the critic trained on each process's shard
    # DDP averaged the critic's gradients: the same weights on both processes (different shards, different losses)
    assert r0["critic_sum"] == r1["critic_sum"] and r0["critic_head"] == r1["critic_head"]
    assert r0["policy_sum"] == r1["policy_sum"]
    assert r0["value_losses"] == r1["value_losses"]  # reduced over both processes
    assert all(v > 0 for v in r0["value_losses"])


def test_two_processes_drop_and_refill_their_own_groups_in_step(tmp_path):
    r0, r1 = _torchrun("dynamic", tmp_path)  # a disagreement on the number of rounds would hang the collectives
    assert len(r0["history"]) == len(r1["history"]) == 4
    for m0, m1 in zip(r0["history"], r1["history"]):
        assert m0["dynamic_sampling/rounds"] == m1["dynamic_sampling/rounds"] >= 1
        assert m0["dynamic_sampling/generated_samples"] == 8 * m0["dynamic_sampling/rounds"]  # both processes
        assert m0["dynamic_sampling/dropped_fraction"] == m1["dynamic_sampling/dropped_fraction"] > 0
    for r in (r0, r1):  # each process trained on 2 groups of 2, none of them flat (4 rounds are plenty here)
        assert len(r["last_prompts"]) == 4 and not set(r["last_prompts"]) & set(r["flat"])
        assert r["last_prompts"][0::2] == r["last_prompts"][1::2]
    assert r0["weights_sum"] == r1["weights_sum"]  # one update on both processes


def test_two_process_resume_continues_exactly(tmp_path):
    for r in _torchrun("resume", tmp_path):
        assert r["same_weights"]
        assert r["resumed_steps"] == [3, 4]
        assert r["resumed"] == r["straight"]


def test_a_recipe_runs_under_torchrun_with_two_processes(tmp_path):
    """`torchrun -m hfpg train recipe.yaml`: one run directory, written once, with checkpoints, report and model."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tokenizer, tiny_gpt2

    tok = make_tokenizer()
    tiny_gpt2(tok).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    prompts = ["the cat", "a good day", "hello world", "policy gradient", "the dog", "good food", "tiny", "models"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (tmp_path / "reward.py").write_text(
        "def length(prompts, completions, **kw):\n    return [len(c) / 10 for c in completions]\n"
    )
    (tmp_path / "tiny.yaml").write_text(
        "model: {name_or_path: tiny}\ndata: {path: prompts.jsonl, eval_size: 4}\n"
        "rewards: [{name: reward.py:length, weight: 1.0}]\n"
        "output_dir: out\nmax_steps: 3\nrollout_batch_size: 8\nmini_batch_size: 4\nppo_epochs: 2\n"
        "max_new_tokens: 6\nsave_steps: 2\nlearning_rate: 1.0e-3\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    proc = torchrun("-m", "hfpg", "train", "tiny.yaml", env=env, cwd=tmp_path)
    assert proc.stdout.count("hfpg: run finished") == 1  # the summary comes from rank 0 only
    out = tmp_path / "out"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "report.md",
        "eval.json",
        "final/model.safetensors",
        "final/value_head.safetensors",
        "final/README.md",
        "checkpoint-2/trainer_state.json",
    ):
        assert (out / name).is_file(), name
    train_lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"objective/' in x]
    assert [r["step"] for r in train_lines] == [1, 2, 3]  # logged once per step, not once per process
    evals = json.loads((out / "eval.json").read_text())
    assert evals["before"]["eval/num_samples"] == 4  # the held-out prompts, split over both processes


def test_push_to_hub_uploads_once_from_the_main_process_and_refusals_reach_every_process(tmp_path):
    r0, r1 = _torchrun("push", tmp_path)
    assert len(r0["uploads"]) == 1 and r1["uploads"] == []  # one upload, by rank 0
    assert "value_head.safetensors" in r0["uploads"][0]["files"] and "README.md" in r0["uploads"][0]["files"]
    assert r0["url"].startswith("https://huggingface.co/someone/tiny-policy") and r1["url"] is None
    assert r0["refused"] and r0["refused"] == r1["refused"]  # HF_HUB_OFFLINE: both raise the main one's error
    assert "HF_HUB_OFFLINE" in r0["refused"]
