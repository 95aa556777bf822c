"""Example custom reward module, referenced from a recipe as ``recipes/rewards/sentiment.py:vader_positivity``.

A reward is any ``fn(prompts, completions, **columns) -> list[float]``. This one scores how positive each
completion reads with VADER (Hutto & Gilbert, 2014), a rule-based sentiment lexicon shipped by the
``vaderSentiment`` package — a real, offline sentiment scorer. Range [-1, 1] (VADER's compound score).
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:  # pragma: no cover - the demo installs it
        raise ImportError("this reward needs vaderSentiment: pip install vaderSentiment") from e
    return SentimentIntensityAnalyzer()


def vader_positivity(prompts, completions, **columns):
    """VADER compound score of each completion: -1 (very negative) .. 1 (very positive); 0 for empty text."""
    analyzer = _analyzer()
    return [analyzer.polarity_scores(c)["compound"] if c.strip() else 0.0 for c in completions]
