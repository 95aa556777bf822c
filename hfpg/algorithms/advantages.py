"""Advantages for every update rule, in one place: KL-shaped rewards, then GAE or returns minus a baseline.

| advantage_estimator | baseline       | advantage A_t                                          | needs      |
|---------------------|----------------|--------------------------------------------------------|------------|
| gae                 | (the critic)   | GAE(γ, λ) from per-token rewards and values            | value head |
| returns             | none           | G_t (discounted return from token t)                   |            |
| returns             | moving_average | G_t − EMA of past sequence returns G_0                 |            |
| returns             | leave_one_out  | G_t − mean of the other k−1 samples' G_0 (RLOO)        | k >= 2     |
| returns             | group_norm     | (G_t − mean_group G_0) / std_group G_0 (GRPO-style)    | k >= 2     |
| returns             | value          | G_t − V(s_t)                                           | value head |
"""

from __future__ import annotations

import torch

from .. import ops
from ..stats import global_moments, global_whiten


class MovingAverageBaseline:
    """EMA of the global mean sequence return; the first batch starts it at that batch's mean. Checkpointable."""

    def __init__(self, decay: float):
        self.decay = decay
        self.value: float | None = None

    def __call__(self, batch_mean: float) -> float:
        """The baseline for this batch (from earlier batches), then fold this batch in."""
        baseline = batch_mean if self.value is None else self.value
        self.value = batch_mean if self.value is None else self.decay * self.value + (1 - self.decay) * batch_mean
        return baseline

    def state_dict(self) -> dict:
        return {"value": self.value, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.decay = state["value"], state["decay"]


@torch.no_grad()
def compute_advantages(
    rollout,
    scores: torch.Tensor,
    kl_coef: float,
    config,
    accelerator=None,
    moving_average: MovingAverageBaseline | None = None,
) -> dict[str, torch.Tensor]:
    """rollout tensors (B, T), scores (B,) -> kl, rewards, non_score_rewards, advantages, returns, all (B, T).

    With ``kl_penalty="reward"`` every token pays −β·KL; with ``"loss"`` the rewards hold the score only and the
    update adds the KL term itself. Returns are taken before advantages are whitened. Unscorable samples
    (``rollout.scorable`` False: no reward applied) enter no statistic and no baseline, and get advantage 0. Without a
    reference model (``kl_coef`` 0) the KL is 0.
    """
    cfg = config
    mask = rollout.loss_mask
    valid = rollout.scorable
    if rollout.ref_logprobs is None:
        kl = torch.zeros_like(rollout.logprobs)
    else:
        kl = torch.where(mask, ops.kl_per_token(rollout.logprobs, rollout.ref_logprobs, cfg.kl_estimator), 0.0)
    beta = kl_coef if cfg.kl_penalty == "reward" else 0.0
    rewards, non_score = ops.token_level_rewards(scores, kl, beta, mask)
    if cfg.whiten_rewards:
        rewards = global_whiten(accelerator, rewards, mask, shift_mean=False)
    if cfg.advantage_estimator == "gae":
        advantages, returns = ops.gae_advantages(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
    else:
        returns = ops.discounted_returns(rewards, mask, cfg.gamma)
        seq_returns = returns[:, 0]  # G_0: the return of the whole completion, (B,)
        k = cfg.num_samples_per_prompt
        if cfg.baseline == "none":
            advantages = returns
        elif cfg.baseline == "value":
            advantages = returns - rollout.values
        elif cfg.baseline == "moving_average":
            pick = seq_returns if valid is None else (seq_returns, valid)
            batch = global_moments(accelerator, {"returns": pick}, device=seq_returns.device)["returns"]
            advantages = returns - moving_average(batch.mean)
        elif cfg.baseline == "leave_one_out":
            advantages = returns - ops.leave_one_out_baseline(seq_returns, k, valid).unsqueeze(1)
        elif cfg.baseline == "group_norm":
            advantages = ops.group_normalized(returns, seq_returns, k, valid=valid)
        else:  # pragma: no cover - the config validates the choice
            raise ValueError(f"unknown baseline {cfg.baseline!r}")
        advantages = torch.where(mask, advantages, 0.0)
    if cfg.whitens_advantages:
        advantages = global_whiten(accelerator, advantages, mask, shift_mean=True)
    return {"kl": kl, "rewards": rewards, "non_score_rewards": non_score, "advantages": advantages, "returns": returns}
