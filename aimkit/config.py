"""Configs: the toolkit every component's config dataclass uses, and the generator's config.

**The toolkit.** Every config is a small frozen dataclass. Configs nest (the generator's config
holds one per component) and round-trip through plain
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
whether the field is ``runtime`` (changes how a model runs, never its weights:
:func:`runtime_fields`) and whether it is a ``generation`` (sampling) setting.

**The generator's config.** A :class:`GeneratorConfig` names every component by its registry name
(:class:`ComponentSpec`) and carries that component's own config dataclass. It round-trips
through JSON exactly (``to_dict`` / ``from_dict``); ``Generator.save_pretrained`` writes its
architecture to ``config.json`` and its sampling settings (fields declared ``generation=True``)
to ``generation_config.json``.
Inference sizes (batch, cache length) are not part of it: they belong to the inference cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import ConfigError, did_you_mean
from .registry import BACKBONES, CONDITIONING, SAMPLERS, TOKENIZERS, Registry

__all__ = [
    "ComponentSpec", "GeneratorConfig", "SamplingDefaults",
    "check_fields", "check_option", "check_value", "config_from_dict", "config_to_dict", "describe", "option",
    "replace_checked", "runtime_fields",
]

C = TypeVar("C")
_MAX_SHOWN = 60


def _check_keys(cls: type, keys, where: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
        if key not in valid and not valid:
            raise ConfigError(f"unknown {where} option {key!r}: {where} takes no options")
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


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
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
    raise ConfigError(f"{path} must be {_expected(functools.reduce(lambda a, b: a | b, args))}, got {describe(value)}")


def _check_tuple(value: Any, args: tuple, path: str) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path} must be {_expected(tuple[args] if args else tuple)}, got {describe(value)}")
    if not args:
        return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(check_value(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{path} must be {_expected(tuple[args])}, got {describe(value)}")
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
           choices: Sequence[Any] | None = None, low: float | None = None, high: float | None = None,
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


def check_option(cfg: Any, name: str, path: str | None = None) -> Any:
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


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict (tuples become lists)."""
    return dataclasses.asdict(cfg)


def config_from_dict(
    cls: type[C], data: Mapping[str, Any], where: str = "config", path: str | None = None
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


# ---------------------------------------------------------------------- the generator's config

_REGISTRIES: dict[str, Registry] = {
    "tokenizer": TOKENIZERS,
    "backbone": BACKBONES,
    "conditioning": CONDITIONING,
    "sampler": SAMPLERS,
}


@dataclass(frozen=True)
class ComponentSpec:
    """A registered component: its registry ``name`` and its config dataclass (None = defaults)."""

    name: str
    config: Any = None

    def resolved(self, kind: str) -> ComponentSpec:
        """The same spec with ``config`` filled in with the component's default config."""
        cls = _REGISTRIES[kind].get(self.name)
        config_cls = getattr(cls, "config_cls", None)
        if self.config is None and config_cls is not None:
            return ComponentSpec(self.name, config_cls())
        if config_cls is not None and not isinstance(self.config, config_cls):
            raise ConfigError(
                f"{kind} {self.name!r} expects a {config_cls.__name__}, got {type(self.config).__name__}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": None if self.config is None else config_to_dict(self.config)}

    @classmethod
    def from_dict(cls, kind: str, data: Mapping[str, Any], path: str | None = None) -> ComponentSpec:
        """The spec of one ``config.json`` entry: ``{"name": ..., "config": {...} or null}``.

        ``path`` names the entry in messages (default ``kind``)."""
        path = kind if path is None else path
        if not isinstance(data, Mapping) or "name" not in data:
            raise ConfigError(f"{path} must be a mapping with a 'name', got {describe(data)}")
        unknown = sorted(str(k) for k in data if k not in ("name", "config"))
        if unknown:
            raise ConfigError(f"{path} has unknown keys {', '.join(unknown)} (expected 'name' and 'config')")
        name = check_value(data["name"], str, f"{path}.name")
        component = _REGISTRIES[kind].get(name)
        config_cls = getattr(component, "config_cls", None)
        raw = data.get("config")
        config = None
        if config_cls is not None:
            config = config_from_dict(config_cls, {} if raw is None else raw, where=f"{kind} {name!r}",
                                      path=f"{path}.config")
        return cls(name, config)


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling settings a preset recommends (used when the caller does not pass them)."""

    cfg_scale: float = 2.0  # classifier-free guidance scale
    temperature: float = 1.0  # softmax temperature
    top_k: int = 0  # 0 = no top-k filtering
    top_p: float = 1.0  # 1.0 = no nucleus filtering

    def __post_init__(self):
        check_fields(self, "sampling defaults")
        if abs(self.cfg_scale) > 1e4:  # the samplers' MAX_CFG_SCALE (check_fields refused NaN and inf)
            raise ConfigError(f"sampling defaults cfg_scale must be within [-1e4, 1e4], got {self.cfg_scale!r}")
        if self.temperature < 0:
            raise ConfigError(f"sampling defaults temperature must be >= 0, got {self.temperature!r}")
        if self.top_k < 0:
            raise ConfigError(f"sampling defaults top_k must be >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling defaults top_p must be in (0, 1], got {self.top_p!r}")


def check_class_names(names: Sequence[str], num_classes: int) -> None:
    """One name per class, none empty, all different ignoring case and surrounding spaces (class
    names are looked up so), or one :class:`ConfigError` naming the first problem."""
    if len(names) != num_classes:
        raise ConfigError(f"class_names has {len(names)} names but num_classes is {num_classes}")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name.strip():
            raise ConfigError(f"class_names[{i}] is empty; every class needs a name")
        first = seen.setdefault(name.strip().casefold(), i)
        if first != i:
            raise ConfigError(f"class_names[{i}] {name!r} repeats class_names[{first}] {names[first]!r} "
                              "(names must differ, ignoring case)")


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything needed to build a :class:`~aimkit.generator.Generator`.

    Attributes mirror the AiM architecture; defaults are AiM-B's.
    """

    d_model: int = 768  # width D of embeddings and blocks
    n_layer: int = 24  # number of backbone blocks
    vocab_size: int = 16384  # tokenizer codebook size
    num_classes: int = 1000  # real classes; the class table has one more row (null class)
    num_tokens: int = 256  # image tokens per sample (16 x 16 grid)
    # label dropout probability during training (classifier-free guidance)
    class_dropout: float = option(0.1, low=0.0, high=1.0, high_open=True, runtime=True)
    norm_eps: float = 1e-5  # RMSNorm epsilon of blocks and head
    # a learned absolute position table (AiM); False: positions come from the backbone alone (LlamaGen's rotary)
    pos_embed: bool = True
    # the LM head shares the token embedding's weight (AiM); False: its own ``lm_head.weight`` (LlamaGen)
    tie_head: bool = True
    # 0: decode token k at position k as in training; 1: the official sampler (k + 1)
    decode_position_offset: int = option(0, choices=(0, 1), generation=True)
    backbone: ComponentSpec = field(default_factory=lambda: ComponentSpec("mamba2"))
    conditioning: ComponentSpec = field(default_factory=lambda: ComponentSpec("adaln"))
    tokenizer: ComponentSpec | None = field(default_factory=lambda: ComponentSpec("vq-f16"))
    sampler: ComponentSpec = option(default_factory=lambda: ComponentSpec("autoregressive"), generation=True)
    fid_sampling: SamplingDefaults = option(default_factory=SamplingDefaults, generation=True)  # for FID numbers
    pretty_sampling: SamplingDefaults = option(
        default_factory=lambda: SamplingDefaults(cfg_scale=5.0, top_k=600, top_p=0.98), generation=True
    )  # for pictures people look at
    # names of the classes, index = class id (None: unnamed); labels may be given by name
    class_names: tuple[str, ...] | None = option(None, generation=True)

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "num_classes", "num_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("decode_position_offset", "class_dropout"):
            check_option(self, name)
        check_value(self.norm_eps, float, "norm_eps")
        check_value(self.pos_embed, bool, "pos_embed")
        check_value(self.tie_head, bool, "tie_head")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps!r}")
        for kind in _REGISTRIES:
            spec = getattr(self, kind)
            if not isinstance(spec, ComponentSpec) and not (kind == "tokenizer" and spec is None):
                raise ConfigError(f"{kind} must be a ComponentSpec (a registered {kind}), got {describe(spec)}")
        for name in ("fid_sampling", "pretty_sampling"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, config_from_dict(SamplingDefaults, value, where=name))
            elif not isinstance(value, SamplingDefaults):
                raise ConfigError(f"{name} must be SamplingDefaults or a mapping, got {type(value).__name__}")
        self._check_class_names()

    def _check_class_names(self) -> None:
        """``class_names``: None, or ``num_classes`` distinct non-empty strings (distinct ignoring case,
        since labels are looked up by name case-insensitively)."""
        names = check_option(self, "class_names")
        if names is None:
            return
        object.__setattr__(self, "class_names", names)  # a list given becomes a tuple
        check_class_names(names, self.num_classes)

    def generation_dict(self) -> dict[str, Any]:
        """The sampling settings (fields declared ``generation=True``): ``generation_config.json``."""
        generation = runtime_fields(type(self), "generation")
        return {k: v for k, v in self.to_dict().items() if k in generation}

    def architecture_dict(self) -> dict[str, Any]:
        """Everything but the sampling settings: ``config.json``."""
        generation = runtime_fields(type(self), "generation")
        return {k: v for k, v in self.to_dict().items() if k not in generation}

    def weights_layout(self) -> dict[str, Any]:
        """:meth:`to_dict` without the run-time fields (declared ``option(..., runtime=True)``, here
        and in every component's config): two configs with equal layouts take the same weights."""
        layout: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in runtime_fields(type(self)):
                continue
            value = getattr(self, f.name)
            if isinstance(value, ComponentSpec):
                value = value.to_dict()
                if value["config"] is not None:
                    runtime = runtime_fields(type(getattr(self, f.name).config))
                    value["config"] = {k: v for k, v in value["config"].items() if k not in runtime}
            layout[f.name] = value
        return layout

    def resolved(self) -> GeneratorConfig:
        """Fill every component's config with its defaults (looks the names up in the registries)."""
        return dataclasses.replace(
            self,
            backbone=self.backbone.resolved("backbone"),
            conditioning=self.conditioning.resolved("conditioning"),
            tokenizer=None if self.tokenizer is None else self.tokenizer.resolved("tokenizer"),
            sampler=self.sampler.resolved("sampler"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ComponentSpec):
                value = value.to_dict()
            elif isinstance(value, SamplingDefaults):
                value = config_to_dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GeneratorConfig:
        """The config of a ``config.json``'s ``generator`` entry, every value type-checked.

        Raises:
            ConfigError: one line naming the key path, e.g. ``backbone.config.n_head must be int,
                got '4' (str)``.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"the generator config must be a mapping, got {describe(data)}")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = [str(k) for k in data if k not in valid]
        if unknown:
            raise ConfigError(f"unknown generator config keys: {', '.join(sorted(unknown))}")
        hints = _type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "tokenizer" and value is None:
                pass  # a tokens-only generator
            elif key in _REGISTRIES:
                value = ComponentSpec.from_dict(key, value)
            elif key in ("fid_sampling", "pretty_sampling"):
                value = config_from_dict(SamplingDefaults, value, where=key, path=key)
            else:
                value = check_value(value, hints[key], key)
            kwargs[key] = value
        return cls(**kwargs)
