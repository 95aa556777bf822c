"""Unit tests for the pure tensor maths in :mod:`hfpg.ops` (docs/design.md, "PPO / RLHF implementation details").

Every expected value is written by hand or computed with an independent plain-Python loop in the test itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from hfpg import ops

T_ = True
F_ = False


def exact(actual, expected):
    """Bit-exact comparison (dtype included)."""
    assert_close(actual, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------
# masked statistics
# --------------------------------------------------------------------------------------------------------------
# real tokens: 1, 2, 3 | 4, 5  -> sum 15, mean 3, squared deviations 4+1+0+1+4 = 10
X = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
M = torch.tensor([[T_, T_, T_, F_], [T_, T_, F_, F_]])


def test_masked_sum_ignores_padding():
    exact(ops.masked_sum(X, M), torch.tensor(15.0))
    exact(ops.masked_sum(X, M, dim=1), torch.tensor([6.0, 9.0]))
    exact(ops.masked_sum(X, M, dim=0), torch.tensor([5.0, 7.0, 3.0, 0.0]))


def test_masked_sum_accepts_01_float_mask():
    exact(ops.masked_sum(X, M.float()), torch.tensor(15.0))


def test_masked_mean_ignores_padding():
    assert_close(ops.masked_mean(X, M), torch.tensor(3.0))
    assert_close(ops.masked_mean(X, M, dim=1), torch.tensor([2.0, 4.5]))
    # column 3 has no real token -> 0
    assert_close(ops.masked_mean(X, M, dim=0), torch.tensor([2.5, 3.5, 3.0, 0.0]))


def test_masked_mean_all_false_is_zero_not_nan():
    empty = torch.zeros_like(M)
    out = ops.masked_mean(X, empty)
    assert not torch.isnan(out)
    exact(out, torch.tensor(0.0))
    out_rows = ops.masked_mean(X, empty, dim=1)
    exact(out_rows, torch.tensor([0.0, 0.0]))
    # one empty row next to a real row
    partial = torch.tensor([[T_, T_, F_, F_], [F_, F_, F_, F_]])
    exact(ops.masked_mean(X, partial, dim=1), torch.tensor([1.5, 0.0]))


# --------------------------------------------------------------------------------------------------------------
# logprobs and entropy
# --------------------------------------------------------------------------------------------------------------
def _reference_logprobs(logits, labels, temperature):
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [2, 8])
def test_logprobs_from_logits_matches_log_softmax(temperature, chunk_size):
    g = torch.Generator().manual_seed(0)
    B, T, V = 5, 3, 11
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    out = ops.logprobs_from_logits(logits, labels, temperature=temperature, chunk_size=chunk_size)
    assert out.shape == (B, T)
    assert out.dtype == torch.float32
    assert_close(out, _reference_logprobs(logits, labels, temperature))


def test_logprobs_from_logits_hand_values():
    # logits = log([1, 2, 3]) -> p = [1/6, 2/6, 3/6]; at T=0.5 logits double -> p ∝ [1, 4, 9]
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]))
    labels = torch.tensor([[2, 0]])
    assert_close(ops.logprobs_from_logits(logits, labels), torch.tensor([[math.log(0.5), math.log(1 / 6)]]))
    assert_close(
        ops.logprobs_from_logits(logits, labels, temperature=0.5), torch.tensor([[math.log(9 / 14), math.log(1 / 14)]])
    )


def _brute_entropy(logits, temperature):
    """-(p * log p).sum over the vocabulary, in plain Python."""
    B, T, V = logits.shape
    out = []
    for b in range(B):
        row = []
        for t in range(T):
            z = [logits[b, t, v].item() / temperature for v in range(V)]
            m = max(z)
            exps = [math.exp(zi - m) for zi in z]
            tot = sum(exps)
            ps = [e / tot for e in exps]
            row.append(-sum(p * math.log(p) for p in ps if p > 0))
        out.append(row)
    return torch.tensor(out)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_from_logits_matches_brute_force(temperature):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, 6, generator=g) * 2
    out = ops.entropy_from_logits(logits, temperature=temperature, chunk_size=2)
    assert out.shape == (5, 3)
    assert out.dtype == torch.float32
    assert_close(out, _brute_entropy(logits, temperature))


def test_entropy_hand_values():
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]]))
    expected = torch.tensor(
        [[-(1 / 6 * math.log(1 / 6) + 1 / 3 * math.log(1 / 3) + 1 / 2 * math.log(1 / 2)), math.log(3)]]
    )
    assert_close(ops.entropy_from_logits(logits), expected)
    # a near-deterministic distribution has ~0 entropy
    peaked = torch.tensor([[[50.0, 0.0, 0.0]]])
    assert ops.entropy_from_logits(peaked).item() < 1e-15 + 1e-6


def test_bf16_inputs_return_fp32():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(5, 4, 9, generator=g) * 2).to(torch.bfloat16)
    labels = torch.randint(0, 9, (5, 4), generator=g)
    lp = ops.logprobs_from_logits(logits, labels, temperature=0.7, chunk_size=2)
    ent = ops.entropy_from_logits(logits, temperature=0.7, chunk_size=2)
    assert lp.dtype == torch.float32
    assert ent.dtype == torch.float32
    # computed from the bf16 values upcast to fp32 (no extra bf16 rounding)
    assert_close(lp, _reference_logprobs(logits.float(), labels, 0.7))
    assert_close(ent, _brute_entropy(logits.float(), 0.7))


# --------------------------------------------------------------------------------------------------------------
# off-by-one (detail 2)
# --------------------------------------------------------------------------------------------------------------
def test_response_positions_off_by_one():
    V = 6
    context = [1, 4, 2]
    response = [5, 3]
    seq = context + response  # L = 5
    logits = torch.zeros(1, len(seq), V)
    for i in range(len(seq) - 1):
        logits[0, i, seq[i + 1]] = 30.0  # position i is confident about token i+1
    logits[0, len(seq) - 1, 0] = 30.0  # the last position predicts beyond the sequence
    resp_tokens = torch.tensor([response])

    sliced = ops.response_positions(logits, len(response))
    assert sliced.shape == (1, 2, V)
    exact(sliced, logits[:, 2:4])  # logits[:, P-1:-1] with P = 3
    exact(ops.response_positions(logits[:, -3:], len(response)), sliced)  # only the last T + 1 positions computed

    lp = ops.logprobs_from_logits(sliced, resp_tokens)
    assert_close(lp, torch.zeros(1, 2), atol=1e-6, rtol=0)

    # one position too late ([:, 3:5]) or too early ([:, 1:3]) gives ~ -30 nats
    for wrong in (logits[:, 3:5], logits[:, 1:3]):
        lp_wrong = ops.logprobs_from_logits(wrong, resp_tokens)
        assert (lp_wrong < -25).all()


# --------------------------------------------------------------------------------------------------------------
# stop tokens and masks (detail 5)
# --------------------------------------------------------------------------------------------------------------
def test_first_true_indices():
    bools = torch.tensor([[F_, T_, F_, T_], [F_, F_, F_, F_], [T_, F_, F_, F_], [F_, F_, F_, T_]])
    exact(ops.first_true_indices(bools), torch.tensor([1, 4, 0, 3]))


def test_truncate_at_stop_basic():
    responses = torch.tensor([[5, 7, 2, 9, 2], [5, 6, 7, 8, 9], [2, 3, 4, 5, 6]])
    out, mask, has_stop = ops.truncate_at_stop(responses, [2], pad_token_id=0)
    exact(out, torch.tensor([[5, 7, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]]))
    exact(mask, torch.tensor([[T_, T_, T_, F_, F_], [T_] * 5, [T_, F_, F_, F_, F_]]))
    exact(has_stop, torch.tensor([T_, F_, T_]))
    # input untouched
    exact(responses, torch.tensor([[5, 7, 2, 9, 2], [5, 6, 7, 8, 9], [2, 3, 4, 5, 6]]))


def test_truncate_at_stop_pad_equals_stop_keeps_stop_token():
    responses = torch.tensor([[5, 2, 7, 8], [3, 4, 5, 6], [3, 4, 5, 2]])
    out, mask, has_stop = ops.truncate_at_stop(responses, [2], pad_token_id=2)
    exact(out, torch.tensor([[5, 2, 2, 2], [3, 4, 5, 6], [3, 4, 5, 2]]))
    exact(mask, torch.tensor([[T_, T_, F_, F_], [T_, T_, T_, T_], [T_, T_, T_, T_]]))
    exact(has_stop, torch.tensor([T_, F_, T_]))
    # the stop token is a real token: the score would be read there
    exact(ops.last_token_indices(mask), torch.tensor([1, 3, 3]))


def test_truncate_at_stop_multiple_stop_ids():
    responses = torch.tensor([[5, 9, 2, 1], [5, 6, 2, 9], [1, 1, 1, 1]])
    out, mask, has_stop = ops.truncate_at_stop(responses, [2, 9], pad_token_id=0)
    exact(out, torch.tensor([[5, 9, 0, 0], [5, 6, 2, 0], [1, 1, 1, 1]]))
    exact(mask, torch.tensor([[T_, T_, F_, F_], [T_, T_, T_, F_], [T_, T_, T_, T_]]))
    exact(has_stop, torch.tensor([T_, T_, F_]))


def test_last_token_indices():
    mask = torch.tensor([[T_, T_, T_, F_], [T_, F_, F_, F_], [T_, T_, T_, T_], [F_, F_, F_, F_]])
    exact(ops.last_token_indices(mask), torch.tensor([2, 0, 3, -1]))
    exact(ops.last_token_indices(mask.long()), torch.tensor([2, 0, 3, -1]))


def test_position_ids_from_attention_mask_left_padding():
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    pos = ops.position_ids_from_attention_mask(attn)
    assert pos.dtype == torch.long
    # real tokens count from 0
    expected_real = {0: [0, 1, 2], 1: [0, 1, 2, 3, 4], 2: [0, 1, 2, 3]}
    for b, want in expected_real.items():
        assert pos[b][attn[b].bool()].tolist() == want
    # padding positions are still valid (non-negative) embedding indices
    assert (pos >= 0).all()
    # a left-padded row's real positions equal the unpadded row's positions
    exact(pos[0, 2:], ops.position_ids_from_attention_mask(torch.ones(1, 3, dtype=torch.long))[0])


# --------------------------------------------------------------------------------------------------------------
# KL estimators (detail 6)
# --------------------------------------------------------------------------------------------------------------
LP = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
REF = torch.tensor([[-1.5, -1.0, -0.5, -0.2]])
D = [0.5, -1.0, 0.0, -2.8]  # lp - ref, by hand


def test_kl_k1_hand_values():
    assert_close(ops.kl_per_token(LP, REF, "k1"), torch.tensor([D]))
    assert_close(ops.kl_per_token(LP, REF), torch.tensor([D]))  # k1 is the default


def test_kl_k2_hand_values():
    assert_close(ops.kl_per_token(LP, REF, "k2"), torch.tensor([[0.5 * d * d for d in D]]))


def test_kl_k3_hand_values():
    # k3 = exp(ref - lp) - 1 - (ref - lp)
    expected = [math.exp(-d) - 1 - (-d) for d in D]
    assert_close(ops.kl_per_token(LP, REF, "k3"), torch.tensor([expected]))
    assert_close(ops.kl_per_token(LP, REF, "k3")[0, :2], torch.tensor([math.exp(-0.5) - 0.5, math.e - 2]))


def test_kl_k2_k3_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(4, 7, generator=g) * 5
    ref = -torch.rand(4, 7, generator=g) * 5
    for est in ("k2", "k3"):
        assert (ops.kl_per_token(lp, ref, est) >= 0).all()
    for est in ("k1", "k2", "k3"):
        exact(ops.kl_per_token(lp, lp, est), torch.zeros(4, 7))


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError):
        ops.kl_per_token(LP, REF, "k4")


def test_kl_monte_carlo_matches_exact_kl():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    exact_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))  # 0.3 ln 2.5 ≈ 0.2749
    assert abs(exact_kl - 0.3 * math.log(2.5)) < 1e-6
    g = torch.Generator().manual_seed(1234)
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp = torch.log(p)[tokens].double().unsqueeze(0)
    ref = torch.log(q)[tokens].double().unsqueeze(0)
    for est in ("k1", "k3"):
        est_mean = ops.kl_per_token(lp, ref, est).mean().item()
        assert abs(est_mean - exact_kl) < 0.01, (est, est_mean, exact_kl)
    # k2 is biased: E[k2] = ½ E[(log p/q)²] = 0.35 ln²2.5 ≈ 0.294, clearly away from the true KL
    k2_mean = ops.kl_per_token(lp, ref, "k2").mean().item()
    assert abs(k2_mean - 0.35 * math.log(2.5) ** 2) < 0.01
    assert k2_mean - exact_kl > 0.01


# --------------------------------------------------------------------------------------------------------------
# per-token rewards (details 6, 7)
# --------------------------------------------------------------------------------------------------------------
def test_token_level_rewards_hand_example():
    kl = torch.tensor([[0.1, 0.2, 0.3, 99.0], [0.4, -0.2, 77.0, float("nan")]])
    mask = torch.tensor([[T_, T_, T_, F_], [T_, T_, F_, F_]])
    scores = torch.tensor([1.0, -2.0])
    rewards, non_score = ops.token_level_rewards(scores, kl, 0.5, mask)
    exact_non_score = torch.tensor([[-0.05, -0.1, -0.15, 0.0], [-0.2, 0.1, 0.0, 0.0]])
    exact_rewards = torch.tensor([[-0.05, -0.1, 0.85, 0.0], [-0.2, -1.9, 0.0, 0.0]])
    assert_close(non_score, exact_non_score)
    assert_close(rewards, exact_rewards)
    # padding exactly 0 in both
    exact(rewards[~mask], torch.zeros(3))
    exact(non_score[~mask], torch.zeros(3))
    # the score sits only at the last real token
    diff = rewards - non_score
    assert_close(diff, torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, -2.0, 0.0, 0.0]]))
    # input kl untouched
    assert kl[0, 3].item() == 99.0


def test_token_level_rewards_full_and_empty_rows():
    kl = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[T_, T_, T_], [F_, F_, F_]])
    rewards, non_score = ops.token_level_rewards(torch.tensor([3.0, 5.0]), kl, 0.1, mask)
    assert_close(rewards, torch.tensor([[-0.1, -0.1, 2.9], [0.0, 0.0, 0.0]]))
    assert_close(non_score, torch.tensor([[-0.1, -0.1, -0.1], [0.0, 0.0, 0.0]]))


def test_token_level_rewards_zero_kl_coef_only_score():
    kl = torch.tensor([[0.3, 0.7, 0.2]])
    mask = torch.tensor([[T_, T_, F_]])
    rewards, non_score = ops.token_level_rewards(torch.tensor([4.0]), kl, 0.0, mask)
    assert_close(rewards, torch.tensor([[0.0, 4.0, 0.0]]))
    exact(non_score.abs(), torch.zeros(1, 3))


# --------------------------------------------------------------------------------------------------------------
# GAE and returns (detail 8)
# --------------------------------------------------------------------------------------------------------------
GAMMA, LAM = 0.9, 0.8
LENGTHS = [4, 2, 5, 1]
RW = [[0.1, -0.2, 0.3, 1.0, 0.0], [0.5, 2.0, 0.0, 0.0, 0.0], [0.0, 0.1, -0.1, 0.2, -1.0], [3.0, 0, 0, 0, 0]]
VL = [[0.2, 0.4, -0.1, 0.6, 0.0], [1.0, -0.5, 0.0, 0.0, 0.0], [0.3, 0.3, 0.2, -0.2, 0.1], [0.7, 0, 0, 0, 0]]


def _padded(rows, lengths, fill):
    out = [[r[t] if t < n else fill for t in range(len(r))] for r, n in zip(rows, lengths)]
    return torch.tensor(out, dtype=torch.float64)


def _mask(lengths, T=5):
    return torch.tensor([[t < n for t in range(T)] for n in lengths])


def _brute_gae(rewards, values, lengths, gamma, lam, T=5):
    """A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ V_{t+1} - V_t with V = 0 after the last real token."""
    adv = []
    for r, v, n in zip(rewards, values, lengths):

        def delta(t, r=r, v=v, n=n):
            v_next = v[t + 1] if t + 1 < n else 0.0
            return r[t] + gamma * v_next - v[t]

        row = [sum((gamma * lam) ** k * delta(t + k) for k in range(n - t)) for t in range(n)]
        adv.append(row + [0.0] * (T - n))
    return torch.tensor(adv, dtype=torch.float64)


def _brute_returns(rewards, lengths, gamma, T=5):
    out = []
    for r, n in zip(rewards, lengths):
        row = [sum(gamma**k * r[t + k] for k in range(n - t)) for t in range(n)]
        out.append(row + [0.0] * (T - n))
    return torch.tensor(out, dtype=torch.float64)


def test_gae_hand_example():
    # r = [0, 0, 1], V = 0.5 everywhere, γ=0.9, λ=0.8:
    # δ = [-0.05, -0.05, 0.5]; A2 = 0.5, A1 = -0.05 + 0.72·0.5 = 0.31, A0 = -0.05 + 0.72·0.31 = 0.1732
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.5, 0.5]], dtype=torch.float64)
    adv, ret = ops.gae_advantages(rewards, values, torch.ones(1, 3, dtype=torch.bool), 0.9, 0.8)
    assert_close(adv, torch.tensor([[0.1732, 0.31, 0.5]], dtype=torch.float64))
    assert_close(ret, torch.tensor([[0.6732, 0.81, 1.0]], dtype=torch.float64))


def test_gae_matches_brute_force_double_loop():
    mask = _mask(LENGTHS)
    rewards = _padded(RW, LENGTHS, 99.0)
    values = _padded(VL, LENGTHS, 99.0)
    adv, ret = ops.gae_advantages(rewards, values, mask, GAMMA, LAM)
    expected = _brute_gae(RW, VL, LENGTHS, GAMMA, LAM)
    assert_close(adv, expected)
    # returns = advantages + values on real tokens, 0 on padding
    assert_close(ret[mask], (expected + _padded(VL, LENGTHS, 0.0))[mask])
    exact(ret[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    exact(adv[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))


def test_gae_padding_values_do_not_matter():
    mask = _mask(LENGTHS)
    a1, r1 = ops.gae_advantages(_padded(RW, LENGTHS, 99.0), _padded(VL, LENGTHS, 99.0), mask, GAMMA, LAM)
    a0, r0 = ops.gae_advantages(_padded(RW, LENGTHS, 0.0), _padded(VL, LENGTHS, -7.0), mask, GAMMA, LAM)
    exact(a1, a0)
    exact(r1, r0)


def test_gae_lambda_one_is_monte_carlo_minus_values():
    mask = _mask(LENGTHS)
    rewards = _padded(RW, LENGTHS, 99.0)
    values = _padded(VL, LENGTHS, 99.0)
    adv, ret = ops.gae_advantages(rewards, values, mask, GAMMA, 1.0)
    mc_brute = _brute_returns(RW, LENGTHS, GAMMA)
    v0 = _padded(VL, LENGTHS, 0.0)
    assert_close(adv, mc_brute - v0)
    assert_close(adv, ops.discounted_returns(rewards, mask, GAMMA) - v0)
    # with λ=1 the returns are the Monte-Carlo returns themselves
    assert_close(ret, mc_brute)


def test_gae_lambda_zero_is_one_step_td():
    mask = _mask(LENGTHS)
    adv, _ = ops.gae_advantages(_padded(RW, LENGTHS, 99.0), _padded(VL, LENGTHS, 99.0), mask, GAMMA, 0.0)
    expected = []
    for r, v, n in zip(RW, VL, LENGTHS):
        row = []
        for t in range(5):
            if t >= n:
                row.append(0.0)
            else:
                v_next = v[t + 1] if t + 1 < n else 0.0
                row.append(r[t] + GAMMA * v_next - v[t])
        expected.append(row)
    assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    # last real token of row 0: δ_3 = 1.0 + 0 - 0.6 = 0.4 ; row 3 (length 1): 3.0 - 0.7 = 2.3
    assert_close(adv[0, 3], torch.tensor(0.4, dtype=torch.float64))
    assert_close(adv[3, 0], torch.tensor(2.3, dtype=torch.float64))


def test_discounted_returns_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 99.0], [3.0, 1.0, 99.0, 99.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[T_, T_, T_, F_], [T_, T_, F_, F_], [T_, T_, T_, T_]])
    out = ops.discounted_returns(rewards, mask, 0.5)
    # row 0: G2 = 2, G1 = 0 + 0.5·2 = 1, G0 = 1 + 0.5·1 = 1.5 ; row 1: G1 = 1, G0 = 3.5
    # row 2: G3 = 1, G2 = 1.5, G1 = 1.75, G0 = 1.875
    expected = torch.tensor([[1.5, 1.0, 2.0, 0.0], [3.5, 1.0, 0.0, 0.0], [1.875, 1.75, 1.5, 1.0]])
    assert_close(out, expected)
    assert_close(ops.discounted_returns(rewards, mask, 1.0)[0], torch.tensor([3.0, 2.0, 2.0, 0.0]))


def test_discounted_returns_matches_brute_force():
    mask = _mask(LENGTHS)
    out = ops.discounted_returns(_padded(RW, LENGTHS, 99.0), mask, GAMMA)
    assert_close(out, _brute_returns(RW, LENGTHS, GAMMA))


# --------------------------------------------------------------------------------------------------------------
# policy loss (detail 10)
# --------------------------------------------------------------------------------------------------------------
RATIOS = [0.5, 0.9, 1.0, 1.1, 1.5]


def _policy_inputs(adv_value):
    old = torch.tensor([[-1.0] * len(RATIOS)], dtype=torch.float64)
    lp = old + torch.log(torch.tensor([RATIOS], dtype=torch.float64))
    adv = torch.full_like(old, adv_value)
    return lp, old, adv


def test_ppo_policy_loss_positive_advantage():
    lp, old, adv = _policy_inputs(2.0)
    loss, clipped, ratio = ops.ppo_policy_loss(lp, old, adv, 0.2)
    assert_close(ratio, torch.tensor([RATIOS], dtype=torch.float64))
    # max(-2r, -2·clip(r, 0.8, 1.2)):  r=0.5 -> max(-1, -1.6) = -1 ; r=1.5 -> max(-3, -2.4) = -2.4 (clipped)
    assert_close(loss, torch.tensor([[-1.0, -1.8, -2.0, -2.2, -2.4]], dtype=torch.float64))
    exact(clipped, torch.tensor([[F_, F_, F_, F_, T_]]))


def test_ppo_policy_loss_negative_advantage():
    lp, old, adv = _policy_inputs(-2.0)
    loss, clipped, _ = ops.ppo_policy_loss(lp, old, adv, 0.2)
    # max(2r, 2·clip(r)):  r=0.5 -> max(1, 1.6) = 1.6 (clipped) ; r=1.5 -> max(3, 2.4) = 3
    assert_close(loss, torch.tensor([[1.6, 1.8, 2.0, 2.2, 3.0]], dtype=torch.float64))
    exact(clipped, torch.tensor([[T_, F_, F_, F_, F_]]))


def test_ppo_policy_loss_mixed_and_brute_force():
    g = torch.Generator().manual_seed(4)
    old = -torch.rand(3, 6, generator=g, dtype=torch.float64) * 3
    lp = old + (torch.rand(3, 6, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.randn(3, 6, generator=g, dtype=torch.float64)
    eps = 0.1
    loss, clipped, ratio = ops.ppo_policy_loss(lp, old, adv, eps)
    exp_loss, exp_clip, exp_ratio = [], [], []
    for i in range(3):
        rl, rc, rr = [], [], []
        for j in range(6):
            r = math.exp(lp[i, j].item() - old[i, j].item())
            a = adv[i, j].item()
            un = -a * r
            cl = -a * min(max(r, 1 - eps), 1 + eps)
            rl.append(max(un, cl))
            rc.append(cl > un)
            rr.append(r)
        exp_loss.append(rl)
        exp_clip.append(rc)
        exp_ratio.append(rr)
    assert_close(loss, torch.tensor(exp_loss, dtype=torch.float64))
    assert_close(ratio, torch.tensor(exp_ratio, dtype=torch.float64))
    exact(clipped, torch.tensor(exp_clip))
    assert clipped.any() and not clipped.all()  # the example exercises both branches


def test_ppo_policy_loss_no_change_ratio_exactly_one():
    lp = torch.tensor([[-0.3, -1.7, -4.0]])
    adv = torch.tensor([[1.5, -0.5, 0.0]])
    loss, clipped, ratio = ops.ppo_policy_loss(lp, lp.clone(), adv, 0.2)
    exact(ratio, torch.ones(1, 3))
    exact(loss, -adv)
    assert not clipped.any()


# --------------------------------------------------------------------------------------------------------------
# value loss (detail 11)
# --------------------------------------------------------------------------------------------------------------
def test_clipped_value_loss_hand_values():
    # ε_v = 0.2
    # 1) V=1.0, Vold=0.5, R=1.0: Vc=0.7; (0)² vs (-0.3)²=0.09 -> 0.045, clipping increases the loss
    # 2) V=1.0, Vold=0.5, R=0.0: (1)²=1 vs (0.7)²=0.49  -> 0.5, clipping does not increase it
    # 3) V=0.6, Vold=0.5, R=2.0: inside the range, both 1.96 -> 0.98, not clipped
    # 4) V=-1.0, Vold=0.0, R=-1.0: Vc=-0.2; 0 vs 0.64 -> 0.32, clipped
    values = torch.tensor([[1.0, 1.0, 0.6, -1.0]], dtype=torch.float64)
    old = torch.tensor([[0.5, 0.5, 0.5, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[1.0, 0.0, 2.0, -1.0]], dtype=torch.float64)
    loss, clipped = ops.clipped_value_loss(values, old, returns, 0.2)
    assert_close(loss, torch.tensor([[0.045, 0.5, 0.98, 0.32]], dtype=torch.float64))
    exact(clipped, torch.tensor([[T_, F_, F_, T_]]))


def test_clipped_value_loss_equals_half_mse_when_unchanged():
    values = torch.tensor([[0.3, -2.0, 5.0]])
    returns = torch.tensor([[1.3, 0.0, 5.0]])
    loss, clipped = ops.clipped_value_loss(values, values.clone(), returns, 0.2)
    assert_close(loss, torch.tensor([[0.5, 2.0, 0.0]]))
    assert not clipped.any()


# --------------------------------------------------------------------------------------------------------------
# approx KL
# --------------------------------------------------------------------------------------------------------------
def test_approx_kl_zero_when_nothing_moved():
    lp = torch.tensor([[-0.2, -3.0, -7.5]])
    exact(ops.approx_kl(lp, lp.clone()), torch.zeros(1, 3))


def test_approx_kl_hand_values_and_nonnegative():
    old = torch.tensor([[-1.0, -1.0, -1.0, -2.0]], dtype=torch.float64)
    lp = old + torch.tensor([[0.5, -1.0, 0.0, 2.0]], dtype=torch.float64)
    # (r - 1) - log r
    expected = [math.exp(d) - 1 - d for d in (0.5, -1.0, 0.0, 2.0)]
    out = ops.approx_kl(lp, old)
    assert_close(out, torch.tensor([expected], dtype=torch.float64))
    assert_close(out[0, :2], torch.tensor([math.exp(0.5) - 1.5, math.exp(-1.0)], dtype=torch.float64))
    g = torch.Generator().manual_seed(5)
    a = -torch.rand(5, 5, generator=g) * 4
    b = -torch.rand(5, 5, generator=g) * 4
    assert (ops.approx_kl(a, b) >= 0).all()
