"""PPO (Schulman et al. 2017): the clipped surrogate ``max(-A·r, -A·clip(r, 1-ε, 1+ε_high))``, the clipped value loss,
over ``ppo_epochs`` passes of the shared minibatch loop (:mod:`hfpg.algorithms.minibatch`)."""

from __future__ import annotations

from .. import ops
from .minibatch import MinibatchPolicyGradient


class PPO(MinibatchPolicyGradient):
    """Clipped surrogate ``max(-A·r, -A·clip(r, 1±ε))`` and clipped value loss, over ``ppo_epochs`` passes."""

    name = "ppo"

    @property
    def epochs(self) -> int:
        return self.config.ppo_epochs

    def policy_loss(self, new_logprobs, rollout, idx, advantages, weights):
        cfg = self.config
        pg_tok, clipped, ratio = ops.ppo_policy_loss(
            new_logprobs,
            rollout.logprobs[idx],
            advantages[idx],
            cfg.clip_range,
            cfg.clip_range_high,
            mask=rollout.loss_mask[idx],
            importance_sampling_level=cfg.importance_sampling_level,
        )
        pg_tok = weights * pg_tok  # truncated importance weights: 1 for fresh samples
        return pg_tok, {
            "loss/policy": pg_tok.detach(),
            "policy/clipfrac": clipped.float(),
            "policy/ratio": ratio.detach(),
        }

    def value_loss(self, new_values, rollout, idx, returns):
        return ops.clipped_value_loss(new_values, rollout.values[idx], returns[idx], self.config.clip_range_value)
