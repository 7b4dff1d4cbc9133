"""``aimkit train`` and ``python -m aimkit.training``: train a generator from a YAML recipe.

::

    aimkit train --config tiny_test                                   # a shipped config, by name
    aimkit train --config recipes/configs/aim_b.yaml data=tokens/in256 output_dir=runs/b
    aimkit train --config aim_b output_dir=runs/b --resume auto       # continue a run
    accelerate launch --multi_gpu --num_processes 8 -m aimkit.training --config aim_b ...   # DDP
"""

from __future__ import annotations

import argparse
import sys

from ..errors import AimkitError, environment_error_message
from .config import config_to_yaml, load_config
from .trainer import train

__all__ = ["add_arguments", "main", "run"]

SUMMARY = "Train a class-conditional AiM generator from a YAML recipe; key=value arguments override it."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``aimkit train`` and ``python -m aimkit.training``."""
    parser.add_argument("--config", required=True, help="YAML file, or a shipped config name (aim_b, tiny_test, ...)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the newest checkpoint in output_dir (auto) or from PATH")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. lr=3e-4 model_args.d_model=64 policy.train_step=graph")


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; returns the exit code (143 / 130 after SIGTERM / SIGINT)."""
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    return train(cfg, resume=args.resume).exit_code


def main(argv: list[str] | None = None) -> int:
    """``python -m aimkit.training``: errors caused by the input are one line and exit code 2."""
    from ..cli import OneLineParser

    parser = OneLineParser(prog="python -m aimkit.training", description=SUMMARY, error_prog="aimkit train")
    add_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # KEY=VALUE may also follow the options
    try:
        return run(args)
    except AimkitError as exc:
        print(f"aimkit train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aimkit train: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # full disk, read-only or missing folder, permissions: one line
        message = environment_error_message(exc)
        if message is None:
            raise
        print(f"aimkit train: error: {message}", file=sys.stderr)
        return 2
