"""Checking a config section (plain YAML values) against its dataclass's type hints.

lm.config's sections are typed dataclasses; a section arrives as a mapping parsed from YAML. Each
key must be a field, each value must match the field's type (Literal, Union, list, float, int,
a nested dataclass, ...), and a mistake is one UserError line naming the key, with the closest
valid name. A nested dataclass (data.sources' entries, train.wandb) is a mapping checked the same
way, named by its path: `data.sources[1].weight`. `--set section.key=value` overrides are
applied to the raw sections here too (apply_overrides), before any checking.
"""

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

import yaml

from core.errors import UserError


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_section(cls, raw: Any, source: str, section: str):
    """An instance of dataclass `cls` from `raw`, the mapping of section `section` of `source`."""
    where = f"{source}: {section}"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key not in names:
            raise UserError(f"{where}: unknown key {key!r}{did_you_mean(str(key), names)}")
        if not _matches(value, hints[key]):
            raise UserError(f"{where}.{key}: expected {_describe(hints[key])}, got {value!r}")
    values = {k: _build(v, hints[k], source, f"{section}.{k}") for k, v in raw.items()}
    try:
        return cls(**values)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None


def _build(value: Any, hint, source: str, where: str) -> Any:
    """A value that `_matches` its hint, as the field holds it: floats as float, mappings as their dataclass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return _build(value, next(a for a in args if _matches(value, a)), source, where)
    if origin is list:
        return [_build(v, args[0], source, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value, source, where)
    return float(value) if hint is float else value


def _matches(value: Any, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)  # its keys and values are checked as it is built
    if hint is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)) or _is_float_text(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _is_float_text(value: Any) -> bool:
    """YAML 1.1 reads `6e-4` (no dot) as a string; a float field accepts it as the number."""
    try:
        return isinstance(value, str) and float(value) == float(value)  # excludes nan
    except ValueError:
        return False


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if dataclasses.is_dataclass(hint):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`raw` (a config as plain sections) with `section.key=value` overrides applied, in place;
    values parsed as YAML. Not yet validated: RunConfig.from_dict does that."""
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise UserError(f"override {item!r} is not of the form section.key=value")
        if raw.get(section) is None:
            raw[section] = {}
        target = raw[section]
        if not isinstance(target, dict):
            raise UserError(f"override {item!r}: {section!r} is not a section")
        try:
            target[name] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"override {item!r}: the value is not valid YAML") from None
    return raw
