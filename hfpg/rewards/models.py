"""Rewards computed by other models: how likely a causal LM finds a completion, and learned reward models.

Both load their model lazily (on ``setup()`` or the first call), so building one — or validating a YAML config that
names one — loads nothing. The model stays outside Accelerate (never wrapped by DDP): ``setup(device)`` moves it to
the trainer's device, puts it in eval mode, freezes it and turns dropout off (detail 4). Scoring runs under
``torch.inference_mode()`` in chunks of ``batch_size``, right-padded, sorted by length to waste little padding.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from ..modeling import disable_dropout
from ..ops import logprobs_from_logits, masked_sum
from ..stats import Moments
from .base import Reward, RewardError

NORMALIZATION_FILE = "reward_normalization.json"
LM_OUTPUTS = ("mean_logprob", "sum_logprob", "neg_perplexity")
RM_OUTPUTS = ("logit", "label_logit", "label_prob")
INPUT_FORMATS = ("concat", "completion", "pair", "chat")
# from_pretrained arguments that also apply to the tokenizer loaded from the same place
_SHARED_KWARGS = ("revision", "trust_remote_code", "cache_dir", "token", "local_files_only", "gguf_file")


def _pretrained_kwargs(model_kwargs: dict | None) -> dict:
    """``model_kwargs`` with dtype names from YAML ("bfloat16") turned into torch dtypes."""
    kwargs = dict(model_kwargs or {})
    for key in ("dtype", "torch_dtype"):
        value = kwargs.get(key)
        if isinstance(value, str) and value != "auto":
            dtype = getattr(torch, value.removeprefix("torch."), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"model_kwargs[{key!r}] = {value!r} is not a torch dtype (e.g. 'bfloat16')")
            kwargs[key] = dtype
    return kwargs


def _pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    """Lists of ids -> (B, L) long tensor, right-padded with ``value``."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _chunks(lengths: list[int], batch_size: int):
    """Index lists of at most ``batch_size`` rows of similar length (sorted), covering every row once."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


class _ModelReward(Reward):
    """What both model rewards share: lazy loading, ``setup``, input checks and inference mode."""

    _auto_class: type | None = None  # the AutoModelFor... class that loads a Hub id / local path

    def __init__(self, model, tokenizer, batch_size: int, model_kwargs: dict | None, name: str):
        if isinstance(model, (str, os.PathLike)):
            self.source, self.model = os.fspath(model), None
        elif isinstance(model, nn.Module):
            self.source, self.model = None, model
        else:
            raise TypeError(
                f"{type(self).__name__}: model must be a Hub id, a local path or a loaded model, "
                f"got {type(model).__name__}"
            )
        if int(batch_size) < 1:
            raise ValueError(f"{type(self).__name__}: batch_size must be >= 1, got {batch_size}")
        self.tokenizer = os.fspath(tokenizer) if isinstance(tokenizer, os.PathLike) else tokenizer
        self.batch_size = int(batch_size)
        self.model_kwargs = dict(model_kwargs or {})
        self.name = name
        self._loaded = False
        self._ready = False
        self._gather: Callable | None = None

    # ---- loading ------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        """Load the model and tokenizer if they were given as ids/paths, then let the subclass resolve its settings."""
        if self.model is None:
            self.model = self._auto_class.from_pretrained(self.source, **_pretrained_kwargs(self.model_kwargs))
        if self.tokenizer is None or isinstance(self.tokenizer, str):
            tok_source = self.tokenizer or self.source or getattr(self.model, "name_or_path", None)
            if not tok_source:
                raise ValueError(
                    f"{type(self).__name__}: the model was given already loaded and has no "
                    f"name_or_path to load a tokenizer from; pass tokenizer="
                )
            tok_kwargs = {k: v for k, v in self.model_kwargs.items() if k in _SHARED_KWARGS}
            self.tokenizer = AutoTokenizer.from_pretrained(tok_source, **tok_kwargs)
        self._after_load()
        self._loaded = True

    def _after_load(self) -> None:
        """Subclass hook: read what scoring needs from the loaded model and tokenizer."""

    def _pad_id(self) -> int:
        """Padding id: the tokenizer's pad token, else its EOS (GPT-2 style tokenizers have no pad token)."""
        for tok_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if tok_id is not None:
                return int(tok_id)
        return 0  # padding is masked out; any id inside the vocabulary will do

    def setup(self, device: torch.device | str | None = None, gather: Callable | None = None) -> None:
        """Load if needed, move the model to ``device``, eval mode, no gradients, no dropout."""
        if gather is not None:
            self._gather = gather
        self._prepare(device)

    def _prepare(self, device=None) -> None:
        if not self._loaded:
            self._load()
        model = self.model
        if device is not None and getattr(model, "hf_device_map", None) is None:  # device_map models stay put
            model.to(device)
        model.eval()
        model.requires_grad_(False)
        disable_dropout(model)
        self._ready = True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- scoring ------------------------------------------------------------------------------------------------
    def _scores(self, prompts, completions) -> list[float]:
        """Check the inputs, prepare on first use (model's current device), score without autograd."""
        completions = list(completions)
        prompts = [""] * len(completions) if prompts is None else list(prompts)
        if len(prompts) != len(completions):
            raise RewardError(f"reward {self.name!r}: {len(prompts)} prompts for {len(completions)} completions")
        if not completions:
            return []
        if not self._ready:
            self._prepare()
        with torch.inference_mode():
            return self._score(prompts, completions)

    def _score(self, prompts: list[str], completions: list[str]) -> list[float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        source = self.source if self.source is not None else type(self.model).__name__
        return f"{type(self).__name__}(name={self.name!r}, model={source!r})"


class LMLikelihoodReward(_ModelReward):
    """How likely a scoring causal LM finds each completion (after its prompt). Higher = more fluent/likely.

    The scoring LM may use a different tokenizer than the policy: prompt and completion are re-tokenised as text.
    Context ids are ``tokenizer(prompt)`` (with the tokenizer's special tokens) when ``condition_on_prompt``, else
    none; an empty context gets the BOS token (EOS when there is none, GPT-2's convention) so the first completion
    token is predicted from something. Completion ids are ``tokenizer(completion, add_special_tokens=False)``.

    ``output``: ``"mean_logprob"`` (mean over completion tokens, range (-inf, 0]), ``"sum_logprob"`` (favours short
    completions) or ``"neg_perplexity"`` (``-exp(-mean_logprob)``, range [-inf, -1]). An empty completion is scored as
    log p(EOS | context) — how likely the LM finds stopping right there — so 0 tokens cannot game the reward.

    Longer than ``max_length`` (default: the model's ``max_position_embeddings``): context tokens are dropped from the
    left (at least one is kept), then completion tokens from the right.
    """

    _auto_class = AutoModelForCausalLM

    def __init__(
        self,
        model="gpt2",
        tokenizer=None,
        condition_on_prompt: bool = True,
        output: str = "mean_logprob",
        batch_size: int = 16,
        max_length: int | None = None,
        model_kwargs: dict | None = None,
        name: str = "lm_likelihood",
    ):
        if output not in LM_OUTPUTS:
            raise ValueError(f"LMLikelihoodReward output must be one of {LM_OUTPUTS}, got {output!r}")
        if max_length is not None and int(max_length) < 2:
            raise ValueError(
                f"LMLikelihoodReward max_length must be >= 2 (one context + one scored token), got {max_length}"
            )
        super().__init__(model, tokenizer, batch_size, model_kwargs, name)
        self.condition_on_prompt = bool(condition_on_prompt)
        self.output = output
        self.max_length = None if max_length is None else int(max_length)

    def _after_load(self) -> None:
        tok, config = self.tokenizer, self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self._eos = tok.eos_token_id if tok.eos_token_id is not None else getattr(text_config, "eos_token_id", None)
        if isinstance(self._eos, (list, tuple)):  # some configs list several EOS ids; the first is the canonical one
            self._eos = self._eos[0] if self._eos else None
        self._bos = tok.bos_token_id if tok.bos_token_id is not None else self._eos
        self._pad = self._pad_id()
        self._max_len = self.max_length or getattr(text_config, "max_position_embeddings", None)

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return self._scores(prompts, completions)

    def _ids(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """(context ids, target ids) after the BOS / empty-completion / max_length rules."""
        tok = self.tokenizer
        ctx = list(tok(prompt, add_special_tokens=True)["input_ids"]) if self.condition_on_prompt else []
        if not ctx:
            if self._bos is None:
                raise RewardError(
                    f"reward {self.name!r}: the scoring tokenizer has neither BOS nor EOS to start "
                    f"an empty context with"
                )
            ctx = [self._bos]
        target = list(tok(completion, add_special_tokens=False)["input_ids"])
        if not target:
            if self._eos is None:
                raise RewardError(
                    f"reward {self.name!r}: cannot score an empty completion as log p(EOS), the "
                    f"scoring tokenizer has no EOS token"
                )
            target = [self._eos]
        if self._max_len is not None and len(ctx) + len(target) > self._max_len:
            ctx = ctx[-max(1, self._max_len - len(target)) :]
            target = target[: self._max_len - len(ctx)]
        return ctx, target

    def _score(self, prompts: list[str], completions: list[str]) -> list[float]:
        pairs = [self._ids(p, c) for p, c in zip(prompts, completions)]
        out = [0.0] * len(pairs)
        for idx in _chunks([len(c) + len(t) for c, t in pairs], self.batch_size):
            rows = [pairs[i][0] + pairs[i][1] for i in idx]
            ids = _pad_right(rows, self._pad)  # (b, L)
            positions = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, L)
            attention_mask = (positions < torch.tensor([len(r) for r in rows]).unsqueeze(1)).long()
            # shifted position t predicts token t+1: the target tokens sit at [ctx_len-1, ctx_len-1+n) of (b, L-1)
            ctx_len = torch.tensor([len(pairs[i][0]) for i in idx]).unsqueeze(1)
            n_target = torch.tensor([len(pairs[i][1]) for i in idx])
            shifted = positions[:, :-1]
            target_mask = (shifted >= ctx_len - 1) & (shifted < ctx_len - 1 + n_target.unsqueeze(1))  # (b, L-1)
            ids, attention_mask = ids.to(self.device), attention_mask.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits  # (b, L, V)
            logprobs = logprobs_from_logits(logits[:, :-1], ids[:, 1:])  # (b, L-1) fp32
            sums = masked_sum(logprobs.double(), target_mask.to(logprobs.device), dim=1).cpu()  # one sync per chunk
            means = sums / n_target.double()
            if self.output == "sum_logprob":
                values = sums
            elif self.output == "mean_logprob":
                values = means
            else:
                values = -torch.exp(-means)
            for i, v in zip(idx, values.tolist()):
                out[i] = float(v)
        return out


class RewardModelReward(_ModelReward):
    """A learned reward model: any ``AutoModelForSequenceClassification`` (encoder or decoder) scores each text.

    ``input_format``: ``"concat"`` (prompt + completion as one text), ``"completion"`` (completion only), ``"pair"``
    (``tokenizer(prompt, completion)``, for cross-encoders) or ``"chat"`` (the tokenizer's chat template over a user
    and an assistant turn). Texts longer than ``max_length`` tokens lose tokens from the ``truncation_side``
    (default left: the end of the completion, which the reward judges and decoder models pool from, is kept).
    Segment ids (``token_type_ids``) are passed only to models with segment embeddings (``config.type_vocab_size``).

    ``output``: ``"logit"`` (a single-output model), ``"label_logit"`` or ``"label_prob"`` (softmax) of ``label``,
    an index or a name from ``config.label2id``.

    ``normalization`` (detail 16): ``{"mean": m, "std": s}`` makes the scores ``(raw - m) / s``; a path to a
    ``reward_normalization.json`` (or its folder) reads one; ``None`` uses the ``reward_normalization.json`` saved
    beside a model loaded from a local folder, when there is one; ``False`` always returns raw scores.
    :meth:`fit_normalization` measures mean and std on reference samples, :meth:`save_normalization` writes them.
    """

    _auto_class = AutoModelForSequenceClassification

    def __init__(
        self,
        model,
        tokenizer=None,
        output: str = "logit",
        label: int | str | None = None,
        input_format: str = "concat",
        batch_size: int = 16,
        max_length: int | None = 512,
        normalization: dict | str | os.PathLike | bool | None = None,
        model_kwargs: dict | None = None,
        name: str = "reward_model",
        truncation_side: str = "left",
    ):
        if output not in RM_OUTPUTS:
            raise ValueError(f"RewardModelReward output must be one of {RM_OUTPUTS}, got {output!r}")
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"RewardModelReward input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        if output == "logit" and label is not None:
            raise ValueError(
                f"RewardModelReward: label={label!r} is only used with output='label_logit' or "
                f"'label_prob'; output='logit' reads the single logit of a one-output model"
            )
        if output != "logit" and label is None:
            raise ValueError(f"RewardModelReward(output={output!r}) needs label=<index or name of the class>")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"RewardModelReward truncation_side must be 'left' or 'right', got {truncation_side!r}")
        if max_length is not None and int(max_length) < 1:
            raise ValueError(f"RewardModelReward max_length must be >= 1 or None, got {max_length}")
        super().__init__(model, tokenizer, batch_size, model_kwargs, name)
        self.output, self.label, self.input_format = output, label, input_format
        self.max_length = None if max_length is None else int(max_length)
        self.truncation_side = truncation_side
        self._auto_normalization = normalization is None
        self.normalization = None if normalization in (None, False) else _read_normalization(normalization)
        self._label_index: int | None = None
        if self.model is not None:
            self._check_model()  # errors about labels before anything runs

    # ---- loading ------------------------------------------------------------------------------------------------
    def _check_model(self) -> None:
        config = self.model.config
        num_labels = int(getattr(config, "num_labels", 1))
        if self.output == "logit":
            if num_labels != 1:
                raise ValueError(
                    f"reward {self.name!r}: output='logit' needs a model with one output, this one has "
                    f"num_labels={num_labels} ({_label_names(config)}); choose output='label_logit' or "
                    f"'label_prob' with label=<index or name>"
                )
            self._label_index = 0
            return
        label = self.label
        if isinstance(label, str):
            label2id = dict(getattr(config, "label2id", None) or {})
            if label not in label2id:
                raise ValueError(
                    f"reward {self.name!r}: unknown label {label!r}; the model's labels are {_label_names(config)}"
                )
            label = label2id[label]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= int(label) < num_labels:
            raise ValueError(
                f"reward {self.name!r}: label {self.label!r} is not a class index in [0, {num_labels}) "
                f"nor a label name; the model's labels are {_label_names(config)}"
            )
        self._label_index = int(label)

    def _after_load(self) -> None:
        self._check_model()
        config = self.model.config
        if getattr(config, "pad_token_id", None) is None:  # GPT-2 style classifiers find the last token with it
            config.pad_token_id = self._pad_id()
        self._pad = int(config.pad_token_id)
        if self.input_format == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"reward {self.name!r}: input_format='chat' needs a tokenizer with a chat template, "
                f"this one has none; set tokenizer.chat_template or use input_format='concat'"
            )
        self._use_segments = bool(getattr(config, "type_vocab_size", 0))
        if self._auto_normalization and self.source is not None:
            path = os.path.join(self.source, NORMALIZATION_FILE)
            if os.path.isfile(path):
                self.normalization = _read_normalization(path)

    # ---- scoring ------------------------------------------------------------------------------------------------
    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        raw = self.raw_scores(prompts, completions)
        if not self.normalization:  # read after raw_scores: loading may pick up a saved normalisation
            return raw
        mean, std = self.normalization["mean"], self.normalization["std"]
        return [(x - mean) / std for x in raw]

    def raw_scores(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        """Scores before normalisation."""
        return self._scores(prompts, completions)

    @contextlib.contextmanager
    def _truncation_side(self):
        side = getattr(self.tokenizer, "truncation_side", None)
        self.tokenizer.truncation_side = self.truncation_side
        try:
            yield
        finally:
            self.tokenizer.truncation_side = side

    def _encode(self, prompts: list[str], completions: list[str]) -> dict[str, list[list[int]]]:
        tok = self.tokenizer
        kwargs = {"truncation": self.max_length is not None, "max_length": self.max_length}
        with self._truncation_side():
            if self.input_format == "pair":
                return tok(prompts, completions, **kwargs)
            if self.input_format == "chat":
                texts = [
                    tok.apply_chat_template(
                        [{"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False
                    )
                    for p, c in zip(prompts, completions)
                ]
                return tok(texts, add_special_tokens=False, **kwargs)  # the template already holds special tokens
            texts = completions if self.input_format == "completion" else [p + c for p, c in zip(prompts, completions)]
            return tok(texts, **kwargs)

    def _score(self, prompts: list[str], completions: list[str]) -> list[float]:
        enc = self._encode(prompts, completions)
        input_ids = enc["input_ids"]
        if any(len(ids) == 0 for ids in input_ids):
            raise RewardError(
                f"reward {self.name!r}: a text tokenised to no tokens (empty completion with "
                f"input_format={self.input_format!r} and a tokenizer that adds no special tokens)"
            )
        segments = enc.get("token_type_ids") if self._use_segments else None
        pad_segment = int(getattr(self.tokenizer, "pad_token_type_id", 0) or 0)
        out = [0.0] * len(input_ids)
        for idx in _chunks([len(ids) for ids in input_ids], self.batch_size):
            ids = _pad_right([input_ids[i] for i in idx], self._pad)  # (b, L)
            lengths = torch.tensor([len(input_ids[i]) for i in idx]).unsqueeze(1)
            inputs = {"input_ids": ids, "attention_mask": (torch.arange(ids.shape[1]).unsqueeze(0) < lengths).long()}
            if segments is not None:
                inputs["token_type_ids"] = _pad_right([segments[i] for i in idx], pad_segment)
            logits = self.model(**{k: v.to(self.device) for k, v in inputs.items()}).logits.float()  # (b, labels)
            if self.output == "label_prob":
                logits = torch.softmax(logits, dim=-1)
            for i, v in zip(idx, logits[:, self._label_index].tolist()):
                out[i] = float(v)
        return out

    # ---- normalisation (detail 16) ------------------------------------------------------------------------------
    def fit_normalization(self, prompts: list[str], completions: list[str], **columns: Any) -> dict:
        """Score reference samples raw and keep their mean and std, so that they then score mean 0, std 1.

        After ``setup(gather=...)`` the raw scores of all processes are gathered first, so every process agrees.
        Returns (and stores as ``self.normalization``) ``{"mean", "std", "n"}``.
        """
        raw = torch.tensor(self.raw_scores(prompts, completions), dtype=torch.float64)
        if self._gather is not None:
            raw = self._gather(raw.to(self.device)).double().cpu()
        if raw.numel() < 2:
            raise ValueError(
                f"reward {self.name!r}: fit_normalization needs at least 2 reference samples, got {raw.numel()}"
            )
        moments = Moments.of(raw)
        mean, std = moments.mean, moments.std
        if not std > 0 or not math.isfinite(std):
            raise ValueError(
                f"reward {self.name!r}: the reference samples' scores have std {std} (all {mean:.6g}?); "
                f"normalisation needs samples the reward model scores differently"
            )
        self.normalization = {"mean": mean, "std": std, "n": int(raw.numel())}
        return dict(self.normalization)

    def save_normalization(self, path_dir: str | os.PathLike) -> str:
        """Write ``reward_normalization.json`` ({"mean", "std", "n"}) into ``path_dir``; returns the file's path."""
        if not self.normalization:
            raise ValueError(f"reward {self.name!r} has no normalisation to save; call fit_normalization first")
        os.makedirs(path_dir, exist_ok=True)
        path = os.path.join(os.fspath(path_dir), NORMALIZATION_FILE)
        data = {
            "mean": float(self.normalization["mean"]),
            "std": float(self.normalization["std"]),
            "n": self.normalization.get("n"),
        }
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
        return path


def _label_names(config) -> list:
    id2label = getattr(config, "id2label", None) or {}
    return [id2label[k] for k in sorted(id2label, key=int)] if id2label else list(range(config.num_labels))


def _read_normalization(value) -> dict:
    """A checked ``{"mean", "std", "n"?}`` from a dict, a JSON file, or a folder holding reward_normalization.json."""
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if os.path.isdir(path):
            path = os.path.join(path, NORMALIZATION_FILE)
        with open(path) as f:
            value = json.load(f)
    if not isinstance(value, dict) or "mean" not in value or "std" not in value:
        raise ValueError(
            f"reward normalization must be {{'mean': m, 'std': s}}, a path to a {NORMALIZATION_FILE} "
            f"or its folder, got {value!r}"
        )
    mean, std = float(value["mean"]), float(value["std"])
    if not math.isfinite(mean) or not (math.isfinite(std) and std > 0):
        raise ValueError(f"reward normalization needs a finite mean and a std > 0, got mean={mean}, std={std}")
    return {"mean": mean, "std": std, "n": value.get("n")}
