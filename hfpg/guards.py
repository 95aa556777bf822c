"""Guards against non-finite numbers: find NaN/inf weights, and stop a run whose updates keep going non-finite.

- :func:`nonfinite_parameters` names the parameters and buffers holding NaN or infinity (one ``isfinite`` per tensor,
  one device sync per device), e.g. before a checkpoint is written; :func:`check_finite` raises on any.
- :func:`nonfinite_streak` counts consecutive updates that skipped an optimizer step on a non-finite loss or gradient
  (the update rules' ``policy/nonfinite_steps``) and raises once ``max_nonfinite_steps`` is reached — from the
  trainer's ``step()``, so before anything of that step is logged or saved.
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict

import torch

from .errors import TrainingError

logger = logging.getLogger(__name__)

#: how many names a message lists before "..."
SHOWN = 5


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (an FSDP2 DTensor's local shard; any other tensor as it is)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


@torch.no_grad()
def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of ``model``'s floating-point parameters and buffers that hold a NaN or an infinity, in module order.

    Sharded models (ZeRO-3, FSDP) are checked on this process's shard only: reduce the result over processes when
    every process must agree. Tensors on the meta device (not materialised) are skipped."""
    named = [
        (name, _local(t))
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
        if t is not None
    ]
    named = [(n, t) for n, t in named if (t.is_floating_point() or t.is_complex()) and t.device.type != "meta"]
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, (_, t) in enumerate(named):
        by_device[t.device].append(i)
    bad: list[int] = []
    for idx in by_device.values():
        finite = torch.stack([torch.isfinite(named[i][1]).all() for i in idx]).tolist()  # one sync per device
        bad.extend(i for i, ok in zip(idx, finite) if not ok)
    return [named[i][0] for i in sorted(bad)]


def check_finite(model: torch.nn.Module, what: str) -> None:
    """Raise :class:`~hfpg.errors.TrainingError` if any parameter or buffer of ``model`` holds NaN or infinity.

    what: what was about to happen, for the message (e.g. ``"saving checkpoint-40"``)."""
    bad = nonfinite_parameters(model)
    if not bad:
        return
    shown = ", ".join(bad[:SHOWN]) + (", ..." if len(bad) > SHOWN else "")
    raise TrainingError(
        f"{what}: {len(bad)} parameter(s)/buffer(s) of the model hold NaN or infinity ({shown}); the weights are "
        "broken, so nothing was written. Resume from an earlier checkpoint with a lower learning_rate, max_grad_norm "
        "set, and a reward without huge values (score_clip / reward_clip bound it)."
    )


def nonfinite_streak(previous: int, metrics: dict[str, float], config) -> int:
    """The number of consecutive updates, ending with this one, that skipped an optimizer step on a non-finite loss
    or gradient: ``previous + 1`` when ``metrics["policy/nonfinite_steps"]`` > 0, else 0.

    Logs a warning for each such update; raises :class:`~hfpg.errors.TrainingError` when the streak reaches
    ``config.max_nonfinite_steps`` (0 = never). The skipped steps left the weights as they were, so the model
    still holds the last finite ones."""
    skipped = metrics.get("policy/nonfinite_steps", 0.0)
    if not skipped:
        return 0
    streak = previous + 1
    limit = config.max_nonfinite_steps
    score = metrics.get("objective/scores")
    score_note = f"; this batch's mean score was {score:.4g}" if score is not None else ""
    logger.warning(
        "skipped %d optimizer step(s) of this update: the loss or the gradient norm was NaN or infinite "
        "(%d update(s) in a row%s%s)",
        int(skipped),
        streak,
        f", stopping at max_nonfinite_steps={limit}" if limit else "",
        score_note,
    )
    if limit and streak >= limit:
        clip = "max_grad_norm is not set" if config.max_grad_norm is None else f"max_grad_norm={config.max_grad_norm}"
        raise TrainingError(
            f"{streak} updates in a row skipped optimizer steps because the loss or the gradient was NaN or infinite "
            f"(policy/nonfinite_steps; max_nonfinite_steps={limit}){score_note}. The skipped steps did not touch the "
            f"weights, so the model still holds its last finite ones. Try a lower learning_rate (now "
            f"{config.learning_rate:g}), set max_grad_norm ({clip}), and check the reward for huge or non-finite "
            "values (score_clip / reward_clip bound them, score_scaling=running_std scales them); "
            "max_nonfinite_steps=0 never stops."
        )
    return streak
