"""Encoding an ImageFolder tree into a token directory (:mod:`aimkit.data.tokens`): the library
side of ``aimkit tokenize``.

Each image is loaded with PIL (any format and mode it reads; converted to 8-bit RGB by
:func:`aimkit.data.images.to_rgb`), its short side resized to ``round(1.125 * image_size)`` with
Lanczos, then cropped: ``crops=1`` takes the centre, ``crops=5`` the four corners and the
centre, ``crops=10`` those five and their mirror images (LlamaGen's ten-crop augmentation).
``hflip`` adds the mirror image of every crop. Every crop is encoded, so each image is stored
as ``V`` variants.

Unreadable, corrupt or oversized images (over 64 Mpx or more elongated than 20:1, see
:mod:`aimkit.data.images`) are skipped, each named on one line with the reason, and counted in
the report. The output folder is locked while :func:`tokenize_folder` runs; shards are written
atomically with their size and checksum recorded, so rerunning an interrupted (or killed) run
finishes only the missing shards, and redoes any damaged one. The index records which tokenizer
made the codes (:mod:`aimkit.data.provenance`), so ``aimkit train`` on the folder saves exactly
that tokenizer with the model.

Example::

    report = tokenize_folder("imagenet/train", "tokens/in256", tokenizer, image_size=256, crops=10)
    print(report.summary())
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._distributed import distributed_cpu
from ..errors import ConfigError
from .images import RESIZE_RATIO, ImageSkipped, crop_variants, load_image, scan_image_folder, variant_names
from .tokens import TokenShardWriter

__all__ = ["MAX_BATCH", "MAX_WORKERS", "TokenizeReport", "check_sizes", "tokenize_folder"]

log = logging.getLogger(__name__)

MAX_WORKERS = 256  # decoding processes per process; far above any useful count
MAX_BATCH = 2**20  # images encoded together / per shard
_SHOWN_BAD = 100  # skipped images named individually (with the reason) before only counting


class _CropDataset(torch.utils.data.Dataset):
    """Source ``i`` -> ``(i, crops (V, 3, S, S) or None, label, why skipped or None)``."""

    def __init__(self, files: Sequence[tuple[str, int]], image_size: int, names: Sequence[str]):
        self.files, self.image_size, self.names = files, image_size, list(names)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path, label = self.files[i]
        try:
            return i, crop_variants(load_image(path), self.image_size, self.names), label, None
        except ImageSkipped as exc:
            return i, None, label, str(exc)
        except Exception as exc:  # noqa: BLE001 - resizing an odd image: skip it, never stop the run
            text = str(exc).splitlines()[0] if str(exc) else ""
            return i, None, label, f"{type(exc).__name__}: {text}"


def _collate(items):
    """A batch of :class:`_CropDataset` items -> ``(indices, crops (b, V, 3, S, S) or None, labels (b,),
    [(index, why skipped)])``."""
    good = [it for it in items if it[1] is not None]
    bad = [(it[0], it[3]) for it in items if it[1] is None]
    images = torch.stack([it[1] for it in good]) if good else None
    labels = torch.tensor([it[2] for it in good], dtype=torch.int64)
    return [it[0] for it in good], images, labels, bad


@dataclass
class TokenizeReport:
    """What a tokenize run did (totals are over the whole directory, all processes)."""

    out_dir: str
    num_sources: int  # image files found
    num_written: int  # images stored
    num_skipped: int  # images not stored: unreadable, corrupt or over the size limits
    shards_total: int
    shards_resumed: int  # shards that were already complete (and intact) when this run started
    complete: bool
    bad_files: list[str] = field(default_factory=list)  # the first few skipped files, this process
    empty_classes: list[str] = field(default_factory=list)  # class folders without images
    shards_redone: int = 0  # damaged shards found on resuming and encoded again

    def summary(self) -> str:
        text = (
            f"{self.num_written} images in {self.shards_total} shards at {self.out_dir}"
            f" ({self.shards_resumed} shards already done)"
        )
        if self.shards_redone:
            text += f"; redid {self.shards_redone} damaged shard(s)"
        if self.num_skipped:
            text += f"; skipped {self.num_skipped} unreadable image(s) (corrupt, unsupported or over the size limits)"
        if self.empty_classes:
            text += f"; {len(self.empty_classes)} empty class folder(s)"
        if not self.complete:
            text += "; INCOMPLETE: rerun the same command to finish"
        return text


def check_sizes(**values: int) -> None:
    """Check ``batch_size``, ``shard_size`` and ``num_workers`` (given by keyword) against their bounds.

    Raises:
        ConfigError: naming the command-line flag of the first value out of bounds.
    """
    bounds = {"batch_size": (1, MAX_BATCH), "shard_size": (1, MAX_BATCH), "num_workers": (0, MAX_WORKERS)}
    for key, value in values.items():
        low, high = bounds[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            flag = "--workers" if key == "num_workers" else f"--{key.replace('_', '-')}"
            raise ConfigError(f"{flag} must be an integer in [{low}, {high}], got {value!r}")


def tokenize_folder(
    data: os.PathLike,
    out: os.PathLike,
    tokenizer,
    *,
    tokenizer_name: str | None = None,
    tokenizer_record: Mapping[str, Any] | None = None,
    image_size: int = 256,
    crops: int = 1,
    hflip: bool = False,
    batch_size: int = 64,
    shard_size: int = 10000,
    num_workers: int = 0,
    device: torch.device | None = None,
    progress: bool = True,
) -> TokenizeReport:
    """Encode every image below ``data`` with ``tokenizer`` into shards under ``out``.

    Runs on one process, or on each process of an ``accelerate launch`` (each writing a
    disjoint set of shards; the tokenizer is moved to that process's device). The main process
    holds the lock of ``out`` (:class:`~aimkit._lock.FolderLock`) for the whole run.

    Args:
        data: ImageFolder root (``data/<class>/<image>``).
        out: output directory; rerunning on an unfinished one resumes it.
        tokenizer: a :class:`~aimkit.tokenizers.base.Tokenizer` (its weights loaded).
        tokenizer_name: name recorded in the index (default ``tokenizer.name``).
        tokenizer_record: which tokenizer this is (:func:`aimkit.data.provenance.make_tokenizer_record`),
            stored in the index so that training can save exactly this tokenizer.
        image_size: crop size in pixels (a multiple of the tokenizer's downsampling).
        crops: 1 (centre), 5 (corners + centre) or 10 (those and their mirror images).
        hflip: also store the mirror image of every crop.
        batch_size: images per encoder call (each contributes ``V`` crops).
        shard_size: images per shard.
        num_workers: image-decoding worker processes per process.
        device: where to encode; default: this process's accelerator device.
        progress: show a progress bar on the main process (images, with rate and ETA; off a
            terminal redrawn every 10 s). Skipped images and repaired shards are logged as warnings
            (logger ``aimkit.data.tokenize``).

    Raises:
        ConfigError: bad arguments, a missing or empty ``data`` tree, ``out`` not writable or
            holding another run's tokens. FolderBusyError: another run writes ``out``.
    """
    from accelerate import PartialState

    from .._io import check_writable_dir
    from .._lock import lock_on_main_process

    check_sizes(batch_size=batch_size, shard_size=shard_size, num_workers=num_workers)
    names = variant_names(crops, hflip)
    grid = tokenizer.grid_size(image_size)
    scan = scan_image_folder(data)
    check_writable_dir(out, "--out", ConfigError)
    state = PartialState(cpu=distributed_cpu())
    lock = lock_on_main_process(state, out, "aimkit tokenize")
    try:
        plan = dict(
            num_sources=len(scan.files),
            shard_size=shard_size,
            tokenizer=tokenizer_name or tokenizer.name,
            codebook_size=tokenizer.codebook_size,
            image_size=image_size,
            grid_size=grid,
            variants=names,
            classes=scan.classes,
            source={"data": str(Path(data).resolve()), "files": _files_fingerprint(scan, data),
                    "resize": f"short side {round(RESIZE_RATIO * image_size)}, lanczos"},
            tokenizer_record=tokenizer_record,
        )
        job = _Job(state, scan, out, tokenizer, names, grid, device, progress)
        return job.run(plan, batch_size, num_workers)
    finally:
        if lock is not None:
            lock.release()


def _files_fingerprint(scan, data) -> str:
    """SHA-256 of the scanned images' paths (relative to ``data``), labels and sizes: a resumed run
    into the same ``--out`` must read the same images (the folder itself may have moved). The scan's
    paths start with ``data`` as given, so no path is resolved (one stat per image)."""
    prefix = str(Path(data)) + os.sep
    digest = hashlib.sha256()
    for path, label in scan.files:
        name = path[len(prefix):] if path.startswith(prefix) else path
        digest.update(f"{name}\t{label}\t{os.stat(path).st_size}\n".encode())
    return digest.hexdigest()


class _Job:
    """One process's part of a tokenize run (the folder is already locked)."""

    def __init__(self, state, scan, out, tokenizer, names, grid, device, progress):
        self.state, self.scan, self.out, self.names, self.grid = state, scan, out, list(names), grid
        self.device = torch.device(device) if device is not None else state.device
        self.tokenizer = tokenizer.to(self.device).eval()
        self.progress = progress
        self.bad_files: list[str] = []

    def say(self, line: str) -> None:
        """A warning about the run (a damaged shard redone, empty class folders), from the main process."""
        if self.state.is_main_process:
            log.warning("%s", line)

    def _writer(self, plan: dict[str, Any]):
        # the main process writes the index first; the others read it; all agree on `pending`
        writer = TokenShardWriter(self.out, main=True, **plan) if self.state.is_main_process else None
        self.state.wait_for_everyone()
        if writer is None:
            writer = TokenShardWriter(self.out, main=False, **plan)
        for line in writer.problems:
            self.say(line)
        if self.scan.empty_classes:
            ids = [self.scan.classes.index(c) for c in self.scan.empty_classes]
            self.say(f"warning: {len(ids)} class folder(s) hold no images: "
                     f"{', '.join(f'{c} (class {i})' for c, i in zip(self.scan.empty_classes, ids))}; kept as "
                     "classes with 0 images, so the other class ids do not shift")
        return writer

    def run(self, plan: dict[str, Any], batch_size: int, num_workers: int) -> TokenizeReport:
        writer = self._writer(plan)
        redone = len(writer.problems)
        pending = writer.pending()
        resumed = writer.num_shards - len(pending)
        self.state.wait_for_everyone()
        mine = pending[self.state.process_index:: self.state.num_processes]
        batches, batch_shard = [], []
        for shard in mine:
            start, stop = writer.shard_range(shard)
            for b in range(start, stop, batch_size):
                batches.append(list(range(b, min(b + batch_size, stop))))
                batch_shard.append(shard)
        loader = torch.utils.data.DataLoader(
            _CropDataset(self.scan.files, plan["image_size"], self.names),
            batch_sampler=batches,
            num_workers=num_workers,
            collate_fn=_collate,
            generator=torch.Generator(),
        )
        self._encode(writer, loader, batch_shard, mine, sum(len(b) for b in batches))
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            writer.finalize()
        else:
            writer.refresh()
        return TokenizeReport(
            out_dir=str(self.out),
            num_sources=len(self.scan.files),
            num_written=writer.num_written,
            num_skipped=writer.num_skipped,
            shards_total=writer.num_shards,
            shards_resumed=resumed,
            complete=bool(writer.index["complete"]),
            bad_files=self.bad_files,
            empty_classes=list(self.scan.empty_classes),
            shards_redone=redone,
        )

    def _skipped(self, path: str, why: str) -> None:
        if len(self.bad_files) < _SHOWN_BAD:
            self.bad_files.append(path)
            log.warning("skipping image %s: %s", path, why)
            if len(self.bad_files) == _SHOWN_BAD:
                log.warning("(more than %d images skipped: the rest are only counted)", _SHOWN_BAD)

    def _encode(self, writer, loader, batch_shard: list[int], mine: list[int], todo: int) -> None:
        from ..samplers.api import progress_bar

        files, tok, device = self.scan.files, self.tokenizer, self.device
        bar = progress_bar(todo, "tokenize", bool(self.progress and self.state.is_main_process))
        parts: dict[int, list[Any]] = {}
        remaining = {s: sum(1 for t in batch_shard if t == s) for s in mine}
        with torch.inference_mode():
            for shard, (idx, images, labels, bad) in zip(batch_shard, loader):
                entry = parts.setdefault(shard, [[], [], 0])
                if images is not None:
                    b, v = images.shape[:2]
                    codes = tok.encode(images.flatten(0, 1).to(device, tok.dtype))  # (b * V, N)
                    entry[0].append(codes.view(b, v, -1).cpu())
                    entry[1].append(labels)
                for i, why in bad:
                    entry[2] += 1
                    self._skipped(files[i][0], why)
                bar.update(len(idx) + len(bad))
                remaining[shard] -= 1
                if remaining[shard] == 0:
                    self._write(writer, shard, *parts.pop(shard))
        bar.close()

    def _write(self, writer, shard: int, codes_list: list[Tensor], labels_list: list[Tensor], skipped: int) -> None:
        """Write one shard from its encoded batches: codes (b, V, N) and labels (b,) each."""
        empty = torch.zeros(0, len(self.names), self.grid * self.grid, dtype=torch.int64)
        codes = torch.cat(codes_list) if codes_list else empty
        labels = torch.cat(labels_list) if labels_list else torch.zeros(0, dtype=torch.int64)
        writer.write_shard(shard, codes, labels, skipped=skipped)
