"""Update rules. Each is a small object with ``compute_advantages`` and ``update``; the trainer loop is shared."""

from .ppo import PPO

ALGORITHMS = {"ppo": PPO}


def build_algorithm(config):
    """The update rule named by ``config.algorithm``."""
    try:
        return ALGORITHMS[config.algorithm](config)
    except KeyError:
        raise ValueError(f"unknown algorithm {config.algorithm!r}; choose one of {sorted(ALGORITHMS)}") from None


__all__ = ["ALGORITHMS", "PPO", "build_algorithm"]
