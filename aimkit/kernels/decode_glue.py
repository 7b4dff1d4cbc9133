"""The glue between two sublayers of a decode step as one Triton kernel: operation ``decode_glue``.

:func:`add_norm_modulate` does ``residual += gate * hidden``, then ``rmsnorm(residual) * weight``,
then the adaLN modulation ``* (1 + scale) + shift``: one read of each input row and two writes,
instead of about nine element-wise kernels. Optionally it first scales ``hidden`` by the row
factor of a gated norm folded into the state-update kernel (a
:class:`~aimkit.kernels.glue.DeferredRowNorm`, policy ``fold_gated_norm``).

Reference: :func:`aimkit.kernels.glue.add_norm_modulate` (whole sequences) and the unfused
:class:`~aimkit.backbones.base.Block`. Float32 inside; strided views accepted (the rows of the
stacked modulation tensor); CUDA-graph capturable. Importing this module imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import on_device

__all__ = ["add_norm_modulate"]


@triton.jit
def _add_norm_modulate_kernel(
    hidden_ptr, gate_ptr, residual_ptr, weight_ptr, shift_ptr, scale_ptr, res_out_ptr, out_ptr, sq_ptr,
    dim, eps, n_sq, hidden_norm_dim, hidden_norm_eps,
    s_hidden, s_gate, s_residual, s_shift, s_scale, s_res_out, s_out, s_sq,
    HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_MOD: tl.constexpr, HAS_HIDDEN_NORM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < dim
    r = tl.load(hidden_ptr + row * s_hidden + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_HIDDEN_NORM:  # the previous sublayer's pending row factor (a gated RMSNorm folded past out_proj)
        offs_t = tl.arange(0, BLOCK_T)
        sq = tl.load(sq_ptr + row * s_sq + offs_t, mask=offs_t < n_sq, other=0.0)
        r *= 1.0 / tl.sqrt(tl.sum(sq, axis=0) / hidden_norm_dim + hidden_norm_eps)
    if HAS_GATE:
        r *= tl.load(gate_ptr + row * s_gate + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r += tl.load(residual_ptr + row * s_residual + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(res_out_ptr + row * s_res_out + offs, r, mask=mask)
    # the norm sees the residual rounded to the output dtype, as the unfused block does
    xn = r.to(out_ptr.dtype.element_ty).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xn * xn, axis=0) / dim + eps)
    h = xn * inv * tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MOD:
        scale = tl.load(scale_ptr + row * s_scale + offs, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + row * s_shift + offs, mask=mask, other=0.0).to(tl.float32)
        h = h * (1.0 + scale) + shift
    tl.store(out_ptr + row * s_out + offs, h.to(out_ptr.dtype.element_ty), mask=mask)


def add_norm_modulate(
    hidden: Tensor, gate: Tensor | None, residual: Tensor | None, weight: Tensor, eps: float,
    shift: Tensor | None = None, scale: Tensor | None = None,
    hidden_sq_partials: Tensor | None = None, hidden_norm_dim: int = 0, hidden_norm_eps: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The residual update and the modulated pre-norm between two sublayers, fused.

    Reference (what :class:`aimkit.backbones.base.Block` does unfused; over whole sequences
    :func:`aimkit.kernels.glue.add_norm_modulate`)::

        if hidden_sq_partials is not None:   # finish the previous sublayer's folded RMSNorm
            hidden = hidden * rsqrt(hidden_sq_partials.sum(-1, keepdim=True) / hidden_norm_dim
                                    + hidden_norm_eps)                           # float32
        residual = (gate * hidden if gate is not None else hidden) + residual   # float32
        out = rmsnorm(residual.to(weight.dtype)) * weight * (1 + scale) + shift

    (the unfused block rounds ``gate * hidden`` and the modulation to the model dtype; here they
    stay in float32 until the single rounding of ``out``: more precise, not bit-equal)

    Args:
        hidden: (R, D) output of the previous sublayer (or the embedded token); last dim contiguous.
        gate: optional (R, D) adaLN gate of the previous sublayer.
        residual: optional (R, D) float32 residual stream (None: the stream starts here).
        weight: (D,) RMSNorm weight; its dtype is the output dtype.
        eps: RMSNorm epsilon.
        shift, scale: optional (R, D) adaLN modulation (both or neither).
        hidden_sq_partials: optional (R, T) float32 partial sums of squares of the previous
            sublayer's normalised quantity (:func:`aimkit.kernels.ssm_step.ssm_step_`'s ``partials``, a
            :class:`~aimkit.kernels.glue.DeferredRowNorm`), last dim contiguous:
            ``hidden`` is that sublayer's output before its per-row RMS factor.
        hidden_norm_dim: channels the partial sums cover (the mean's divisor; ``d_inner``).
        hidden_norm_eps: epsilon of that folded norm.

    Returns:
        ``(out, residual)``: out (R, D) in ``weight.dtype``; the new residual (R, D) float32,
        written into ``residual`` when one was given.
    """
    rows, dim = hidden.shape
    if (shift is None) != (scale is None):
        raise ValueError("add_norm_modulate: give both shift and scale, or neither")
    for name, t in (("hidden", hidden), ("gate", gate), ("residual", residual), ("shift", shift), ("scale", scale)):
        if t is not None and (t.shape != (rows, dim) or t.stride(-1) != 1):
            raise ValueError(f"add_norm_modulate: {name} must be ({rows}, {dim}) with a contiguous last dim, "
                             f"got {tuple(t.shape)} strides {t.stride()}")
    if residual is not None and residual.dtype != torch.float32:
        raise ValueError(f"add_norm_modulate: the residual stream must be float32, got {residual.dtype}")
    sq = hidden_sq_partials
    if sq is not None:
        if sq.dim() != 2 or sq.shape[0] != rows or sq.stride(-1) != 1 or sq.dtype != torch.float32:
            raise ValueError(f"add_norm_modulate: hidden_sq_partials must be a float32 ({rows}, T) tensor with a "
                             f"contiguous last dim, got {tuple(sq.shape)} {sq.dtype} strides {sq.stride()}")
        if hidden_norm_dim <= 0:
            raise ValueError(f"add_norm_modulate: hidden_norm_dim must be positive with hidden_sq_partials, "
                             f"got {hidden_norm_dim}")
    res_out = residual if residual is not None else torch.empty(rows, dim, device=hidden.device, dtype=torch.float32)
    out = torch.empty(rows, dim, device=hidden.device, dtype=weight.dtype)
    block = triton.next_power_of_2(dim)
    with on_device(hidden):
        _add_norm_modulate_kernel[(rows,)](
            hidden, gate if gate is not None else hidden, residual if residual is not None else hidden, weight,
            shift if shift is not None else hidden, scale if scale is not None else hidden, res_out, out,
            sq if sq is not None else res_out,
            dim, eps, sq.shape[1] if sq is not None else 0, hidden_norm_dim, hidden_norm_eps,
            hidden.stride(0), gate.stride(0) if gate is not None else 0,
            residual.stride(0) if residual is not None else 0,
            shift.stride(0) if shift is not None else 0, scale.stride(0) if scale is not None else 0,
            res_out.stride(0), out.stride(0), sq.stride(0) if sq is not None else 0,
            HAS_GATE=gate is not None, HAS_RESIDUAL=residual is not None, HAS_MOD=shift is not None,
            HAS_HIDDEN_NORM=sq is not None, BLOCK_D=block,
            BLOCK_T=triton.next_power_of_2(sq.shape[1]) if sq is not None else 1,
            num_warps=min(max(block // 256, 1), 8),
        )
    return out, res_out
