"""The reward protocol, a small base class for built-ins, and the checks every reward output passes through."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import RewardError

__all__ = ["Reward", "RewardError", "RewardFunction", "check_outputs", "check_scores", "get_references", "reward_name"]


@runtime_checkable
class RewardFunction(Protocol):
    """``fn(prompts, completions, **kwargs) -> list[float | None]``: one score per completion, TRL's contract.

    hfpg calls it with keywords only: ``prompts``, ``completions``, ``completion_ids``, ``trainer_state``,
    ``log_metric``, ``log_extra`` and the dataset's other columns (e.g. ``references``); a function without
    ``**kwargs`` gets only the names in its signature (see :mod:`hfpg.rewards.calling`). ``None`` marks a sample the
    reward does not apply to. Plain functions, ``async def`` functions, TRL's ``trl.rewards`` and objects with
    ``__call__`` all fit.
    """

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> Sequence[float | None]: ...


class Reward:
    """Base class of hfpg's built-in rewards: a :class:`RewardFunction` with a ``name`` and optional hooks.

    Built-ins read text (``reads_text``): with conversational data they receive the prompts as the policy saw them
    (chat template applied) and the completions as strings. ``setup(device, gather)`` is called once by the trainer:
    models move to ``device`` there (never wrapped by DDP); ``gather`` concatenates a tensor over all processes
    (identity on one process), for statistics that must agree across processes.
    """

    name: str = "reward"
    reads_text: bool = True

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        raise NotImplementedError

    def setup(self, device: torch.device | str | None = None, gather: Callable | None = None) -> None:
        """Prepare for scoring on ``device`` (load and move models, remember ``gather``)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def reward_name(fn) -> str:
    """A readable name for messages and metric keys: ``name`` attribute, function name or class name."""
    if isinstance(fn, functools.partial):
        return reward_name(fn.func)
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return str(name)


def setup_reward(fn, device=None, gather: Callable | None = None) -> None:
    """Call ``fn.setup(device, gather)`` when the reward has such a hook (built-ins and CombinedReward do)."""
    setup = getattr(fn, "setup", None)
    if callable(setup):
        setup(device=device, gather=gather)


def get_column(columns: dict[str, list], column: str, reward: str, n: int) -> list:
    """Dataset column ``column`` for the batch's ``n`` rows, as stored; a clear error when it is missing or short."""
    if column not in columns:
        raise RewardError(
            f"reward {reward!r} reads references from the dataset column {column!r}, but the rows have only "
            f"{sorted(columns)}; add that column or pass references_column=<one of them>"
        )
    values = columns[column]
    if len(values) != n:
        raise RewardError(f"reward {reward!r}: column {column!r} has {len(values)} values for {n} completions")
    return list(values)


def get_references(columns: dict[str, list], column: str, reward: str, n: int) -> list[list[str]]:
    """The references of each row as a list of strings (one or several per row) from dataset column ``column``."""
    values = get_column(columns, column, reward, n)
    refs = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            refs.append([v])
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
            refs.append(list(v))
        else:
            raise RewardError(
                f"reward {reward!r}: row {i} of column {column!r} must be a string or a non-empty list of strings, "
                f"got {v!r}"
            )
    return refs


def check_outputs(
    out, name: str, completions: Sequence[str], allow_nonfinite: bool = False, allow_none: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a reward's output — one real number (or ``None``: "not applicable") per completion.

    Returns ``(scores, applicable)``: (B,) fp32 CPU scores, NaN where the reward returned ``None``, and the (B,) bool
    mask of the others. Non-finite numbers are an error unless ``allow_nonfinite`` (the caller replaces and counts
    them); ``None`` is an error unless ``allow_none``.
    """
    n = len(completions)
    shape = getattr(out, "shape", None)
    if shape is not None and not isinstance(out, (str, bytes)) and hasattr(out, "tolist"):  # tensors, numpy arrays
        shape = tuple(int(d) for d in shape)
        # one value per completion: (B,), or (B, 1) as a one-output model's logits come
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1) or (shape == () and n == 1)):
            raise RewardError(
                f"reward function {name!r} must return one value per completion (shape ({n},) for a batch of {n}), "
                f"got an array of shape {shape}; return one score per completion instead of reshaping"
            )
        if isinstance(out, torch.Tensor):
            out = out.detach().float().cpu().reshape(-1).tolist()
        else:  # numpy, pandas, ...
            out = out.tolist()
            out = [out] if not isinstance(out, list) else [v[0] if isinstance(v, list) else v for v in out]
    elif isinstance(out, Sequence) and not isinstance(out, (str, bytes)):
        nested = next((v for v in out if isinstance(v, (list, tuple)) or hasattr(v, "shape")), None)
        if nested is not None and (not hasattr(nested, "shape") or getattr(nested, "ndim", 0) > 0):
            raise RewardError(
                f"reward function {name!r} must return one value per completion (a flat list of {n} floats for a "
                f"batch of {n}), got a nested list of shape {_nested_shape(out)}"
            )
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
    bad_type = [
        i
        for i, v in enumerate(out)
        if (v is not None or not allow_none) and (isinstance(v, bool) or not isinstance(v, numbers.Real))
    ]
    if bad_type:
        i = bad_type[0]
        raise RewardError(
            f"reward function {name!r} returned a non-numeric value {out[i]!r} ({type(out[i]).__name__}) at row {i} "
            f"of a batch of {n} ({len(bad_type)} such rows); it must return floats"
            + (" (or None for a sample it does not apply to)" if allow_none else "")
        )
    if not allow_nonfinite:
        bad = [i for i, v in enumerate(out) if v is not None and not math.isfinite(float(v))]
        if bad:
            shown = completions[bad[0]]
            raise RewardError(
                f"reward function {name!r} returned {len(bad)} non-finite value(s) (NaN/inf) in a batch of {n}, "
                f"first at row {bad[0]} (completion {str(shown)[:60]!r}); no update was made"
            )
    applicable = torch.tensor([v is not None for v in out], dtype=torch.bool)
    scores = torch.tensor([float("nan") if v is None else float(v) for v in out], dtype=torch.float32)
    return scores, applicable


def _nested_shape(out) -> tuple:
    """The shape of a nested list as numpy would read it (ragged rows: their first row's length)."""
    shape = []
    while isinstance(out, (list, tuple)) or hasattr(out, "shape"):
        if hasattr(out, "shape") and not isinstance(out, (list, tuple)):
            return (*shape, *(int(d) for d in out.shape))
        shape.append(len(out))
        if not out:
            break
        out = out[0]
    return tuple(shape)


def check_scores(out, name: str, completions: Sequence[str], allow_nonfinite: bool = False) -> torch.Tensor:
    """:func:`check_outputs` for a reward that must score every completion: a (B,) fp32 CPU tensor."""
    return check_outputs(out, name, completions, allow_nonfinite, allow_none=False)[0]
