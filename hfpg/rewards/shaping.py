"""Small shaping terms users add to a reward: a length target and a repetition penalty."""

from __future__ import annotations

from typing import Any

from .base import Reward

UNITS = ("words", "chars", "tokens")


def _length(text: str, unit: str, tokenizer) -> int:
    if unit == "words":
        return len(text.split())
    if unit == "chars":
        return len(text)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


class LengthPenalty(Reward):
    """``-(|len - target| / target) ** power``: 0 at the target length, more negative the further away.

    Range (-inf, 0]. ``unit``: words (whitespace split), chars, or tokens (needs ``tokenizer``).
    """

    def __init__(
        self, target: int, unit: str = "words", power: float = 1.0, tokenizer=None, name: str = "length_penalty"
    ):
        if target <= 0:
            raise ValueError(f"LengthPenalty target must be > 0, got {target}")
        if unit not in UNITS:
            raise ValueError(f"LengthPenalty unit must be one of {UNITS}, got {unit!r}")
        if unit == "tokens" and tokenizer is None:
            raise ValueError("LengthPenalty(unit='tokens') needs a tokenizer")
        if power <= 0:
            raise ValueError(f"LengthPenalty power must be > 0, got {power}")
        self.target, self.unit, self.power, self.tokenizer, self.name = target, unit, power, tokenizer, name

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return [
            -((abs(_length(c, self.unit, self.tokenizer) - self.target) / self.target) ** self.power)
            for c in completions
        ]


class RepetitionPenalty(Reward):
    """``-(share of repeated n-grams)`` = ``-(1 - distinct n-grams / all n-grams)`` of each completion.

    Range [-1, 0]: 0 when no n-gram repeats (or the completion is shorter than n), close to -1 for a loop.
    ``unit``: n-grams of words (whitespace split) or of characters.
    """

    def __init__(self, n: int = 2, unit: str = "words", name: str = "repetition_penalty"):
        if n < 1:
            raise ValueError(f"RepetitionPenalty n must be >= 1, got {n}")
        if unit not in ("words", "chars"):
            raise ValueError(f"RepetitionPenalty unit must be 'words' or 'chars', got {unit!r}")
        self.n, self.unit, self.name = n, unit, name

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        out = []
        for c in completions:
            items = c.split() if self.unit == "words" else list(c)
            grams = [tuple(items[i : i + self.n]) for i in range(len(items) - self.n + 1)]
            out.append(-(1.0 - len(set(grams)) / len(grams)) if grams else 0.0)
        return out
