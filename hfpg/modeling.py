"""A causal LM with a scalar value head, and its frozen reference.

``AutoModelForCausalLMWithValueHead`` wraps any ``AutoModelForCausalLM`` (or a PEFT model around one). One forward
returns the language-model logits and a value per token, read by a linear head from the last hidden state in fp32.
The head starts at exactly zero output, so the critic begins neutral and cannot disturb the first update.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
from dataclasses import dataclass

import torch
from huggingface_hub import hf_hub_download
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import ModelOutput

from .errors import ConfigError
from .schema import closest, unknown_keys

logger = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"


def _is_peft_model(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)


@dataclass
class ValueHeadOutput(ModelOutput):
    """logits: (B, K, V) for the last K positions kept; values: (B, K) fp32."""

    logits: torch.Tensor | None = None
    values: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None  # (B, K, H), only when asked for (TRPO's value fitting)


class ValueHead(nn.Module):
    """Scalar head on the last hidden state: (B, L, H) -> (B, L). Always runs in fp32; zero output at init."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden_states.to(self.summary.weight.dtype)).squeeze(-1)


class AutoModelForCausalLMWithValueHead(nn.Module):
    """Any causal LM plus a value head. Build it with :meth:`from_pretrained` or by wrapping a loaded model.

    >>> model = AutoModelForCausalLMWithValueHead.from_pretrained("gpt2")
    >>> out = model(input_ids, attention_mask=attention_mask)   # out.logits (B, L, V), out.values (B, L)
    """

    def __init__(self, pretrained_model: nn.Module):
        super().__init__()
        if _is_peft_model(pretrained_model) and pretrained_model.active_peft_config.is_prompt_learning:
            raise ValueError(
                f"PEFT {pretrained_model.active_peft_config.peft_type} is a prompt-learning method: it adds virtual "
                "tokens and ignores position ids, so left-padded prompts would be scored at the wrong positions. "
                "Use an adapter method instead (LoRA, IA3, LoHa, LoKr, VeRA, OFT, BOFT, AdaLoRA, ...)"
            )
        self.pretrained_model = pretrained_model
        config = pretrained_model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.v_head = ValueHead(text_config.hidden_size)
        if hasattr(pretrained_model, "device") and pretrained_model.device.type != "meta":
            self.v_head.to(pretrained_model.device)

    # ---- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *model_args, peft_config=None, **kwargs
    ) -> AutoModelForCausalLMWithValueHead:
        """Load a causal LM (Hub id, local folder or an already-loaded model) and the value head saved beside it.

        A folder written by :meth:`save_pretrained` gives back the same weights exactly. A folder with an
        ``adapter_config.json`` is loaded as a trainable PEFT model; ``peft_config`` wraps a plain model in a new
        adapter. Without a saved value head a fresh (zero) head is created.
        """
        source = pretrained_model_name_or_path
        if isinstance(source, nn.Module):
            base = source
            source = None
        elif os.path.isfile(os.path.join(str(source), "adapter_config.json")):
            base = AutoPeftModelForCausalLM.from_pretrained(source, *model_args, is_trainable=True, **kwargs)
        else:
            base = AutoModelForCausalLM.from_pretrained(source, *model_args, **kwargs)
        if peft_config is not None:
            base = get_peft_model(base, peft_config)
        model = cls(base)
        state = _find_value_head(source, kwargs) if source is not None else None
        if state is not None:
            model.v_head.load_state_dict(state)
        return model

    def save_pretrained(self, save_directory: str, merge: bool = False, save_value_head: bool = True, **kwargs) -> None:
        """Save the wrapped model (or its active adapter) with ``save_pretrained`` and the value head as safetensors
        (``save_value_head=False``: not the head, e.g. when a separate value model is the critic).

        merge: for a PEFT policy, write one full model with the adapter merged into a copy of the base weights
            (loadable with plain ``AutoModelForCausalLM``) instead of the adapter; the policy itself is unchanged.
            The merge works on a copy (moved to the CPU), so it briefly needs memory for a second copy of the weights.
        """
        os.makedirs(save_directory, exist_ok=True)
        if merge and self.is_peft_model:
            # a copy: merging in place and unmerging afterwards would not restore the weights bit for bit
            merged = copy.deepcopy(self.pretrained_model).to("cpu").merge_and_unload()
            merged.save_pretrained(save_directory, **kwargs)
            del merged
        else:
            if merge:
                logger.info("merge=True has no effect: the policy has no adapter; saving the full model")
            if self.is_peft_model and "selected_adapters" not in kwargs:  # the policy's adapter, not a critic's
                active = self.pretrained_model.active_adapter
                kwargs["selected_adapters"] = [active] if isinstance(active, str) else list(active)
            self.pretrained_model.save_pretrained(save_directory, **kwargs)
        if save_value_head:
            state = {k: v.detach().contiguous().cpu() for k, v in self.v_head.state_dict().items()}
            save_file(state, os.path.join(save_directory, VALUE_HEAD_FILE), metadata={"format": "pt"})

    # ---- forward ---------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_last_hidden_state: bool = False,
        **kwargs,
    ) -> ValueHeadOutput:
        """input_ids, attention_mask, position_ids: (B, L). ``logits_to_keep=K`` computes logits and values only for
        the last K positions (0 = all), which skips the vocabulary projection of the prompt."""
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        kwargs.pop("use_cache", None)
        out = self.pretrained_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
            return_dict=True,
            **kwargs,
        )
        hidden = out.hidden_states[-1]  # (B, L, H), after the final norm
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return ValueHeadOutput(
            logits=out.logits,
            values=self.v_head(hidden),
            last_hidden_state=hidden if return_last_hidden_state else None,
        )

    def generate(self, *args, **kwargs):
        """Delegates to the wrapped model's ``generate``."""
        return self.pretrained_model.generate(*args, **kwargs)

    # ---- conveniences --------------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.pretrained_model.config

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The decoder-layer classes, read by FSDP's transformer-based wrapping (and ``device_map="auto"``)."""
        return getattr(self.pretrained_model, "_no_split_modules", None)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def is_peft_model(self) -> bool:
        return _is_peft_model(self.pretrained_model)

    @property
    def peft_type(self) -> str | None:
        """The active adapter's method ("LORA", "IA3", ...), None without adapters."""
        if not self.is_peft_model:
            return None
        peft_type = self.pretrained_model.active_peft_config.peft_type
        return str(getattr(peft_type, "value", peft_type))

    @property
    def base_model(self) -> PreTrainedModel:
        """The transformers model underneath (inside the PEFT wrapper, if any)."""
        return self.pretrained_model.get_base_model() if self.is_peft_model else self.pretrained_model

    def disable_adapter(self):
        """Context in which a PEFT policy acts as its own reference (adapters off); an error for a plain model."""
        if not self.is_peft_model:
            raise ValueError("disable_adapter() needs a PEFT model; this policy has no adapters")
        return self.pretrained_model.disable_adapter()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute activations in backward (non-reentrant by default, which works with frozen PEFT bases).

        Uses transformers' ``activation_checkpointing_enable`` where it exists (v5), else the older name."""
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if self.is_peft_model and kwargs.get("use_reentrant", True):
            self.pretrained_model.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        base = self.base_model
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        base = self.base_model
        if hasattr(type(base), "is_activation_checkpointing"):
            return bool(base.is_activation_checkpointing)
        return bool(getattr(base, "is_gradient_checkpointing", False))


# ------------------------------------------------------------------------------------------------------------------
def _find_value_head(source, kwargs) -> dict | None:
    local = os.path.join(str(source), VALUE_HEAD_FILE)
    if os.path.isfile(local):
        return load_file(local)
    if os.path.isdir(str(source)):
        return None
    try:  # a Hub repo that was pushed by hfpg carries its value head
        path = hf_hub_download(
            str(source),
            VALUE_HEAD_FILE,
            revision=kwargs.get("revision"),
            token=kwargs.get("token"),
            cache_dir=kwargs.get("cache_dir"),
        )
        return load_file(path)
    except Exception:  # no such file, or the Hub is unreachable: a fresh head is the right default
        logger.info("no %s found for %s; starting from a zero value head", VALUE_HEAD_FILE, source)
        return None


def with_value_head(model, peft_config) -> AutoModelForCausalLMWithValueHead:
    """A model id / path, a causal LM (plain or PEFT) or a value-head model, wrapped in ``peft_config`` if given."""
    if not isinstance(model, AutoModelForCausalLMWithValueHead):
        return AutoModelForCausalLMWithValueHead.from_pretrained(model, peft_config=peft_config)
    if peft_config is not None:
        if model.is_peft_model:
            raise ValueError("the model already has a PEFT adapter; pass peft_config=None, or a model without one")
        model.pretrained_model = get_peft_model(model.pretrained_model, peft_config)
    return model


def adalora_step_hook(policy: AutoModelForCausalLMWithValueHead, get_step, num_optimizer_steps: int):
    """The call an AdaLoRA policy needs after every optimizer step (before ``zero_grad``: it reads the gradients):
    ``update_and_allocate(step)``, which re-allocates ranks by importance. Its ``total_step`` should equal the run's
    optimizer steps."""
    total = policy.pretrained_model.active_peft_config.total_step
    if total != num_optimizer_steps:
        logger.warning(
            "AdaLoRA total_step=%s but this run takes %d optimizer steps (max_steps x epochs x "
            "minibatches); set total_step=%d for its rank schedule to match",
            total,
            num_optimizer_steps,
            num_optimizer_steps,
        )

    def update_and_allocate() -> None:
        policy.pretrained_model.base_model.update_and_allocate(get_step())  # the same module inside DDP

    return update_and_allocate


def create_reference_model(model: nn.Module) -> nn.Module | None:
    """A frozen, eval-mode copy of the policy's language model, used for the KL penalty.

    Returns ``None`` for a PEFT policy: its reference is the same base weights with the adapters disabled, so no
    second copy of the base is held in memory.
    """
    if isinstance(model, AutoModelForCausalLMWithValueHead):
        if model.is_peft_model:
            return None
        model = model.pretrained_model
    elif _is_peft_model(model):
        return None
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0: PPO's ratio must be exactly 1 before the first update."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout_p"):  # functional dropout inside attention (Llama, ...)
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


@contextlib.contextmanager
def reference_context(policy: AutoModelForCausalLMWithValueHead, ref_model: nn.Module | None):
    """Yields the module that computes reference logits: ``ref_model``, or the policy with adapters disabled."""
    if ref_model is not None:
        yield ref_model
    else:
        with policy.disable_adapter():
            yield policy.pretrained_model


def peft_config_from_dict(spec: dict, where: str = "model.peft"):
    """A ``peft`` config from a YAML mapping: ``peft_type`` (default LORA, any adapter method peft offers) and that
    method's keys; ``task_type`` defaults to CAUSAL_LM. Unknown methods and keys are one clear ConfigError."""
    if isinstance(spec, PeftConfig):
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where} must be a mapping of peft config keys (e.g. {{r: 16, lora_alpha: 32}}), got {spec!r}"
        )
    values = {"task_type": "CAUSAL_LM", **spec}
    peft_type = str(values.pop("peft_type", "LORA")).upper()
    known_types = sorted(str(getattr(t, "value", t)) for t in PEFT_TYPE_TO_CONFIG_MAPPING)
    if peft_type not in known_types:
        close = closest(peft_type, known_types)
        hint = f"did you mean {close!r}?" if close else f"peft offers {known_types}"
        raise ConfigError(f"{where}.peft_type={spec.get('peft_type')!r} is not a peft method; {hint}")
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    problems = unknown_keys(
        values, [f.name for f in dataclasses.fields(cls)], f"{where}.", f" ({cls.__name__} has no such key)"
    )
    if problems:
        raise ConfigError("; ".join(problems), problems)
    try:
        config = cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where} ({cls.__name__}): {e}") from None
    if config.is_prompt_learning:
        raise ConfigError(
            f"{where}.peft_type={peft_type}: prompt-learning methods add virtual tokens and ignore "
            "position ids, which breaks left-padded prompts; use an adapter method (LORA, IA3, LOHA, "
            "LOKR, VERA, OFT, BOFT, ADALORA, ...)"
        )
    return config
