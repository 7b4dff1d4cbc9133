"""``aimkit list``: registered presets (size, resolution, classes, where the weights come from) and
components.

::

    aimkit list                      # every preset and component
    aimkit list 'aim-*'              # names matching a pattern
    aimkit list aim-b --classes      # the class names labels can be given by

Sizes are counted on PyTorch's meta device: nothing is allocated, nothing is downloaded.
"""

from __future__ import annotations

import math

HELP = "list registered generator presets (size, resolution, weights) and components"
DESCRIPTION = __doc__.split("\n\n")[0]

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run", "preset_rows"]

_COLUMNS = ("preset", "parameters", "resolution", "classes", "weights")


def add_arguments(parser) -> None:
    parser.add_argument("pattern", nargs="?", default=None, help="fnmatch pattern, e.g. 'aim-*'")
    parser.add_argument("--classes", action="store_true",
                        help="print the class names of the matching presets (id and name, one a line)")


def _count(n: int) -> str:
    """``147.6M``: a parameter count in three significant figures."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}" if n < 100 * size else f"{n / size:.1f}{unit}"
    return str(n)


def _resolution(config, meta) -> str:
    """``256x256`` (pixels: the token grid times the tokenizer's downsampling) or ``16x16 tokens``."""
    side = math.isqrt(config.num_tokens)
    if side * side != config.num_tokens:
        return f"{config.num_tokens} tokens"
    tokenizer = getattr(meta, "tokenizer", None)
    if tokenizer is None:
        return f"{side}x{side} tokens"
    pixels = side * tokenizer.downsample
    return f"{pixels}x{pixels}"


def preset_rows(pattern: str | None = None) -> list[tuple[str, ...]]:
    """One row per registered preset matching ``pattern``: name, parameters (the generator's, the
    tokenizer not counted), resolution, number of classes (``named`` when it has class names) and
    where its weights come from (:func:`aimkit.presets.weights_source`)."""
    from ..build import _meta_generator, resolve_config
    from ..errors import AimkitError
    from ..presets import weights_source
    from ..registry import GENERATORS

    rows = []
    for name in GENERATORS.names(pattern):
        config = resolve_config(name)
        try:
            meta = _meta_generator(config, None)
        except (AimkitError, RuntimeError, TypeError, ValueError):  # a plugin preset that cannot build on meta
            meta = None
        params = "?" if meta is None else _count(meta.num_params())
        resolution = "?" if meta is None else _resolution(config, meta)
        classes = f"{config.num_classes}" + (" named" if config.class_names else "")
        rows.append((name, params, resolution, classes, weights_source(name)))
    return rows


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    right = {1}  # parameters: right-aligned
    lines = []
    for row in [_COLUMNS, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def _print_classes(pattern: str | None) -> bool:
    from ..build import resolve_config
    from ..registry import GENERATORS

    names = GENERATORS.names(pattern)
    for name in names:
        config = resolve_config(name)
        if not config.class_names:
            print(f"{name}: {config.num_classes} unnamed classes (labels are ids 0..{config.num_classes - 1})")
            continue
        print(f"{name}: {config.num_classes} classes")
        print("\n".join(f"  {i} {label}" for i, label in enumerate(config.class_names)))
    return bool(names)


def run(args) -> int:
    from ..errors import ConfigError
    from ..registry import BACKBONES, CONDITIONING, SAMPLERS, TOKENIZERS

    if args.classes:
        if not _print_classes(args.pattern):
            raise ConfigError(f"no preset matches {args.pattern!r}; `aimkit list` shows them all")
        return 0
    found = False
    rows = preset_rows(args.pattern)
    if rows:
        found = True
        print("generators (parameters counted without the tokenizer; weights: shipped inside aimkit, "
              "published on the Hugging Face Hub, or none):")
        print(_table(rows))
    for reg in (TOKENIZERS, BACKBONES, CONDITIONING, SAMPLERS):
        names = reg.names(args.pattern)
        if names:
            found = True
            print(f"{reg.kind}s: {', '.join(names)}")
    if not found:
        raise ConfigError(f"no registered name matches {args.pattern!r}; `aimkit list` shows them all")
    return 0
