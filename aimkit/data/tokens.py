"""Pre-tokenized image codes on disk: sharded safetensors files plus an ``index.json``.

Training on codes instead of pixels removes the tokenizer from the training loop (LlamaGen and
AiM both pre-tokenize ImageNet). ``aimkit tokenize`` writes a directory like::

    tokens/
      index.json              # what the shards hold; see below
      shard-00000.safetensors # codes (n, V, N) uint16, labels (n,) int64
      shard-00001.safetensors
      ...

Every image is stored in ``V`` augmentation *variants* (``V = 1``: a centre crop; ``2``: plus its
mirror image; ``10``: LlamaGen's ten crops, i.e. four corners and the centre, each also
mirrored). :class:`TokenDataset` serves one variant per image and epoch.

``index.json`` records::

    format        1
    tokenizer     registry name of the tokenizer ("vq-f16")
    tokenizer_record  which tokenizer made the codes: name, config, weight fingerprint and how
                  to rebuild it (see :mod:`aimkit.data.provenance`); absent in older folders
    codebook_size codes are in [0, codebook_size)
    image_size    pixels per side of the crops that were encoded (256)
    grid_size     codes per side (16); num_tokens = grid_size ** 2
    variants      names of the V variants, in storage order (["center", "center-flip"])
    classes       class names, index = label (the sub-folder names of the image tree, empty
                  class folders included)
    shard_size    planned images per shard (the last shard may hold fewer)
    shards        [{"file", "start", "stop", "count", "skipped", "completed", "bytes", "sha256"}, ...]
                  start/stop: the shard's slice of the sorted source file list;
                  count: images stored (stop - start - skipped);
                  bytes/sha256: size and checksum of the finished file (null until written)
    complete      every shard is written
    source        anything the writer wants to remember (the image root, ...)

Shards appear atomically (temporary file + rename), so a shard file that exists was complete
when written. Damage after that (a cut copy, flipped bytes) is caught by the recorded size and
checksum: a rerun of ``aimkit tokenize`` checks every finished shard and redoes a damaged one,
and :class:`TokenDataset` refuses to read one (``verify="full"``, the default, reads every
shard once at construction: checksum, code range, labels; ``verify="size"`` checks only sizes,
headers and labels, and then each item's codes as it is read, for very large folders).

Example:
    >>> ds = TokenDataset("tokens/", variant="random", seed=0)
    >>> ds.set_epoch(3)
    >>> codes, label = ds[17]      # int64 (256,), int64 ()
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .._io import atomic_path, read_json, sha256_file, write_text_atomic
from ..errors import ConfigError

__all__ = [
    "INDEX_NAME",
    "FORMAT_VERSION",
    "VARIANT_POLICIES",
    "VERIFY_MODES",
    "shard_name",
    "code_dtype",
    "TokenShardWriter",
    "TokenDataset",
    "read_index",
    "check_shard",
]

INDEX_NAME = "index.json"
FORMAT_VERSION = 1
VARIANT_POLICIES = ("random", "epoch", "first")
VERIFY_MODES = ("full", "size")

PathLike = Union[str, os.PathLike]

# safetensors dtype tags -> numpy dtypes (for memory-mapped reads)
_NUMPY_DTYPES = {"U8": np.uint8, "I16": np.int16, "U16": np.uint16, "I32": np.int32, "I64": np.int64}
# index keys that must agree when an existing directory is resumed
_IDENTITY_KEYS = ("tokenizer", "codebook_size", "image_size", "grid_size", "variants", "classes", "shard_size")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_SCAN_ROWS = 1 << 16  # rows of codes checked at a time


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-00000.safetensors``."""
    return f"shard-{index:05d}.safetensors"


def code_dtype(codebook_size: int) -> torch.dtype:
    """Smallest storage dtype for codes in ``[0, codebook_size)`` (uint16 up to 65536 codes)."""
    return torch.uint16 if codebook_size <= 65536 else torch.int32


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


# --------------------------------------------------------------------------------------------
# the index
# --------------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_INDEX_TYPES: Dict[str, Tuple[str, Callable[[Any], bool]]] = {
    "tokenizer": ("a string", lambda x: isinstance(x, str)),
    "codebook_size": ("a positive integer", lambda x: _is_int(x) and x > 0),
    "image_size": ("a positive integer", lambda x: _is_int(x) and x > 0),
    "grid_size": ("a positive integer", lambda x: _is_int(x) and x > 0),
    "num_tokens": ("a positive integer", lambda x: _is_int(x) and x > 0),
    "variants": ("a non-empty list of names",
                 lambda x: isinstance(x, list) and bool(x) and all(isinstance(v, str) for v in x)),
    "classes": ("a list of names", lambda x: isinstance(x, list) and all(isinstance(v, str) for v in x)),
    "shard_size": ("a positive integer", lambda x: _is_int(x) and x > 0),
    "shards": ("a list", lambda x: isinstance(x, list)),
    "complete": ("true or false", lambda x: isinstance(x, bool)),
}
_SHARD_TYPES: Dict[str, Tuple[str, Callable[[Any], bool]]] = {
    "file": ("a file name", lambda x: isinstance(x, str) and x != ""),
    "start": ("an integer >= 0", lambda x: _is_int(x) and x >= 0),
    "stop": ("an integer >= 0", lambda x: _is_int(x) and x >= 0),
    "count": ("an integer >= 0", lambda x: _is_int(x) and x >= 0),
    "completed": ("true or false", lambda x: isinstance(x, bool)),
}
_OPTIONAL_SHARD_TYPES: Dict[str, Tuple[str, Callable[[Any], bool]]] = {
    "skipped": ("an integer >= 0", lambda x: _is_int(x) and x >= 0),
    "bytes": ("an integer >= 0 or null", lambda x: x is None or (_is_int(x) and x >= 0)),
    "sha256": ("a hex digest or null", lambda x: x is None or (isinstance(x, str) and len(x) == 64)),
}


def _check_index(index: Dict[str, Any], path: Path) -> None:
    """Raise ConfigError naming the first key of ``index`` with a wrong type or value."""
    bad = f"{path} is damaged"
    for key, (want, ok) in _INDEX_TYPES.items():
        if key not in index:
            raise ConfigError(f"{bad}: it has no {key!r} entry")
        if not ok(index[key]):
            raise ConfigError(f"{bad}: {key!r} should be {want}, got {json.dumps(index[key])[:60]}")
    if index["num_tokens"] != index["grid_size"] ** 2:
        raise ConfigError(f"{bad}: num_tokens {index['num_tokens']} is not grid_size {index['grid_size']} squared")
    for i, entry in enumerate(index["shards"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"{bad}: shards[{i}] should be a mapping, got {json.dumps(entry)[:60]}")
        for key, (want, ok) in _SHARD_TYPES.items():
            if not ok(entry.get(key)):
                raise ConfigError(f"{bad}: shards[{i}].{key} should be {want}, got {json.dumps(entry.get(key))[:60]}")
        for key, (want, ok) in _OPTIONAL_SHARD_TYPES.items():
            if key in entry and not ok(entry[key]):
                raise ConfigError(f"{bad}: shards[{i}].{key} should be {want}, got {json.dumps(entry[key])[:60]}")
        if entry["stop"] < entry["start"] or entry["count"] > entry["stop"] - entry["start"]:
            raise ConfigError(f"{bad}: shards[{i}] has start {entry['start']}, stop {entry['stop']}, "
                              f"count {entry['count']}")


def read_index(root: PathLike) -> Dict[str, Any]:
    """The parsed, type-checked ``index.json`` of a token directory.

    Raises:
        ConfigError: the folder has no index, or it is not valid JSON of the expected layout
            (the message names the first wrong entry).
    """
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise ConfigError(f"{root} is not a token directory (no {INDEX_NAME}); create one with `aimkit tokenize`")
    index = read_json(path, ConfigError)
    if not isinstance(index, dict) or index.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{path} is not an aimkit token index (format {FORMAT_VERSION})")
    _check_index(index, path)
    return index


def _shard_path(root: Path, name: str) -> Path:
    """``root / name``, refusing names that are absolute or lead outside ``root``."""
    if os.path.isabs(name) or Path(name).drive:
        raise ConfigError(f"{root / INDEX_NAME} names shard {name!r}, an absolute path; shards must lie in {root}")
    path = root / name
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise ConfigError(f"{root / INDEX_NAME} names shard {name!r}, which lies outside {root}; refusing to read it")
    return path


# --------------------------------------------------------------------------------------------
# shard files
# --------------------------------------------------------------------------------------------


def _shard_header(path: Path) -> Tuple[Dict[str, Any], int]:
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


def _tensor_layout(path: Path, header: Dict[str, Any], name: str) -> Tuple[Any, Tuple[int, ...], int, int]:
    """``(numpy dtype, shape, begin, end)`` of tensor ``name``, checked for consistency."""
    info = header.get(name)
    if not isinstance(info, dict):
        raise ConfigError(f"{path} has no tensor {name!r}")
    dtype = _NUMPY_DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise ConfigError(f"{path}: unsupported dtype {info.get('dtype')!r} for {name!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise ConfigError(f"{path}: corrupt header entry for {name!r}")
    begin, end = offsets
    need = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if begin < 0 or end - begin != need:
        raise ConfigError(f"{path}: tensor {name!r} of shape {tuple(shape)} needs {need} bytes, "
                          f"the header gives it {end - begin}")
    return dtype, tuple(shape), begin, end


def _layout(path: Path) -> Tuple[Dict[str, Any], int, Dict[str, Tuple[Any, Tuple[int, ...], int, int]]]:
    """Header, data offset and checked layouts of ``codes`` and ``labels``; the file size must fit."""
    header, data_start = _shard_header(path)
    tensors = {name: _tensor_layout(path, header, name) for name in ("codes", "labels")}
    expected = data_start + max(end for _, _, _, end in tensors.values())
    size = os.path.getsize(path)
    if size < expected:
        raise ConfigError(f"{path} is truncated: {size} bytes, its header describes {expected}")
    if size > expected:
        raise ConfigError(f"{path} has {size - expected} bytes after its tensors")
    return header, data_start, tensors


def _memmap(path: Path, name: str) -> np.ndarray:
    """Read-only memory map of tensor ``name`` of a shard (no copy, shared page cache)."""
    _, data_start, tensors = _layout(path)
    dtype, shape, begin, end = tensors[name]
    if end == begin:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def _check_values(path: Path, codes: Optional[np.ndarray], labels: np.ndarray, index: Mapping[str, Any]) -> None:
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
        _check_values(path, _memmap(path, "codes"), np.asarray(_memmap(path, "labels")), index)
    return count


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


_DTYPE_TAGS = {np.dtype(v).newbyteorder("<"): k for k, v in _NUMPY_DTYPES.items()}


def _save_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file byte-for-byte reproducibly (sorted keys; the safetensors package
    orders metadata by a randomly seeded hash map, so equal shards would differ in bytes)."""
    header: Dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
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


class TokenShardWriter:
    """Writes shards of codes to ``out_dir`` and keeps ``index.json`` up to date.

    The caller plans the work: ``num_sources`` source images (a sorted list) are cut into shards
    of ``shard_size``; shard ``i`` covers sources ``[i * shard_size, (i + 1) * shard_size)``.
    Creating a writer on a directory that already holds an index of the same plan resumes it
    (:meth:`pending` lists the shards still to write); a different plan raises. On resuming,
    every finished shard is checked (size, checksum; a shard without a recorded checksum: its
    layout and values); a damaged one is pending again and :attr:`problems` says why.

    Several processes may share one directory: each writes a disjoint subset of the shards
    (e.g. ``pending()[rank::world]``); only one of them (``main=True``) writes the index. Call
    :meth:`finalize` on the main process after all have finished.

    Args:
        out_dir: target directory (created).
        num_sources: number of source images.
        shard_size: planned images per shard.
        tokenizer: registry name of the tokenizer.
        codebook_size: codes are in ``[0, codebook_size)``.
        image_size: side of the encoded crops in pixels.
        grid_size: codes per side.
        variants: names of the stored augmentation variants.
        classes: class names, index = label.
        source: free-form description of the source, stored in the index.
        tokenizer_record: which tokenizer makes the codes (:mod:`aimkit.data.provenance`).
        main: whether this process writes ``index.json``.
    """

    def __init__(
        self,
        out_dir: PathLike,
        *,
        num_sources: int,
        shard_size: int,
        tokenizer: str,
        codebook_size: int,
        image_size: int,
        grid_size: int,
        variants: Sequence[str],
        classes: Sequence[str],
        source: Optional[Mapping[str, Any]] = None,
        tokenizer_record: Optional[Mapping[str, Any]] = None,
        main: bool = True,
    ) -> None:
        if shard_size <= 0:
            raise ConfigError(f"shard_size must be positive, got {shard_size}")
        if num_sources < 0:
            raise ConfigError(f"num_sources must be >= 0, got {num_sources}")
        self.out_dir = Path(out_dir)
        self.main = main
        self.dtype = code_dtype(codebook_size)
        self.problems: List[str] = []  # damaged shards found on resuming, one line each
        self.index = self._plan(num_sources, shard_size, tokenizer, codebook_size, image_size, grid_size,
                                variants, classes, source, tokenizer_record)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        index_path = self.out_dir / INDEX_NAME
        if index_path.exists():
            try:
                old = read_index(self.out_dir)
            except ConfigError as exc:
                raise ConfigError(f"{exc}; delete it to rebuild it from the shards (each is checked), "
                                  "or use a new --out directory") from None
            self._check_same_plan(old)
            self._carry_records(old)
        if self.main:
            self._remove_stale_temporaries()
        self.refresh(checksums=True)
        if self.main:
            _write_json_atomic(index_path, self.index)

    @staticmethod
    def _plan(num_sources, shard_size, tokenizer, codebook_size, image_size, grid_size, variants, classes,
              source, tokenizer_record) -> Dict[str, Any]:
        num_shards = -(-num_sources // shard_size)
        shards = [
            {"file": shard_name(i), "start": i * shard_size, "stop": min((i + 1) * shard_size, num_sources),
             "count": 0, "skipped": 0, "completed": False, "bytes": None, "sha256": None}
            for i in range(num_shards)
        ]
        index: Dict[str, Any] = {"format": FORMAT_VERSION, "tokenizer": tokenizer}
        if tokenizer_record is not None:
            index["tokenizer_record"] = dict(tokenizer_record)
        index.update(
            codebook_size=int(codebook_size), image_size=int(image_size), grid_size=int(grid_size),
            num_tokens=int(grid_size) ** 2, variants=list(variants), classes=list(classes),
            shard_size=int(shard_size), num_sources=int(num_sources), shards=shards, complete=False,
            source=dict(source or {}),
        )
        return index

    def _check_same_plan(self, old: Dict[str, Any]) -> None:
        for key in _IDENTITY_KEYS + ("num_sources",):
            if old.get(key) != self.index[key]:
                shown_old, shown_new = old.get(key), self.index[key]
                if isinstance(shown_old, list) and len(shown_old) > 4:
                    shown_old, shown_new = f"{len(shown_old)} entries", f"{len(shown_new)} entries"
                raise ConfigError(
                    f"{self.out_dir} already holds tokens of another run ({key}: {shown_old} there, "
                    f"{shown_new} now); use a new --out directory or delete it"
                )
        new = (self.index.get("tokenizer_record") or {}).get("fingerprint")
        was = (old.get("tokenizer_record") or {}) if isinstance(old.get("tokenizer_record"), dict) else {}
        if new and was.get("fingerprint") and was["fingerprint"] != new:
            raise ConfigError(
                f"{self.out_dir} already holds tokens made by a tokenizer with other weights "
                f"({str(was['fingerprint'])[:12]} there, {new[:12]} now); use a new --out directory or delete it"
            )
        if new and not was and any(e["completed"] for e in old["shards"]):
            raise ConfigError(
                f"{self.out_dir} holds shards whose tokenizer was not recorded (an older aimkit, or a library "
                "call without a record), so they cannot be checked against this one; use a new --out directory"
            )

    def _carry_records(self, old: Dict[str, Any]) -> None:
        """Keep the recorded sizes and checksums of the shards an earlier run finished."""
        for entry, before in zip(self.index["shards"], old["shards"]):
            if (before["file"], before["start"], before["stop"]) == (entry["file"], entry["start"], entry["stop"]):
                entry["bytes"], entry["sha256"] = before.get("bytes"), before.get("sha256")

    def _remove_stale_temporaries(self) -> None:
        """Delete half-written files that a killed run left (the folder lock makes this safe)."""
        for name in os.listdir(self.out_dir):
            if name.startswith((".shard-", f".{INDEX_NAME}.")) and name.endswith(".tmp"):
                try:
                    os.unlink(self.out_dir / name)
                except OSError:
                    pass

    # ---- planning --------------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return len(self.index["shards"])

    def shard_range(self, shard: int) -> Tuple[int, int]:
        """``(start, stop)``: the sources of ``shard``."""
        entry = self.index["shards"][shard]
        return entry["start"], entry["stop"]

    def _inspect(self, entry: Dict[str, Any], checksums: bool) -> Optional[str]:
        """Check one shard file and fill in its record; returns why it is damaged (None: fine or absent)."""
        path = self.out_dir / entry["file"]
        if not path.exists():
            entry.update(bytes=None, sha256=None)
            return None
        size = os.path.getsize(path)
        try:
            if entry.get("sha256") and entry.get("bytes") is not None:
                if size != entry["bytes"]:
                    return f"{path} has the wrong size ({size} bytes, the index records {entry['bytes']})"
                if checksums and sha256_file(path) != entry["sha256"]:
                    return f"{path} does not match the checksum recorded when it was written"
                check_shard(path, entry, self.index, values=checksums)
            else:  # written by another process, or an index written before records existed
                check_shard(path, entry, self.index, values=True)
                entry.update(bytes=size, sha256=sha256_file(path))
        except ConfigError as exc:
            return str(exc)
        return None

    def refresh(self, checksums: bool = False) -> None:
        """Update ``completed`` / ``count`` / ``skipped`` / records of every shard from the files.

        Args:
            checksums: also recompute the checksums of shards with a recorded one (on resuming);
                otherwise their size and layout are checked. A damaged shard becomes pending and
                :attr:`problems` gets a line saying why.
        """
        for entry in self.index["shards"]:
            problem = self._inspect(entry, checksums)
            path = self.out_dir / entry["file"]
            ok = problem is None and entry.get("sha256") is not None
            if problem is not None:  # removed, so that a later run cannot take it for a finished shard
                self.problems.append(f"{problem}; encoding its images again")
                entry.update(bytes=None, sha256=None)
                if self.main:
                    path.unlink(missing_ok=True)
            meta = _shard_header(path)[0].get("__metadata__", {}) if ok else {}
            entry["completed"] = ok
            entry["count"] = int(meta["count"]) if ok else 0
            entry["skipped"] = int(meta.get("skipped", 0)) if ok else 0
        self.index["complete"] = all(e["completed"] for e in self.index["shards"])

    def pending(self) -> List[int]:
        """Shards not written yet (or damaged), in order."""
        return [i for i, e in enumerate(self.index["shards"]) if not e["completed"]]

    # ---- writing ---------------------------------------------------------------------------

    def _check_shard_input(self, shard: int, codes: Tensor, labels: Tensor, skipped: int) -> int:
        start, stop = self.shard_range(shard)
        v, n_tok = len(self.index["variants"]), self.index["num_tokens"]
        n = codes.shape[0] if codes.dim() else 0
        if codes.dim() != 3 or codes.shape[1:] != (v, n_tok) or labels.shape != (n,):
            raise ConfigError(
                f"shard {shard}: expected codes (n, {v}, {n_tok}) and labels (n,), got "
                f"{tuple(codes.shape)} and {tuple(labels.shape)}"
            )
        if n + skipped != stop - start:
            raise ConfigError(f"shard {shard} covers {stop - start} sources, got {n} codes + {skipped} skipped")
        if n and (int(codes.min()) < 0 or int(codes.max()) >= self.index["codebook_size"]):
            raise ConfigError(f"shard {shard}: codes outside [0, {self.index['codebook_size']})")
        classes = len(self.index["classes"])
        if n and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ConfigError(f"shard {shard}: labels outside [0, {classes})")
        return n

    def write_shard(self, shard: int, codes: Tensor, labels: Tensor, skipped: int = 0) -> Path:
        """Write shard ``shard`` atomically and record its size and checksum.

        Args:
            shard: shard number.
            codes: integer (n, V, N) codes of the shard's readable images, in source order.
            labels: int (n,) class labels.
            skipped: sources of this shard that could not be read.

        Returns:
            The shard's path.
        """
        n = self._check_shard_input(shard, codes, labels, skipped)
        start, stop = self.shard_range(shard)
        tensors = {
            "codes": codes.to(torch.int64).to(self.dtype).contiguous().numpy(),
            "labels": labels.to(torch.int64).contiguous().numpy(),
        }
        meta = {"shard": str(shard), "start": str(start), "stop": str(stop), "count": str(n), "skipped": str(skipped)}
        fingerprint = (self.index.get("tokenizer_record") or {}).get("fingerprint")
        if fingerprint:
            meta["tokenizer_fingerprint"] = str(fingerprint)
        path = self.out_dir / shard_name(shard)
        with atomic_path(path) as tmp:
            _save_safetensors(tmp, tensors, meta)
            size, digest = os.path.getsize(tmp), sha256_file(tmp)
        entry = self.index["shards"][shard]
        entry.update(completed=True, count=n, skipped=skipped, bytes=size, sha256=digest)
        if self.main:  # cheap progress record; finalize() makes it authoritative
            _write_json_atomic(self.out_dir / INDEX_NAME, self.index)
        return path

    def finalize(self) -> Dict[str, Any]:
        """Refresh the index from the shard files and write it (main process only).

        Returns:
            The index; ``index["complete"]`` says whether every shard exists.
        """
        self.refresh()
        if self.main:
            _write_json_atomic(self.out_dir / INDEX_NAME, self.index)
        return self.index

    @property
    def num_written(self) -> int:
        """Images stored in completed shards."""
        return sum(e["count"] for e in self.index["shards"] if e["completed"])

    @property
    def num_skipped(self) -> int:
        """Unreadable sources recorded in completed shards."""
        return sum(e["skipped"] for e in self.index["shards"] if e["completed"])


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def _mix(*values: int) -> int:
    """A 64-bit hash of small integers (splitmix64 steps): stateless per-item randomness."""
    x = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for v in values:
        x = (x ^ (int(v) & mask)) & mask
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        x ^= x >> 31
    return x


def _verify_shard(root: Path, entry: Mapping[str, Any], index: Mapping[str, Any], verify: str) -> Path:
    """The path of a finished shard after checking it (see :class:`TokenDataset`); ConfigError if bad."""
    path = _shard_path(root, entry["file"])
    if not path.is_file():
        raise ConfigError(f"{path} is missing; rerun the same `aimkit tokenize` command to rewrite it")
    where = "rerun the same `aimkit tokenize` command to redo it"
    size = os.path.getsize(path)
    if entry.get("bytes") is not None and size != entry["bytes"]:
        raise ConfigError(f"{path} is damaged: {size} bytes, the index records {entry['bytes']}; {where}")
    if verify == "full" and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
        raise ConfigError(f"{path} is damaged: its checksum differs from the one recorded when it was written; {where}")
    try:
        count = check_shard(path, entry, index, values=(verify == "full"))
    except ConfigError as exc:
        raise ConfigError(f"{exc}; {where}") from None
    if count != entry["count"]:
        raise ConfigError(f"{path} holds {count} images, the index records {entry['count']}; {where}")
    return path


class TokenDataset(Dataset):
    """Map-style dataset over a token directory: item ``i`` is ``(codes, label)``.

    Shards are memory-mapped, so many processes share one copy in the page cache. Every shard
    is checked when the dataset is made: it must lie inside ``root`` and match its recorded
    size, layout and labels; ``verify="full"`` (default) also reads it once to compare its
    checksum and check its codes against the codebook size (about a second per GB);
    ``verify="size"`` skips that read and checks each item's codes as it is served instead.

    Args:
        root: directory written by ``aimkit tokenize`` (or a :class:`TokenShardWriter`).
        variant: which stored variant (crop / flip) item ``i`` returns:
            ``"random"``: chosen by a hash of ``(seed, epoch, i)``, reproducible and
            independent of data-loader workers; ``"epoch"``: variant ``(epoch + i) % V``, every
            variant once per ``V`` epochs; ``"first"``: always variant 0 (the centre crop); an
            int: that variant.
        seed: seed of the ``"random"`` policy.
        allow_incomplete: read only the finished shards of an unfinished directory.
        verify: ``"full"`` or ``"size"`` (see above).

    Returns per item:
        codes: int64 (N,) in raster order; label: int64 ().

    Raises:
        ConfigError: one line naming the folder or shard and what is wrong with it.
    """

    def __init__(
        self,
        root: PathLike,
        variant: Union[str, int] = "random",
        seed: int = 0,
        allow_incomplete: bool = False,
        verify: str = "full",
    ) -> None:
        if verify not in VERIFY_MODES:
            raise ConfigError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
        self.root = Path(root)
        self.index = read_index(self.root)
        self.verify = verify
        if not self.index["complete"] and not allow_incomplete:
            missing = sum(1 for e in self.index["shards"] if not e["completed"])
            raise ConfigError(
                f"{self.root} is incomplete ({missing} of {len(self.index['shards'])} shards missing); "
                f"rerun the same `aimkit tokenize` command to finish it"
            )
        self.num_variants = len(self.index["variants"])
        if isinstance(variant, str):
            if variant not in VARIANT_POLICIES:
                raise ConfigError(f"variant must be one of {', '.join(VARIANT_POLICIES)} or an int, got {variant!r}")
        elif not (_is_int(variant) and 0 <= variant < self.num_variants):
            raise ConfigError(f"variant {variant!r} out of range: {self.root} stores {self.num_variants} variants")
        self.variant = variant
        self.seed = int(seed)
        self.epoch = 0
        self._files: List[Path] = []
        counts = []
        for entry in self.index["shards"]:
            if entry["completed"] and entry["count"] > 0:
                self._files.append(_verify_shard(self.root, entry, self.index, verify))
                counts.append(entry["count"])
        self._offsets = np.cumsum([0] + counts)
        self._codes: List[Optional[np.ndarray]] = [None] * len(self._files)
        labels = [np.asarray(_memmap(f, "labels")) for f in self._files]
        self.labels = torch.from_numpy(np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64))
        for f, lab in zip(self._files, labels):
            _check_values(f, None, lab, self.index)

    # ---- metadata --------------------------------------------------------------------------

    @property
    def classes(self) -> List[str]:
        return list(self.index["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.index["classes"])

    @property
    def num_tokens(self) -> int:
        return int(self.index["num_tokens"])

    @property
    def codebook_size(self) -> int:
        return int(self.index["codebook_size"])

    @property
    def tokenizer(self) -> str:
        return str(self.index["tokenizer"])

    @property
    def tokenizer_record(self) -> Optional[Dict[str, Any]]:
        """Which tokenizer made the codes (:mod:`aimkit.data.provenance`); None in older folders."""
        record = self.index.get("tokenizer_record")
        return dict(record) if record is not None else None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose variants the ``"random"`` / ``"epoch"`` policies serve."""
        self.epoch = int(epoch)

    def variant_of(self, index: int) -> int:
        """The variant item ``index`` returns in the current epoch."""
        if isinstance(self.variant, int):
            return self.variant
        if self.variant == "first" or self.num_variants == 1:
            return 0
        if self.variant == "epoch":
            return (self.epoch + index) % self.num_variants
        return _mix(self.seed, self.epoch, index) % self.num_variants

    # ---- items -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for TokenDataset of length {len(self)}")
        shard = int(np.searchsorted(self._offsets, i, side="right")) - 1
        if self._codes[shard] is None:  # opened lazily, so each data-loader worker maps its own
            self._codes[shard] = _memmap(self._files[shard], "codes")
        row = self._codes[shard][i - self._offsets[shard], self.variant_of(i)].astype(np.int64)
        if self.verify != "full" and row.size and (int(row.min()) < 0 or int(row.max()) >= self.codebook_size):
            bad = int(row.min()) if int(row.min()) < 0 else int(row.max())
            raise ConfigError(f"{self._files[shard]} holds code {bad} (item {i}), outside the codebook of "
                              f"{self.codebook_size} codes; rerun `aimkit tokenize` to redo it")
        return torch.from_numpy(row), self.labels[i]

    def __getstate__(self) -> Dict[str, Any]:  # memory maps are not pickled to workers
        state = dict(self.__dict__)
        state["_codes"] = [None] * len(self._files)
        return state
