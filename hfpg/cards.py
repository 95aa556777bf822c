"""Model cards: the YAML metadata (base model, library, tags, datasets, rewards and their weights, final metrics) and
the README that :func:`render_model_card` builds from it.

A saved hfpg model folder holds the policy (a PEFT adapter, or a full / merged model), ``value_head.safetensors``,
the tokenizer, ``hfpg_config.yaml`` and a model card ``README.md`` whose YAML metadata is the single source of the
card: the whole card is rebuilt from it, so a push (:mod:`hfpg.hub`) can name the repo in the usage snippet without
rewriting the local file. Cards name Hub ids only, never local paths.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
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
    config; the usage snippet loads ``repo_id``, or the local ``folder`` when the model is not pushed yet."""
    config = config or {}
    repo = repo_id or folder or "path/to/this/folder"
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
        f"hfpg {__version__}. A value head (`value_head.safetensors`) is saved "
        f"beside the policy so that training can continue; inference does not need it.",
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
