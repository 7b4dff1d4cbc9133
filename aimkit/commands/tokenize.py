"""``aimkit tokenize``: an ImageFolder tree -> shards of pre-tokenized codes for training.

::

    aimkit tokenize --data imagenet/train --out tokens/in256 --model aim-b \\
        --tokenizer-weights vq_ds16_c2i.pt --crops 10

    # on 8 GPUs, each process writing its own shards:
    accelerate launch --num_processes 8 -m aimkit.cli tokenize --data ... --out ...

``--crops 1`` takes the centre of each image, ``--crops 5`` the four corners and the centre,
``--crops 10`` those five and their mirror images (LlamaGen's ten-crop augmentation); ``--hflip``
adds the mirror image of every crop. With ``--model``, ``--image-size`` defaults to the model's
own image size (its tokens per side times the tokenizer's downsampling). Unreadable images are
skipped and named; rerunning an interrupted command finishes only the missing shards. The work
itself (loading, cropping, encoding, writing, resuming) is :func:`aimkit.data.tokenize.tokenize_folder`;
the folder layout is :mod:`aimkit.data.tokens`. Skipped images and repaired shards are warnings on
stderr; the summary of the run is printed on stdout.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.tokenize import check_sizes, tokenize_folder
from ..errors import ConfigError

HELP = "pre-tokenize an ImageFolder tree into code shards for training"
DESCRIPTION = "Encode an ImageFolder tree (DATA/<class>/<image>) into shards of image tokens for training."

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run", "load_tokenizer", "model_image_size"]


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
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (default: images with rate and ETA; off a terminal redrawn every 10 s)")


def _parse_options(items: Sequence[str]) -> dict[str, Any]:
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


def load_tokenizer(args) -> tuple[Any, str, dict[str, Any]]:
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
    check_sizes(batch_size=args.batch_size, shard_size=args.shard_size, num_workers=args.workers)
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
    if out.resolve().is_relative_to(data.resolve()):  # it would be read as a class folder on the next run
        raise ConfigError(f"--out {out} is inside --data {data}; write the tokens outside the image tree")
    if args.device is not None:
        _check_device(args.device)


def _check_device(name: str) -> None:
    """``--device`` names a device of this machine (cpu, cuda, cuda:N), else one line."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was requested but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")


def run(args) -> int:
    _check_args(args)
    tok, name, record = load_tokenizer(args)
    image_size = args.image_size
    if image_size is None:
        image_size = model_image_size(args.model, tok) if args.model else 256
    report = tokenize_folder(
        args.data, args.out, tok, tokenizer_name=name, tokenizer_record=record, image_size=image_size,
        crops=args.crops, hflip=args.hflip, batch_size=args.batch_size, shard_size=args.shard_size,
        num_workers=args.workers, device=args.device, progress=not args.no_progress,
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(report.summary())
    return 0 if report.complete else 1
