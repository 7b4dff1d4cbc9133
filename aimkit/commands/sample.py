"""``aimkit sample``: many class-conditional samples for FID, sharded, resumable, multi-GPU.

::

    aimkit sample --model aim-xl --pretrained published --num 50000 --out samples.npz
    accelerate launch --num_processes 8 -m aimkit.cli sample --model aim-xl --pretrained published \\
        --num 50000 --out samples.npz --dtype bfloat16

A model without weights (a preset that neither ships weights nor is given ``--pretrained``) is
refused before anything runs, unless ``--random-weights`` asks for random ones (timing runs, tests).
Sampling settings left out are the preset's FID settings (``config.fid_sampling``). Images go to
``<out>.shards/shard-NNNNN.npz`` first; the main process packs them into ``--out`` (the ADM
evaluator's ``arr_0`` / ``arr_1`` layout) once every process is done. Rerunning the same command
after an interruption generates only the missing shards.

One run at a time per shard folder: the main process holds
:class:`~aimkit._lock.FolderLock` on it from before anything is written until the npz is packed
(released by the kernel if the run dies, ``kill -9`` included). A second run into the same folder,
with any settings, stops at once with one line naming the owner (exit 2). With several processes
only the main process holds the lock (``flock`` is per process); it tells the others whether it
got it before any process writes, so every process of a refused run stops, and the non-main
processes write their shards only while their main process holds the folder. The folder of
``--out`` is not locked (it may be shared with other work); two runs into one ``--out`` share the
default shard folder and so conflict there, and with different ``--shard-dir`` each writes a complete
npz atomically (the later one stays). The output folders are checked for writability before the
model is built.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .._io import check_writable_dir
from .._lock import LOCK_NAME, lock_on_main_process
from ..build import build, resolve_config
from ..errors import ConfigError
from ._args import add_device_arguments, add_weight_arguments, check_sampling_options, weights_for
from ._args import positive_int as _positive_int
from ._args import seed as _seed

HELP = "sample images for FID into an ADM-layout .npz (sharded, resumable, accelerate-ready)"
DESCRIPTION = __doc__.split("\n\n")[0]

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run", "build_model", "lock_shard_dir", "delete_shards"]

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="preset name (see `aimkit list`) or a save_pretrained directory")
    add_weight_arguments(parser)
    parser.add_argument("--num", type=_positive_int, default=50_000, metavar="N",
                        help="number of images (default 50000, the FID protocol)")
    parser.add_argument("--out", required=True, metavar="NPZ",
                        help="packed samples to write (ADM layout: arr_0, arr_1)")
    parser.add_argument("--shard-dir", metavar="DIR", help="where the shards go (default: <out>.shards)")
    parser.add_argument(
        "--labels", default="balanced", metavar="balanced|random|FILE",
        help="'balanced' (default: num/num_classes per class, seeded order), 'random' (uniform), or a file "
        "of N class ids (.npy, or text with one id per line)",
    )
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the whole run (default 0)")
    parser.add_argument("--batch-size", type=_positive_int, default=64, metavar="N",
                        help="images per sampling call (default 64); keep it fixed when resuming")
    parser.add_argument("--shard-size", type=_positive_int, default=1000, metavar="N",
                        help="images per shard file, the unit of resuming (default 1000)")
    parser.add_argument("--cfg-scale", type=float, metavar="F", help="guidance scale (default: preset FID setting)")
    parser.add_argument("--temperature", type=float, metavar="F",
                        help="softmax temperature (default: preset FID setting)")
    parser.add_argument("--top-k", type=int, metavar="N", help="top-k, 0 = all (default: preset FID setting)")
    parser.add_argument("--top-p", type=float, metavar="F", help="nucleus mass, 1 = all (default: preset FID setting)")
    parser.add_argument("--schedule", choices=("constant", "linear"), default="constant",
                        help="guidance scale over the tokens (default constant)")
    add_device_arguments(
        parser, device_help="auto (default): the device accelerate assigns to this process (CUDA when available)")
    parser.add_argument("--decode-position-offset", type=int, choices=(0, 1),
                        help="1: feed token k at position k + 1 as the official AiM sampler does (its published "
                        "FIDs); 0: as in training (default: the model's config)")
    parser.add_argument("--delete-shards", action="store_true",
                        help="remove the shards (and the shard folder, if nothing else is in it) after packing")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (default: one bar in images, advanced at every token step, with rate "
                        "and ETA; off a terminal redrawn every 10 s)")


def _process_device(name: str, state) -> torch.device:
    """This process's device: accelerate's choice, unless one process was told otherwise."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available")
    if state.num_processes > 1 or name == "auto":
        return torch.device(state.device)
    return torch.device(name)


def _overrides(args) -> dict:
    if args.decode_position_offset is None:
        return {}
    return {"decode_position_offset": args.decode_position_offset}


def build_model(args, device: torch.device):
    """Build the generator named on the command line on ``device``."""
    pretrained = weights_for(args.model, args.pretrained, getattr(args, "random_weights", False))
    # seeded so that parameters left random (no weights given) are the same in every process and on
    # every rerun: resuming checks a fingerprint of the weights
    torch.manual_seed(args.seed)
    return build(args.model, pretrained=pretrained, device=device, dtype=args.dtype, **_overrides(args))


def _paths(args):
    """``(out, shard_dir)`` checked before any work: names, kinds, writable folders."""
    out = Path(args.out)
    if out.suffix != ".npz":
        raise ConfigError(f"--out must end in .npz (the ADM evaluator reads npz files), got {out}")
    if out.is_dir():
        raise ConfigError(f"--out {out} is an existing directory; give the .npz file's name")
    shard_dir = Path(args.shard_dir) if args.shard_dir else out.with_name(out.name + ".shards")
    if shard_dir.exists() and not shard_dir.is_dir():
        raise ConfigError(f"the shard folder {shard_dir} is an existing file (see --shard-dir)")
    check_writable_dir(out.parent, "the folder of --out", ConfigError)
    check_writable_dir(shard_dir, "the shard folder", ConfigError)
    return out, shard_dir


def lock_shard_dir(state, shard_dir: Path):
    """The main process takes the shard folder's lock; every process learns whether it got it
    (:func:`aimkit._lock.lock_on_main_process`)."""
    return lock_on_main_process(state, shard_dir, "aimkit sample")


_SAMPLING_OPTIONS = ("cfg_scale", "temperature", "top_k", "top_p", "schedule")  # passed through as given


def run(args) -> int:
    from accelerate import PartialState

    from ..eval.fid_sampling import resolve_sample_labels

    weights_for(args.model, args.pretrained, args.random_weights)  # a model without weights: refused first
    labels = args.labels if args.labels in ("balanced", "random") else Path(args.labels)
    # check the labels and the sampling settings against the config before the (slow) model build, before
    # the shard folder's manifest records them (a bad value there would refuse the corrected rerun) and
    # before _paths creates the folders (a refused command leaves no empty shard folder behind)
    config = resolve_config(args.model, **_overrides(args))
    resolve_sample_labels(labels, args.num, config.num_classes, args.seed)
    check_sampling_options(args, config.fid_sampling)
    out, shard_dir = _paths(args)

    # one process unless started by `accelerate launch` / torchrun; on CPU, gloo joins the processes
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    lock = lock_shard_dir(state, shard_dir)
    try:
        return _sample_and_pack(args, state, out, shard_dir, labels, lock)
    finally:
        if lock is not None:
            lock.release()


def delete_shards(shard_dir: Path, keep: Path) -> None:
    """Remove what a sampling run wrote into ``shard_dir`` (shards, their records and leftover temporary
    files, the manifest, the labels, the lock file), then the folder if that left it empty. Other files
    (``--shard-dir`` may be a folder in use, even the one holding ``--out``) and ``keep`` stay."""
    from ..eval.fid_sampling import LABELS_NAME, MANIFEST_NAME

    ours = [shard_dir / MANIFEST_NAME, shard_dir / LABELS_NAME, shard_dir / LOCK_NAME]
    for pattern in ("shard-[0-9]*.npz", "shard-[0-9]*.json", ".shard-[0-9]*.tmp", f".{MANIFEST_NAME}.*.tmp",
                    f".{LABELS_NAME}.*.tmp"):
        ours += sorted(shard_dir.glob(pattern))
    keep = keep.resolve()
    for path in ours:
        if path.resolve() != keep:
            path.unlink(missing_ok=True)
    try:
        shard_dir.rmdir()
    except OSError:  # other files are left there
        log.info("removed the shards from %s; the folder holds other files and stays", shard_dir)


def _sample_and_pack(args, state, out: Path, shard_dir: Path, labels, lock) -> int:
    from ..eval.fid_sampling import pack_npz, sample_to_shards

    device = _process_device(args.device, state)
    log.debug("process %d of %d builds %s on %s", state.process_index, state.num_processes, args.model, device)
    model = build_model(args, device)

    start = time.perf_counter()
    summary = sample_to_shards(
        model,
        shard_dir,
        args.num,
        labels=labels,
        seed=args.seed,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        process_index=state.process_index,
        num_processes=state.num_processes,
        progress=not args.no_progress,
        metadata={"model": args.model, "pretrained": args.pretrained, "dtype": args.dtype,
                  "decode_position_offset": getattr(model, "position_offset", None)},
        lock=lock,
        **{name: getattr(args, name) for name in _SAMPLING_OPTIONS},
    )
    seconds = time.perf_counter() - start
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0
    pack_npz(shard_dir, out, lock=lock)
    if args.delete_shards:
        delete_shards(shard_dir, keep=out)
    rate = f" ({summary.images / seconds:.2f} images/s)" if summary.images and seconds > 0 else ""
    where = f"{state.num_processes} processes" if state.num_processes > 1 else str(device)
    log.info("wrote %s: %d images (%s labels); the main process generated %d now%s on %s and skipped %d "
             "finished shards", out, args.num, args.labels, summary.images, rate, where, len(summary.skipped))
    return 0
