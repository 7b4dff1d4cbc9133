"""``aimkit generate``: sample class-conditional images into a PNG grid (and single PNGs).

::

    aimkit generate --model aim-b --pretrained published --labels "golden retriever,360,tabby cat" --num 6
    aimkit generate --model aim-tiny-shapes --labels "red circle,blue star" --num 16 --out-dir samples/ --captions

Labels are class ids or the model's class names (``aimkit list MODEL --classes``; ImageNet-1k for the AiM
presets, matched ignoring case) and repeat cyclically up to ``--num`` images; without ``--labels``
the classes are drawn at random from the seed. A model without weights (a preset that neither
ships weights nor is given ``--pretrained``) is refused unless ``--random-weights`` is given.

Sampling settings left out come from the model's ``pretty`` preset (or
``fid`` with ``--defaults fid``).

The labels and the output locations are checked before the model is built and anything is
sampled (an existing directory given as ``--out``, a file given as ``--out-dir``, a read-only or
full disk: one line, exit 2). Every PNG is written atomically, so a failed write never replaces
an earlier grid with a truncated file.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .._io import check_writable_dir
from ..errors import ConfigError
from ._args import add_device_arguments, add_weight_arguments, check_sampling_options, class_labels, weights_for
from ._args import positive_int as _positive_int
from ._args import resolve_device as _device
from ._args import seed as _seed

HELP = "sample images of chosen classes into a PNG grid"
DESCRIPTION = __doc__.split("\n\n")[0]

__all__ = ["HELP", "add_arguments", "run", "check_outputs"]

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model", required=True, help="preset name (see `aimkit list`) or a save_pretrained directory"
    )
    add_weight_arguments(parser, "the weights the model ships with (a save_pretrained directory or a "
                         "preset's shipped weights)")
    parser.add_argument(
        "--labels", type=class_labels, metavar="IDS|NAMES",
        help="comma-separated class ids or class names, e.g. 207,360 or 'golden retriever,tabby cat' "
        "(default: random classes from the seed)",
    )
    parser.add_argument(
        "--num", type=_positive_int, metavar="N",
        help="number of images, at least one per label; labels repeat cyclically to this count (default: one "
        "per label, or 8)",
    )
    parser.add_argument("--cfg-scale", type=float, metavar="F", help="guidance scale, 1 = off (default: preset)")
    parser.add_argument(
        "--temperature", type=float, metavar="F", help="softmax temperature, 0 = greedy (default: preset)"
    )
    parser.add_argument(
        "--top-k", type=int, metavar="N", help="keep the N most likely tokens, 0 = all (default: preset)"
    )
    parser.add_argument("--top-p", type=float, metavar="F", help="nucleus mass in (0, 1], 1 = all (default: preset)")
    parser.add_argument("--schedule", default="constant", choices=("constant", "linear"),
                        help="guidance scale over the tokens: constant, or linear from 1 up to --cfg-scale")
    parser.add_argument(
        "--seed", type=_seed, default=0,
        help="random seed; the same seed, --batch-size and device give the same images (default 0)"
    )
    parser.add_argument(
        "--defaults", choices=("fid", "pretty"), default="pretty",
        help="preset sampling settings for the options left out: 'pretty' (default) or 'fid'",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=32, metavar="N",
                        help="images sampled together (default 32; the decode batch is 2N with guidance); the "
                        "random draws depend on it, so another value gives other images")
    add_device_arguments(parser)
    parser.add_argument("--out", default="samples.png", metavar="PNG", help="grid image to write (default samples.png)")
    parser.add_argument("--out-dir", metavar="DIR",
                        help="also write every image as DIR/NNNNN_class<id>.png (files of those names are "
                        "replaced, each atomically once sampling has succeeded)")
    parser.add_argument("--captions", action="store_true",
                        help="write each image's class (id and name, where the model has names) under it in the grid")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (default: a bar in images, advanced at every token step, with rate "
                        "and ETA, on a terminal or once sampling has run 5 s)")


def check_outputs(out, out_dir) -> None:
    """Refuse output locations that cannot be written, before anything is sampled.

    Raises:
        ConfigError: ``out`` is an existing directory, ``out_dir`` an existing file, or a folder
            to write into is read-only, full or otherwise unwritable.
    """
    if out:
        out = Path(out)
        if out.is_dir():
            raise ConfigError(
                f"--out {out} is an existing directory; give the grid's file name, e.g. {out / 'grid.png'}"
            )
        if os.path.lexists(out) and not out.is_file():
            raise ConfigError(f"--out {out} exists and is not a regular file (a device or socket); give a .png file")
        if out.suffix.lower() != ".png":
            raise ConfigError(f"--out {out}: the grid is written as PNG; give a file name ending in .png")
        check_writable_dir(out.parent, "the folder of --out", ConfigError)
    if out_dir:
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise ConfigError(f"--out-dir {out_dir} is an existing file, not a folder")
        check_writable_dir(out_dir, "--out-dir", ConfigError)


def _write(images, labels, args, model) -> list:
    """Write the grid and the single images (every file atomically); returns what was written."""
    from ..samplers.grid import save_grid, save_png

    written = []
    if args.out:
        names = model.config.class_names if args.captions else None
        shown = images
        if images.shape[1] < 128:  # small images: nearest-neighbour 2x so the grid and captions are readable
            shown = images.repeat(2, axis=1).repeat(2, axis=2)
        written.append(str(save_grid(shown, args.out, labels=labels.tolist() if args.captions else None,
                                     class_names=names)))
    if args.out_dir:
        out_dir = Path(args.out_dir)
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            save_png(image, out_dir / f"{i:05d}_class{label}.png")
        written.append(f"{len(images)} files in {out_dir}")
    return written


def _check_before_build(args, num: int):
    """Weights, labels and sampling settings against the preset's config, before the (slow) model
    build; returns what ``build(pretrained=...)`` gets."""
    from ..build import resolve_config
    from ..samplers import resolve_labels

    config = resolve_config(args.model)
    pretrained = weights_for(args.model, args.pretrained, args.random_weights)
    resolve_labels(config, args.labels, num, args.seed)
    preset = config.fid_sampling if args.defaults == "fid" else config.pretty_sampling
    check_sampling_options(args, preset)
    return pretrained


def run(args) -> int:
    from ..build import build
    from ..registry import SAMPLERS
    from ..samplers import generate, resolve_labels

    if args.out_dir is None and not args.out:
        raise ConfigError("nothing to write: give --out or --out-dir")
    num = args.num if args.num is not None or args.labels is not None else 8
    pretrained = _check_before_build(args, num)
    check_outputs(args.out, args.out_dir)
    log.debug("building %s (weights: %s) on %s in %s", args.model, pretrained, _device(args.device), args.dtype)
    model = build(args.model, pretrained=pretrained, device=_device(args.device), dtype=args.dtype)
    labels = resolve_labels(model, args.labels, num, args.seed)  # fixed here to name the files
    log.debug("model %r; labels %s", model, labels.tolist()[:32])
    spec = model.config.sampler
    sampler_cls = SAMPLERS.get(spec.name)
    sampler = sampler_cls() if spec.config is None else sampler_cls(config=spec.config)

    start = time.perf_counter()
    images = generate(
        model,
        labels,
        cfg_scale=args.cfg_scale,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        output="uint8",
        batch_size=args.batch_size,
        schedule=args.schedule,
        progress=False if args.no_progress else None,
        defaults=args.defaults,
        sampler=sampler,
    )
    seconds = time.perf_counter() - start

    written = _write(images, labels, args, model)
    capture = getattr(sampler, "total_capture_seconds", None)
    extra = f", including {capture:.2f} s of CUDA graph capture" if capture else ""
    log.info("generated %d images in %.2f s (%.2f images/s%s) on %s; wrote %s", len(images), seconds,
             len(images) / seconds, extra, model.device, ", ".join(written))
    return 0
