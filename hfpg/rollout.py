"""Prompts -> left-padded tokens -> sampled completions, and the :class:`Rollout` that carries one batch of
experience through the step (its logprobs, values and reference logprobs come from :mod:`hfpg.forward`).

Everything here runs without gradients. Shapes: ``B`` sequences, ``P`` prompt tokens (left-padded), ``T``
response tokens (right-padded after the first stop token).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers import GenerationConfig

from . import ops


@dataclass
class Rollout:
    """One batch of experience. Tensors are (B, P) for the prompt, (B, T) for the response, (B,) per sequence."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor  # bool, True = real token (the stop token included)
    has_stop: torch.Tensor  # bool (B,), False when max_new_tokens was hit first
    logprobs: torch.Tensor | None = None  # fp32, temperature-scaled, 0 on padding
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None  # per-token entropy of the sampling policy (temperature-scaled)
    scores: torch.Tensor | None = None  # (B,) sequence scores from the reward function (0 where unscorable)
    scorable: torch.Tensor | None = None  # (B,) bool: some reward scored it (None = every sample)
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # (B,) raw scores of each part, NaN = None
    # experience replay: behaviour-policy logprobs μ, truncated importance weights and age (fresh: logprobs, 1, 0)
    behaviour_logprobs: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None
    staleness: torch.Tensor | None = None
    # logprobs the sampling engine (vLLM) reported for the sampled tokens, 0 on padding; None with the hf backend
    sampler_logprobs: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)  # as the policy saw them (chat template applied)
    completions: list[str] = field(default_factory=list)
    columns: dict[str, list] = field(default_factory=dict)
    extras: dict[str, list] = field(default_factory=dict)  # per-sample columns rewards logged with log_extra
    reward_metrics: dict[str, list[float]] = field(default_factory=dict)  # values rewards logged with log_metric

    @property
    def batch_size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def loss_mask(self) -> torch.Tensor:
        """(B, T) bool: the tokens that enter advantages and losses — real tokens of scorable samples."""
        if self.scorable is None:
            return self.response_mask
        return self.response_mask & self.scorable.to(self.response_mask.device).unsqueeze(1)

    def sequences(self, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The prompt and response ids and masks (of ``rows`` only, when given): what a forward needs."""
        seqs = {
            "prompt_ids": self.prompt_ids,
            "prompt_mask": self.prompt_mask,
            "response_ids": self.response_ids,
            "response_mask": self.response_mask,
        }
        return seqs if rows is None else {k: v[rows] for k, v in seqs.items()}

    def select(self, rows: slice | Sequence[int]) -> Rollout:
        """The rollout of ``rows`` only (e.g. one process's shard of a global batch); widths are kept."""
        index = list(range(self.batch_size))[rows] if isinstance(rows, slice) else list(rows)
        positions = torch.tensor(index, dtype=torch.long)

        def take(value):  # tensors and per-row lists by row; dicts (components, columns) field by field
            if isinstance(value, torch.Tensor):
                return value[positions.to(value.device)]
            if isinstance(value, list):
                return [value[i] for i in index] if value else []
            if isinstance(value, dict):
                return {k: take(v) for k, v in value.items()}
            return value

        return Rollout(**{f.name: take(getattr(self, f.name)) for f in fields(self)})


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """Stack rollouts of different lengths: prompts re-padded on the left, responses on the right (masks False).

    Per-token tensors are padded with 0 (logprobs, values, weights); text fields and columns are concatenated.
    """
    P = max(r.prompt_ids.shape[1] for r in rollouts)
    T = max(r.response_ids.shape[1] for r in rollouts)

    def pad(x: torch.Tensor, width: int, left: bool, value) -> torch.Tensor:
        extra = width - x.shape[1]
        if extra == 0:
            return x
        filler = torch.full((x.shape[0], extra), value, dtype=x.dtype, device=x.device)
        return torch.cat([filler, x] if left else [x, filler], dim=1)

    out = {}
    for name in ("prompt_ids", "prompt_mask"):
        value = pad_token_id if name == "prompt_ids" else 0
        out[name] = torch.cat([pad(getattr(r, name), P, True, value) for r in rollouts])
    for name in (
        "response_ids",
        "response_mask",
        "logprobs",
        "ref_logprobs",
        "values",
        "entropy",
        "behaviour_logprobs",
        "is_weights",
        "sampler_logprobs",
    ):
        parts = [getattr(r, name) for r in rollouts]
        if any(x is None for x in parts):
            out[name] = None
            continue
        value = pad_token_id if name == "response_ids" else (False if name == "response_mask" else 0)
        out[name] = torch.cat([pad(x, T, False, value) for x in parts])
    for name in ("has_stop", "scores", "staleness"):
        parts = [getattr(r, name) for r in rollouts]
        out[name] = None if any(x is None for x in parts) else torch.cat(parts)
    if any(r.scorable is not None for r in rollouts):  # None means every sample of that part is scorable
        out["scorable"] = torch.cat(
            [r.scorable if r.scorable is not None else r.has_stop.new_ones(r.batch_size) for r in rollouts]
        )
    columns = {k: [v for r in rollouts for v in r.columns.get(k, [None] * r.batch_size)] for k in rollouts[0].columns}
    return Rollout(
        **out,
        prompts=[p for r in rollouts for p in r.prompts],
        completions=[c for r in rollouts for c in r.completions],
        columns=columns,
    )


@contextlib.contextmanager
def _tokenizer_sides(tokenizer, padding: str, truncation: str):
    old = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = padding, truncation
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = old


def tokenize_prompts(
    tokenizer,
    prompts: Sequence[str],
    max_prompt_length: int | None = None,
    device: torch.device | str = "cpu",
    add_special_tokens: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask (B, P); ``max_prompt_length`` keeps the *last* N tokens.
    ``add_special_tokens=False`` for text a chat template rendered (it holds its own BOS)."""
    with _tokenizer_sides(tokenizer, "left", "left"):
        enc = tokenizer(
            list(prompts),
            add_special_tokens=add_special_tokens,
            padding=True,
            truncation=max_prompt_length is not None,
            max_length=max_prompt_length,
            return_tensors="pt",
        )
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def build_generation_config(config, tokenizer, stop_token_ids: Sequence[int]) -> GenerationConfig:
    """Sampling settings from a :class:`~hfpg.config.PGConfig`. Every processor that would change the sampling
    distribution beyond temperature/top-k/top-p is set explicitly off, so a checkpoint's own
    ``generation_config.json`` (repetition penalties, ...) cannot silently alter it."""
    return GenerationConfig(
        do_sample=True,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        max_new_tokens=config.max_new_tokens,
        min_new_tokens=config.min_new_tokens,
        eos_token_id=list(stop_token_ids),
        pad_token_id=tokenizer.pad_token_id,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_p=config.min_p,
        typical_p=1.0,
        num_beams=1,
        num_return_sequences=1,
        use_cache=True,
    )


@torch.no_grad()
def generate_responses(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    generation_config: GenerationConfig,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample completions and truncate each after its first stop token.

    prompt_ids, prompt_mask: (B, P) left-padded -> (response_ids (B, T), response_mask (B, T), has_stop (B,)).
    ``generate`` stops as soon as every sequence has produced a stop token, so T <= max_new_tokens.
    """
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=generation_config)
    responses = out[:, prompt_ids.shape[1] :]
    if responses.shape[1] == 0:  # max_new_tokens reached 0 tokens: keep shapes valid
        responses = torch.full((prompt_ids.shape[0], 1), pad_token_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    return ops.truncate_at_stop(responses, stop_token_ids, pad_token_id)


def completion_ids(response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[list[int]]:
    """The sampled token ids of each completion (its stop token included), as rewards receive them."""
    return [ids[m.bool()].tolist() for ids, m in zip(response_ids.cpu(), response_mask.cpu())]


def decode_completions(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Text of each completion up to its stop token, special tokens (EOS, padding) removed."""
    return [
        tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
        for ids, m in zip(response_ids.cpu(), response_mask.cpu())
    ]


def columns_for(rows: list[dict[str, Any]], exclude: str) -> dict[str, list]:
    """The dataset's other columns for these rows, as lists (what reward functions receive as ``**columns``)."""
    if not rows:
        return {}
    return {k: [r[k] for r in rows] for k in rows[0] if k != exclude}
