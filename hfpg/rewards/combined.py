"""``CombinedReward``: a weighted sum of reward functions, each optionally normalised, with per-part metrics."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..stats import Moments, RunningMoments
from .base import Reward, RewardError, call_reward, check_scores, reward_name, setup_reward

NORMALIZE = ("none", "batch", "running")


class CombinedReward(Reward):
    """``total = clip(Σ_i w_i · norm_i(r_i))`` over reward callables ``r_i``.

    >>> reward = CombinedReward({BLEUReward(): 1.0, LMLikelihoodReward("gpt2"): 0.1, my_fn: 0.5}, normalize="running")

    rewards: ``{fn: weight}`` or a list of ``(fn, weight)`` pairs; each fn is any ``(prompts, completions, **columns)``
        callable. Parts are named after ``fn.name`` / ``fn.__name__`` (``_2``, ``_3`` … when names repeat).
    normalize: per part, before weighting — ``none``; ``batch`` (z-score over the batch, all processes); or
        ``running`` (z-score with a running mean/std over every batch so far, updated with this batch first;
        checkpointed with the trainer).
    clip: clip the total to ``[-clip, clip]`` (None = off).
    nonfinite: None = a NaN/inf from any part is an error naming that part; a float = replace it with this value
        and count it (``reward/<name>/nonfinite``).

    After each call, ``last_components`` holds every part's raw (B,) scores and ``last_nonfinite`` the counts; the
    trainer logs ``reward/<name>/mean`` and ``/std`` from them next to ``objective/scores`` (the total).
    """

    def __init__(
        self,
        rewards: Mapping[Callable, float] | Sequence[tuple[Callable, float]],
        normalize: str = "none",
        clip: float | None = None,
        nonfinite: float | None = None,
        name: str = "combined",
        eps: float = 1e-8,
    ):
        pairs = list(rewards.items()) if isinstance(rewards, Mapping) else list(rewards)
        if not pairs:
            raise ValueError("CombinedReward needs at least one (reward, weight)")
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        if nonfinite is not None and not math.isfinite(nonfinite):
            raise ValueError(f"nonfinite must be a finite replacement value or None, got {nonfinite}")
        self.names: list[str] = []
        self.rewards: list[Callable] = []
        self.weights: list[float] = []
        for pair in pairs:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ValueError(f"expected (reward, weight) pairs, got {pair!r}")
            fn, weight = pair
            if not callable(fn):
                raise TypeError(f"reward {fn!r} is not callable")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"the weight of reward {reward_name(fn)!r} must be a finite number, got {weight!r}")
            base, k = reward_name(fn), 2
            unique = base
            while unique in self.names:
                unique, k = f"{base}_{k}", k + 1
            self.names.append(unique)
            self.rewards.append(fn)
            self.weights.append(float(weight))
        self.normalize, self.clip, self.nonfinite, self.name, self.eps = normalize, clip, nonfinite, name, eps
        self.moments = {n: RunningMoments() for n in self.names}
        self.last_components: dict[str, torch.Tensor] = {}
        self.last_nonfinite: dict[str, int] = {}
        self._gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x

    # ---- the trainer's hooks -----------------------------------------------------------------------------------
    def setup(self, device=None, gather: Callable | None = None) -> None:
        """Set up every part (models to ``device``) and share statistics across processes through ``gather``."""
        if gather is not None:
            self._gather = gather
        for fn in self.rewards:
            setup_reward(fn, device=device, gather=gather)

    def state_dict(self) -> dict[str, Any]:
        return {"moments": {n: m.state_dict() for n, m in self.moments.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, m in state["moments"].items():
            if n in self.moments:
                self.moments[n].load_state_dict(m)

    # ---- scoring ---------------------------------------------------------------------------------------------------
    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        total = torch.zeros(len(completions), dtype=torch.float64)
        components, nonfinite = {}, {}
        for name, fn, weight in zip(self.names, self.rewards, self.weights):
            out = call_reward(fn, prompts, completions, columns)
            try:
                scores = check_scores(out, name, completions, allow_nonfinite=self.nonfinite is not None)
            except RewardError as e:
                raise RewardError(f"{e} (part {name!r} of {self.name!r})") from None
            bad = ~torch.isfinite(scores)
            nonfinite[name] = int(bad.sum())
            if nonfinite[name]:
                scores = torch.where(bad, torch.full_like(scores, self.nonfinite), scores)
            components[name] = scores
            total += weight * self._normalise(name, scores).double()
        if self.clip is not None:
            total = total.clamp(-self.clip, self.clip)
        self.last_components, self.last_nonfinite = components, nonfinite
        return total.tolist()

    def _normalise(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B,): z-score over the global batch, or over everything seen so far."""
        if self.normalize == "none":
            return scores
        batch = Moments.of(self._gather(scores))  # the same statistics on every process
        if self.normalize == "running":
            self.moments[name].update(batch)
            batch = self.moments[name].moments
        return ((scores.double() - batch.mean) / (batch.std + self.eps)).float()
