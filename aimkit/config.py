"""Configuration records of a generator: one small frozen dataclass per component, nested.

A :class:`GeneratorConfig` names every component by its registry name (:class:`ComponentSpec`)
and carries that component's own config dataclass. It round-trips through JSON exactly
(``to_dict`` / ``from_dict``), which is what ``Generator.save_pretrained`` writes to ``config.json``.
Inference sizes (batch, cache length) are not part of it: they belong to the inference cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from ._config import (
    _type_hints,
    check_fields,
    check_option,
    check_value,
    config_from_dict,
    config_to_dict,
    describe,
    option,
    runtime_fields,
)
from .errors import ConfigError
from .registry import BACKBONES, CONDITIONING, SAMPLERS, TOKENIZERS, Registry

__all__ = ["ComponentSpec", "SamplingDefaults", "GeneratorConfig"]

_REGISTRIES: Dict[str, Registry] = {
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

    def resolved(self, kind: str) -> "ComponentSpec":
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

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "config": None if self.config is None else config_to_dict(self.config)}

    @classmethod
    def from_dict(cls, kind: str, data: Mapping[str, Any], path: Optional[str] = None) -> "ComponentSpec":
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
        if self.temperature < 0:
            raise ConfigError(f"sampling defaults temperature must be >= 0, got {self.temperature!r}")
        if self.top_k < 0:
            raise ConfigError(f"sampling defaults top_k must be >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling defaults top_p must be in (0, 1], got {self.top_p!r}")


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
    # 0: decode token k at position k as in training; 1: the official sampler (k + 1)
    decode_position_offset: int = option(0, choices=(0, 1), generation=True)
    backbone: ComponentSpec = field(default_factory=lambda: ComponentSpec("mamba2"))
    conditioning: ComponentSpec = field(default_factory=lambda: ComponentSpec("adaln"))
    tokenizer: Optional[ComponentSpec] = field(default_factory=lambda: ComponentSpec("vq-f16"))
    sampler: ComponentSpec = option(default_factory=lambda: ComponentSpec("autoregressive"), generation=True)
    fid_sampling: SamplingDefaults = option(default_factory=SamplingDefaults, generation=True)  # for FID numbers
    pretty_sampling: SamplingDefaults = option(
        default_factory=lambda: SamplingDefaults(cfg_scale=5.0, top_k=600, top_p=0.98), generation=True
    )  # for pictures people look at

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "num_classes", "num_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("decode_position_offset", "class_dropout"):
            check_option(self, name)
        check_value(self.norm_eps, float, "norm_eps")
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

    def generation_dict(self) -> Dict[str, Any]:
        """The sampling settings (fields declared ``generation=True``): ``generation_config.json``."""
        generation = runtime_fields(type(self), "generation")
        return {k: v for k, v in self.to_dict().items() if k in generation}

    def architecture_dict(self) -> Dict[str, Any]:
        """Everything but the sampling settings: ``config.json``."""
        generation = runtime_fields(type(self), "generation")
        return {k: v for k, v in self.to_dict().items() if k not in generation}

    def weights_layout(self) -> Dict[str, Any]:
        """:meth:`to_dict` without the run-time fields (declared ``option(..., runtime=True)``, here
        and in every component's config): two configs with equal layouts take the same weights."""
        layout: Dict[str, Any] = {}
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

    def resolved(self) -> "GeneratorConfig":
        """Fill every component's config with its defaults (looks the names up in the registries)."""
        return dataclasses.replace(
            self,
            backbone=self.backbone.resolved("backbone"),
            conditioning=self.conditioning.resolved("conditioning"),
            tokenizer=None if self.tokenizer is None else self.tokenizer.resolved("tokenizer"),
            sampler=self.sampler.resolved("sampler"),
        )

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ComponentSpec):
                value = value.to_dict()
            elif isinstance(value, SamplingDefaults):
                value = config_to_dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GeneratorConfig":
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
        kwargs: Dict[str, Any] = {}
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
