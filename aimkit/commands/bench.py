"""``aimkit bench``: sampling / decode-step / training throughput against the physical floors.

See :mod:`aimkit.bench` for what is measured and how the floors are counted. Writes
``bench.json``, ``bench.md``, ``bench.log`` and up to three PNG plots to ``--out`` (default
``$OUT`` when set, else ``./bench_out``) and prints a compact table last.
"""

from __future__ import annotations

import argparse
import ast
from typing import Any, Dict, List

HELP = "benchmark sampling, decode steps and training against the memory/compute floors"
DESCRIPTION = (
    "Benchmark random-weight generators on a GPU: device ceilings, a correctness check of the fast "
    "path, sampling throughput (images/s, first call, peak memory, fraction of the floor), optional "
    "transformer comparison, decode-step replay and training-step throughput."
)


def _csv(kind):
    def parse(text: str) -> List[Any]:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None

    return parse


def _override(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a bare string such as state_dtype=model
    return key.strip(), parsed


def add_arguments(parser) -> None:
    parser.add_argument("--suite", default="sampling", choices=("sampling", "decode", "train", "all"),
                        help="what to run (default sampling; the correctness check always runs first)")
    parser.add_argument("--models", type=_csv(str), default=["aim-b", "aim-l", "aim-xl"],
                        help="presets for the sampling grid (default aim-b,aim-l,aim-xl)")
    parser.add_argument("--batches", type=_csv(int), default=[16, 64, 256], help="images per batch (default 16,64,256)")
    parser.add_argument("--tokens", type=_csv(int), default=[256],
                        help="tokens per image of the sampling grid (256 = 256 px, 576 = 384 px, 1024 = 512 px); "
                             "the first one is used by decode, train and the correctness check")
    parser.add_argument("--dtype", default="bfloat16", help="parameter dtype for sampling (default bfloat16)")
    parser.add_argument("--transformer", action="store_true",
                        help="add a transformer of matching size (n_head = d_model/64) beside every sampling row")
    parser.add_argument("--compare-models", type=_csv(str), default=[],
                        help="presets for the Mamba2-vs-transformer comparison over --compare-tokens")
    parser.add_argument("--compare-batch", type=int, default=64, help="batch of the comparison (default 64)")
    parser.add_argument("--compare-tokens", type=_csv(int), default=[256, 576, 1024],
                        help="token counts of the comparison (default 256,576,1024)")
    parser.add_argument("--decode-vq", action="store_true",
                        help="also time VQ decoding of each sampled batch (random tokenizer weights)")
    parser.add_argument("--decode-models", type=_csv(str), default=["aim-xl"], help="decode-step rows (default aim-xl)")
    parser.add_argument("--decode-batches", type=_csv(int), default=[16, 256], help="decode-step batches (default 16,256)")
    parser.add_argument("--train-models", type=_csv(str), default=["aim-b", "aim-l"],
                        help="training-step rows (default aim-b,aim-l)")
    parser.add_argument("--train-batch", type=int, default=64, help="training batch (default 64)")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per row after the first call (default 3)")
    parser.add_argument("--state-dtype", choices=("float32", "model"), default=None,
                        help="Mamba2 decoding state dtype (default: the preset's, float32)")
    parser.add_argument("--override", type=_override, action="append", default=[], metavar="KEY=VALUE",
                        help="architecture override for every model, e.g. --override n_layer=4 (repeatable)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (small smoke runs only)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="start no new row after this many seconds (0 = no limit); outputs are always written")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the correctness check")
    parser.add_argument("--require-kernels", action="store_true",
                        help="stop (exit 3) on CUDA when mamba-ssm's kernels cannot be imported")
    parser.add_argument("--seed", type=int, default=0, help="weights and sampling seed (default 0)")
    parser.add_argument("--out", default=None, help="output folder (default $OUT, else ./bench_out)")


def _check_numbers(args) -> None:
    """Every count positive, the time budget a finite number >= 0 (one line each, before any work)."""
    import math

    from ..errors import ConfigError

    for name in ("repeats", "train_steps", "train_batch", "compare_batch"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    for name in ("batches", "tokens", "compare_tokens", "decode_batches"):
        values = list(getattr(args, name))
        if not values and name in ("batches", "tokens"):
            raise ConfigError(f"--{name.replace('_', '-')} is empty")
        if any(v <= 0 for v in values):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {','.join(map(str, values))}")
    if not math.isfinite(args.budget_s) or args.budget_s < 0:
        raise ConfigError(f"--budget-s must be a finite number of seconds >= 0, got {args.budget_s}")


def _check_device_and_dtype(args) -> None:
    import torch

    from ..errors import ConfigError

    try:
        device = torch.device(args.device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown --device {args.device!r}; use cuda, cuda:N or cpu") from None
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    dtype = getattr(torch, args.dtype, None) if not args.dtype.startswith("_") else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"--dtype must be a floating-point dtype such as bfloat16, got {args.dtype!r}")


def _check_overrides(args, overrides: Dict[str, Any]) -> None:
    """The ``--override`` values are valid for aim-b, the correctness check's model (nothing is
    built). Unknown preset names are not refused here: their rows fail and the table is kept."""
    from ..build import resolve_config

    resolve_config("aim-b", **{**overrides, "tokenizer": None, "num_tokens": args.tokens[0]})


def options_from_args(args):
    """:class:`aimkit.bench.BenchOptions` from parsed arguments, checked before any work starts."""
    from .._io import check_writable_dir
    from ..bench import BenchOptions
    from ..errors import ConfigError

    overrides: Dict[str, Any] = dict(args.override)
    _check_numbers(args)
    _check_device_and_dtype(args)
    _check_overrides(args, overrides)
    if args.out is not None:
        check_writable_dir(args.out, "output folder", ConfigError)
    return BenchOptions(
        suite=args.suite, models=tuple(args.models), batches=tuple(args.batches), tokens=tuple(args.tokens),
        dtype=args.dtype, transformer=args.transformer, compare_models=tuple(args.compare_models),
        compare_batch=args.compare_batch, compare_tokens=tuple(args.compare_tokens), decode_vq=args.decode_vq,
        decode_models=tuple(args.decode_models), decode_batches=tuple(args.decode_batches),
        train_models=tuple(args.train_models), train_batch=args.train_batch, train_steps=args.train_steps,
        repeats=args.repeats, out=args.out, device=args.device, overrides=overrides, state_dtype=args.state_dtype,
        budget_s=args.budget_s, check=args.check, require_kernels=args.require_kernels, seed=args.seed,
    )


def run(args) -> int:
    from ..bench import run as run_bench

    return run_bench(options_from_args(args))
