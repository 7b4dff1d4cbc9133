"""``aimkit.build``: presets, overrides, saved directories and pretrained weights in one call."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ._saved import CONFIG_NAME, LEGACY_RUNTIME, check_dtype, check_one_save, read_saved_config, saved_dtype
from .config import _REGISTRIES, ComponentSpec, GeneratorConfig, replace_checked
from .errors import AimkitError, CheckpointError, ConfigError, did_you_mean
from .generator import Generator
from .hub import HUB_PREFIX
from .policy import ExecutionPolicy
from .registry import GENERATORS

__all__ = ["build", "resolve_config", "load_weights_into"]

log = logging.getLogger(__name__)
_COMPONENT_KINDS = ("backbone", "conditioning", "tokenizer", "sampler")
_SCALARS = [f.name for f in dataclasses.fields(GeneratorConfig) if f.name not in _COMPONENT_KINDS]

PathLike = str | os.PathLike
_POLICY_FIELDS = {f.name for f in dataclasses.fields(ExecutionPolicy)}
_SAMPLING = ("fid_sampling", "pretty_sampling")


def _swap_component(config: GeneratorConfig, kind: str, value: Any) -> ComponentSpec | None:
    """The spec for ``kind=value``: None (tokens only), a spec, or a registry name (kept with its
    config when it names the current component, else that component's defaults)."""
    if value is None:
        if kind != "tokenizer":
            raise ConfigError(f"{kind} cannot be None")
        return None
    if isinstance(value, ComponentSpec):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{kind} must be a registered {kind} name, got {value!r}")
    _REGISTRIES[kind].get(value)  # raises with suggestions when unknown
    current = getattr(config, kind)
    return current if current is not None and current.name == value else ComponentSpec(value)


def _component_fields(config: GeneratorConfig, kind: str) -> set:
    spec = getattr(config, kind)
    return set() if spec is None or spec.config is None else {f.name for f in dataclasses.fields(spec.config)}


def _owner_of(config: GeneratorConfig, key: str, value: Any, where: str) -> str:
    """The one component kind whose config has field ``key`` (or the error that says why not)."""
    owners = [kind for kind in _COMPONENT_KINDS if key in _component_fields(config, kind)]
    if len(owners) == 1:
        return owners[0]
    if owners:
        raise ConfigError(f"option {key!r} is ambiguous for {where} (fields of {', '.join(owners)}); "
                          f"write e.g. {owners[0]}__{key}={value!r}")
    if key in _POLICY_FIELDS or key in LEGACY_RUNTIME:
        field = LEGACY_RUNTIME.get(key, key)
        raise ConfigError(f"{key!r} is an execution setting, not part of the architecture: pass "
                          f"policy={{{field!r}: ...}} (aimkit.ExecutionPolicy) instead")
    fields = set().union(*(_component_fields(config, k) for k in _COMPONENT_KINDS))
    valid = _SCALARS + list(_COMPONENT_KINDS) + sorted(fields)
    raise ConfigError(f"unknown option {key!r} for {where}{did_you_mean(key, valid, cutoff=0.6)}")


def _merged_sampling(config: GeneratorConfig, key: str, value: Any) -> Any:
    """``fid_sampling={"cfg_scale": 4.0}``: the current settings with those fields changed (the
    others keep the preset's values); any other override as given."""
    if key not in _SAMPLING or not isinstance(value, Mapping):
        return value
    return replace_checked(getattr(config, key), where=key, **value)


def _apply_overrides(config: GeneratorConfig, overrides: dict[str, Any], where: str) -> GeneratorConfig:
    """Route flat keyword overrides to the generator config or to the one component that owns them.

    ``backbone="transformer"`` swaps a component (its config resets to that component's defaults);
    ``tokenizer=None`` builds a tokens-only generator; ``d_state=64`` goes to whichever component
    config has a ``d_state`` field; ``backbone__d_state=64`` names the component explicitly.
    """
    changes = {k: _merged_sampling(config, k, v) for k, v in overrides.items() if k in _SCALARS}
    if changes.get("num_classes", config.num_classes) != config.num_classes and "class_names" not in changes:
        changes["class_names"] = None  # the preset's names belong to the classes being replaced
    changes.update({k: _swap_component(config, k, v) for k, v in overrides.items() if k in _COMPONENT_KINDS})
    config = dataclasses.replace(config, **changes).resolved()
    per_component: dict[str, dict[str, Any]] = {k: {} for k in _COMPONENT_KINDS}
    for key, value in overrides.items():
        if key in changes:
            continue
        kind, field = key.split("__", 1) if "__" in key else (_owner_of(config, key, value, where), key)
        if kind not in _COMPONENT_KINDS:
            raise ConfigError(f"unknown option {key!r} for {where}: {kind!r} is not a component kind")
        per_component[kind][field] = value
    for kind, fields in per_component.items():
        if not fields:
            continue
        spec = getattr(config, kind)
        if spec is None or spec.config is None:
            raise ConfigError(f"{where} has no {kind} options to set ({', '.join(fields)})")
        new_cfg = replace_checked(spec.config, where=f"{kind} {spec.name!r}", **fields)
        config = dataclasses.replace(config, **{kind: ComponentSpec(spec.name, new_cfg)})
    return config


def _same_weights_layout(a: GeneratorConfig, b: GeneratorConfig) -> bool:
    """True when two configs take the same weights (they differ only in run-time settings)."""
    return a.resolved().weights_layout() == b.resolved().weights_layout()


def _check_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but no CUDA device is available")
    return device


def resolve_config(name_or_path: PathLike, **overrides: Any) -> GeneratorConfig:
    """The :class:`GeneratorConfig` that :func:`build` would use (nothing is allocated).

    ``"hf-hub:org/name"`` reads the ``config.json`` + ``generation_config.json`` of a generator
    saved on the Hub (through the hub cache; the weights are not fetched)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ConfigError(f"expected a preset name or a saved directory, got {name_or_path!r}")
    name_or_path = _hub_model_dir(name_or_path, config_only=True) or name_or_path
    path = Path(name_or_path)
    if (path / CONFIG_NAME).is_file():
        config, where = read_saved_config(path), str(path)
    else:
        if (path / CONFIG_NAME).exists():
            raise ConfigError(f"{path / CONFIG_NAME} is not a regular file")
        # a folder that is not a saved model (a run's output, say) does not hide a preset of its name
        preset = isinstance(name_or_path, str) and os.sep not in name_or_path and name_or_path in GENERATORS
        if not preset and (not isinstance(name_or_path, str) or os.sep in name_or_path or path.exists()):
            what = "does not exist" if not path.exists() else "is not a directory written by Generator.save_pretrained"
            raise ConfigError(f"{os.fspath(name_or_path)!r} {what} (and is not a preset name)")
        config, where = GENERATORS.get(name_or_path)(), name_or_path
    return _apply_overrides(config, overrides, where)


def _hub_model_dir(name_or_path: Any, config_only: bool = False) -> Path | None:
    """The local snapshot of ``"hf-hub:org/name"`` (a generator saved on the Hub), else None."""
    if not (isinstance(name_or_path, str) and name_or_path.startswith(HUB_PREFIX)):
        return None
    from .hub import download_model

    return download_model(name_or_path[len(HUB_PREFIX):], config_only=config_only)


def _check_hub_architecture(pretrained: Any, config: GeneratorConfig, where: str) -> None:
    """With ``pretrained="hf-hub:org/name"``, an aimkit ``config.json`` in that repository must
    describe the architecture being built (a config.json of another library is not compared)."""
    text = pretrained if isinstance(pretrained, str) else ""
    repo, _, filename = text[len(HUB_PREFIX):].partition("@")
    if not text.startswith(HUB_PREFIX) or filename:
        return
    from .hub import architecture_differences, hub_saved_config

    saved = hub_saved_config(repo)
    differences = [] if saved is None else architecture_differences(config, saved)
    if differences:
        raise ConfigError(
            f"the weights in {text} are for another architecture than {where} ({'; '.join(differences)}; "
            f"this build vs {CONFIG_NAME} there); build that model as saved with aimkit.build({text!r})"
        )


def _resolve_pretrained(name: str, pretrained: Any) -> Path | None:
    """Turn ``pretrained`` into a local file or directory (downloading through the hub cache)."""
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        from .assets import embedded_weights
        from .presets import PUBLISHED_WEIGHTS

        shipped = embedded_weights(name)
        if shipped is not None:  # a preset whose weights ship inside the package
            return shipped
        if name not in PUBLISHED_WEIGHTS:
            raise ConfigError(f"no published weights are known for {name!r}; pass a path instead")
        record = PUBLISHED_WEIGHTS[name]
        return _hub_download(record.repo_id, record.filename)
    if not isinstance(pretrained, (str, os.PathLike)):
        raise ConfigError(f"pretrained must be None, False, True, 'hf-hub:ORG/NAME' or a path, got {pretrained!r}")
    text = os.fspath(pretrained)
    if text.startswith(HUB_PREFIX):
        repo, _, filename = text[len(HUB_PREFIX):].partition("@")
        return _hub_download(repo, filename or None)
    path = Path(text).expanduser()
    if not path.exists():
        raise CheckpointError(f"pretrained weights not found: {path}")
    return path


def _hub_download(repo_id: str, filename: str | None) -> Path:
    """Fetch through huggingface_hub (its cache and HF_HUB_OFFLINE are respected)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConfigError("pretrained weights from the hub need huggingface_hub: pip install huggingface_hub") from None
    from .hub import _hub_reason, hub_unreachable

    errors, offline = [], hub_unreachable()
    for candidate in [filename] if filename else ["model.safetensors", "pytorch_model.bin"]:
        try:
            return Path(hf_hub_download(repo_id, candidate, local_files_only=offline))
        except Exception as exc:  # hub errors come in many types
            errors.append(f"{candidate}: {_hub_reason(exc)}")
    raise CheckpointError(f"could not get weights from hub repo {repo_id!r} ({'; '.join(errors)})")


def _to_aimkit_layout(gen: Generator, state: dict, headers_only: bool = False,
                      source: str = "checkpoint") -> tuple[dict, dict | None]:
    """``state`` renamed to aimkit's keys when it is an official AiM or a LlamaGen checkpoint, and
    the names (aimkit -> file) for messages; None when the file already has aimkit's names.
    ``headers_only``: the values are meta tensors (a tied pair is not compared)."""
    from .llamagen import from_llamagen, is_llamagen, llamagen_key_map
    from .official import from_official, is_official, official_key_map

    if is_official(state):
        if headers_only and "mamba.backbone.embeddings.word_embeddings.weight" in state:
            state.pop("mamba.lm_head.weight", None)  # tied; from_official would compare the values
        return from_official(gen, state), official_key_map(gen)
    if is_llamagen(state):
        return from_llamagen(gen, state, source=source), llamagen_key_map(gen)
    return state, None


@contextlib.contextmanager
def _explained(gen: Generator, file_state: dict):
    """A weights misfit of a LlamaGen file also says which model the file holds (its sizes)."""
    try:
        yield
    except CheckpointError as exc:
        from .llamagen import describe_misfit, is_llamagen

        why = describe_misfit(gen, file_state) if is_llamagen(file_state) else None
        if why is None:
            raise
        raise CheckpointError(f"{exc}; {why}") from None


def load_weights_into(gen: Generator, path: PathLike) -> None:
    """Load official AiM, LlamaGen or aimkit-layout weights into ``gen`` strictly, reporting absent parts."""
    from .weights import GENERATOR_WRAPPER_KEYS, read_state_dict

    file_state = read_state_dict(path, wrappers=GENERATOR_WRAPPER_KEYS)
    state, file_names = _to_aimkit_layout(gen, dict(file_state), source=str(path))
    with _explained(gen, file_state):
        parts = gen.load_aimkit_state_dict(state, source=str(path), file_names=file_names)
    for part in parts.missing:
        warnings.warn(f"{path} holds no {part} weights; the {part} keeps its random initialisation", stacklevel=3)
    for part in parts.unused:
        warnings.warn(f"{path} holds {part} weights, but this generator was built without a {part} "
                      f"({part}=None); they were not loaded", stacklevel=3)


# --------------------------------------------------------------------------------------------
# preflight: sizes and weight shapes from a meta-device build, before anything is allocated
# --------------------------------------------------------------------------------------------

# in-place calls that change a tensor's shape or flags: run them even on the meta device
_SHAPE_CHANGING_INPLACE = frozenset({
    "resize_", "resize_as_", "set_", "squeeze_", "unsqueeze_", "t_", "transpose_", "swapdims_",
    "swapaxes_", "as_strided_", "requires_grad_", "share_memory_", "retain_grad_",
})
# element-wise maths of parameter initialisers (output shape = broadcast of the inputs)
_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "true_divide", "truediv", "neg", "exp", "expm1", "log", "log1p",
    "clamp", "clamp_min", "clamp_max", "sqrt", "rsqrt", "abs", "pow", "sigmoid", "tanh",
    "reciprocal", "erfinv", "floor", "ceil", "round", "sin", "cos", "radd", "rsub", "rmul",
    "rtruediv", "rpow", "minimum", "maximum",
})
_SAME_SHAPE = frozenset({"normalize", "softmax", "log_softmax", "rand_like", "randn_like"})
_RANDOM_FACTORIES = frozenset({"rand", "randn"})
# function name -> how the meta build answers it (dunder spellings of the operators included)
_SHORTCUTS = {
    **{n: "elementwise" for n in _ELEMENTWISE}, **{f"__{n}__": "elementwise" for n in _ELEMENTWISE},
    **{n: "same-shape" for n in _SAME_SHAPE}, **{n: "random" for n in _RANDOM_FACTORIES},
}
# a meta build of more layers than this first estimates the size from two small builds
_EXTRAPOLATE_ABOVE_LAYERS = 64


def _is_init_inplace(name: str) -> bool:
    return name[-1:] == "_" and name[:2] != "__" and name not in _SHAPE_CHANGING_INPLACE


def _broadcast_shape(*shapes: torch.Size) -> tuple[int, ...]:
    """``torch.broadcast_shapes`` for plain integer shapes (that one imports sympy, through
    ``torch.fx.experimental.symbolic_shapes``, on its first call)."""
    out: list[int] = []
    for shape in shapes:
        shape = tuple(shape)
        if len(shape) > len(out):
            out[:0] = [1] * (len(shape) - len(out))
        for i, size in enumerate(shape, start=len(out) - len(shape)):
            if size != out[i] and out[i] != 1 and size != 1:
                raise RuntimeError(f"shape mismatch: shapes {[tuple(s) for s in shapes]} cannot be broadcast")
            if out[i] == 1:
                out[i] = size
    return tuple(out)


class _ShapesOnly(TorchFunctionMode):
    """Inside a meta-device build, answer initialiser arithmetic without computing it.

    On the meta device tensors have shapes but no values, so in-place fills (``normal_``,
    ``uniform_``, ``zero_``, ``copy_``, ``torch.nn.init.*``) change nothing, and the element-wise
    maths of an initialiser (``exp``, ``log``, ``clamp``, ...) only needs its output shape.
    Running them would call PyTorch's Python meta kernels, whose first use imports
    ``torch._dynamo`` (about a second); this mode returns the shapes directly. Every other call
    runs unchanged, so an unlisted operation is only slower, never wrong.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        kind = _SHORTCUTS.get(name)
        if kind is None and not _is_init_inplace(name):
            return func(*args, **kwargs)
        if kind == "random":
            if kwargs.get("device") not in (None, "meta", torch.device("meta")):
                return func(*args, **kwargs)
            return torch.empty(*args, **{k: v for k, v in kwargs.items() if k not in ("generator", "out")})
        first = args[0] if args else kwargs.get("tensor", kwargs.get("input"))
        if not (isinstance(first, torch.Tensor) and first.is_meta):
            return func(*args, **kwargs)
        if kind is None:  # an in-place fill: nothing to fill on the meta device
            return first
        if kind == "same-shape":  # (not empty_like: its meta kernel is Python that imports sympy)
            dtype = kwargs.get("dtype") or first.dtype  # softmax(..., dtype=), randn_like(..., dtype=)
            return torch.empty(first.shape, dtype=dtype, device="meta")
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not all(t.is_meta for t in tensors):
            return func(*args, **kwargs)
        dtype = torch.result_type(args[0], args[1]) if len(args) > 1 else first.dtype
        return torch.empty(_broadcast_shape(*(t.shape for t in tensors)), dtype=dtype, device="meta")


def _build_meta(config: GeneratorConfig, dtype: torch.dtype | None) -> Generator:
    with torch.device("meta"), _ShapesOnly():
        return Generator(config, device=torch.device("meta"), dtype=dtype)


@functools.lru_cache(maxsize=8)
def _meta_generator_cached(config: GeneratorConfig, dtype: torch.dtype | None) -> Generator:
    return _build_meta(config, dtype)


def _meta_generator(config: GeneratorConfig, dtype: torch.dtype | None) -> Generator:
    """``config`` built on the meta device: every shape, no storage (cached per config and dtype)."""
    try:
        return _meta_generator_cached(config, dtype)
    except TypeError as exc:  # a plugin config with unhashable fields
        if "unhashable" not in str(exc):
            raise
        return _build_meta(config, dtype)


def _tensor_bytes(module: torch.nn.Module) -> tuple[int, str]:
    """Bytes of the parameters and buffers (shared ones once), and the largest tensor's name and shape."""
    seen, total, largest = set(), 0, (0, "")
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        nbytes = t.numel() * t.element_size()
        total += nbytes
        if nbytes > largest[0]:
            largest = (nbytes, f"{name} {tuple(t.shape)}")
    return total, largest[1]


def _memory_limit(device: torch.device | None) -> tuple[int, str] | None:
    """Total memory of the target device and its description: physical RAM for the CPU, the
    GPU's memory for CUDA; None where unknown (nothing is refused then)."""
    if device is None or device.type == "cpu":
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return None
        return (total, "physical memory") if total > 0 else None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f"memory of cuda:{index}"
    return None


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:,.0f} {unit}" if unit == "bytes" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1024
    return ""  # pragma: no cover


def _too_large(where: str, nbytes: float, largest: str, limit: tuple[int, str], device, estimated: bool) -> ConfigError:
    about = "about " if estimated else ""
    biggest = f"; largest tensor {largest}" if largest else ""
    return ConfigError(
        f"{where} would need {about}{_size(nbytes)} for its weights, more than the {_size(limit[0])} of "
        f"{limit[1]} on {device or 'cpu'}; nothing was allocated (check d_model, n_layer, vocab_size, "
        f"num_classes, num_tokens{biggest})"
    )


def _extrapolated_bytes(config: GeneratorConfig, dtype: torch.dtype | None) -> int | None:
    """Weight bytes of a very deep config from two small meta builds (the size is linear in depth)."""
    groups = getattr(config.conditioning.config, "num_groups", None)
    lo = max(16, groups if isinstance(groups, int) else 0)  # conditioning groups cannot exceed the depth
    hi = 2 * lo
    if config.n_layer <= max(_EXTRAPOLATE_ABOVE_LAYERS, 2 * hi):
        return None
    try:
        b_lo = _tensor_bytes(_meta_generator(dataclasses.replace(config, n_layer=lo), dtype))[0]
        b_hi = _tensor_bytes(_meta_generator(dataclasses.replace(config, n_layer=hi), dtype))[0]
    except AimkitError:  # e.g. more conditioning groups than the probe's layers: build it whole
        return None
    return b_lo + (b_hi - b_lo) * (config.n_layer - lo) // (hi - lo)


def _meta_for_preflight(config: GeneratorConfig, dtype, device, where: str) -> Generator | None:
    """The meta build used by the checks, refusing configs whose weights cannot fit in memory."""
    limit = _memory_limit(device)
    estimate = _extrapolated_bytes(config, dtype)
    if limit is not None and estimate is not None and estimate > limit[0]:
        raise _too_large(where, estimate, "", limit, device, estimated=True)
    try:
        meta = _meta_generator(config, dtype)
    except (RuntimeError, OverflowError, TypeError) as exc:
        text = str(exc).lower()
        if any(word in text for word in ("overflow", "negative dimension", "numel", "too large", "invalid shape")):
            raise ConfigError(
                f"{where}: its sizes describe tensors that cannot be built ({_first_line(exc)})"
            ) from None
        log.debug("meta-device build of %s failed (%s); building without the preflight checks", where, exc)
        return None
    nbytes, largest = _tensor_bytes(meta)
    if limit is not None and nbytes > limit[0]:
        raise _too_large(where, nbytes, largest, limit, device, estimated=False)
    return meta


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _check_weights_fit(meta: Generator, path: PathLike) -> None:
    """Compare a weight file's names and shapes (its header only) with the meta-device model."""
    from .weights import GENERATOR_WRAPPER_KEYS, read_tensor_shapes

    shapes = read_tensor_shapes(path, wrappers=GENERATOR_WRAPPER_KEYS)
    file_state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    state, file_names = _to_aimkit_layout(meta, dict(file_state), headers_only=True, source=str(path))
    with _explained(meta, file_state):
        meta.check_aimkit_state_dict(state, source=str(path), file_names=file_names)


def _preflight(config: GeneratorConfig, dtype, device, weights: Path | None, where: str) -> None:
    """Refuse, before allocating, a model too large for the device or weights that do not fit it."""
    if device is not None and device.type == "meta":
        return  # a meta build allocates nothing
    meta = _meta_for_preflight(config, dtype, device, where)
    if meta is not None and weights is not None:
        _check_weights_fit(meta, weights)


def _weights_for(name_or_path: PathLike, config: GeneratorConfig, pretrained: Any,
                 saved_dir: Path | None) -> Path | None:
    """The weights :func:`build` loads: ``pretrained``, a saved directory's own, or a preset's shipped ones."""
    _check_hub_architecture(pretrained, config, os.fspath(name_or_path))  # before fetching the weights
    weights = _resolve_pretrained(str(name_or_path), pretrained)
    if weights is None and saved_dir is not None and pretrained is not False:
        weights = saved_dir
    if weights is None and pretrained is None and isinstance(name_or_path, str) and saved_dir is None:
        from .assets import embedded_weights

        shipped = embedded_weights(name_or_path)
        preset = resolve_config(name_or_path)
        if config.tokenizer is None:  # a tokens-only build takes the shipped generator, not its tokenizer
            preset = dataclasses.replace(preset, tokenizer=None)
        if shipped is not None and _same_weights_layout(config, preset):
            weights = shipped
        elif shipped is not None:
            warnings.warn(
                f"the overrides change the architecture of {name_or_path}, so its shipped weights are not "
                "loaded and the model is random; pass pretrained=False to say so explicitly",
                stacklevel=3,
            )
    return weights


def build(
    name_or_path: PathLike,
    *,
    pretrained: Any = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    tokenizer_weights: PathLike | None = None,
    policy: Any = None,
    **overrides: Any,
) -> Generator:
    """Build a generator from a preset name or a ``save_pretrained`` directory.

    Args:
        name_or_path: a registered preset (``"aim-xl"``, see :func:`aimkit.list_models`), a directory
            holding ``config.json`` + ``model.safetensors`` written by ``Generator.save_pretrained``,
            or ``"hf-hub:org/name"``: such a directory on the Hugging Face Hub (through the hub cache).
        pretrained: None (random weights, or a preset's embedded weights where it ships some), False
            (always random), True (the preset's published weights: the embedded ones where it ships
            some, else through the hub cache),
            ``"hf-hub:ORG/NAME"`` (an aimkit ``config.json`` there must match the architecture built),
            ``"hf-hub:ORG/NAME@FILE"``, or a local file/directory (official AiM, LlamaGen or aimkit layout).
        device: where to build (``"cuda"``, ``"cpu"``); default CPU.
        dtype: parameter dtype (``torch.bfloat16`` or ``"bfloat16"``); default float32.
        tokenizer_weights: LlamaGen's ``vq_ds16_c2i.pt`` (or any tokenizer-only file) loaded separately.
        policy: which implementation each operation runs: an :class:`~aimkit.policy.ExecutionPolicy`
            or a mapping of its fields (``{"state_dtype": "model"}``); None: ``default_policy()``.
            Stored on the model (``gen.policy``, shown by ``repr``), never re-read per call.
        **overrides: architecture overrides, e.g. ``d_model=64, n_layer=3, num_groups=2``.

    Returns:
        A :class:`Generator` in eval mode.
    """
    dtype = check_dtype(dtype)
    device = _check_device(device)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ConfigError(f"expected a preset name or a saved directory, got {name_or_path!r}")
    where = os.fspath(name_or_path)
    name_or_path = _hub_model_dir(name_or_path) or name_or_path  # "hf-hub:org/name": its snapshot folder
    config = resolve_config(name_or_path, **overrides)
    saved_dir = Path(os.fspath(name_or_path))
    saved_dir = saved_dir if (saved_dir / CONFIG_NAME).is_file() else None
    if dtype is None and saved_dir is not None:  # a saved generator comes back in the dtype it was saved in
        dtype = saved_dtype(saved_dir)
    if tokenizer_weights is not None and config.tokenizer is None:
        raise ConfigError("tokenizer_weights given, but this generator has no tokenizer")
    weights = _weights_for(name_or_path, config, pretrained, saved_dir)
    if saved_dir is not None and weights == saved_dir:
        check_one_save(saved_dir, saved_dir / "model.safetensors")  # Generator.save_pretrained's name
    _preflight(config, dtype, device, weights, where=where)
    gen = Generator(config, device=device, dtype=dtype, policy=policy)
    if weights is not None:
        load_weights_into(gen, weights)
    if tokenizer_weights is not None:
        gen.tokenizer.load_weights(tokenizer_weights)
    return gen.eval()
