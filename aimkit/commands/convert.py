"""``aimkit convert``: an official AiM checkpoint (or any loadable file) to aimkit's own format."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from ._args import positive_int

log = logging.getLogger(__name__)

HELP = "convert official AiM or LlamaGen weights into an aimkit save_pretrained directory"
DESCRIPTION = (
    "Load a checkpoint strictly into a preset (official AiM layout with mamba./vqvae. keys, a LlamaGen GPT "
    "checkpoint into a llamagen-* preset, LlamaGen's VQ file via --tokenizer-weights, or aimkit's layout) "
    "and write a save_pretrained folder (config.json, generation_config.json, model.safetensors and the "
    "model card README.md), which aimkit.build(DIR) loads. Optionally change the conditioning kind exactly "
    "(--conditioning). DIR must be new or empty, and then appears complete or not at all (--force writes "
    "into a non-empty one, replacing those files one by one)."
)

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "conditioning_options", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("weights", help="checkpoint file or directory (.safetensors, .bin, .pt)")
    parser.add_argument("out", help="output directory (new or empty)")
    parser.add_argument("--model", required=True, help="preset the weights belong to, e.g. aim-xl")
    parser.add_argument("--tokenizer-weights", default=None,
                        help="separate tokenizer file (LlamaGen vq_ds16_c2i.pt): needed when the checkpoint holds "
                             "none and the preset has a tokenizer (LlamaGen GPT checkpoints)")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="save the generator alone (the saved model then samples tokens, not pixels)")
    parser.add_argument("--conditioning", default=None,
                        help="convert to this conditioning kind (adaln, adaln-single, adaln-group); refused "
                             "unless exact")
    parser.add_argument("--num-groups", type=positive_int, default=None,
                        help="groups for --conditioning adaln-group")
    parser.add_argument("--approximate", action="store_true",
                        help="with --conditioning: where layers would share a projection whose weights differ, "
                             "average them (changes the model; the largest weight change is printed)")
    parser.add_argument("--force", action="store_true",
                        help="write into OUT even when it already holds files (config.json, "
                             "generation_config.json, model.safetensors and an aimkit-generated README.md "
                             "are replaced, other files are left alone)")


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


def conditioning_options(args) -> dict:
    """The ``convert_conditioning`` options of ``--conditioning``/``--num-groups``, checked
    before any weights are read (an unknown kind or option, or more groups than layers)."""
    from ..build import resolve_config
    from ..config import config_from_dict
    from ..errors import ConfigError
    from ..registry import CONDITIONING

    if args.conditioning is None:
        for flag, given in (("--num-groups", args.num_groups is not None), ("--approximate", args.approximate)):
            if given:
                raise ConfigError(f"{flag} needs --conditioning (e.g. --conditioning adaln-group)")
        return {}
    if not args.conditioning.strip():
        raise ConfigError(f"--conditioning must name a kind ({', '.join(CONDITIONING.names())}), got an empty value")
    config_cls = CONDITIONING.get(args.conditioning).config_cls
    options = {} if args.num_groups is None else {"num_groups": args.num_groups}
    if options and "num_groups" not in {f.name for f in dataclasses.fields(config_cls)}:
        raise ConfigError(f"--num-groups does not apply to --conditioning {args.conditioning} (it has no groups)")
    config = config_from_dict(config_cls, options, where=f"--conditioning {args.conditioning}")
    groups = getattr(config, "num_groups", None)
    n_layer = resolve_config(args.model).n_layer if isinstance(groups, int) else None
    if n_layer is not None and groups > n_layer:
        raise ConfigError(f"--num-groups {groups} is more than {args.model}'s {n_layer} layers"
                          + ("" if args.num_groups is not None else " (the default; pass --num-groups)"))
    return options


def run(args) -> int:
    import aimkit

    from ..errors import ConfigError

    options = conditioning_options(args)
    if args.no_tokenizer and args.tokenizer_weights:
        raise ConfigError("--no-tokenizer and --tokenizer-weights exclude each other")
    out = Path(args.out)
    check_target(out, args.force)
    check_tokenizer_source(args)
    kwargs = {"tokenizer": None} if args.no_tokenizer else {"tokenizer_weights": args.tokenizer_weights}
    gen = aimkit.build(args.model, pretrained=args.weights, **kwargs)
    if args.conditioning is not None:
        with warnings.catch_warnings(record=True) as caught:  # each as one line on stderr
            warnings.simplefilter("always")
            gen = gen.convert_conditioning(args.conditioning, approximate=args.approximate, **options)
        for w in caught:
            log.warning("warning: %s", w.message)
    check_target(out, args.force)  # still new or empty after the conversion?
    save_atomically(gen, out)
    print(f"wrote {out} ({gen.num_params():,} generator parameters)")
    return 0
