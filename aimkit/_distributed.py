"""Facts about how this process was launched (one process, torchrun, accelerate launch)."""

from __future__ import annotations

import os

import torch

__all__ = ["distributed_cpu", "launched_as_main"]


def distributed_cpu() -> bool:
    """True for a multi-process launch on a machine without CUDA: accelerate then needs
    ``cpu=True`` to pick gloo (``accelerate launch --cpu`` alone starts only one process)."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_as_main() -> bool:
    """False on the non-zero ranks of a multi-process launch (torchrun / accelerate set RANK)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")
