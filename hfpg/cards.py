"""Model cards: the YAML metadata (base model, library, tags, datasets, rewards and their weights, final metrics) and
the README that :func:`render_model_card` builds from it.

A saved hfpg model folder holds the policy (a PEFT adapter, or a full / merged model), ``value_head.safetensors``,
the tokenizer, ``hfpg_config.yaml`` and a model card ``README.md`` whose YAML metadata is the single source of the
card: the whole card is rebuilt from it, so a push (:mod:`hfpg.hub`) can name the repo in the usage snippet without
rewriting the local file. Cards name Hub ids only, never local paths.

Nothing machine-specific goes into any text file of a saved or pushed folder (:func:`portable_files`): a local model
path becomes the Hub id it stands for when one is known (``model.hub_base_model``, the card's ``base_model``), else a
path relative to the working directory when it lies inside it (it still loads from there), else its folder name;
``output_dir`` and reward files or models in ``hfpg_config.yaml`` are written the same way (without the Hub id).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from . import __version__
from .algorithms import ALGORITHMS
from .rewards.base import reward_name
from .sources import is_hub_id

CARD_FILE = "README.md"
CONFIG_FILE = "hfpg_config.yaml"
# the metrics worth a line in a card, in this order; reward parts (reward/<name>/mean) are added after them
CARD_METRICS = (
    "eval/scores",
    "eval/kl",
    "eval/completion_length",
    "objective/scores",
    "objective/kl",
    "objective/rlhf_reward",
    "completions/mean_length",
)
PEFT_NAMES = {  # card tags -> names in prose
    "lora": "LoRA",
    "ia3": "IA³",
    "loha": "LoHa",
    "lokr": "LoKr",
    "adalora": "AdaLoRA",
    "vera": "VeRA",
    "oft": "OFT",
    "boft": "BOFT",
    "fourierft": "FourierFT",
}


def reward_entries(reward_fn) -> list[dict]:
    """``[{name, weight[, type]}]`` for a model card: each part of a CombinedReward, or the one callable."""
    names, weights = getattr(reward_fn, "names", None), getattr(reward_fn, "weights", None)
    if not (isinstance(names, list) and isinstance(weights, list) and len(names) == len(weights)):
        return [{"name": reward_name(reward_fn), "weight": 1.0}]
    specs = getattr(reward_fn, "specs", None)
    entries = []
    for i, (name, weight) in enumerate(zip(names, weights)):
        entry = {"name": str(name), "weight": float(weight)}
        if isinstance(specs, list) and i < len(specs) and isinstance(specs[i], dict) and specs[i].get("name"):
            kind = os.path.basename(str(specs[i]["name"]))  # a custom reward module: its file, not a local path
            if kind != entry["name"]:
                entry["type"] = kind
        entries.append(entry)
    return entries


def final_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last value of each card-worthy metric (held-out ``eval/*`` and the last training step), rounded."""
    last: dict[str, float] = {}
    for record in log_history:
        last.update({k: v for k, v in record.items() if k != "step"})
    parts = sorted(k for k in last if re.fullmatch(r"(eval/)?reward/[^/]+/mean", k))
    evals = [k for k in CARD_METRICS if k.startswith("eval/")] + [k for k in parts if k.startswith("eval/")]
    train = [k for k in CARD_METRICS if not k.startswith("eval/")] + [k for k in parts if not k.startswith("eval/")]
    return {
        k: _round(last[k])
        for k in evals + train
        if k in last and isinstance(last[k], (int, float)) and math.isfinite(last[k])
    }


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def card_metadata(
    *,
    base_model: str | None,
    is_adapter: bool,
    algorithm: str,
    rewards: list[dict],
    metrics: dict[str, float],
    datasets: list[str] | None = None,
    peft_type: str | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    language=None,
) -> dict:
    """The YAML metadata of an hfpg model card (a plain dict, in the order it is written)."""
    all_tags = ["hfpg", algorithm, "reinforcement-learning", "text-generation"]
    if is_adapter and peft_type:
        all_tags.append(peft_type.lower())
    for t in tags or []:
        if t not in all_tags:
            all_tags.append(t)
    meta: dict[str, Any] = {}
    if base_model:
        meta["base_model"] = base_model
    meta["library_name"] = "peft" if is_adapter else "transformers"
    meta["pipeline_tag"] = "text-generation"
    if license:
        meta["license"] = license
    if language:
        meta["language"] = language
    meta["tags"] = all_tags
    if datasets:
        meta["datasets"] = list(datasets)
    meta["rewards"] = rewards
    meta["final_metrics"] = metrics
    return meta


def trainer_card_metadata(trainer, merged: bool = False) -> dict:
    """Card metadata of what ``trainer`` would save now: its model, rewards, log history and ``model_card_data``."""
    model, info = trainer.unwrapped_model, trainer.model_card_data
    peft_type = model.peft_type
    meta = card_metadata(
        base_model=info.get("base_model"),
        is_adapter=peft_type is not None and not merged,
        algorithm=trainer.config.algorithm,
        rewards=reward_entries(trainer.reward_fn),
        metrics=final_metrics(trainer.log_history),
        datasets=info.get("datasets"),
        peft_type=peft_type,
        tags=info.get("tags"),
        license=info.get("license"),
        language=info.get("language"),
    )
    return merged_metadata(meta) if merged and peft_type is not None else meta


def render_model_card(meta: dict, repo_id: str | None = None, config: dict | None = None, folder: str | None = None):
    """A :class:`huggingface_hub.ModelCard` built from ``meta`` (see :func:`card_metadata`) and the training
    config; the usage snippet loads ``repo_id``, or ``path/to/<folder name>`` when there is no repo id yet (never a
    local path)."""
    config = config or {}
    repo = repo_id or f"path/to/{os.path.basename(os.path.normpath(folder)) if folder else 'this/folder'}"
    is_adapter = meta.get("library_name") == "peft"
    base = meta.get("base_model")
    algorithm = next((t for t in meta.get("tags", []) if t in ALGORITHMS), "policy-gradient")
    title = repo_id.split("/")[-1] if repo_id else f"{(base or 'model').split('/')[-1]}-hfpg-{algorithm}"
    base_link = f"[{base}](https://huggingface.co/{base})" if base else "its base model"
    what = f"a {_peft_name(meta)} adapter for {base_link}" if is_adapter else f"a fine-tuned version of {base_link}"
    lines = [
        f"# {title}",
        "",
        f"This model is {what}, trained with reinforcement learning ({algorithm.upper()}) by "
        f"hfpg {__version__}. "
        + (
            "Its critic, a separate value model, is saved in `value_model/` (a sequence classifier) so that "
            "training can continue; inference does not need it."
            if config.get("value_model")
            else "A value head (`value_head.safetensors`) is saved beside the policy so that training can continue; "
            "inference does not need it."
        ),
        "",
    ]
    rewards = meta.get("rewards") or []
    if rewards:
        lines += ["## Rewards", "", "| reward | weight |", "|---|---:|"]
        lines += [
            f"| {r.get('name')}{' (' + str(r['type']) + ')' if r.get('type') else ''} | {r.get('weight')} |"
            for r in rewards
        ]
        lines.append("")
    metrics = meta.get("final_metrics") or {}
    if metrics:
        lines += [
            "## Final metrics",
            "",
            "`eval/*` are on held-out prompts; the rest are from the last training "
            "step (`objective/kl` is the KL to the reference model, nats per completion).",
            "",
            "| metric | value |",
            "|---|---:|",
        ]
        lines += [f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    lines += ["## Usage", "", "```python"]
    if is_adapter:
        lines += [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")  # base model + adapter',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            "model = model.merge_and_unload()  # optional: one plain transformers model",
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        ]
    lines += [
        'inputs = tokenizer("Hello", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))",
        "```",
        "",
        "To continue training with hfpg (policy and value head):",
        "",
        "```python",
        "from hfpg import AutoModelForCausalLMWithValueHead",
        "",
        f'model = AutoModelForCausalLMWithValueHead.from_pretrained("{repo}")',
        "```",
        "",
    ]
    keys = (
        "algorithm",
        "max_steps",
        "rollout_batch_size",
        "mini_batch_size",
        "num_samples_per_prompt",
        "ppo_epochs",
        "learning_rate",
        "kl_coef",
        "kl_estimator",
        "kl_penalty",
        "max_new_tokens",
        "temperature",
        "seed",
    )
    summary = [f"| {k} | {config[k]} |" for k in keys if k in config]
    if summary:
        lines += [
            "## Training",
            "",
            f"The full resolved configuration is in `{CONFIG_FILE}`.",
            "",
            "| setting | value |",
            "|---|---|",
            *summary,
            "",
        ]
    lines += ["## Framework versions", "", *(f"- {name}: {version}" for name, version in _versions()), ""]
    data = ModelCardData(**meta)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _peft_name(meta: dict) -> str:
    return next((PEFT_NAMES[t] for t in meta.get("tags", []) if t in PEFT_NAMES), "PEFT")


def _versions() -> list[tuple[str, str]]:
    out = []
    for name in ("hfpg", "transformers", "peft", "accelerate", "torch"):
        with contextlib.suppress(PackageNotFoundError):
            out.append((name, version(name)))
    return out


def read_card_metadata(folder: str) -> dict | None:
    """The YAML metadata of ``folder/README.md`` (None when there is no card)."""
    path = os.path.join(folder, CARD_FILE)
    if not os.path.isfile(path):
        return None
    return ModelCard.load(path).data.to_dict()


def read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return yaml.safe_load(f) or {}


def folder_metadata(folder: str) -> dict:
    """The card metadata of a saved folder: its README's, or (no card yet) what its files tell."""
    meta = read_card_metadata(folder)
    if meta:
        return meta
    config = read_config(folder)
    adapter = read_json(os.path.join(folder, "adapter_config.json"))
    base = (adapter or {}).get("base_model_name_or_path")
    if not adapter:
        base = (read_json(os.path.join(folder, "config.json")) or {}).get("_name_or_path")
    rewards = [
        {"name": str(s.get("label") or s.get("name")), "weight": float(s.get("weight", 1.0))}
        for s in config.get("rewards") or []
        if isinstance(s, dict)
    ]
    return card_metadata(
        base_model=base if is_hub_id(base) else None,
        is_adapter=adapter is not None,
        algorithm=str(config.get("algorithm", "ppo")),
        rewards=rewards,
        metrics={},
        peft_type=(adapter or {}).get("peft_type"),
    )


def merged_metadata(meta: dict) -> dict:
    """Card metadata of the merged (full) model made from an adapter with metadata ``meta``."""
    out = dict(meta)
    out["library_name"] = "transformers"
    out["tags"] = [t for t in meta.get("tags", []) if t not in PEFT_NAMES] + ["merged-adapter"]
    return out


def read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


# ---- nothing machine-specific in a saved or pushed folder ----------------------------------------------------------
MODEL_PATH_KEYS = ("base_model_name_or_path", "_name_or_path", "name_or_path")  # -> the Hub id when one is known
RUN_PATH_KEYS = ("output_dir", "logging_dir", "resume_from_checkpoint")  # a relative path or the folder name
TEXT_SUFFIXES = (".json", ".yaml", ".yml")  # rewritten structurally; README.md is rebuilt from its metadata
TOKEN_DATA = {"tokenizer.json", "vocab.json", "added_tokens.json"}  # tokens, which may look like paths: never touched
SKIP_KEYS = {"added_tokens_decoder", "added_tokens", "vocab", "merges"}


def _absolute(path) -> str | None:
    """``path`` as an absolute, normalised local path when it is one (``/...``, ``C:\\...``, ``~/...``), else None."""
    if not isinstance(path, str) or not path.strip() or "\n" in path:
        return None
    expanded = os.path.expanduser(path)
    if not os.path.isabs(expanded):
        return None
    full = os.path.normpath(expanded)
    return full if os.path.dirname(full) != full else None  # "/" alone is no path worth rewriting


def _local_roots() -> list[str]:
    roots = [os.getcwd(), os.path.expanduser("~"), tempfile.gettempdir()]
    return [os.path.normpath(r) for r in roots if r and os.path.dirname(os.path.normpath(r)) != os.path.normpath(r)]


def is_local_path(value) -> bool:
    """An absolute path of this machine: one that exists here, or lies under the working directory, the home folder
    or the temporary folder (strings that merely start with ``/``, such as a regex, are left alone)."""
    full = _absolute(value)
    if full is None:
        return False
    return os.path.exists(full) or any(full == r or full.startswith(r + os.sep) for r in _local_roots())


def portable_path(path: str, hub_id: str | None = None) -> str:
    """``path`` as a saved or pushed file may name it: unchanged when it is relative (or a Hub id); an absolute path
    becomes ``hub_id`` when given, else the path relative to the working directory when it lies inside it (it still
    loads from there), else its last component (``/data/models/my-base`` -> ``my-base``)."""
    full = _absolute(path)
    if full is None:
        return path
    if hub_id:
        return hub_id
    cwd = os.path.normpath(os.getcwd())
    if os.path.dirname(cwd) != cwd and full.startswith(cwd + os.sep):
        return os.path.relpath(full, cwd).replace(os.sep, "/")
    return os.path.basename(full)


def _portable_target(target: str) -> str:
    """``/abs/rewards.py:fn`` (a reward or factory spec) -> ``rewards.py:fn``; ``module:fn`` is left alone."""
    module, sep, attr = target.rpartition(":")
    if sep and _absolute(module) is not None:
        return f"{portable_path(module)}:{attr}"
    return target


def portable_value(value, hub_id: str | None = None, key: str | None = None):
    """``value`` (plain JSON / YAML data) with every local path made portable (see :func:`portable_path`): model
    locations (``base_model_name_or_path``, ``_name_or_path``, ``name_or_path``) become ``hub_id`` when it is known
    and they are not that Hub id already; ``output_dir`` and other absolute paths of this machine lose their folders."""
    if isinstance(value, dict):
        return {k: v if k in SKIP_KEYS else portable_value(v, hub_id, k) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_value(v, hub_id, key) for v in value]
    if not isinstance(value, str):
        return value
    if key in MODEL_PATH_KEYS:
        if hub_id and value and not is_hub_id(value):  # a local folder (absolute or relative): its Hub id
            return hub_id
        return portable_path(value)
    if key in RUN_PATH_KEYS:
        return portable_path(value)
    if key in ("name", "factory") and ":" in value:
        return _portable_target(value)
    return portable_path(value) if is_local_path(value) else value


def portable_config(config: dict) -> dict:
    """The training config as ``hfpg_config.yaml`` records it: :func:`portable_value` (no Hub id: ``output_dir``,
    reward files and reward models keep only their relative path or folder name)."""
    return portable_value(config)


def config_yaml(config: dict) -> str:
    """``hfpg_config.yaml``'s text for ``config`` (a :meth:`PGConfig.to_dict`), made portable."""
    return yaml.safe_dump(portable_config(config), sort_keys=False, allow_unicode=True)


def portable_files(folder: str, hub_id: str | None = None, files: list[str] | None = None) -> dict[str, bytes]:
    """The JSON / YAML files of ``folder`` (relative paths; default: every file under it) that name a local path,
    each as it reads once made portable (:func:`portable_value`; ``hub_id`` replaces local model locations). Files
    that need no change, and tokenizer vocabularies, are left out."""
    if files is None:
        files = []
        for root, _, names in os.walk(folder):
            files += [os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/") for n in names]
    out = {}
    for rel in sorted(files):
        name = os.path.basename(rel)
        if not name.endswith(TEXT_SUFFIXES) or name in TOKEN_DATA:
            continue
        path = os.path.join(folder, rel)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            is_json = name.endswith(".json")
            data = json.loads(text) if is_json else yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
            continue  # not data this module can read: left as it is
        fixed = portable_value(data, hub_id)
        if fixed == data:
            continue
        if is_json:
            out[rel] = (json.dumps(fixed, indent=2, ensure_ascii=False) + "\n").encode()
        else:
            out[rel] = yaml.safe_dump(fixed, sort_keys=False, allow_unicode=True).encode()
    return out


def make_portable(folder: str, hub_id: str | None = None) -> None:
    """Rewrite, in place, each JSON / YAML file of a folder being saved that names a local path (see
    :func:`portable_files`); ``hub_id``: the base model's Hub id (ignored unless it is one)."""
    for rel, data in portable_files(folder, hub_id if is_hub_id(hub_id) else None).items():
        path = os.path.join(folder, rel)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
