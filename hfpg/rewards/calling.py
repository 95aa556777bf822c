"""How hfpg calls a reward: TRL 1.16's keyword contract, signature filtering, ``None`` and ``async def`` rewards.

Every reward is called with keyword arguments only:

==================  ======================================================================================
``prompts``         the prompts as the dataset holds them: strings, or message lists (conversational data)
``completions``     strings; for conversational data ``[{"role": "assistant", "content": text}]`` per sample
``completion_ids``  the sampled token ids of each completion (lists of ints, the stop token included)
``trainer_state``   a ``transformers.TrainerState``: ``global_step``, ``max_steps``, ``log_history``, ...
``log_metric``      ``log_metric(name, value)``: a scalar logged as ``reward/<name>`` with the step's metrics
``log_extra``       ``log_extra(column, values)``: one value per sample, written next to it in samples.jsonl
every other column  the dataset's other columns for the same rows (``solution``, ``references``, ...)
==================  ======================================================================================

A function that takes ``**kwargs`` receives all of them; one that does not receives only the names in its
signature (a required argument hfpg cannot provide is an error naming it, raised before training starts).
hfpg's built-in rewards (:class:`~hfpg.rewards.base.Reward`) read text: they receive the prompts as the policy saw
them (chat template applied) and the completions as strings. A reward may return ``None`` for a sample it does not
apply to. ``async def`` rewards are awaited, all of a batch's concurrently, on one background event loop (so a
trainer inside Jupyter's running loop works too).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..chat import assistant_messages, is_conversational
from ..errors import RewardError

CONTEXT_KEYS = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")
# names TRL's documentation uses for the same argument (its first GRPO reward example spells `completions_ids`)
ALIASES = {"completions_ids": "completion_ids"}


def reads_text(fn) -> bool:
    """True for rewards that score text (hfpg's built-ins): they get rendered prompts and string completions."""
    return bool(getattr(fn, "reads_text", False))


@dataclass
class RewardInputs:
    """One batch as rewards see it (B samples). ``rendered_prompts``: the text the policy saw (chat template
    applied); ``conversational``: prompts are message lists, so TRL-style rewards get message completions."""

    prompts: list
    completions: list[str]
    completion_ids: list[list[int]] | None = None
    columns: dict[str, list] = field(default_factory=dict)
    rendered_prompts: list[str] | None = None
    conversational: bool = False
    trainer_state: Any = None
    log: RewardLog | None = None

    @classmethod
    def from_kwargs(cls, prompts, completions, **kwargs) -> RewardInputs:
        """The inputs of a direct call ``reward(prompts=..., completions=..., **kwargs)`` (outside a trainer):
        string completions, or TRL-style message completions, which are read back as text."""
        texts = [c[-1]["content"] if is_conversational(c) else c for c in completions]
        context = {k: kwargs.pop(k) for k in ("completion_ids", "trainer_state") if k in kwargs}
        log = RewardLog.from_callables(kwargs.pop("log_metric", None), kwargs.pop("log_extra", None))
        conversational = bool(prompts) and is_conversational(prompts[0])
        return cls(list(prompts), texts, columns=kwargs, conversational=conversational, log=log, **context)

    def __len__(self) -> int:
        return len(self.completions)

    def available(self) -> dict[str, Any]:
        """Every keyword a TRL-style reward may receive (context first: a column never shadows ``prompts``)."""
        completions = assistant_messages(self.completions) if self.conversational else list(self.completions)
        out = dict(self.columns)
        out.update(prompts=list(self.prompts), completions=completions)
        if self.completion_ids is not None:
            out["completion_ids"] = self.completion_ids
        if self.trainer_state is not None:
            out["trainer_state"] = self.trainer_state
        if self.log is not None:
            out.update(log_metric=self.log.log_metric, log_extra=self.log.log_extra)
        return out

    def kwargs_for(self, fn) -> dict[str, Any]:
        """The keyword arguments ``fn`` is called with (text for built-ins; filtered by its signature)."""
        available = self.available()
        if reads_text(fn):
            available.update(prompts=list(self.rendered_prompts or self.prompts), completions=list(self.completions))
        return select_kwargs(fn, available)


class RewardLog:
    """What reward functions log through ``log_metric`` / ``log_extra`` while one batch is scored."""

    def __init__(self):
        self.metrics: dict[str, list[float]] = defaultdict(list)
        self.extras: dict[str, list] = defaultdict(list)

    @classmethod
    def from_callables(cls, log_metric=None, log_extra=None) -> RewardLog | None:
        """A log forwarding to the given callables (a direct call that passed them), or None."""
        if log_metric is None and log_extra is None:
            return None
        log = cls()
        if log_metric is not None:
            log.log_metric = log_metric
        if log_extra is not None:
            log.log_extra = log_extra
        return log

    def log_metric(self, name: str, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise RewardError(f"log_metric({name!r}, {value!r}): the value must be a finite number")
        self.metrics[str(name)].append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        self.extras[str(column)].extend(list(values))


def _signature(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)  # follows __wrapped__ (labelled rewards) and drops partial-bound arguments
    except (TypeError, ValueError):  # builtins and C callables without a signature: pass everything
        return None


def select_kwargs(fn, available: dict[str, Any]) -> dict[str, Any]:
    """``available`` filtered to what ``fn`` accepts: everything when it takes ``**kwargs``, else its named keyword
    parameters (``completions_ids`` gets ``completion_ids``). A required parameter with no value is a RewardError."""
    sig = _signature(fn)
    if sig is None:
        return dict(available)
    params = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        out = dict(available)
        for p in params:  # a documented alias it names gets its value too
            if p.name not in out and ALIASES.get(p.name) in available:
                out[p.name] = available[ALIASES[p.name]]
        available = out
    out, missing = {}, []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        source = p.name if p.name in available else ALIASES.get(p.name)
        if p.kind is not p.POSITIONAL_ONLY and source in available:
            out[p.name] = available[source]
        elif p.default is p.empty:
            missing.append(p.name)
    if missing:
        raise RewardError(_missing_message(fn, missing, available, sig))
    return available if any(p.kind is p.VAR_KEYWORD for p in params) else out


def _missing_message(fn, missing: list[str], available, sig) -> str:
    from .base import reward_name

    columns = sorted(k for k in available if k not in CONTEXT_KEYS)
    return (
        f"reward function {reward_name(fn)!r}{sig} needs {', '.join(map(repr, missing))}, which hfpg cannot pass: "
        f"rewards are called with keywords only, from {list(CONTEXT_KEYS)} and the dataset's other columns "
        f"{columns}. Add the column to the dataset, give the argument a default, or take **kwargs"
    )


def check_signature(fn, columns: list[str]) -> None:
    """Raise a RewardError now if ``fn`` needs an argument no batch will have (``columns``: the dataset's others)."""
    select_kwargs(fn, dict.fromkeys([*CONTEXT_KEYS, *columns]))


# ---- calling, with async rewards awaited concurrently ------------------------------------------------------------
_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    """One event loop in a daemon thread for every async reward of the process (works under a running loop)."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="hfpg-async-rewards", daemon=True).start()
        return _loop


def call_rewards(fns: list[Callable], inputs: RewardInputs, names: list[str]) -> list:
    """Each reward's raw output for ``inputs``: synchronous ones in order, then every async one (and any awaitable a
    synchronous one returned) awaited together. A call that does not fit the signature names the function."""
    outputs: list = [None] * len(fns)
    pending: dict[int, Any] = {}
    for i, (fn, name) in enumerate(zip(fns, names)):
        kwargs = inputs.kwargs_for(fn)
        try:
            out = fn(**kwargs)
        except TypeError as e:
            if "argument" in str(e) and (name in str(e) or getattr(fn, "__name__", "?") in str(e)):
                raise RewardError(f"reward function {name!r} could not be called with {sorted(kwargs)}: {e}") from e
            raise
        if inspect.isawaitable(out):
            pending[i] = out
        else:
            outputs[i] = out
    if pending:

        async def gather():
            return await asyncio.gather(*pending.values())

        for i, out in zip(pending, asyncio.run_coroutine_threadsafe(gather(), _background_loop()).result()):
            outputs[i] = out
    return outputs
