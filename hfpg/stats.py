"""Statistics, in one place: moments of a batch (this process's or every process's), running moments, whitening.

One convention everywhere: a **variance is Bessel-corrected** (divided by n − 1, as ``torch.Tensor.std`` does by
default, TRL's ``whiten`` and GRPO's group std); it is 0 for fewer than two values. Advantage and reward whitening,
score scaling, reward normalisation, group baselines and every ``*/std`` metric use it.

Reductions across processes sum (count, Σx, Σx²) in float64 — one collective for any number of named quantities — so
the result is the same on 1 or N processes for the same global batch. Each one is a CPU-GPU sync point.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from . import ops


def global_sum(accelerator, x: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all processes (identity on one process or without an accelerator)."""
    if accelerator is None or accelerator.num_processes == 1:
        return x
    return accelerator.reduce(x.contiguous(), reduction="sum")


@dataclass(frozen=True)
class Moments:
    """Count, mean and the sum of squared deviations ``m2`` of a set of numbers; ``var = m2 / (count − 1)``."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    @property
    def var(self) -> float:
        """Bessel-corrected variance (0 for fewer than two values)."""
        return self.m2 / (self.count - 1) if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    @classmethod
    def from_sums(cls, count: float, total: float, total_sq: float) -> Moments:
        """From (n, Σx, Σx²); ``m2`` is clamped at 0 against rounding."""
        if count <= 0:
            return cls()
        mean = total / count
        return cls(count, mean, max(total_sq - count * mean * mean, 0.0))

    @classmethod
    def of(cls, x: torch.Tensor, mask: torch.Tensor | None = None) -> Moments:
        """Moments of ``x`` (at the positions where ``mask`` is True) on this process only."""
        return cls.from_sums(*_sums(x, mask).tolist())

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets together (Chan et al.'s parallel update: stable for any sizes)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / count
        return Moments(count, mean, self.m2 + other.m2 + delta * delta * self.count * other.count / count)


def _sums(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(n, Σx, Σx²) of ``x`` (where ``mask``), float64, on ``x``'s device: (3,)."""
    x = x.detach().double()
    if mask is None:
        return torch.stack(
            [torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device), x.sum(), (x * x).sum()]
        )
    mask = mask.bool()
    x = torch.where(mask, x, torch.zeros_like(x))
    return torch.stack([mask.sum().double(), x.sum(), (x * x).sum()])


def global_moments(
    accelerator,
    values: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str | None = None,
) -> dict[str, Moments]:
    """Moments of each named tensor over every process's values, in one reduction.

    values: ``{name: x}`` or ``{name: (x, mask)}`` (only positions where ``mask`` is True count). ``device``: where
    the reduction runs (default: the accelerator's device, else the first tensor's).
    """
    if not values:
        return {}
    if device is None:
        device = accelerator.device if accelerator is not None else None
    parts = []
    for value in values.values():
        x, mask = value if isinstance(value, tuple) else (value, None)
        parts.append(_sums(x, mask).to(device) if device is not None else _sums(x, mask))
    sums = global_sum(accelerator, torch.stack(parts)).tolist()  # (k, 3)
    return {name: Moments.from_sums(*s) for name, s in zip(values, sums)}


def global_whiten(accelerator, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """:func:`hfpg.ops.masked_whiten` with the mean and variance of ``x``'s real positions over all processes."""
    m = global_moments(accelerator, {"x": (x, mask)}, device=x.device)["x"]
    return ops.masked_whiten(
        x,
        mask,
        mean=torch.tensor(m.mean, device=x.device, dtype=x.dtype),
        var=torch.tensor(m.var, device=x.device, dtype=x.dtype),
        shift_mean=shift_mean,
    )


def explained_variance(returns: Moments, residual: Moments) -> float:
    """1 − Var[returns − values] / Var[returns]: 1 = perfect critic, 0 = a constant, < 0 = worse; NaN when the
    returns do not vary. Both moments over the same tokens, so the variance convention cancels."""
    return 1.0 - residual.var / returns.var if returns.var > 0 else float("nan")


class RunningMoments:
    """Moments of every value seen so far, merged batch by batch. Checkpointable (``state_dict``)."""

    def __init__(self) -> None:
        self.moments = Moments()

    @property
    def mean(self) -> float:
        return self.moments.mean

    @property
    def std(self) -> float:
        return self.moments.std

    @property
    def count(self) -> float:
        return self.moments.count

    def update(self, batch: torch.Tensor | Moments) -> Moments:
        """Fold a batch in (values, or their moments, e.g. from :func:`global_moments`); returns the batch's moments."""
        batch = batch if isinstance(batch, Moments) else Moments.of(batch)
        self.moments = self.moments.merge(batch)
        return batch

    def state_dict(self) -> dict:
        return {"count": self.moments.count, "mean": self.moments.mean, "m2": self.moments.m2}

    def load_state_dict(self, state: dict) -> None:
        count = float(state["count"])
        m2 = state["m2"] if "m2" in state else state["var"] * count  # checkpoints of hfpg 0.1.0 kept the biased var
        self.moments = Moments(count, float(state["mean"]), float(m2))


class MetricSums:
    """Accumulates (sum, count) pairs locally and reduces them across processes once, at the end."""

    def __init__(self) -> None:
        self.sums: dict[str, float | torch.Tensor] = defaultdict(float)
        self.counts: dict[str, float | torch.Tensor] = defaultdict(float)

    def add(self, name: str, total, count) -> None:
        self.sums[name] = self.sums[name] + (total.detach() if isinstance(total, torch.Tensor) else total)
        self.counts[name] = self.counts[name] + (count.detach() if isinstance(count, torch.Tensor) else count)

    def means(self, accelerator, device) -> dict[str, float]:
        """``{name: Σ sums / Σ counts}`` over all processes (NaN where nothing was counted), in one reduction."""
        names = sorted(self.sums)
        if not names:
            return {}
        values = [self.sums[k] for k in names] + [self.counts[k] for k in names]
        flat = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
        flat = global_sum(accelerator, flat).tolist()
        n = len(names)
        return {k: flat[i] / flat[n + i] if flat[n + i] else float("nan") for i, k in enumerate(names)}
