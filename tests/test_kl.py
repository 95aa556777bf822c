"""KL controllers (docs/design.md, detail 12)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hfpg.kl import AdaptiveKLController, FixedKLController, build_kl_controller


# --------------------------------------------------------------------------------------------------------------
# fixed controller
# --------------------------------------------------------------------------------------------------------------
def test_fixed_controller_never_changes():
    ctl = FixedKLController(0.05)
    for kl, n in [(100.0, 64), (0.0, 64), (-3.0, 1), (6.0, 1000)]:
        ctl.update(kl, n)
        assert ctl.value == 0.05


def test_fixed_controller_state_dict_round_trip():
    ctl = FixedKLController(0.07)
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.07


# --------------------------------------------------------------------------------------------------------------
# adaptive controller (Ziegler et al. 2019): err = clip(KL/target - 1, -0.2, 0.2); β ← β (1 + err n / horizon)
# --------------------------------------------------------------------------------------------------------------
def test_adaptive_kl_above_target_is_clipped_at_plus_0_2():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 256)  # err = 1.0 -> 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000), rel=1e-12)
    assert ctl.value == pytest.approx(0.100512, rel=1e-12)


def test_adaptive_kl_below_target_is_clipped_at_minus_0_2():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(1.0, 256)  # err = 1/6 - 1 = -0.833 -> -0.2
    assert ctl.value == pytest.approx(0.099488, rel=1e-12)
    ctl2 = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl2.update(0.0, 256)  # KL = 0 -> err = -1 -> -0.2
    assert ctl2.value == pytest.approx(0.099488, rel=1e-12)


def test_adaptive_kl_within_range():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(6.6, 256)  # err = 0.1
    assert ctl.value == pytest.approx(0.1 * 1.00256, rel=1e-12)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(5.1, 1000)  # err = -0.15
    assert ctl.value == pytest.approx(0.1 * (1 - 0.015), rel=1e-12)


def test_adaptive_kl_on_target_does_not_move():
    ctl = AdaptiveKLController(0.2, target=4.0, horizon=100)
    ctl.update(4.0, 50)
    assert ctl.value == 0.2


def test_adaptive_kl_updates_compound():
    ctl = AdaptiveKLController(0.5, target=2.0, horizon=100)
    ctl.update(10.0, 10)  # err 0.2 -> × 1.02
    ctl.update(2.2, 20)  # err 0.1 -> × 1.02
    ctl.update(0.5, 50)  # err -0.75 -> -0.2 -> × 0.9
    assert ctl.value == pytest.approx(0.5 * 1.02 * 1.02 * 0.9, rel=1e-12)


def test_adaptive_kl_state_dict_round_trip():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 256)
    ctl.update(3.0, 128)
    state = ctl.state_dict()
    other = AdaptiveKLController(1.0, target=1.0, horizon=1)
    other.load_state_dict(state)
    assert other.value == ctl.value
    assert other.target == 6.0
    assert other.horizon == 10000
    # the restored controller continues exactly like the original
    ctl.update(7.0, 64)
    other.update(7.0, 64)
    assert other.value == ctl.value


@pytest.mark.parametrize("target,horizon", [(0.0, 100), (-1.0, 100), (6.0, 0), (6.0, -5)])
def test_adaptive_kl_invalid_arguments_raise(target, horizon):
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=target, horizon=horizon)


def test_build_kl_controller():
    fixed = build_kl_controller(SimpleNamespace(adaptive_kl=False, kl_coef=0.05, kl_target=6.0, kl_horizon=100))
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.05
    adaptive = build_kl_controller(SimpleNamespace(adaptive_kl=True, kl_coef=0.05, kl_target=6.0, kl_horizon=100))
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.05, 6.0, 100)
