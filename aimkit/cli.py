"""The ``aimkit`` command line: ``aimkit [-v | -q] <command> [options]``.

Each subcommand lives in its own module under :mod:`aimkit.commands` and provides
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. User errors
(:class:`~aimkit.errors.AimkitError`, bad arguments) print one line and exit with status 2.

aimkit logs through :mod:`logging` (loggers under ``"aimkit"``; the library adds no handlers). For
the length of a command, :func:`main` sets the level of the ``"aimkit"`` logger and adds one handler
that writes each record as a line on stderr (above any progress bar): ``-v`` / ``--verbose`` DEBUG,
by default INFO (status lines such as what was written), ``-q`` / ``--quiet`` WARNING and no progress
bars. Both flags may stand before or after the command (``aimkit -q sample ...`` or
``aimkit sample ... -q``). A command's own output (tables, numbers) goes to stdout whatever the level.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
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


_VERBOSITY_HELP = {
    "verbose": "also show debug lines (settings, timings) on stderr",
    "quiet": "show only warnings and errors: no status lines, no progress bars",
}


class _StderrHandler(logging.Handler):
    """Each record as one line on the current ``sys.stderr``, written around any tqdm bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    """Status lines as they are; debug lines marked with the logger's name."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno < logging.INFO:
            text = f"debug: {record.name}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


@contextlib.contextmanager
def _logging_to_stderr(level: int):
    """The ``"aimkit"`` logger at ``level`` with a stderr handler, restored afterwards."""
    logger = logging.getLogger("aimkit")
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    old_level = logger.level
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _add_verbosity(parser: argparse.ArgumentParser, default) -> None:
    """``-v`` / ``-q`` on the main parser (default False) and on every command (default SUPPRESS, so
    a flag given before the command is kept)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default, help=_VERBOSITY_HELP["verbose"])
    group.add_argument("-q", "--quiet", action="store_true", default=default, help=_VERBOSITY_HELP["quiet"])


def _log_level(parser: argparse.ArgumentParser, args) -> int:
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    if verbose and quiet:
        parser.error("argument -q/--quiet: not allowed with argument -v/--verbose")
    if quiet:
        if hasattr(args, "no_progress"):
            args.no_progress = True
        return logging.WARNING
    return logging.DEBUG if verbose else logging.INFO


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``PROG: error: ...``, with exit code 2 (no usage dump).

    ``error_prog`` names the program in errors when it differs from ``prog`` (the usage's)."""

    def __init__(self, *args, error_prog: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.error_prog = error_prog

    def error(self, message: str):
        self.exit(2, f"{self.error_prog or self.prog}: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = OneLineParser(prog="aimkit", description="Autoregressive image generation with Mamba (AiM).")
    parser.add_argument("--version", action="version", version=f"aimkit {__version__}")
    _add_verbosity(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # command not shipped in this build
                continue
            raise
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        module.add_arguments(p)
        _add_verbosity(p, argparse.SUPPRESS)
        p.set_defaults(_run=module.run)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None):
    """Parsed arguments; ``KEY=VALUE`` overrides of ``aimkit train`` may also follow its options
    (``--config aim_b --resume auto lr=1e-4``: argparse fills a ``nargs="*"`` positional only once)."""
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and not any(a.startswith("-") for a in extra):
        args.overrides += extra
    elif extra:  # named after the subcommand that did not take them
        command = getattr(args, "command", None)
        prog = f"{parser.prog} {command}" if command else parser.prog
        parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extra)}\n")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = _parse(parser, argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    with _logging_to_stderr(_log_level(parser, args)):
        return _run(args)


def _run(args) -> int:
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
