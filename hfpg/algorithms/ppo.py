"""PPO (Schulman et al. 2017) and REINFORCE (Williams 1992): one minibatch loop, two per-token losses.

The update runs ``epochs`` passes over the rollout; each pass draws a fresh permutation and cuts it into
minibatches, each minibatch into ``gradient_accumulation_steps`` micro-batches. Token losses are summed and divided
by the number of real tokens in the *global* minibatch, so the update does not depend on how the minibatch is split
into micro-batches or processes. Shared terms — value loss, entropy bonus, KL-to-reference as a loss, importance
weights of replayed samples — live here once.
"""

from __future__ import annotations

import contextlib

import torch

from .. import ops
from ..distributed import is_deepspeed
from ..rollout import sequence_forward
from .advantages import MovingAverageBaseline, compute_advantages
from .common import MetricSums, global_sum


class MinibatchPolicyGradient:
    """The shared update loop. Subclasses give ``policy_loss`` and ``epochs``."""

    name = "pg"

    def __init__(self, config):
        self.config = config
        self.moving_average = MovingAverageBaseline(config.baseline_ema)
        self.after_optimizer_step = None  # optional hook, called after each optimizer step (before zero_grad)

    @property
    def epochs(self) -> int:
        return 1

    def state_dict(self) -> dict:
        return {"moving_average": self.moving_average.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.moving_average.load_state_dict(state["moving_average"])

    def compute_advantages(self, rollout, scores: torch.Tensor, kl_coef: float, accelerator=None) -> dict:
        return compute_advantages(rollout, scores, kl_coef, self.config, accelerator, self.moving_average)

    def policy_loss(self, new_logprobs, rollout, idx, advantages, weights):
        """Per-token policy loss (B, T) and a dict of (B, T) statistics to average."""
        raise NotImplementedError

    def value_loss(self, new_values, rollout, idx, returns):
        """Per-token value loss (B, T) and its clipped flags (or None)."""
        return 0.5 * (new_values - returns[idx]) ** 2, None

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def update(self, model, optimizer, scheduler, accelerator, rollout, advantages: torch.Tensor,
               returns: torch.Tensor, kl_coef: float = 0.0, first_forward: dict | None = None) -> dict[str, float]:
        """``epochs`` × minibatches of optimizer steps. Returns global mean metrics.

        first_forward: the training forward over the whole local batch (rows in rollout order), already run to give
        the rollout its logprobs — used by the first micro-batch instead of a second forward (see
        ``PGTrainer.fuses_policy_forward``)."""
        cfg = self.config
        P = accelerator.num_processes
        B = rollout.batch_size
        mb_size = cfg.mini_batch_size // P  # this process's share of a minibatch
        micro = mb_size // cfg.gradient_accumulation_steps
        b_mask = rollout.response_mask
        stats = MetricSums()
        deepspeed = is_deepspeed(accelerator)
        early_stopped, epochs_done, n_updates = False, 0, 0
        model.train()
        for _epoch in range(self.epochs):
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
                    if deepspeed:  # the engine steps (clip, optimizer, zero_grad) at the boundary Accelerate reports
                        accelerator.gradient_state._set_sync_gradients(last)
                    out = None
                    if first_forward is not None:  # the rows of idx, from the forward that is already done
                        out, first_forward = {k: v[idx] for k, v in first_forward.items()}, None
                    with sync:
                        self._micro_step(model, accelerator, rollout, advantages, returns, idx, normaliser, kl_coef,
                                         stats, mb_kl, out)
                if cfg.max_grad_norm is not None:
                    # DeepSpeed clips inside its engine step and returns the norm it measured
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    if grad_norm is not None:
                        stats.add("policy/grad_norm", float(grad_norm) / P, 1.0 / P)  # global norm, same everywhere
                optimizer.step()
                scheduler.step()
                if self.after_optimizer_step is not None:  # e.g. AdaLoRA's rank allocation (reads gradients)
                    self.after_optimizer_step()
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

    def _micro_step(self, model, accelerator, rollout, advantages, returns, idx, normaliser, kl_coef,
                    stats: MetricSums, mb_kl: MetricSums, out: dict | None = None) -> None:
        cfg = self.config
        mask = rollout.response_mask[idx]
        need_entropy = cfg.ent_coef > 0
        if out is None:
            out = sequence_forward(
                model, rollout.query_ids[idx], rollout.query_mask[idx], rollout.response_ids[idx], mask,
                temperature=cfg.temperature, with_values=cfg.uses_critic, with_entropy=need_entropy,
            )
        weights = rollout.is_weights[idx] if rollout.is_weights is not None else torch.ones_like(out["logprobs"])
        loss_tok, pstats = self.policy_loss(out["logprobs"], rollout, idx, advantages, weights)
        if cfg.uses_critic:
            vf_tok, v_clipped = self.value_loss(out["values"], rollout, idx, returns)
            loss_tok = loss_tok + cfg.vf_coef * vf_tok
            pstats["loss/value"] = vf_tok.detach()
            if v_clipped is not None:
                pstats["value/clipfrac"] = v_clipped.float()
        if need_entropy:  # entropy bonus; otherwise policy/entropy is measured once, during the rollout
            loss_tok = loss_tok - cfg.ent_coef * out["entropy"]
        if cfg.kl_penalty == "loss":  # KL to the reference as a loss term, with gradient through log π
            kl_tok = ops.kl_per_token(out["logprobs"], rollout.ref_logprobs[idx], cfg.kl_estimator)
            loss_tok = loss_tok + kl_coef * kl_tok
            pstats["loss/kl"] = kl_tok.detach()
        loss = ops.masked_sum(loss_tok, mask) / normaliser
        if is_deepspeed(accelerator):  # the engine divides by its gradient_accumulation_steps; ours already counts
            loss = loss * cfg.gradient_accumulation_steps
        accelerator.backward(loss)
        with torch.no_grad():
            n = mask.sum().float()
            akl = ops.approx_kl(out["logprobs"].detach(), rollout.logprobs[idx])
            stats.add("policy/approxkl", ops.masked_sum(akl, mask), n)
            for name, value in pstats.items():
                stats.add(name, ops.masked_sum(value, mask), n)
            mb_kl.add("kl", ops.masked_sum(akl, mask), n)


class PPO(MinibatchPolicyGradient):
    """Clipped surrogate ``max(-A·r, -A·clip(r, 1±ε))`` and clipped value loss, over ``ppo_epochs`` passes."""

    name = "ppo"

    @property
    def epochs(self) -> int:
        return self.config.ppo_epochs

    def policy_loss(self, new_logprobs, rollout, idx, advantages, weights):
        pg_tok, clipped, ratio = ops.ppo_policy_loss(new_logprobs, rollout.logprobs[idx], advantages[idx],
                                                     self.config.clip_range)
        pg_tok = weights * pg_tok  # truncated importance weights: 1 for fresh samples
        return pg_tok, {"loss/policy": pg_tok.detach(), "policy/clipfrac": clipped.float(),
                        "policy/ratio": ratio.detach()}

    def value_loss(self, new_values, rollout, idx, returns):
        return ops.clipped_value_loss(new_values, rollout.values[idx], returns[idx], self.config.clip_range_value)


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
