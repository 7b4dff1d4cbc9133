"""``aimkit list``: registered presets and components."""

from __future__ import annotations

HELP = "list registered generator presets and components"


def add_arguments(parser) -> None:
    parser.add_argument("pattern", nargs="?", default=None, help="fnmatch pattern, e.g. 'aim-*'")


def run(args) -> int:
    from ..registry import BACKBONES, CONDITIONING, GENERATORS, SAMPLERS, TOKENIZERS

    for reg in (GENERATORS, TOKENIZERS, BACKBONES, CONDITIONING, SAMPLERS):
        names = reg.names(args.pattern)
        if names:
            print(f"{reg.kind}s: {', '.join(names)}")
    return 0
