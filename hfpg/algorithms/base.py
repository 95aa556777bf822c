"""The interface every update rule implements. The trainer's loop is one for all of them; what differs lives here.

A rule turns one scored batch of experience into a policy update: it computes advantages
(:mod:`hfpg.algorithms.advantages`), runs its update, and says what it can do. Each ability that a rule lacks is a
*refusal*: the reason, shown to the user as it stands, or None when the rule supports it. Nothing outside
``hfpg/algorithms`` asks for a rule by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from ..errors import ConfigError
from .advantages import MovingAverageBaseline, compute_advantages


class UpdateRule:
    """Base class of PPO, REINFORCE and TRPO. Checkpointable (``state_dict``) with the trainer."""

    name: ClassVar[str] = ""
    #: why experience replay cannot be used with this rule (None: it can)
    replay_refusal: ClassVar[str | None] = None
    #: why this rule cannot run on a DeepSpeed or FSDP engine (None: it can)
    sharded_engine_refusal: ClassVar[str | None] = None
    #: why a hook after each optimizer step (AdaLoRA's rank allocation) cannot run (None: it can)
    optimizer_hook_refusal: ClassVar[str | None] = None

    def __init__(self, config):
        self.config = config
        self.moving_average = MovingAverageBaseline(config.baseline_ema)
        self.after_optimizer_step: Callable[[], None] | None = None
        #: the separate critic (``value_model``; a :class:`~hfpg.value_model.Critic`), None = the policy's value head
        self.critic = None
        #: value_model_warmup_steps: True while only the critic trains (the policy takes no step at all)
        self.policy_frozen = False

    # ---- abilities ------------------------------------------------------------------------------------------------
    @property
    def epochs(self) -> int:
        """Passes over each batch."""
        return 1

    @property
    def optimizer_steps_per_update(self) -> int:
        """Optimizer steps one update takes: passes × minibatches (fresh and replayed sequences together)."""
        cfg = self.config
        return self.epochs * (cfg.rollout_batch_size + cfg.replay_batch_size) // cfg.mini_batch_size

    @property
    def critic_steps_per_update(self) -> int:
        """Optimizer steps of a separate critic in one update (its scheduler's unit)."""
        return self.optimizer_steps_per_update

    @property
    def uses_critic(self) -> bool:
        """Whether the value head is trained and used: GAE, or returns with a value baseline."""
        return self.config.advantage_estimator == "gae" or self.config.baseline == "value"

    @property
    def fuses_policy_forward(self) -> bool:
        """Whether the rollout's "old" logprobs, values and entropy come from the update's own first forward (see
        :meth:`training_forward`) instead of a separate no-grad forward."""
        return False

    def add_optimizer_step_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` after every optimizer step (before ``zero_grad``, so it can read the gradients)."""
        if self.optimizer_hook_refusal:
            raise ConfigError(self.optimizer_hook_refusal)
        self.after_optimizer_step = hook

    # ---- the work -------------------------------------------------------------------------------------------------
    def compute_advantages(self, rollout, scores: torch.Tensor, kl_coef: float, accelerator=None) -> dict:
        """rollout (B, T) tensors and shaped scores (B,) -> kl, rewards, non_score_rewards, advantages, returns."""
        return compute_advantages(rollout, scores, kl_coef, self.config, accelerator, self.moving_average)

    def training_forward(self, model, rollout) -> dict[str, torch.Tensor]:
        """The update's first forward over the whole local batch, with gradients, when the rule fuses it."""
        raise NotImplementedError(f"{type(self).__name__} does not fuse the rollout's policy forward")

    def update(
        self, model, optimizer, scheduler, accelerator, rollout, advantages, returns, kl_coef=0.0, first_forward=None
    ) -> dict[str, float]:
        """Update the policy (and critic) from one batch; returns metrics averaged over every process.

        model, optimizer, scheduler: as prepared by the trainer's Accelerator; rollout: the batch (fresh and replayed
        sequences); advantages, returns: (B, T) tensors; kl_coef: β of this step; first_forward: the outputs of
        :meth:`training_forward` when :attr:`fuses_policy_forward`, else None.
        """
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"moving_average": self.moving_average.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.moving_average.load_state_dict(state["moving_average"])
