"""Filling dataclasses from nested mappings (YAML) and ``dotted.key=value`` overrides, with errors that
name the key, the expected type and, for a misspelt key, the closest valid one."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

import re

import yaml


class ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 without its base-60 numbers (``1:2`` stays the string "1:2", an aspect ratio, not the integer 62) and
    with YAML 1.2's floats (``3e-4`` is a number)."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if not (tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") and ":" in regexp.pattern)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_NUMBER_WITHOUT_COLON = {
    "tag:yaml.org,2002:int": re.compile(r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$""", re.X),
    # YAML 1.2's floats: 3e-4 is a number, as a reader expects (YAML 1.1 wants 3.0e-4)
    "tag:yaml.org,2002:float": re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
}
for _tag, _regexp in _NUMBER_WITHOUT_COLON.items():
    ConfigLoader.add_implicit_resolver(_tag, _regexp, list("-+0123456789."))


def load_yaml(text: str):
    return yaml.load(text, Loader=ConfigLoader)


def hints(cls) -> dict:
    """Resolved field annotations of a dataclass (the package uses ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def dotted_keys(cls, prefix: str = "") -> list[str]:
    """Every settable key of a (nested) dataclass, as ``section.field``."""
    keys = []
    types_ = hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.append(name)
        if dataclasses.is_dataclass(types_[f.name]):
            keys += dotted_keys(types_[f.name], name + ".")
    return keys


def unknown_key(key: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else " Run 'pyraflow config show' for every key."
    return ValueError(f"unknown config key '{key}'.{hint}")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check and convert a YAML value to a field's annotated type, naming the key on failure."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ValueError:
                pass
        raise ValueError(f"config key '{key}'={value!r} has the wrong type; expected {_type_name(tp)}.")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key '{key}'={value!r} must be a list.")
        (item,) = typing.get_args(tp) or (Any,)
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}'={value!r} must be a mapping.")
        return value
    checks = {bool: (lambda v: isinstance(v, bool), "true or false"),
              int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
              float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
              str: (lambda v: isinstance(v, str), "a string")}
    if tp in checks:
        ok, expected = checks[tp]
        if not ok(value):
            raise ValueError(f"config key '{key}'={value!r} must be {expected}.")
        return float(value) if tp is float else value
    return value


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def build_kwargs(cls, raw: dict | None, valid: list[str], prefix: str = "") -> dict:
    """Constructor arguments of dataclass ``cls`` from a nested mapping (nested dataclasses built); absent
    fields are left to their defaults."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {raw!r}.")
    types_ = hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise unknown_key(prefix + str(key), valid)
    kwargs = {}
    for name in names & set(raw):
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = tp(**build_kwargs(tp, raw[name], valid, prefix + name + "."))
        else:
            kwargs[name] = coerce(raw[name], tp, prefix + name)
    return kwargs


def apply_override(raw: dict, assignment: str, valid: list[str]) -> None:
    """Apply one ``dotted.key=value`` to a nested mapping; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ValueError(f"--set {assignment!r} must look like dotted.key=value (e.g. --set batching.token_budget=4096).")
    key, text = assignment.split("=", 1)
    key = key.strip()
    if key not in valid:
        raise unknown_key(key, valid)
    try:
        value = load_yaml(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"--set {key}: cannot parse {text!r} ({err}).") from err
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value
