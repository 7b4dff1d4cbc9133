"""Which of aimkit's fused decode kernels (:mod:`._triton_ops`) a decode step may use.

The kernels need CUDA tensors and Triton; everywhere else (CPU, no Triton, or switched off) the
callers run their PyTorch code, which is the reference the kernels are tested against. Importing
this module imports nothing heavy: Triton is loaded on the first CUDA query.

Switch: the environment variable ``AIMKIT_DECODE_KERNELS`` (read at every call, so a benchmark
can compare variants in one process — clear captured CUDA graphs in between):

* unset or ``all``: every fused kernel;
* ``none``: none (mamba-ssm's ``selective_state_update`` and the unfused block arithmetic);
* a comma list of ``ssm`` (:func:`~._triton_ops.ssm_step_`), ``conv``
  (:func:`~._triton_ops.conv_step_`) and ``norm`` (:func:`~._triton_ops.add_norm_modulate`).
"""

from __future__ import annotations

import os
import threading
import warnings
from types import ModuleType
from typing import Optional

import torch

__all__ = ["KINDS", "decode_ops", "enabled_kinds"]

KINDS = ("ssm", "conv", "norm")
_ENV = "AIMKIT_DECODE_KERNELS"

_lock = threading.Lock()
_loaded = False
_module: Optional[ModuleType] = None


def enabled_kinds() -> frozenset:
    """The kernel kinds ``AIMKIT_DECODE_KERNELS`` allows (all by default)."""
    value = os.environ.get(_ENV, "all").strip().lower()
    if value in ("", "all"):
        return frozenset(KINDS)
    if value == "none":
        return frozenset()
    kinds = frozenset(k.strip() for k in value.split(",") if k.strip())
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"{_ENV}={value!r}: unknown kernel kinds {sorted(unknown)}; use 'all', 'none' "
                         f"or a comma list of {list(KINDS)}")
    return kinds


def _load() -> Optional[ModuleType]:
    global _loaded, _module
    if not _loaded:
        with _lock:
            if not _loaded:
                try:
                    from . import _triton_ops

                    _module = _triton_ops
                except Exception as exc:  # noqa: BLE001  (no Triton: the PyTorch path is complete)
                    warnings.warn(f"aimkit's fused decode kernels are unavailable ({type(exc).__name__}: {exc}); "
                                  "decoding uses the unfused path")
                    _module = None
                _loaded = True
    return _module


def decode_ops(x: torch.Tensor, kind: str) -> Optional[ModuleType]:
    """The kernel module when kernel ``kind`` may run on tensors like ``x`` (CUDA, not float64),
    else None."""
    if kind not in KINDS:
        raise ValueError(f"unknown decode kernel kind {kind!r}; known: {list(KINDS)}")
    if not x.is_cuda or x.dtype == torch.float64 or kind not in enabled_kinds():
        return None  # float64 models keep their float64 state: the kernels compute in float32
    return _load()
