"""``aimkit train``: train a generator from a YAML recipe (see :mod:`aimkit.training`).

::

    aimkit train --config tiny_test                                   # a shipped config, by name
    aimkit train --config recipes/configs/aim_b.yaml data=tokens/in256 output_dir=runs/b
    aimkit train --config aim_b output_dir=runs/b --resume auto       # continue a run

For several GPUs launch the module through accelerate instead:
``accelerate launch --multi_gpu --num_processes 8 -m aimkit.training --config aim_b ...``.
"""

from __future__ import annotations

HELP = "train a generator from a YAML recipe (single process; use accelerate launch -m aimkit.training for DDP)"
DESCRIPTION = "Train a generator from a YAML recipe; key=value arguments override the config."


def add_arguments(parser) -> None:
    from ..training.cli import add_arguments as _add

    _add(parser)


def run(args) -> int:
    from ..training.cli import run as _run

    if getattr(args, "quiet", False):  # -q: no progress bar (an explicit progress_bar=... still wins)
        args.overrides = ["progress_bar=false", *args.overrides]
    return _run(args)
