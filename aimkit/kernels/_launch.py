"""What every Triton launch of :mod:`aimkit.kernels` shares (torch only)."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def on_device(t: Tensor):
    """Launch on ``t``'s GPU: Triton launches on the current CUDA device, which may be another."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_vectors(name: str, length: int, **vectors) -> None:
    """Each given tensor of ``vectors`` (None: absent) must be a contiguous ``(length,)`` vector."""
    for arg, t in vectors.items():
        if t is not None and (t.shape != (length,) or t.stride(0) != 1):
            raise ValueError(f"{name}: {arg} must be a contiguous ({length},) tensor, got {tuple(t.shape)}")


def check_last_dim_contiguous(name: str, **tensors) -> None:
    """Each given tensor (None: absent) must have a contiguous last dimension."""
    for arg, t in tensors.items():
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name}: {arg} needs a contiguous last dimension, got strides {t.stride()}")
