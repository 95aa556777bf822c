"""The reward protocol and the checks every reward output passes through before it can reach an update."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Protocol, Sequence, runtime_checkable

import torch


class RewardError(ValueError):
    """A reward function returned something unusable; the message names the function and the batch."""


@runtime_checkable
class RewardFunction(Protocol):
    """``fn(prompts, completions, **columns) -> list[float]``: one score per completion.

    ``columns`` holds the dataset's other columns for the same rows (e.g. ``references``), so a reward can read
    per-row data. Plain functions, TRL reward functions and objects with ``__call__`` all fit. A function that
    does not use the columns should still accept ``**kwargs``.
    """

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> Sequence[float]: ...


def reward_name(fn) -> str:
    """A readable name for messages and metric keys: ``name`` attribute, function name or class name."""
    if isinstance(fn, functools.partial):
        return reward_name(fn.func)
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return str(name)


def compute_scores(
    fn, prompts: list[str], completions: list[str], columns: dict[str, list], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Call ``fn`` and check its output: one finite number per completion. Returns a (B,) fp32 tensor."""
    name = reward_name(fn)
    n = len(completions)
    try:
        out = fn(prompts=prompts, completions=completions, **columns)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise RewardError(
                f"reward function {name!r} does not accept the keyword arguments it is called with ({e}). "
                f"Rewards are called as fn(prompts=..., completions=..., **columns) with the dataset's other columns "
                f"{sorted(columns)}; add **kwargs to its signature."
            ) from e
        raise
    if isinstance(out, torch.Tensor):
        out = out.detach().float().flatten().cpu().tolist()
    elif hasattr(out, "tolist") and not isinstance(out, (str, bytes)):  # numpy arrays
        out = out.tolist()
    if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
        raise RewardError(
            f"reward function {name!r} returned {type(out).__name__} for a batch of {n} completions; "
            f"it must return a list of {n} floats"
        )
    if len(out) != n:
        raise RewardError(
            f"reward function {name!r} returned {len(out)} values for a batch of {n} completions; "
            f"it must return exactly one float per completion"
        )
    bad_type = [i for i, v in enumerate(out) if isinstance(v, bool) or not isinstance(v, numbers.Real)]
    if bad_type:
        i = bad_type[0]
        raise RewardError(
            f"reward function {name!r} returned a non-numeric value {out[i]!r} ({type(out[i]).__name__}) at row {i} "
            f"of a batch of {n} ({len(bad_type)} such rows); it must return floats"
        )
    bad = [i for i, v in enumerate(out) if not math.isfinite(float(v))]
    if bad:
        raise RewardError(
            f"reward function {name!r} returned {len(bad)} non-finite value(s) (NaN/inf) in a batch of {n}, "
            f"first at row {bad[0]} (completion {completions[bad[0]][:60]!r}); no update was made"
        )
    return torch.tensor([float(v) for v in out], dtype=torch.float32, device=device)
