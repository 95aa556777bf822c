"""Rewards: any callable ``fn(prompts, completions, **columns) -> list[float]`` (the signature TRL users write)."""

from .base import RewardError, RewardFunction, compute_scores, reward_name

__all__ = ["RewardError", "RewardFunction", "compute_scores", "reward_name"]
