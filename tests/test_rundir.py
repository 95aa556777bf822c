"""One run per output_dir: a used folder is refused (naming --resume and overwrite_output_dir) before anything is
loaded or written, overwrite_output_dir clears exactly hfpg's artefacts, and `hfpg train --resume` continues an
interrupted run to the weights, metrics, samples and report of an uninterrupted one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import WORDS, small_run, tiny_gpt2, tiny_recipe
from safetensors.torch import load_file

from hfpg import ConfigError, PGConfig
from hfpg import runner as runner_module
from hfpg.cli import main
from hfpg.rundir import clear_run, drop_records_after, previous_run, resume_problems, run_artifacts
from hfpg.trainer import PGTrainer


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """The tiny recipe: 4 steps, a checkpoint every 2."""
    return tiny_recipe(tmp_path_factory.mktemp("rundir"), max_steps=4, save_steps=2)


def train(recipe: Path, out: Path, *extra: str) -> int:
    return main(["train", str(recipe), f"output_dir={out}", *extra])


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> Path:
    """An uninterrupted 4-step run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train(recipe, out) == 0
    return out


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    }


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted((out / "final").glob("*.safetensors")):
        tensors.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    assert tensors
    return tensors


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_records(out: Path) -> list[dict]:
    """metrics.jsonl's training records, without the timings (which differ from run to run)."""
    return [
        {k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_second"}
        for r in records(out / "metrics.jsonl")
        if "objective/scores" in r
    ]


def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner_module, "load_models", refuse)
    monkeypatch.setattr(runner_module, "load_tokenizer", refuse)


class Killed(RuntimeError):
    """Stands for a kill -9 in the middle of a run."""


def kill_before_step(monkeypatch, step: int) -> None:
    """PGTrainer.step() raises Killed when asked for ``step`` (the steps before it are done, logged and saved)."""
    original = PGTrainer.step

    def step_or_die(self):
        if self.global_step + 1 == step:
            raise Killed(f"killed before step {step}")
        return original(self)

    monkeypatch.setattr(PGTrainer, "step", step_or_die)


# ---- a used output_dir ----------------------------------------------------------------------------------------------
def test_a_used_output_dir_is_refused_in_one_line_naming_both_ways_out_and_left_untouched(
    recipe, reference, tmp_path, capsys, monkeypatch
):
    before = snapshot(reference)
    assert {"checkpoint-2/trainer_state.json", "metrics.jsonl", "samples.jsonl", "config.yaml"} <= set(before)
    capsys.readouterr()
    no_model_loads(monkeypatch)  # refused before the tokenizer or any model loads
    assert train(recipe, reference, "max_steps=1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: output_dir {reference} already holds a run (checkpoint-2, checkpoint-4")
    for way_out in ("--resume", "resume_from_checkpoint: true", "overwrite_output_dir: true"):
        assert way_out in err, way_out
    assert snapshot(reference) == before  # config.yaml included: nothing was written


def test_pgtrainer_train_refuses_another_runs_folder_but_not_its_own_evaluations(tokenizer, tmp_path):
    def trainer(**overrides):
        cfg = PGConfig(**small_run(tmp_path, max_steps=1, **overrides))
        rows = [{"prompt": w} for w in WORDS[:8]]
        return PGTrainer(
            tiny_gpt2(tokenizer),
            tokenizer,
            cfg,
            train_dataset=rows,
            eval_dataset=rows[:4],
            reward_fn=lambda completions, **kw: [float(len(c)) for c in completions],
        )

    first = trainer()
    first.evaluate()  # its own metrics.jsonl line is no other run
    first.train()
    first.config.max_steps = 2
    first.train()  # the same trainer continues
    run = tmp_path / "run"
    assert [r["step"] for r in records(run / "metrics.jsonl")] == [0, 1, 2]
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl\): continue it with") as e:
        trainer().train()
    assert "resume_from_checkpoint=True" in str(e.value) and "overwrite_output_dir: true" in str(e.value)
    assert snapshot(run) == before
    (run / "notes.txt").write_text("mine")
    trainer(overwrite_output_dir=True).train()
    assert [r["step"] for r in records(run / "metrics.jsonl")] == [1]  # the old lines are gone
    assert (run / "notes.txt").read_text() == "mine"


def test_overwrite_output_dir_clears_the_previous_run_and_keeps_the_users_files(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(recipe, out, "max_steps=2", "save_steps=1") == 0
    (out / "notes.txt").write_text("my notes")
    (out / "data").mkdir()
    (out / "data" / "metrics.jsonl").write_text("kept\n")
    (out / "checkpoint-notes.md").write_text("not a checkpoint folder")
    (out / ".checkpoint-3.tmp").mkdir()  # a checkpoint write a kill interrupted
    (out / "checkpoint-1-best").mkdir()  # the user's copy
    assert train(recipe, out, "max_steps=1", "save_steps=1", "overwrite_output_dir=true") == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-1-best",
        "checkpoint-notes.md",
    ]
    assert not (out / ".checkpoint-3.tmp").exists()
    assert [r["step"] for r in train_records(out)] == [1]
    assert {r["step"] for r in records(out / "samples.jsonl")} == {1}
    assert (out / "notes.txt").read_text() == "my notes" and (out / "data" / "metrics.jsonl").read_text() == "kept\n"
    saved = (out / "config.yaml").read_text()
    assert "overwrite_output_dir: false" in saved and "max_steps: 1" in saved  # the run's config, not how it began


def test_run_artifacts_are_exactly_what_hfpg_writes(tmp_path):
    ours = ["config.yaml", "metrics.jsonl", "samples.jsonl", "eval.json", "report.md", "reward_kl.png"]
    for name in ours:
        (tmp_path / name).write_text("x")
    for name in ("checkpoint-2", "checkpoint-10", ".checkpoint-12.tmp", "final", "runs"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    theirs = ["notes.txt", "checkpoint-notes.md", "final.txt", "runs.csv", "metrics.jsonl.bak", "checkpoint"]
    for name in theirs:
        (tmp_path / name).write_text("x")
    for name in ("final_model", "checkpoint-2-best"):
        (tmp_path / name).mkdir()
    assert run_artifacts(str(tmp_path))[:3] == ["checkpoint-2", "checkpoint-10", ".checkpoint-12.tmp"]
    assert set(run_artifacts(str(tmp_path))) == {
        *ours,
        "checkpoint-2",
        "checkpoint-10",
        ".checkpoint-12.tmp",
        "final",
        "runs",
    }
    assert previous_run(str(tmp_path)) == [
        "checkpoint-2",
        "checkpoint-10",
        ".checkpoint-12.tmp",
        "final",
        "metrics.jsonl",
        "samples.jsonl",
    ]
    clear_run(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*theirs, "final_model", "checkpoint-2-best"])
    assert previous_run(str(tmp_path / "missing")) == [] and run_artifacts(str(tmp_path / "missing")) == []


# ---- resume -------------------------------------------------------------------------------------------------------
def test_a_killed_run_resumed_ends_as_the_uninterrupted_run(recipe, reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    kill_before_step(monkeypatch, 4)  # after step 3: checkpoint-2 on disk, steps 1-3 in metrics and samples
    with pytest.raises(Killed):
        train(recipe, out)
    monkeypatch.undo()
    assert [r["step"] for r in train_records(out)] == [1, 2, 3] and (out / "checkpoint-2").is_dir()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "objective/sco')  # a line the kill cut in half
    capsys.readouterr()
    assert train(recipe, out, "--resume") == 0
    assert str(out / "report.md") in capsys.readouterr().out
    got, want = final_weights(out), final_weights(reference)
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []  # bit-identical
    assert train_records(out) == train_records(reference)  # steps 1, 2, 3, 4, each once, same values
    assert [r["step"] for r in train_records(out)] == [1, 2, 3, 4]
    evals = [r["step"] for r in records(out / "metrics.jsonl") if "eval/scores" in r]
    assert evals == [0, 4]  # the "before" evaluation was read back, not run again
    assert records(out / "samples.jsonl") == records(reference / "samples.jsonl")
    assert json.loads((out / "eval.json").read_text()) == json.loads((reference / "eval.json").read_text())
    report = (out / "report.md").read_text()
    assert report == (reference / "report.md").read_text()
    assert "| eval/scores |" in report and "## Samples" in report and (out / "reward_kl.png").is_file()


def test_resume_with_more_max_steps_continues_the_run(recipe, tmp_path, capsys, caplog):
    constant = "lr_scheduler_type=constant"  # a linear schedule would be stretched over the new max_steps
    straight = tmp_path / "straight"
    assert train(recipe, straight, constant) == 0
    out = tmp_path / "run"
    assert train(recipe, out, constant, "max_steps=2") == 0
    assert [r["step"] for r in train_records(out)] == [1, 2]
    with caplog.at_level(logging.WARNING, logger="hfpg.rundir"):
        # `--resume max_steps=4`: the override after the flag is an override, not a checkpoint
        assert train(recipe, out, constant, "save_total_limit=5", "--resume", "max_steps=4") == 0
    assert "changed settings" not in caplog.text  # max_steps under a constant schedule, save_total_limit: harmless
    got, want = final_weights(out), final_weights(straight)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    assert train_records(out) == train_records(straight)
    assert "max_steps: 4" in (out / "config.yaml").read_text()  # the run's config now says how far it goes
    assert "| eval/scores |" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "change,named",
    [
        ("seed=1", "seed was 0, now 1"),
        ("rollout_batch_size=8", "rollout_batch_size was 4, now 8"),
        ("data.eval_size=2", "data.eval_size was 4, now 2"),
        ("max_steps=1", "max_steps=1 is below the checkpoint's step 4"),
    ],
)
def test_resume_refuses_a_change_the_checkpoint_cannot_continue_with(
    recipe, reference, change, named, capsys, monkeypatch
):
    before = snapshot(reference)
    no_model_loads(monkeypatch)
    capsys.readouterr()
    assert train(recipe, reference, change, "--resume") == 2
    err = capsys.readouterr().err
    assert f"cannot resume {reference / 'checkpoint-4'} with a changed config" in err and named in err
    assert snapshot(reference) == before


def test_resume_problems_allow_schedule_and_reporting_changes_and_warn_about_the_rest():
    saved = {"model": {"name_or_path": "a", "peft": {"r": 8}}, "data": {"path": "p"}, "report": {"num_samples": 4}}
    saved.update(
        max_steps=4, logging_steps=1, save_steps=2, report_to=[], learning_rate=1e-5, lr_scheduler_type="linear"
    )
    same = json.loads(json.dumps(saved))
    assert resume_problems(saved, same, 2) == ([], [])
    free = {**same, "max_steps": 8, "logging_steps": 5, "save_steps": 4, "report_to": ["tensorboard"]}
    free["report"] = {"num_samples": 2}
    problems, changes = resume_problems(saved, free, 2)
    assert problems == [] and changes == ["max_steps 4 -> 8 (the linear schedule now spans it)"]
    changed = {**same, "learning_rate": 2e-5, "model": {"name_or_path": "a", "peft": {"r": 16}}}
    problems, changes = resume_problems(saved, changed, 2)
    assert problems == ["model.peft was {'r': 8}, now {'r': 16}: the checkpoint holds the weights of the other adapter"]
    assert changes == ["learning_rate 1e-05 -> 2e-05"]


def test_resume_without_a_checkpoint_is_a_clear_error(recipe, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    assert train(recipe, fresh, "--resume") == 2
    err = capsys.readouterr().err
    assert f"--resume: {fresh} holds no complete checkpoint-N folder" in err and "without --resume" in err
    assert not fresh.exists()
    unsaved = tmp_path / "unsaved"
    assert train(recipe, unsaved, "max_steps=1", "save_steps=0") == 0
    capsys.readouterr()
    assert train(recipe, unsaved, "--resume") == 2
    assert "overwrite_output_dir: true" in capsys.readouterr().err  # this folder holds a run: the way to start over
    assert train(recipe, unsaved, "--resume", "checkpoint-7") == 2
    assert "resume_from_checkpoint='checkpoint-7' is not a folder" in capsys.readouterr().err


def test_resume_and_overwrite_together_are_a_config_error(recipe, tmp_path, capsys):
    assert train(recipe, tmp_path / "run", "overwrite_output_dir=true", "--resume") == 2
    assert "set one of them" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="set one of them"):
        PGConfig(resume_from_checkpoint="out/checkpoint-2", overwrite_output_dir=True)


def test_pgtrainer_resume_drops_the_records_after_the_checkpoint(tokenizer, tmp_path):
    def trainer():
        cfg = PGConfig(**small_run(tmp_path, max_steps=4, save_steps=2))
        rows = [{"prompt": w} for w in WORDS[:8]]
        return PGTrainer(
            tiny_gpt2(tokenizer),
            tokenizer,
            cfg,
            train_dataset=rows,
            reward_fn=lambda completions, **kw: [1.0] * len(completions),
        )

    first = trainer()
    first.config.max_steps = 3  # the run "dies" after step 3; checkpoint-2 is its newest
    first.train()
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert [r["step"] for r in records(metrics)] == [1, 2, 3]
    resumed = trainer()
    resumed.config.resume_from_checkpoint = True  # the config's key, when train() is given none
    resumed.train()
    assert resumed.global_step == 4 and [r["step"] for r in resumed.log_history] == [3, 4]
    assert [r["step"] for r in records(metrics)] == [1, 2, 3, 4]
    assert not [cb for cb in resumed.callbacks if type(cb).__module__ == "hfpg.rundir"]  # it went after its one use


def test_drop_records_after_rewrites_only_when_something_goes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"note": "no step"}\n')
    mtime = path.stat().st_mtime_ns
    assert drop_records_after(str(path), 2) == 0 and path.stat().st_mtime_ns == mtime
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "x"')
    assert drop_records_after(str(path), 2) == 2
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    assert drop_records_after(str(tmp_path / "missing.jsonl"), 2) == 0
