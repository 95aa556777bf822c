"""The minibatch update loop shared by PPO and REINFORCE; each gives only its per-token policy loss.

The update runs ``epochs`` passes over the batch; each pass draws a fresh permutation and cuts it into minibatches,
each minibatch into ``gradient_accumulation_steps`` micro-batches. Token losses are summed and divided by the number
of real tokens in the *global* minibatch, so the update does not depend on how the minibatch is split into
micro-batches or processes. Shared terms — value loss, entropy bonus, KL-to-reference as a loss, importance weights
of replayed samples — live here once.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .. import ops
from ..distributed import is_deepspeed
from ..forward import rollout_forward
from ..stats import MetricSums, global_sum
from .base import UpdateRule


class MinibatchPolicyGradient(UpdateRule):
    """The shared update loop of PPO and REINFORCE. Subclasses give ``policy_loss`` (and ``epochs``)."""

    @property
    def fuses_policy_forward(self) -> bool:
        """True when the update is ONE optimizer step over the whole local batch in one micro-batch, with the policy
        as it sampled — one pass, one minibatch, no gradient accumulation, no replay, dropout off: then the update's
        first forward is exactly the rollout's policy forward, and one forward per step is saved (about 1/8 of a
        critic-free step). ``fuse_policy_forward: false`` turns it off."""
        cfg = self.config
        return (
            cfg.fuse_policy_forward
            and self.epochs == 1
            and cfg.mini_batch_size == cfg.rollout_batch_size
            and cfg.gradient_accumulation_steps == 1
            and not cfg.replay_batch_size
            and cfg.disable_dropout
        )

    def training_forward(self, model, rollout) -> dict[str, torch.Tensor]:
        """The update's forward over the whole local batch, with gradients; fills the rollout's logprobs, values and
        entropy with its detached outputs. Returns the outputs for :meth:`update` to take the loss from."""
        cfg = self.config
        model.train()
        out = rollout_forward(
            model,
            rollout,
            cfg.temperature,
            with_values=self.uses_critic,
            with_entropy=True,
            entropy_grad=cfg.ent_coef > 0,
        )
        rollout.logprobs = out["logprobs"].detach()
        rollout.values = out["values"].detach() if "values" in out else torch.zeros_like(rollout.logprobs)
        rollout.entropy = out["entropy"].detach()
        return out

    def policy_loss(self, new_logprobs, rollout, idx, advantages, weights):
        """Per-token policy loss (B, T) and a dict of (B, T) statistics to average."""
        raise NotImplementedError

    def value_loss(self, new_values, rollout, idx, returns):
        """Per-token value loss (B, T) and its clipped flags (or None)."""
        return 0.5 * (new_values - returns[idx]) ** 2, None

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def update(
        self, model, optimizer, scheduler, accelerator, rollout, advantages, returns, kl_coef=0.0, first_forward=None
    ) -> dict[str, float]:
        """``epochs`` × minibatches of optimizer steps. Returns global mean metrics.

        first_forward: :meth:`training_forward`'s outputs (rows in rollout order), used by the first micro-batch
        instead of a second forward."""
        cfg = self.config
        P = accelerator.num_processes
        B = rollout.batch_size
        mb_size = cfg.mini_batch_size // P  # this process's share of a minibatch
        micro = mb_size // cfg.gradient_accumulation_steps
        b_mask = rollout.loss_mask  # real tokens of scorable samples
        stats = MetricSums()
        deepspeed = is_deepspeed(accelerator)
        early_stopped, epochs_done, n_updates = False, 0, 0
        micro_step = functools.partial(self._micro_step, model, accelerator, rollout, advantages, returns, kl_coef)
        model.train()
        for _epoch in range(self.epochs):
            perm = torch.randperm(B, device=b_mask.device)  # fresh permutation every epoch
            for mb_start in range(0, B, mb_size):
                mb_idx = perm[mb_start : mb_start + mb_size]
                # normaliser: real tokens of the *global* minibatch / P, because DDP averages gradients over P
                mb_tokens = global_sum(accelerator, b_mask[mb_idx].sum().float())
                normaliser = (mb_tokens / P).clamp(min=1.0)
                mb_approx_kl = MetricSums()
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
                        sums = micro_step(idx, normaliser, out)
                    for name, (total, count) in sums.items():
                        stats.add(name, total, count)
                    mb_approx_kl.add("approx_kl", *sums["policy/approxkl"])
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
                    approx_kl = mb_approx_kl.means(accelerator, b_mask.device)["approx_kl"]
                    if approx_kl > cfg.target_approx_kl:
                        early_stopped = True
                        break
            epochs_done += 1
            if early_stopped:
                break
        metrics = stats.means(accelerator, b_mask.device)
        metrics.update(
            {
                "policy/early_stopped": float(early_stopped),
                "policy/epochs": float(epochs_done),
                "policy/optimizer_steps": float(n_updates),
                "lr": scheduler.get_last_lr()[0],
            }
        )
        return metrics

    def _micro_step(
        self, model, accelerator, rollout, advantages, returns, kl_coef, idx, normaliser, out=None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Loss of the rows ``idx`` (their forward, unless ``out`` holds it), backward. Returns ``{metric: (sum over
        real tokens, real tokens)}`` of this micro-batch."""
        cfg = self.config
        mask = rollout.loss_mask[idx]
        need_entropy = cfg.ent_coef > 0
        if out is None:
            out = rollout_forward(
                model, rollout, cfg.temperature, with_values=self.uses_critic, with_entropy=need_entropy, rows=idx
            )
        weights = rollout.is_weights[idx] if rollout.is_weights is not None else torch.ones_like(out["logprobs"])
        loss_tok, pstats = self.policy_loss(out["logprobs"], rollout, idx, advantages, weights)
        if self.uses_critic:
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
            pstats["policy/approxkl"] = ops.approx_kl(out["logprobs"].detach(), rollout.logprobs[idx])
            return {name: (ops.masked_sum(value, mask), n) for name, value in pstats.items()}
