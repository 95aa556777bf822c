"""YAML files into dataclasses: the one loader behind :class:`~hfpg.config.PGConfig`, recipes and reward-model configs.

- :func:`read_yaml` reads a file that must hold a mapping;
- :func:`apply_overrides` applies ``key=value`` command-line overrides (dotted keys reach into sections and lists);
- :func:`build` turns a mapping into a dataclass: unknown keys get a did-you-mean, values are checked against the
  field's annotation (YAML reads ``1e-5`` as a string, ``3`` where a float is meant, ...), and the dataclass's own
  validation runs; every problem is collected so that one :class:`~hfpg.errors.ConfigError` lists them all.

A field whose metadata says ``internal`` (e.g. ``base_dir``, the folder of the YAML file) is set by the loader, never
read from the mapping nor written back by :func:`to_dict`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

# what a value must be, for messages: annotation -> "must be ..."
_KINDS = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "list": "a list",
    "dict": "a mapping",
}


def closest(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The choice closest to ``word`` (for a did-you-mean), or None when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=cutoff)
    return close[0] if close else None


def unknown_keys(
    keys: Iterable[str],
    known: Iterable[str],
    prefix: str = "",
    fallback: str = "",
    hints: Mapping[str, Callable[[Any], str] | str] | None = None,
) -> list[str]:
    """``unknown key 'prefix.key'; did you mean 'prefix.close'?`` (or ``fallback``) for each key not in ``known``.

    hints: exact hints for names another library uses (e.g. :data:`hfpg.trl_names.TRL_KEY_HINTS`), a function of
    the value given or a string; such a key reads ``unknown key 'num_generations' (TRL's name): <hint>`` instead.
    ``keys`` may be the mapping itself, so that hints see the values (otherwise they get None).
    """
    known = list(known)
    problems = []
    for key in keys:
        if key in known:
            continue
        if hints is not None and key in hints:
            hint = hints[key]
            value = keys[key] if isinstance(keys, Mapping) else None
            problems.append(
                f"unknown key {prefix + str(key)!r} (TRL's name): {hint(value) if callable(hint) else hint}"
            )
            continue
        close = closest(key, known)
        hint = f"; did you mean {prefix + close!r}?" if close else fallback
        problems.append(f"unknown key {prefix + str(key)!r}{hint}")
    return problems


def format_problems(title: str, problems: list[str]) -> str:
    """``title: problem`` for one problem, else ``title:`` and one indented line per problem."""
    if len(problems) == 1:
        return f"{title}: {problems[0]}"
    return f"{title}:\n" + "\n".join(f"  - {p}" for p in problems)


def read_yaml(path: str | Path, what: str = "config file", hint: str = "") -> dict:
    """The mapping in a YAML file; a missing file, invalid YAML or a non-mapping is a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist{hint}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of key: value pairs, got {type(data).__name__}")
    return data


def folder_of(path: str | Path) -> str:
    """The absolute folder of a YAML file: what paths written in it are relative to (a config's ``base_dir``)."""
    return os.path.dirname(os.path.abspath(path))


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Set ``a.b.c=value`` on a nested dict, in place (values parsed as YAML; numeric parts index lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        node: Any = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {key!r}: {part!r} is not an index of a list of {len(node)}")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i])!r} is not a mapping")
            if i == len(parts) - 1:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return data


def loadable_fields(cls) -> list[dataclasses.Field]:
    """The fields a mapping may set (every declared field but the ``internal`` ones)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def to_dict(obj) -> dict[str, Any]:
    """The loadable fields of a dataclass instance as plain data (what :func:`build` reads back)."""
    data = dataclasses.asdict(obj)
    return {f.name: data[f.name] for f in loadable_fields(type(obj))}


def coerce(key: str, value: Any, annotation: Any) -> tuple[Any, str | None]:
    """``(value, None)`` converted to the field's annotation (a string under ``from __future__ import annotations``,
    e.g. ``"int | float"``, ``"list[int] | None"``), or ``(None, message)`` when it does not fit any member."""
    members = [m.strip() for m in str(annotation).split("|")]
    if value is None:
        return (None, None) if {"None", "Any"} & set(members) else (None, f"{key} may not be null")
    kinds = []
    for member in members:
        base = member.split("[")[0]
        if base == "None":
            continue
        ok, converted = _convert(base, value)
        if ok:
            return converted, None
        kinds.append(_KINDS.get(base, base))
    if any(m.split("[")[0] == "float" for m in members) and _nonfinite(value):
        return None, f"{key}={value!r} must be a finite number (NaN and infinity are refused)"
    return None, f"{key}={value!r} must be {' or '.join(dict.fromkeys(kinds))}"


def _number(value: Any) -> float | None:
    """``value`` as a float when it reads as a number (a real number, or a string such as YAML's ``1e-5``), else
    None. An integer too large for a float is infinity."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:  # YAML's own spellings, quoted: ".inf", "-.inf", ".NaN"
            special = value.strip().lower()
            return float(special.replace(".", "")) if special in (".inf", "+.inf", "-.inf", ".nan") else None
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:
            return math.inf
    return None


def _nonfinite(value: Any) -> bool:
    """Whether ``value`` reads as NaN or ±infinity (``.nan`` / ``.inf`` in YAML, ``"nan"``, ``float("inf")``)."""
    number = _number(value)
    return number is not None and not math.isfinite(number)


def _convert(base: str, value: Any) -> tuple[bool, Any]:
    if base == "bool":
        return isinstance(value, bool), value
    if isinstance(value, bool):  # True is an int to Python, never a number in a config
        return base not in ("int", "float", "str", "list", "dict"), value
    if base == "int":
        if isinstance(value, numbers.Integral):  # int, numpy integers
            return True, int(value)
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, None
    if base == "float":  # a finite number: NaN and infinity are refused (see coerce's message)
        number = _number(value)  # YAML reads 1e-5 (no dot) as a string
        if number is None or not math.isfinite(number):
            return False, None
        return True, number
    if base == "str":
        return isinstance(value, str), value
    if base == "list":
        if isinstance(value, (str, int)):  # `report_to: tensorboard` means [tensorboard]
            return True, [value]
        return isinstance(value, list), value
    if base == "dict":
        return isinstance(value, dict), value
    return True, value  # Any, or a type this loader does not check


def build(cls, data: Any, where: str = "", fallback: str | None = None, **internal):
    """``(instance, [])`` built from ``data``, or ``(None, problems)``.

    where: the section's name, prefixed to keys in messages (``model.`` ...). fallback: the hint for an unknown key
    nothing is close to (default: the list of keys). A class attribute ``KEY_HINTS`` (a mapping, see
    :func:`unknown_keys`) gives exact hints for other libraries' names (``PGConfig.KEY_HINTS``: TRL's).
    ``internal``: values of internal fields (``base_dir``). The dataclass's own validation (a :class:`ConfigError`
    from ``__post_init__``) runs even when some keys were bad, so that every problem is reported at once.
    """
    if not isinstance(data, dict):
        return None, [f"{where or cls.__name__} must be a mapping, got {data!r}"]
    fields = {f.name: f for f in loadable_fields(cls)}
    prefix = f"{where}." if where else ""
    fallback = f"; {where or cls.__name__} keys are {list(fields)}" if fallback is None else fallback
    problems = unknown_keys(data, fields, prefix, fallback, hints=getattr(cls, "KEY_HINTS", None))
    values = {}
    for key in data.keys() & fields.keys():
        values[key], error = coerce(prefix + key, data[key], fields[key].type)
        if error:
            problems.append(error)
            del values[key]
    try:
        obj = cls(**values, **internal)
    except ConfigError as e:
        return None, problems + e.problems
    return (None, problems) if problems else (obj, [])


def build_or_raise(cls, data: Any, title: str, **kwargs):
    """:func:`build`, raising one :class:`ConfigError` (headed ``title``) that lists every problem."""
    obj, problems = build(cls, data, **kwargs)
    if problems:
        raise ConfigError(format_problems(title, problems), problems)
    return obj
