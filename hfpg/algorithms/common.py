"""Shared pieces of every update rule: statistics over the global batch, and token-sum bookkeeping."""

from __future__ import annotations

from collections import defaultdict

import torch

from .. import ops


def global_sum(accelerator, x: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all processes (identity on one process). This is a CPU-GPU sync point."""
    if accelerator is None or accelerator.num_processes == 1:
        return x
    return accelerator.reduce(x.contiguous(), reduction="sum")


def global_masked_moments(accelerator, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of ``x`` over the real positions of every process's batch."""
    mask = mask.bool()
    xs = torch.where(mask, x, torch.zeros_like(x)).float()
    stats = torch.stack([xs.sum(), (xs * xs).sum(), mask.sum().float()])
    total, total_sq, n = global_sum(accelerator, stats).tolist()
    mean = total / max(n, 1.0)
    var = (total_sq - n * mean**2) / max(n - 1.0, 1.0)
    return torch.tensor(mean, device=x.device), torch.tensor(max(var, 0.0), device=x.device)


def global_whiten(accelerator, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """:func:`hfpg.ops.masked_whiten` with statistics over the global batch (the same result on 1 or N processes)."""
    mean, var = global_masked_moments(accelerator, x, mask)
    return ops.masked_whiten(x, mask, shift_mean=shift_mean, mean=mean, var=var)


class MetricSums:
    """Accumulates (sum, count) pairs locally and reduces them across processes once, at the end."""

    def __init__(self) -> None:
        self.sums: dict[str, float | torch.Tensor] = defaultdict(float)
        self.counts: dict[str, float | torch.Tensor] = defaultdict(float)

    def add(self, name: str, total, count) -> None:
        self.sums[name] = self.sums[name] + (total.detach() if isinstance(total, torch.Tensor) else total)
        self.counts[name] = self.counts[name] + (count.detach() if isinstance(count, torch.Tensor) else count)

    def means(self, accelerator, device) -> dict[str, float]:
        names = sorted(self.sums)
        if not names:
            return {}
        # one stacked tensor and one reduction: a single CPU-GPU sync for all metrics
        values = [self.sums[k] for k in names] + [self.counts[k] for k in names]
        flat = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
        flat = global_sum(accelerator, flat).tolist()
        n = len(names)
        return {k: flat[i] / flat[n + i] if flat[n + i] else float("nan") for i, k in enumerate(names)}
