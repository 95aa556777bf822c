"""Running statistics for reward scaling (stateful; the pure maths live in :mod:`hfpg.ops`)."""

from __future__ import annotations

import math

import torch


class RunningMoments:
    """Running mean and standard deviation over every value seen, merged batch by batch (Chan et al.).

    Used to scale scores by a running std (``score_scaling="running_std"``). Checkpointed with the trainer.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        """Fold a batch in; returns the batch's (mean, std)."""
        xs = xs.detach().double().flatten()
        n = xs.numel()
        if n == 0:
            return self.mean, self.std
        batch_mean = xs.mean().item()
        batch_var = xs.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        if self.count == 0:
            m2 = batch_var * n
        else:
            m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total
        return batch_mean, math.sqrt(batch_var)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
