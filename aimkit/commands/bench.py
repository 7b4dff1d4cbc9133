"""``aimkit bench``: sampling / decode-step / training throughput against the physical floors.

See :mod:`aimkit.bench` for what is measured and how the floors are counted. Writes
``bench.json``, ``bench.md``, ``bench.log`` and up to three PNG plots to ``--out`` (default
``$OUT`` when set, else ``./bench_out``) and prints a compact table last.
"""

from __future__ import annotations

import argparse
import ast
from typing import Any

from . import _args

HELP = "benchmark sampling, decode steps and training against the memory/compute floors"
DESCRIPTION = (
    "Benchmark random-weight generators: device ceilings, a correctness check of the fast path, "
    "sampling throughput (images/s, first call, peak memory, fraction of the floor), optional "
    "transformer comparison, decode-step timing and training-step throughput. On a GPU the grid "
    "defaults to the AiM presets; with --device cpu to the tiny aim-tiny-shapes preset at small "
    "batches (seconds). The kernel variant under test is an execution policy (--policy)."
)
_DEVICE_DEFAULT = "(default: per device, see aimkit.bench.CUDA_DEFAULTS / CPU_DEFAULTS)"


def _csv(kind):
    def parse(text: str) -> list[Any]:
        try:
            return list(dict.fromkeys(kind(item) for item in text.split(",") if item.strip()))  # first of repeats
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
        parsed = value  # a bare string
    return key.strip(), parsed


def _policy_help() -> str:
    from ..policy import ExecutionPolicy

    fields = ", ".join(f"{name} ({value!r})" for name, value in ExecutionPolicy().to_dict().items())
    return ("execution policy under test, FIELD=VALUE[,FIELD=VALUE...], e.g. "
            "--policy state_dtype=model,decode_graph=false; operations take auto, kernel or reference. "
            f"Fields (default): {fields}. Unset fields come from aimkit.policy.default_policy() "
            "(environment defaults). Training rows set train_step to their mode (eager; on CUDA also "
            "layer-graphs and cuda-graph); under train_step auto the eager row also drops compile_glue, as the "
            "trainer's eager fallback does (train_step=eager keeps it). "
            "Every row records the policy and what it resolved to on the device")


def _add_grid_arguments(parser) -> None:
    parser.add_argument("--suite", default="sampling", choices=("sampling", "decode", "train", "all"),
                        help="what to run (default sampling; the correctness check always runs first)")
    parser.add_argument("--models", type=_csv(str), default=None,
                        help=f"presets for the sampling grid {_DEVICE_DEFAULT}: aim-b,aim-l,aim-xl on CUDA, "
                             "aim-tiny-shapes on the CPU")
    parser.add_argument("--batches", type=_csv(int), default=None,
                        help="images per batch (default 16,64,256 on CUDA, 1,4 on the CPU)")
    parser.add_argument("--tokens", type=_csv(int), default=None,
                        help="tokens per image of the sampling grid (256 = 256 px, 576 = 384 px, 1024 = 512 px; "
                             "default 256); the first one is used by decode, train and the correctness check")
    parser.add_argument("--dtype", default="bfloat16",
                        help="parameter dtype for sampling, autocast dtype for training, and the dtype of the "
                             "measured matmul rate (default bfloat16)")
    parser.add_argument("--transformer", action="store_true",
                        help="add a transformer of matching size (n_head = d_model/64) beside every sampling row")
    parser.add_argument("--compare-models", type=_csv(str), default=[],
                        help="presets for the Mamba2-vs-transformer comparison over --compare-tokens")
    parser.add_argument("--compare-batches", "--compare-batch", dest="compare_batches", type=_csv(int), default=None,
                        help=f"batches of the comparison, e.g. 16,256 {_DEVICE_DEFAULT}")
    parser.add_argument("--compare-tokens", type=_csv(int), default=None,
                        help="token counts of the comparison (default 256,576,1024 on CUDA, 64,256 on the CPU)")
    parser.add_argument("--decode-vq", action="store_true",
                        help="also time VQ decoding of each sampled batch (random tokenizer weights) and the "
                             "`aimkit sample` loop end to end: 3 batches sampled, decoded and written as shards")
    parser.add_argument("--decode-models", type=_csv(str), default=None, help=f"decode-step rows {_DEVICE_DEFAULT}")
    parser.add_argument("--decode-batches", type=_csv(int), default=None,
                        help=f"decode-step batches {_DEVICE_DEFAULT}")
    parser.add_argument("--train-models", type=_csv(str), default=None, help=f"training-step rows {_DEVICE_DEFAULT}")
    parser.add_argument("--train-batch", type=int, default=None, help=f"training batch {_DEVICE_DEFAULT}")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps (default 10)")
    parser.add_argument("--check-model", default=None,
                        help=f"preset of the correctness check, built with 4 layers {_DEVICE_DEFAULT}")


def add_arguments(parser) -> None:
    _add_grid_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per row after the first call (default 3)")
    parser.add_argument("--policy", type=_args.policy, default=None, metavar="FIELD=VALUE,...",
                        help=_policy_help())
    parser.add_argument("--override", type=_override, action="append", default=[], metavar="KEY=VALUE",
                        help="architecture override for every model, e.g. --override n_layer=4 (repeatable)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (tiny models, seconds)")
    parser.add_argument("--reference", default=None, metavar="JSON",
                        help="reference figures drawn beside the results (e.g. docs/data/official_reference.json)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="start no new row after this many seconds (0 = no limit); outputs are always written")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the correctness check")
    parser.add_argument("--require-kernels", action="store_true",
                        help="stop (exit 3) on CUDA when mamba-ssm's kernels cannot be imported")
    parser.add_argument("--seed", type=int, default=0, help="weights and sampling seed (default 0)")
    parser.add_argument("--out", default=None, help="output folder (default $OUT, else ./bench_out)")


def _check_numbers(opts) -> None:
    """Every count positive, the time budget a finite number >= 0 (one line each, before any work)."""
    import math

    from ..errors import ConfigError

    for name in ("repeats", "train_steps", "train_batch"):
        if getattr(opts, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    for name in ("batches", "tokens", "compare_batches", "compare_tokens", "decode_batches"):
        values = list(getattr(opts, name))
        if not values and (name in ("batches", "tokens") or (name.startswith("compare") and opts.compare_models)):
            raise ConfigError(f"--{name.replace('_', '-')} is empty")
        if any(v <= 0 for v in values):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {','.join(map(str, values))}")
    if not math.isfinite(opts.budget_s) or opts.budget_s < 0:
        raise ConfigError(f"--budget-s must be a finite number of seconds >= 0, got {opts.budget_s}")


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


def _check_overrides(opts) -> None:
    """The ``--override`` values are valid for the correctness check's model (nothing is built).
    An unknown preset name among known ones is not refused here (its rows fail and the table is
    kept); a run in which no name is known would measure nothing, and is refused."""
    from ..build import resolve_config
    from ..errors import AimkitError, ConfigError

    names = {*(opts.models if opts.wants("sampling") else ()), *(opts.compare_models if opts.wants("sampling") else ()),
             *(opts.decode_models if opts.wants("decode") else ()), *(opts.train_models if opts.wants("train") else ())}
    known = set()
    for name in names:
        try:
            resolve_config(name)
            known.add(name)
        except AimkitError as exc:
            last = exc
    if names and not known:
        raise ConfigError(f"no model to measure: {last}")
    resolve_config(opts.check_model, **{**opts.overrides, "tokenizer": None, "num_tokens": opts.tokens[0]})


_SAME_NAME = ("suite", "models", "batches", "tokens", "dtype", "transformer", "compare_batches", "compare_tokens",
              "decode_vq", "decode_models", "decode_batches", "train_models", "train_batch", "train_steps", "repeats",
              "out", "device", "check_model", "reference", "budget_s", "check", "require_kernels", "seed")


def options_from_args(args):
    """:class:`aimkit.bench.BenchOptions` (device defaults filled in) from parsed arguments, checked
    before any work starts."""
    from .._io import check_writable_dir
    from ..bench import BenchOptions, load_reference
    from ..errors import ConfigError
    from ..policy import default_policy

    _check_device_and_dtype(args)
    given = {name: getattr(args, name) for name in _SAME_NAME}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    opts = BenchOptions(**given, compare_models=tuple(args.compare_models), overrides=dict(args.override),
                        policy=args.policy or default_policy()).resolved()
    _check_numbers(opts)
    _check_overrides(opts)
    if opts.reference is not None:
        load_reference(opts.reference)
    if opts.out is not None:
        check_writable_dir(opts.out, "output folder", ConfigError)
    return opts


def run(args) -> int:
    from ..bench import run as run_bench

    return run_bench(options_from_args(args))
