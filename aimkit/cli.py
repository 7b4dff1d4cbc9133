"""The ``aimkit`` command line: ``aimkit <command> [options]``.

Each subcommand lives in its own module under :mod:`aimkit.commands` and provides
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. User errors
(:class:`~aimkit.errors.AimkitError`, bad arguments) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import AimkitError, environment_error_message

__all__ = ["main", "COMMANDS"]

# command name -> module; imported only when listed in --help or run
COMMANDS = {
    "generate": "aimkit.commands.generate",
    "sample": "aimkit.commands.sample",
    "fid": "aimkit.commands.fid",
    "eval": "aimkit.commands.eval",
    "train": "aimkit.commands.train",
    "plot": "aimkit.commands.plot",
    "tokenize": "aimkit.commands.tokenize",
    "bench": "aimkit.commands.bench",
    "convert": "aimkit.commands.convert",
    "list": "aimkit.commands.list_components",
    "info": "aimkit.commands.info",
    "serve": "aimkit.commands.serve",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="aimkit", description="Autoregressive image generation with Mamba (AiM).")
    parser.add_argument("--version", action="version", version=f"aimkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # command not shipped in this build
                continue
            raise
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except AimkitError as exc:
        print(f"aimkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aimkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        message = environment_error_message(exc)
        if message is None:
            raise
        print(f"aimkit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
