"""hfpg: policy-gradient reinforcement learning (PPO, REINFORCE, TRPO) for Hugging Face causal LMs."""

__version__ = "0.1.0"

from .callbacks import TrainerCallback
from .config import PGConfig
from .errors import CheckpointError, ConfigError, DataError, HubError, RewardError
from .kl import AdaptiveKLController, FixedKLController
from .modeling import AutoModelForCausalLMWithValueHead, create_reference_model
from .rewards import (
    BLEUReward,
    ChrFReward,
    CombinedReward,
    EvaluateMetricReward,
    LengthPenalty,
    LMLikelihoodReward,
    RepetitionPenalty,
    Reward,
    RewardFunction,
    RewardModelReward,
    ROUGEReward,
    TERReward,
)
from .trainer import PGTrainer

__all__ = [
    "AdaptiveKLController",
    "AutoModelForCausalLMWithValueHead",
    "BLEUReward",
    "CheckpointError",
    "ChrFReward",
    "CombinedReward",
    "ConfigError",
    "DataError",
    "EvaluateMetricReward",
    "FixedKLController",
    "HubError",
    "LMLikelihoodReward",
    "LengthPenalty",
    "PGConfig",
    "PGTrainer",
    "ROUGEReward",
    "RepetitionPenalty",
    "Reward",
    "RewardError",
    "RewardFunction",
    "RewardModelReward",
    "TERReward",
    "TrainerCallback",
    "create_reference_model",
]
