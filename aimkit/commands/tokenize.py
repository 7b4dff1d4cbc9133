"""``aimkit tokenize``: an ImageFolder tree -> shards of pre-tokenized codes for training.

::

    aimkit tokenize --data imagenet/train --out tokens/in256 --model aim-b \\
        --tokenizer-weights vq_ds16_c2i.pt --crops 10

    # on 8 GPUs, each process writing its own shards:
    accelerate launch --num_processes 8 -m aimkit.cli tokenize --data ... --out ...

Each image is loaded with PIL (any format and mode it reads; converted to 8-bit RGB by
:func:`aimkit.data.images.to_rgb`), its short side resized to ``round(1.125 * image_size)`` with
Lanczos, then cropped: ``--crops 1`` takes the centre, ``--crops 5`` the four corners and the
centre, ``--crops 10`` those five and their mirror images (LlamaGen's ten-crop augmentation).
``--hflip`` adds the mirror image of every crop. Every crop is encoded, so each image is stored
as ``V`` variants (see :mod:`aimkit.data.tokens`). With ``--model``, ``--image-size`` defaults
to the model's own image size (its tokens per side times the tokenizer's downsampling).

Unreadable, corrupt or oversized images (over 64 Mpx or more elongated than 20:1, see
:mod:`aimkit.data.images`) are skipped, each named on one line with the reason, and counted in
the final report. The output folder is locked while the command runs; shards are written
atomically with their size and checksum recorded, so rerunning an interrupted (or killed)
command finishes only the missing shards, and redoes any damaged one. The index records which
tokenizer made the codes (:mod:`aimkit.data.provenance`), so ``aimkit train`` on the folder
saves exactly that tokenizer with the model.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..data.images import (
    IMAGE_EXTENSIONS,
    RESIZE_RATIO,
    ImageSkipped,
    crop_variants,
    find_images,
    load_image,
    scan_image_folder,
    variant_names,
)
from ..errors import ConfigError

HELP = "pre-tokenize an ImageFolder tree into code shards for training"
DESCRIPTION = "Encode an ImageFolder tree (DATA/<class>/<image>) into shards of image tokens for training."

__all__ = [
    "IMAGE_EXTENSIONS",
    "find_images",
    "variant_names",
    "crop_variants",
    "TokenizeReport",
    "tokenize_folder",
    "load_tokenizer",
]

_SHOWN_BAD = 100  # skipped images named individually (with the reason) before only counting


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


class _CropDataset(torch.utils.data.Dataset):
    """Source ``i`` -> ``(i, crops (V, 3, S, S) or None, label, why skipped or None)``."""

    def __init__(self, files: Sequence[Tuple[str, int]], image_size: int, names: Sequence[str]):
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
    good = [it for it in items if it[1] is not None]
    bad = [(it[0], it[3]) for it in items if it[1] is None]
    images = torch.stack([it[1] for it in good]) if good else None
    labels = torch.tensor([it[2] for it in good], dtype=torch.int64)
    return [it[0] for it in good], images, labels, bad


# --------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------


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
    bad_files: List[str] = field(default_factory=list)  # the first few skipped files, this process
    empty_classes: List[str] = field(default_factory=list)  # class folders without images
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


MAX_WORKERS = 256  # decoding processes per process; far above any useful count
MAX_BATCH = 2**20  # images encoded together / per shard


def _check_numbers(**values: int) -> None:
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
    tokenizer_name: Optional[str] = None,
    tokenizer_record: Optional[Mapping[str, Any]] = None,
    image_size: int = 256,
    crops: int = 1,
    hflip: bool = False,
    batch_size: int = 64,
    shard_size: int = 10000,
    num_workers: int = 0,
    device: Optional[torch.device] = None,
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
        progress: show a progress bar on the main process.

    Raises:
        ConfigError: bad arguments, a missing or empty ``data`` tree, ``out`` not writable or
            holding another run's tokens. FolderBusyError: another run writes ``out``.
    """
    from accelerate import PartialState

    from .._io import check_writable_dir
    from .._lock import lock_on_main_process
    from ..train import _distributed_cpu

    _check_numbers(batch_size=batch_size, shard_size=shard_size, num_workers=num_workers)
    names = variant_names(crops, hflip)
    grid = tokenizer.grid_size(image_size)
    scan = scan_image_folder(data)
    check_writable_dir(out, "--out", ConfigError)
    state = PartialState(cpu=_distributed_cpu())
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
            source={"data": str(Path(data).resolve()),
                    "resize": f"short side {round(RESIZE_RATIO * image_size)}, lanczos"},
            tokenizer_record=tokenizer_record,
        )
        job = _Job(state, scan, out, tokenizer, names, grid, device, progress)
        return job.run(plan, batch_size, num_workers)
    finally:
        if lock is not None:
            lock.release()


class _Job:
    """One process's part of a tokenize run (the folder is already locked)."""

    def __init__(self, state, scan, out, tokenizer, names, grid, device, progress):
        self.state, self.scan, self.out, self.names, self.grid = state, scan, out, list(names), grid
        self.device = torch.device(device) if device is not None else state.device
        self.tokenizer = tokenizer.to(self.device).eval()
        self.progress = progress
        self.bad_files: List[str] = []

    def say(self, line: str) -> None:
        if self.state.is_main_process:
            print(line, file=sys.stderr, flush=True)

    def _writer(self, plan: Dict[str, Any]):
        from ..data.tokens import TokenShardWriter

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

    def run(self, plan: Dict[str, Any], batch_size: int, num_workers: int) -> TokenizeReport:
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

    def _skipped(self, path: str, why: str, bar) -> None:
        if len(self.bad_files) < _SHOWN_BAD:
            self.bad_files.append(path)
            bar.write(f"skipping image {path}: {why}", file=sys.stderr)
            if len(self.bad_files) == _SHOWN_BAD:
                bar.write(f"(more than {_SHOWN_BAD} images skipped: the rest are only counted)", file=sys.stderr)

    def _encode(self, writer, loader, batch_shard: List[int], mine: List[int], todo: int) -> None:
        from tqdm.auto import tqdm

        files, tok, device = self.scan.files, self.tokenizer, self.device
        bar = tqdm(total=todo, unit="img", desc="tokenize", disable=not (self.progress and self.state.is_main_process))
        parts: Dict[int, List[Any]] = {}
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
                    self._skipped(files[i][0], why, bar)
                bar.update(len(idx) + len(bad))
                remaining[shard] -= 1
                if remaining[shard] == 0:
                    codes_list, labels_list, skipped = parts.pop(shard)
                    empty = torch.zeros(0, len(self.names), self.grid * self.grid, dtype=torch.int64)
                    codes = torch.cat(codes_list) if codes_list else empty
                    labels = torch.cat(labels_list) if labels_list else torch.zeros(0, dtype=torch.int64)
                    writer.write_shard(shard, codes, labels, skipped=skipped)
        bar.close()


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="ImageFolder root: DATA/<class>/<image>")
    parser.add_argument("--out", required=True, help="output directory (resumed if it exists)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="use the tokenizer of this preset or save_pretrained directory")
    which.add_argument("--tokenizer", help="registered tokenizer name, e.g. vq-f16")
    parser.add_argument(
        "--pretrained", metavar="WEIGHTS",
        help="with --model: take the tokenizer from these model weights (a file or folder, "
             "hf-hub:ORG/NAME, or 'published' for the preset's published weights)",
    )
    parser.add_argument("--tokenizer-weights", help="tokenizer weights (e.g. LlamaGen's vq_ds16_c2i.pt)")
    parser.add_argument(
        "--tokenizer-option", action="append", default=[], metavar="KEY=VALUE",
        help="override a tokenizer config field (repeatable), e.g. codebook_size=1024",
    )
    parser.add_argument(
        "--random-tokenizer", action="store_true",
        help="allow a tokenizer with random weights (tests and throughput runs only)",
    )
    parser.add_argument(
        "--image-size", type=int, default=None,
        help="crop size in pixels (default: the --model's image size, else 256)",
    )
    parser.add_argument("--crops", type=int, default=1, choices=(1, 5, 10), help="1 centre, 5 five-crop, 10 ten-crop")
    parser.add_argument("--hflip", action="store_true", help="also store the mirror image of every crop")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default 64)")
    parser.add_argument("--shard-size", type=int, default=10000, help="images per shard (default 10000)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image-decoding workers")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: this process's device)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_options(items: Sequence[str]) -> Dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--tokenizer-option expects KEY=VALUE, got {item!r}")
        try:
            parsed = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            raise ConfigError(f"--tokenizer-option {key}: cannot parse {value!r}") from None
        out[key.strip()] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def load_tokenizer(args) -> Tuple[Any, str, Dict[str, Any]]:
    """The tokenizer the arguments name, with its weights.

    Returns:
        ``(tokenizer, name, record)``: the module, its registry name and its provenance record
        (:func:`aimkit.data.provenance.make_tokenizer_record`) for the index.
    """
    from ..data.provenance import build_tokenizer, make_tokenizer_record, tokenizer_source

    source = tokenizer_source(
        model=args.model,
        pretrained=getattr(args, "pretrained", None),
        tokenizer=args.tokenizer,
        tokenizer_weights=args.tokenizer_weights,
        options=_parse_options(args.tokenizer_option),
        random=args.random_tokenizer,
    )
    tok, spec = build_tokenizer(source)
    return tok, spec.name, make_tokenizer_record(tok, spec, source)


def model_image_size(model: str, tokenizer) -> int:
    """The image size a generator works at: its tokens per side times the tokenizer's downsampling."""
    from ..build import resolve_config

    num_tokens = resolve_config(model).num_tokens
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ConfigError(f"--model {model} has {num_tokens} tokens, not a square grid; pass --image-size")
    return side * tokenizer.downsample


def _check_args(args) -> None:
    """The cheap checks, before the tokenizer is loaded (nothing is created yet)."""
    _check_numbers(batch_size=args.batch_size, shard_size=args.shard_size, num_workers=args.workers)
    if args.image_size is not None and args.image_size <= 0:
        raise ConfigError(f"--image-size must be positive, got {args.image_size}")
    data = Path(args.data)
    if not data.exists():
        raise ConfigError(f"--data {data} is not a directory: it does not exist (expected DATA/<class>/<image>)")
    if not data.is_dir():
        raise ConfigError(f"--data {data} is not a directory")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")


def run(args) -> int:
    _check_args(args)
    tok, name, record = load_tokenizer(args)
    image_size = args.image_size
    if image_size is None:
        image_size = model_image_size(args.model, tok) if args.model else 256
    report = tokenize_folder(
        args.data,
        args.out,
        tok,
        tokenizer_name=name,
        tokenizer_record=record,
        image_size=image_size,
        crops=args.crops,
        hflip=args.hflip,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        num_workers=args.workers,
        device=args.device,
        progress=not args.no_progress,
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(report.summary())
    return 0 if report.complete else 1
