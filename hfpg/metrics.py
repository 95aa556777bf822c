"""Per-step metrics of the fresh rollout and of each reward part, reduced over all processes in one reduction each."""

from __future__ import annotations

import torch

from . import ops
from .stats import explained_variance, global_moments, global_sum


def step_metrics(accelerator, r, adv: dict, scores: torch.Tensor, kl_coef: float) -> dict[str, float]:
    """objective/*, completions/*, policy/entropy and value/* of the fresh rollout ``r``, over every process.

    adv: :func:`~hfpg.algorithms.advantages.compute_advantages`' outputs for these rows; scores: the shaped scores.
    """
    mask = r.response_mask
    non_score = ops.masked_sum(adv["non_score_rewards"], mask, 1)  # (B,)
    m = global_moments(
        accelerator,
        {
            "scores": r.scores,
            "shaped": scores,
            "kl": ops.masked_sum(adv["kl"], mask, 1),
            "non_score": non_score,
            "rlhf": scores + non_score,
            "length": mask.sum(1).float(),
            "no_stop": (~r.has_stop).float(),
            "entropy": (r.entropy, mask),
            "values": (r.values, mask),
            "returns": (adv["returns"], mask),
            "residual": (adv["returns"] - r.values, mask),
        },
    )
    return {
        "objective/scores": m["scores"].mean,
        "objective/scores_shaped": m["shaped"].mean,
        "objective/kl": m["kl"].mean,
        "objective/non_score_reward": m["non_score"].mean,
        "objective/rlhf_reward": m["rlhf"].mean,
        "objective/kl_coef": kl_coef,
        "completions/mean_length": m["length"].mean,
        "completions/no_stop_fraction": m["no_stop"].mean,
        "policy/entropy": m["entropy"].mean,
        "value/mean": m["values"].mean,
        "value/explained_variance": explained_variance(m["returns"], m["residual"]),
    }


def component_metrics(
    accelerator, reward_fn, components: dict[str, torch.Tensor], prefix: str = "reward"
) -> dict[str, float]:
    """``reward/<name>/mean`` and ``/std`` of each part of a combined reward (and ``/nonfinite`` counts), over all
    processes."""
    metrics = {}
    for name, m in global_moments(accelerator, components).items():
        metrics[f"{prefix}/{name}/mean"] = m.mean
        metrics[f"{prefix}/{name}/std"] = m.std
    nonfinite = getattr(reward_fn, "last_nonfinite", None) or {}
    if any(nonfinite.values()) or getattr(reward_fn, "nonfinite", None) is not None:
        for name, count in nonfinite.items():
            metrics[f"{prefix}/{name}/nonfinite"] = global_sum(
                accelerator, torch.tensor(float(count), device=accelerator.device)
            ).item()
    return metrics
