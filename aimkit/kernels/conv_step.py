"""One position of Mamba2's depthwise causal convolution with SiLU as a Triton kernel:
operation ``conv_step``.

Convolution state (``conv_state``, (R, C, W) for a kernel of width W): a ring buffer indexed by
absolute position. Slot ``k`` holds the (raw, pre-convolution) input of the latest position ``q``
with ``q % W == k``, zeros for positions before the sequence. The step at position ``p`` reads the
window ``p-W+1 .. p`` (oldest first) as slots ``(p+1) % W, ..., (p+W-1) % W`` plus the new input,
then writes the new input into slot ``p % W``, the one slot it does not read: nothing is shifted.
``p`` is read from a device tensor (``InferenceParams.position``), so a captured step stays valid
at every position. (causal-conv1d's update kernel shifts its window instead, and was measured
slower on this layout: docs/benchmarks.md.)

Reference: the PyTorch ring step of the Mamba2 mixer
(:meth:`aimkit.backbones.mamba2.Mamba2._conv_step`), written out in :func:`conv_step_`'s
docstring. Importing this module imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import on_device

__all__ = ["conv_step_"]


@triton.jit
def _conv_silu(raw, chan, mask, pos, ring_ptr, s_ring_c, s_ring_k, w_ptr, s_w_c, bias_ptr,
               HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_W: tl.constexpr):
    # silu(causal depthwise conv) at position ``pos`` of the channels ``chan`` (a block) of one row
    # whose ring buffer starts at ``ring_ptr``, in float32. The window, oldest first, is positions
    # pos-WIDTH+1 .. pos: tap j < WIDTH-1 from ring slot (pos + 1 + j) % WIDTH, the last tap the
    # new input ``raw`` (already in the ring's dtype), which is then stored into slot pos % WIDTH:
    # the one slot that no tap reads.
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
    tl.store(ring_ptr + chan * s_ring_c + (pos % WIDTH) * s_ring_k, raw, mask=mask)
    return acc / (1.0 + tl.exp(-acc))  # SiLU


@triton.jit
def _conv_step_kernel(
    x_ptr, state_ptr, weight_ptr, bias_ptr, pos_ptr, out_ptr,
    channels,
    s_x_b, s_state_b, s_state_c, s_state_k, s_w_c, s_out_b,
    HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs < channels
    pos = tl.load(pos_ptr)
    raw = tl.load(x_ptr + row * s_x_b + offs, mask=mask, other=0.0).to(state_ptr.dtype.element_ty)
    out = _conv_silu(raw, offs, mask, pos, state_ptr + row * s_state_b, s_state_c, s_state_k,
                     weight_ptr, s_w_c, bias_ptr, HAS_BIAS, WIDTH, BLOCK_W)
    tl.store(out_ptr + row * s_out_b + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check_args(x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None, position: Tensor) -> None:
    name = "conv_step_"
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


def conv_step_(x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None, position: Tensor,
               block_c: int = 256, num_warps: int | None = None) -> Tensor:
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
        num_warps: warps per program (default: 1 for large steps, 4 for small ones).

    Returns:
        (R, C) in ``x.dtype``.
    """
    _check_args(x, state, weight, bias, position)
    rows, channels = x.shape
    width = state.shape[-1]
    out = torch.empty(rows, channels, device=x.device, dtype=x.dtype)
    block = min(triton.next_power_of_2(channels), block_c)
    if num_warps is None:
        num_warps = 1 if rows * channels >= 1 << 18 else 4
    with on_device(x):
        _conv_step_kernel[(rows, triton.cdiv(channels, block))](
            x, state, weight, bias if bias is not None else weight, position, out,
            channels,
            x.stride(0), state.stride(0), state.stride(1), state.stride(2), weight.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, WIDTH=width, BLOCK_W=triton.next_power_of_2(width), BLOCK_C=block,
            num_warps=num_warps,
        )
    return out
