"""Update rules. Each is a small object with ``compute_advantages`` and ``update``; the trainer loop is shared."""

from .ppo import PPO, REINFORCE, MinibatchPolicyGradient
from .trpo import TRPO

ALGORITHMS = {"ppo": PPO, "reinforce": REINFORCE, "trpo": TRPO}


def build_algorithm(config):
    """The update rule named by ``config.algorithm``."""
    try:
        return ALGORITHMS[config.algorithm](config)
    except KeyError:
        raise ValueError(f"unknown algorithm {config.algorithm!r}; choose one of {sorted(ALGORITHMS)}") from None


__all__ = ["ALGORITHMS", "PPO", "REINFORCE", "TRPO", "MinibatchPolicyGradient", "build_algorithm"]
