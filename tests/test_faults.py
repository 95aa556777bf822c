"""Fault injection on real runs: `hfpg train` in a subprocess, killed with SIGKILL at random steps and in the middle
of a checkpoint write, then continued with `--resume`. The final weights must be bit-identical to an uninterrupted
run's, metrics.jsonl must hold each step once, and the report must be complete. (`make test-faults`; also in
`make test-slow`.)"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.faults]

SCRIPT = Path(__file__).parent / "scripts" / "fault_run.py"
MAX_STEPS = 6


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """The tiny recipe: MAX_STEPS steps, a checkpoint every step."""
    return tiny_recipe(tmp_path_factory.mktemp("faults"), max_steps=MAX_STEPS, save_steps=1)


def command(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "train", str(recipe), f"output_dir={out}", *extra]


def environment(slow_save: float = 0.0) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if slow_save:
        env["HFPG_FAULT_SLOW_SAVE"] = str(slow_save)
    return env


def finish(recipe: Path, out: Path, *extra: str) -> None:
    done = subprocess.run(command(recipe, out, *extra), env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def kill_when(recipe: Path, out: Path, ready, *extra: str, slow_save: float = 0.0, timeout: float = 600) -> None:
    """Start a run and SIGKILL it the moment ``ready(out)`` is true (it must not finish first)."""
    proc = subprocess.Popen(
        command(recipe, out, *extra), env=environment(slow_save), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    start = time.monotonic()
    try:
        while not ready(out):
            if proc.poll() is not None:
                pytest.fail(
                    f"the run ended (rc {proc.returncode}) before the kill point:\n{proc.stdout.read()[-3000:]}"
                )
            if time.monotonic() - start > timeout:
                pytest.fail("the kill point was never reached")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def complete(out: Path) -> set[int]:
    return {int(m.group(1)) for p in out.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))}


def half_written(out: Path) -> list[Path]:
    """Checkpoint folders being written (any name with 'checkpoint' that is not a finished checkpoint-N)."""
    return [p for p in out.iterdir() if "checkpoint" in p.name and not re.fullmatch(r"checkpoint-\d+", p.name)]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted((out / "final").glob("*.safetensors")):
        tensors.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    assert tensors, f"no weights in {out / 'final'}"
    return tensors


def assert_same_run(out: Path, reference: Path) -> None:
    got, want = final_weights(out), final_weights(reference)
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} of {len(want)} tensors differ, e.g. {different[:3]}"
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "objective/scores" in x]
    assert steps == list(range(1, MAX_STEPS + 1))  # each step once, in order
    evals = json.loads((out / "eval.json").read_text())
    assert evals == json.loads((reference / "eval.json").read_text())  # the before and after evaluations
    report = (out / "report.md").read_text()
    assert "| eval/scores |" in report and "## Samples" in report and (out / "reward_kl.png").is_file()


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    finish(recipe, out)
    return out


def test_killed_twice_at_random_steps_resumes_to_the_same_weights(recipe, reference, tmp_path):
    rng = random.Random(int(os.environ.get("HFPG_FAULT_SEED", "0")))
    first = rng.randint(1, 3)
    second = rng.randint(first + 1, MAX_STEPS - 1)
    out = tmp_path / "run"
    kill_when(recipe, out, lambda o: first in complete(o))
    kill_when(recipe, out, lambda o: second in complete(o), "--resume")
    finish(recipe, out, "--resume")
    assert_same_run(out, reference)


def test_killed_in_the_middle_of_a_checkpoint_write_resumes_from_the_last_complete_one(recipe, reference, tmp_path):
    out = tmp_path / "run"
    # every safetensors write pauses 1 s: the kill lands while checkpoint-2 (or later) is half on disk
    kill_when(recipe, out, lambda o: complete(o) and half_written(o), slow_save=1.0)
    partial = half_written(out)
    assert partial and not any((p / "trainer_state.json").is_file() for p in partial)  # never marked complete
    from hfpg.saving import latest_checkpoint

    newest = latest_checkpoint(str(out))
    assert newest is not None and Path(newest).name == f"checkpoint-{max(complete(out))}"
    finish(recipe, out, "--resume")
    assert_same_run(out, reference)
    assert not half_written(out)  # the stale half-written folder is gone
