"""KL-coefficient controllers: a fixed β, or the adaptive rule of Ziegler et al. (2019)."""

from __future__ import annotations


class FixedKLController:
    """β stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_samples: int) -> None:
        """Nothing to adapt (the same interface as the adaptive controller)."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller that steers the measured KL towards ``target`` (Ziegler et al. 2019, eq. 2).

    err = clip(KL / target - 1, -0.2, 0.2);   β ← β · (1 + err · n_samples / horizon)
    where ``n_samples`` is the number of samples (sequences) seen since the last update; ``horizon`` counts
    sequences too.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0:
            raise ValueError(f"adaptive KL target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"adaptive KL horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_samples: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_samples / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


def build_kl_controller(config) -> FixedKLController | AdaptiveKLController:
    """The controller a :class:`~hfpg.config.PGConfig` asks for."""
    if config.adaptive_kl:
        return AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    return FixedKLController(config.kl_coef)
