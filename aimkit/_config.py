"""Helpers for the small frozen dataclass configs that every component carries.

Configs nest (the generator's config holds one per component) and round-trip through plain
JSON dictionaries. Unknown keys are an error that names the closest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Dict, Mapping, Type, TypeVar

from .errors import ConfigError

__all__ = ["config_from_dict", "config_to_dict", "replace_checked"]

C = TypeVar("C")


def _check_keys(cls: type, keys, where: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown {where} option {key!r}{hint} Valid options: {', '.join(valid)}"
            )


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """A dataclass config as a JSON-ready dict (tuples become lists)."""
    return dataclasses.asdict(cfg)


def config_from_dict(cls: Type[C], data: Mapping[str, Any], where: str = "config") -> C:
    """Build ``cls`` from a dict, rejecting unknown keys with a clear message."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    _check_keys(cls, data.keys(), where)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            if isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
    return cls(**kwargs)


def replace_checked(cfg: C, where: str = "config", **changes: Any) -> C:
    """``dataclasses.replace`` that names unknown fields instead of a TypeError."""
    _check_keys(type(cfg), changes.keys(), where)
    return dataclasses.replace(cfg, **changes)
