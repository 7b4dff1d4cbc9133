"""The Mamba2 decode-step state update as one Triton kernel: operation ``state_update``.

:func:`ssm_step_` runs one Mamba2 recurrence step for every (row, head): softplus of ``dt +
dt_bias``, ``A = -exp(A_log)``, the state update, the read-out and the ``D`` skip, in one pass
over the state (read once, written once). Given the gate ``z`` and the gated-norm weight it also
folds in Mamba2's gated RMSNorm (one group over all channels, policy ``fold_gated_norm``): it
writes ``y * silu(z) * weight`` and per-tile partial sums of ``(y * silu(z))^2``; the per-row
factor ``rsqrt(mean + eps)`` is applied after ``out_proj`` (linear, no bias) by the decode glue
kernel (:func:`aimkit.kernels.decode_glue.add_norm_modulate`).

Reference: :func:`aimkit.kernels.ssd.ssd_recurrent_step_` after ``dt = softplus(dt + dt_bias)``
and ``A = -exp(A_log)`` (and :class:`aimkit.kernels.glue.DeferredRowNorm` for the folded norm).

The kernel computes in float32, accepts strided views (the split of ``in_proj``'s output),
allocates nothing but its outputs, never syncs with the host or branches on tensor values: a
decode step built from it can be captured in a CUDA graph. Importing this module imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_last_dim_contiguous, check_vectors, on_device

__all__ = ["ssm_step_"]

_MAX_BLOCK_P = 32  # largest default tile: the fastest state traffic measured (docs/benchmarks.md)
_ELEMENTS_PER_THREAD = 128  # state elements per thread: sets the default num_warps


@triton.jit
def _softplus(x):
    # softplus(x) = max(x, 0) + log(1 + e^-|x|); log(1 + e) by its series for small e, where
    # log(1 + e) of the rounded sum would lose digits (torch uses log1p), x itself above 20
    e = tl.exp(-tl.abs(x))
    series = e * (1.0 - e * (0.5 - e * (1.0 / 3.0 - e * (0.25 - e * 0.2))))
    log1p_e = tl.where(e < 0.1, series, tl.log(1.0 + e))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p_e)


@triton.jit
def _gated_norm_numerator(y, z_ptr, norm_w_ptr, sq_ptr, offs_c, mask_c, c0, tile):
    # the gated norm's numerator g * weight with g = y * silu(z), and this tile's sum of g^2 (one
    # float per tile, stored by the tile's first lane: a block mask, no scalar mask terms;
    # masked lanes have g = 0). z_ptr points at this row and this tile's (head, channel) pairs.
    z = tl.load(z_ptr, mask=mask_c, other=0.0).to(tl.float32)
    g = y * z / (1.0 + tl.exp(-z))  # y * silu(z)
    sq = tl.sum(g * g, axis=0) + tl.zeros(y.shape, dtype=tl.float32)
    tl.store(sq_ptr + tile + offs_c * 0, sq, mask=mask_c & (offs_c == c0))
    return g * tl.load(norm_w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)


@triton.jit
def _ssm_step_kernel(
    state_ptr, x_ptr, dt_ptr, dt_bias_ptr, A_log_ptr, B_ptr, C_ptr, D_ptr, y_ptr, z_ptr, norm_w_ptr, sq_ptr,
    headdim, dstate, heads_per_group, channels,
    s_state_b, s_state_h, s_state_p, s_x_b, s_x_h, s_dt_b, s_B_b, s_B_g, s_C_b, s_C_g,
    s_y_b, s_y_h, s_z_b, s_z_h, s_sq_b,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    TILES_FIRST: tl.constexpr,
):
    # A tile is BLOCK_P consecutive (head, channel) pairs of one row: part of a head, one head, or
    # several heads of one group (the states of consecutive heads are contiguous). TILES_FIRST:
    # grid axis 0 walks the tiles of a row, so that consecutive programs stream one contiguous
    # row of the state; else (more rows than grid axis 1 holds) axis 0 walks the rows.
    if TILES_FIRST:
        row = tl.program_id(1)
        tile = tl.program_id(0)
    else:
        row = tl.program_id(0)
        tile = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < dstate
    c0 = tile * BLOCK_P
    offs_c = c0 + tl.arange(0, BLOCK_P)
    mask_c = offs_c < channels
    mask = mask_c[:, None] & mask_n[None, :]
    head = offs_c // headdim  # (BLOCK_P,)
    p = offs_c % headdim
    group = (c0 // headdim) // heads_per_group  # one group per tile (checked by the caller)

    s_ptrs = state_ptr + row * s_state_b + (head * s_state_h + p * s_state_p)[:, None] + offs_n[None, :]
    s = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_P, BLOCK_N)
    # per-head scalars, gathered per channel, in float32
    dt = tl.load(dt_ptr + row * s_dt_b + head, mask=mask_c, other=0.0).to(tl.float32)
    dt = _softplus(dt + tl.load(dt_bias_ptr + head, mask=mask_c, other=0.0).to(tl.float32))
    decay = tl.exp(-tl.exp(tl.load(A_log_ptr + head, mask=mask_c, other=0.0).to(tl.float32)) * dt)
    x = tl.load(x_ptr + row * s_x_b + head * s_x_h + p, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + row * s_B_b + group * s_B_g + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    c = tl.load(C_ptr + row * s_C_b + group * s_C_g + offs_n, mask=mask_n, other=0.0).to(tl.float32)

    s = s * decay[:, None] + (dt * x)[:, None] * b[None, :]
    tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(s * c[None, :], axis=1)  # (BLOCK_P,)
    if HAS_D:
        y += tl.load(D_ptr + head, mask=mask_c, other=0.0).to(tl.float32) * x
    if HAS_Z:
        y = _gated_norm_numerator(y, z_ptr + row * s_z_b + head * s_z_h + p, norm_w_ptr, sq_ptr + row * s_sq_b,
                                  offs_c, mask_c, c0, tile)
    tl.store(y_ptr + row * s_y_b + head * s_y_h + p, y.to(y_ptr.dtype.element_ty), mask=mask_c)


def _valid_block(block: int, headdim: int, heads_per_group: int) -> bool:
    """A program covers a divisor of one head, or whole heads of one group."""
    if block <= headdim:
        return headdim % block == 0
    return block % headdim == 0 and heads_per_group % (block // headdim) == 0


def _block_p(headdim: int, rows: int, nheads: int, heads_per_group: int) -> int:
    """Channels per program: the largest valid tile of up to ``_MAX_BLOCK_P`` channels that still
    gives at least 1024 programs, else (small batches) the largest valid one."""
    candidates = [b for b in (128, 64, 32, 16, 8, 4, 2, 1)
                  if b <= _MAX_BLOCK_P and _valid_block(b, headdim, heads_per_group)]
    for block in candidates:
        if rows * triton.cdiv(nheads * headdim, block) >= 1024:
            return block
    return candidates[0]


def _check_args(state: Tensor, x: Tensor, dt: Tensor, dt_bias: Tensor, A_log: Tensor, B: Tensor, C: Tensor,
                D: Tensor | None, z: Tensor | None, norm_weight: Tensor | None) -> None:
    name = "ssm_step_"
    rows, nheads, headdim, dstate = state.shape
    groups = B.shape[1]
    check_last_dim_contiguous(name, state=state, x=x, dt=dt, B=B, C=C, z=z)
    if x.shape != (rows, nheads, headdim) or dt.shape != (rows, nheads):
        raise ValueError(f"{name}: x {tuple(x.shape)} / dt {tuple(dt.shape)} do not match state {tuple(state.shape)}")
    if B.shape != (rows, groups, dstate) or C.shape != B.shape or nheads % groups:
        raise ValueError(f"{name}: B {tuple(B.shape)} / C {tuple(C.shape)} do not match state {tuple(state.shape)}")
    check_vectors(name, nheads, dt_bias=dt_bias, A_log=A_log, D=D)
    if (z is None) != (norm_weight is None):
        raise ValueError(f"{name}: give both z and norm_weight (the gated norm), or neither")
    if z is not None:
        if z.shape != x.shape:
            raise ValueError(f"{name}: z {tuple(z.shape)} does not match x {tuple(x.shape)}")
        check_vectors(name, nheads * headdim, norm_weight=norm_weight)


def ssm_step_(
    state: Tensor, x: Tensor, dt: Tensor, dt_bias: Tensor, A_log: Tensor, B: Tensor, C: Tensor,
    D: Tensor | None = None, block_p: int | None = None, num_warps: int | None = None,
    z: Tensor | None = None, norm_weight: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """One Mamba2 decoding step, updating ``state`` in place; returns y (or, with ``z``, the
    gated-norm numerator and its partial sums of squares).

    Reference: ``dt = softplus(dt + dt_bias)``, ``A = -exp(A_log)``, then
    :func:`aimkit.kernels.ssd.ssd_recurrent_step` (same maths, float32 compute).

    With ``z`` and ``norm_weight`` the kernel also does the part of Mamba2's gated RMSNorm (one
    group over all H*P channels, ``norm_before_gate=False``) that needs no row-wide reduction::

        g = y * silu(z)                                        # float32, y before rounding
        out = g * norm_weight                                  # (R, H, P), rounded to x.dtype
        partials[r, t] = (g[r].flatten()[t*block_p:(t+1)*block_p] ** 2).sum()   # float32

    so that ``rmsnorm(g) * norm_weight == out * rsqrt(partials.sum(-1) / (H*P) + eps)`` per row.
    Each tile writes its own partial sum: no atomics, the result does not depend on scheduling.

    Args:
        state: (R, H, P, N), any float dtype (computed in float32), the last dim contiguous;
            updated in place.
        x: (R, H, P) with the last dim contiguous (a view of the conv output is fine).
        dt: (R, H) raw step sizes (before bias and softplus), last dim contiguous.
        dt_bias, A_log: (H,) contiguous.
        B, C: (R, G, N), last dim contiguous; head ``h`` reads group ``h // (H // G)``.
        D: optional (H,) skip weights.
        block_p: channels per program (default: chosen from the shapes): a divisor of P, or
            whole heads of one group.
        num_warps: warps per program (default: 128 state elements per thread, 1 to 8 warps).
        z: optional (R, H, P) gate, last dim contiguous (a view of ``in_proj``'s output split).
        norm_weight: (H*P,) contiguous gated-norm weight; given exactly when ``z`` is.

    Returns:
        Without ``z``: y (R, H, P) in ``x.dtype``. With ``z``: ``(out, partials)``, out
        (R, H, P) in ``x.dtype`` as above, partials (R, T) float32 with ``T = H*P / block_p``
        channel tiles per row.
    """
    _check_args(state, x, dt, dt_bias, A_log, B, C, D, z, norm_weight)
    rows, nheads, headdim, dstate = state.shape
    heads_per_group = nheads // B.shape[1]
    channels = nheads * headdim
    block_p = block_p or _block_p(headdim, rows, nheads, heads_per_group)
    if not _valid_block(block_p, headdim, heads_per_group):
        raise ValueError(f"ssm_step_: block_p {block_p} must divide headdim {headdim} or cover whole "
                         f"heads of one group ({heads_per_group} heads per group)")
    y = torch.empty(rows, nheads, headdim, device=x.device, dtype=x.dtype)
    n_tiles = triton.cdiv(channels, block_p)
    sq = torch.empty(rows, n_tiles, device=x.device, dtype=torch.float32) if z is not None else None
    tiles_first = rows <= 65535  # grid axis 1 holds at most 65535 programs
    block_n = triton.next_power_of_2(dstate)
    with on_device(x):
        _ssm_step_kernel[(n_tiles, rows) if tiles_first else (rows, n_tiles)](
            state, x, dt, dt_bias, A_log, B, C, D if D is not None else dt_bias, y,
            z if z is not None else x, norm_weight if norm_weight is not None else dt_bias,
            sq if sq is not None else y,
            headdim, dstate, heads_per_group, channels,
            state.stride(0), state.stride(1), state.stride(2), x.stride(0), x.stride(1), dt.stride(0),
            B.stride(0), B.stride(1), C.stride(0), C.stride(1), y.stride(0), y.stride(1),
            z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
            sq.stride(0) if sq is not None else 0,
            HAS_D=D is not None, HAS_Z=z is not None, BLOCK_P=block_p, BLOCK_N=block_n, TILES_FIRST=tiles_first,
            num_warps=num_warps or min(max(block_p * block_n // (32 * _ELEMENTS_PER_THREAD), 1), 8),
        )
    return y if z is None else (y, sq)
