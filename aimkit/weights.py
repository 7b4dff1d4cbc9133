"""Reading, checking and writing weight files, strictly.

Every component loads its weights through this module so that all of them share one policy:

* safetensors first; PyTorch pickles are opened with ``weights_only=True`` only;
* a file that cannot be read, or that holds no state dict, raises
  :class:`~aimkit.errors.CheckpointError` naming the path (never a raw pickle or zip traceback);
* a file whose floating tensors hold NaN or infinity is refused, naming the first such tensor;
* :func:`read_tensor_shapes` gives the names and shapes without reading the tensors (the
  safetensors header, or a memory-mapped PyTorch file), so a model can be checked against a
  file before it is allocated;
* tensors are checked against the model *before* anything is copied, so a module is never left
  half-loaded, and a mismatch lists the missing, unexpected and mis-shaped names together;
* writes go to a temporary file in the target folder and are moved into place atomically.

Typical use::

    sd = read_state_dict("vq_ds16_c2i.pt")          # {"model": {...}} is unwrapped
    sd = select_prefix(sd, "vqvae.")                # keep one component of a full checkpoint
    load_strict(tokenizer, sd, "vq-f16", source="vq_ds16_c2i.pt")
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._io import atomic_path
from .errors import CheckpointError

__all__ = [
    "WRAPPER_KEYS",
    "GENERATOR_WRAPPER_KEYS",
    "check_finite",
    "content_id",
    "first_nonfinite",
    "check_state_dict",
    "load_strict",
    "read_state_dict",
    "read_tensor_shapes",
    "save_safetensors_atomic",
    "select_prefix",
    "state_dict_fingerprint",
    "strip_prefix",
    "weight_file",
]

PathLike = str | os.PathLike

#: Entries that training scripts wrap a state dict in, searched in this order (LlamaGen's VQ
#: loader prefers ``ema`` over ``model`` over ``state_dict``; ``module`` comes from DDP wrappers).
WRAPPER_KEYS: tuple[str, ...] = ("ema", "model", "state_dict", "module")
#: The order for generator checkpoints: LlamaGen's GPT samplers read ``model``, then ``module``
#: (DeepSpeed), then ``state_dict``, and never ``ema``, which comes last here.
GENERATOR_WRAPPER_KEYS: tuple[str, ...] = ("model", "module", "state_dict", "ema")

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SAFETENSORS_SUFFIX = ".safetensors"
# Files searched in a folder, in order; a glob that matches several files is ambiguous.
# consolidated.pth: an FSDP checkpoint folder of LlamaGen (beside its optimizer.*-of-*.pth shards).
_DIR_CANDIDATES = ("model.safetensors", "pytorch_model.bin", "consolidated.pth", "*.safetensors", "*.pt")
# Harmless classes that training scripts commonly pickle next to the weights (LlamaGen stores
# its argparse arguments); they are allowed by the weights-only unpickler.
_SAFE_GLOBALS = (argparse.Namespace,)
_MAX_LISTED = 5


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def read_state_dict(path: PathLike, key: str | None = None, check_values: bool = True,
                    wrappers: tuple[str, ...] = WRAPPER_KEYS) -> dict[str, Tensor]:
    """Read a flat ``name -> tensor`` dict from a weight file or folder, on the CPU.

    Args:
        path: a ``.safetensors`` file, a PyTorch file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``),
            or a folder holding ``model.safetensors``, ``pytorch_model.bin``, ``consolidated.pth``
            (FSDP), or exactly one ``*.safetensors`` / ``*.pt`` file. Files with another suffix
            are recognised by their first bytes.
        key: the entry of a wrapping dict to use (``"model"``); by default the first of
            ``wrappers`` present is taken, repeatedly, until a flat tensor dict is found.
        check_values: refuse floating tensors holding NaN or infinity (:func:`check_finite`).
        wrappers: the wrapping entries searched, in order (:data:`WRAPPER_KEYS`, or
            :data:`GENERATOR_WRAPPER_KEYS` for a generator).

    Returns:
        The tensors by name, in file order.

    Raises:
        CheckpointError: the path does not exist, the file is empty, truncated or corrupt, it
            holds something other than a state dict, or a tensor holds NaN / infinity.
    """
    path = weight_file(path)
    obj = _load_safetensors(path) if _file_kind(path) == "safetensors" else _load_torch(path)
    sd = _unwrap(obj, path, key, wrappers)
    if check_values:
        check_finite(sd, path)
    return sd


def read_tensor_shapes(path: PathLike, key: str | None = None,
                       wrappers: tuple[str, ...] = WRAPPER_KEYS) -> dict[str, tuple[int, ...]]:
    """The ``name -> shape`` of a weight file or folder without reading its tensors.

    A safetensors file's header is read (and validated against the file's size); a PyTorch
    file is opened memory-mapped where its format allows. Same arguments and errors as
    :func:`read_state_dict`, without the value check.
    """
    path = weight_file(path)
    if _file_kind(path) == "safetensors":
        return _safetensors_shapes(path)
    return {k: tuple(v.shape) for k, v in _unwrap(_load_torch(path, mmap=True), path, key, wrappers).items()}


def weight_file(path: PathLike) -> Path:
    """The file :func:`read_state_dict` reads for ``path`` (a file, or the weight file of a folder).

    Raises:
        CheckpointError: nothing there, no (or several) weight files in the folder, an empty
            file, or something that is neither a file nor a folder.
    """
    path = Path(path)
    if path.is_dir():
        path = _find_in_dir(path)
    if not path.exists():
        raise CheckpointError(f"weight file {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"weight file {path} is not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"weight file {path} is empty (0 bytes): an interrupted download or copy?")
    return path


def content_id(state: dict[str, Tensor], *documents: dict[str, Any]) -> str:
    """SHA-256 (32 hex digits) of tensors' names, dtypes, shapes and bytes and of JSON documents:
    the same model saves to the same files, two different ones never share an id."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(json.dumps(doc, sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy())  # the buffer itself, no copy
    return digest.hexdigest()[:32]


def first_nonfinite(tensors: Iterable[tuple[str, Tensor]]) -> tuple[str, int, int] | None:
    """``(name, bad, numel)`` of the first floating tensor holding NaN or infinity, else None.

    A sum per tensor is the fast test (NaN and infinity survive a sum); only a tensor whose sum
    is not finite (which also happens for huge finite values) is scanned element by element.
    """
    for name, t in tensors:
        if not (isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())) or t.numel() == 0:
            continue
        total = t.sum() if t.element_size() > 1 else t.float().sum()  # float8 has no sum kernel on the CPU
        if torch.isfinite(total).all():
            continue
        bad = int((~torch.isfinite(t if t.element_size() > 1 else t.float())).sum())
        if bad:
            return name, bad, t.numel()
    return None


def check_finite(sd: Mapping[str, Tensor], source: PathLike | None = None) -> None:
    """Raise when a floating tensor of ``sd`` holds NaN or infinity, naming the first one.

    Raises:
        CheckpointError: ``model.safetensors: tensor 'tok_embed.weight' holds 12 NaN / infinite
            values (of 2048)``.
    """
    found = first_nonfinite(sd.items())
    if found is not None:
        name, bad, numel = found
        origin = f"{source}: " if source is not None else ""
        raise CheckpointError(
            f"{origin}tensor {name!r} holds {bad:,} NaN / infinite values (of {numel:,}); "
            "the file is corrupt or was saved from a diverged run"
        )


def _find_in_dir(folder: Path) -> Path:
    for pattern in _DIR_CANDIDATES:
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found[:_MAX_LISTED])
            raise CheckpointError(f"folder {folder} holds several weight files ({names}); pass the file to use")
    raise CheckpointError(f"folder {folder} holds no weight file (looked for {', '.join(_DIR_CANDIDATES)})")


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == _SAFETENSORS_SUFFIX:
        return "safetensors"
    if suffix in _TORCH_SUFFIXES:
        return "torch"
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip archive (torch.save) or raw pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length, then a JSON header
        return "safetensors"
    raise CheckpointError(
        f"{path} is not a weight file: expected a .safetensors or PyTorch ({', '.join(_TORCH_SUFFIXES)}) checkpoint"
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0].split(". ")[0] if text else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _safetensors_error(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"cannot read safetensors file {path}: it is truncated, corrupt or not a safetensors file ({_short(exc)})"
    )


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001  (the Rust reader raises its own error type)
        raise _safetensors_error(path, exc) from None


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001
        raise _safetensors_error(path, exc) from None
    if not shapes:
        raise CheckpointError(f"{path} holds no tensors")
    return shapes


def _torch_load(path: Path, mmap: bool) -> object:
    if hasattr(torch.serialization, "safe_globals"):
        with torch.serialization.safe_globals(list(_SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _load_torch(path: Path, mmap: bool = False) -> object:
    """``torch.load`` with the weights-only unpickler (no code runs); ``mmap`` maps the tensors
    instead of reading them where the file format allows it (zip files, not legacy pickles)."""
    try:
        if mmap and _is_zip(path):
            return _torch_load(path, mmap=True)
        return _torch_load(path, mmap=False)
    except Exception as exc:  # noqa: BLE001  (zip errors, EOFError, UnpicklingError, ...)
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise CheckpointError(
                f"{path} stores a {found.group(1)} object next to its tensors, which weights-only "
                "loading refuses for safety; re-save the state dict alone (torch.save or safetensors)"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        reason = f"unpickler: {detail.group(1).strip()}" if detail else _short(exc)
        raise CheckpointError(
            f"cannot read PyTorch file {path}: it is truncated, corrupt or not a checkpoint ({reason})"
        ) from None


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"PK"


def _is_flat(obj: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _unwrap(obj: object, path: Path, key: str | None, wrappers: tuple[str, ...] = WRAPPER_KEYS) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if key is not None:
        if key not in obj:
            keys = ", ".join(map(str, list(obj)[:10]))
            raise CheckpointError(f"{path} has no entry {key!r} (top-level entries: {keys})")
        obj = obj[key]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"entry {key!r} of {path} is a {type(obj).__name__}, not a state dict")
    while not _is_flat(obj):
        inner = next((k for k in wrappers if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            keys = ", ".join(map(str, list(obj)[:10]))
            raise CheckpointError(
                f"{path} does not hold a state dict: its entries ({keys}) are not all tensors and "
                f"none of {', '.join(wrappers)} wraps one"
            )
        obj = obj[inner]
    if not obj:
        raise CheckpointError(f"{path} holds no tensors")
    return dict(obj)


# --------------------------------------------------------------------------------------------
# key maps
# --------------------------------------------------------------------------------------------


def strip_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` from every key that has it; other keys are kept unchanged."""
    n = len(prefix)
    return {(k[n:] if k.startswith(prefix) else k): v for k, v in sd.items()}


def select_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keep only the keys that start with ``prefix``, with the prefix removed.

    ``select_prefix(aim_checkpoint, "vqvae.")`` is the tokenizer part of an AiM checkpoint.
    """
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------
# checking and loading
# --------------------------------------------------------------------------------------------


def _expected_shapes(module_or_expected: nn.Module | Mapping[str, torch.Size]) -> dict[str, tuple[int, ...]]:
    if isinstance(module_or_expected, nn.Module):
        # state_dict() holds the parameters and the persistent buffers, nothing else.
        return {k: tuple(v.shape) for k, v in module_or_expected.state_dict().items()}
    return {k: tuple(v) for k, v in module_or_expected.items()}


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (", ..." if len(names) > _MAX_LISTED else "")


def check_state_dict(
    module_or_expected: nn.Module | Mapping[str, torch.Size],
    sd: Mapping[str, Tensor],
    what: str,
    source: PathLike | None = None,
    file_names: Mapping[str, str] | None = None,
) -> None:
    """Raise unless ``sd`` has exactly the expected tensor names and shapes.

    Args:
        module_or_expected: the module to load into (its parameters and persistent buffers are
            expected), or a ``name -> shape`` mapping.
        sd: the tensors to check.
        what: the component, for the message (``"vq-f16"``).
        source: where ``sd`` came from (a path), for the message.
        file_names: expected name -> the name it has in the file, where ``sd`` was renamed from
            another layout (official AiM, LlamaGen): missing and mis-shaped tensors are then named
            as the file names them.

    Raises:
        CheckpointError: listing the counts and the first names of missing, unexpected and
            mis-shaped tensors, e.g. ``vq-f16 weights from x.pt do not fit: 2 missing (a.b,
            a.c), 1 mis-shaped (d: file (3, 4) vs model (4, 4))``.
    """
    expected = _expected_shapes(module_or_expected)
    names = file_names or {}
    missing = [names.get(k, k) for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [
        f"{names.get(k, k)}: file {tuple(sd[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_listing(unexpected)})")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped ({_listing(misshaped)})")
    if problems:
        origin = f" from {source}" if source is not None else ""
        raise CheckpointError(f"{what} weights{origin} do not fit: {', '.join(problems)}")


def load_strict(module: nn.Module, sd: Mapping[str, Tensor], what: str, source: PathLike | None = None) -> nn.Module:
    """Check ``sd`` against ``module`` (nothing is copied on a mismatch), then load it strictly.

    Tensors are copied into the module's existing parameters and buffers, so they take the
    module's dtype and device.

    Returns:
        ``module``, for chaining.

    Raises:
        CheckpointError: see :func:`check_state_dict`.
    """
    check_state_dict(module, sd, what, source)
    module.load_state_dict(dict(sd), strict=True)
    return module


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _storage_key(t: Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _owned(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Tensors safetensors accepts: contiguous, each with a storage of its own."""
    counts: dict[tuple[str, int], int] = {}
    for t in sd.values():
        if t.numel():
            counts[_storage_key(t)] = counts.get(_storage_key(t), 0) + 1
    out = {}
    for k, t in sd.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"state dict entry {k!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        shared = t.numel() and counts[_storage_key(t)] > 1
        partial = t.untyped_storage().nbytes() != t.numel() * t.element_size()
        out[k] = t.clone(memory_format=torch.contiguous_format) if shared or partial else t.contiguous()
    return out


def save_safetensors_atomic(
    sd: Mapping[str, Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``sd`` as a safetensors file that appears at ``path`` complete or not at all.

    Tied or otherwise storage-sharing tensors are written as separate copies (safetensors
    refuses shared storage); values of ``metadata`` are converted to strings.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = _owned(sd)
    meta = {str(k): str(v) for k, v in metadata.items()} if metadata else None
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def state_dict_fingerprint(module: nn.Module) -> str:
    """Hex SHA-256 of a module's state dict: for each entry in name order, its name, dtype, shape
    and raw bytes. Equal fingerprints mean bit-identical weights (token folders record their
    tokenizer's; training compares replicas by it)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype!s}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
