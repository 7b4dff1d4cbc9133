"""Reading what ``Generator.save_pretrained`` wrote: ``config.json`` (the architecture, the
dtype) and ``generation_config.json`` (the sampling settings), safely and with one-line errors.

Directories written by older aimkit versions load too: their ``config.json`` also holds the
sampling settings, and may hold execution settings that now live in the
:class:`~aimkit.policy.ExecutionPolicy` (dropped, with a warning when a value differed from the
old default).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ._io import read_json
from .config import ComponentSpec, GeneratorConfig, runtime_fields
from .errors import AimkitError, CheckpointError, ConfigError

__all__ = ["CONFIG_NAME", "GENERATION_CONFIG_NAME", "LEGACY_RUNTIME", "SAVE_ID_KEY", "WEIGHTS_NAME", "check_dtype",
           "check_one_save", "read_saved_config", "saved_dtype", "write_saved"]

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
# run-time settings that older aimkit versions kept in component configs -> the policy field now
# holding each (None: removed); dropped when a saved config.json still has them
LEGACY_RUNTIME = {"use_kernels": "scan", "state_dtype": "state_dtype", "chunk_size": "chunk_size",
                   "fused_split_scan": "split_scan", "use_cuda_graph": "decode_graph",
                   "fused_sampling": "sampling", "graph_branches": None}
LEGACY_DEFAULTS = {"use_kernels": "auto", "state_dtype": "float32", "chunk_size": 128, "fused_split_scan": True,
                    "use_cuda_graph": True, "fused_sampling": True, "graph_branches": 1}


def check_dtype(dtype: Any) -> torch.dtype | None:
    """A floating-point ``torch.dtype`` from a dtype or its name (None stays None), or a ConfigError."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if not dtype.startswith("_") else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError("dtype must be a floating-point torch dtype or its name, e.g. 'float32' or 'bfloat16'")
    return dtype


_MAX_CONFIG_BYTES = 4 << 20  # a generator's config.json is a few KB


def _read_json_limited(path: Path) -> Any:
    """A small JSON file (a few KB), read safely: size-limited, nesting-limited, one-line errors."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    if size > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} is {size:,} bytes, not an aimkit config (those are a few KB)")
    try:
        return read_json(path, CheckpointError)
    except RecursionError:
        raise CheckpointError(f"cannot read {path}: its JSON is nested too deeply") from None


def _read_saved_json(directory: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a saved directory, its top-level entries checked."""
    path = directory / CONFIG_NAME
    data = _read_json_limited(path)
    if not isinstance(data, dict) or "generator" not in data:
        raise CheckpointError(f"{path} is not an aimkit config (no 'generator' entry)")
    fmt = data.get("aimkit_format", 1)
    if isinstance(fmt, bool) or fmt != 1:
        raise ConfigError(f"{path}: aimkit_format {fmt!r} is not supported (this aimkit reads format 1)")
    if data.get("dtype") is not None and not isinstance(data["dtype"], str):
        raise ConfigError(f"{path}: dtype must be a dtype name such as 'float32', got {data['dtype']!r}")
    return data


def _drop_legacy_runtime(data: Any, path: Path) -> Any:
    """``data`` (a saved ``generator`` entry) without the run-time settings older aimkit versions
    kept in component configs; a saved value other than the old default gets one warning naming
    the :class:`ExecutionPolicy` field that holds it now."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for kind in ("backbone", "sampler"):
        entry = data.get(kind)
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
            continue
        config = dict(entry["config"])
        for key in [k for k in config if k in LEGACY_RUNTIME]:
            value = config.pop(key)
            if value != LEGACY_DEFAULTS[key]:
                field = LEGACY_RUNTIME[key]
                instead = f"pass policy={{{field!r}: ...}} to aimkit.build" if field else "it was removed"
                warnings.warn(f"{path}: ignoring {kind}.config.{key}={value!r} (an execution setting, "
                              f"no longer part of a saved model); {instead}", stacklevel=4)
        data[kind] = {**entry, "config": config}
    return data


def _read_generation(directory: Path) -> dict[str, Any]:
    """The ``generation`` entry of a saved ``generation_config.json`` ({} when the file is absent:
    directories saved before the split keep those settings in ``config.json``)."""
    path = directory / GENERATION_CONFIG_NAME
    if not path.exists():
        return {}
    data = _read_json_limited(path)
    if not isinstance(data, dict) or not isinstance(data.get("generation"), dict):
        raise CheckpointError(f"{path} is not an aimkit generation config (no 'generation' mapping)")
    return data["generation"]


def read_saved_config(directory: Path) -> GeneratorConfig:
    """The :class:`GeneratorConfig` of a ``save_pretrained`` directory: ``config.json`` (the
    architecture) and ``generation_config.json`` (the sampling settings) when present. A setting
    in both files is an error; an error names the file that holds the bad value."""
    data = _read_saved_json(directory)
    generation = _drop_legacy_runtime(_read_generation(directory), directory / GENERATION_CONFIG_NAME)
    architecture = data["generator"]
    if not isinstance(architecture, dict):
        raise ConfigError(f"{directory / CONFIG_NAME}: the generator config must be a mapping, "
                          f"got {type(architecture).__name__ if architecture is not None else 'None'}")
    both = sorted(set(architecture) & set(generation))
    if both:
        raise ConfigError(f"{directory}: {', '.join(both)} set in both {CONFIG_NAME} and {GENERATION_CONFIG_NAME}; "
                          f"keep one")
    # its own errors name its own file; sizes it depends on (class names per class) come from config.json
    sizes = {k: architecture[k] for k in ("num_classes",) if type(architecture.get(k)) is int}
    _from_dict({**generation, **sizes}, directory / GENERATION_CONFIG_NAME)
    architecture = _drop_legacy_runtime(architecture, directory / CONFIG_NAME)
    config = _from_dict({**architecture, **generation}, directory / CONFIG_NAME)
    _warn_defaulted(architecture, config, directory / CONFIG_NAME)
    return config


def _warn_defaulted(architecture: dict[str, Any], config: GeneratorConfig, path: Path) -> None:
    """One warning naming every architecture setting that ``path`` lacks and the default that took
    its place (``save_pretrained`` writes them all: a gap means an edited file or another writer,
    and a default that differs from the trained value changes the model without a shape error)."""
    generation = runtime_fields(GeneratorConfig, "generation")
    defaulted = {f.name: getattr(config, f.name) for f in dataclasses.fields(GeneratorConfig)
                 if f.name not in generation and f.name not in architecture}
    for kind, entry in architecture.items():
        spec = getattr(config, kind, None)
        if not isinstance(spec, ComponentSpec) or spec.config is None or not isinstance(entry, dict):
            continue
        saved = entry.get("config")
        saved = saved if isinstance(saved, dict) else {}
        defaulted.update({f"{kind}.config.{f.name}": getattr(spec.config, f.name)
                          for f in dataclasses.fields(spec.config) if f.name not in saved})
    if defaulted:
        listed = ", ".join(f"{k}={v.name if isinstance(v, ComponentSpec) else v!r}" for k, v in defaulted.items())
        warnings.warn(f"{path} does not set {listed}: using these defaults. save_pretrained writes every "
                      "setting, so the file was edited or written by another tool; if the model was trained "
                      "with other values, its outputs will be wrong", stacklevel=3)


def _from_dict(data: dict[str, Any], path: Path) -> GeneratorConfig:
    """``GeneratorConfig.from_dict`` whose errors name ``path``: ``/x/config.json: backbone.config.n_head
    must be int, ...``."""
    try:
        return GeneratorConfig.from_dict(data)
    except AimkitError as exc:
        raise type(exc)(f"{path}: {exc}") from None


SAVE_ID_KEY = "aimkit_save_id"  # in config.json, generation_config.json and the safetensors metadata (its one key)


def write_saved(directory: Path, state: dict[str, torch.Tensor], architecture: dict[str, Any],
                generation: dict[str, Any]) -> None:
    """Write a save's three files into ``directory`` (its lock held by the caller): the weights
    ``state``, then ``generation_config.json`` from ``generation``, then ``config.json`` from
    ``architecture``, each atomically and each carrying the save's content id (:func:`check_one_save`).

    ``config.json`` goes last: a reader that sees the new one also sees the new weights. The
    weights' metadata is that one key (safetensors writes several in a random order), so equal
    models save to equal bytes."""
    from ._io import write_text_atomic
    from .weights import content_id, save_safetensors_atomic

    save_id = content_id(state, architecture, generation)
    save_safetensors_atomic(state, directory / WEIGHTS_NAME, metadata={SAVE_ID_KEY: save_id})
    for name, data in ((GENERATION_CONFIG_NAME, generation), (CONFIG_NAME, architecture)):
        write_text_atomic(directory / name, json.dumps({**data, SAVE_ID_KEY: save_id}, indent=2) + "\n")


def check_one_save(directory: Path, weights: Path) -> None:
    """Refuse a folder whose ``config.json``, ``generation_config.json`` and ``weights`` come from
    different ``save_pretrained`` calls (one interrupted between its files, or two saving into one
    folder at once): each file carries the id of the save that wrote it. A file without an id (a
    folder saved before the id existed, weights written by another tool) is not checked, nor is a
    weights file whose header cannot be read (loading it says why)."""
    want = _read_saved_json(directory).get(SAVE_ID_KEY)
    if want is None:
        return
    found = {CONFIG_NAME: want}
    generation = directory / GENERATION_CONFIG_NAME
    if generation.exists():
        data = _read_json_limited(generation)
        found[GENERATION_CONFIG_NAME] = data.get(SAVE_ID_KEY) if isinstance(data, dict) else None
    if weights.is_file() and weights.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as f:
                found[weights.name] = (f.metadata() or {}).get(SAVE_ID_KEY)
        except Exception:  # a damaged or hostile header: the load reports it
            pass
    ids = {value for value in found.values() if value is not None}
    if len(ids) > 1:
        raise CheckpointError(
            f"{directory} holds files of different saves ({', '.join(f'{k}: {v}' for k, v in found.items())}): "
            "a save_pretrained was interrupted or two ran into this folder at once; save the model again")


def saved_dtype(directory: Path) -> torch.dtype | None:
    """The dtype a saved generator was written in (its ``config.json``), or None."""
    saved = _read_saved_json(directory).get("dtype")
    try:
        return check_dtype(saved) if saved else None
    except ConfigError as exc:
        raise ConfigError(f"{directory / CONFIG_NAME}: {exc}") from None


