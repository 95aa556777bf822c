"""TRPO (Schulman et al. 2015) for language models: a natural-gradient step inside a KL trust region.

1. g = ∇ L(θ) at θ_old, with the surrogate L = mean_tokens(w · r · A) (+ entropy bonus, − β·KL-to-reference loss);
2. s ≈ F⁻¹ g by conjugate gradient, where F v is the Hessian-vector product of the mean per-token
   KL(π_old ‖ π_θ) over the rollout's response tokens (full next-token distributions), damped: (F + λI) v;
3. the step s · sqrt(2δ / sᵀFs), with the *undamped* curvature sᵀFs, is shortened until the exact mean KL is ≤ δ
   (``max_kl``) and the surrogate improved (see :meth:`TRPO._line_search`); if no try passes, the weights are left
   exactly as they were;
4. the value head is fitted by its own Adam optimizer on the rollout's returns (the trunk is not touched).

A non-finite surrogate, gradient, direction or curvature means no step at all (weights untouched), and a non-finite
value loss or gradient skips that value-head step; both count in ``policy/nonfinite_steps``. A line-search try whose
KL or gain is not finite is rejected like any other.

Only trainable parameters move (all of them, or just the PEFT adapters). Gradients, Fisher-vector products, KL and
surrogate values are summed over processes, so every process takes the same step.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import ops
from ..forward import response_outputs
from ..stats import global_sum
from ..value_model import critic_values
from .base import UpdateRule


class TRPO(UpdateRule):
    """A natural-gradient step inside a KL trust region of ``max_kl``; the value head has its own Adam."""

    name = "trpo"
    replay_refusal = "replay is for ppo and reinforce; TRPO's trust region is defined around the current policy"
    sharded_engine_refusal = (
        "algorithm=trpo flattens and line-searches every trainable weight itself, which a "
        "DeepSpeed or FSDP engine does not allow; use DDP (recipes/accelerate/ddp.yaml) or "
        "ppo/reinforce"
    )
    optimizer_hook_refusal = (
        "AdaLoRA needs an optimizer-step algorithm (ppo or reinforce), not trpo: the "
        "natural-gradient step does not go through the optimizer; use LoRA (or another adapter "
        "method) for TRPO"
    )

    def __init__(self, config):
        super().__init__(config)
        self.value_optimizer: torch.optim.Optimizer | None = None
        self._pending_value_state: dict | None = None  # from a checkpoint, applied when the optimizer is built

    @property
    def critic_steps_per_update(self) -> int:
        """A separate critic takes ``value_epochs`` steps per update (full batch each)."""
        return self.config.value_epochs

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["value_optimizer"] = self.value_optimizer.state_dict() if self.value_optimizer else None
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._pending_value_state = state.get("value_optimizer")

    # ---- forward pieces -------------------------------------------------------------------------------------------
    def _micro_batches(self, rollout, accelerator):
        size = max(
            self.config.mini_batch_size // accelerator.num_processes // self.config.gradient_accumulation_steps, 1
        )
        return [
            torch.arange(s, min(s + size, rollout.batch_size), device=rollout.response_mask.device)
            for s in range(0, rollout.batch_size, size)
        ]

    def _log_dist(self, lm, rollout, idx) -> torch.Tensor:
        """Temperature-scaled log-softmax over the vocabulary at each response position: (b, T, V) fp32."""
        logits = response_outputs(lm, **rollout.sequences(idx)).logits
        return torch.log_softmax(logits.float() / self.config.temperature, dim=-1)

    def _surrogate(self, log_dist, rollout, idx, advantages, kl_coef) -> torch.Tensor:
        """Σ over this micro-batch's real tokens of w·r·A (+ bonuses); divided by the global token count later."""
        cfg = self.config
        mask = rollout.loss_mask[idx]
        logprobs = log_dist.gather(-1, rollout.response_ids[idx].unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(logprobs - rollout.logprobs[idx])
        weights = rollout.is_weights[idx] if rollout.is_weights is not None else 1.0
        objective = weights * ratio * advantages[idx]
        if cfg.ent_coef > 0:
            objective = objective + cfg.ent_coef * -(log_dist.exp() * log_dist).sum(-1)
        if cfg.kl_penalty == "loss":
            kl_term, _ = ops.kl_loss_per_token(
                logprobs, rollout.ref_logprobs[idx], rollout.logprobs[idx], cfg.kl_estimator, cfg.use_bias_correction_kl
            )
            objective = objective - kl_coef * kl_term
        return ops.masked_sum(objective, mask)

    @staticmethod
    def _kl_sum(old_log_dist, new_log_dist, mask) -> torch.Tensor:
        """Σ over real tokens of KL(π_old ‖ π_new) between full next-token distributions."""
        kl = (old_log_dist.exp() * (old_log_dist - new_log_dist)).sum(-1)
        return ops.masked_sum(kl, mask)

    # ---- the update -------------------------------------------------------------------------------------------------
    def update(
        self, model, optimizer, scheduler, accelerator, rollout, advantages, returns, kl_coef=0.0, first_forward=None
    ) -> dict[str, float]:
        """One trust-region step of the trainable policy weights (``optimizer`` and ``scheduler`` are not used: the
        step is the natural gradient's), then the value-head fit."""
        cfg = self.config
        policy = accelerator.unwrap_model(model)  # plain forwards: every reduction below is explicit
        policy.train()
        lm = policy.pretrained_model
        shared = self.critic.shared_parameter_ids if self.critic is not None else frozenset()
        params = [
            p
            for n, p in policy.named_parameters()
            if p.requires_grad and not n.startswith("v_head.") and id(p) not in shared  # a LoRA critic's adapter
        ]
        if self.policy_frozen:  # value_model_warmup_steps: only the critic is fitted
            metrics = {"trpo/accepted": 0.0, "policy/nonfinite_steps": 0.0, "policy/frozen": 1.0}
            metrics.update(self._fit_critic(rollout, returns, accelerator))
            metrics["policy/nonfinite_steps"] += metrics.pop("value/nonfinite_steps")
            return metrics
        device = rollout.response_mask.device
        micro = self._micro_batches(rollout, accelerator)
        n_tok = global_sum(accelerator, rollout.loss_mask.sum().double()).clamp(min=1.0)
        reduce = functools.partial(global_sum, accelerator)  # every sum below is over all processes

        # old distributions (no grad) and the policy gradient g at θ_old
        old = []
        g = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=device)
        surrogate_old = torch.zeros((), dtype=torch.float64, device=device)
        for idx in micro:
            log_dist = self._log_dist(lm, rollout, idx)
            old.append(log_dist.detach())
            sur = self._surrogate(log_dist, rollout, idx, advantages, kl_coef)
            surrogate_old += sur.detach().double()
            grads = torch.autograd.grad(sur / n_tok.float(), params, allow_unused=True)
            g += _flat(grads, params)
        g = reduce(g)
        surrogate_old = reduce(surrogate_old) / n_tok

        def fvp(v: torch.Tensor) -> torch.Tensor:
            """(F + λI) v: double backward through the KL, on the math attention kernel (fused ones lack it)."""
            out = torch.zeros_like(v)
            with _math_attention():
                for idx, old_dist in zip(micro, old):
                    new_dist = self._log_dist(lm, rollout, idx)
                    kl = self._kl_sum(old_dist, new_dist, rollout.loss_mask[idx]) / n_tok
                    grads = torch.autograd.grad(kl.float(), params, create_graph=True, allow_unused=True)
                    grad_v = (_flat(grads, params) * v).sum()
                    out += _flat(torch.autograd.grad(grad_v, params, allow_unused=True), params)
            return reduce(out) + cfg.cg_damping * v

        g_norm = float(g.norm())  # g and surrogate_old are reduced: every process sees the same numbers
        metrics: dict[str, float] = {"policy/grad_norm": g_norm}
        theta_old = torch.cat([p.detach().flatten() for p in params])
        accepted, kl_new, gain, tries, frac = False, 0.0, 0.0, 0, 0.0
        nonfinite = not (math.isfinite(g_norm) and math.isfinite(float(surrogate_old)))
        if g_norm > 0 and not nonfinite:
            step_dir, residual = ops.conjugate_gradient(fvp, g, cfg.cg_iters)
            shs_damped = float(torch.dot(step_dir, fvp(step_dir)))
            # the step length comes from the *undamped* curvature sᵀFs: the damping only conditions CG, and scaling by
            # sᵀ(F + λI)s would land far inside the trust region (a quarter of max_kl on small models)
            shs = shs_damped - cfg.cg_damping * float(torch.dot(step_dir, step_dir))
            if not shs > 1e-12 * max(shs_damped, 1e-12):  # F's curvature along s vanished numerically: keep the damping
                shs = shs_damped
            full_step = step_dir * math.sqrt(2 * cfg.max_kl / max(shs, 1e-12))
            expected = float(torch.dot(g, full_step))
            metrics.update({"trpo/cg_residual": residual, "trpo/expected_gain": expected})
            # a NaN/inf direction or curvature (sᵀFs, the expected gain) moves nothing: no line search at all
            nonfinite = not (math.isfinite(shs) and math.isfinite(expected))
            if not nonfinite:
                accepted, kl_new, gain, tries, frac = self._line_search(
                    params, theta_old, full_step, expected, lm, rollout, micro, old, advantages, kl_coef, n_tok,
                    surrogate_old, reduce,
                )  # fmt: skip
            if not accepted:
                _assign(params, theta_old)  # a rejected search leaves the policy exactly as it was
        metrics.update(
            {
                "trpo/accepted": float(accepted),
                "trpo/kl": kl_new if accepted else 0.0,
                "trpo/surrogate_gain": gain if accepted else 0.0,
                "trpo/line_search_tries": float(tries),
                "trpo/step_fraction": frac if accepted else 0.0,
                "policy/approxkl": kl_new if accepted else 0.0,
                "loss/policy": -float(surrogate_old),
                "policy/nonfinite_steps": float(nonfinite),
            }
        )
        if self.uses_critic and self.critic is not None:
            metrics.update(self._fit_critic(rollout, returns, accelerator))
            metrics["policy/nonfinite_steps"] += metrics.pop("value/nonfinite_steps")
        elif self.uses_critic:
            metrics.update(self._fit_value_head(policy, rollout, returns, accelerator))
            metrics["policy/nonfinite_steps"] += metrics.pop("value/nonfinite_steps")
        return metrics

    def _line_search(
        self, params, theta_old, full_step, expected, lm, rollout, micro, old, advantages, kl_coef, n_tok,
        surrogate_old, reduce,
    ):  # fmt: skip
        """Find the step length along ``full_step`` (scaled so that the quadratic model predicts KL = δ).

        A try is accepted when its measured KL is ≤ δ, its surrogate gain positive and at least
        ``line_search_accept_ratio`` of the expected gain. A try over δ is shrunk to where the measured KL, quadratic
        in the step length, would be 0.9 δ; a try that does not improve enough is halved. An accepted first try whose
        measured KL is under 0.75 δ (the quadratic model over-estimated the curvature) is stretched once to a
        predicted 0.9 δ, and the longer step is kept only if it too is inside δ and gains more. Returns
        (accepted, kl, gain, tries, fraction of ``full_step`` taken); the weights hold the accepted step (or the last
        try: the caller restores θ_old when nothing was accepted)."""
        cfg = self.config
        frac, kl_new, gain = 1.0, 0.0, 0.0

        def ok(kl, gain, frac):  # a NaN KL or gain fails every comparison: that try is rejected
            return kl <= cfg.max_kl and gain > 0 and gain >= cfg.line_search_accept_ratio * frac * expected

        for tries in range(1, cfg.line_search_steps + 1):  # noqa: B007 (tries is read after the loop)
            _assign(params, theta_old + frac * full_step)
            kl_new, gain = self._evaluate(lm, rollout, micro, old, advantages, kl_coef, n_tok, surrogate_old, reduce)
            if ok(kl_new, gain, frac):
                break
            if math.isfinite(kl_new) and kl_new > cfg.max_kl:  # the KL is quadratic in the step length
                frac *= 0.9 * math.sqrt(cfg.max_kl / kl_new)
            else:
                frac *= 0.5
        else:
            return False, kl_new, gain, cfg.line_search_steps, frac
        if tries == 1 and 0 < kl_new < 0.75 * cfg.max_kl and tries < cfg.line_search_steps:
            stretch = min(math.sqrt(0.9 * cfg.max_kl / kl_new), 4.0)
            _assign(params, theta_old + stretch * full_step)
            kl_s, gain_s = self._evaluate(lm, rollout, micro, old, advantages, kl_coef, n_tok, surrogate_old, reduce)
            tries += 1
            if ok(kl_s, gain_s, stretch) and gain_s > gain:
                return True, kl_s, gain_s, tries, stretch
            _assign(params, theta_old + frac * full_step)  # back to the accepted first try
        return True, kl_new, gain, tries, frac

    @torch.no_grad()
    def _evaluate(self, lm, rollout, micro, old, advantages, kl_coef, n_tok, surrogate_old, reduce):
        kl = torch.zeros((), dtype=torch.float64, device=n_tok.device)
        sur = torch.zeros((), dtype=torch.float64, device=n_tok.device)
        for idx, old_dist in zip(micro, old):
            new_dist = self._log_dist(lm, rollout, idx)
            kl += self._kl_sum(old_dist, new_dist, rollout.loss_mask[idx]).double()
            sur += self._surrogate(new_dist, rollout, idx, advantages, kl_coef).double()
        kl, sur = reduce(kl) / n_tok, reduce(sur) / n_tok
        return float(kl), float(sur - surrogate_old)

    def _fit_critic(self, rollout, returns, accelerator) -> dict[str, float]:
        """Fit the separate critic (``value_model``) on the returns: ``value_epochs`` full-batch steps of its own
        optimizer and scheduler, micro-batch by micro-batch (gradients synced on the last), clipped to
        ``max_grad_norm``. A step whose global loss or gradient norm is NaN/inf is skipped
        (``value/nonfinite_steps``)."""
        cfg, critic = self.config, self.critic
        critic.model.train()
        mask = rollout.loss_mask
        n_tok = global_sum(accelerator, mask.sum().float()).clamp(min=1.0)
        micro = self._micro_batches(rollout, accelerator)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
        first = last = None
        skipped = 0
        for _ in range(cfg.value_epochs):
            total = torch.zeros((), dtype=torch.float64, device=mask.device)
            for k, idx in enumerate(micro):
                sync = contextlib.nullcontext() if k == len(micro) - 1 else accelerator.no_sync(critic.model)
                with sync:
                    values = critic_values(critic.model, rollout, rows=idx)
                    loss = ops.masked_sum(0.5 * (values - returns[idx]) ** 2, mask[idx]) / n_tok
                    # DDP averages over P processes; the loss is already divided by the global token count
                    accelerator.backward(loss * accelerator.num_processes)
                total += loss.detach().double()
            norm = torch.as_tensor(accelerator.clip_grad_norm_(critic.model.parameters(), max_norm)).double()
            last, norm = global_sum(accelerator, torch.stack([total, norm.to(total.device)])).tolist()
            first = last if first is None else first
            if math.isfinite(last) and math.isfinite(norm):  # the same reduced numbers on every process
                critic.optimizer.step()
                critic.scheduler.step()
            else:
                skipped += 1
            critic.optimizer.zero_grad(set_to_none=True)
        return {
            "loss/value": first,
            "value/loss_after_fit": last,
            "value/nonfinite_steps": float(skipped),
            "value/lr": critic.scheduler.get_last_lr()[0],
        }

    def _fit_value_head(self, policy, rollout, returns, accelerator) -> dict[str, float]:
        """Fit only the value head on the returns, with its own Adam (the trunk's hidden states are fixed). An epoch
        whose (global) loss or gradient is NaN/inf takes no step; ``value/nonfinite_steps`` counts them."""
        cfg = self.config
        if self.value_optimizer is None:
            self.value_optimizer = torch.optim.Adam(policy.v_head.parameters(), lr=cfg.value_learning_rate)
            pending = self._pending_value_state
            if pending:
                self.value_optimizer.load_state_dict(pending)
        with torch.no_grad():
            hidden = torch.cat(
                [
                    response_outputs(policy, **rollout.sequences(idx), last_hidden_state=True, logits=False).hidden
                    for idx in self._micro_batches(rollout, accelerator)
                ]
            )  # (B, T, H)
        mask = rollout.loss_mask
        n_tok = global_sum(accelerator, mask.sum().float()).clamp(min=1.0)
        first = last = None
        skipped = 0
        for _ in range(cfg.value_epochs):
            values = policy.v_head(hidden)
            loss = ops.masked_sum(0.5 * (values - returns) ** 2, mask) / n_tok
            self.value_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p for p in policy.v_head.parameters() if p.grad is not None]
            for p in grads:  # average over processes by hand (no DDP here)
                p.grad = global_sum(accelerator, p.grad)
            last = float(global_sum(accelerator, loss.detach()))  # local sum / global tokens -> summed: global mean
            first = last if first is None else first
            # the reduced loss and gradients are the same on every process, so every process decides the same
            if math.isfinite(last) and all(bool(torch.isfinite(p.grad).all()) for p in grads):
                self.value_optimizer.step()
            else:
                skipped += 1
        self.value_optimizer.zero_grad(set_to_none=True)
        return {"loss/value": first, "value/loss_after_fit": last, "value/nonfinite_steps": float(skipped)}


def _math_attention():
    """Scaled-dot-product attention on the math backend, which (unlike flash/efficient kernels) supports the double
    backward of Fisher-vector products."""
    return sdpa_kernel([SDPBackend.MATH])


def _flat(grads, params) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)])


@torch.no_grad()
def _assign(params, flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[offset : offset + n].view_as(p).to(p.dtype))
        offset += n
