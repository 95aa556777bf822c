"""Rewards: any callable ``fn(prompts, completions, **kwargs) -> list[float | None]`` called with TRL's keyword
contract (:mod:`hfpg.rewards.calling`), hfpg's built-ins, and ``CombinedReward`` to weigh several of them."""

from .base import Reward, RewardError, RewardFunction, get_references, reward_name
from .calling import RewardInputs
from .combined import CombinedReward, Scores
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
    "RewardInputs",
    "RewardModelReward",
    "Scores",
    "TERReward",
    "build_reward",
    "builtin_reward",
    "builtin_rewards",
    "get_references",
    "reward_name",
]
