"""Conversational prompts: a prompt that is a list of messages (``[{"role": "user", "content": "..."}]``) is rendered
with the tokenizer's chat template (``add_generation_prompt=True``) before it is tokenized, as TRL does.

Rewards then receive the messages as ``prompts`` and each completion as ``[{"role": "assistant", "content": text}]``
(see :mod:`hfpg.rewards.calling`); hfpg's built-in rewards read the rendered text.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import DataError

ROLES = ("system", "developer", "user", "assistant", "tool")


def is_conversational(prompt) -> bool:
    """True for a list of message dicts (a conversational prompt)."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def message_problem(prompt: list) -> str | None:
    """What is wrong with one conversational prompt, or None."""
    for j, message in enumerate(prompt):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"message {j} has role {role!r}; roles are {list(ROLES)}"
        if not isinstance(content, (str, list)):
            return f"message {j} ({role}) needs a 'content' string, got {content!r}"
    return None


def prompt_kind(prompts: Sequence, name: str) -> str:
    """``"text"`` when every prompt is a string, ``"messages"`` when every prompt is a message list; a DataError naming
    the first bad row otherwise (mixed kinds, malformed messages, anything else)."""
    kinds = ["text" if isinstance(p, str) else "messages" if is_conversational(p) else None for p in prompts]
    if None in kinds:
        i = kinds.index(None)
        raise DataError(
            f"{name} row {i}: a prompt must be a string or a list of messages "
            f'([{{"role": "user", "content": "..."}}]), got {type(prompts[i]).__name__} {str(prompts[i])[:80]!r} '
            f"({kinds.count(None)} such rows)"
        )
    if not kinds:
        return "text"
    first = kinds[0]
    if any(k != first for k in kinds):
        i = next(i for i, k in enumerate(kinds) if k != first)
        raise DataError(
            f"{name} mixes string and message-list prompts: row 0 is {_kind_words(first)}, row {i} is "
            f"{_kind_words(kinds[i])}; give every row the same kind"
        )
    if first == "messages":
        for i, p in enumerate(prompts):
            problem = message_problem(p)
            if problem:
                raise DataError(f"{name} row {i}: {problem}")
    return first


def _kind_words(kind: str) -> str:
    return "a string" if kind == "text" else "a list of messages"


def check_chat_template(tokenizer, name: str) -> None:
    """A DataError, before anything else loads, when conversational prompts meet a tokenizer without a template."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{name} holds conversational prompts (lists of messages), but the tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has no chat template to render "
            f"them with; use the instruct/chat variant of the model, set tokenizer.chat_template, or give plain "
            f"string prompts"
        )


def render(tokenizer, prompts: Sequence[list], chat_template_kwargs: dict | None = None) -> list[str]:
    """Each message list as the text the model sees: the chat template with the assistant turn opened."""
    kwargs = dict(chat_template_kwargs or {})
    return [
        tokenizer.apply_chat_template(_clean(p), tokenize=False, add_generation_prompt=True, **kwargs) for p in prompts
    ]


def _clean(messages: list[dict]) -> list[dict]:
    """Messages without the None-valued keys an Arrow table adds (a column's struct has every row's keys)."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def assistant_messages(texts: Sequence[str]) -> list[list[dict]]:
    """Completions in TRL's conversational shape: one assistant message each."""
    return [[{"role": "assistant", "content": text}] for text in texts]
