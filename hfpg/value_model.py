"""A separate critic (``value_model:``): a second model that reads the policy's token ids and gives a value per token,
trained with its own optimizer, instead of the value head on the policy's trunk (as OpenRLHF and verl train PPO).

Every critic is *sequence-classification shaped*: a backbone and a one-output ``score`` head applied to each position
of the backbone's last hidden states (TRL's old ``get_reward``: ``getattr(model, model.base_model_prefix)(...)`` then
``model.score(hidden)``). The sources (``PGConfig.value_model``):

- an id / path of an ``AutoModelForSequenceClassification`` checkpoint with ``num_labels=1`` (its head is kept), or of a
  causal LM (its backbone and a fresh, zero ``score`` head);
- ``reward_model``: a copy of the run's one learned reward model (the reward model itself is never touched);
- ``policy``: the policy's own weights: a full copy, or — for a LoRA policy — a second LoRA adapter ``critic`` on the
  *same* base weights (one copy in memory) plus its own head; its forward runs with that adapter active, the policy's
  forwards never see it.

Saved (final model) as ``value_model/``: a plain ``AutoModelForSequenceClassification`` (the LoRA critic merged into a
copy of the base) with the policy's tokenizer, which ``value_model: <that folder>`` accepts again.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from . import ops
from .errors import ConfigError

logger = logging.getLogger(__name__)

VALUE_MODEL_DIR = "value_model"  # the critic's folder inside a saved model
CRITIC_ADAPTER = "critic"  # the LoRA critic's adapter name on the policy's PEFT model


class ValueModel(nn.Module):
    """A critic around a sequence classifier ``model`` (num_labels=1, a ``score`` head): (B, L) ids -> (B, L) values."""

    shared_parameter_ids: frozenset[int] = frozenset()  # none: its weights are its own

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, L, H)
        return self.model.score(hidden).float().squeeze(-1)  # (B, L)

    def to_sequence_classifier(self) -> nn.Module:
        return self.model

    def save_pretrained(self, path: str) -> None:
        self.to_sequence_classifier().save_pretrained(path)


class LoraValueModel(nn.Module):
    """The critic of ``value_model: policy`` on a LoRA policy: the adapter ``critic`` of the policy's own PEFT model
    (registered here too, so its weights are this module's parameters; the base weights are not) and a ``score``
    head. ``forward`` makes ``critic`` the active adapter, runs the backbone, and restores the policy's adapter and
    every other ``requires_grad`` flag as they were."""

    def __init__(self, peft_model: nn.Module, hidden_size: int, adapter: str = CRITIC_ADAPTER):
        super().__init__()
        object.__setattr__(self, "_peft", peft_model)  # not a submodule: the policy owns the base weights
        self.adapter = adapter
        marker = f".{adapter}."
        self.adapter_parameters = nn.ParameterList([p for n, p in peft_model.named_parameters() if marker in n])
        if not len(self.adapter_parameters):
            raise ValueError(f"the PEFT model has no parameters of adapter {adapter!r}")
        self.score = nn.Linear(hidden_size, 1, bias=False, dtype=torch.float32)
        nn.init.zeros_(self.score.weight)  # values start at 0, like the value head
        self.shared_parameter_ids = frozenset(id(p) for p in self.adapter_parameters)

    @property
    def peft_model(self):
        return self._peft

    @property
    def config(self):
        return self._peft.get_base_model().config

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        peft = self._peft
        policy_adapter = peft.active_adapter
        flags = [(p, p.requires_grad) for p in peft.parameters()]
        peft.set_adapter(self.adapter)  # the critic's LoRA on; set_adapter also flips requires_grad, restored below
        try:
            lm = peft.get_base_model()
            hidden = getattr(lm, lm.base_model_prefix)(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        finally:
            peft.set_adapter(policy_adapter)
            for p, flag in flags:
                p.requires_grad_(flag)
            for p in self.adapter_parameters:  # always trainable (PEFT's set_adapter / disable_adapter freeze
                p.requires_grad_(True)  # a non-active adapter); autograd drops gradients of frozen leaves
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1)

    def to_sequence_classifier(self) -> nn.Module:
        """A plain ``*ForSequenceClassification`` (CPU): the critic adapter merged into a copy of the base weights."""
        peft = copy.deepcopy(self._peft).to("cpu")
        merged = peft.merge_and_unload(adapter_names=[self.adapter])
        config = copy.deepcopy(merged.config)
        config.num_labels = 1
        config.architectures = None
        classifier = AutoModelForSequenceClassification.from_config(config, dtype=merged.dtype)
        prefix = merged.base_model_prefix
        getattr(classifier, prefix).load_state_dict(getattr(merged, prefix).state_dict())
        with torch.no_grad():
            classifier.score.weight.copy_(self.score.weight.detach().cpu().to(classifier.score.weight.dtype))
        return classifier

    def save_pretrained(self, path: str) -> None:
        self.to_sequence_classifier().save_pretrained(path)


@dataclass
class Critic:
    """The separate critic as the trainer runs it: the (Accelerate-prepared) model, its optimizer and scheduler."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    shared_parameter_ids: frozenset[int] = field(default_factory=frozenset)


def critic_values(critic, rollout, rows: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Values of the critic at the positions that predict each response token: (B, T) fp32, zero on padding — the
    same positions and position ids as the policy's forward (:func:`hfpg.forward.response_outputs`)."""
    seqs = rollout.sequences(rows)
    n = seqs["response_ids"].shape[0]
    size = chunk_size or n
    T = seqs["response_ids"].shape[1]
    parts = []
    for start in range(0, n, size):
        s = {k: v[start : start + size] for k, v in seqs.items()}
        input_ids = torch.cat([s["prompt_ids"], s["response_ids"]], dim=1)
        attention_mask = torch.cat([s["prompt_mask"].long(), s["response_mask"].long()], dim=1)
        position_ids = ops.position_ids_from_attention_mask(attention_mask)
        values = critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)  # (b, L)
        parts.append(torch.where(s["response_mask"].bool(), ops.response_positions(values, T).float(), 0.0))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


# ---- building -------------------------------------------------------------------------------------------------------
def build_value_model(spec: str, policy, tokenizer, reward_fn=None) -> nn.Module:
    """The critic named by ``spec`` (see the module docstring) for ``policy`` (an
    :class:`~hfpg.modeling.AutoModelForCausalLMWithValueHead`); ConfigError with the reason and the fix otherwise."""
    if spec == "policy":
        return _from_policy(policy)
    if spec == "reward_model":
        model, rm_tokenizer, where = _from_reward_model(reward_fn)
    else:
        model, rm_tokenizer, where = _from_source(spec), _tokenizer_of(spec), f"value_model={spec!r}"
    _check_classifier(model, where)
    _check_vocabulary(model, rm_tokenizer, policy, tokenizer, where)
    return ValueModel(model)


def _from_policy(policy) -> nn.Module:
    if policy.is_peft_model:
        peft = policy.pretrained_model
        cfg = peft.active_peft_config
        if policy.peft_type != "LORA":
            raise ConfigError(
                f"value_model: policy on a PEFT {policy.peft_type} policy is not supported: the critic is a second "
                "LoRA adapter on the policy's base; use a LoRA policy, or value_model: <model id or path> (a separate "
                "copy)"
            )
        if getattr(cfg, "use_dora", False):
            raise ConfigError(
                "value_model: policy with a DoRA policy (use_dora: true) is not supported yet; use plain LoRA, or "
                "value_model: <model id or path>"
            )
        if CRITIC_ADAPTER in peft.peft_config:
            raise ConfigError(f"the policy already has an adapter named {CRITIC_ADAPTER!r}; remove it")
        peft.add_adapter(CRITIC_ADAPTER, copy.deepcopy(cfg))
        for name, p in peft.named_parameters():  # add_adapter leaves a non-active adapter frozen
            if f".{CRITIC_ADAPTER}." in name:
                p.requires_grad_(True)
        text = policy.config.get_text_config() if hasattr(policy.config, "get_text_config") else policy.config
        critic = LoraValueModel(peft, text.hidden_size)
        return critic.to(policy.device)
    base = policy.base_model
    config = copy.deepcopy(base.config)
    config.num_labels = 1
    config.architectures = None
    classifier = AutoModelForSequenceClassification.from_config(config, dtype=base.dtype)
    prefix = base.base_model_prefix
    getattr(classifier, prefix).load_state_dict(getattr(base, prefix).state_dict())
    nn.init.zeros_(classifier.score.weight)
    return ValueModel(classifier.to(base.device))


def _from_reward_model(reward_fn):
    from .rewards.models import RewardModelReward

    parts = getattr(reward_fn, "rewards", [reward_fn]) if reward_fn is not None else []
    found = []
    for part in parts:
        inner = getattr(part, "fn", part)  # a labelled YAML reward wraps the object
        if isinstance(inner, RewardModelReward):
            found.append(inner)
    if len(found) != 1:
        what = "no learned reward model" if not found else f"{len(found)} learned reward models"
        raise ConfigError(
            f"value_model: reward_model starts the critic from the run's learned reward model, but the rewards hold "
            f"{what}; declare exactly one (rewards: [{{name: reward_model, kwargs: {{model: ...}}}}]), or set "
            f"value_model to the reward model's id or path"
        )
    rm = found[0]
    if rm.model is not None:
        model = copy.deepcopy(rm.model)  # the reward model itself stays as it is
    else:
        from .rewards.models import _pretrained_kwargs

        model = AutoModelForSequenceClassification.from_pretrained(rm.source, **_pretrained_kwargs(rm.model_kwargs))
    tok = rm.tokenizer
    if tok is None or isinstance(tok, str):
        tok = _tokenizer_of(tok or rm.source or getattr(model, "name_or_path", None))
    return model, tok, f"value_model: reward_model ({rm!r})"


def _from_source(source: str) -> nn.Module:
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as e:
        raise ConfigError(
            f"value_model={source!r} could not be loaded ({type(e).__name__}: {e}); give a model id or a local path "
            "of a sequence classifier or causal LM, or reward_model / policy"
        ) from None
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return AutoModelForSequenceClassification.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)  # backbone + a fresh head
    if hasattr(model, "score"):
        nn.init.zeros_(model.score.weight)
        if getattr(model.score, "bias", None) is not None:
            nn.init.zeros_(model.score.bias)
    return model


def _tokenizer_of(source):
    if source is None or not (os.path.isdir(str(source)) or "/" in str(source)):
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception:  # a checkpoint without a tokenizer: the vocabulary size is checked alone
        return None


def _check_classifier(model, where: str) -> None:
    num_labels = int(getattr(model.config, "num_labels", 1))
    if num_labels != 1:
        raise ConfigError(
            f"{where}: the critic must have one output (num_labels=1), this model has num_labels={num_labels}; use a "
            "one-output reward model or a causal LM (which gets a fresh scalar head)"
        )
    if not isinstance(getattr(model, "score", None), nn.Module) or not hasattr(model, model.base_model_prefix):
        raise ConfigError(
            f"{where}: {type(model).__name__} has no per-token `score` head on a `{model.base_model_prefix}` backbone "
            "(decoder sequence classifiers such as GPT2/Llama/Qwen ...ForSequenceClassification have one; encoder "
            "classifiers pool the first token instead); use a decoder model that shares the policy's tokenizer"
        )


def _check_vocabulary(model, critic_tokenizer, policy, tokenizer, where: str) -> None:
    """The critic reads the policy's token ids: its embedding must have the policy's vocabulary."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    policy_text = policy.config.get_text_config() if hasattr(policy.config, "get_text_config") else policy.config
    critic_size = getattr(text, "vocab_size", None)
    policy_size = getattr(policy_text, "vocab_size", None)
    if critic_size != policy_size:
        raise ConfigError(
            f"{where}: the critic's vocabulary has {critic_size} tokens, the policy's {policy_size}; the critic reads "
            "the policy's token ids, so it must use the policy's tokenizer (use value_model: policy, or a model "
            "trained with the same tokenizer)"
        )
    if critic_tokenizer is not None and tokenizer is not None and critic_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"{where}: the critic's tokenizer differs from the policy's (same size, other tokens); the critic reads "
            "the policy's token ids, so it must use the policy's tokenizer (use value_model: policy, or a model "
            "trained with the same tokenizer)"
        )
