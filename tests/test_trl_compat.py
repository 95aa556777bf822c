"""Real client code: TRL 1.16's own reward functions (``trl.rewards``) and rewards written the way TRL's GRPO
documentation writes them, each run unchanged through a 2-step PGTrainer run on a conversational and a plain dataset.

TRL lives in the peers environment: ``make test-trl-compat`` builds it (TRL 1.16 + math-verify, hfpg installed) and runs
this file with ``HFPG_REQUIRE_TRL=1``, which turns a missing TRL into a failure instead of a skip. The documentation-
style rewards below are hfpg's own code with the same signatures and behaviour as the documented examples (length
from ``completions_ids``, a conversational format check, a reference column, ``None`` for rows of another task, an
``async def`` reward); they need no TRL and also run in ``make test``.
"""

from __future__ import annotations

import asyncio
import math
import os
import re

import pytest
import torch
from conftest import small_run, tiny_llama

from hfpg import PGConfig, PGTrainer

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
QUESTIONS = ["what is one half", "what is two thirds", "what is seven", "say hello"]
SOLUTIONS = [r"$\frac{1}{2}$", r"$\frac{2}{3}$", "$7$", "hello"]  # math-verify cannot parse "hello": None


def datasets_for(kind: str) -> list[dict]:
    rows = []
    for i, (q, s) in enumerate(zip(QUESTIONS, SOLUTIONS)):
        prompt = [{"role": "user", "content": q}] if kind == "conversational" else q
        rows.append({"prompt": prompt, "solution": s, "ground_truth": str(i), "task": "math" if i < 2 else "code"})
    return rows


def run(tokenizer, tmp_path, reward, kind: str, **overrides) -> PGTrainer:
    """A 2-step run; every one of the 4 rows is drawn once per step (rollout_batch_size = rows)."""
    tokenizer.chat_template = CHAT
    trainer = PGTrainer(
        tiny_llama(tokenizer),
        processing_class=tokenizer,
        args=PGConfig(**small_run(tmp_path, **{"max_new_tokens": 8, "learning_rate": 1e-3, **overrides})),
        reward_funcs=reward,
        train_dataset=datasets_for(kind),
    )
    trainer.train()
    assert trainer.global_step == 2
    return trainer


def replay_on_last_batch(trainer, fn, kind: str) -> list:
    """``fn`` called directly, as TRL calls it, on the completions hfpg scored last."""
    r = trainer.last_rollout
    completions = (
        [[{"role": "assistant", "content": c}] for c in r.completions] if kind == "conversational" else r.completions
    )
    ids = [x[m].tolist() for x, m in zip(r.response_ids, r.response_mask)]
    return fn(prompts=r.prompts, completions=completions, completion_ids=ids, completions_ids=ids, **r.columns)


def as_list(scores: torch.Tensor) -> list:
    return [None if math.isnan(v) else v for v in scores.tolist()]


# ---- TRL 1.16's own reward functions -------------------------------------------------------------------------------
def trl_rewards():
    if os.environ.get("HFPG_REQUIRE_TRL"):
        import trl.rewards  # noqa: F401  (a failure here is the result: the compat target must have TRL)
    trl_rewards = pytest.importorskip("trl.rewards", reason="TRL is installed in .venv-peers (make test-trl-compat)")
    return trl_rewards


NEEDS_MESSAGES = {"accuracy_reward", "reasoning_accuracy_reward", "think_format_reward", "cosine_scaled_reward"}
TRL_REWARDS = {
    "accuracy_reward": lambda t: t.accuracy_reward,
    "reasoning_accuracy_reward": lambda t: t.reasoning_accuracy_reward,
    "think_format_reward": lambda t: t.think_format_reward,
    "cosine_scaled_reward": lambda t: t.get_cosine_scaled_reward(max_len=8),
    "repetition_penalty_reward": lambda t: t.get_repetition_penalty_reward(ngram_size=1, max_penalty=-1.0),
    "soft_overlong_punishment": lambda t: t.get_soft_overlong_punishment(max_completion_len=8, soft_punish_cache=4),
}
CASES = [
    (name, kind)
    for name in TRL_REWARDS
    for kind in ("conversational", "plain")
    if not (name in NEEDS_MESSAGES and kind == "plain")
]


@pytest.mark.parametrize("name, kind", CASES)
def test_trl_reward_functions_run_unchanged(name, kind, tokenizer, tmp_path):
    fn = TRL_REWARDS[name](trl_rewards())
    trainer = run(tokenizer, tmp_path, fn, kind)
    r = trainer.last_rollout
    part = trainer.reward_fn.names[0]
    # hfpg's scores are exactly what TRL's function returns for the same completions
    want = replay_on_last_batch(trainer, fn, kind)
    assert as_list(r.components[part]) == want
    assert r.scorable.tolist() == [w is not None for w in want]  # None: unscorable, no gradient
    if name in ("accuracy_reward", "cosine_scaled_reward"):  # the unparseable gold answer ("hello") is None
        assert r.scorable.tolist() == [c != "hello" for c in r.columns["solution"]]
        assert trainer.log_history[-1]["objective/unscorable_fraction"] == 0.25
    elif name != "reasoning_accuracy_reward":  # that one gives 0.0, not None, before a reasoning delimiter
        assert bool(r.scorable.all())
    if name in ("accuracy_reward", "reasoning_accuracy_reward"):  # log_extra columns reach the rollout
        assert r.extras["solution"] == r.columns["solution"] and len(r.extras["gold_parsed"]) == 4


def test_trl_rewards_weighted_together_like_grpo(tokenizer, tmp_path):
    t = trl_rewards()
    funcs = [t.think_format_reward, t.get_soft_overlong_punishment(max_completion_len=8, soft_punish_cache=4)]
    trainer = run(tokenizer, tmp_path, funcs, "conversational", reward_weights=[1.0, 0.5])
    r = trainer.last_rollout
    a, b = (replay_on_last_batch(trainer, fn, "conversational") for fn in funcs)
    assert r.scores.tolist() == pytest.approx([x + 0.5 * y for x, y in zip(a, b)])


# ---- rewards written as TRL's GRPO documentation writes them (hfpg's code, no TRL needed) -------------------------
def length_in_tokens(completions_ids, **kwargs):  # the documentation's spelling of completion_ids
    return [float(len(ids)) for ids in completions_ids]


def format_reward(completions, **kwargs):  # conversational: the text is in completion[0]["content"]
    return [1.0 if re.match(r"^<think>.*?</think>", c[0]["content"]) else 0.0 for c in completions]


def reference_reward(completions, ground_truth, **kwargs):  # reads a dataset column
    return [1.0 if gt in c else 0.0 for c, gt in zip(completions, ground_truth)]


def math_reward(prompts, completions, task, **kwargs):  # None for the rows of another task
    return [float(len(c)) if t == "math" else None for c, t in zip(completions, task)]


def coding_reward(prompts, completions, task, **kwargs):  # as documented, it tests "coding": no row matches
    return [1.0 if t == "coding" else None for t in task]


async def async_reward(prompts, completions, **kwargs):  # awaited, concurrently with other async rewards
    await asyncio.sleep(0.01)
    return [1.0 if c else 0.0 for c in completions]


@pytest.mark.parametrize(
    "reward, kind",
    [
        (length_in_tokens, "plain"),
        (format_reward, "conversational"),
        (reference_reward, "plain"),
        ([math_reward, coding_reward], "plain"),
        ([async_reward, async_reward], "conversational"),
    ],
    ids=["completions_ids", "conversational-format", "reference-column", "multi-task-none", "async"],
)
def test_rewards_written_as_trls_documentation_writes_them(reward, kind, tokenizer, tmp_path):
    trainer = run(tokenizer, tmp_path, reward, kind)
    r = trainer.last_rollout
    fns = reward if isinstance(reward, list) else [reward]
    for name, fn in zip(trainer.reward_fn.names, fns):
        want = replay_on_last_batch(trainer, fn, kind)
        if asyncio.iscoroutine(want):
            want = asyncio.run(want)
        got = as_list(r.components[name])
        assert [g is None for g in got] == [w is None for w in want]
        assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None])
    if fns[0] is math_reward:  # code rows: every reward returned None -> unscorable, left out of the score
        assert r.scorable.tolist() == [t == "math" for t in r.columns["task"]]
        assert trainer.log_history[-1]["objective/unscorable_fraction"] == 0.5
