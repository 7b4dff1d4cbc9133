"""``aimkit fid``: FID (and Inception Score) of a samples .npz against an ADM reference batch.

::

    aimkit fid samples.npz --ref VIRTUAL_imagenet256_labeled.npz
    aimkit fid samples.npz --ref ref.npz --inception-weights pt_inception-2015-12-05-6726825d.pth --device cuda

The network is pytorch-fid's port of TensorFlow's FID Inception-v3 (weights: --inception-weights,
$AIMKIT_INCEPTION_WEIGHTS or ~/.cache/aimkit/pt_inception-2015-12-05-6726825d.pth). Numbers are
close to, but not bit-identical with, the ADM TensorFlow evaluator's; quote that one in papers.
"""

from __future__ import annotations

import json
import time

from ._args import positive_int as _positive_int
from ._args import resolve_device as _device

HELP = "FID and Inception Score of a samples .npz against a reference batch"
DESCRIPTION = __doc__.split("\n\n")[0]

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("samples", metavar="SAMPLES.npz",
                        help="samples: arr_0 (N, H, W, 3) uint8 (from `aimkit sample`)")
    parser.add_argument("--ref", required=True, metavar="REF.npz",
                        help="reference batch: its mu/sigma when present (ADM's VIRTUAL_*.npz), else its arr_0 images")
    parser.add_argument("--inception-weights", metavar="PATH",
                        help="pt_inception-2015-12-05-6726825d.pth (default: $AIMKIT_INCEPTION_WEIGHTS, "
                        "else ~/.cache/aimkit/)")
    parser.add_argument("--batch-size", type=_positive_int, default=50, metavar="N",
                        help="images per Inception forward pass (default 50)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (default) uses CUDA when available")
    parser.add_argument("--dims", type=int, choices=(64, 192, 768, 2048), default=2048,
                        help="feature size: 2048 (default, standard FID) or an earlier stage (64, 192, 768)")
    parser.add_argument("--recompute-ref", action="store_true",
                        help="compute the reference statistics from its images even when it stores mu/sigma")
    parser.add_argument("--splits", type=_positive_int, default=10, metavar="N",
                        help="Inception Score splits (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _input_file(path: str, what: str) -> None:
    """Refuse a missing input, or a directory where an ``.npz`` file is expected, before any work."""
    import os

    from ..errors import ConfigError

    if not os.path.exists(path):
        raise ConfigError(f"{what} {path} does not exist")
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path} is not a file (an .npz is expected)")


def run(args) -> int:
    from ..eval.fid import fid_from_npz
    from ..eval.inception import load_inception

    _input_file(args.samples, "samples")
    _input_file(args.ref, "reference batch")
    device = _device(args.device)
    net = load_inception(args.inception_weights, device=device)
    start = time.perf_counter()
    result = fid_from_npz(
        args.samples,
        args.ref,
        net,
        batch_size=args.batch_size,
        device=device,
        dims=args.dims,
        recompute_ref=args.recompute_ref,
        splits=args.splits,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({
            "fid": result.fid,
            "inception_score": result.inception_score,
            "inception_score_std": result.inception_score_std,
            "num_samples": result.num_samples,
            "dims": args.dims,
            "reference_statistics": result.ref_source,
        }))
        return 0
    label = "FID" if args.dims == 2048 else f"FID ({args.dims}-d features)"
    print(f"{label}: {result.fid:.4f}")
    if result.inception_score is not None:
        print(f"Inception Score: {result.inception_score:.2f} ± {result.inception_score_std:.2f}")
    print(
        f"({result.num_samples} samples; reference statistics: {result.ref_source}; "
        f"{seconds:.1f} s on {device})"
    )
    return 0
