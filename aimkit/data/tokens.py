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
    codebook_size codes are in [0, codebook_size)
    image_size    pixels per side of the crops that were encoded (256)
    grid_size     codes per side (16); num_tokens = grid_size ** 2
    variants      names of the V variants, in storage order (["center", "center-flip"])
    classes       class names, index = label (the sub-folder names of the image tree)
    shard_size    planned images per shard (the last shard may hold fewer)
    shards        [{"file", "start", "stop", "count", "skipped", "completed"}, ...]
                  start/stop: the shard's slice of the sorted source file list;
                  count: images stored (stop - start - skipped)
    complete      every shard is written
    source        anything the writer wants to remember (the image root, ...)

Shards appear atomically (temporary file + rename), so a shard file that exists is complete;
``completed`` in the index is refreshed from the files, which makes an interrupted run resumable
and lets several processes write disjoint shards at the same time.

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
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .._io import atomic_path, read_json, write_text_atomic
from ..errors import ConfigError

__all__ = [
    "INDEX_NAME",
    "FORMAT_VERSION",
    "VARIANT_POLICIES",
    "shard_name",
    "code_dtype",
    "TokenShardWriter",
    "TokenDataset",
    "read_index",
]

INDEX_NAME = "index.json"
FORMAT_VERSION = 1
VARIANT_POLICIES = ("random", "epoch", "first")

PathLike = Union[str, os.PathLike]

# safetensors dtype tags -> numpy dtypes (for memory-mapped reads)
_NUMPY_DTYPES = {"U8": np.uint8, "I16": np.int16, "U16": np.uint16, "I32": np.int32, "I64": np.int64}
# index keys that must agree when an existing directory is resumed
_IDENTITY_KEYS = ("tokenizer", "codebook_size", "image_size", "grid_size", "variants", "classes", "shard_size")


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-00000.safetensors``."""
    return f"shard-{index:05d}.safetensors"


def code_dtype(codebook_size: int) -> torch.dtype:
    """Smallest storage dtype for codes in ``[0, codebook_size)`` (uint16 up to 65536 codes)."""
    return torch.uint16 if codebook_size <= 65536 else torch.int32


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def read_index(root: PathLike) -> Dict[str, Any]:
    """The parsed ``index.json`` of a token directory (raises :class:`ConfigError` if absent)."""
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise ConfigError(f"{root} is not a token directory (no {INDEX_NAME}); create one with `aimkit tokenize`")
    index = read_json(path, ConfigError)
    if not isinstance(index, dict) or index.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{path} is not an aimkit token index (format {FORMAT_VERSION})")
    return index


def _shard_header(path: Path) -> Tuple[Dict[str, Any], int]:
    """The safetensors JSON header of ``path`` and the byte offset where tensor data starts."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConfigError(f"{path} is truncated")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError:
            raise ConfigError(f"{path} is not a safetensors file (corrupt header)") from None
    return header, 8 + n


def _shard_metadata(path: Path) -> Optional[Dict[str, str]]:
    """The metadata of a finished shard, or None when it is missing or unreadable."""
    try:
        header, _ = _shard_header(path)
    except (OSError, ConfigError):
        return None
    meta = header.get("__metadata__") or {}
    return meta if "count" in meta else None


class TokenShardWriter:
    """Writes shards of codes to ``out_dir`` and keeps ``index.json`` up to date.

    The caller plans the work: ``num_sources`` source images (a sorted list) are cut into shards
    of ``shard_size``; shard ``i`` covers sources ``[i * shard_size, (i + 1) * shard_size)``.
    Creating a writer on a directory that already holds an index of the same plan resumes it
    (:meth:`pending` lists the shards still to write); a different plan raises.

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
        main: bool = True,
    ) -> None:
        if shard_size <= 0:
            raise ConfigError(f"shard_size must be positive, got {shard_size}")
        if num_sources < 0:
            raise ConfigError(f"num_sources must be >= 0, got {num_sources}")
        self.out_dir = Path(out_dir)
        self.main = main
        self.dtype = code_dtype(codebook_size)
        num_shards = -(-num_sources // shard_size)
        shards = [
            {
                "file": shard_name(i),
                "start": i * shard_size,
                "stop": min((i + 1) * shard_size, num_sources),
                "count": 0,
                "skipped": 0,
                "completed": False,
            }
            for i in range(num_shards)
        ]
        self.index: Dict[str, Any] = {
            "format": FORMAT_VERSION,
            "tokenizer": tokenizer,
            "codebook_size": int(codebook_size),
            "image_size": int(image_size),
            "grid_size": int(grid_size),
            "num_tokens": int(grid_size) ** 2,
            "variants": list(variants),
            "classes": list(classes),
            "shard_size": int(shard_size),
            "num_sources": int(num_sources),
            "shards": shards,
            "complete": False,
            "source": dict(source or {}),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        index_path = self.out_dir / INDEX_NAME
        if index_path.is_file():
            self._check_same_plan(read_index(self.out_dir))
        self.refresh()
        if self.main:
            _write_json_atomic(index_path, self.index)

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

    # ---- planning --------------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return len(self.index["shards"])

    def shard_range(self, shard: int) -> Tuple[int, int]:
        """``(start, stop)``: the sources of ``shard``."""
        entry = self.index["shards"][shard]
        return entry["start"], entry["stop"]

    def refresh(self) -> None:
        """Update ``completed`` / ``count`` / ``skipped`` of every shard from the files on disk."""
        for i, entry in enumerate(self.index["shards"]):
            meta = _shard_metadata(self.out_dir / entry["file"])
            ok = (
                meta is not None
                and int(meta.get("start", -1)) == entry["start"]
                and int(meta.get("stop", -1)) == entry["stop"]
            )
            entry["completed"] = ok
            entry["count"] = int(meta["count"]) if ok else 0
            entry["skipped"] = int(meta.get("skipped", 0)) if ok else 0
        self.index["complete"] = all(e["completed"] for e in self.index["shards"])

    def pending(self) -> List[int]:
        """Shards not written yet, in order."""
        return [i for i, e in enumerate(self.index["shards"]) if not e["completed"]]

    # ---- writing ---------------------------------------------------------------------------

    def write_shard(self, shard: int, codes: Tensor, labels: Tensor, skipped: int = 0) -> Path:
        """Write shard ``shard`` atomically.

        Args:
            shard: shard number.
            codes: integer (n, V, N) codes of the shard's readable images, in source order.
            labels: int (n,) class labels.
            skipped: sources of this shard that could not be read.

        Returns:
            The shard's path.
        """
        from safetensors.torch import save_file

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
        tensors = {
            "codes": codes.to(torch.int64).to(self.dtype).contiguous(),
            "labels": labels.to(torch.int64).contiguous(),
        }
        meta = {"shard": str(shard), "start": str(start), "stop": str(stop), "count": str(n), "skipped": str(skipped)}
        path = self.out_dir / shard_name(shard)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        entry = self.index["shards"][shard]
        entry.update(completed=True, count=n, skipped=skipped)
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


def _memmap(path: Path, name: str) -> np.ndarray:
    """Read-only memory map of tensor ``name`` of a safetensors file (no copy, shared page cache)."""
    header, data_start = _shard_header(path)
    if name not in header:
        raise ConfigError(f"{path} has no tensor {name!r}")
    info = header[name]
    dtype = _NUMPY_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ConfigError(f"{path}: unsupported dtype {info['dtype']} for {name!r}")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end == begin:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


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


class TokenDataset(Dataset):
    """Map-style dataset over a token directory: item ``i`` is ``(codes, label)``.

    Shards are memory-mapped, so many processes share one copy in the page cache.

    Args:
        root: directory written by ``aimkit tokenize`` (or a :class:`TokenShardWriter`).
        variant: which stored variant (crop / flip) item ``i`` returns:
            ``"random"``: chosen by a hash of ``(seed, epoch, i)``, reproducible and
            independent of data-loader workers; ``"epoch"``: variant ``(epoch + i) % V``, every
            variant once per ``V`` epochs; ``"first"``: always variant 0 (the centre crop); an
            int: that variant.
        seed: seed of the ``"random"`` policy.
        allow_incomplete: read only the finished shards of an unfinished directory.

    Returns per item:
        codes: int64 (N,) in raster order; label: int64 ().
    """

    def __init__(
        self,
        root: PathLike,
        variant: Union[str, int] = "random",
        seed: int = 0,
        allow_incomplete: bool = False,
    ) -> None:
        self.root = Path(root)
        self.index = read_index(self.root)
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
        elif not (isinstance(variant, int) and 0 <= variant < self.num_variants):
            raise ConfigError(f"variant {variant!r} out of range: {self.root} stores {self.num_variants} variants")
        self.variant = variant
        self.seed = int(seed)
        self.epoch = 0
        self._files: List[Path] = []
        counts = []
        for entry in self.index["shards"]:
            if entry["completed"] and entry["count"] > 0:
                self._files.append(self.root / entry["file"])
                counts.append(entry["count"])
        self._offsets = np.cumsum([0] + counts)
        self._codes: List[Optional[np.ndarray]] = [None] * len(self._files)
        labels = [_memmap(f, "labels") for f in self._files]
        self.labels = torch.from_numpy(np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64))

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
        row = self._codes[shard][i - self._offsets[shard], self.variant_of(i)]
        return torch.from_numpy(row.astype(np.int64)), self.labels[i]

    def __getstate__(self) -> Dict[str, Any]:  # memory maps are not pickled to workers
        state = dict(self.__dict__)
        state["_codes"] = [None] * len(self._files)
        return state
