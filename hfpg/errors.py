"""The errors hfpg raises for bad input. This module imports nothing, so every other module can import it at the top.

Each error's message names the problem and the fix; ``hfpg`` commands print it on one line and exit with code 2.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem and how to fix it."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class DataError(ValueError):
    """A dataset that cannot be trained on; the message says which rows or columns and how to fix it."""


class RewardError(ValueError):
    """A reward function returned something unusable; the message names the function and the batch."""


class HubError(RuntimeError):
    """The Hub could not be reached or refused a request; the message names the cause and the fix."""


class TrainingError(RuntimeError):
    """Training cannot go on: e.g. updates kept producing a NaN/inf loss or gradient. The message says what went wrong
    and what to try (a lower learning_rate, max_grad_norm, a reward without huge values)."""


class CheckpointError(Exception):
    """A checkpoint that cannot resume a run exactly (incomplete, corrupt, other setup); the message names the file."""
