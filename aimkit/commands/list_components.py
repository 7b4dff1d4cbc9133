"""``aimkit list``: registered presets and components."""

from __future__ import annotations

HELP = "list registered generator presets and components"

__all__ = ["HELP", "add_arguments", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("pattern", nargs="?", default=None, help="fnmatch pattern, e.g. 'aim-*'")


def run(args) -> int:
    from ..errors import ConfigError
    from ..registry import BACKBONES, CONDITIONING, GENERATORS, SAMPLERS, TOKENIZERS

    found = False
    for reg in (GENERATORS, TOKENIZERS, BACKBONES, CONDITIONING, SAMPLERS):
        names = reg.names(args.pattern)
        if names:
            found = True
            print(f"{reg.kind}s: {', '.join(names)}")
    if not found:
        raise ConfigError(f"no registered name matches {args.pattern!r}; `aimkit list` shows them all")
    return 0
