"""Pushing a saved model folder (:mod:`hfpg.cards` describes its card) to the Hugging Face Hub.

:func:`push_folder` uploads such a folder with ``huggingface_hub`` (creating the repo if needed) and never writes to
it. Tokens are passed through to ``huggingface_hub`` and never formatted into messages or logs; every failure the
Hub can answer with becomes a :class:`HubError` that says what went wrong and how to fix it.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import tempfile

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

from .cards import (
    CARD_FILE,
    folder_metadata,
    merged_metadata,
    portable_files,
    read_config,
    read_json,
    render_model_card,
)
from .errors import HubError
from .modeling import AutoModelForCausalLMWithValueHead
from .sources import is_hub_id, repo_id_shaped

logger = logging.getLogger(__name__)

# never uploaded: training state that does not belong in a model repo, and partial writes
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/*", "*.tmp", ".cache/*", ".git/*", "__pycache__/*"]
TOKEN_HELP = (
    "create a token with write access at https://huggingface.co/settings/tokens, then run "
    "`hf auth login` or set HF_TOKEN (or pass token=...)"
)


# ---- push ----------------------------------------------------------------------------------------------------------
def files_to_upload(folder: str) -> list[str]:
    """Relative paths under ``folder`` that a push uploads (sorted; checkpoints and partial writes left out)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and not d.startswith("checkpoint-") and d != "__pycache__"
        )
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if not any(fnmatch.fnmatch(rel, p) for p in IGNORE_PATTERNS):
                out.append(rel)
    return sorted(out)


def push_folder(
    folder: str,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    extra_files: dict[str, bytes] | None = None,
    create_pr: bool = False,
    shown_folder: str | None = None,
    dry_run: bool = False,
) -> str:
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
        lines = [
            f"dry run: would push {len(sizes)} files ({sum(sizes.values()) / 2**20:.1f} MiB) to {where}"
            f"{' as a pull request' if create_pr else ''} with message {message!r}:"
        ]
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
        info = api.create_commit(
            repo_id, operations, commit_message=message, revision=revision, repo_type="model", create_pr=create_pr
        )
    except Exception as e:
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
        raise HubError(
            "cannot push: HF_HUB_OFFLINE is set, so huggingface_hub makes no network calls; unset it "
            f"(e.g. `HF_HUB_OFFLINE=0 hfpg push ...`). The local folder {folder} is unchanged."
        )
    if token is None and get_token() is None:
        raise HubError(
            f"cannot push to {repo_id}: no Hugging Face token found; {TOKEN_HELP}. "
            f"The local folder {folder} is unchanged."
        )


def explain_hub_error(error: Exception, where: str, folder: str) -> str:
    """One message for a failed Hub call: what happened, how to fix it, and that the local folder is intact."""
    kept = f"The local folder {folder} is unchanged."
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, OfflineModeIsEnabled):
        return f"cannot push to {where}: HF_HUB_OFFLINE is set; unset it to reach the Hub. {kept}"
    if isinstance(error, RevisionNotFoundError):
        return f"cannot push to {where}: the Hub has no branch or revision {where.split('@')[-1]!r}. {kept}"
    if isinstance(error, RepositoryNotFoundError) or status == 404:
        return (
            f"cannot push to {where}: repository not found (404). Check the repo id, and that your token can "
            f"write to its namespace; {TOKEN_HELP}. {kept}"
        )
    if status == 401:
        return f"cannot push to {where}: the Hub rejected the token (401 Unauthorized); {TOKEN_HELP}. {kept}"
    if status == 403:
        return (
            f"cannot push to {where}: permission denied (403 Forbidden): the token is read-only or cannot write "
            f"to this namespace; use a write token or a repo id under your own name. {kept}"
        )
    if isinstance(error, HfHubHTTPError) and status is not None:
        server = getattr(error, "server_message", None) or ""
        reason = f": {server.strip()}" if server.strip() else ""
        return f"cannot push to {where}: the Hub answered HTTP {status}{reason}. Try again later. {kept}"
    if _is_network_error(error):
        return (
            f"cannot push to {where}: the Hub cannot be reached ({type(error).__name__}: "
            f"{_first_line(error)}); check the network connection or proxy settings (HF_ENDPOINT). {kept}"
        )
    return f"cannot push to {where}: {type(error).__name__}: {_first_line(error)}. {kept}"


def _is_network_error(error: Exception) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    for cls in type(error).__mro__:  # httpx / httpx2 / requests transport errors, without importing them
        if cls.__name__ in (
            "TransportError",
            "ConnectError",
            "ConnectTimeout",
            "NetworkError",
            "TimeoutException",
            "ConnectionError",
            "ProxyError",
        ):
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
    raise HubError(
        f"{path!r} holds no saved model (no config.json or adapter_config.json, here or in final/); "
        "pass a run directory written by `hfpg train` or a folder written by trainer.save_model()"
    )


def hub_files(folder: str, repo_id: str, meta: dict | None = None) -> dict[str, bytes]:
    """Files a push writes differently from the local folder: the card naming ``repo_id`` in its usage snippet, and
    every JSON / YAML file that still names a local path (a folder saved by an older hfpg, or by hand) made portable
    (:func:`hfpg.cards.portable_files`): ``adapter_config.json`` / ``config.json`` point at the card's Hub
    ``base_model`` (else the base folder's name), ``hfpg_config.yaml`` keeps no absolute path."""
    meta = meta or folder_metadata(folder)
    card = render_model_card(meta, repo_id, read_config(folder))
    base = meta.get("base_model")
    files = portable_files(folder, base if is_hub_id(base) else None, files_to_upload(folder))
    files[CARD_FILE] = str(card).encode()
    return files


def push_model_folder(
    path: str,
    repo_id: str,
    *,
    merge: bool = False,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
) -> str:
    """What ``hfpg push RUN_DIR REPO_ID`` does: push the saved model (``final/`` of a run), with its model card; with
    ``merge`` an adapter is merged into its base first, in a temporary folder. The local folder is never written."""
    folder = model_folder(path)
    check_can_push(repo_id, token, folder, network=not dry_run)  # before an expensive merge
    meta = folder_metadata(folder)
    if not merge or not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return push_folder(
            folder,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            revision=revision,
            extra_files=hub_files(folder, repo_id, meta),
            create_pr=create_pr,
            dry_run=dry_run,
        )
    with tempfile.TemporaryDirectory(prefix="hfpg-merge-") as tmp:
        model = _load_for_merge(folder)
        model.save_pretrained(tmp, merge=True)
        del model
        for name in os.listdir(folder):  # tokenizer files, hfpg_config.yaml, ...
            src = os.path.join(folder, name)
            if (
                os.path.isfile(src)
                and not os.path.exists(os.path.join(tmp, name))
                and name != CARD_FILE
                and not name.startswith("adapter_")
            ):
                shutil.copy2(src, os.path.join(tmp, name))
        return push_folder(
            tmp,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            revision=revision,
            extra_files=hub_files(tmp, repo_id, merged_metadata(meta)),
            create_pr=create_pr,
            shown_folder=folder,
            dry_run=dry_run,
        )


def _load_for_merge(folder: str):
    """The adapter of ``folder`` on its base model; a base that cannot be found is a :class:`HubError` saying so (a
    saved folder names its base by Hub id, else by a path relative to the working directory or the folder's name)."""
    try:
        return AutoModelForCausalLMWithValueHead.from_pretrained(folder)
    except (OSError, ValueError) as e:
        base = (read_json(os.path.join(folder, "adapter_config.json")) or {}).get("base_model_name_or_path")
        fix = (
            "for a Hub id, check the network and HF_HUB_OFFLINE; for a local base (named by its path relative to the "
            "working directory, or its folder name), run from the folder that holds it"
        )
        raise HubError(
            f"cannot merge {folder}: its base model {base!r} (adapter_config.json's base_model_name_or_path) could "
            f"not be loaded ({type(e).__name__}: {_first_line(e)}); {fix}, or push without --merge. Nothing was "
            f"pushed and {folder} is unchanged."
        ) from None
