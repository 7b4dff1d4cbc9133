"""``aimkit convert``: an official AiM checkpoint (or any loadable file) to aimkit's own format."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ._args import positive_int

HELP = "convert official AiM or LlamaGen weights into an aimkit save_pretrained directory"
DESCRIPTION = (
    "Load a checkpoint strictly into a preset (official AiM layout with mamba./vqvae. keys, a LlamaGen GPT "
    "checkpoint into a llamagen-* preset, LlamaGen's VQ file via --tokenizer-weights, or aimkit's layout) "
    "and write config.json + model.safetensors, "
    "which aimkit.build(DIR) loads. Optionally change the conditioning kind exactly (--conditioning). "
    "DIR must be new or empty (--force writes into a non-empty one); it appears complete or not at all."
)

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("weights", help="checkpoint file or directory (.safetensors, .bin, .pt)")
    parser.add_argument("out", help="output directory (new or empty)")
    parser.add_argument("--model", required=True, help="preset the weights belong to, e.g. aim-xl")
    parser.add_argument("--tokenizer-weights", default=None,
                        help="separate tokenizer file (LlamaGen vq_ds16_c2i.pt): needed when the checkpoint holds "
                             "none and the preset has a tokenizer (LlamaGen GPT checkpoints)")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="save the generator alone (the saved model then samples tokens, not pixels)")
    parser.add_argument("--conditioning", default=None, help="convert to this conditioning kind, e.g. adaln")
    parser.add_argument("--num-groups", type=positive_int, default=None,
                        help="groups for --conditioning adaln-group")
    parser.add_argument("--force", action="store_true",
                        help="write into OUT even when it already holds files (config.json and "
                             "model.safetensors are replaced, other files are left alone)")


def check_target(out: Path, force: bool) -> None:
    """Refuse an output that is a file, or a non-empty directory without ``force``; make sure
    the place is writable before the (possibly long) conversion starts."""
    from .._io import check_writable_dir
    from ..errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not force:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(
            f"output directory {out} is not empty ({shown}); choose a new directory or pass --force to write into it"
        )
    check_writable_dir(out if out.is_dir() else out.parent, "output folder", ConfigError)


def save_atomically(gen, out: Path) -> Path:
    """``gen.save_pretrained(out)`` so that ``out`` appears complete or not at all.

    A new (or empty) ``out`` is written as a hidden sibling folder, flushed and renamed into
    place; a non-empty one (``--force``) gets each file replaced atomically, config.json last."""
    from .._io import fsync_dir, fsync_tree
    from ..errors import ConfigError

    if out.is_dir() and any(out.iterdir()):
        return gen.save_pretrained(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        gen.save_pretrained(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
        fsync_tree(tmp)
        try:
            os.replace(tmp, out)  # out is absent or an empty directory
        except OSError as exc:
            raise ConfigError(f"cannot move the converted model into {out}: {exc.strerror}") from None
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_tokenizer_source(args) -> None:
    """Refuse to save a random tokenizer: a preset with one needs its weights in the checkpoint,
    from ``--tokenizer-weights``, or ``--no-tokenizer``."""
    from ..build import resolve_config
    from ..errors import ConfigError
    from ..weights import GENERATOR_WRAPPER_KEYS, read_tensor_shapes

    if args.no_tokenizer or args.tokenizer_weights or not Path(args.weights).exists():
        return  # (a missing file: aimkit.build says so)
    if resolve_config(args.model).tokenizer is None:
        return
    names = read_tensor_shapes(args.weights, wrappers=GENERATOR_WRAPPER_KEYS)
    if not any(k.startswith(("tokenizer.", "vqvae.")) for k in names):
        raise ConfigError(f"{args.weights} holds no tokenizer weights but {args.model} has a tokenizer: pass "
                          "--tokenizer-weights FILE (LlamaGen's vq_ds16_c2i.pt) or --no-tokenizer")


def run(args) -> int:
    import aimkit

    from ..errors import ConfigError

    if args.num_groups is not None and not args.conditioning:
        raise ConfigError("--num-groups needs --conditioning (e.g. --conditioning adaln-group)")
    if args.no_tokenizer and args.tokenizer_weights:
        raise ConfigError("--no-tokenizer and --tokenizer-weights exclude each other")
    out = Path(args.out)
    check_target(out, args.force)
    check_tokenizer_source(args)
    kwargs = {"tokenizer": None} if args.no_tokenizer else {"tokenizer_weights": args.tokenizer_weights}
    gen = aimkit.build(args.model, pretrained=args.weights, **kwargs)
    if args.conditioning:
        kwargs = {} if args.num_groups is None else {"num_groups": args.num_groups}
        gen = gen.convert_conditioning(args.conditioning, **kwargs)
    check_target(out, args.force)  # still new or empty after the conversion?
    save_atomically(gen, out)
    print(f"wrote {out} ({gen.num_params():,} generator parameters)")
    return 0
