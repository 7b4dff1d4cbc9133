"""The glue between two sublayers of a block, in PyTorch: the reference of operation ``decode_glue``.

Around every sublayer (mixer, MLP) a :class:`~aimkit.backbones.base.Block` adds the gated output
to the float32 residual stream, RMS-normalises it and applies the adaLN modulation.
:func:`add_norm_modulate` is that arithmetic as one pure function over whole sequences: compiled
in training (:class:`~aimkit.kernels.compiled.TrainCompiled`, policy ``compile_glue``), and the
reference of the decode step's Triton kernel (:func:`aimkit.kernels.decode_glue.add_norm_modulate`,
which computes the same per row).

:class:`DeferredRowNorm` is the per-row factor of an RMSNorm that a sublayer folded past its
linear output projection (Mamba2's gated norm with policy ``fold_gated_norm``): the decode glue
kernel applies it for free, anything else calls :meth:`DeferredRowNorm.apply`.

Torch only: importing this module never imports Triton.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DeferredRowNorm", "add_norm_modulate"]


class DeferredRowNorm(NamedTuple):
    """The per-row factor of an RMSNorm that a sublayer folded past its linear output projection.

    The sublayer's true output is ``out * rsqrt(partials.sum(-1) / dim + eps)`` per row; the
    decode glue kernel (:func:`aimkit.kernels.decode_glue.add_norm_modulate`,
    ``hidden_sq_partials``) applies it, anything else calls :meth:`apply`.

    Attributes:
        partials: (B, T) float32 partial sums of squares of the normalised quantity, T tiles.
        dim: channels the sums cover (the mean's divisor).
        eps: the norm's epsilon.
    """

    partials: Tensor
    dim: int
    eps: float

    def apply(self, out: Tensor) -> Tensor:
        """The normalised output: out (B, ...) times each row's factor (float32 inside), in out's dtype."""
        factor = torch.rsqrt(self.partials.sum(-1) / self.dim + self.eps)  # (B,)
        ct = torch.promote_types(out.dtype, torch.float32)
        return (out.to(ct) * factor.to(ct).view(-1, *([1] * (out.dim() - 1)))).to(out.dtype)


def add_norm_modulate(
    hidden: Tensor, gate: Tensor | None, residual: Tensor | None, weight: Tensor, eps: float,
    shift: Tensor | None, scale: Tensor | None, out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """The glue between two sublayers of a whole sequence, as one function.

    ``residual = gate * hidden + residual`` (float32), then ``rmsnorm(residual) * weight`` and the
    adaLN modulation ``* (1 + scale) + shift``: what :class:`~aimkit.backbones.base.Block` does
    around each sublayer, with the gate of the previous sublayer folded in. ``gate * hidden`` is
    formed in float32 (the unfused block rounds it to the model dtype first).

    Args:
        hidden: (B, L, D) output of the previous sublayer (or the embedded sequence).
        gate: optional (B, D) gate of the previous sublayer.
        residual: optional (B, L, D) float32 residual stream (None: it starts here).
        weight: (D,) RMSNorm weight; eps: its epsilon.
        shift, scale: optional (B, D) modulation (both or neither).
        out_dtype: dtype of ``out`` (the next sublayer's compute dtype).

    Returns:
        ``(out, residual)``: out (B, L, D) in ``out_dtype``, residual (B, L, D) float32.
    """
    if (shift is None) != (scale is None):
        raise ValueError("add_norm_modulate: give both shift and scale, or neither")
    r = hidden.float()
    if gate is not None:
        r = r * gate.float().unsqueeze(1)
    if residual is not None:
        r = r + residual
    h = F.rms_norm(r.to(weight.dtype), (r.shape[-1],), weight, eps)  # (B, L, D)
    if shift is not None:
        h = h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # adaLN modulation
    return h.to(out_dtype), r
