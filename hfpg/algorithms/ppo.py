"""PPO (Schulman et al. 2017) for language models: KL-shaped per-token rewards, GAE, clipped surrogate and value loss.

The update runs ``ppo_epochs`` passes over the rollout; each pass draws a fresh permutation and cuts it into
minibatches, each minibatch into ``gradient_accumulation_steps`` micro-batches. Token losses are summed and divided
by the number of real tokens in the *global* minibatch, so the update does not depend on how the minibatch is split
into micro-batches or processes.
"""

from __future__ import annotations

import contextlib

import torch

from .. import ops
from ..rollout import sequence_forward
from .common import MetricSums, global_sum, global_whiten


class PPO:
    """The PPO update rule. Stateless between steps; everything it needs arrives as arguments."""

    name = "ppo"
    uses_value_head = True

    def __init__(self, config):
        self.config = config

    # ---- advantages ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def compute_advantages(self, rollout, scores: torch.Tensor, kl_coef: float, accelerator=None) -> dict:
        """KL-shaped per-token rewards -> GAE. scores: (B,) shaped sequence scores. Returns (B, T) tensors."""
        cfg = self.config
        mask = rollout.response_mask
        kl = torch.where(mask, ops.kl_per_token(rollout.logprobs, rollout.ref_logprobs, cfg.kl_estimator), 0.0)
        rewards, non_score = ops.token_level_rewards(scores, kl, kl_coef, mask)
        if cfg.whiten_rewards:
            rewards = global_whiten(accelerator, rewards, mask, shift_mean=False)
        advantages, returns = ops.gae_advantages(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = global_whiten(accelerator, advantages, mask, shift_mean=True)
        return {"kl": kl, "rewards": rewards, "non_score_rewards": non_score, "advantages": advantages,
                "returns": returns}

    # ---- update ---------------------------------------------------------------------------------------------------
    def update(self, model, optimizer, scheduler, accelerator, rollout, advantages: torch.Tensor,
               returns: torch.Tensor) -> dict[str, float]:
        """``ppo_epochs`` × minibatches of clipped-surrogate + value-loss steps. Returns global mean metrics."""
        cfg = self.config
        P = accelerator.num_processes
        B = rollout.batch_size
        mb_size = cfg.mini_batch_size // P  # this process's share of a minibatch
        micro = mb_size // cfg.gradient_accumulation_steps
        b_mask = rollout.response_mask
        entropy_needs_grad = cfg.ent_coef > 0
        stats = MetricSums()
        early_stopped, epochs_done, n_updates = False, 0, 0
        model.train()
        for _epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(B, device=b_mask.device)  # fresh permutation every epoch
            for mb_start in range(0, B, mb_size):
                mb_idx = perm[mb_start : mb_start + mb_size]
                # normaliser: real tokens of the *global* minibatch / P, because DDP averages gradients over P
                mb_tokens = global_sum(accelerator, b_mask[mb_idx].sum().float())
                normaliser = (mb_tokens / P).clamp(min=1.0)
                mb_kl = MetricSums()
                for k, micro_start in enumerate(range(0, mb_size, micro)):
                    idx = mb_idx[micro_start : micro_start + micro]
                    last = k == cfg.gradient_accumulation_steps - 1
                    sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
                    with sync:
                        self._micro_step(model, accelerator, rollout, advantages, returns, idx, normaliser,
                                         entropy_needs_grad, stats, mb_kl)
                if cfg.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    stats.add("policy/grad_norm", float(grad_norm), 1.0 / P)  # same on every process
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                n_updates += 1
                if cfg.target_approx_kl is not None:
                    kl_now = mb_kl.means(accelerator, b_mask.device)["kl"]
                    if kl_now > cfg.target_approx_kl:
                        early_stopped = True
                        break
            epochs_done += 1
            if early_stopped:
                break
        metrics = stats.means(accelerator, b_mask.device)
        metrics.update({"policy/early_stopped": float(early_stopped), "policy/epochs": float(epochs_done),
                        "policy/optimizer_steps": float(n_updates), "lr": scheduler.get_last_lr()[0]})
        return metrics

    def _micro_step(self, model, accelerator, rollout, advantages, returns, idx, normaliser, entropy_needs_grad,
                    stats: MetricSums, mb_kl: MetricSums) -> None:
        cfg = self.config
        mask = rollout.response_mask[idx]
        out = sequence_forward(
            model, rollout.query_ids[idx], rollout.query_mask[idx], rollout.response_ids[idx], mask,
            temperature=cfg.temperature, with_values=True, with_entropy=entropy_needs_grad,
        )
        old_logprobs, adv = rollout.logprobs[idx], advantages[idx]
        pg_tok, clipped, ratio = ops.ppo_policy_loss(out["logprobs"], old_logprobs, adv, cfg.clip_range)
        vf_tok, v_clipped = ops.clipped_value_loss(out["values"], rollout.values[idx], returns[idx],
                                                   cfg.clip_range_value)
        loss_tok = pg_tok + cfg.vf_coef * vf_tok
        if entropy_needs_grad:  # entropy bonus; otherwise policy/entropy is measured once, during the rollout
            loss_tok = loss_tok - cfg.ent_coef * out["entropy"]
        loss = ops.masked_sum(loss_tok, mask) / normaliser
        accelerator.backward(loss)
        with torch.no_grad():
            n = mask.sum().float()
            akl = ops.approx_kl(out["logprobs"].detach(), old_logprobs)
            stats.add("loss/policy", ops.masked_sum(pg_tok.detach(), mask), n)
            stats.add("loss/value", ops.masked_sum(vf_tok.detach(), mask), n)
            stats.add("policy/approxkl", ops.masked_sum(akl, mask), n)
            stats.add("policy/clipfrac", ops.masked_sum(clipped.float(), mask), n)
            stats.add("value/clipfrac", ops.masked_sum(v_clipped.float(), mask), n)
            stats.add("policy/ratio", ops.masked_sum(ratio.detach(), mask), n)
            mb_kl.add("kl", ops.masked_sum(akl, mask), n)
