"""Which of aimkit's fused decode kernels (:mod:`._triton_ops`) a decode step may use.

The kernels need CUDA tensors and Triton; everywhere else (CPU, no Triton, or switched off) the
callers run their PyTorch code, which is the reference the kernels are tested against. Importing
this module imports nothing heavy: Triton is loaded on the first CUDA query.

Switch: the environment variable ``AIMKIT_DECODE_KERNELS`` (read at every call, so a benchmark
can compare variants in one process — clear captured CUDA graphs in between):

* unset or ``all``: every kind of :data:`KINDS` (not the opt-in kinds of :data:`OPT_IN_KINDS`);
* ``none``: none (PyTorch convolution, mamba-ssm's ``selective_state_update`` and the unfused
  block arithmetic);
* a comma list of kinds:

  - ``ssm``: Mamba2's state update in aimkit's kernel (:func:`~._triton_ops.ssm_step_`);
  - ``conv``: Mamba2's convolution step in its own kernel (:func:`~._triton_ops.conv_step_`);
  - ``conv-in-ssm`` (opt-in, for comparisons): the convolution computed inside the state kernel
    (:func:`~._triton_ops.conv_ssm_step_`, one launch instead of two) when ``ssm`` is on too. On
    an H200 it was slower (AiM-B, 512 rows: 4.19 against 3.32 ms per step; every tile recomputes
    its group's B and C convolution), hence not in ``all``;
  - ``proj-conv`` (opt-in): Mamba2's ``in_proj`` as a Triton GEMM that computes the convolution
    step in its epilogue (:func:`~._triton_ops.in_proj_conv_step_`), replacing cuBLAS and the
    convolution kernel, with or without ``conv``; only for bfloat16 / float16 models, and not
    when ``conv-in-ssm`` moves the convolution into the state kernel. On an H200 it was slower at
    512 rows (AiM-B 14.3 against 12.6 µs per layer) and faster at 32 (4.8 against 5.4 µs);
  - ``pdl`` (opt-in): launch the three kernels with Hopper's programmatic dependent launch, so
    that each starts while the previous kernel finishes (the state kernel loads its state before
    waiting); ignored before compute capability 9.0;
  - ``norm``: the glue between sublayers (:func:`~._triton_ops.add_norm_modulate`);
  - ``gnorm``: Mamba2's gated RMSNorm folded into the other two (the state kernel writes the
    norm's numerator and partial sums of squares, ``add_norm_modulate`` applies the per-row factor
    after ``out_proj``); used only when ``ssm``, ``norm`` and ``gnorm`` are all enabled.

A sublayer whose output still lacks such a per-row factor hands it on as a :class:`PendingRowNorm`.
"""

from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType
from typing import NamedTuple, Optional

import torch

__all__ = ["KINDS", "OPT_IN_KINDS", "PendingRowNorm", "decode_ops", "enabled_kinds"]

KINDS = ("ssm", "conv", "norm", "gnorm")  # what "all" enables
OPT_IN_KINDS = ("conv-in-ssm", "proj-conv", "pdl")  # named explicitly only
_ENV = "AIMKIT_DECODE_KERNELS"


class PendingRowNorm(NamedTuple):
    """The per-row factor of an RMSNorm that a sublayer folded past its linear output projection.

    The sublayer's true output is ``out * rsqrt(partials.sum(-1) / dim + eps)`` per row; the fused
    glue (:func:`~._triton_ops.add_norm_modulate`, ``hidden_sq_partials``) applies it for free,
    anything else calls :meth:`apply`.

    Attributes:
        partials: (B, T) float32 partial sums of squares of the normalised quantity, T tiles.
        dim: channels the sums cover (the mean's divisor).
        eps: the norm's epsilon.
    """

    partials: torch.Tensor
    dim: int
    eps: float

    def apply(self, out: torch.Tensor) -> torch.Tensor:
        """The normalised output: out (B, ...) times each row's factor (float32 inside), in out's dtype."""
        factor = torch.rsqrt(self.partials.sum(-1) / self.dim + self.eps)  # (B,)
        ct = torch.promote_types(out.dtype, torch.float32)
        return (out.to(ct) * factor.to(ct).view(-1, *([1] * (out.dim() - 1)))).to(out.dtype)


def enabled_kinds() -> frozenset:
    """The kernel kinds ``AIMKIT_DECODE_KERNELS`` allows (:data:`KINDS` by default)."""
    return _parse_kinds(os.environ.get(_ENV, "all"))


@functools.lru_cache(maxsize=16)
def _parse_kinds(raw: str) -> frozenset:
    # cached per value: a decode step asks for several kinds per layer, and the variable is read
    # at every call so that a benchmark can switch it between runs
    value = raw.strip().lower()
    if value in ("", "all"):
        return frozenset(KINDS)
    if value == "none":
        return frozenset()
    kinds = frozenset(k.strip() for k in value.split(",") if k.strip())
    unknown = kinds - set(KINDS + OPT_IN_KINDS)
    if unknown:
        raise ValueError(f"{_ENV}={value!r}: unknown kernel kinds {sorted(unknown)}; use 'all', 'none' "
                         f"or a comma list of {list(KINDS + OPT_IN_KINDS)}")
    return kinds


@functools.lru_cache(maxsize=None)
def _load() -> Optional[ModuleType]:
    """The kernel module, imported on the first CUDA query (None, with one warning, without Triton)."""
    try:
        from . import _triton_ops
    except Exception as exc:  # noqa: BLE001  (no Triton: the PyTorch path is complete)
        warnings.warn(f"aimkit's fused decode kernels are unavailable ({type(exc).__name__}: {exc}); "
                      "decoding uses the unfused path")
        return None
    return _triton_ops


def decode_ops(x: torch.Tensor, kind: str) -> Optional[ModuleType]:
    """The kernel module when kernel ``kind`` may run on tensors like ``x`` (CUDA, not float64),
    else None."""
    if kind not in KINDS + OPT_IN_KINDS:
        raise ValueError(f"unknown decode kernel kind {kind!r}; known: {list(KINDS + OPT_IN_KINDS)}")
    if not x.is_cuda or x.dtype == torch.float64 or kind not in enabled_kinds():
        return None  # float64 models keep their float64 state: the kernels compute in float32
    return _load()
