"""Per-step metrics of the fresh rollout and of each reward part, reduced over all processes in one reduction each."""

from __future__ import annotations

import torch
from accelerate.utils import gather_object

from . import ops
from .stats import explained_variance, global_moments, global_sum


def step_metrics(
    accelerator, r, adv: dict, scores: torch.Tensor, kl_coef: float, with_kl: bool = True
) -> dict[str, float]:
    """objective/*, completions/*, policy/entropy and value/* of the fresh rollout ``r``, over every process.

    adv: :func:`~hfpg.algorithms.advantages.compute_advantages`' outputs for these rows; scores: the shaped scores.
    with_kl: False when there is no reference model (``kl_coef`` 0): no KL to report.
    """
    mask = r.response_mask
    non_score = ops.masked_sum(adv["non_score_rewards"], mask, 1)  # (B,)
    scorable = r.scorable if r.scorable is not None else torch.ones_like(r.has_stop)
    m = global_moments(
        accelerator,
        {
            "scores": (r.scores, scorable),  # unscorable samples (no reward applied) are counted, not averaged
            "shaped": (scores, scorable),
            "unscorable": (~scorable).float(),
            "kl": ops.masked_sum(adv["kl"], mask, 1),
            "non_score": non_score,
            "rlhf": (scores + non_score, scorable),
            "length": mask.sum(1).float(),
            "no_stop": (~r.has_stop).float(),
            "entropy": (r.entropy, mask),
            "values": (r.values, mask),
            "returns": (adv["returns"], mask),
            "residual": (adv["returns"] - r.values, mask),
        },
    )
    metrics = {
        "objective/scores": m["scores"].mean,
        "objective/scores_shaped": m["shaped"].mean,
        "objective/unscorable_fraction": m["unscorable"].mean,
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
    if not with_kl:
        for key in ("objective/kl", "objective/non_score_reward"):
            metrics.pop(key)
    return metrics


def component_metrics(
    accelerator, reward_fn, components: dict[str, torch.Tensor], prefix: str = "reward"
) -> dict[str, float]:
    """``reward/<name>/mean`` and ``/std`` of each part of a combined reward over the samples it scored (and
    ``/nonfinite`` counts), over all processes."""
    metrics = {}
    applied = {name: (x, ~torch.isnan(x)) for name, x in components.items()}  # NaN: the part returned None
    for name, m in global_moments(accelerator, applied).items():
        metrics[f"{prefix}/{name}/mean"] = m.mean
        metrics[f"{prefix}/{name}/std"] = m.std
    nonfinite = getattr(reward_fn, "last_nonfinite", None) or {}
    if any(nonfinite.values()) or getattr(reward_fn, "nonfinite", None) is not None:
        for name, count in nonfinite.items():
            metrics[f"{prefix}/{name}/nonfinite"] = global_sum(
                accelerator, torch.tensor(float(count), device=accelerator.device)
            ).item()
    return metrics


def logged_metrics(accelerator, logged: dict[str, list[float]], prefix: str = "reward") -> dict[str, float]:
    """``<prefix>/<name>``: the mean of every value rewards logged with ``log_metric(name, value)``, over all calls and
    processes (names are agreed on first, so a name one process never logged still reduces everywhere)."""
    names = sorted(logged)
    if accelerator is not None and accelerator.num_processes > 1:
        names = sorted({name for names_of_one in gather_object([names]) for name in names_of_one})
    if not names:
        return {}
    device = accelerator.device if accelerator is not None else "cpu"
    sums = torch.tensor([[sum(logged.get(n, [])), len(logged.get(n, []))] for n in names], device=device)
    sums = global_sum(accelerator, sums.double()).tolist()
    return {f"{prefix}/{n}": total / count for n, (total, count) in zip(names, sums) if count}
