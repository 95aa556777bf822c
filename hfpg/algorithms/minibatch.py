"""The minibatch update loop shared by PPO and REINFORCE; each gives only its per-token policy loss.

The update runs ``epochs`` passes over the batch; each pass draws a fresh permutation and cuts it into minibatches,
each minibatch into ``gradient_accumulation_steps`` micro-batches. The loss of a minibatch is a weighted sum of its
token losses over a normaliser counted over the *global* minibatch (``loss_type``):

=========  ==============================  =====================================================================
loss_type  weight of a real token of seq i  normaliser
=========  ==============================  =====================================================================
dapo       1                               real tokens of the global minibatch
grpo       1 / (real tokens of i)          sequences of the global minibatch with at least one real token
dr_grpo    1                               sequences of the global minibatch × max_new_tokens (a constant)
=========  ==============================  =====================================================================

so the update does not depend on how the minibatch is split into micro-batches or processes. Every term of the token
loss — policy, value, entropy bonus, KL-to-reference as a loss — goes through the same weighted sum. With
``mask_truncated_completions`` the completions without a stop token (``has_stop`` False, what ``missing_eos_penalty``
penalises) leave the loss mask, hence every term and the normaliser (dr_grpo's stays the constant); they still count
in the advantages' group statistics. Shared terms — value loss, entropy bonus, KL-to-reference as a loss, importance
weights of replayed samples — live here once.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from .. import ops
from ..distributed import is_deepspeed
from ..errors import TrainingError
from ..forward import rollout_forward
from ..stats import MetricSums, global_sum
from ..value_model import critic_values
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
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.policy_frozen):
            out = rollout_forward(
                model,
                rollout,
                cfg.temperature,
                with_values=self.uses_critic and self.critic is None,
                with_entropy=True,
                entropy_grad=cfg.ent_coef > 0,
                logits_chunk_size=cfg.logits_chunk_size,
            )
        if self.uses_critic and self.critic is not None:  # the values come from the critic, never the policy
            self.critic.model.train()
            out["values"] = critic_values(self.critic.model, rollout)
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

    def update_mask(self, rollout) -> torch.Tensor:
        """(B, T) bool: the tokens whose losses enter the update — the rollout's loss mask, less the completions
        without a stop token when ``mask_truncated_completions``."""
        mask = rollout.loss_mask
        if self.config.mask_truncated_completions:
            mask = mask & rollout.has_stop.to(mask.device).unsqueeze(1)
        return mask

    def token_weights(self, mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``loss_type`` as weights: mask (B, T) -> (weight of each real token (B, 1), or None for 1; what each
        sequence adds to the minibatch's normaliser (B,))."""
        cfg = self.config
        lengths = mask.sum(1).float()
        if cfg.loss_type == "grpo":  # a mean over each sequence's own tokens, then over sequences
            return (1.0 / lengths.clamp(min=1.0)).unsqueeze(1), (lengths > 0).float()
        if cfg.loss_type == "dr_grpo":  # Dr. GRPO: a constant, every sequence counts max_new_tokens
            return None, torch.full_like(lengths, float(cfg.max_new_tokens))
        return None, lengths  # dapo: a mean over the global minibatch's tokens

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def update(
        self, model, optimizer, scheduler, accelerator, rollout, advantages, returns, kl_coef=0.0, first_forward=None
    ) -> dict[str, float]:
        """``epochs`` × minibatches of optimizer steps. Returns global mean metrics.

        first_forward: :meth:`training_forward`'s outputs (rows in rollout order), used by the first micro-batch
        instead of a second forward.

        A minibatch whose loss (any micro-batch) or global gradient norm is NaN/inf on any process takes no optimizer
        step: its gradients are dropped and the weights stay bit-identical (``policy/nonfinite_steps`` counts these;
        see :meth:`_finish_minibatch`)."""
        cfg = self.config
        P = accelerator.num_processes
        B = rollout.batch_size
        mb_size = cfg.mini_batch_size // P  # this process's share of a minibatch
        micro = mb_size // cfg.gradient_accumulation_steps
        b_mask = self.update_mask(rollout)  # real tokens of scorable (and, if asked, stopped) samples
        b_weight, b_count = self.token_weights(b_mask)
        stats = MetricSums()
        deepspeed = is_deepspeed(accelerator)
        early_stopped, epochs_done, n_updates, n_nonfinite, n_overflow = False, 0, 0, 0, 0
        micro_step = functools.partial(
            self._micro_step, model, accelerator, rollout, advantages, returns, kl_coef, b_mask, b_weight
        )
        if cfg.mask_truncated_completions:  # the share of sequences left out for want of a stop token
            stats.add("policy/truncated_masked_fraction", (~rollout.has_stop).float().sum(), float(B))
        model.train()
        if self.critic is not None:
            self.critic.model.train()
        for _epoch in range(self.epochs):
            perm = torch.randperm(B, device=b_mask.device)  # fresh permutation every epoch
            for mb_start in range(0, B, mb_size):
                mb_idx = perm[mb_start : mb_start + mb_size]
                # normaliser: counted over the *global* minibatch (loss_type), / P because DDP averages over P
                normaliser = global_sum(accelerator, b_count[mb_idx].sum()).clamp(min=1.0) / P
                mb_approx_kl = MetricSums()
                loss_bad = torch.zeros((), dtype=torch.bool, device=b_mask.device)  # a non-finite micro-batch loss
                for k, micro_start in enumerate(range(0, mb_size, micro)):
                    idx = mb_idx[micro_start : micro_start + micro]
                    last = k == cfg.gradient_accumulation_steps - 1
                    sync = contextlib.ExitStack()
                    if not last:
                        sync.enter_context(accelerator.no_sync(model))
                        if self.critic is not None:
                            sync.enter_context(accelerator.no_sync(self.critic.model))
                    if deepspeed:  # the engine steps (clip, optimizer, zero_grad) at the boundary Accelerate reports
                        accelerator.gradient_state._set_sync_gradients(last)
                    out = None
                    if first_forward is not None:  # the rows of idx, from the forward that is already done
                        out, first_forward = {k: v[idx] for k, v in first_forward.items()}, None
                    with sync:
                        sums, loss = micro_step(idx, normaliser, out)
                    loss_bad |= ~torch.isfinite(loss)  # no sync: read once per optimizer step
                    for name, (total, count) in sums.items():
                        stats.add(name, total, count)
                    mb_approx_kl.add("approx_kl", *sums["policy/approxkl"])
                outcome = self._finish_minibatch(model, optimizer, scheduler, accelerator, loss_bad, stats)
                n_updates += outcome == "stepped"
                n_nonfinite += outcome == "nonfinite"
                n_overflow += outcome == "overflow"
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
                "policy/nonfinite_steps": float(n_nonfinite),
                "lr": scheduler.get_last_lr()[0],
            }
        )
        if self.critic is not None:
            metrics["value/lr"] = self.critic.scheduler.get_last_lr()[0]
            metrics["policy/frozen"] = float(self.policy_frozen)
        if accelerator.mixed_precision == "fp16":  # loss scaling (torch's GradScaler or DeepSpeed's)
            metrics["policy/overflow_steps"] = float(n_overflow)
        return metrics

    def _finish_minibatch(self, model, optimizer, scheduler, accelerator, loss_bad, stats) -> str:
        """After the minibatch's backward passes: measure the global gradient norm (clipping to ``max_grad_norm``),
        then step the optimizer, the scheduler and the after-step hook — unless the step must be skipped.

        Returns ``"stepped"``; ``"nonfinite"`` when the loss of a micro-batch or the gradient norm was NaN/inf on any
        process (one reduction, so that every process decides the same): the gradients are dropped and neither the
        optimizer nor the scheduler steps, so the weights and the optimizer state stay bit-identical; or
        ``"overflow"`` for fp16's loss scaling: a finite loss whose scaled gradients overflowed is the scaler's
        normal business (it skips the step and lowers its scale; the first steps of a run often do), counted as
        ``policy/overflow_steps``, not toward ``max_nonfinite_steps``.

        The scheduler follows the optimizer's steps, as transformers' Trainer does on an fp16 overflow (and
        DeepSpeed's engine on a skipped step): a skipped step does not advance warm-up or decay, so the schedule
        counts the updates the weights actually received.

        DeepSpeed: the engine already stepped (clip, optimizer, zero_grad) inside the last micro-batch's backward and
        hfpg cannot veto it. Its fp16 loss scaler skips a step whose gradients hold NaN/inf (``step_was_skipped``):
        then nothing moved and it counts here like any other skipped step. Its bf16 / fp32 optimizers check nothing,
        so a non-finite step it applied may have broken the weights: that raises :class:`~hfpg.errors.TrainingError`
        at once, before anything is saved."""
        cfg = self.config
        P = accelerator.num_processes
        deepspeed = is_deepspeed(accelerator)
        # the global norm, measured even without clipping (inf never clips); DeepSpeed returns the one it measured
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        if isinstance(grad_norm, torch.Tensor) and callable(getattr(grad_norm, "full_tensor", None)):
            grad_norm = grad_norm.full_tensor()  # FSDP2: a DTensor; a plain tensor to reduce with the flag
        device = loss_bad.device
        norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm).to(device=device, dtype=torch.float64)
        critic = self.critic
        critic_norm = torch.zeros((), dtype=torch.float64, device=device)
        if critic is not None:  # clipped on its own: gradient clipping is per model
            critic_norm = torch.as_tensor(accelerator.clip_grad_norm_(critic.model.parameters(), max_norm))
            critic_norm = critic_norm.to(device=device, dtype=torch.float64)
        # (processes with a non-finite loss, P × the global norm, P × the critic's): one reduction per optimizer step
        flags = torch.stack([loss_bad.double(), norm.reshape(()), critic_norm.reshape(())])
        n_loss_bad, norm_sum, critic_norm_sum = global_sum(accelerator, flags).tolist()
        loss_nonfinite = n_loss_bad > 0
        norm_nonfinite = not (math.isfinite(norm_sum) and math.isfinite(critic_norm_sum))
        if grad_norm is not None and not norm_nonfinite:
            stats.add("policy/grad_norm", norm_sum / P / P, 1.0 / P)  # the global norm, the same on every process
        if critic is not None and not norm_nonfinite:
            stats.add("value/grad_norm", critic_norm_sum / P / P, 1.0 / P)
        if deepspeed:
            skipped = bool(getattr(optimizer, "step_was_skipped", False))
            if (loss_nonfinite or norm_nonfinite) and not skipped:
                raise TrainingError(
                    "DeepSpeed applied an optimizer step whose loss or gradient norm was NaN or infinite (its bf16 / "
                    "fp32 optimizers do not skip such steps), so the weights may no longer be finite; resume from "
                    "the last checkpoint with a lower learning_rate, max_grad_norm set, and a reward without huge "
                    "values"
                )
            if skipped:  # nothing moved; our scheduler skips the step with the engine
                return "nonfinite" if loss_nonfinite else "overflow"
            outcome = "stepped"
        elif loss_nonfinite or norm_nonfinite:
            optimizer.zero_grad(set_to_none=True)
            if critic is not None:
                critic.optimizer.zero_grad(set_to_none=True)
            if accelerator.scaler is not None:  # fp16: consume the inf check of unscale_ (done by clip_grad_norm_)
                accelerator.scaler.update()  # and lower the scale on an overflow, as scaler.step + update would
            return "overflow" if accelerator.scaler is not None and not loss_nonfinite else "nonfinite"
        else:
            if not self.policy_frozen:  # value_model_warmup_steps: the policy's weights stay bit-identical
                optimizer.step()
            if critic is not None:
                critic.optimizer.step()
            outcome = "stepped"
        if not self.policy_frozen:
            scheduler.step()
            if self.after_optimizer_step is not None:  # e.g. AdaLoRA's rank allocation (reads gradients)
                self.after_optimizer_step()
        if critic is not None:
            critic.scheduler.step()
            critic.optimizer.zero_grad(set_to_none=True)
        optimizer.zero_grad(set_to_none=True)
        return outcome

    def _micro_step(
        self, model, accelerator, rollout, advantages, returns, kl_coef, b_mask, b_weight, idx, normaliser, out=None
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Loss of the rows ``idx`` (their forward, unless ``out`` holds it), backward. b_mask (B, T) and b_weight
        (B, 1) or None: :meth:`update_mask` and :meth:`token_weights` of the whole batch. Returns ``{metric: (sum over
        real tokens, real tokens)}`` of this micro-batch and its (detached) loss, to check that it is finite."""
        cfg = self.config
        mask = b_mask[idx]
        need_entropy = cfg.ent_coef > 0
        if out is None:
            with torch.set_grad_enabled(not self.policy_frozen):  # warm-up: no graph through the policy at all
                out = rollout_forward(
                    model,
                    rollout,
                    cfg.temperature,
                    with_values=self.uses_critic and self.critic is None,
                    with_entropy=need_entropy,
                    rows=idx,
                    logits_chunk_size=cfg.logits_chunk_size,
                )
            if self.uses_critic and self.critic is not None:  # the critic's own forward, with gradients
                out["values"] = critic_values(self.critic.model, rollout, rows=idx)
        weights = rollout.is_weights[idx] if rollout.is_weights is not None else torch.ones_like(out["logprobs"])
        loss_tok, pstats = self.policy_loss(out["logprobs"], rollout, idx, advantages, weights)
        if self.policy_frozen:
            loss_tok = loss_tok.detach()
        if self.uses_critic:
            vf_tok, v_clipped = self.value_loss(out["values"], rollout, idx, returns)
            loss_tok = loss_tok + cfg.vf_coef * vf_tok
            pstats["loss/value"] = vf_tok.detach()
            if v_clipped is not None:
                pstats["value/clipfrac"] = v_clipped.float()
        if need_entropy:  # entropy bonus; otherwise policy/entropy is measured once, during the rollout
            loss_tok = loss_tok - cfg.ent_coef * (out["entropy"].detach() if self.policy_frozen else out["entropy"])
        if cfg.kl_penalty == "loss":  # KL to the reference as a loss term, with gradient through log π
            kl_term, kl_tok = ops.kl_loss_per_token(
                out["logprobs"],
                rollout.ref_logprobs[idx],
                rollout.logprobs[idx],
                cfg.kl_estimator,
                cfg.use_bias_correction_kl,
            )
            loss_tok = loss_tok + kl_coef * (kl_term.detach() if self.policy_frozen else kl_term)
            pstats["loss/kl"] = kl_tok.detach()
        if b_weight is not None:
            loss_tok = loss_tok * b_weight[idx]
        loss = ops.masked_sum(loss_tok, mask) / normaliser
        if is_deepspeed(accelerator):  # the engine divides by its gradient_accumulation_steps; ours already counts
            loss = loss * cfg.gradient_accumulation_steps
        accelerator.backward(loss)
        with torch.no_grad():
            n = mask.sum().float()
            pstats["policy/approxkl"] = ops.approx_kl(out["logprobs"].detach(), rollout.logprobs[idx])
            return {name: (ops.masked_sum(value, mask), n) for name, value in pstats.items()}, loss.detach()
