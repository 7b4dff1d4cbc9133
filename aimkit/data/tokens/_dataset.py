"""Reading a token directory: :class:`TokenDataset`, one variant of one image per item."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..._io import sha256_file
from ...errors import ConfigError
from ._index import PathLike, is_int, read_index, shard_path
from ._shard_file import check_shard, check_values, memmap

VARIANT_POLICIES = ("random", "epoch", "first")
VERIFY_MODES = ("full", "size")


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
    path = shard_path(root, entry["file"])
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
        variant: str | int = "random",
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
        elif not (is_int(variant) and 0 <= variant < self.num_variants):
            raise ConfigError(f"variant {variant!r} out of range: {self.root} stores {self.num_variants} variants")
        self.variant = variant
        self.seed = int(seed)
        self.epoch = 0
        self._files: list[Path] = []
        counts = []
        for entry in self.index["shards"]:
            if entry["completed"] and entry["count"] > 0:
                self._files.append(_verify_shard(self.root, entry, self.index, verify))
                counts.append(entry["count"])
        self._offsets = np.cumsum([0] + counts)
        self._codes: list[np.ndarray | None] = [None] * len(self._files)
        labels = [np.asarray(memmap(f, "labels")) for f in self._files]
        self.labels = torch.from_numpy(np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64))
        for f, lab in zip(self._files, labels):
            check_values(f, None, lab, self.index)

    # ---- metadata --------------------------------------------------------------------------

    @property
    def classes(self) -> list[str]:
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
    def tokenizer_record(self) -> dict[str, Any] | None:
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

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for TokenDataset of length {len(self)}")
        shard = int(np.searchsorted(self._offsets, i, side="right")) - 1
        if self._codes[shard] is None:  # opened lazily, so each data-loader worker maps its own
            self._codes[shard] = memmap(self._files[shard], "codes")
        row = self._codes[shard][i - self._offsets[shard], self.variant_of(i)].astype(np.int64)
        if self.verify != "full" and row.size and (int(row.min()) < 0 or int(row.max()) >= self.codebook_size):
            bad = int(row.min()) if int(row.min()) < 0 else int(row.max())
            raise ConfigError(f"{self._files[shard]} holds code {bad} (item {i}), outside the codebook of "
                              f"{self.codebook_size} codes; rerun `aimkit tokenize` to redo it")
        return torch.from_numpy(row), self.labels[i]

    def __getstate__(self) -> dict[str, Any]:  # memory maps are not pickled to workers
        state = dict(self.__dict__)
        state["_codes"] = [None] * len(self._files)
        return state
