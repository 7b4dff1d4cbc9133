"""Helpers for the small frozen dataclass configs that every component carries.

Configs nest (the generator's config holds one per component) and round-trip through plain
JSON dictionaries. Unknown keys are an error that names the closest valid keys, and every value
is checked against its field's annotation before the dataclass is built, so a hand-edited or
corrupt ``config.json`` gives one line naming the key (``backbone.config.n_head must be int,
got '4' (str)``) instead of a traceback from deep inside a constructor:

* ``int`` is an int, never a bool, a float or a string;
* ``float`` is a finite int or float (never a bool, NaN or infinity);
* ``bool`` is ``True`` / ``False``; ``str`` is a string;
* ``Optional[X]`` allows ``None``, nothing else does;
* ``Tuple[X, Y]`` is a list or tuple of exactly that length, ``Tuple[X, ...]`` of any length,
  each element checked (JSON lists become tuples);
* annotations it does not know (``Any``, plugin types) are not checked.

Fields declared with :func:`option` carry their rules as metadata, checked by the same
:func:`check_fields`: ``choices``, a range (``low`` / ``high``, each inclusive unless ``*_open``),
and whether the field is ``runtime`` (changes how a model runs, never its weights:
:func:`runtime_fields`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Dict, Mapping, Optional, Sequence, Type, TypeVar

from .errors import ConfigError, did_you_mean

__all__ = [
    "check_fields", "check_option", "check_value", "config_from_dict", "config_to_dict", "describe", "option",
    "replace_checked", "runtime_fields",
]

C = TypeVar("C")
_MAX_SHOWN = 60


def _check_keys(cls: type, keys, where: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
        if key not in valid:
            hint = did_you_mean(key, valid)
            raise ConfigError(
                f"unknown {where} option {key!r}{hint} Valid options: {', '.join(valid)}"
            )


def describe(value: Any) -> str:
    """``'4' (str)``: a value and its type for a message, shortened to one short line."""
    text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return f"{text} ({type(value).__name__})"


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> Dict[str, Any]:
    """The resolved annotations of a dataclass (string annotations evaluated), cached per class."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001  (an annotation that cannot be resolved is simply not checked)
        return {}


def _expected(annotation: Any) -> str:
    """How a message names what an annotation accepts."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is float:
        return "a finite float"
    if annotation in (int, bool, str):
        return annotation.__name__
    if origin in (typing.Union, types.UnionType):
        names = [_expected(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(_expected(args[0]))}"
        if len(set(args)) == 1:
            return f"a list of {len(args)} {_plural(_expected(args[0]))}"
        return f"a list of {len(args)} values ({', '.join(_expected(a) for a in args)})"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    return getattr(annotation, "__name__", str(annotation))


def _plural(name: str) -> str:
    return (name[2:] if name.startswith("a ") else name) + "s"


def _check_scalar(value: Any, annotation: type, path: str) -> Any:
    if annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            ok = ok and math.isfinite(value)
        except OverflowError:  # an int too large for a float
            ok = False
    else:  # str
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{path} must be {_expected(annotation)}, got {describe(value)}")
    return value


def _check_union(value: Any, args: tuple, path: str) -> Any:
    options = [a for a in args if a is not type(None)]
    if value is None and len(options) < len(args):
        return None
    for option in options:
        try:
            return check_value(value, option, path)
        except ConfigError:
            continue
    raise ConfigError(f"{path} must be {_expected(typing.Union[args])}, got {describe(value)}")


def _check_tuple(value: Any, args: tuple, path: str) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path} must be {_expected(typing.Tuple[args] if args else tuple)}, got {describe(value)}")
    if not args:
        return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(check_value(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{path} must be {_expected(typing.Tuple[args])}, got {describe(value)}")
    return tuple(check_value(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def check_value(value: Any, annotation: Any, path: str) -> Any:
    """``value`` checked against a type annotation; returns it (lists become tuples for tuple fields).

    Raises:
        ConfigError: ``"{path} must be int, got '4' (str)"``.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (bool, int, float, str):
        return _check_scalar(value, annotation, path)
    if origin in (typing.Union, types.UnionType):
        return _check_union(value, args, path)
    if annotation is tuple or origin is tuple:
        return _check_tuple(value, args, path)
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise ConfigError(f"{path} must be {_expected(annotation)}, got {describe(value)}")
        return value
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if isinstance(value, Mapping):
            return config_from_dict(annotation, value, where=path, path=path)
        raise ConfigError(f"{path} must be a mapping of {annotation.__name__} options, got {describe(value)}")
    return value  # Any, or an annotation this checker does not know


def check_fields(cfg: Any, where: str) -> None:
    """Check every field of a dataclass instance against its annotation (for ``__post_init__``).

    Lists given for tuple fields are stored as tuples (also on frozen dataclasses); fields
    declared with :func:`option` are checked against their choices and range too."""
    hints = _type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if f.name not in hints:
            continue
        value = getattr(cfg, f.name)
        checked = check_value(value, hints[f.name], f"{where} {f.name}")
        if checked is not value:
            object.__setattr__(cfg, f.name, checked)
        if "aimkit" in f.metadata:
            _check_rules(checked, f.metadata["aimkit"], f"{where} {f.name}")


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           choices: Optional[Sequence[Any]] = None, low: Optional[float] = None, high: Optional[float] = None,
           low_open: bool = False, high_open: bool = False, runtime: bool = False, generation: bool = False) -> Any:
    """A dataclass field with its rules as metadata (checked by :func:`check_fields`).

    Args:
        default, default_factory: as for :func:`dataclasses.field`.
        choices: the allowed values.
        low, high: the allowed range; ``low_open`` / ``high_open`` exclude the bound itself.
        runtime: the field changes how a model runs, never the shapes or meaning of its weights.
        generation: a sampling setting, saved apart from the architecture (implies ``runtime``).
    """
    meta = {"choices": None if choices is None else tuple(choices), "low": low, "high": high,
            "low_open": low_open, "high_open": high_open, "runtime": runtime or generation,
            "generation": generation}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"aimkit": meta})


def _check_rules(value: Any, meta: Mapping[str, Any], path: str) -> None:
    """Check ``value`` against an :func:`option`'s choices and range (None passes: Optional)."""
    if value is None:
        return
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"{path} must be one of {list(meta['choices'])}, got {describe(value)}")
    low, high = meta["low"], meta["high"]
    below = low is not None and (value <= low if meta["low_open"] else value < low)
    above = high is not None and (value >= high if meta["high_open"] else value > high)
    if below or above:
        raise ConfigError(f"{path} must be {_range_text(meta)}, got {describe(value)}")


def _range_text(meta: Mapping[str, Any]) -> str:
    """``"in [0, 1)"``, ``">= 1"`` or ``"< 2"``: how a message names an :func:`option`'s range."""
    low, high = meta["low"], meta["high"]
    if low is not None and high is not None:
        return f"in {'(' if meta['low_open'] else '['}{low:g}, {high:g}{')' if meta['high_open'] else ']'}"
    if low is not None:
        return f"{'>' if meta['low_open'] else '>='} {low:g}"
    return f"{'<' if meta['high_open'] else '<='} {high:g}"


def check_option(cfg: Any, name: str, path: Optional[str] = None) -> Any:
    """Check one field of a dataclass instance (its type, and its :func:`option` rules); returns the value."""
    value = check_value(getattr(cfg, name), _type_hints(type(cfg))[name], path or name)
    meta = next(f.metadata for f in dataclasses.fields(cfg) if f.name == name).get("aimkit")
    if meta is not None:
        _check_rules(value, meta, path or name)
    return value


def runtime_fields(cls: type, kind: str = "runtime") -> frozenset:
    """Names of the fields of dataclass ``cls`` declared ``option(..., runtime=True)`` (or, with
    ``kind="generation"``, ``option(..., generation=True)``)."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("aimkit", {}).get(kind))


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """A dataclass config as a JSON-ready dict (tuples become lists)."""
    return dataclasses.asdict(cfg)


def config_from_dict(
    cls: Type[C], data: Mapping[str, Any], where: str = "config", path: Optional[str] = None
) -> C:
    """Build ``cls`` from a dict, rejecting unknown keys and values of the wrong type.

    Args:
        cls: the config dataclass.
        data: its options by name (missing ones keep their defaults).
        where: what the options belong to, for unknown-key messages (``"backbone 'mamba2'"``).
        path: key path of ``data`` in its file, for value messages (``"backbone.config"``);
            default ``where``.

    Raises:
        ConfigError: one line naming the key, e.g. ``backbone.config.n_head must be int, got '4' (str)``.
    """
    path = where if path is None else path
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must be a mapping, got {describe(data)}")
    _check_keys(cls, data.keys(), where)
    hints = _type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            if f.name in hints:
                value = check_value(value, hints[f.name], f"{path}.{f.name}")
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def replace_checked(cfg: C, where: str = "config", **changes: Any) -> C:
    """``dataclasses.replace`` that names unknown fields and checks the new values' types."""
    _check_keys(type(cfg), changes.keys(), where)
    hints = _type_hints(type(cfg))
    checked = {k: check_value(v, hints[k], f"{where} option {k}") if k in hints else v for k, v in changes.items()}
    return dataclasses.replace(cfg, **checked)
