"""hfpg.stats: moments (one Bessel-corrected convention), running moments, whitening over real tokens, explained
variance — each against hand-computed values or torch's own ``mean`` / ``var`` / ``std``."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from hfpg.stats import Moments, RunningMoments, explained_variance, global_moments, global_whiten

T_, F_ = True, False
# real tokens: 1, 2, 3 | 4, 5  -> sum 15, mean 3, squared deviations 4+1+0+1+4 = 10 -> var 10/4 (n - 1 = 4)
X = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
M = torch.tensor([[T_, T_, T_, F_], [T_, T_, F_, F_]])


def exact(actual, expected):
    assert_close(actual, expected, rtol=0, atol=0)


# ---- moments ---------------------------------------------------------------------------------------------------------
def test_moments_of_masked_values_are_bessel_corrected():
    m = Moments.of(X, M)
    assert (m.count, m.mean, m.m2) == (5.0, 3.0, 10.0)
    assert m.var == pytest.approx(10.0 / 4) and m.std == pytest.approx(math.sqrt(2.5))
    real = X[M]
    assert m.var == pytest.approx(real.var().item()) and m.std == pytest.approx(real.std().item())  # torch's default


def test_moments_ignore_padding_values():
    garbage = X.clone()
    garbage[~M] = 1e30
    assert Moments.of(garbage, M) == Moments.of(X, M)


def test_moments_of_fewer_than_two_values_have_zero_variance():
    one = torch.tensor([[T_, F_, F_, F_], [F_, F_, F_, F_]])
    assert Moments.of(X, one) == Moments(1.0, 1.0, 0.0) and Moments.of(X, one).var == 0.0
    empty = Moments.of(X, torch.zeros_like(M))
    assert (empty.count, empty.mean, empty.var) == (0.0, 0.0, 0.0)


def test_global_moments_on_one_process_equal_the_local_ones_and_name_each_quantity():
    m = global_moments(None, {"x": (X, M), "scores": torch.tensor([1.0, 3.0])})
    assert m["x"] == Moments.of(X, M)
    assert (m["scores"].count, m["scores"].mean, m["scores"].var) == (2.0, 2.0, 2.0)


def test_merge_equals_the_moments_of_the_concatenation():
    parts = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0]), torch.tensor([-4.0, 0.5, 7.0, 2.0, -1.5])]
    merged = Moments()
    for p in parts:
        merged = merged.merge(Moments.of(p))
    cat = torch.cat(parts).double()
    assert merged.count == 9 and merged.mean == pytest.approx(cat.mean().item(), rel=1e-12)
    assert merged.var == pytest.approx(cat.var().item(), rel=1e-12)


# ---- whitening over the real tokens ----------------------------------------------------------------------------------
def test_whiten_mean_zero_unit_variance_padding_zero():
    out = global_whiten(None, X, M)
    s = math.sqrt(2.5 + 1e-8)
    assert_close(out, torch.tensor([[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]]))
    exact(out[~M], torch.zeros(3))
    real = [out[i, j].item() for i in range(2) for j in range(4) if M[i, j]]
    mean = sum(real) / len(real)
    assert abs(mean) < 1e-6 and abs(sum((v - mean) ** 2 for v in real) / (len(real) - 1) - 1.0) < 1e-5


@pytest.mark.parametrize("pad_value", [1e6, -1e9, 1e30])
def test_whiten_padding_values_do_not_influence(pad_value):
    garbage = X.clone()
    garbage[~M] = pad_value
    exact(global_whiten(None, garbage, M), global_whiten(None, X, M))
    exact(global_whiten(None, garbage, M, shift_mean=False), global_whiten(None, X, M, shift_mean=False))


def test_whiten_shift_mean_false_restores_mean():
    out = global_whiten(None, X, M, shift_mean=False)
    s = math.sqrt(2.5 + 1e-8)
    assert_close(out, torch.tensor([[3 - 2 / s, 3 - 1 / s, 3.0, 0.0], [3 + 1 / s, 3 + 2 / s, 0.0, 0.0]]))
    exact(out[~M], torch.zeros(3))


def test_whiten_of_one_real_token_only_centres_it():
    one = torch.tensor([[F_, T_, F_, F_], [F_, F_, F_, F_]])
    out = global_whiten(None, X, one)
    assert out[0, 1].item() == 0.0 and out.abs().sum().item() == 0.0  # var 0: (x - mean) / sqrt(eps) = 0


# ---- explained variance ----------------------------------------------------------------------------------------------
R = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, 99.0, 99.0]])  # real returns: 1..5


def ev(values):
    return explained_variance(Moments.of(R, M), Moments.of(R - values, M))


def test_explained_variance_perfect_critic_mean_predictor_and_bad_critic():
    values = R.clone()
    values[~M] = -1234.0  # padding must be ignored
    assert ev(values) == pytest.approx(1.0)
    assert ev(torch.full_like(R, 3.0)) == pytest.approx(0.0, abs=1e-12)
    assert ev(-R) == pytest.approx(-3.0)  # residual = 2 R -> Var = 4 Var[R] -> 1 - 4


def test_explained_variance_hand_value_with_padding_garbage():
    # residual on real tokens: -1, 0, 1, 0, 0 -> m2 2 ; Var[R]: m2 10 -> EV = 1 - 2/10 = 0.8 (n - 1 cancels)
    assert ev(torch.tensor([[2.0, 2.0, 2.0, 1e6], [4.0, 5.0, -1e6, 3.0]])) == pytest.approx(0.8)


def test_explained_variance_of_constant_returns_is_nan():
    constant = Moments.of(torch.ones(4))
    assert math.isnan(explained_variance(constant, Moments.of(torch.randn(4))))


# ---- running moments -------------------------------------------------------------------------------------------------
BATCHES = [
    torch.tensor([1.0, 2.0, 3.0]),
    torch.tensor([10.0]),
    torch.tensor([-4.0, 0.5, 7.0, 2.0, -1.5]),
    torch.tensor([[3.0, 3.0], [8.0, -6.0]]),  # multi-dimensional batches are flattened
]


def test_running_moments_match_concatenation():
    rm = RunningMoments()
    seen = []
    for b in BATCHES:
        rm.update(b)
        seen.extend(b.flatten().tolist())
        cat = torch.tensor(seen, dtype=torch.float64)
        assert rm.count == len(seen)
        assert rm.mean == pytest.approx(cat.mean().item(), rel=1e-12, abs=1e-12)
        assert rm.std == pytest.approx(cat.std().item(), rel=1e-12)
    n, mean = len(seen), sum(seen) / len(seen)
    assert rm.std == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in seen) / (n - 1)), rel=1e-12)
    assert rm.count == 13


def test_running_moments_take_global_moments_and_return_the_batch():
    rm = RunningMoments()
    batch = rm.update(torch.tensor([2.0, 4.0, 6.0, 8.0]))
    assert batch.mean == pytest.approx(5.0) and batch.var == pytest.approx(20.0 / 3)  # (9+1+1+9)/3
    before = rm.state_dict()
    rm.update(torch.tensor([]))
    assert rm.state_dict() == before
    rm.update(Moments.of(torch.tensor([10.0, 12.0])))
    assert rm.count == 6 and rm.std == pytest.approx(torch.tensor([2.0, 4, 6, 8, 10, 12]).std().item())


def test_running_moments_state_dict_round_trip_and_older_checkpoints():
    rm = RunningMoments()
    for b in BATCHES[:2]:
        rm.update(b)
    other = RunningMoments()
    other.load_state_dict(rm.state_dict())
    assert other.moments == rm.moments
    for b in BATCHES[2:]:
        rm.update(b)
        other.update(b)
    assert other.moments == rm.moments
    cat = torch.cat([b.flatten() for b in BATCHES]).double()
    assert other.std == pytest.approx(cat.std().item(), rel=1e-12)
    old = RunningMoments()  # hfpg 0.1.0 saved the biased variance
    old.load_state_dict({"mean": 2.0, "var": 2.0 / 3, "count": 3})
    assert old.moments == Moments(3.0, 2.0, 2.0) and old.std == pytest.approx(1.0)
