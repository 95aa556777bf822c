"""The forward pass that scores a response: (prompt, response) -> logprobs, values and entropy of each response token.

Every forward over a sampled response goes through here: the rollout's no-grad policy and reference forwards, the
replay's recomputation under the current policy, the update's training forward (each PPO/REINFORCE micro-batch, or
the one fused forward of a single-step update) and TRPO's full distributions and value-head fit. So the three details
that make these numbers right live once:

- position ids come from the attention mask, so a left-padded prompt scores exactly like the unpadded one;
- the outputs that predict response token t sit one position earlier (:func:`hfpg.ops.response_positions`), and only
  those T + 1 positions are projected onto the vocabulary (``logits_to_keep``);
- logprobs and entropy are of ``softmax(logits / temperature)``, the distribution the tokens were sampled from.

Shapes: ``B`` sequences, ``P`` prompt tokens (left-padded), ``T`` response tokens (right-padded), ``V`` vocabulary,
``H`` hidden size. Outputs are zero on padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops


def call_lm(model, input_ids, attention_mask, position_ids, keep: int, **kwargs):
    """Forward that asks only for the last ``keep`` positions' logits when the model supports it."""
    try:
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=keep,
            use_cache=False,
            **kwargs,
        )
    except TypeError:  # an architecture without logits_to_keep
        return model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
        )


@dataclass
class ResponseOutputs:
    """A model's outputs at the positions that predict each response token."""

    logits: torch.Tensor  # (B, T, V), the model's dtype
    values: torch.Tensor | None = None  # (B, T) fp32, from a value-head model
    hidden: torch.Tensor | None = None  # (B, T, H), when asked for


def response_outputs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    last_hidden_state: bool = False,
) -> ResponseOutputs:
    """ONE forward over prompt + response. (B, P) and (B, T) ids and masks -> :class:`ResponseOutputs`.

    ``model`` is a causal LM or an :class:`~hfpg.modeling.AutoModelForCausalLMWithValueHead` (which adds values, and
    the last hidden state when ``last_hidden_state``).
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
    position_ids = ops.position_ids_from_attention_mask(attention_mask)
    T = response_ids.shape[1]
    extra = {"return_last_hidden_state": True} if last_hidden_state else {}
    out = call_lm(model, input_ids, attention_mask, position_ids, keep=T + 1, **extra)
    values, hidden = out.get("values"), out.get("last_hidden_state")  # ModelOutputs are mappings
    return ResponseOutputs(
        logits=ops.response_positions(out.logits, T),
        values=ops.response_positions(values, T) if values is not None else None,
        hidden=ops.response_positions(hidden, T) if last_hidden_state and hidden is not None else None,
    )


def sequence_forward(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
    with_values: bool,
    with_entropy: bool = False,
    entropy_grad: bool = True,
) -> dict[str, torch.Tensor]:
    """Response-token ``logprobs`` (and ``values``, ``entropy``) from one forward, each (B, T), zero on padding.

    ``entropy_grad=False`` measures the entropy without keeping a (B, T, V) graph for it.
    """
    out = response_outputs(model, prompt_ids, prompt_mask, response_ids, response_mask)
    mask = response_mask.bool()
    result = {"logprobs": torch.where(mask, ops.logprobs_from_logits(out.logits, response_ids, temperature), 0.0)}
    if with_entropy:
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
            result["entropy"] = torch.where(mask, ops.entropy_from_logits(out.logits, temperature), 0.0)
    if with_values:
        result["values"] = torch.where(mask, out.values.float(), 0.0)
    return result


def rollout_forward(
    model,
    rollout,
    temperature: float,
    with_values: bool,
    with_entropy: bool = False,
    rows: torch.Tensor | None = None,
    chunk_size: int | None = None,
    entropy_grad: bool = True,
) -> dict[str, torch.Tensor]:
    """:func:`sequence_forward` over a :class:`~hfpg.rollout.Rollout`'s sequences (all, or the indices ``rows``),
    ``chunk_size`` sequences at a time (None = all at once) so that no-grad forwards hold bounded memory."""
    seqs = rollout.sequences(rows)
    n = seqs["response_ids"].shape[0]
    size = chunk_size or n
    parts = [
        sequence_forward(
            model,
            **{k: v[start : start + size] for k, v in seqs.items()},
            temperature=temperature,
            with_values=with_values,
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
        )
        for start in range(0, n, size)
    ]
    return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}
