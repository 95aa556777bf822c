"""Rewards declared in YAML: a built-in by name, or ``module:function`` / ``path/to/file.py:function`` of the user's.

```yaml
rewards:
  - name: bleu                      # a built-in (see BUILTIN_REWARDS)
    weight: 1.0
    kwargs: {references_column: references}
  - name: lm_likelihood
    weight: 0.1
    kwargs: {model: gpt2}
  - name: my_rewards:brevity        # my_rewards.py importable from the working directory (or the YAML's folder)
    weight: 0.5
    label: brevity                  # optional metric name
reward_normalize: running
```
A function with ``kwargs`` gets them bound (``functools.partial``); a class is instantiated with them.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import os
import sys
from typing import Any

SPEC_KEYS = ("name", "weight", "kwargs", "label")


BUILTINS = {  # name -> (module in hfpg.rewards, class); imported only when used (some pull in heavy libraries)
    "bleu": ("metrics", "BLEUReward"), "chrf": ("metrics", "ChrFReward"), "ter": ("metrics", "TERReward"),
    "rouge": ("metrics", "ROUGEReward"), "evaluate": ("metrics", "EvaluateMetricReward"),
    "lm_likelihood": ("models", "LMLikelihoodReward"), "reward_model": ("models", "RewardModelReward"),
    "length_penalty": ("shaping", "LengthPenalty"), "repetition_penalty": ("shaping", "RepetitionPenalty"),
}
BUILTIN_NAMES = tuple(BUILTINS)


def builtin_reward(name: str) -> type:
    """The class of built-in reward ``name``."""
    module, cls = BUILTINS[name]
    return getattr(importlib.import_module(f"hfpg.rewards.{module}"), cls)


def builtin_rewards() -> dict[str, type]:
    """Name -> class of every built-in reward."""
    return {name: builtin_reward(name) for name in BUILTINS}


def spec_problems(specs: Any) -> list[str]:
    """Structural problems of a ``rewards:`` list (no imports, no models): for up-front config validation."""
    if specs is None:
        return []
    if not isinstance(specs, list):
        return [f"rewards must be a list of {{name, weight, kwargs}} entries, got {type(specs).__name__}"]
    problems = []
    for i, spec in enumerate(specs):
        where = f"rewards[{i}]"
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict):
            problems.append(f"{where} must be a mapping with a 'name', got {spec!r}")
            continue
        for key in spec:
            if key not in SPEC_KEYS:
                close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; allowed keys are {list(SPEC_KEYS)}"
                problems.append(f"{where} has an unknown key {key!r}{hint}")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"{where} needs a 'name': a built-in ({', '.join(BUILTIN_NAMES)}) or module:function")
        elif ":" not in name and name not in BUILTIN_NAMES:
            close = difflib.get_close_matches(name, BUILTIN_NAMES, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"{where}: unknown reward {name!r}; {hint}built-ins are {list(BUILTIN_NAMES)}, "
                            f"or give module:function / path/to/file.py:function")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            problems.append(f"{where}: weight must be a number, got {weight!r}")
        if not isinstance(spec.get("kwargs", {}) or {}, dict):
            problems.append(f"{where}: kwargs must be a mapping, got {spec.get('kwargs')!r}")
    return problems


def resolve_callable(target: str, base_dir: str | None = None):
    """Import ``module:attr`` or ``path/to/file.py:attr`` (relative paths tried from the cwd, then ``base_dir``)."""
    module_name, _, attr = target.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"{target!r} is not of the form module:function or path/to/file.py:function")
    if module_name.endswith(".py"):
        candidates = [module_name] + ([os.path.join(base_dir, module_name)] if base_dir else [])
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None:
            raise ValueError(f"reward file {module_name!r} not found (looked in {candidates})")
        mod_name = f"hfpg_user_rewards_{abs(hash(os.path.abspath(path)))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    else:
        extra = [p for p in (os.getcwd(), base_dir) if p and p not in sys.path]
        sys.path[:0] = extra
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"cannot import reward module {module_name!r} for {target!r}: {e}") from None
        finally:
            for p in extra:
                sys.path.remove(p)
    try:
        return getattr(module, attr)
    except AttributeError:
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ValueError(f"{module_name!r} has no {attr!r}; it defines {public}") from None


def build_reward_part(spec: dict | str, base_dir: str | None = None):
    """One reward callable from one spec entry, named by its ``label`` when given."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name, kwargs = spec["name"], dict(spec.get("kwargs") or {})
    if ":" in name:
        target = resolve_callable(name, base_dir)
        if isinstance(target, type):
            fn = target(**kwargs)
        elif kwargs:
            fn = functools.wraps(target)(functools.partial(target, **kwargs))
        else:
            fn = target
    else:
        for key in ("model", "tokenizer", "metric"):  # relative paths next to the YAML work from any directory
            value = kwargs.get(key)
            if (isinstance(value, str) and base_dir and not os.path.isabs(value) and not os.path.exists(value)
                    and os.path.exists(os.path.join(base_dir, value))):
                kwargs[key] = os.path.join(base_dir, value)
        model_kwargs = kwargs.get("model_kwargs") or {}
        model = kwargs.get("model")
        from ..hub import is_hub_id

        if isinstance(model, str) and not model.startswith("pkg:") and not os.path.exists(model) \
                and not is_hub_id(model):  # a local path that is not there (a Hub id downloads later)
            raise ValueError(f"reward {spec.get('label') or name!r}: model folder {model!r} does not exist (relative "
                             f"paths are tried from the working directory, then next to the recipe); train or "
                             f"download it first")
        if isinstance(model, str) and (model.startswith("pkg:") or model_kwargs.get("gguf_file")):
            from ..recipe import materialize_gguf, resolve_path

            if model_kwargs.get("gguf_file"):  # a GGUF scorer: de-quantised once, cached like the policy
                kwargs["model"] = materialize_gguf(kwargs["model"], model_kwargs["gguf_file"])
                kwargs["model_kwargs"] = {k: v for k, v in model_kwargs.items() if k != "gguf_file"}
            else:
                kwargs["model"] = resolve_path(kwargs["model"])
        try:
            fn = builtin_reward(name)(**kwargs)
        except TypeError as e:
            raise ValueError(f"reward {name!r}: bad kwargs {sorted(kwargs)}: {e}") from None
    if spec.get("label"):
        fn = _Labelled(fn, spec["label"])
    return fn


class _Labelled:
    """A reward under another name (for metrics and messages); everything else passes through."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self.fn, attr)


def build_reward(specs: list, normalize: str = "none", clip: float | None = None, nonfinite: float | None = None,
                 base_dir: str | None = None):
    """A :class:`CombinedReward` from a ``rewards:`` list (validated first, with every problem in one error)."""
    from ..config import ConfigError
    from .combined import CombinedReward

    problems = spec_problems(specs)
    if not specs:
        problems.append("rewards is empty: declare at least one reward")
    if problems:
        raise ConfigError("invalid rewards:\n" + "\n".join(f"  - {p}" for p in problems), problems)
    parts = []
    for i, spec in enumerate(specs):
        try:
            parts.append((build_reward_part(spec, base_dir), float((spec if isinstance(spec, dict) else {})
                                                                    .get("weight", 1.0))))
        except ValueError as e:
            raise ConfigError(f"rewards[{i}]: {e}") from None
    reward = CombinedReward(parts, normalize=normalize, clip=clip, nonfinite=nonfinite)
    reward.specs = specs  # lets a trainer whose config declares these same rewards accept this object
    return reward
