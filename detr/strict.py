"""Strict loading of typed, frozen config dataclasses, and the range checks they share.

``load_section(cls, mapping, name)`` builds dataclass ``cls`` from plain YAML data: an unknown
key, a missing required key or a value of the wrong type raises :class:`ConfigError` naming the
dotted key (``model.hidden_dim``). Nested dataclasses (and ``Optional`` ones: null = off) are
loaded the same way, their errors naming the full key (``model.aids.dense.loss_coef``). The
range helpers raise the same error, naming the key, the value and what would pass. The
sections themselves are in :mod:`detr.config` (the library's) and ``pipelines.params``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is unknown, missing or of the wrong type."""


def check_ranges(section: str, config: Any, checks: dict[str, bool]) -> None:
    """Raise ConfigError naming ``<section>.<key>`` and its value for the first check that
    is False (``checks``: key -> whether its value is in range)."""
    for key, ok in checks.items():
        if not ok:
            raise ConfigError(f"{section}.{key}: {getattr(config, key)!r} is out of range")


def at_least(section: str, low: int = 1, **values: int) -> None:
    """ConfigError naming ``section.key`` unless every value is >= ``low``."""
    for key, value in values.items():
        if value < low:
            raise ConfigError(f"{section}.{key}: {value!r} must be >= {low}")


def non_negative(section: str, **values: float) -> None:
    """ConfigError naming ``section.key`` for a negative number (bools are skipped)."""
    for key, value in values.items():
        if not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{section}.{key}: {value!r} must be >= 0")


def fraction(key: str, value: float, *, closed: bool = False) -> None:
    """ConfigError naming ``key`` unless 0 <= value < 1 (<= 1 with ``closed``)."""
    if not (0 <= value <= 1 if closed else 0 <= value < 1):
        raise ConfigError(f"{key}: {value!r} must be in [0, 1{']' if closed else ')'}")


def load_section(cls: type, data: Any, name: str) -> Any:
    """Build dataclass ``cls`` from ``data`` (a mapping), strictly. A key that ``cls`` lists
    in its ``MOVED_KEYS`` class attribute (old name -> where it went) says where it went.

    Raises:
        ConfigError: ``data`` is not a mapping, has a key ``cls`` lacks, lacks a required key,
            or has a value whose type does not match the field's annotation.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        moved = getattr(cls, "MOVED_KEYS", {}).get(unknown[0])  # a key renamed or moved
        moved = f" ({moved})" if moved else ""
        raise ConfigError(f"{name}.{unknown[0]}: unknown key{moved} "
                          f"(allowed: {', '.join(sorted(fields))})")
    values = {}
    for key, field in fields.items():
        if key in data:
            values[key] = _check(hints[key], data[key], f"{name}.{key}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{name}.{key}: required key is missing")
    return cls(**values)


def _check(hint: Any, value: Any, key: str) -> Any:
    """Return ``value`` converted to ``hint`` where lossless, else raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(repr(a) for a in typing.get_args(hint))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        sections = [o for o in options if dataclasses.is_dataclass(o)]
        if isinstance(value, dict) and len(sections) == 1:  # errors name the key inside
            return load_section(sections[0], value, key)
        errors = []
        for option in options:
            try:
                return _check(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        names = " or ".join(_name(o) for o in options)
        raise ConfigError(f"{key}: expected {names}, got {type(value).__name__} {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return tuple(_check(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return load_section(hint, value, key)
    return _check_scalar(hint, value, key)


def _name(hint: Any) -> str:
    """How an error message names a type: ``int``, ``'auto'``, ``null``, ``list``."""
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(typing.get_origin(hint) or hint, "__name__", str(hint))


def _check_scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is Any:
        return value
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    # YAML's bool is a subclass of int: never accept it as a number (or a number as a bool).
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
