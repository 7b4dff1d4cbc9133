"""aimkit's own Triton kernels for the decode step (imported only on CUDA, through :mod:`._fused`).

Four kernels (five entry points) replace the chains of small kernels that dominated an AiM decode
step on an H200 (``benchmarks/notes.md``, decode-step profile):

* :func:`ssm_step_` — one Mamba2 recurrence step for every (row, head): softplus of ``dt +
  dt_bias``, ``A = -exp(A_log)``, the state update, the read-out and the ``D`` skip, in one pass
  over the state (read once, written once). It replaces mamba-ssm's ``selective_state_update``
  (which tiles the state 4 channels at a time) and the three kernels that rebuilt ``A`` each step.
  Given the gate ``z`` and the gated-norm weight it also folds in mamba's gated RMSNorm (one group
  over all channels): it writes ``y * silu(z) * weight`` and per-tile partial sums of
  ``(y * silu(z))^2``, and the per-row factor ``rsqrt(mean + eps)`` is applied after ``out_proj``
  (linear, no bias) by :func:`add_norm_modulate`, which saves the norm kernel of every layer.
* :func:`conv_ssm_step_` — the same kernel fed with the raw convolution inputs: each program also
  computes the depthwise causal convolution and SiLU of its x channels and of its group's B and
  C channels, which removes the convolution's own launch (latency-bound: 8-11 µs per layer).
* :func:`conv_step_` — one position of the depthwise causal convolution with SiLU alone, for the
  channels-contiguous ring buffer aimkit keeps (causal-conv1d's update kernel took 12 µs per AiM-B
  layer at 512 rows on that layout, four times its memory traffic).
* :func:`in_proj_conv_step_` — Mamba2's ``in_proj`` GEMM (``tl.dot`` tiles, float32 accumulation,
  16-bit inputs only) with :func:`conv_step_`'s work in its epilogue for the xBC columns, which
  removes the convolution's launch and the gap before it (opt-in kind ``proj-conv``; on an H200
  slower than cuBLAS + ``conv_step_`` at 512 rows, faster at 32: ``benchmarks/notes.md``).
* :func:`add_norm_modulate` — the glue between two sublayers: ``residual += gate * hidden``, then
  ``rmsnorm(residual) * weight``, then the adaLN modulation ``* (1 + scale) + shift``; one
  read of each input row and two writes, instead of about nine element-wise kernels. Optionally
  it first scales ``hidden`` by the row factor of a gated norm folded into :func:`ssm_step_`.

Convolution state (``conv_state``, (R, C, W) for a kernel of width W): a ring buffer indexed by
absolute position. Slot ``k`` holds the (raw, pre-convolution) input of the latest position ``q``
with ``q % W == k``, zeros for positions before the sequence. The step at position ``p`` reads the
window ``p-W+1 .. p`` (oldest first) as slots ``(p+1) % W, ..., (p+W-1) % W`` plus the new input,
then writes the new input into slot ``p % W`` — the one slot it does not read, so programs that
share channels (the B and C of a group) never race, and nothing is shifted. ``p`` is read from a
device tensor (``InferenceParams.position``), so a captured step stays valid at every position.

All kernels compute in float32 (``in_proj_conv_step_`` accumulates 16-bit products in float32)
and accept strided views (the split of ``in_proj``'s output, the rows of the stacked modulation
tensor), so the caller never makes a contiguous copy. None
allocates anything but its outputs, syncs with the host or branches on tensor values: a decode
step built from them can be captured in a CUDA graph. The PyTorch reference of each is named in its
docstring and the tests run both through Triton's interpreter on CPU (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Optional, Tuple, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["add_norm_modulate", "conv_ssm_step_", "conv_step_", "in_proj_conv_step_", "ssm_step_"]


@functools.lru_cache(maxsize=None)
def _capability_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def _pdl(t: Tensor) -> bool:
    """Whether to launch with programmatic dependent launch (kind ``pdl`` of :mod:`._fused`, on a
    Hopper or newer GPU): the kernel may start while the previous one finishes, loads what no
    earlier kernel of the step writes, then waits (``gdc_wait``) before reading the step's inputs
    and before any store."""
    from ._fused import enabled_kinds

    return t.is_cuda and "pdl" in enabled_kinds() and _capability_major(t.device.index or 0) >= 9


def _launch_options(use_pdl: bool) -> dict:
    return {"launch_pdl": True} if use_pdl else {}


def _on_device(t: Tensor):
    """Launch on ``t``'s GPU: Triton launches on the current CUDA device, which may be another."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def _softplus(x):
    # softplus(x) = max(x, 0) + log(1 + e^-|x|); log(1 + e) by its series for small e, where
    # log(1 + e) of the rounded sum would lose digits (torch uses log1p), x itself above 20
    e = tl.exp(-tl.abs(x))
    series = e * (1.0 - e * (0.5 - e * (1.0 / 3.0 - e * (0.25 - e * 0.2))))
    log1p_e = tl.where(e < 0.1, series, tl.log(1.0 + e))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p_e)


@triton.jit
def _conv_silu(raw, chan, mask, write, pos, ring_ptr, s_ring_c, s_ring_k, w_ptr, s_w_c, bias_ptr,
               HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_W: tl.constexpr):
    # silu(causal depthwise conv) at position ``pos`` of the channels ``chan`` (a block) of one row
    # whose ring buffer starts at ``ring_ptr``, in float32. The window, oldest first, is positions
    # pos-WIDTH+1 .. pos: tap j < WIDTH-1 from ring slot (pos + 1 + j) % WIDTH, the last tap the
    # new input ``raw`` (already in the ring's dtype), which is then stored into slot pos % WIDTH
    # on the lanes of ``write``: the one slot that no tap reads.
    taps = tl.arange(0, BLOCK_W)
    slots = (pos + 1 + taps) % WIDTH
    old = mask[:, None] & (taps[None, :] < WIDTH - 1)
    win = tl.load(ring_ptr + chan[:, None] * s_ring_c + slots[None, :] * s_ring_k, mask=old, other=0.0)
    win = tl.where(taps[None, :] == WIDTH - 1, raw.to(tl.float32)[:, None], win.to(tl.float32))
    w = tl.load(w_ptr + chan[:, None] * s_w_c + taps[None, :], mask=mask[:, None] & (taps[None, :] < WIDTH),
                other=0.0).to(tl.float32)
    acc = tl.sum(win * w, axis=1)  # (block,)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + chan, mask=mask, other=0.0).to(tl.float32)
    tl.store(ring_ptr + chan * s_ring_c + (pos % WIDTH) * s_ring_k, raw, mask=write)
    return acc / (1.0 + tl.exp(-acc))  # SiLU


@triton.jit
def _ssm_step_kernel(
    state_ptr, x_ptr, dt_ptr, dt_bias_ptr, A_log_ptr, B_ptr, C_ptr, D_ptr, y_ptr,
    z_ptr, norm_w_ptr, sq_ptr,
    ring_ptr, conv_w_ptr, conv_b_ptr, pos_ptr,
    headdim, dstate, heads_per_group, channels, c_chan0,
    s_state_b, s_state_h, s_state_p,
    s_x_b, s_x_h,
    s_dt_b,
    s_B_b, s_B_g,
    s_C_b, s_C_g,
    s_y_b, s_y_h,
    s_z_b, s_z_h,
    s_sq_b,
    s_ring_b, s_ring_c, s_ring_k, s_cw_c,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    TILES: tl.constexpr, STAGES: tl.constexpr,
    HAS_CONV: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_W: tl.constexpr,
    USE_PDL: tl.constexpr, TILES_FIRST: tl.constexpr,
):
    # A tile is BLOCK_P consecutive (head, channel) pairs of one row: part of a head, one head, or
    # several heads of one group (the states of consecutive heads are contiguous). A program
    # walks TILES consecutive tiles of its row (STAGES > 1 lets Triton prefetch the next one).
    # TILES_FIRST: grid axis 0 walks the tiles of a row, so that consecutive programs stream one
    # contiguous row of the state; else axis 0 walks the rows.
    if TILES_FIRST:
        row = tl.program_id(1)
        walk = tl.program_id(0)
    else:
        row = tl.program_id(0)
        walk = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < dstate
    for i in tl.range(0, TILES, num_stages=STAGES):
        c0 = (walk * TILES + i) * BLOCK_P
        offs_c = c0 + tl.arange(0, BLOCK_P)
        mask_c = offs_c < channels
        mask = mask_c[:, None] & mask_n[None, :]
        head = offs_c // headdim  # (BLOCK_P,)
        p = offs_c % headdim
        group = (c0 // headdim) // heads_per_group  # one group per tile (checked by the caller)

        # the state first: no kernel of this step writes it, so with PDL its load overlaps the
        # previous kernel's tail; everything below waits for that kernel
        s_ptrs = state_ptr + row * s_state_b + (head * s_state_h + p * s_state_p)[:, None] + offs_n[None, :]
        s = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_P, BLOCK_N)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()

        # per-head scalars, gathered per channel, in float32
        dt = tl.load(dt_ptr + row * s_dt_b + head, mask=mask_c, other=0.0).to(tl.float32)
        dt = _softplus(dt + tl.load(dt_bias_ptr + head, mask=mask_c, other=0.0).to(tl.float32))
        decay = tl.exp(-tl.exp(tl.load(A_log_ptr + head, mask=mask_c, other=0.0).to(tl.float32)) * dt)

        x = tl.load(x_ptr + row * s_x_b + head * s_x_h + p, mask=mask_c, other=0.0)
        mask_bc = mask_n & (c0 + offs_n * 0 < channels)  # tiles past the end (ragged walk): load nothing
        b = tl.load(B_ptr + row * s_B_b + group * s_B_g + offs_n, mask=mask_bc, other=0.0)
        c = tl.load(C_ptr + row * s_C_b + group * s_C_g + offs_n, mask=mask_bc, other=0.0)
        if HAS_CONV:  # x, B, C are raw inputs (channels offs_c, channels + ..., c_chan0 + ... of xBC)
            pos = tl.load(pos_ptr)
            ring = ring_ptr + row * s_ring_b
            ring_ty = ring_ptr.dtype.element_ty
            x = _conv_silu(x.to(ring_ty), offs_c, mask_c, mask_c, pos, ring, s_ring_c, s_ring_k,
                           conv_w_ptr, s_cw_c, conv_b_ptr, HAS_CONV_BIAS, WIDTH, BLOCK_W)
            # every tile of the group reads B and C; the group's first tile alone stores them
            first = mask_bc & ((c0 + offs_n * 0) % (heads_per_group * headdim) == 0)
            b = _conv_silu(b.to(ring_ty), channels + group * dstate + offs_n, mask_bc, first, pos, ring,
                           s_ring_c, s_ring_k, conv_w_ptr, s_cw_c, conv_b_ptr, HAS_CONV_BIAS, WIDTH, BLOCK_W)
            c = _conv_silu(c.to(ring_ty), c_chan0 + group * dstate + offs_n, mask_bc, first, pos, ring,
                           s_ring_c, s_ring_k, conv_w_ptr, s_cw_c, conv_b_ptr, HAS_CONV_BIAS, WIDTH, BLOCK_W)
        x = x.to(tl.float32)
        b = b.to(tl.float32)
        c = c.to(tl.float32)

        s = s * decay[:, None] + (dt * x)[:, None] * b[None, :]
        tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask)

        y = tl.sum(s * c[None, :], axis=1)  # (BLOCK_P,)
        if HAS_D:
            y += tl.load(D_ptr + head, mask=mask_c, other=0.0).to(tl.float32) * x
        if HAS_Z:  # the gated norm's numerator g * weight, and this tile's sum of g^2 (masked lanes: g = 0)
            z = tl.load(z_ptr + row * s_z_b + head * s_z_h + p, mask=mask_c, other=0.0).to(tl.float32)
            g = y * z / (1.0 + tl.exp(-z))  # y * silu(z)
            sq = tl.sum(g * g, axis=0) + tl.zeros([BLOCK_P], dtype=tl.float32)
            # one float per tile, stored by the tile's first lane (a block mask: no scalar mask terms)
            tile = walk * TILES + i
            tl.store(sq_ptr + row * s_sq_b + tile + offs_c * 0, sq, mask=mask_c & (offs_c == c0))
            y = g * tl.load(norm_w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * s_y_b + head * s_y_h + p, y.to(y_ptr.dtype.element_ty), mask=mask_c)


def _valid_block(block: int, headdim: int, heads_per_group: int) -> bool:
    """A program covers a divisor of one head, or whole heads of one group."""
    if block <= headdim:
        return headdim % block == 0
    return block % headdim == 0 and heads_per_group % (block // headdim) == 0


# Largest tile (channels per program) the default tiling picks. On an H200 the 32-channel tile
# with one warp (128 state elements per thread) moved the state fastest at 128 and 512 rows,
# bf16 (benchmarks/notes.md, session 4); decode_kernels.py overrides this to compare tilings.
MAX_BLOCK_P = 32
ELEMENTS_PER_THREAD = 128  # state elements per thread: sets the default num_warps


def _block_p(headdim: int, rows: int, nheads: int, heads_per_group: int) -> int:
    """Channels per program: the largest valid tile of up to :data:`MAX_BLOCK_P` channels that
    still gives at least 1024 programs; smaller tiles for small batches."""
    candidates = [b for b in (128, 64, 32, 16, 8, 4, 2, 1)
                  if b <= MAX_BLOCK_P and _valid_block(b, headdim, heads_per_group)]
    for block in candidates:
        if rows * triton.cdiv(nheads * headdim, block) >= 1024:
            return block
    return next((b for b in candidates if b <= 32), candidates[-1])


def _num_warps(block_p: int, block_n: int) -> int:
    """Warps per program: :data:`ELEMENTS_PER_THREAD` state elements per thread, 1 to 8 warps."""
    return min(max(block_p * block_n // (32 * ELEMENTS_PER_THREAD), 1), 8)


class _Conv(NamedTuple):
    """The convolution that :func:`conv_ssm_step_` runs inside the state kernel."""

    state: Tensor  # (R, conv_dim, W) ring buffer
    weight: Tensor  # (conv_dim, W)
    bias: Optional[Tensor]  # (conv_dim,)
    position: Tensor  # () integer
    c_chan0: int  # first C channel of xBC


def _check_conv(name: str, x: Tensor, state: Tensor, weight: Tensor, bias: Optional[Tensor],
                position: Tensor) -> None:
    """The checks shared by :func:`conv_step_` and :func:`conv_ssm_step_`; x (R, C)."""
    rows, channels = x.shape
    width = state.shape[-1]
    if state.shape != (rows, channels, width) or weight.shape != (channels, width):
        raise ValueError(f"{name}: x {tuple(x.shape)}, conv state {tuple(state.shape)} and weight "
                         f"{tuple(weight.shape)} do not fit together")
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"{name}: the inputs and the conv weight need a contiguous last dimension")
    if bias is not None and (bias.shape != (channels,) or bias.stride(0) != 1):
        raise ValueError(f"{name}: conv bias must be a contiguous ({channels},) tensor, got {tuple(bias.shape)}")
    if position.numel() != 1 or position.dtype != torch.int64 or position.device != x.device:
        raise ValueError(f"{name}: position must be a one-element int64 tensor on {x.device}, got "
                         f"{tuple(position.shape)} {position.dtype} on {position.device}")


def ssm_step_(
    state: Tensor, x: Tensor, dt: Tensor, dt_bias: Tensor, A_log: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor] = None, block_p: Optional[int] = None, num_warps: Optional[int] = None,
    tiles: int = 1, stages: int = 1, z: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None,
    tiles_first: bool = True,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """One Mamba2 decoding step, updating ``state`` in place; returns y (or, with ``z``, the
    gated-norm numerator and its partial sums of squares).

    Reference: ``dt = softplus(dt + dt_bias)``, ``A = -exp(A_log)``, then
    :func:`aimkit.backbones._ssd.ssd_recurrent_step` (same maths, float32 compute).

    With ``z`` and ``norm_weight`` the kernel also does the part of mamba's gated RMSNorm (one
    group over all H*P channels, ``norm_before_gate=False``) that needs no row-wide reduction::

        g = y * silu(z)                                        # float32, y before rounding
        out = g * norm_weight                                  # (R, H, P), rounded to x.dtype
        partials[r, t] = (g[r].flatten()[t*block_p:(t+1)*block_p] ** 2).sum()   # float32

    so that ``rmsnorm(g) * norm_weight == out * rsqrt(partials.sum(-1) / (H*P) + eps)`` per row.
    A linear map without bias commutes with that row factor: the caller applies it after
    ``out_proj`` (:func:`add_norm_modulate`'s ``hidden_sq_partials``). Each tile writes its own
    partial sum: no atomics, the result does not depend on scheduling.

    Args:
        state: (R, H, P, N), any float dtype (computed in float32), the last dim contiguous;
            updated in place.
        x: (R, H, P) with the last dim contiguous (a view of the conv output is fine).
        dt: (R, H) raw step sizes (before bias and softplus), last dim contiguous.
        dt_bias, A_log: (H,) contiguous.
        B, C: (R, G, N), last dim contiguous; head ``h`` reads group ``h // (H // G)``.
        D: optional (H,) skip weights.
        block_p: channels per program (default: chosen from the shapes).
        num_warps: warps per program (default: 128 state elements per thread).
        tiles: tiles of ``block_p`` channels walked by one program (1: one tile per program).
        stages: software-pipelining depth of that walk (Triton ``num_stages``).
        z: optional (R, H, P) gate, last dim contiguous (a view of ``in_proj``'s output split).
        norm_weight: (H*P,) contiguous gated-norm weight; given exactly when ``z`` is.
        tiles_first: launch order: the tiles of one row on consecutive programs (contiguous state
            traffic; the default) instead of one tile of consecutive rows; same results. On an
            H200 tiles first moved the state 4-7% faster (benchmarks/notes.md).

    Returns:
        Without ``z``: y (R, H, P) in ``x.dtype``. With ``z``: ``(out, partials)``, out
        (R, H, P) in ``x.dtype`` as above, partials (R, T) float32 with ``T = H*P / block_p``
        channel tiles per row (``block_p`` divides H*P).
    """
    return _ssm_step("ssm_step_", state, x, dt, dt_bias, A_log, B, C, D, block_p, num_warps, tiles, stages,
                     z, norm_weight, None, tiles_first)


def conv_ssm_step_(
    state: Tensor, xBC: Tensor, dt: Tensor, dt_bias: Tensor, A_log: Tensor, conv_state: Tensor,
    conv_weight: Tensor, conv_bias: Optional[Tensor], position: Tensor, D: Optional[Tensor] = None,
    block_p: Optional[int] = None, num_warps: Optional[int] = None, tiles: int = 1, stages: int = 1,
    z: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """One Mamba2 decoding step from the raw convolution inputs: :func:`conv_step_` and
    :func:`ssm_step_` in one kernel, updating ``conv_state`` and ``state`` in place.

    Reference::

        xbc = conv_step_(xBC, conv_state, conv_weight, conv_bias, position)   # but not rounded: float32
        x, B, C = split(xbc, [H*P, G*N, G*N])                               # (R, H, P), (R, G, N) x2
        return ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, z=z, norm_weight=norm_weight)

    Each program computes the convolution of its own x channels and of its group's B and C
    channels (recomputed by every tile of the group, a few loads next to the state tile); the
    group's first tile writes the new B and C inputs into the ring, each tile its own x
    channels. The convolution output stays in float32 (the two-kernel path rounds it to
    ``xBC.dtype`` in between): equal up to that rounding.

    Args:
        state: (R, H, P, N) SSM state, as in :func:`ssm_step_`; updated in place.
        xBC: (R, H*P + 2*G*N) raw convolution inputs (x, then B, then C), last dim contiguous
            (a view of ``in_proj``'s output split); G follows from the width.
        dt, dt_bias, A_log, D, block_p, num_warps, tiles, stages, z, norm_weight: as in
            :func:`ssm_step_`.
        conv_state: (R, H*P + 2*G*N, W) ring buffer of the last W inputs (module docstring), any
            strides (aimkit's cache keeps channels contiguous: (W*C, 1, C)); updated in place
            (slot ``position % W``), in its own dtype.
        conv_weight: (H*P + 2*G*N, W), last dim contiguous (``conv1d.weight.squeeze(1)``).
        conv_bias: optional (H*P + 2*G*N,), contiguous.
        position: () integer tensor on the device: the position of ``xBC``.

    Returns:
        As :func:`ssm_step_`, in ``xBC.dtype``.
    """
    rows, nheads, headdim, dstate = state.shape
    conv_dim = xBC.shape[-1]
    inner = nheads * headdim
    groups = (conv_dim - inner) // (2 * dstate)
    if xBC.dim() != 2 or groups < 1 or conv_dim != inner + 2 * groups * dstate:
        raise ValueError(f"conv_ssm_step_: xBC {tuple(xBC.shape)} is not (R, H*P + 2*G*N) for state "
                         f"{tuple(state.shape)}")
    _check_conv("conv_ssm_step_", xBC, conv_state, conv_weight, conv_bias, position)
    x, B, C = torch.split(xBC, [inner, groups * dstate, groups * dstate], dim=-1)
    conv = _Conv(conv_state, conv_weight, conv_bias, position, inner + groups * dstate)
    return _ssm_step("conv_ssm_step_", state, x.unflatten(-1, (nheads, headdim)), dt, dt_bias, A_log,
                     B.unflatten(-1, (groups, dstate)), C.unflatten(-1, (groups, dstate)), D, block_p, num_warps,
                     tiles, stages, z, norm_weight, conv)


def _ssm_step(
    name: str, state: Tensor, x: Tensor, dt: Tensor, dt_bias: Tensor, A_log: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], block_p: Optional[int], num_warps: Optional[int], tiles: int, stages: int,
    z: Optional[Tensor], norm_weight: Optional[Tensor], conv: Optional[_Conv], tiles_first: bool = True,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Checks and launch of :func:`ssm_step_` (``conv`` None) and :func:`conv_ssm_step_`."""
    rows, nheads, headdim, dstate = state.shape
    groups = B.shape[1]
    for arg, t in (("state", state), ("x", x), ("dt", dt), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name}: {arg} needs a contiguous last dimension, got strides {t.stride()}")
    if x.shape != (rows, nheads, headdim) or dt.shape != (rows, nheads):
        raise ValueError(f"{name}: x {tuple(x.shape)} / dt {tuple(dt.shape)} do not match state {tuple(state.shape)}")
    if B.shape != (rows, groups, dstate) or C.shape != B.shape or nheads % groups:
        raise ValueError(f"{name}: B {tuple(B.shape)} / C {tuple(C.shape)} do not match state {tuple(state.shape)}")
    for arg, t in (("dt_bias", dt_bias), ("A_log", A_log), ("D", D)):
        if t is not None and (t.shape != (nheads,) or t.stride(0) != 1):
            raise ValueError(f"{name}: {arg} must be a contiguous ({nheads},) tensor, got {tuple(t.shape)}")
    channels = nheads * headdim
    if (z is None) != (norm_weight is None):
        raise ValueError(f"{name}: give both z and norm_weight (the gated norm), or neither")
    if z is not None:
        if z.shape != x.shape:
            raise ValueError(f"{name}: z {tuple(z.shape)} does not match x {tuple(x.shape)}")
        if norm_weight.shape != (channels,) or norm_weight.stride(0) != 1:
            raise ValueError(f"{name}: norm_weight must be a contiguous ({channels},) tensor, "
                             f"got {tuple(norm_weight.shape)}")
    y = torch.empty(rows, nheads, headdim, device=x.device, dtype=x.dtype)
    heads_per_group = nheads // groups
    block_p = block_p or _block_p(headdim, rows, nheads, heads_per_group)
    if not _valid_block(block_p, headdim, heads_per_group):
        raise ValueError(f"{name}: block_p {block_p} must divide headdim {headdim} or cover whole "
                         f"heads of one group ({heads_per_group} heads per group)")
    n_tiles = triton.cdiv(channels, block_p)
    sq = torch.empty(rows, n_tiles, device=x.device, dtype=torch.float32) if z is not None else None
    ring = conv.state if conv is not None else state  # placeholders where a pointer goes unused
    width = ring.shape[-1] if conv is not None else 1
    walks = triton.cdiv(n_tiles, tiles)
    tiles_first = tiles_first and rows <= 65535  # grid axis 1 holds at most 65535 programs
    grid = (walks, rows) if tiles_first else (rows, walks)
    use_pdl = _pdl(x)
    block_n = triton.next_power_of_2(dstate)
    num_warps = num_warps or _num_warps(block_p, block_n)
    with _on_device(x):
        _ssm_step_kernel[grid](
            state, x, dt, dt_bias, A_log, B, C, D if D is not None else dt_bias, y,
            z if z is not None else x, norm_weight if norm_weight is not None else dt_bias,
            sq if sq is not None else y,
            ring, conv.weight if conv is not None else dt_bias,
            conv.bias if conv is not None and conv.bias is not None else dt_bias,
            conv.position if conv is not None else dt_bias,
            headdim, dstate, heads_per_group, channels, conv.c_chan0 if conv is not None else 0,
            state.stride(0), state.stride(1), state.stride(2),
            x.stride(0), x.stride(1),
            dt.stride(0),
            B.stride(0), B.stride(1),
            C.stride(0), C.stride(1),
            y.stride(0), y.stride(1),
            z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
            sq.stride(0) if sq is not None else 0,
            ring.stride(0), ring.stride(1), ring.stride(2),
            conv.weight.stride(0) if conv is not None else 0,
            HAS_D=D is not None, HAS_Z=z is not None, BLOCK_P=block_p, BLOCK_N=block_n,
            TILES=tiles, STAGES=stages,
            HAS_CONV=conv is not None, HAS_CONV_BIAS=conv is not None and conv.bias is not None,
            WIDTH=width, BLOCK_W=triton.next_power_of_2(width), USE_PDL=use_pdl, TILES_FIRST=tiles_first,
            num_warps=num_warps, **_launch_options(use_pdl),
        )
    return y if z is None else (y, sq)


@triton.jit
def _add_norm_modulate_kernel(
    hidden_ptr, gate_ptr, residual_ptr, weight_ptr, shift_ptr, scale_ptr, res_out_ptr, out_ptr, sq_ptr,
    dim, eps, n_sq, hidden_norm_dim, hidden_norm_eps,
    s_hidden, s_gate, s_residual, s_shift, s_scale, s_res_out, s_out, s_sq,
    HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_MOD: tl.constexpr, HAS_HIDDEN_NORM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < dim
    if USE_PDL:  # every input may come from the previous kernel
        tl.extra.cuda.gdc_wait()
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
    hidden: Tensor, gate: Optional[Tensor], residual: Optional[Tensor], weight: Tensor, eps: float,
    shift: Optional[Tensor] = None, scale: Optional[Tensor] = None,
    hidden_sq_partials: Optional[Tensor] = None, hidden_norm_dim: int = 0, hidden_norm_eps: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """The residual update and the modulated pre-norm between two sublayers, fused.

    Reference (what :class:`aimkit.backbones.base.Block` does unfused)::

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
            sublayer's normalised quantity (``ssm_step_``'s ``partials``), last dim contiguous:
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
    use_pdl = _pdl(hidden)
    with _on_device(hidden):
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
            BLOCK_T=triton.next_power_of_2(sq.shape[1]) if sq is not None else 1, USE_PDL=use_pdl,
            num_warps=min(max(block // 256, 1), 8), **_launch_options(use_pdl),
        )
    return out, res_out


@triton.jit
def _conv_step_kernel(
    x_ptr, state_ptr, weight_ptr, bias_ptr, pos_ptr, out_ptr,
    channels,
    s_x_b, s_state_b, s_state_c, s_state_k, s_w_c, s_out_b,
    HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs < channels
    if USE_PDL:  # wait for in_proj's output, then let the state kernel start its state loads
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pos = tl.load(pos_ptr)
    raw = tl.load(x_ptr + row * s_x_b + offs, mask=mask, other=0.0).to(state_ptr.dtype.element_ty)
    out = _conv_silu(raw, offs, mask, mask, pos, state_ptr + row * s_state_b, s_state_c, s_state_k,
                     weight_ptr, s_w_c, bias_ptr, HAS_BIAS, WIDTH, BLOCK_W)
    tl.store(out_ptr + row * s_out_b + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def conv_step_(x: Tensor, state: Tensor, weight: Tensor, bias: Optional[Tensor], position: Tensor,
               block_c: int = 256, num_warps: Optional[int] = None) -> Tensor:
    """One causal depthwise-convolution position with SiLU, writing ``x`` into the ring buffer
    ``state`` in place (module docstring).

    Reference (p = ``position``, W the width)::

        window = cat(state[..., (p + 1 + arange(W - 1)) % W], x.to(state.dtype)[..., None])
        state[..., p % W] = x                                  # rounded to state.dtype
        out = silu((window * weight).sum(-1) + bias)           # float32 inside

    Args:
        x: (R, C) inputs at position ``position``, last dim contiguous (a view of ``in_proj``'s
            output is fine).
        state: (R, C, W) ring buffer of the last W inputs, any strides (aimkit keeps channels
            contiguous: strides (W*C, 1, C)); slot ``position % W`` is overwritten.
        weight: (C, W) with a contiguous last dim (``conv1d.weight.squeeze(1)``).
        bias: optional (C,), contiguous.
        position: () integer tensor on the device (``InferenceParams.position``), read by the
            kernel: a captured launch follows it.
        block_c: channels per program (a power of two).
        num_warps: warps per program (default: 1 for large steps, 4 for small ones; on an H200
            one warp was fastest at 512 rows, e.g. AiM-XL 8.9 against 11.0 µs with four).

    Returns:
        (R, C) in ``x.dtype``.
    """
    _check_conv("conv_step_", x, state, weight, bias, position)
    rows, channels = x.shape
    width = state.shape[-1]
    out = torch.empty(rows, channels, device=x.device, dtype=x.dtype)
    block = min(triton.next_power_of_2(channels), block_c)
    if num_warps is None:
        num_warps = 1 if rows * channels >= 1 << 18 else 4
    use_pdl = _pdl(x)
    with _on_device(x):
        _conv_step_kernel[(rows, triton.cdiv(channels, block))](
            x, state, weight, bias if bias is not None else weight, position, out,
            channels,
            x.stride(0), state.stride(0), state.stride(1), state.stride(2), weight.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, WIDTH=width, BLOCK_W=triton.next_power_of_2(width), BLOCK_C=block,
            USE_PDL=use_pdl, num_warps=num_warps, **_launch_options(use_pdl),
        )
    return out


@triton.jit
def _conv_silu_tile(raw, offs_m, chan, mask_m, mask_c, pos, ring_ptr, s_ring_b, s_ring_c, s_ring_k,
                    w_ptr, s_w_c, bias_ptr, HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr):
    # _conv_silu for a (rows x channels) tile: rows ``offs_m`` (BLOCK_M,), ring channels ``chan``
    # (BLOCK_N,), the new inputs ``raw`` (BLOCK_M, BLOCK_N) already in the ring's dtype. The taps
    # j < WIDTH-1 come from ring slot (pos + 1 + j) % WIDTH (oldest first), the last is ``raw``,
    # which is then stored into slot pos % WIDTH (the one slot no tap reads). Float32 inside.
    mask = mask_m[:, None] & mask_c[None, :]
    ring = ring_ptr + offs_m[:, None] * s_ring_b + chan[None, :] * s_ring_c  # (BLOCK_M, BLOCK_N) slot 0
    acc = tl.zeros(raw.shape, dtype=tl.float32)
    for j in tl.static_range(WIDTH - 1):
        old = tl.load(ring + ((pos + 1 + j) % WIDTH) * s_ring_k, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + chan * s_w_c + j, mask=mask_c, other=0.0).to(tl.float32)
        acc += old * w[None, :]
    w = tl.load(w_ptr + chan * s_w_c + (WIDTH - 1), mask=mask_c, other=0.0).to(tl.float32)
    acc += raw.to(tl.float32) * w[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + chan, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    tl.store(ring + (pos % WIDTH) * s_ring_k, raw, mask=mask)
    return acc / (1.0 + tl.exp(-acc))  # SiLU


@triton.jit
def _in_proj_conv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, ring_ptr, cw_ptr, cb_ptr, pos_ptr,
    rows, n_out, k_dim, conv_start, conv_dim,
    s_x, s_w, s_out, s_ring_b, s_ring_c, s_ring_k, s_cw_c,
    HAS_BIAS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
):
    # One (BLOCK_M rows x BLOCK_N columns) tile of x @ weight.T, K-loop over D in float32; the
    # columns of the conv segment then go through the convolution step in the epilogue. Rows are
    # the fast grid axis: consecutive programs share a weight tile.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < rows
    mask_n = offs_n < n_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(x_ptr + offs_m[:, None] * s_x + kk[None, :], mask=mask_m[:, None] & (kk[None, :] < k_dim),
                    other=0.0)  # (BLOCK_M, BLOCK_K)
        b = tl.load(w_ptr + offs_n[None, :] * s_w + kk[:, None], mask=mask_n[None, :] & (kk[:, None] < k_dim),
                    other=0.0)  # (BLOCK_K, BLOCK_N): weight rows are output columns
        if DOT_F32:  # Triton's interpreter multiplies the raw bits of bf16 operands: exact float32 there
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = acc.to(out_ptr.dtype.element_ty)  # the projection, rounded as in_proj's output
    if (n0 < conv_start + conv_dim) & (n0 + BLOCK_N > conv_start):  # the tile holds conv columns
        chan = offs_n - conv_start
        mask_c = (chan >= 0) & (chan < conv_dim)
        pos = tl.load(pos_ptr)
        conv = _conv_silu_tile(out.to(ring_ptr.dtype.element_ty), offs_m, chan, mask_m, mask_c, pos, ring_ptr,
                               s_ring_b, s_ring_c, s_ring_k, cw_ptr, s_cw_c, cb_ptr, HAS_CONV_BIAS, WIDTH)
        out = tl.where(mask_c[None, :], conv.to(out_ptr.dtype.element_ty), out)
    tl.store(out_ptr + offs_m[:, None] * s_out + offs_n[None, :], out, mask=mask_m[:, None] & mask_n[None, :])


def _proj_conv_config(rows: int, n_out: int) -> Tuple[int, int]:
    """Default (block_m, block_n) of :func:`in_proj_conv_step_`: row tiles of 16/32/64 by batch,
    64-column tiles while that still leaves few programs, else 128 (untuned: a starting point)."""
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_n = 64 if triton.cdiv(rows, block_m) * triton.cdiv(n_out, 128) < 256 else 128
    return block_m, block_n


def in_proj_conv_step_(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], conv_state: Tensor, conv_weight: Tensor,
    conv_bias: Optional[Tensor], position: Tensor, conv_start: int, conv_dim: int,
    block_m: Optional[int] = None, block_n: Optional[int] = None, num_warps: int = 4, num_stages: int = 3,
) -> Tensor:
    """Mamba2's input projection of one position with the convolution step in its epilogue:
    ``in_proj`` and :func:`conv_step_` in one kernel, updating ``conv_state`` in place.

    Reference (p = ``position``, W the width, ``seg = slice(conv_start, conv_start + conv_dim)``)::

        out = F.linear(x, weight, bias)                        # (R, N_in), float32 accumulation
        out[:, seg] = conv_step_(out[:, seg], conv_state, conv_weight, conv_bias, p)

    i.e. the ring gets the projection of the segment rounded to ``x.dtype`` and then to
    ``conv_state.dtype``, exactly what the two-kernel path stores; the segment's columns of
    ``out`` hold silu(conv) instead of the raw projection. Only for 16-bit inputs: ``tl.dot`` on
    float32 would use TF32.

    Args:
        x: (R, D) bfloat16 or float16, last dim contiguous.
        weight: (N_in, D) in ``x.dtype``, last dim contiguous (``in_proj.weight``).
        bias: optional (N_in,) contiguous (``in_proj.bias``).
        conv_state: (R, conv_dim, W) ring buffer (module docstring), any strides (aimkit's cache:
            (W*conv_dim, 1, conv_dim)); slot ``position % W`` is overwritten.
        conv_weight: (conv_dim, W), last dim contiguous (``conv1d.weight.squeeze(1)``).
        conv_bias: optional (conv_dim,), contiguous.
        position: () integer tensor on the device (``InferenceParams.position``), read by the kernel.
        conv_start: first column of the conv segment (Mamba2: ``d_inner``, after z).
        conv_dim: columns of the segment (Mamba2: ``d_inner + 2*G*N``, x then B then C).
        block_m, block_n: rows and columns per program (powers of two, at least 16; default from
            :func:`_proj_conv_config`).
        num_warps, num_stages: Triton launch options (the K loop's pipelining depth).

    Returns:
        (R, N_in) in ``x.dtype``: the projection outside the segment, silu(conv) inside.
    """
    name = "in_proj_conv_step_"
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        raise ValueError(f"{name}: needs bfloat16 or float16 x and weight of the same dtype (tl.dot would run "
                         f"float32 as TF32), got x {x.dtype} and weight {weight.dtype}")
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{name}: x {tuple(x.shape)} and weight {tuple(weight.shape)} are not (R, D) and (N_in, D)")
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"{name}: x and weight need a contiguous last dimension, got strides "
                         f"{x.stride()} and {weight.stride()}")
    rows, k_dim = x.shape
    n_out = weight.shape[0]
    if bias is not None and (bias.shape != (n_out,) or bias.stride(0) != 1):
        raise ValueError(f"{name}: bias must be a contiguous ({n_out},) tensor, got {tuple(bias.shape)}")
    if conv_start < 0 or conv_dim < 1 or conv_start + conv_dim > n_out:
        raise ValueError(f"{name}: conv segment [{conv_start}, {conv_start + conv_dim}) outside the {n_out} columns")
    out = torch.empty(rows, n_out, device=x.device, dtype=x.dtype)
    _check_conv(name, out[:, conv_start:conv_start + conv_dim], conv_state, conv_weight, conv_bias, position)
    default_m, default_n = _proj_conv_config(rows, n_out)
    block_m, block_n = block_m or default_m, block_n or default_n
    for arg, block in (("block_m", block_m), ("block_n", block_n)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name}: {arg} must be a power of two of at least 16 (tl.dot), got {block}")
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n_out, block_n))
    with _on_device(x):
        _in_proj_conv_kernel[grid](
            x, weight, bias if bias is not None else weight, out, conv_state, conv_weight,
            conv_bias if conv_bias is not None else conv_weight, position,
            rows, n_out, k_dim, conv_start, conv_dim,
            x.stride(0), weight.stride(0), out.stride(0),
            conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), conv_weight.stride(0),
            HAS_BIAS=bias is not None, HAS_CONV_BIAS=conv_bias is not None, WIDTH=conv_state.shape[-1],
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, DOT_F32=not x.is_cuda,
            num_warps=num_warps, num_stages=num_stages,
        )
    return out
