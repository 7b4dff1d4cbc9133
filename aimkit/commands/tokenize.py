"""``aimkit tokenize``: an ImageFolder tree -> shards of pre-tokenized codes for training.

::

    aimkit tokenize --data imagenet/train --out tokens/in256 --model aim-b \\
        --tokenizer-weights vq_ds16_c2i.pt --crops 10

    # on 8 GPUs, each process writing its own shards:
    accelerate launch --num_processes 8 -m aimkit.cli tokenize --data ... --out ...

Each image is loaded with PIL (any format it reads; converted to RGB), its short side resized to
``round(1.125 * image_size)`` with Lanczos, then cropped: ``--crops 1`` takes the centre,
``--crops 5`` the four corners and the centre, ``--crops 10`` those five and their mirror images
(LlamaGen's ten-crop augmentation). ``--hflip`` adds the mirror image of every crop. Every crop
is encoded, so each image is stored as ``V`` variants (see :mod:`aimkit.data.tokens`).

Unreadable or corrupt images are skipped, named, and counted in the final report. Shards are
written atomically, so rerunning an interrupted command finishes only the missing shards.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import ConfigError

HELP = "pre-tokenize an ImageFolder tree into code shards for training"
DESCRIPTION = "Encode an ImageFolder tree (DATA/<class>/<image>) into shards of image tokens for training."

__all__ = ["IMAGE_EXTENSIONS", "find_images", "variant_names", "crop_variants", "TokenizeReport", "tokenize_folder"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
RESIZE_RATIO = 1.125  # resize the short side to 1.125 x the crop size (288 for 256), as AiM and LlamaGen
_FIVE = ("top-left", "top-right", "bottom-left", "bottom-right", "center")
_SHOWN_BAD = 10  # unreadable files named individually before only counting


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def find_images(root: os.PathLike) -> Tuple[List[Tuple[str, int]], List[str]]:
    """Scan an ImageFolder tree: one sub-folder per class, images anywhere below it.

    Returns:
        ``(files, classes)``: sorted ``(path, label)`` pairs and the sorted class folder names.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"--data {root} is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ConfigError(f"--data {root} has no class sub-folders (expected ROOT/<class>/<image>)")
    files: List[Tuple[str, int]] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS) and not fn.startswith("."):
                    files.append((os.path.join(dirpath, fn), label))
    if not files:
        raise ConfigError(f"--data {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files, classes


def variant_names(crops: int, hflip: bool) -> List[str]:
    """Storage order of the variants: the crops, then (if any) their mirror images."""
    if crops not in (1, 5, 10):
        raise ConfigError(f"--crops must be 1, 5 or 10, got {crops}")
    base = ["center"] if crops == 1 else list(_FIVE)
    flipped = hflip or crops == 10
    return base + ([f"{b}-flip" for b in base] if flipped else [])


def crop_variants(image, image_size: int, names: Sequence[str]) -> Tensor:
    """Resize the short side of a PIL image to ``1.125 * image_size`` (Lanczos) and crop.

    Returns:
        float32 (V, 3, image_size, image_size) in [-1, 1], one row per name in ``names``.
    """
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    short = round(RESIZE_RATIO * image_size)
    scale = short / min(w, h)
    size = (max(short, round(w * scale)), max(short, round(h * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    w, h = image.size
    s = image_size
    corners = {
        "top-left": (0, 0),
        "top-right": (w - s, 0),
        "bottom-left": (0, h - s),
        "bottom-right": (w - s, h - s),
        "center": ((w - s) // 2, (h - s) // 2),
    }
    out = []
    for name in names:
        x, y = corners[name[: -len("-flip")] if name.endswith("-flip") else name]
        crop = image.crop((x, y, x + s, y + s))
        if name.endswith("-flip"):
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(np.asarray(crop, dtype=np.uint8))
    pixels = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()  # (V, 3, s, s)
    return pixels.div_(127.5).sub_(1.0)


class _CropDataset(torch.utils.data.Dataset):
    """Source ``i`` -> ``(i, crops (V, 3, S, S) or None, label, error or None)``."""

    def __init__(self, files: Sequence[Tuple[str, int]], image_size: int, names: Sequence[str]):
        self.files, self.image_size, self.names = files, image_size, list(names)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.files[i]
        try:
            with Image.open(path) as image:
                image.load()  # decode now, so truncated files fail here
                return i, crop_variants(image, self.image_size, self.names), label, None
        except Exception as exc:  # PIL raises many types for bad files
            return i, None, label, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


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
    num_skipped: int  # unreadable images
    shards_total: int
    shards_resumed: int  # shards that were already complete when this run started
    complete: bool
    bad_files: List[str] = field(default_factory=list)  # the first few unreadable files, this process

    def summary(self) -> str:
        text = (
            f"{self.num_written} images in {self.shards_total} shards at {self.out_dir}"
            f" ({self.shards_resumed} shards already done)"
        )
        if self.num_skipped:
            text += f"; skipped {self.num_skipped} unreadable image(s)"
        if not self.complete:
            text += "; INCOMPLETE: rerun the same command to finish"
        return text


def tokenize_folder(
    data: os.PathLike,
    out: os.PathLike,
    tokenizer,
    *,
    tokenizer_name: Optional[str] = None,
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
    disjoint set of shards; the tokenizer is moved to that process's device).

    Args:
        data: ImageFolder root (``data/<class>/<image>``).
        out: output directory; rerunning on an unfinished one resumes it.
        tokenizer: a :class:`~aimkit.tokenizers.base.Tokenizer` (its weights loaded).
        tokenizer_name: name recorded in the index (default ``tokenizer.name``).
        image_size: crop size in pixels (a multiple of the tokenizer's downsampling).
        crops: 1 (centre), 5 (corners + centre) or 10 (those and their mirror images).
        hflip: also store the mirror image of every crop.
        batch_size: images per encoder call (each contributes ``V`` crops).
        shard_size: images per shard.
        num_workers: image-decoding worker processes per process.
        device: where to encode; default: this process's accelerator device.
        progress: show a progress bar on the main process.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from ..data.tokens import TokenShardWriter

    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    names = variant_names(crops, hflip)
    grid = tokenizer.grid_size(image_size)
    files, classes = find_images(data)
    from ..train import _distributed_cpu

    state = PartialState(cpu=_distributed_cpu())
    device = torch.device(device) if device is not None else state.device
    plan = dict(
        num_sources=len(files),
        shard_size=shard_size,
        tokenizer=tokenizer_name or tokenizer.name,
        codebook_size=tokenizer.codebook_size,
        image_size=image_size,
        grid_size=grid,
        variants=names,
        classes=classes,
        source={"data": str(Path(data).resolve()), "resize": f"short side {round(RESIZE_RATIO * image_size)}, lanczos"},
    )
    # the main process writes the index first; the others read it; all agree on `pending`
    writer = TokenShardWriter(out, main=True, **plan) if state.is_main_process else None
    state.wait_for_everyone()
    if writer is None:
        writer = TokenShardWriter(out, main=False, **plan)
    pending = writer.pending()
    resumed = writer.num_shards - len(pending)
    state.wait_for_everyone()
    mine = pending[state.process_index :: state.num_processes]

    batches, batch_shard = [], []
    for shard in mine:
        start, stop = writer.shard_range(shard)
        for b in range(start, stop, batch_size):
            batches.append(list(range(b, min(b + batch_size, stop))))
            batch_shard.append(shard)
    loader = torch.utils.data.DataLoader(
        _CropDataset(files, image_size, names),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_collate,
        generator=torch.Generator(),
    )
    tokenizer = tokenizer.to(device).eval()
    bad_files: List[str] = []
    todo = sum(len(b) for b in batches)
    bar = tqdm(total=todo, unit="img", desc="tokenize", disable=not (progress and state.is_main_process))
    parts: Dict[int, List[Any]] = {}
    remaining = {s: sum(1 for t in batch_shard if t == s) for s in mine}
    with torch.inference_mode():
        for shard, (idx, images, labels, bad) in zip(batch_shard, loader):
            entry = parts.setdefault(shard, [[], [], 0])
            if images is not None:
                b, v = images.shape[:2]
                codes = tokenizer.encode(images.flatten(0, 1).to(device, tokenizer.dtype))  # (b * V, N)
                entry[0].append(codes.view(b, v, -1).cpu())
                entry[1].append(labels)
            for i, err in bad:
                entry[2] += 1
                if len(bad_files) < _SHOWN_BAD:
                    bad_files.append(files[i][0])
                    bar.write(f"skipping unreadable image {files[i][0]} ({err})", file=sys.stderr)
            bar.update(len(idx) + len(bad))
            remaining[shard] -= 1
            if remaining[shard] == 0:
                codes_list, labels_list, skipped = parts.pop(shard)
                n_tok = grid * grid
                codes = torch.cat(codes_list) if codes_list else torch.zeros(0, len(names), n_tok, dtype=torch.int64)
                labels = torch.cat(labels_list) if labels_list else torch.zeros(0, dtype=torch.int64)
                writer.write_shard(shard, codes, labels, skipped=skipped)
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        writer.finalize()
    else:
        writer.refresh()
    return TokenizeReport(
        out_dir=str(out),
        num_sources=len(files),
        num_written=writer.num_written,
        num_skipped=writer.num_skipped,
        shards_total=writer.num_shards,
        shards_resumed=resumed,
        complete=bool(writer.index["complete"]),
        bad_files=bad_files,
    )


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="ImageFolder root: DATA/<class>/<image>")
    parser.add_argument("--out", required=True, help="output directory (resumed if it exists)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="use the tokenizer of this preset or save_pretrained directory")
    which.add_argument("--tokenizer", help="registered tokenizer name, e.g. vq-f16")
    parser.add_argument("--tokenizer-weights", help="tokenizer weights (e.g. LlamaGen's vq_ds16_c2i.pt)")
    parser.add_argument(
        "--tokenizer-option", action="append", default=[], metavar="KEY=VALUE",
        help="override a tokenizer config field (repeatable), e.g. codebook_size=1024",
    )
    parser.add_argument(
        "--random-tokenizer", action="store_true",
        help="allow a tokenizer with random weights (tests and throughput runs only)",
    )
    parser.add_argument("--image-size", type=int, default=256, help="crop size in pixels (default 256)")
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
        parsed = yaml.safe_load(value) if value else None
        out[key.strip()] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def load_tokenizer(args) -> Tuple[Any, str]:
    """The tokenizer the arguments name, with its weights; returns ``(tokenizer, name)``."""
    from .._config import replace_checked
    from ..assets import embedded_weights
    from ..build import build, resolve_config
    from ..config import ComponentSpec
    from ..registry import TOKENIZERS

    options = _parse_options(args.tokenizer_option)
    tok = None
    if args.model:
        config = resolve_config(args.model)
        if config.tokenizer is None:
            raise ConfigError(f"--model {args.model} has no tokenizer; pass --tokenizer NAME")
        spec = config.tokenizer
        ships_weights = (Path(args.model) / "config.json").is_file() or embedded_weights(args.model) is not None
        if ships_weights and not options and not args.tokenizer_weights:
            tok = build(args.model).tokenizer  # the weights come with the model
    else:
        spec = ComponentSpec(args.tokenizer).resolved("tokenizer")
    if tok is None and not args.tokenizer_weights and not args.random_tokenizer:
        raise ConfigError(
            "the tokenizer has no trained weights: pass --tokenizer-weights PATH "
            "(or --random-tokenizer for tests and throughput runs)"
        )
    if tok is None:
        cfg = spec.config
        if options:
            if cfg is None:
                raise ConfigError(f"tokenizer {spec.name!r} has no config options")
            cfg = replace_checked(cfg, where=f"tokenizer {spec.name!r}", **options)
        cls = TOKENIZERS.get(spec.name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random weights: the same in every process and on every rerun
            tok = cls(config=cfg) if cfg is not None else cls()
        if args.tokenizer_weights:
            tok.load_weights(args.tokenizer_weights)
    return tok, spec.name


def run(args) -> int:
    tok, name = load_tokenizer(args)
    report = tokenize_folder(
        args.data,
        args.out,
        tok,
        tokenizer_name=name,
        image_size=args.image_size,
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
