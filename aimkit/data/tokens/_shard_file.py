"""One shard file: a safetensors file of ``codes`` (n, V, N) and ``labels`` (n,) plus metadata.

Shards are parsed here without the safetensors package (its header is JSON after an 8-byte
length), so that every size and offset is checked before anything is memory-mapped, and written
byte-for-byte reproducibly.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError
from ._index import is_int

# safetensors dtype tags -> numpy dtypes (for memory-mapped reads)
_NUMPY_DTYPES = {"U8": np.uint8, "I16": np.int16, "U16": np.uint16, "I32": np.int32, "I64": np.int64}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_SCAN_ROWS = 1 << 16  # rows of codes checked at a time


def code_dtype(codebook_size: int) -> torch.dtype:
    """Smallest storage dtype for codes in ``[0, codebook_size)`` (uint16 up to 65536 codes)."""
    return torch.uint16 if codebook_size <= 65536 else torch.int32


def shard_header(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header of ``path`` and the byte offset where tensor data starts."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConfigError(f"{path} is truncated ({size} bytes, not even a header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise ConfigError(f"{path} is truncated or not a safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{path} is not a safetensors file (corrupt header)") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path} is not a safetensors file (corrupt header)")
    return header, 8 + n


def _tensor_layout(path: Path, header: dict[str, Any], name: str) -> tuple[Any, tuple[int, ...], int, int]:
    """``(numpy dtype, shape, begin, end)`` of tensor ``name``, checked for consistency."""
    info = header.get(name)
    if not isinstance(info, dict):
        raise ConfigError(f"{path} has no tensor {name!r}")
    dtype = _NUMPY_DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise ConfigError(f"{path}: unsupported dtype {info.get('dtype')!r} for {name!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
        raise ConfigError(f"{path}: corrupt header entry for {name!r}")
    begin, end = offsets
    need = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if begin < 0 or end - begin != need:
        raise ConfigError(f"{path}: tensor {name!r} of shape {tuple(shape)} needs {need} bytes, "
                          f"the header gives it {end - begin}")
    return dtype, tuple(shape), begin, end


def _layout(path: Path) -> tuple[dict[str, Any], int, dict[str, tuple[Any, tuple[int, ...], int, int]]]:
    """Header, data offset and checked layouts of ``codes`` and ``labels``; the file size must fit."""
    header, data_start = shard_header(path)
    tensors = {name: _tensor_layout(path, header, name) for name in ("codes", "labels")}
    expected = data_start + max(end for _, _, _, end in tensors.values())
    size = os.path.getsize(path)
    if size < expected:
        raise ConfigError(f"{path} is truncated: {size} bytes, its header describes {expected}")
    if size > expected:
        raise ConfigError(f"{path} has {size - expected} bytes after its tensors")
    return header, data_start, tensors


def memmap(path: Path, name: str) -> np.ndarray:
    """Read-only memory map of tensor ``name`` of a shard (no copy, shared page cache)."""
    _, data_start, tensors = _layout(path)
    dtype, shape, begin, end = tensors[name]
    if end == begin:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def check_values(path: Path, codes: np.ndarray | None, labels: np.ndarray, index: Mapping[str, Any]) -> None:
    """Codes within the codebook and labels within the classes, or ConfigError naming the shard."""
    n_classes, k = len(index["classes"]), index["codebook_size"]
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise ConfigError(f"{path} holds label {bad}, but the folder has {n_classes} classes (0..{n_classes - 1})")
    if codes is None:
        return
    for lo in range(0, codes.shape[0], _SCAN_ROWS):
        block = codes[lo: lo + _SCAN_ROWS]
        if block.size and (int(block.min()) < 0 or int(block.max()) >= k):
            bad = int(block.min()) if int(block.min()) < 0 else int(block.max())
            raise ConfigError(f"{path} holds code {bad}, outside the codebook of {k} codes (0..{k - 1})")


def check_shard(path: Path, entry: Mapping[str, Any], index: Mapping[str, Any], values: bool = True) -> int:
    """Check a shard file against its index entry: layout, size, metadata, shapes, and (``values``)
    code and label ranges. Returns the number of images it holds.

    Raises:
        ConfigError: naming the shard and what is wrong with it.
    """
    header, _, tensors = _layout(path)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise ConfigError(f"{path} has no shard metadata")
    try:
        start, stop, count = int(meta["start"]), int(meta["stop"]), int(meta["count"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{path} has corrupt shard metadata") from None
    if (start, stop) != (entry["start"], entry["stop"]):
        raise ConfigError(f"{path} covers sources {start}..{stop}, the index expects {entry['start']}..{entry['stop']}")
    fingerprint = (index.get("tokenizer_record") or {}).get("fingerprint")
    if fingerprint and meta.get("tokenizer_fingerprint", fingerprint) != fingerprint:
        raise ConfigError(f"{path} was made by another tokenizer than the one the index records")
    v, n_tok = len(index["variants"]), index["num_tokens"]
    codes_shape, labels_shape = tensors["codes"][1], tensors["labels"][1]
    if codes_shape != (count, v, n_tok) or labels_shape != (count,):
        raise ConfigError(f"{path} holds codes {codes_shape} and labels {labels_shape}; "
                          f"expected ({count}, {v}, {n_tok}) and ({count},)")
    if values:
        check_values(path, memmap(path, "codes"), np.asarray(memmap(path, "labels")), index)
    return count


_DTYPE_TAGS = {np.dtype(v).newbyteorder("<"): k for k, v in _NUMPY_DTYPES.items()}


def save_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file byte-for-byte reproducibly (sorted keys; the safetensors package
    orders metadata by a randomly seeded hash map, so equal shards would differ in bytes)."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name]).astype(tensors[name].dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": _DTYPE_TAGS[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for array in arrays:
            f.write(array.tobytes())
