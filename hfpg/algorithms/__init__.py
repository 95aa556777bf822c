"""Update rules: each is an :class:`UpdateRule` (advantages, the update step, its abilities); the trainer's loop is
shared. ``config.algorithm`` names one of :data:`ALGORITHMS`."""

from __future__ import annotations

from .base import UpdateRule
from .minibatch import MinibatchPolicyGradient
from .ppo import PPO
from .reinforce import REINFORCE
from .trpo import TRPO

ALGORITHMS: dict[str, type[UpdateRule]] = {rule.name: rule for rule in (PPO, REINFORCE, TRPO)}


def rule_class(name: str) -> type[UpdateRule] | None:
    """The update rule registered under ``name`` (None for an unknown name)."""
    return ALGORITHMS.get(name)


def build_algorithm(config) -> UpdateRule:
    """The update rule named by ``config.algorithm``."""
    rule = rule_class(config.algorithm)
    if rule is None:
        raise ValueError(f"unknown algorithm {config.algorithm!r}; choose one of {sorted(ALGORITHMS)}")
    return rule(config)


__all__ = [
    "ALGORITHMS",
    "PPO",
    "REINFORCE",
    "TRPO",
    "MinibatchPolicyGradient",
    "UpdateRule",
    "build_algorithm",
    "rule_class",
]
