"""``aimkit eval``: quality of a shapes generator measured with the shipped shapes classifier.

The grid and the JSON report are written atomically; their folders are checked for writability
before anything is sampled.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ._args import add_device_arguments, add_weight_arguments, weights_for
from ._args import positive_int as _positive_int

HELP = "conditional accuracy and Fréchet distance of a shapes generator (writes a sample grid)"
DESCRIPTION = (
    "Generate images for every class of the procedural shapes dataset, classify them with the "
    "classifier shipped in aimkit/assets, and report the conditional accuracy (fraction classified "
    "as their label; chance is 1/36) and the Fréchet distance between classifier features of the "
    "generated images and of as many real images with the same labels."
)

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="aim-tiny-shapes", help="preset name or save_pretrained directory")
    add_weight_arguments(parser, "the weights the model ships with")
    parser.add_argument("--num", type=_positive_int, default=1008,
                        help="generated images, balanced over classes (default 1008)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the preset's)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the preset's)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k filter, 0 = off (default: the preset's)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus mass, 1 = off (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--batch-size", type=_positive_int, default=252, help="images sampled together (default 252)")
    add_device_arguments(parser, dtype=False, device_help="auto, cpu or cuda (default auto)")
    parser.add_argument("--grid", default="eval_grid.png", help="PNG grid of the first images (default eval_grid.png)")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this path")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (default: a bar in images, advanced at every token step, with rate "
                        "and ETA, on a terminal or once sampling has run 5 s)")


def run(args) -> int:
    import torch

    import aimkit
    from aimkit._io import check_writable_dir, write_text_atomic
    from aimkit.data.shapes import class_names
    from aimkit.errors import ConfigError
    from aimkit.eval.quality import evaluate_generated
    from aimkit.samplers.api import MAX_IMAGES
    from aimkit.samplers.grid import save_grid

    from ._args import check_sampling_options, resolve_device

    if not 2 <= args.num <= MAX_IMAGES:
        raise ConfigError(f"--num must be in [2, {MAX_IMAGES}], got {args.num}")
    for option, target in (("--grid", args.grid), ("--json", args.json)):
        if target is None:
            continue
        if Path(target).is_dir():  # "" included: the current folder
            raise ConfigError(f"{option} {target!r} is an existing directory; give a file name")
        check_writable_dir(Path(target).parent, f"the folder of {option}", ConfigError)
    device = resolve_device(args.device)
    config = aimkit.resolve_config(args.model)
    num_classes = config.num_classes
    if num_classes != len(class_names()):
        raise ConfigError(f"{args.model} has {num_classes} classes; the shapes dataset has {len(class_names())}")
    check_sampling_options(args, config.fid_sampling)
    pretrained = weights_for(args.model, args.pretrained, args.random_weights)
    log.debug("building %s (weights: %s) on %s", args.model, pretrained, device)
    gen = aimkit.build(args.model, pretrained=pretrained, device=device)
    labels = torch.arange(args.num) % gen.num_classes
    start = time.perf_counter()
    images = gen.generate(labels, cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, batch_size=args.batch_size, output="tensor",
                          progress=False if args.no_progress else None)
    seconds = time.perf_counter() - start
    log.info("classifying %d generated and %d real images", args.num, args.num)
    report = evaluate_generated(images, labels)
    print(f"images: {report.num_images} in {seconds:.1f} s ({report.num_images / seconds:.1f} img/s on {device})")
    print(f"conditional accuracy: {report.conditional_accuracy:.4f} (chance {1 / gen.num_classes:.4f})")
    print(f"classifier accuracy on real images: {report.classifier_accuracy_real:.4f}")
    print(f"Fréchet distance (classifier features, {report.num_real} real images): {report.frechet_distance:.3f}")
    n_show = min(72, args.num)
    grid_images = ((images[:n_show].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if grid_images.shape[1] < 128:  # small images: nearest-neighbour 2x so the captions have room
        grid_images = grid_images.repeat(2, axis=1).repeat(2, axis=2)
    path = save_grid(grid_images, args.grid, nrow=12, labels=labels[:n_show].tolist(), class_names=class_names())
    log.info("wrote %s", path)
    if args.json:
        record = {**report.__dict__, "seconds": seconds, "device": device, "model": args.model, "seed": args.seed}
        write_text_atomic(args.json, json.dumps(record, indent=2) + "\n")
        log.info("wrote %s", args.json)
    return 0
