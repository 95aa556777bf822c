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
  - factory: trl.rewards:get_soft_overlong_punishment   # called once with kwargs; what it returns is the reward
    kwargs: {max_completion_len: 64, soft_punish_cache: 16}
reward_normalize: running
```
``name: module:function`` with ``kwargs``: a function gets them bound on every call (``functools.partial``), a class
is instantiated with them. ``factory: module:function``: the function is called once with ``kwargs`` and must return
the reward callable (TRL's ``get_*`` rewards, anything that builds a reward from settings).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from typing import Any

from ..errors import ConfigError
from ..schema import closest, format_problems
from ..sources import is_hub_id, materialize_gguf, relative_to, resolve_source
from .combined import CombinedReward
from .metrics import BLEUReward, ChrFReward, EvaluateMetricReward, ROUGEReward, TERReward
from .models import LMLikelihoodReward, RewardModelReward
from .shaping import LengthPenalty, RepetitionPenalty

SPEC_KEYS = ("name", "factory", "weight", "kwargs", "label")

BUILTINS = {  # YAML name -> class; the classes import their scoring libraries (sacrebleu, ...) only when built
    "bleu": BLEUReward,
    "chrf": ChrFReward,
    "ter": TERReward,
    "rouge": ROUGEReward,
    "evaluate": EvaluateMetricReward,
    "lm_likelihood": LMLikelihoodReward,
    "reward_model": RewardModelReward,
    "length_penalty": LengthPenalty,
    "repetition_penalty": RepetitionPenalty,
}
BUILTIN_NAMES = tuple(BUILTINS)


def builtin_reward(name: str) -> type:
    """The class of built-in reward ``name``."""
    return BUILTINS[name]


def builtin_rewards() -> dict[str, type]:
    """Name -> class of every built-in reward."""
    return dict(BUILTINS)


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
                close = closest(key, SPEC_KEYS)
                hint = f"; did you mean {close!r}?" if close else f"; allowed keys are {list(SPEC_KEYS)}"
                problems.append(f"{where} has an unknown key {key!r}{hint}")
        name = spec.get("name")
        factory = spec.get("factory")
        if factory is not None:
            if name is not None:
                problems.append(
                    f"{where} has both 'name' and 'factory'; give one (factory: module:function builds the reward, "
                    f"use label: to name it)"
                )
            elif not isinstance(factory, str) or ":" not in factory:
                problems.append(
                    f"{where}: factory must be module:function or path/to/file.py:function, got {factory!r}"
                )
        elif not isinstance(name, str) or not name:
            problems.append(
                f"{where} needs a 'name': a built-in ({', '.join(BUILTIN_NAMES)}) or module:function "
                f"(or factory: module:function for a function that builds the reward)"
            )
        elif ":" not in name and name not in BUILTIN_NAMES:
            close = closest(name, BUILTIN_NAMES, cutoff=0.5)
            hint = f"did you mean {close!r}? " if close else ""
            problems.append(
                f"{where}: unknown reward {name!r}; {hint}built-ins are {list(BUILTIN_NAMES)}, "
                f"or give module:function / path/to/file.py:function"
            )
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
        path = relative_to(module_name, base_dir)
        if not os.path.isfile(path):
            looked = [module_name] + ([os.path.join(base_dir, module_name)] if base_dir else [])
            raise ValueError(f"reward file {module_name!r} not found (looked in {looked})")
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
    name, kwargs = spec.get("name"), dict(spec.get("kwargs") or {})
    if spec.get("factory"):
        factory = resolve_callable(spec["factory"], base_dir)
        try:
            fn = factory(**kwargs)
        except TypeError as e:
            raise ValueError(
                f"factory {spec['factory']!r} cannot be called with kwargs {sorted(kwargs)}: {e}"
            ) from None
        if not callable(fn):
            raise ValueError(
                f"factory {spec['factory']!r} returned {type(fn).__name__}, not a reward callable; for a reward "
                f"function itself use name: {spec['factory']}"
            )
    elif ":" in name:
        target = resolve_callable(name, base_dir)
        if isinstance(target, type):
            fn = target(**kwargs)
        elif kwargs:
            fn = functools.wraps(target)(functools.partial(target, **kwargs))
        else:
            fn = target
    else:
        for key in ("model", "tokenizer", "metric"):  # relative paths next to the YAML work from any directory
            if key in kwargs:
                kwargs[key] = relative_to(kwargs[key], base_dir)
        model_kwargs = kwargs.get("model_kwargs") or {}
        model = kwargs.get("model")
        if (
            isinstance(model, str)
            and not model.startswith("pkg:")
            and not os.path.exists(model)
            and not is_hub_id(model)
        ):  # a local path that is not there (a Hub id downloads later)
            raise ValueError(
                f"reward {spec.get('label') or name!r}: model folder {model!r} does not exist (relative "
                f"paths are tried from the working directory, then next to the recipe); train or "
                f"download it first"
            )
        if isinstance(model, str) and (model.startswith("pkg:") or model_kwargs.get("gguf_file")):
            if model_kwargs.get("gguf_file"):  # a GGUF scorer: de-quantised once, cached like the policy
                kwargs["model"] = materialize_gguf(kwargs["model"], model_kwargs["gguf_file"])
                kwargs["model_kwargs"] = {k: v for k, v in model_kwargs.items() if k != "gguf_file"}
            else:
                kwargs["model"] = resolve_source(kwargs["model"])
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
        self.__wrapped__ = fn  # inspect.signature reads the reward's own signature through this

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self.fn, attr)


def build_reward(
    specs: list,
    normalize: str = "none",
    clip: float | None = None,
    nonfinite: float | None = None,
    base_dir: str | None = None,
):
    """A :class:`CombinedReward` from a ``rewards:`` list (validated first, with every problem in one error)."""
    problems = spec_problems(specs)
    if not specs:
        problems.append("rewards is empty: declare at least one reward")
    if problems:
        raise ConfigError(format_problems("invalid rewards", problems), problems)
    parts = []
    for i, spec in enumerate(specs):
        try:
            parts.append(
                (build_reward_part(spec, base_dir), float((spec if isinstance(spec, dict) else {}).get("weight", 1.0)))
            )
        except ValueError as e:
            raise ConfigError(f"rewards[{i}]: {e}") from None
    reward = CombinedReward(parts, normalize=normalize, clip=clip, nonfinite=nonfinite)
    reward.specs = specs  # lets a trainer whose config declares these same rewards accept this object
    return reward
