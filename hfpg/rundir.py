"""One run per output directory: a run starts in a fresh ``output_dir``, continues one (``resume_from_checkpoint`` /
``hfpg train --resume``) or clears it first (``overwrite_output_dir``); never two runs mixed in one folder.

- :func:`previous_run` names what marks a folder as used (checkpoints, metrics.jsonl, samples.jsonl, final/);
- :func:`check_fresh_or_resume` refuses a used folder in one line naming the two ways out, or clears it;
- :func:`run_artifacts` / :func:`clear_run`: exactly what hfpg writes there, and nothing a user put beside it;
- :func:`resume_problems`: what a resumed recipe may change (max_steps, logging, ...) and what it may not (batch
  sizes, seed, algorithm, model, data): the checkpoint's state was built for those;
- :func:`drop_records_after`: a resumed run's metrics.jsonl / samples.jsonl read as one run (each step once).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any

import yaml

from .callbacks import TrainerCallback
from .errors import ConfigError
from .saving import latest_checkpoint

logger = logging.getLogger(__name__)

RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "eval.json", "report.md", "reward_kl.png")
RUN_FOLDERS = ("final", "runs")
LOGS = ("metrics.jsonl", "samples.jsonl")  # step records a resumed run continues
# checkpoint-N, and the folders hfpg writes a checkpoint into or deletes it from (.checkpoint-N.tmp,
# .checkpoint-N.deleting; transformers' tmp-checkpoint-N): never a name a person gives a copy (checkpoint-2-best)
_CHECKPOINT = re.compile(r"checkpoint-\d+|\.checkpoint-\d+\.[a-z]+|tmp-checkpoint-\d+")
_MARKERS = ("metrics.jsonl", "samples.jsonl", "final")  # with any checkpoint: another run was here


def _is_checkpoint(output_dir: str, name: str) -> bool:
    return bool(_CHECKPOINT.fullmatch(name)) and os.path.isdir(os.path.join(output_dir, name))


def run_artifacts(output_dir: str) -> list[str]:
    """The names in ``output_dir`` that a run writes (checkpoints, temporary checkpoint folders, metrics, samples,
    eval.json, report.md, the plot, TensorBoard's runs/, final/, config.yaml), sorted; [] for a missing folder."""
    if not os.path.isdir(output_dir):
        return []
    names = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if (
            (name in RUN_FILES and os.path.isfile(path))
            or (name in RUN_FOLDERS and os.path.isdir(path))
            or _is_checkpoint(output_dir, name)
        ):
            names.append(name)
    return sorted(names, key=_order)


def _order(name: str) -> tuple:
    m = re.search(r"checkpoint-(\d+)", name)
    return (0, int(m.group(1)), name) if m else (1, 0, name)


def previous_run(output_dir: str) -> list[str]:
    """What shows that another run used ``output_dir``: its checkpoints, metrics.jsonl, samples.jsonl, final/."""
    return [n for n in run_artifacts(output_dir) if n in _MARKERS or _CHECKPOINT.fullmatch(n)]


def clear_run(output_dir: str) -> list[str]:
    """Delete every :func:`run_artifacts` entry of ``output_dir`` (and nothing else); returns the names deleted."""
    removed = run_artifacts(output_dir)
    for name in removed:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return removed


def used_directory_message(output_dir: str, found: list[str]) -> str:
    """The one-line refusal to start a run in a used ``output_dir``, naming both ways out."""
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    return (
        f"output_dir {output_dir} already holds a run ({shown}): continue it with `hfpg train ... --resume` "
        f"(resume_from_checkpoint: true or a checkpoint path; train(resume_from_checkpoint=True) in Python), or "
        f"start over with overwrite_output_dir: true (deletes that run's checkpoints, metrics, samples, report and "
        f"final model), or choose another output_dir"
    )


def check_fresh_or_resume(
    output_dir: str,
    resume: bool | str | None = None,
    overwrite: bool = False,
    *,
    found: list[str] | None = None,
    clear: bool = True,
) -> list[str]:
    """Whether a run may start in ``output_dir``: resuming one, in a folder no run used, or (``overwrite``) after
    clearing the previous run's artefacts (only when ``clear``: the main process). Returns the names cleared.

    found: what marked the folder as used (default: :func:`previous_run` now). Raises :class:`ConfigError` (one
    line naming ``--resume`` / ``resume_from_checkpoint`` and ``overwrite_output_dir``) for a used folder."""
    if resume:
        return []
    found = previous_run(output_dir) if found is None else found
    if not found:
        return []
    if not overwrite:
        raise ConfigError(used_directory_message(output_dir, found))
    if not clear:
        return []
    removed = clear_run(output_dir)
    logger.warning("overwrite_output_dir: deleted the previous run's %s from %s", ", ".join(removed), output_dir)
    return removed


# ---- resuming ------------------------------------------------------------------------------------------------------
def resolve_checkpoint(output_dir: str, resume: bool | str) -> str:
    """The checkpoint folder ``resume`` names: True = the newest ``checkpoint-N`` in ``output_dir`` (what
    ``load_checkpoint(True)`` reads, and verifies); a path (or a folder name inside ``output_dir``, e.g.
    ``checkpoint-200``). A clear :class:`ConfigError` when ``output_dir`` holds no complete checkpoint at all."""
    if resume is True:
        if latest_checkpoint(output_dir) is None:
            raise ConfigError(
                f"--resume: {output_dir} holds no complete checkpoint-N folder to continue from (checkpoints are "
                f"written every save_steps steps; save_steps=0 writes none): start the run without --resume"
                + (" and with overwrite_output_dir: true" if previous_run(output_dir) else "")
            )
        named = [os.path.join(output_dir, n) for n in os.listdir(output_dir) if checkpoint_step(n) is not None]
        return max((p for p in named if os.path.isdir(p)), key=checkpoint_step)
    path = str(resume)
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, path)):
        path = os.path.join(output_dir, path)
    if not os.path.isdir(path):
        raise ConfigError(
            f"resume_from_checkpoint={resume!r} is not a folder: give a checkpoint-N folder of {output_dir}, or "
            f"true for its newest"
        )
    return path


def checkpoint_step(path: str) -> int | None:
    """The step of a ``checkpoint-N`` folder, from its name (None for another name)."""
    m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


# keys a resumed run must keep: the checkpoint's state (sampler position, optimizer, baselines, weights) was built
# for them, and a run continued with another value is no longer the run it continues
_BATCH = "a step's batch, its minibatches and the prompt sampler's position in the checkpoint are counted in it"
FIXED: dict[str, str] = {
    "rollout_batch_size": _BATCH,
    "mini_batch_size": _BATCH,
    "gradient_accumulation_steps": _BATCH,
    "num_samples_per_prompt": _BATCH,
    "seed": "the prompt order and the sampling come from the seed the checkpoint's sampler and RNG were built with",
    "algorithm": "the checkpoint holds the state of the other update rule",
    "advantage_estimator": "the checkpoint holds the state of the other advantage estimator",
    "baseline": "the checkpoint holds the state of the other baseline",
    "replay_buffer_size": "the checkpoint holds (or lacks) the replay buffer",
    "model.name_or_path": "the checkpoint holds the weights of the other model",
    "model.gguf_file": "the checkpoint holds the weights of the other model",
    "model.tokenizer": "the checkpoint's policy was trained on the other tokenizer's ids",
    "model.peft": "the checkpoint holds the weights of the other adapter",
    "data.": "the checkpoint's prompt sampler indexes the other data",
}
# keys a resumed run may change freely: when to log, evaluate, save and push, and where to report
FREE = {
    "output_dir",
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "max_steps",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "report_to",
    "disable_tqdm",
    "push_to_hub",
    "hub_model_id",
    "hub_private_repo",
    "hub_revision",
    "report.",
}


def _flat(recipe: dict) -> dict[str, Any]:
    """A recipe mapping with its sections' keys dotted (``model.peft`` stays one value), as YAML reads it back."""
    recipe = yaml.safe_load(yaml.safe_dump(recipe, sort_keys=False)) or {}
    flat = {}
    for key, value in recipe.items():
        if key in ("model", "data", "report") and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _rule(key: str, rules) -> Any:
    for name in rules:
        if key == name or (name.endswith(".") and key.startswith(name)):
            return rules[name] if isinstance(rules, dict) else True
    return None


def resume_problems(saved: dict, now: dict, step: int | None = None) -> tuple[list[str], list[str]]:
    """(problems, changes) of continuing the run that ``saved`` (its config.yaml) describes with the recipe ``now``.

    problems: each changed key the checkpoint cannot continue with, its old and new value and why; a max_steps
    below the checkpoint's ``step``. changes: the other changed keys (learning_rate, ...), which a resumed run
    takes, and a max_steps that stretches a decaying learning-rate schedule. Keys only one side has are skipped."""
    old, new = _flat(saved), _flat(now)
    problems, changes = [], []
    for key, after in new.items():
        if key not in old or old[key] == after:
            continue
        before, reason = old[key], _rule(key, FIXED)
        if reason:
            problems.append(f"{key} was {before!r}, now {after!r}: {reason}")
        elif key == "max_steps":
            if step is not None and after < step:
                problems.append(f"max_steps={after} is below the checkpoint's step {step}")
            elif new.get("lr_scheduler_type") not in ("constant", "constant_with_warmup"):
                changes.append(f"max_steps {before} -> {after} (the {new['lr_scheduler_type']} schedule now spans it)")
        elif not _rule(key, FREE):
            changes.append(f"{key} {before!r} -> {after!r}")
    return problems, changes


def check_resume(output_dir: str, recipe: dict, checkpoint: str) -> None:
    """Refuse (one :class:`ConfigError` listing them all) changes to the saved ``output_dir/config.yaml`` that the
    ``checkpoint`` cannot continue with; warn about the other changes. Without a config.yaml nothing is compared."""
    path = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(path):
        logger.warning("%s has no config.yaml: resuming from %s without comparing configs", output_dir, checkpoint)
        return
    with open(path) as f:
        saved = yaml.safe_load(f) or {}
    problems, changes = resume_problems(saved, recipe, checkpoint_step(checkpoint))
    if problems:
        head = f"cannot resume {checkpoint} with a changed config (the run's is {path})"
        tail = "keep the run's values, or start a new run (another output_dir, or overwrite_output_dir: true)"
        if len(problems) == 1:
            raise ConfigError(f"{head}: {problems[0]}; {tail}", problems)
        raise ConfigError(f"{head}; {tail}:\n" + "\n".join(f"  - {p}" for p in problems), problems)
    if changes:
        logger.warning("resuming %s with changed settings: %s", checkpoint, "; ".join(changes))


def drop_records_after(path: str, step: int) -> int:
    """Rewrite the JSON-lines file ``path`` (atomically) without its records of steps after ``step`` and without a
    line a killed run left half-written; returns how many lines went. Nothing is written when none goes."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        text = f.read()
    lines = text.splitlines()
    kept, torn = [], False
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn = True
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            continue
        kept.append(line)
    dropped = len([line for line in lines if line.strip()]) - len(kept)
    if dropped or torn or (lines and not text.endswith("\n")):
        write_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old file or the new one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str) -> dict:
    """A JSON object from ``path``; {} when it is missing or unreadable."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


# ---- PGTrainer -----------------------------------------------------------------------------------------------------
_STARTED = "_hfpg_run_dir_started"  # set on a PGTrainer once its output_dir was checked (by train() or a RecipeRun)
_FOUND = "_hfpg_run_dir_found"  # what marked output_dir as used before the trainer first wrote there


def before_first_write(trainer) -> None:
    """PGTrainer.log(): remember what ``output_dir`` held before this trainer wrote to it (its own evaluate()
    before train() is no other run)."""
    if not hasattr(trainer, _FOUND) and not getattr(trainer, _STARTED, False):
        setattr(trainer, _FOUND, previous_run(trainer.config.output_dir))


def mark_started(trainer) -> None:
    """The trainer's output_dir was already checked (a RecipeRun does it before any model loads)."""
    setattr(trainer, _STARTED, True)


def start_training(trainer, resume: bool | str | None) -> bool | str | None:
    """PGTrainer.train(): the checkpoint to resume (``resume``, else ``config.resume_from_checkpoint``). The first
    time, the output_dir must be fresh, resumed or (``overwrite_output_dir``) cleared: the main process decides and
    every process raises the same :class:`ConfigError`. On resume, metrics.jsonl / samples.jsonl lose the records
    after the checkpoint's step once it is loaded (``on_train_begin``)."""
    cfg = trainer.config
    resume = cfg.resume_from_checkpoint if resume is None else resume
    acc = trainer.accelerator
    if not getattr(trainer, _STARTED, False):
        error = None
        if acc.is_main_process:
            try:
                check_fresh_or_resume(
                    cfg.output_dir, resume, cfg.overwrite_output_dir, found=getattr(trainer, _FOUND, None)
                )
            except ConfigError as e:
                error = str(e)
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error is not None:
            raise ConfigError(error)
        acc.wait_for_everyone()
        mark_started(trainer)
    if resume:
        trainer.callbacks.append(_DropRecordsAfterCheckpoint())
    return resume


def drop_logs_after(output_dir: str, step: int) -> None:
    """metrics.jsonl and samples.jsonl of ``output_dir`` without the records of steps after ``step`` (a resumed run
    logs them again) nor a line cut in half by a kill."""
    for name in LOGS:
        path = os.path.join(output_dir, name)
        dropped = drop_records_after(path, step)
        if dropped:
            logger.info("resume: dropped %d line(s) after step %d from %s", dropped, step, path)


class _DropRecordsAfterCheckpoint(TrainerCallback):
    """Once, when a resumed run begins (the checkpoint loaded): drop the log records of steps after its step."""

    def on_train_begin(self, trainer) -> None:
        trainer.callbacks.remove(self)
        if trainer.accelerator.is_main_process:
            drop_logs_after(trainer.config.output_dir, trainer.global_step)
