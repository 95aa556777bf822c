"""Pure tensor maths for policy-gradient training of language models.

No state, no models, no distributed calls: every function takes tensors and returns tensors, so each one can be
unit-tested against hand-computed values. Shapes use ``B`` for the batch, ``T`` for response tokens and ``V`` for
the vocabulary.

One mask convention everywhere: ``mask`` is a bool (or 0/1) tensor, **True = a real response token** (keep it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


# --------------------------------------------------------------------------------------------------------------
# masked statistics
# --------------------------------------------------------------------------------------------------------------
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the positions where ``mask`` is True. x, mask: same shape."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over real positions; 0 where there are none (never NaN)."""
    mask = mask.to(x.dtype)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` at real positions; padding stays 0.

    The statistics come from the caller (:func:`hfpg.stats.global_whiten` takes them over the real positions of the
    global batch). ``shift_mean=False`` restores the mean after scaling (advantages are whitened with the mean
    removed, rewards with it restored).
    """
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


# --------------------------------------------------------------------------------------------------------------
# logprobs and entropy
# --------------------------------------------------------------------------------------------------------------
def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, chunk_size: int = 8
) -> torch.Tensor:
    """Log-probability of ``labels`` under ``softmax(logits / temperature)``.

    logits: (B, T, V), labels: (B, T) -> (B, T), in fp32.
    Uses ``gather - logsumexp`` and processes ``chunk_size`` rows at a time, so no full-vocabulary (B, T, V)
    log-softmax (nor a temperature-scaled fp32 copy of all logits) is ever materialised.
    """
    out = []
    for start in range(0, logits.shape[0], chunk_size):
        chunk = logits[start : start + chunk_size].float()  # (b, T, V) fp32 copy of one chunk only
        if temperature != 1.0:
            chunk = chunk / temperature
        picked = chunk.gather(-1, labels[start : start + chunk_size].unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out, dim=0)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 8) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` per position. logits: (B, T, V) -> (B, T), fp32."""
    out = []
    for start in range(0, logits.shape[0], chunk_size):
        chunk = logits[start : start + chunk_size].float()
        if temperature != 1.0:
            chunk = chunk / temperature
        lse = torch.logsumexp(chunk, dim=-1, keepdim=True)
        p = torch.exp(chunk - lse)
        p_logit = torch.where(p > 0, p * chunk, torch.zeros_like(chunk))  # 0 · (-inf) from masked logits is 0
        out.append(lse.squeeze(-1) - p_logit.sum(-1))
    return torch.cat(out, dim=0)


def response_positions(x: torch.Tensor, response_length: int) -> torch.Tensor:
    """The outputs that predict the response tokens: position t predicts token t+1, hence ``x[:, -(T+1):-1]``.

    x: (B, L, ...) model outputs (logits, values, hidden states) over a sequence that ends with the T response tokens
    (L = prompt + T, or L = T + 1 when only the last T + 1 positions were computed) -> (B, T, ...). On full-sequence
    logits with prompt length P this is ``logits[:, P-1:-1]``.
    """
    return x[:, -(response_length + 1) : -1]


# --------------------------------------------------------------------------------------------------------------
# stop tokens and masks
# --------------------------------------------------------------------------------------------------------------
def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True in each row of ``bools`` (B, T); ``T`` where a row has none. -> (B,) long."""
    T = bools.shape[-1]
    idx = torch.arange(T, device=bools.device).expand_as(bools)
    return torch.where(bools, idx, torch.full_like(idx, T)).min(dim=-1).values


def truncate_at_stop(
    responses: torch.Tensor, stop_token_ids: Sequence[int], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each response up to and including its first stop token; everything after becomes padding.

    responses: (B, T) -> (responses (B, T), mask (B, T) bool, has_stop (B,) bool).
    The stop token itself stays a real token (mask True), even when it equals the pad token.
    """
    is_stop = torch.zeros_like(responses, dtype=torch.bool)
    for tok in stop_token_ids:
        is_stop |= responses == tok
    first = first_true_indices(is_stop)  # (B,)
    positions = torch.arange(responses.shape[1], device=responses.device).unsqueeze(0)
    mask = positions <= first.unsqueeze(1)
    truncated = torch.where(mask, responses, torch.full_like(responses, pad_token_id))
    return truncated, mask, first < responses.shape[1]


def last_token_indices(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row (B,) for a right-padded response mask (B, T); -1 for an empty row."""
    return mask.long().sum(-1) - 1


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: the first real token is position 0. (B, L) -> (B, L) long."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.clamp(min=0)


# --------------------------------------------------------------------------------------------------------------
# KL and rewards
# --------------------------------------------------------------------------------------------------------------
def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token logprobs (Schulman, "Approximating KL").

    k1 = log r,  k2 = ½ (log r)²,  k3 = (1/r) - 1 + log r  with  log r = logp - logp_ref.
    k1 is unbiased but can be negative; k2 and k3 are >= 0 (k3 unbiased, k2 low-variance, biased). (B, T) -> (B, T).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def kl_loss_per_token(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    estimator: str = "k3",
    bias_correction: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token KL term of ``kl_penalty: loss`` and the KL estimate itself: ``(term (B, T), kl (B, T))``.

    The tokens were sampled from π_old, so differentiating the estimate alone does not give the gradient of
    KL(π ‖ π_ref): for k3, ∇k3 = (1 − π_ref/π)·∇log π, whose expectation is the gradient of KL(π_ref ‖ π) (the
    forward KL, mass-covering). ``bias_correction`` weights each token's estimate by its importance ratio
    ``π/π_old`` (with gradient; 1 in value on the first pass): ∇(r·k3) = log(π/π_ref)·∇log π at r = 1, the
    score-function gradient of KL(π ‖ π_ref) itself. TRL's GRPO calls this ``use_bias_correction_kl``.
    """
    kl = kl_per_token(logprobs, ref_logprobs, estimator)
    if not bias_correction:
        return kl, kl
    return kl * torch.exp(logprobs - old_logprobs), kl


def token_level_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * kl`` at every real token, plus the sequence score at the last real token.

    scores: (B,), kl: (B, T), mask: (B, T) -> (rewards (B, T), non_score_rewards (B, T)); padding is exactly 0.
    """
    mask = mask.bool()
    non_score = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    rewards = non_score.clone()
    last = last_token_indices(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    has_token = last >= 0
    rewards[rows[has_token], last[has_token]] += scores[has_token].to(rewards.dtype)
    return rewards, non_score


# --------------------------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------------------------
def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

    rewards, values, mask: (B, T) -> (advantages, returns), both (B, T), zero on padding.
    The episode ends after the last real token (its next value is 0). ``returns = advantages + values`` is taken
    here, before any whitening of the advantages.
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    values = torch.where(mask, values, torch.zeros_like(values))
    T = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    advantages = torch.where(mask, advantages, torch.zeros_like(advantages))
    returns = torch.where(mask, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Monte-Carlo returns G_t = Σ_k γ^k r_{t+k} within each response. (B, T) -> (B, T), zero on padding."""
    mask = mask.bool()
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    running = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out.append(running)
    returns = torch.stack(out[::-1], dim=1)
    return torch.where(mask, returns, torch.zeros_like(returns))


# --------------------------------------------------------------------------------------------------------------
# losses (token-level; the caller chooses the normaliser so gradient accumulation and processes stay exact)
# --------------------------------------------------------------------------------------------------------------
def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    clip_range_high: float | None = None,
    mask: torch.Tensor | None = None,
    importance_sampling_level: str = "token",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate per token: ``max(-A·r, -A·clip(r, 1-ε, 1+ε_high))``; ``ε_high`` (DAPO's clip-higher)
    defaults to ``ε``. The ratio ``r`` is, by ``importance_sampling_level``:

    - ``token``: ``exp(logp - logp_old)``;
    - ``sequence`` (GSPO, Zheng et al. 2025; needs ``mask``): ``s_i = exp(mean over the real tokens of sequence i of
      (logp - logp_old))``, used in GSPO's token form ``s_i,t = sg[s_i] · π_t / sg[π_t]``: equal to ``s_i`` at every
      token (so the whole sequence is clipped or not), with gradient ``s_i · ∇log π_t`` per token.

    All (B, T) -> (loss (B, T), clipped (B, T) bool: the clipped branch was taken, ratio (B, T)).
    """
    high = clip_range if clip_range_high is None else clip_range_high
    if importance_sampling_level == "token":
        ratio = torch.exp(logprobs - old_logprobs)
    elif importance_sampling_level == "sequence":
        if mask is None:
            raise ValueError("importance_sampling_level='sequence' needs the mask of real tokens")
        seq_log_ratio = masked_sum(logprobs - old_logprobs, mask, dim=1) / mask.sum(1).clamp(min=1)  # (B,)
        ratio = torch.exp(seq_log_ratio.detach().unsqueeze(1) + logprobs - logprobs.detach())
    else:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', not {importance_sampling_level!r}")
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    return torch.maximum(unclipped, clipped), clipped > unclipped, ratio


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_range_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``½·max((V - R)², (clip(V, V_old ± ε_v) - R)²)`` per token. (B, T) -> (loss (B, T), clipped (B, T) bool)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(loss_unclipped, loss_clipped), loss_clipped > loss_unclipped


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(old || new) per token, ``(r - 1) - log r`` (>= 0, 0 when nothing moved). (B, T) -> (B, T)."""
    log_ratio = logprobs - old_logprobs
    return torch.expm1(log_ratio) - log_ratio


def pg_loss(logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE per-token loss ``-A · log π(a_t)``; its gradient is ``-A ∇log π``. (B, T) -> (B, T)."""
    return -advantages * logprobs


# --------------------------------------------------------------------------------------------------------------
# critic-free baselines over groups of k samples of the same prompt (rows of one group are contiguous)
# --------------------------------------------------------------------------------------------------------------
def leave_one_out_baseline(returns: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """RLOO: each sample's baseline is the mean return of the *other* k-1 samples of its prompt.

    returns: (B,) with B = n_groups · k, groups contiguous -> baseline (B,). Needs k >= 2. ``valid`` (B,) bool: only
    those samples enter baselines (unscorable ones do not); a sample with no valid other sample gets its own return
    (advantage 0).
    """
    if group_size < 2:
        raise ValueError(f"leave_one_out needs at least 2 samples per prompt, got {group_size}")
    if valid is None:
        g = returns.view(-1, group_size)
        return ((g.sum(1, keepdim=True) - g) / (group_size - 1)).view(-1)
    w = valid.to(returns.dtype).view(-1, group_size)
    g = returns.view(-1, group_size) * w
    others = w.sum(1, keepdim=True) - w
    baseline = (g.sum(1, keepdim=True) - g) / others.clamp(min=1)
    return torch.where(others > 0, baseline, returns.view(-1, group_size)).view(-1)


def group_normalized(
    returns: torch.Tensor,
    seq_returns: torch.Tensor,
    group_size: int,
    eps: float = 1e-6,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO-style advantage: ``(G - mean_group G_0) / (std_group G_0 + eps)``, with the mean and the (Bessel-corrected)
    std of the sequence returns ``G_0`` of each sample's prompt group.

    returns: (B,) or (B, T) (per-token returns G_t), seq_returns: (B,) with B = n_groups · k, groups contiguous ->
    returns' shape. Needs k >= 2. ``valid`` (B,) bool: only those samples enter a group's mean and std; a group with
    fewer than two valid samples has std 0.
    """
    if group_size < 2:
        raise ValueError(f"group_norm needs at least 2 samples per prompt, got {group_size}")
    if valid is None:
        g = seq_returns.view(-1, group_size)
        mean, std = g.mean(1), g.std(1)
    else:
        w = valid.to(seq_returns.dtype).view(-1, group_size)
        n = w.sum(1)
        mean = (seq_returns.view(-1, group_size) * w).sum(1) / n.clamp(min=1)
        sq = ((seq_returns.view(-1, group_size) - mean[:, None]) ** 2 * w).sum(1)
        std = torch.where(n > 1, (sq / (n - 1).clamp(min=1)).sqrt(), torch.zeros_like(mean))
    mean, std = mean.repeat_interleave(group_size), std.repeat_interleave(group_size)  # (B,)
    shape = (-1,) + (1,) * (returns.dim() - 1)
    return (returns - mean.view(shape)) / (std.view(shape) + eps)


def groups_with_spread(
    scores: torch.Tensor, group_size: int, valid: torch.Tensor | None = None, tol: float = 1e-6
) -> torch.Tensor:
    """DAPO's dynamic-sampling filter: (n_groups,) bool, True where the scores of a prompt group's samples differ.

    scores: (B,) with B = n_groups · k, groups contiguous. ``valid`` (B,) bool: only those samples count (unscorable
    ones do not); a group with fewer than two valid samples has no spread. Scores within ``tol · (1 + |score|)`` of
    each other are equal.
    """
    g = scores.view(-1, group_size).float()
    w = torch.ones_like(g, dtype=torch.bool) if valid is None else valid.view(-1, group_size).to(g.device)
    high = torch.where(w, g, -torch.inf).amax(1)
    low = torch.where(w, g, torch.inf).amin(1)
    scale = 1.0 + torch.maximum(high.abs(), low.abs())
    return (w.sum(1) >= 2) & (high - low > tol * scale)


# --------------------------------------------------------------------------------------------------------------
# conjugate gradient (TRPO's natural-gradient direction)
# --------------------------------------------------------------------------------------------------------------
def conjugate_gradient(
    matvec, b: torch.Tensor, iters: int = 10, residual_tol: float = 1e-10
) -> tuple[torch.Tensor, float]:
    """Solve ``A x = b`` for symmetric positive-definite ``A`` given only ``matvec(v) = A v``. (N,) -> ((N,), |r|²)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = torch.dot(r, r)
    for _ in range(iters):
        if rr < residual_tol:
            break
        Ap = matvec(p)
        alpha = rr / torch.dot(p, Ap)
        x += alpha * p
        r -= alpha * Ap
        rr_new = torch.dot(r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, float(rr)
