"""``aimkit.build``: presets, overrides, saved directories and pretrained weights in one call."""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from ._config import replace_checked
from ._io import read_json
from .config import ComponentSpec, GeneratorConfig, _REGISTRIES
from .errors import CheckpointError, ConfigError
from .generator import CONFIG_NAME, Generator
from .registry import GENERATORS

__all__ = ["build", "resolve_config", "load_weights_into"]

log = logging.getLogger(__name__)
_COMPONENT_KINDS = ("backbone", "conditioning", "tokenizer", "sampler")
_SCALARS = [f.name for f in dataclasses.fields(GeneratorConfig) if f.name not in _COMPONENT_KINDS]

PathLike = Union[str, os.PathLike]


def _apply_overrides(config: GeneratorConfig, overrides: Dict[str, Any], where: str) -> GeneratorConfig:
    """Route flat keyword overrides to the generator config or to the one component that owns them.

    ``backbone="transformer"`` swaps a component (its config resets to that component's defaults);
    ``tokenizer=None`` builds a tokens-only generator; ``d_state=64`` goes to whichever component
    config has a ``d_state`` field; ``backbone__d_state=64`` names the component explicitly.
    """
    top = {k: v for k, v in overrides.items() if k in _SCALARS}
    swaps = {k: v for k, v in overrides.items() if k in _COMPONENT_KINDS}
    rest = {k: v for k, v in overrides.items() if k not in top and k not in swaps}
    changes: Dict[str, Any] = dict(top)
    for kind, value in swaps.items():
        if value is None:
            if kind != "tokenizer":
                raise ConfigError(f"{kind} cannot be None")
            changes[kind] = None
        elif isinstance(value, ComponentSpec):
            changes[kind] = value
        elif isinstance(value, str):
            _REGISTRIES[kind].get(value)  # raises with suggestions when unknown
            current = getattr(config, kind)
            keep = current is not None and current.name == value
            changes[kind] = current if keep else ComponentSpec(value)
        else:
            raise ConfigError(f"{kind} must be a registered {kind} name, got {value!r}")
    config = dataclasses.replace(config, **changes).resolved()

    per_component: Dict[str, Dict[str, Any]] = {k: {} for k in _COMPONENT_KINDS}
    for key, value in rest.items():
        if "__" in key:
            kind, field = key.split("__", 1)
            if kind not in _COMPONENT_KINDS:
                raise ConfigError(f"unknown option {key!r} for {where}: {kind!r} is not a component kind")
            per_component[kind][field] = value
            continue
        owners = [
            kind
            for kind in _COMPONENT_KINDS
            if getattr(config, kind) is not None
            and getattr(config, kind).config is not None
            and key in {f.name for f in dataclasses.fields(getattr(config, kind).config)}
        ]
        if not owners:
            valid = _SCALARS + list(_COMPONENT_KINDS)
            for kind in _COMPONENT_KINDS:
                spec = getattr(config, kind)
                if spec is not None and spec.config is not None:
                    valid += [f.name for f in dataclasses.fields(spec.config)]
            import difflib

            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown option {key!r} for {where}{hint}")
        if len(owners) > 1:
            raise ConfigError(
                f"option {key!r} is ambiguous for {where} (fields of {', '.join(owners)}); "
                f"write e.g. {owners[0]}__{key}={value!r}"
            )
        per_component[owners[0]][key] = value
    for kind, fields in per_component.items():
        if not fields:
            continue
        spec = getattr(config, kind)
        if spec is None or spec.config is None:
            raise ConfigError(f"{where} has no {kind} options to set ({', '.join(fields)})")
        new_cfg = replace_checked(spec.config, where=f"{kind} {spec.name!r}", **fields)
        config = dataclasses.replace(config, **{kind: ComponentSpec(spec.name, new_cfg)})
    return config


# fields that change how a model runs, never the shapes or meaning of its weights
_RUNTIME_FIELDS = {"use_kernels", "state_dtype", "chunk_size", "fused_split_scan"}
_RUNTIME_TOP = {"decode_position_offset", "fid_sampling", "pretty_sampling", "sampler", "class_dropout"}


def _same_weights_layout(a: GeneratorConfig, b: GeneratorConfig) -> bool:
    """True when two configs take the same weights (they differ only in run-time settings)."""

    def strip(cfg: GeneratorConfig) -> Dict[str, Any]:
        data = cfg.to_dict()
        for key in _RUNTIME_TOP:
            data.pop(key, None)
        for kind in ("backbone", "conditioning", "tokenizer"):
            spec = data.get(kind)
            if spec and spec.get("config"):
                spec["config"] = {k: v for k, v in spec["config"].items() if k not in _RUNTIME_FIELDS}
        return data

    return strip(a) == strip(b)


def _check_dtype(dtype: Any) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if not dtype.startswith("_") else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError("dtype must be a floating-point torch dtype or its name, e.g. 'float32' or 'bfloat16'")
    return dtype


def _check_device(device: Any) -> Optional[torch.device]:
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but no CUDA device is available")
    return device


def _read_saved_config(directory: Path) -> GeneratorConfig:
    data = read_json(directory / CONFIG_NAME, CheckpointError)
    if not isinstance(data, dict) or "generator" not in data:
        raise CheckpointError(f"{directory / CONFIG_NAME} is not an aimkit config (no 'generator' entry)")
    return GeneratorConfig.from_dict(data["generator"])


def resolve_config(name_or_path: PathLike, **overrides: Any) -> GeneratorConfig:
    """The :class:`GeneratorConfig` that :func:`build` would use (nothing is allocated)."""
    path = Path(name_or_path)
    if isinstance(name_or_path, (str, os.PathLike)) and (path / CONFIG_NAME).is_file():
        config, where = _read_saved_config(path), str(path)
    else:
        if not isinstance(name_or_path, str):
            raise ConfigError(f"expected a preset name or a saved directory, got {name_or_path!r}")
        if os.sep in name_or_path or path.exists():
            raise ConfigError(f"{name_or_path!r} is not a directory written by Generator.save_pretrained")
        config, where = GENERATORS.get(name_or_path)(), name_or_path
    return _apply_overrides(config, overrides, where)


def _resolve_pretrained(name: str, pretrained: Any) -> Optional[Path]:
    """Turn ``pretrained`` into a local file or directory (downloading through the hub cache)."""
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        from .presets import PUBLISHED_WEIGHTS

        if name not in PUBLISHED_WEIGHTS:
            raise ConfigError(f"no published weights are known for {name!r}; pass a path instead")
        record = PUBLISHED_WEIGHTS[name]
        return _hub_download(record.repo_id, record.filename)
    text = os.fspath(pretrained)
    if text.startswith("hf-hub:"):
        repo, _, filename = text[len("hf-hub:"):].partition("@")
        return _hub_download(repo, filename or None)
    path = Path(text).expanduser()
    if not path.exists():
        raise CheckpointError(f"pretrained weights not found: {path}")
    return path


def _hub_download(repo_id: str, filename: Optional[str]) -> Path:
    """Fetch through huggingface_hub (its cache and HF_HUB_OFFLINE are respected)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConfigError("pretrained weights from the hub need huggingface_hub: pip install huggingface_hub")
    errors = []
    for candidate in [filename] if filename else ["model.safetensors", "pytorch_model.bin"]:
        try:
            return Path(hf_hub_download(repo_id, candidate))
        except Exception as exc:  # hub errors come in many types
            errors.append(f"{candidate}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise CheckpointError(f"could not get weights from hub repo {repo_id!r} ({'; '.join(errors)})")


def load_weights_into(gen: Generator, path: PathLike) -> None:
    """Load official-layout or aimkit-layout weights into ``gen`` strictly, reporting absent parts."""
    from .official import from_official, is_official
    from .weights import read_state_dict

    state = read_state_dict(path)
    if is_official(state):
        state = from_official(gen, state)
    missing_parts = gen.load_aimkit_state_dict(state, source=str(path))
    for part in missing_parts:
        warnings.warn(f"{path} holds no {part} weights; the {part} keeps its random initialisation", stacklevel=3)


def build(
    name_or_path: PathLike,
    *,
    pretrained: Any = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[Union[str, torch.dtype]] = None,
    tokenizer_weights: Optional[PathLike] = None,
    **overrides: Any,
) -> Generator:
    """Build a generator from a preset name or a ``save_pretrained`` directory.

    Args:
        name_or_path: a registered preset (``"aim-xl"``, see :func:`aimkit.list_models`) or a directory
            holding ``config.json`` + ``model.safetensors`` written by ``Generator.save_pretrained``.
        pretrained: None (random weights, or a preset's embedded weights where it ships some), False
            (always random), True (the preset's published weights through the hub cache),
            ``"hf-hub:ORG/NAME"``, or a local file/directory (official AiM or aimkit layout).
        device: where to build (``"cuda"``, ``"cpu"``); default CPU.
        dtype: parameter dtype (``torch.bfloat16`` or ``"bfloat16"``); default float32.
        tokenizer_weights: LlamaGen's ``vq_ds16_c2i.pt`` (or any tokenizer-only file) loaded separately.
        **overrides: architecture overrides, e.g. ``d_model=64, n_layer=3, num_groups=2``.

    Returns:
        A :class:`Generator` in eval mode.
    """
    dtype = _check_dtype(dtype)
    device = _check_device(device)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ConfigError(f"expected a preset name or a saved directory, got {name_or_path!r}")
    config = resolve_config(name_or_path, **overrides)
    saved_dir = Path(os.fspath(name_or_path))
    saved_dir = saved_dir if (saved_dir / CONFIG_NAME).is_file() else None
    if dtype is None and saved_dir is not None:  # a saved generator comes back in the dtype it was saved in
        saved = read_json(saved_dir / CONFIG_NAME, CheckpointError).get("dtype")
        dtype = _check_dtype(saved) if saved else None
    gen = Generator(config, device=device, dtype=dtype)
    weights = _resolve_pretrained(str(name_or_path), pretrained)
    if weights is None and saved_dir is not None and pretrained is not False:
        weights = saved_dir
    if weights is None and pretrained is None and isinstance(name_or_path, str) and saved_dir is None:
        from .assets import embedded_weights

        shipped = embedded_weights(name_or_path)
        if shipped is not None and _same_weights_layout(config, resolve_config(name_or_path)):
            weights = shipped
        elif shipped is not None:
            warnings.warn(
                f"the overrides change the architecture of {name_or_path}, so its shipped weights are not "
                "loaded and the model is random; pass pretrained=False to say so explicitly",
                stacklevel=2,
            )
    if weights is not None:
        load_weights_into(gen, weights)
    if tokenizer_weights is not None:
        if gen.tokenizer is None:
            raise ConfigError("tokenizer_weights given, but this generator has no tokenizer")
        gen.tokenizer.load_weights(tokenizer_weights)
    return gen.eval()
