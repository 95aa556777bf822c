"""Model cards and pushing to the Hugging Face Hub.

A saved hfpg model folder holds the policy (a PEFT adapter, or a full / merged model), ``value_head.safetensors``,
the tokenizer, ``hfpg_config.yaml`` and a model card ``README.md`` whose YAML metadata is the single source of the
card: :func:`render_model_card` rebuilds the whole card from it, so a push can name the repo in the usage snippet
without rewriting the local file.

:func:`push_folder` uploads such a folder with ``huggingface_hub`` (creating the repo if needed) and never writes to
it. Tokens are passed through to ``huggingface_hub`` and never formatted into messages or logs; every failure the
Hub can answer with becomes a :class:`HubError` that says what went wrong and how to fix it.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import re
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

from . import __version__
from .algorithms import ALGORITHMS
from .errors import HubError
from .modeling import AutoModelForCausalLMWithValueHead
from .rewards.base import reward_name
from .sources import dataset_id, is_hub_id, repo_id_shaped

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
CONFIG_FILE = "hfpg_config.yaml"
# never uploaded: training state that does not belong in a model repo, and partial writes
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/*", "*.tmp", ".cache/*", ".git/*", "__pycache__/*"]
TOKEN_HELP = ("create a token with write access at https://huggingface.co/settings/tokens, then run "
              "`hf auth login` or set HF_TOKEN (or pass token=...)")
# the metrics worth a line in a card, in this order; reward parts (reward/<name>/mean) are added after them
CARD_METRICS = ("eval/scores", "eval/kl", "eval/completion_length", "objective/scores", "objective/kl",
                "objective/rlhf_reward", "completions/mean_length")


# ---- model card ------------------------------------------------------------------------------------------------------
PEFT_NAMES = {"lora": "LoRA", "ia3": "IA³", "loha": "LoHa", "lokr": "LoKr", "adalora": "AdaLoRA", "vera": "VeRA",
              "oft": "OFT", "boft": "BOFT", "fourierft": "FourierFT"}  # card tags -> names in prose


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
    return {k: _round(last[k]) for k in evals + train
            if k in last and isinstance(last[k], (int, float)) and math.isfinite(last[k])}


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def card_metadata(*, base_model: str | None, is_adapter: bool, algorithm: str, rewards: list[dict],
                  metrics: dict[str, float], datasets: list[str] | None = None, peft_type: str | None = None,
                  tags: list[str] | None = None, license: str | None = None, language=None) -> dict:
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
        base_model=info.get("base_model"), is_adapter=peft_type is not None and not merged,
        algorithm=trainer.config.algorithm, rewards=reward_entries(trainer.reward_fn),
        metrics=final_metrics(trainer.log_history), datasets=info.get("datasets"), peft_type=peft_type,
        tags=info.get("tags"), license=info.get("license"), language=info.get("language"))
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
    what = (f"a {_peft_name(meta)} adapter for {base_link}" if is_adapter else f"a fine-tuned version of {base_link}")
    lines = [f"# {title}", "",
             f"This model is {what}, trained with reinforcement learning ({algorithm.upper()}) by "
             f"hfpg {__version__}. A value head (`value_head.safetensors`) is saved "
             f"beside the policy so that training can continue; inference does not need it.", ""]
    rewards = meta.get("rewards") or []
    if rewards:
        lines += ["## Rewards", "", "| reward | weight |", "|---|---:|"]
        lines += [f"| {r.get('name')}{' (' + str(r['type']) + ')' if r.get('type') else ''} | {r.get('weight')} |"
                  for r in rewards]
        lines.append("")
    metrics = meta.get("final_metrics") or {}
    if metrics:
        lines += ["## Final metrics", "", "`eval/*` are on held-out prompts; the rest are from the last training "
                  "step (`objective/kl` is the KL to the reference model, nats per completion).", "",
                  "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    lines += ["## Usage", "", "```python"]
    if is_adapter:
        lines += ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")  # base model + adapter',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
                  "model = model.merge_and_unload()  # optional: one plain transformers model"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo}")']
    lines += ['inputs = tokenizer("Hello", return_tensors="pt")',
              "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))", "```", "",
              "To continue training with hfpg (policy and value head):", "", "```python",
              "from hfpg import AutoModelForCausalLMWithValueHead", "",
              f'model = AutoModelForCausalLMWithValueHead.from_pretrained("{repo}")', "```", ""]
    keys = ("algorithm", "max_steps", "rollout_batch_size", "mini_batch_size", "num_samples_per_prompt",
            "ppo_epochs", "learning_rate", "kl_coef", "kl_estimator", "kl_penalty", "max_new_tokens", "temperature",
            "seed")
    summary = [f"| {k} | {config[k]} |" for k in keys if k in config]
    if summary:
        lines += ["## Training", "", f"The full resolved configuration is in `{CONFIG_FILE}`.", "",
                  "| setting | value |", "|---|---|", *summary, ""]
    lines += ["## Framework versions", "", *(f"- {name}: {version}" for name, version in _versions()), ""]
    data = ModelCardData(**meta)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _peft_name(meta: dict) -> str:
    return next((PEFT_NAMES[t] for t in meta.get("tags", []) if t in PEFT_NAMES), "PEFT")


def _versions() -> list[tuple[str, str]]:
    out = []
    for name in ("hfpg", "transformers", "peft", "accelerate", "torch"):
        try:
            out.append((name, version(name)))
        except PackageNotFoundError:
            pass
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


# ---- push ----------------------------------------------------------------------------------------------------------
def files_to_upload(folder: str) -> list[str]:
    """Relative paths under ``folder`` that a push uploads (sorted; checkpoints and partial writes left out)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.startswith("checkpoint-")
                         and d != "__pycache__")
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if not any(fnmatch.fnmatch(rel, p) for p in IGNORE_PATTERNS):
                out.append(rel)
    return sorted(out)


def push_folder(folder: str, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, revision: str | None = None,
                extra_files: dict[str, bytes] | None = None, create_pr: bool = False,
                shown_folder: str | None = None, dry_run: bool = False) -> str:
    """Upload ``folder`` to the model repo ``repo_id`` (created if missing) in one commit; returns the commit URL.

    ``extra_files`` (path in repo -> bytes) are uploaded too, replacing files of the same name from ``folder`` (the
    model card with the repo's own id in its usage snippet). Nothing under ``folder`` is written or removed.
    ``shown_folder``: the folder named in error messages (the user's, when ``folder`` is a temporary merge).
    ``dry_run``: contact nobody; return what would be uploaded (each file and its size, then the card's metadata).
    """
    shown = shown_folder or folder
    if not os.path.isdir(folder):
        raise HubError(f"nothing to push: {folder!r} is not a folder (pass a run directory or a saved model folder)")
    check_can_push(repo_id, token, shown, network=not dry_run)
    extra_files = dict(extra_files or {})
    files = [f for f in files_to_upload(folder) if f not in extra_files]
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=os.path.join(folder, f)) for f in files]
    operations += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in extra_files.items()]
    message = commit_message or "Upload model trained with hfpg"
    where = f"{repo_id}@{revision}" if revision else repo_id
    if dry_run:
        sizes = {f: os.path.getsize(os.path.join(folder, f)) for f in files}
        sizes.update({p: len(data) for p, data in extra_files.items()})
        lines = [f"dry run: would push {len(sizes)} files ({sum(sizes.values()) / 2**20:.1f} MiB) to {where}"
                 f"{' as a pull request' if create_pr else ''} with message {message!r}:"]
        lines += [f"  {p:<40} {n:>12,} bytes" for p, n in sorted(sizes.items())]
        if CARD_FILE in extra_files:
            text = extra_files[CARD_FILE].decode()
            lines += ["model card metadata:", *("  " + x for x in text.split("---")[1].strip().splitlines())]
        return "\n".join(lines)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision,
                                 repo_type="model", create_pr=create_pr)
    except Exception as e:  # noqa: BLE001 - every failure is explained, then re-raised as HubError
        raise HubError(explain_hub_error(e, where, shown)) from None
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or str(info)
    logger.info("pushed %d files from %s to %s", len(operations), folder, where)
    return url


def check_can_push(repo_id: str, token: str | None, folder: str, network: bool = True) -> None:
    """Problems found before any network call: a malformed repo id, then (``network``) offline mode, no token."""
    if not repo_id_shaped(repo_id):
        raise HubError(f"{repo_id!r} is not a Hub repo id; use 'your-name/model-name'")
    if not network:
        return
    if constants.HF_HUB_OFFLINE:
        raise HubError("cannot push: HF_HUB_OFFLINE is set, so huggingface_hub makes no network calls; unset it "
                       f"(e.g. `HF_HUB_OFFLINE=0 hfpg push ...`). The local folder {folder} is unchanged.")
    if token is None and get_token() is None:
        raise HubError(f"cannot push to {repo_id}: no Hugging Face token found; {TOKEN_HELP}. "
                       f"The local folder {folder} is unchanged.")


def explain_hub_error(error: Exception, where: str, folder: str) -> str:
    """One message for a failed Hub call: what happened, how to fix it, and that the local folder is intact."""
    kept = f"The local folder {folder} is unchanged."
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, OfflineModeIsEnabled):
        return f"cannot push to {where}: HF_HUB_OFFLINE is set; unset it to reach the Hub. {kept}"
    if isinstance(error, RevisionNotFoundError):
        return f"cannot push to {where}: the Hub has no branch or revision {where.split('@')[-1]!r}. {kept}"
    if isinstance(error, RepositoryNotFoundError) or status == 404:
        return (f"cannot push to {where}: repository not found (404). Check the repo id, and that your token can "
                f"write to its namespace; {TOKEN_HELP}. {kept}")
    if status == 401:
        return f"cannot push to {where}: the Hub rejected the token (401 Unauthorized); {TOKEN_HELP}. {kept}"
    if status == 403:
        return (f"cannot push to {where}: permission denied (403 Forbidden): the token is read-only or cannot write "
                f"to this namespace; use a write token or a repo id under your own name. {kept}")
    if isinstance(error, HfHubHTTPError) and status is not None:
        server = getattr(error, "server_message", None) or ""
        reason = f": {server.strip()}" if server.strip() else ""
        return f"cannot push to {where}: the Hub answered HTTP {status}{reason}. Try again later. {kept}"
    if _is_network_error(error):
        return (f"cannot push to {where}: the Hub cannot be reached ({type(error).__name__}: "
                f"{_first_line(error)}); check the network connection or proxy settings (HF_ENDPOINT). {kept}")
    return f"cannot push to {where}: {type(error).__name__}: {_first_line(error)}. {kept}"


def _is_network_error(error: Exception) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    for cls in type(error).__mro__:  # httpx / httpx2 / requests transport errors, without importing them
        if cls.__name__ in ("TransportError", "ConnectError", "ConnectTimeout", "NetworkError", "TimeoutException",
                            "ConnectionError", "ProxyError"):
            return True
    return False


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else "no details"


# ---- saved model folders -------------------------------------------------------------------------------------------
def model_folder(path: str) -> str:
    """The saved model inside ``path``: a run directory's ``final/``, or ``path`` itself when it holds a model."""
    final = os.path.join(path, "final")
    for candidate in (path, final):
        if any(os.path.isfile(os.path.join(candidate, f)) for f in ("adapter_config.json", "config.json")):
            return candidate
    if not os.path.isdir(path):
        raise HubError(f"{path!r} does not exist; pass a run directory (with final/) or a saved model folder")
    raise HubError(f"{path!r} holds no saved model (no config.json or adapter_config.json, here or in final/); "
                   "pass a run directory written by `hfpg train` or a folder written by trainer.save_model()")


def folder_metadata(folder: str) -> dict:
    """The card metadata of a saved folder: its README's, or (no card yet) what its files tell."""
    meta = read_card_metadata(folder)
    if meta:
        return meta
    config = read_config(folder)
    adapter = _read_json(os.path.join(folder, "adapter_config.json"))
    base = (adapter or {}).get("base_model_name_or_path")
    if not adapter:
        base = (_read_json(os.path.join(folder, "config.json")) or {}).get("_name_or_path")
    rewards = [{"name": str(s.get("label") or s.get("name")), "weight": float(s.get("weight", 1.0))}
               for s in config.get("rewards") or [] if isinstance(s, dict)]
    return card_metadata(base_model=base if is_hub_id(base) else None, is_adapter=adapter is not None,
                         algorithm=str(config.get("algorithm", "ppo")), rewards=rewards, metrics={},
                         peft_type=(adapter or {}).get("peft_type"))


def merged_metadata(meta: dict) -> dict:
    """Card metadata of the merged (full) model made from an adapter with metadata ``meta``."""
    out = dict(meta)
    out["library_name"] = "transformers"
    out["tags"] = [t for t in meta.get("tags", []) if t not in PEFT_NAMES] + ["merged-adapter"]
    return out


def hub_files(folder: str, repo_id: str, meta: dict | None = None) -> dict[str, bytes]:
    """Files a push writes differently from the local folder: the card naming ``repo_id`` in its usage snippet, and
    ``adapter_config.json`` pointing at the card's Hub ``base_model`` when it points at a local folder."""
    meta = meta or folder_metadata(folder)
    card = render_model_card(meta, repo_id, read_config(folder))
    files = {CARD_FILE: str(card).encode()}
    adapter = _read_json(os.path.join(folder, "adapter_config.json"))
    base = meta.get("base_model")
    if adapter is not None and is_hub_id(base) and adapter.get("base_model_name_or_path") != base:
        adapter["base_model_name_or_path"] = base
        files["adapter_config.json"] = (json.dumps(adapter, indent=2, sort_keys=True) + "\n").encode()
    return files


def push_model_folder(path: str, repo_id: str, *, merge: bool = False, private: bool | None = None,
                      token: str | None = None, commit_message: str | None = None, revision: str | None = None,
                      create_pr: bool = False, dry_run: bool = False) -> str:
    """What ``hfpg push RUN_DIR REPO_ID`` does: push the saved model (``final/`` of a run), with its model card; with
    ``merge`` an adapter is merged into its base first, in a temporary folder. The local folder is never written."""
    folder = model_folder(path)
    check_can_push(repo_id, token, folder, network=not dry_run)  # before an expensive merge
    meta = folder_metadata(folder)
    if not merge or not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return push_folder(folder, repo_id, private=private, token=token, commit_message=commit_message,
                           revision=revision, extra_files=hub_files(folder, repo_id, meta), create_pr=create_pr,
                           dry_run=dry_run)
    with tempfile.TemporaryDirectory(prefix="hfpg-merge-") as tmp:
        model = AutoModelForCausalLMWithValueHead.from_pretrained(folder)
        model.save_pretrained(tmp, merge=True)
        del model
        for name in os.listdir(folder):  # tokenizer files, hfpg_config.yaml, ...
            src = os.path.join(folder, name)
            if os.path.isfile(src) and not os.path.exists(os.path.join(tmp, name)) and name != CARD_FILE \
                    and not name.startswith("adapter_"):
                shutil.copy2(src, os.path.join(tmp, name))
        return push_folder(tmp, repo_id, private=private, token=token, commit_message=commit_message,
                           revision=revision, extra_files=hub_files(tmp, repo_id, merged_metadata(meta)),
                           create_pr=create_pr, shown_folder=folder, dry_run=dry_run)


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
