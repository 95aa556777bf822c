"""Rewards: any callable ``fn(prompts, completions, **columns) -> list[float]`` (the signature TRL users write),
hfpg's built-ins, and ``CombinedReward`` to weigh several of them."""

from .base import Reward, RewardError, RewardFunction, compute_scores, get_references, reward_name
from .combined import CombinedReward
from .metrics import BLEUReward, ChrFReward, EvaluateMetricReward, ROUGEReward, TERReward
from .models import LMLikelihoodReward, RewardModelReward
from .registry import build_reward, builtin_reward, builtin_rewards
from .shaping import LengthPenalty, RepetitionPenalty

__all__ = [
    "BLEUReward",
    "ChrFReward",
    "CombinedReward",
    "EvaluateMetricReward",
    "LMLikelihoodReward",
    "LengthPenalty",
    "ROUGEReward",
    "RepetitionPenalty",
    "Reward",
    "RewardError",
    "RewardFunction",
    "RewardModelReward",
    "TERReward",
    "build_reward",
    "builtin_reward",
    "builtin_rewards",
    "compute_scores",
    "get_references",
    "reward_name",
]
