"""GroupNorm followed by swish as two Triton kernels: the norm-activation pairs of the VQ decoder.

Every ``nn.GroupNorm(32, C, eps=1e-6)`` of :mod:`aimkit.tokenizers.vq` but the attention block's
is followed by ``_swish(y) = y * sigmoid(y)``. :func:`group_norm_swish` computes

    y = (x - mean_g) / sqrt(var_g + eps) * weight_c + bias_c;   out = y * sigmoid(y)  (or y)

with ``mean_g`` and the biased ``var_g`` over the ``C / G * prod(spatial)`` elements of group g of
each image, reading x twice and writing the output once, instead of the three or four passes of
the eager norm, sigmoid and product.

Grid. In a contiguous (B, C, *spatial) tensor each (image, group) is one contiguous segment of
``L = C / G * S`` elements (S = prod(spatial)).

* Statistics, a split reduction: one program per (segment, chunk of ``block * tiles`` elements)
  (1-D grid of ``B * G * n_chunks``). By default ``block`` is 4096 and ``tiles`` 4, or fewer
  (down to 1) where that would give fewer than 2048 programs; a segment has at most
  :data:`_MAX_CHUNKS` chunks (larger ones get longer chunks). A program walks its chunk in tiles
  of ``block`` elements and writes a partial ``(pivot, mean - pivot, M2)`` to a float32 scratch
  tensor.
* Apply: one program per (segment, block of channels of the group, block of spatial positions),
  tiles of ``block`` elements (a whole block of spatial positions of one channel when S is large,
  several channels of S positions when S is small). Each program combines its segment's partials
  (at most :data:`_MAX_CHUNKS` floats of each kind) into the mean and ``1 / sqrt(var + eps)``,
  then normalises, applies the affine map and swish to its tile.

Precision. Statistics in float32 with Chan's parallel variance: each tile's mean, then the sum of
squares centred on it, tiles and chunks merged with ``M2 = M2_a + M2_b + delta^2 n_a n_b / n``.
Data are first shifted by a pivot, one element of the chunk (the chunk's first), and the group's
mean is kept as ``pivot + offset``, so that rounding errors scale with the spread of the data,
not with its mean (x = 1000 + noise normalises as precisely as x = noise). ``1 / sqrt`` is
correctly rounded; normalisation, affine map and swish run in float32 (``sigmoid`` through the
hardware ``exp2``), rounded once to x's dtype: within one rounding of the float64 result. The
eager model is less precise in 16-bit dtypes: CUDA's ``F.group_norm`` keeps the mean and
``1 / std`` in x's dtype, and the norm's output, the sigmoid and the product are each rounded, so
the two differ by a few units in the last place, more where y is small next to the normalised x.

Reference: :func:`group_norm_swish_reference` (``F.group_norm``, then ``y * torch.sigmoid(y)``,
what the model computes today). Importing this module imports Triton.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_vectors, on_device

__all__ = ["group_norm_swish", "group_norm_swish_reference"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK = 4096  # elements per tile of either kernel; not a measured optimum
_TILES = 4  # tiles per statistics program where there are enough programs (chunks of 16384 elements)
_MIN_PROGRAMS = 2048  # fewer tiles per statistics program down to 1 while there would be fewer programs
_MAX_CHUNKS = 64  # statistics programs per (image, group) at most


# --------------------------------------------------------------------------- reference (PyTorch)


def group_norm_swish_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float,
                               swish: bool = True) -> Tensor:
    """:func:`group_norm_swish` in PyTorch, as :mod:`aimkit.tokenizers.vq` computes it:
    ``F.group_norm`` in x's dtype, then (if ``swish``) ``y * torch.sigmoid(y)``, each op rounded
    to x's dtype."""
    _check("group_norm_swish_reference", x, weight, bias, groups, eps)
    y = F.group_norm(x, groups, weight, bias, eps).to(x.dtype)
    return y * torch.sigmoid(y) if swish else y


# --------------------------------------------------------------------------- kernels


@triton.jit
def _group_stats_kernel(x_ptr, part_ptr, seg_len, chunk_len, n_chunks, BLOCK: tl.constexpr):
    # program (segment, chunk): partial (pivot, mean - pivot, M2) over the chunk's elements
    # [chunk * chunk_len, min(seg_len, (chunk + 1) * chunk_len)) of the segment, tile by tile
    pid = tl.program_id(0)
    seg = pid // n_chunks
    start = (pid % n_chunks) * chunk_len
    end = tl.minimum(start + chunk_len, seg_len)
    base = x_ptr + seg.to(tl.int64) * seg_len
    pivot = tl.load(base + start).to(tl.float32)
    count = 0.0
    mean = 0.0  # of x - pivot over the tiles so far
    m2 = 0.0
    offs = tl.arange(0, BLOCK)
    for tile in range(start, end, BLOCK):
        mask = tile + offs < end
        d = tl.where(mask, tl.load(base + tile + offs, mask=mask, other=0.0).to(tl.float32) - pivot, 0.0)
        n_t = tl.minimum(end - tile, BLOCK).to(tl.float32)
        mean_t = tl.sum(d, axis=0) / n_t
        c = tl.where(mask, d - mean_t, 0.0)
        m2_t = tl.sum(c * c, axis=0)
        # Chan: merge the tile (n_t, mean_t, m2_t) into the running (count, mean, m2)
        total = count + n_t
        delta = mean_t - mean
        mean += delta * (n_t / total)
        m2 += m2_t + delta * delta * (count * n_t / total)
        count = total
    out = part_ptr + pid * 3
    tl.store(out, pivot)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _group_apply_kernel(
    x_ptr, w_ptr, b_ptr, part_ptr, y_ptr,
    groups, group_channels, spatial, chunk_len, n_chunks, n_c_blocks, n_s_blocks, eps,
    SWISH: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # program (segment, channel block, spatial block); segment = image * G + group
    pid = tl.program_id(0)
    s_block = pid % n_s_blocks
    c_block = (pid // n_s_blocks) % n_c_blocks
    seg = pid // (n_s_blocks * n_c_blocks)
    seg_len = group_channels * spatial

    # the segment's statistics from its partials (Chan, around the first chunk's pivot)
    k = tl.arange(0, BLOCK_K)
    k_mask = k < n_chunks
    part = part_ptr + seg * n_chunks * 3 + k * 3
    pivot = tl.load(part_ptr + seg * n_chunks * 3)
    # chunk means - pivot: (chunk pivot - pivot) is exact or nearly, the data's spread at most
    rel = (tl.load(part, mask=k_mask, other=0.0) - pivot) + tl.load(part + 1, mask=k_mask, other=0.0)
    rel = tl.where(k_mask, rel, 0.0)
    n_k = tl.where(k_mask, tl.minimum(chunk_len, seg_len - k * chunk_len), 0).to(tl.float32)
    n = seg_len.to(tl.float32)
    mean = tl.sum(n_k * rel, axis=0) / n  # - pivot
    dev = rel - mean
    m2 = tl.sum(tl.load(part + 2, mask=k_mask, other=0.0), axis=0) + tl.sum(n_k * dev * dev, axis=0)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(m2 / n + eps))

    c_local = c_block * BLOCK_C + tl.arange(0, BLOCK_C)  # channel within the group
    c_mask = c_local < group_channels
    chan = (seg % groups) * group_channels + c_local
    scale = rstd * tl.load(w_ptr + chan, mask=c_mask, other=0.0).to(tl.float32)
    shift = tl.load(b_ptr + chan, mask=c_mask, other=0.0).to(tl.float32)
    s = s_block * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = c_mask[:, None] & (s < spatial)[None, :]
    offs = seg.to(tl.int64) * seg_len + c_local[:, None] * spatial + s[None, :]  # (BLOCK_C, BLOCK_S)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = ((x - pivot) - mean) * scale[:, None] + shift[:, None]
    if SWISH:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launcher


def _check(name: str, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float) -> None:
    if x.dim() < 2:
        raise ValueError(f"{name}: x must be (B, C, *spatial), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: x must be float16, bfloat16 or float32, got {x.dtype}")
    channels = x.shape[1]
    if groups <= 0 or channels % groups:
        raise ValueError(f"{name}: the {channels} channels of x must be a multiple of groups, a positive "
                         f"integer, got groups={groups}")
    if not eps >= 0.0 or math.isinf(eps):
        raise ValueError(f"{name}: eps must be a finite non-negative float, got {eps}")
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.shape != (channels,) or not t.is_floating_point():
            raise ValueError(f"{name}: {arg} must be a floating ({channels},) tensor, got {tuple(t.shape)} {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: {arg} must be on x's device {x.device}, got {t.device}")


def group_norm_swish(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float,
                     swish: bool = True, *, block: int = _BLOCK, tiles: int | None = None,
                     num_warps: int = 4) -> Tensor:
    """GroupNorm, then swish, fused: two launches (module docstring).

    Reference::

        y = F.group_norm(x, groups, weight, bias, eps)   # float32 statistics and arithmetic here,
        return y * torch.sigmoid(y) if swish else y      # one rounding to x.dtype at the end

    Args:
        x: (B, C, *spatial), contiguous, float16, bfloat16 or float32 (the decoder's (B, C, H, W)).
        weight: (C,) scale of any float dtype, or None (ones).
        bias: (C,) shift of any float dtype, or None (zeros).
        groups: G, a positive divisor of C.
        eps: added to the variance (the decoder's 1e-6).
        swish: apply ``y * sigmoid(y)`` after the norm.
        block: elements per tile of either kernel, a power of two.
        tiles: tiles per statistics program at least (more where a group would need more than
            64 programs); default: 4, or fewer where that would give fewer than 2048 programs.
        num_warps: warps per program of either kernel.

    Returns:
        (B, C, *spatial) in x's dtype, contiguous.
    """
    name = "group_norm_swish"
    _check(name, x, weight, bias, groups, eps)
    if not x.is_contiguous():
        raise ValueError(f"{name}: x must be contiguous (NCHW), got strides {x.stride()} for shape {tuple(x.shape)}")
    check_vectors(name, x.shape[1], weight=weight, bias=bias)
    if block < 1 or block & (block - 1) or (tiles is not None and tiles < 1):
        raise ValueError(f"{name}: block must be a power of two and tiles positive, got {block} and {tiles}")
    batch, channels = x.shape[:2]
    spatial = math.prod(x.shape[2:])
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    if weight is None:
        weight = torch.ones(channels, device=x.device)
    if bias is None:
        bias = torch.zeros(channels, device=x.device)
    group_channels = channels // groups
    seg_len = group_channels * spatial  # elements per (image, group)
    if seg_len >= 2 ** 31:
        raise ValueError(f"{name}: a group holds {seg_len} elements, more than the kernels address (2 ** 31 - 1)")
    segments = batch * groups
    if tiles is None:
        tiles = min(_TILES, max(1, segments * triton.cdiv(seg_len, block) // _MIN_PROGRAMS))
    chunk_len = block * max(tiles, triton.cdiv(seg_len, block * _MAX_CHUNKS))
    n_chunks = triton.cdiv(seg_len, chunk_len)
    block_s = min(triton.next_power_of_2(spatial), block)
    block_c = min(triton.next_power_of_2(group_channels), block // block_s)
    n_c_blocks = triton.cdiv(group_channels, block_c)
    n_s_blocks = triton.cdiv(spatial, block_s)
    partials = torch.empty(segments, n_chunks, 3, device=x.device, dtype=torch.float32)
    with on_device(x):
        _group_stats_kernel[(segments * n_chunks,)](
            x, partials, seg_len, chunk_len, n_chunks, BLOCK=block, num_warps=num_warps,
        )
        _group_apply_kernel[(segments * n_c_blocks * n_s_blocks,)](
            x, weight, bias, partials, y,
            groups, group_channels, spatial, chunk_len, n_chunks, n_c_blocks, n_s_blocks, eps,
            SWISH=swish, BLOCK_K=triton.next_power_of_2(n_chunks), BLOCK_C=block_c, BLOCK_S=block_s,
            num_warps=num_warps,
        )
    return y
