"""Per-step metrics of the fresh rollout and of each reward part, reduced over all processes in one sum each."""

from __future__ import annotations

import torch

from . import ops
from .algorithms.common import global_sum


def step_metrics(accelerator, r, adv: dict, scores: torch.Tensor, kl_coef: float) -> dict[str, float]:
    """objective/*, completions/*, policy/entropy and value/* of the fresh rollout, reduced over processes."""
    mask = r.response_mask
    seq_kl = ops.masked_sum(adv["kl"], mask, 1)  # (B,) nats per sequence
    seq_non_score = ops.masked_sum(adv["non_score_rewards"], mask, 1)
    per_seq = torch.stack([r.scores, scores, seq_kl, seq_non_score, scores + seq_non_score,
                           mask.sum(1).float(), (~r.has_stop).float()], 1)  # (B, 7)
    n_seq = r.batch_size
    sums = torch.cat([per_seq.sum(0), torch.tensor([n_seq], device=per_seq.device, dtype=per_seq.dtype),
                      ops.masked_sum(r.entropy, mask).reshape(1), mask.sum().reshape(1).float(),
                      ops.masked_sum(r.values, mask).reshape(1)])
    tok_stats = torch.stack([ops.masked_sum(x, mask) for x in
                             (adv["returns"], adv["returns"] ** 2, adv["returns"] - r.values,
                              (adv["returns"] - r.values) ** 2)])
    s = global_sum(accelerator, torch.cat([sums.double(), tok_stats.double()])).tolist()
    N, ntok = s[7], max(s[9], 1.0)
    ret_var = s[12] / ntok - (s[11] / ntok) ** 2
    res_var = s[14] / ntok - (s[13] / ntok) ** 2
    return {
        "objective/scores": s[0] / N, "objective/scores_shaped": s[1] / N, "objective/kl": s[2] / N,
        "objective/non_score_reward": s[3] / N, "objective/rlhf_reward": s[4] / N, "objective/kl_coef": kl_coef,
        "completions/mean_length": s[5] / N, "completions/no_stop_fraction": s[6] / N,
        "policy/entropy": s[8] / ntok, "value/mean": s[10] / ntok,
        "value/explained_variance": 1.0 - res_var / ret_var if ret_var > 0 else float("nan"),
    }


def component_metrics(accelerator, reward_fn, components: dict[str, torch.Tensor], prefix: str = "reward"
                      ) -> dict[str, float]:
    """``reward/<name>/mean`` and ``/std`` of each part of a combined reward, over all processes."""
    metrics = {}
    for name, scores in components.items():
        x = scores.double().to(accelerator.device)
        s = global_sum(accelerator, torch.stack([x.sum(), (x * x).sum(), torch.tensor(
            float(x.numel()), dtype=torch.float64, device=x.device)])).tolist()
        mean = s[0] / max(s[2], 1.0)
        metrics[f"{prefix}/{name}/mean"] = mean
        metrics[f"{prefix}/{name}/std"] = max(s[1] / max(s[2], 1.0) - mean**2, 0.0) ** 0.5
    nonfinite = getattr(reward_fn, "last_nonfinite", None) or {}
    if any(nonfinite.values()) or getattr(reward_fn, "nonfinite", None) is not None:
        for name, count in nonfinite.items():
            metrics[f"{prefix}/{name}/nonfinite"] = global_sum(
                accelerator, torch.tensor(float(count), device=accelerator.device)).item()
    return metrics
