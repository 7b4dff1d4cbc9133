"""Writing a token directory: :class:`TokenShardWriter` plans, resumes and records the shards."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..._io import atomic_path, sha256_file
from ...errors import ConfigError
from ._index import FORMAT_VERSION, INDEX_NAME, PathLike, read_index, shard_name, write_index
from ._shard_file import check_shard, code_dtype, save_safetensors, shard_header

# index keys that must agree when an existing directory is resumed
_IDENTITY_KEYS = ("tokenizer", "codebook_size", "image_size", "grid_size", "variants", "classes", "shard_size")


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
        source: Mapping[str, Any] | None = None,
        tokenizer_record: Mapping[str, Any] | None = None,
        main: bool = True,
    ) -> None:
        if shard_size <= 0:
            raise ConfigError(f"shard_size must be positive, got {shard_size}")
        if num_sources < 0:
            raise ConfigError(f"num_sources must be >= 0, got {num_sources}")
        self.out_dir = Path(out_dir)
        self.main = main
        self.dtype = code_dtype(codebook_size)
        self.problems: list[str] = []  # damaged shards found on resuming, one line each
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
            write_index(index_path, self.index)

    @staticmethod
    def _plan(num_sources, shard_size, tokenizer, codebook_size, image_size, grid_size, variants, classes,
              source, tokenizer_record) -> dict[str, Any]:
        num_shards = -(-num_sources // shard_size)
        shards = [
            {"file": shard_name(i), "start": i * shard_size, "stop": min((i + 1) * shard_size, num_sources),
             "count": 0, "skipped": 0, "completed": False, "bytes": None, "sha256": None}
            for i in range(num_shards)
        ]
        index: dict[str, Any] = {"format": FORMAT_VERSION, "tokenizer": tokenizer}
        if tokenizer_record is not None:
            index["tokenizer_record"] = dict(tokenizer_record)
        index.update(
            codebook_size=int(codebook_size), image_size=int(image_size), grid_size=int(grid_size),
            num_tokens=int(grid_size) ** 2, variants=list(variants), classes=list(classes),
            shard_size=int(shard_size), num_sources=int(num_sources), shards=shards, complete=False,
            source=dict(source or {}),
        )
        return index

    def _check_same_plan(self, old: dict[str, Any]) -> None:
        for key in _IDENTITY_KEYS + ("num_sources",):
            if old.get(key) != self.index[key]:
                shown_old, shown_new = old.get(key), self.index[key]
                if isinstance(shown_old, list) and len(shown_old) > 4:
                    shown_old, shown_new = f"{len(shown_old)} entries", f"{len(shown_new)} entries"
                raise ConfigError(
                    f"{self.out_dir} already holds tokens of another run ({key}: {shown_old} there, "
                    f"{shown_new} now); use a new --out directory or delete it"
                )
        files_then = (old.get("source") or {}).get("files") if isinstance(old.get("source"), dict) else None
        files_now = self.index["source"].get("files")
        if files_then and files_now and files_then != files_now:
            raise ConfigError(
                f"{self.out_dir} already holds tokens of other images (the same number of files and classes, "
                "but other names, labels or sizes); use a new --out directory or delete it"
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

    def _carry_records(self, old: dict[str, Any]) -> None:
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

    def shard_range(self, shard: int) -> tuple[int, int]:
        """``(start, stop)``: the sources of ``shard``."""
        entry = self.index["shards"][shard]
        return entry["start"], entry["stop"]

    def _inspect(self, entry: dict[str, Any], checksums: bool) -> str | None:
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
            meta = shard_header(path)[0].get("__metadata__", {}) if ok else {}
            entry["completed"] = ok
            entry["count"] = int(meta["count"]) if ok else 0
            entry["skipped"] = int(meta.get("skipped", 0)) if ok else 0
        self.index["complete"] = all(e["completed"] for e in self.index["shards"])

    def pending(self) -> list[int]:
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
            save_safetensors(tmp, tensors, meta)
            size, digest = os.path.getsize(tmp), sha256_file(tmp)
        entry = self.index["shards"][shard]
        entry.update(completed=True, count=n, skipped=skipped, bytes=size, sha256=digest)
        if self.main:  # cheap progress record; finalize() makes it authoritative
            write_index(self.out_dir / INDEX_NAME, self.index)
        return path

    def finalize(self) -> dict[str, Any]:
        """Refresh the index from the shard files and write it (main process only).

        Returns:
            The index; ``index["complete"]`` says whether every shard exists.
        """
        self.refresh()
        if self.main:
            write_index(self.out_dir / INDEX_NAME, self.index)
        return self.index

    @property
    def num_written(self) -> int:
        """Images stored in completed shards."""
        return sum(e["count"] for e in self.index["shards"] if e["completed"])

    @property
    def num_skipped(self) -> int:
        """Unreadable sources recorded in completed shards."""
        return sum(e["skipped"] for e in self.index["shards"] if e["completed"])
