"""The forward pass that scores a response: (prompt, response) -> logprobs, values and entropy of each response token.

Every forward over a sampled response goes through here: the rollout's no-grad policy and reference forwards, the
replay's recomputation under the current policy, the update's training forward (each PPO/REINFORCE micro-batch, or
the one fused forward of a single-step update) and TRPO's full distributions and value-head fit. So the details that
make these numbers right, and their memory bounded, live once:

- position ids come from the attention mask, so a left-padded prompt scores exactly like the unpadded one;
- the outputs that predict response token t sit one position earlier (:func:`hfpg.ops.response_positions`), and only
  those T + 1 positions are projected onto the vocabulary (``logits_to_keep``);
- logprobs and entropy are of ``softmax(logits / temperature)``, the distribution the tokens were sampled from;
- with ``logits_chunk_size`` (the default) the vocabulary projection is not done inside the model at all: the model's
  own forward runs (so DDP, PEFT and the value head see an ordinary call) while the output embedding is tapped for its
  input, and the logits of the real response tokens are made ``logits_chunk_size`` positions at a time, each chunk
  recomputed in the backward. Memory for logits is then one chunk's, not (B, T, V) plus its fp32 copies and
  gradients. A model whose logits are not exactly ``output_embeddings(hidden)`` (soft-capping, logit scaling, an
  unknown structure, a sharded head) is detected and scored the plain way.

Shapes: ``B`` sequences, ``P`` prompt tokens (left-padded), ``T`` response tokens (right-padded), ``V`` vocabulary,
``H`` hidden size, ``N`` real response tokens. Outputs are zero on padding.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ops

logger = logging.getLogger(__name__)

#: response positions whose logits are computed at once (PGConfig.logits_chunk_size's default; None = all at once)
DEFAULT_LOGITS_CHUNK_SIZE = 1024

# config keys of architectures whose logits are a transform of output_embeddings(hidden), never a plain projection:
# soft-capping (Gemma 2/3), or a scale (Cohere logit_scale, Granite/MiniCPM3 logits_scaling, Falcon-H1 ...)
_SOFTCAP_KEYS = ("final_logit_softcapping",)
_SCALE_KEYS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")
_PLAIN_FAILED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # heads whose model transformed the tapped logits


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

    logits: torch.Tensor | None  # (B, T, V), the model's dtype; None when head/head_hidden are given instead
    values: torch.Tensor | None = None  # (B, T) fp32, from a value-head model
    hidden: torch.Tensor | None = None  # (B, T, H), the value head's input, when asked for
    head: nn.Module | None = None  # the output embedding: logits = head(head_hidden), exactly
    head_hidden: torch.Tensor | None = None  # (B, T, H), the output embedding's input
    head_autocast: tuple | None = None  # (device type, enabled, dtype): autocast as the model's forward ran the head


def response_outputs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    last_hidden_state: bool = False,
    logits: bool = True,
) -> ResponseOutputs:
    """ONE forward over prompt + response. (B, P) and (B, T) ids and masks -> :class:`ResponseOutputs`.

    ``model`` is a causal LM or an :class:`~hfpg.modeling.AutoModelForCausalLMWithValueHead` (which adds values, and
    the last hidden state when ``last_hidden_state``). ``logits=False`` skips the vocabulary projection where the
    model allows it (:func:`output_head`) and returns ``head`` and ``head_hidden`` instead; otherwise ``logits``.
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
    position_ids = ops.position_ids_from_attention_mask(attention_mask)
    T = response_ids.shape[1]
    extra = {"return_last_hidden_state": True} if last_hidden_state else {}
    head = None if logits else output_head(model)
    tap = _HeadTap(head)
    with tap:
        out = call_lm(model, input_ids, attention_mask, position_ids, keep=T + 1, **extra)
    if head is not None and not tap.matches(out.logits):
        _PLAIN_FAILED.add(head)
        logger.warning(
            "the logits of %s are not exactly its output embedding's output; its logprobs use full logits "
            "(no logits_chunk_size)",
            type(head).__name__,
        )
        head = None
        if tap.cut:  # the model saw a cut projection: score it again, the plain way
            out = call_lm(model, input_ids, attention_mask, position_ids, keep=T + 1, **extra)
    values, hidden = out.get("values"), out.get("last_hidden_state")  # ModelOutputs are mappings
    return ResponseOutputs(
        logits=ops.response_positions(out.logits, T) if head is None else None,
        values=ops.response_positions(values, T) if values is not None else None,
        hidden=ops.response_positions(hidden, T) if last_hidden_state and hidden is not None else None,
        head=head,
        head_hidden=ops.response_positions(tap.hidden, T) if head is not None else None,
        head_autocast=tap.autocast,
    )


def output_head(model) -> nn.Module | None:
    """The module whose output is ``model``'s logits (its output embedding, ``lm_head``), or None where hfpg must not
    project outside the model: no such module, a config that transforms the logits after it (soft-capping, a logit
    scale), or a head sharded by FSDP / DeepSpeed ZeRO-3. Looks through DDP / DeepSpeed engines, the value-head
    wrapper and PEFT."""
    m = model
    for _ in range(8):
        if _is_sharded(m):
            return None
        if isinstance(m, nn.parallel.DistributedDataParallel) or type(m).__name__ == "DeepSpeedEngine":
            m = m.module
        elif hasattr(m, "pretrained_model") and hasattr(m, "v_head"):  # AutoModelForCausalLMWithValueHead
            m = m.pretrained_model
        elif callable(getattr(m, "get_base_model", None)):  # peft.PeftModel
            m = m.get_base_model()
        else:
            break
    get = getattr(m, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module) or head in _PLAIN_FAILED or _is_sharded(head):
        return None
    config = getattr(m, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(config, k, None) is not None for k in _SOFTCAP_KEYS):
        return None
    if any(getattr(config, k, None) not in (None, 1, 1.0) for k in _SCALE_KEYS):
        return None
    return head


def _is_sharded(module: nn.Module) -> bool:
    """FSDP2 (an FSDPModule, or DTensor weights) or DeepSpeed ZeRO-3 (partitioned parameters carry ``ds_id``)."""
    if any(c.__name__ == "FSDPModule" for c in type(module).__mro__):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and (hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor")


class _HeadTap:
    """While active, the output embedding ``head``'s first call keeps its input (the hidden states the logits come
    from) and projects only the last position, so the model's own forward never builds (B, L, V) logits. A no-op for
    ``head=None``."""

    def __init__(self, head: nn.Module | None):
        self.head, self.handles = head, []
        self.calls, self.cut, self.hidden, self.logits, self.autocast = 0, False, None, None, None

    def __enter__(self):
        if self.head is not None:
            self.handles = [
                self.head.register_forward_pre_hook(self._before),
                self.head.register_forward_hook(self._after),
            ]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _before(self, module, args):
        self.calls += 1
        if self.calls == 1 and len(args) == 1 and isinstance(args[0], torch.Tensor) and args[0].dim() == 3:
            self.hidden, self.cut = args[0], True
            device = args[0].device.type  # Accelerate's mixed precision autocasts inside the model's forward only
            self.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            return (args[0][:, -1:],)  # (B, 1, H): the model still gets logits of the right type
        return None

    def _after(self, module, args, output):
        if self.calls == 1:
            self.logits = output

    def matches(self, logits) -> bool:
        """Whether the model returned exactly the (cut) projection: then logits = head(hidden), nothing else."""
        if self.calls != 1 or not self.cut or not isinstance(self.logits, torch.Tensor):
            return False
        if logits is self.logits:
            return True
        return (
            isinstance(logits, torch.Tensor)
            and logits.shape == self.logits.shape
            and torch.equal(logits, self.logits.to(logits.dtype))
        )


def head_logprobs(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    chunk_size: int,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    autocast: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprobs of ``labels`` (and the entropy) under ``softmax(head(hidden) / temperature)``, made ``chunk_size``
    real positions at a time. hidden (B, T, H), labels and mask (B, T) -> (logprobs, entropy or None), each (B, T)
    fp32, zero on padding; the same numbers as :func:`hfpg.ops.logprobs_from_logits` / ``entropy_from_logits`` on
    the full logits.

    Only real positions are projected. With gradients, every chunk but the last is recomputed in the backward
    (activation checkpointing), so autograd keeps no chunk's logits but the last one's. ``autocast`` (device type,
    enabled, dtype) is the autocast state the head runs under: the one the model's own forward ran it under.
    """
    mask = mask.bool()
    h, y = hidden[mask], labels[mask]  # (N, H), (N,): one sync, for N
    n = h.shape[0]
    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))

    device = h.device.type
    device, enabled, dtype = autocast or (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    def stats(h_chunk, y_chunk):
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            logits = head(h_chunk).unsqueeze(0)  # (1, c, V), in the dtype the model's forward would give
        logprobs = ops.logprobs_from_logits(logits, y_chunk.unsqueeze(0), temperature)[0]
        if not with_entropy:
            return (logprobs,)
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
            return logprobs, ops.entropy_from_logits(logits, temperature)[0]

    parts = []
    starts = range(0, n, chunk_size) if n else [0]  # no real token: one empty chunk keeps the graph connected
    for i, start in enumerate(starts):
        args = (h[start : start + chunk_size], y[start : start + chunk_size])
        recompute = grad and i < len(starts) - 1
        parts.append(checkpoint(stats, *args, use_reentrant=False) if recompute else stats(*args))
    flat = [torch.cat(p) for p in zip(*parts)]
    out = [mask.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, x) for x in flat]
    return out[0], (out[1] if with_entropy else None)


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
    logits_chunk_size: int | None = DEFAULT_LOGITS_CHUNK_SIZE,
) -> dict[str, torch.Tensor]:
    """Response-token ``logprobs`` (and ``values``, ``entropy``) from one forward, each (B, T), zero on padding.

    ``entropy_grad=False`` measures the entropy without keeping a graph for it. ``logits_chunk_size`` response
    positions get their logits at once (:func:`head_logprobs`; None = the whole (B, T, V) at once).
    """
    out = response_outputs(model, prompt_ids, prompt_mask, response_ids, response_mask, logits=not logits_chunk_size)
    mask = response_mask.bool()
    result = {}
    if out.logits is None:
        result["logprobs"], entropy = head_logprobs(
            out.head,
            out.head_hidden,
            response_ids,
            mask,
            temperature,
            logits_chunk_size,
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
            autocast=out.head_autocast,
        )
        if with_entropy:
            result["entropy"] = entropy
    else:
        result["logprobs"] = torch.where(mask, ops.logprobs_from_logits(out.logits, response_ids, temperature), 0.0)
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
    logits_chunk_size: int | None = DEFAULT_LOGITS_CHUNK_SIZE,
) -> dict[str, torch.Tensor]:
    """:func:`sequence_forward` over a :class:`~hfpg.rollout.Rollout`'s sequences (all, or the indices ``rows``),
    ``chunk_size`` sequences at a time (None = all at once) so that no-grad forwards hold bounded memory;
    ``logits_chunk_size`` positions of logits at a time within each."""
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
            logits_chunk_size=logits_chunk_size,
        )
        for start in range(0, n, size)
    ]
    return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}
