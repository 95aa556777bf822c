"""``CombinedReward``: a weighted sum of reward functions, each optionally normalised, with per-part metrics.

A part may return ``None`` for a sample ("not applicable"): it is left out of that sample's weighted sum (TRL's rule),
and a sample no part applies to is *unscorable* (``Scores.scorable`` False): the trainer leaves it out of every
statistic and gives it no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..stats import Moments, RunningMoments
from .base import Reward, RewardError, check_outputs, reward_name, setup_reward
from .calling import RewardInputs, call_rewards, check_signature

NORMALIZE = ("none", "batch", "running")


@dataclass
class Scores:
    """One batch's scores. total: (B,) fp32, 0 where unscorable; scorable: (B,) bool; components: each part's raw
    (B,) scores, NaN where that part returned None."""

    total: torch.Tensor
    scorable: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)


class CombinedReward(Reward):
    """``total = clip(Σ_i w_i · norm_i(r_i))`` over reward callables ``r_i``.

    >>> reward = CombinedReward({BLEUReward(): 1.0, LMLikelihoodReward("gpt2"): 0.1, my_fn: 0.5}, normalize="running")

    rewards: ``{fn: weight}`` or a list of ``(fn, weight)`` pairs; each fn is any reward callable (TRL's contract, see
        :mod:`hfpg.rewards.calling`; ``async def`` ones are awaited concurrently; ``None`` = not applicable). Parts are
        named after ``fn.name`` / ``fn.__name__`` (``_2``, ``_3`` … when names repeat).
    normalize: per part, before weighting — ``none``; ``batch`` (z-score over the batch, all processes); or
        ``running`` (z-score with a running mean/std over every batch so far, updated with this batch first;
        checkpointed with the trainer).
    clip: clip the total to ``[-clip, clip]`` (None = off).
    nonfinite: None = a NaN/inf from any part is an error naming that part; a float = replace it with this value
        and count it (``reward/<name>/nonfinite``).

    A sample's total is the weighted sum of the parts that scored it; a sample no part scored is unscorable (None from
    a direct call). After each call, ``last_components`` holds every part's raw (B,) scores (NaN where a part returned
    None) and ``last_nonfinite`` the counts; the trainer logs ``reward/<name>/mean`` and ``/std`` (over the samples
    each part scored) next to ``objective/scores`` (the total).
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

    @classmethod
    def wrap(cls, reward_fn, weights: Sequence[float] | None = None, **kwargs) -> CombinedReward:
        """``reward_fn`` as a CombinedReward: itself, a list of callables (with ``weights``, default 1 each), or one
        callable (weight 1)."""
        if isinstance(reward_fn, CombinedReward) and weights is None:
            return reward_fn
        fns = list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn]
        if weights is None:
            weights = [1.0] * len(fns)
        if len(weights) != len(fns):
            raise ValueError(f"reward_weights has {len(weights)} weights for {len(fns)} reward functions")
        return cls(list(zip(fns, weights)), **kwargs)

    def check_signatures(self, columns: list[str]) -> None:
        """A RewardError now, naming the part, if a part needs an argument no batch will have."""
        for fn in self.rewards:
            if isinstance(fn, CombinedReward):
                fn.check_signatures(columns)
            else:
                check_signature(fn, columns)

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
    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        """Score a batch directly (TRL's keyword contract); ``None`` for a sample no part applies to."""
        result = self.score(RewardInputs.from_kwargs(prompts, completions, **kwargs))
        return [float(t) if ok else None for t, ok in zip(result.total.tolist(), result.scorable.tolist())]

    def score(self, inputs: RewardInputs) -> Scores:
        """Call every part (async ones concurrently), check and combine their outputs."""
        n = len(inputs)
        plain = [i for i, fn in enumerate(self.rewards) if not isinstance(fn, CombinedReward)]
        outputs: list = [None] * len(self.rewards)
        for i, out in zip(
            plain, call_rewards([self.rewards[i] for i in plain], inputs, [self.names[i] for i in plain])
        ):
            outputs[i] = out
        for i, fn in enumerate(self.rewards):
            if isinstance(fn, CombinedReward):  # scored on the same inputs; its unscorable samples are None here
                outputs[i] = fn.score(inputs)
        total = torch.zeros(n, dtype=torch.float64)
        scorable = torch.zeros(n, dtype=torch.bool)
        components, nonfinite = {}, {}
        for name, weight, out in zip(self.names, self.weights, outputs):
            if isinstance(out, Scores):  # a nested CombinedReward
                scores, applicable = out.total.cpu(), out.scorable.cpu()
            else:
                try:
                    scores, applicable = check_outputs(
                        out, name, inputs.completions, allow_nonfinite=self.nonfinite is not None
                    )
                except RewardError as e:
                    raise RewardError(f"{e} (part {name!r} of {self.name!r})") from None
            bad = applicable & ~torch.isfinite(scores)
            nonfinite[name] = int(bad.sum())
            if nonfinite[name]:
                scores = torch.where(bad, torch.full_like(scores, self.nonfinite), scores)
            components[name] = scores
            normalised = self._normalise(name, scores, applicable).double()
            total += torch.where(applicable, weight * normalised, 0.0)
            scorable |= applicable
        if self.clip is not None:
            total = total.clamp(-self.clip, self.clip)
        total = torch.where(scorable, total, 0.0).float()
        self.last_components, self.last_nonfinite = components, nonfinite
        return Scores(total, scorable, components)

    def _normalise(self, name: str, scores: torch.Tensor, applicable: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B,): z-score over the global batch, or over everything seen so far (applicable samples only)."""
        if self.normalize == "none":
            return scores
        gathered = self._gather(torch.where(applicable, scores, float("nan")))  # the same on every process
        batch = Moments.of(gathered[~torch.isnan(gathered)].double())
        if self.normalize == "running":
            self.moments[name].update(batch)
            batch = self.moments[name].moments
        return ((scores.double() - batch.mean) / (batch.std + self.eps)).float()
