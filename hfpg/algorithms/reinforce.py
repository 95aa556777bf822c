"""REINFORCE (Williams 1992): ``-A·log π`` over one pass of the shared minibatch loop
(:mod:`hfpg.algorithms.minibatch`). With the baselines of :mod:`hfpg.algorithms.advantages` it is also RLOO
(leave-one-out), GRPO-style (group-normalised) and actor-critic (value baseline)."""

from __future__ import annotations

import torch

from .. import ops
from .minibatch import MinibatchPolicyGradient


class REINFORCE(MinibatchPolicyGradient):
    """``-w·A·log π`` (w: truncated importance weight, 1 when on-policy), one pass over the rollout.

    With a value baseline the critic is trained with ``½(V - G)²``. ``ppo_epochs`` does not apply: a second pass
    would be off-policy, which plain REINFORCE does not correct for.
    """

    name = "reinforce"

    def policy_loss(self, new_logprobs, rollout, idx, advantages, weights):
        pg_tok = weights * ops.pg_loss(new_logprobs, advantages[idx])
        ratio = torch.exp(new_logprobs.detach() - rollout.logprobs[idx])
        return pg_tok, {"loss/policy": pg_tok.detach(), "policy/ratio": ratio}
