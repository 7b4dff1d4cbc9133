"""Rotary positions of the current token's query and key with the KV-cache write, as one Triton
kernel: the first half of operation ``decode_attention`` (the transformer decode step).

After the fused q/k/v projection of one token, ``Attention.step`` of
:mod:`aimkit.backbones.transformer` builds the rotary cos/sin tables of the position, rotates q
and k in float32, and copies k and v into the cache with ``index_copy_``: some 25 launches per
layer and step. :func:`rope_cache_write_` does all of it in one. The position is read from a
device tensor by the kernel, never on the host, so a decode step built on it can be captured in
a CUDA graph once and replayed at every position.

Grid: one program per (row, block of heads), the heads of a row counted over the projection
output's ``[q heads | k heads | v heads]`` layout; the position's cos/sin of every channel pair
are computed once per program and serve all its heads (v heads are copied unrotated). Angles:

* ``"1d"``: pair i turns by ``p * inv_freq_i``, ``inv_freq_i = base ** (-(2i) / head_dim)``;
* ``"2d"`` (LlamaGen): position 0 (the class token) has cos = sin = 0; position p >= 1 sits at
  grid cell ``g = p - 1``, row ``g // G``, column ``g % G`` (G = ``grid_size``); pair j below
  ``head_dim / 4`` turns by ``row * f_j``, pair j above by ``col * f_{j - head_dim/4}``, with
  ``f_j = base ** (-(2j) / (head_dim / 2))``.

Precision. The kernel rounds to float32 where the model does: the exponent (``2i / head_dim``,
correctly rounded), the power ``base ** exponent``, its reciprocal and the angle ``coord *
inv_freq``. The power is ``exp2(exponent * log2(base))`` in float64 (libdevice's ``__nv_exp2`` on
CUDA) rounded once to float32, i.e. the correctly rounded float32 power, which torch's float32
``pow`` returns too up to rare last-bit differences; an inverse frequency one float32 ulp off
turns the angle by about one ulp of the angle (6.1e-5 rad for angles in [512, 1024)). cos and sin take the float32
angle itself (libdevice's ``__nv_cosf`` / ``__nv_sinf`` on CUDA, which reduce large arguments
exactly). The rotation ``(x0 c - x1 s, x0 s + x1 c)`` runs in float32 and is rounded to the
projection's dtype, then (k, v) to the cache's, as ``apply_rotary`` and ``index_copy_`` round.

Reference: :func:`rope_cache_write_reference` (PyTorch: the model's own tables and rotation from
:mod:`aimkit.kernels.rotary`, then ``index_copy_``). Importing this module imports Triton.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_last_dim_contiguous, on_device
from .rotary import apply_rotary, rotary_tables

__all__ = ["rope_cache_write_", "rope_cache_write_reference"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ROPES = ("1d", "2d")
_PAIRS_PER_PROGRAM = 512  # default channel pairs per program (heads x pairs); not a measured optimum


# --------------------------------------------------------------------------- reference (PyTorch)


def rope_cache_write_reference(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, position: Tensor, *,
                               n_head: int, n_kv_head: int, head_dim: int, rope: str, base: float,
                               grid_size: int | None = None) -> Tensor:
    """:func:`rope_cache_write_` in PyTorch: the transformer's rotary tables and rotation
    (:mod:`aimkit.kernels.rotary`) and ``index_copy_`` (same arguments, same effects; a position
    outside the cache raises here, from ``index_copy_``, where the kernel writes nothing).

    Returns:
        (B, n_kv_head, n_head // n_kv_head, head_dim) rotated queries in ``qkv.dtype``.
    """
    _check_heads("rope_cache_write_reference", n_head, n_kv_head, head_dim, rope, base, grid_size)
    _check_tensors("rope_cache_write_reference", qkv, k_cache, v_cache, position, n_head, n_kv_head, head_dim)
    batch = qkv.shape[0]
    index = position.reshape(1)
    cos, sin = rotary_tables(index, head_dim, base, rope, grid_size)  # (1, hd / 2) each
    heads = qkv.unflatten(-1, (n_head + 2 * n_kv_head, head_dim)).unsqueeze(1)  # (B, 1, H + 2 Hkv, hd)
    q, k, v = heads.split([n_head, n_kv_head, n_kv_head], dim=2)
    k = apply_rotary(k, cos, sin)  # (B, 1, Hkv, hd)
    k_cache.index_copy_(2, index, k.to(k_cache.dtype).transpose(1, 2))  # (B, Hkv, 1, hd)
    v_cache.index_copy_(2, index, v.to(v_cache.dtype).transpose(1, 2))
    return apply_rotary(q, cos, sin).reshape(batch, n_kv_head, n_head // n_kv_head, head_dim)


# --------------------------------------------------------------------------- kernel


@triton.jit
def _cos_sin(pos, pairs, head_dim, grid_size, log2_base_hi, log2_base_lo, ROPE_2D: tl.constexpr):
    # float32 cos and sin of channel pairs ``pairs`` (a block) at position ``pos`` (module docstring)
    if ROPE_2D:
        quarter = head_dim // 4
        in_row = pairs < quarter
        j = tl.where(in_row, pairs, pairs - quarter)
        exponent = tl.math.div_rn((2 * j).to(tl.float32), (head_dim // 2).to(tl.float32))
        cell = tl.maximum(pos - 1, 0)
        coord = tl.where(in_row, cell // grid_size, cell % grid_size).to(tl.float32)
    else:
        exponent = tl.math.div_rn((2 * pairs).to(tl.float32), head_dim.to(tl.float32))
        coord = pos.to(tl.float32)
    # base ** exponent = exp2(exponent * log2(base)) in float64, log2(base) passed as float32 halves
    # hi + lo (float arguments are float32; both products are exact in float64), rounded once
    e64 = exponent.to(tl.float64)
    power = tl.exp2(e64 * log2_base_hi + e64 * log2_base_lo).to(tl.float32)
    angle = coord * tl.math.div_rn(1.0, power)  # float32, rounded as the model rounds it
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    if ROPE_2D:  # the class token's tables are zero
        cos = tl.where(pos >= 1, cos, 0.0)
        sin = tl.where(pos >= 1, sin, 0.0)
    return cos, sin


@triton.jit
def _store_pairs(ptr, y0, y1, mask):
    # y0 to the even channels at ``ptr``, y1 to the odd ones after them, in ptr's dtype
    tl.store(ptr, y0.to(ptr.dtype.element_ty), mask=mask)
    tl.store(ptr + 1, y1.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_cache_kernel(
    qkv_ptr, k_ptr, v_ptr, pos_ptr, q_ptr,
    n_head, n_kv_head, head_dim, seqlen, grid_size, log2_base_hi, log2_base_lo,
    s_qkv_b, s_k_b, s_k_h, s_k_s, s_v_b, s_v_h, s_v_s,
    ROPE_2D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # program (row, head block): heads h of the row's [q | k | v] heads, pairs (2i, 2i + 1) of each.
    # q head h -> q_ptr (contiguous (B, H * hd)), rotated; k head -> k_cache[row, h - H, pos],
    # rotated; v head -> v_cache[row, h - H - Hkv, pos], copied. No K/V store outside [0, seqlen).
    row = tl.program_id(0).to(tl.int64)
    heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[:, None]  # (BLOCK_H, 1)
    pairs = tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    pos = tl.load(pos_ptr)
    cos, sin = _cos_sin(pos, pairs, head_dim, grid_size, log2_base_hi, log2_base_lo, ROPE_2D)
    cos, sin = cos[None, :], sin[None, :]  # (1, BLOCK_P)
    pairs = pairs[None, :]
    v_start = n_head + n_kv_head  # first v head
    mask = (heads < v_start + n_kv_head) & (pairs < head_dim // 2)  # (BLOCK_H, BLOCK_P)
    chan = heads * head_dim + 2 * pairs  # even channels of each head in the row
    x0 = tl.load(qkv_ptr + row * s_qkv_b + chan, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(qkv_ptr + row * s_qkv_b + chan + 1, mask=mask, other=0.0).to(tl.float32)
    is_v = heads >= v_start
    out_ty = q_ptr.dtype.element_ty  # the projection's dtype, which the model rounds to first
    y0 = tl.where(is_v, x0, x0 * cos - x1 * sin).to(out_ty)
    y1 = tl.where(is_v, x1, x0 * sin + x1 * cos).to(out_ty)

    _store_pairs(q_ptr + row * n_head * head_dim + chan, y0, y1, mask & (heads < n_head))
    if (pos >= 0) & (pos < seqlen):  # a device value cannot raise: outside the cache, no write
        is_k = mask & (heads >= n_head) & (heads < v_start)
        kh = tl.where(is_k, heads - n_head, 0)  # in range on the masked lanes too
        _store_pairs(k_ptr + row * s_k_b + kh * s_k_h + pos * s_k_s + 2 * pairs, y0, y1, is_k)
        v_mask = mask & is_v
        vh = tl.where(v_mask, heads - v_start, 0)
        _store_pairs(v_ptr + row * s_v_b + vh * s_v_h + pos * s_v_s + 2 * pairs, y0, y1, v_mask)


def _check_heads(name: str, n_head: int, n_kv_head: int, head_dim: int, rope: str, base: float,
                 grid_size: int | None) -> None:
    if rope not in _ROPES:
        raise ValueError(f"{name}: rope must be one of {_ROPES}, got {rope!r}")
    if n_head <= 0 or n_kv_head <= 0 or n_head % n_kv_head:
        raise ValueError(f"{name}: n_head {n_head} must be a positive multiple of n_kv_head {n_kv_head}")
    multiple = 4 if rope == "2d" else 2
    if head_dim <= 0 or head_dim % multiple:
        raise ValueError(f"{name}: head_dim must be a positive multiple of {multiple} for {rope} rotary "
                         f"embeddings, got {head_dim}")
    if not 2.0 ** -125 <= base < 2.0 ** 125:  # base ** exponent and its reciprocal stay normal float32
        raise ValueError(f"{name}: base must be a positive float in [2 ** -125, 2 ** 125), got {base}")
    if rope == "2d" and (grid_size is None or grid_size <= 0):
        raise ValueError(f"{name}: rope '2d' needs a positive grid_size, got {grid_size!r}")


def _check_tensors(name: str, qkv: Tensor, k_cache: Tensor, v_cache: Tensor, position: Tensor,
                   n_head: int, n_kv_head: int, head_dim: int) -> None:
    width = (n_head + 2 * n_kv_head) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width:
        raise ValueError(f"{name}: qkv must be (B, (n_head + 2 * n_kv_head) * head_dim) = (B, {width}), "
                         f"got {tuple(qkv.shape)}")
    expected = (qkv.shape[0], n_kv_head, head_dim)
    if (k_cache.dim() != 4 or v_cache.shape != k_cache.shape
            or (k_cache.shape[0], k_cache.shape[1], k_cache.shape[3]) != expected):
        raise ValueError(f"{name}: k_cache and v_cache must both be (B, n_kv_head, S, head_dim) with "
                         f"(B, n_kv_head, head_dim) = {expected}, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if any(t.dtype not in _FLOAT_DTYPES for t in (qkv, k_cache, v_cache)) or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{name}: qkv and the caches must be float16, bfloat16 or float32 (the two caches "
                         f"alike), got {qkv.dtype}, {k_cache.dtype} and {v_cache.dtype}")
    if k_cache.device != qkv.device or v_cache.device != qkv.device:
        raise ValueError(f"{name}: qkv and the caches must be on one device, got {qkv.device}, "
                         f"{k_cache.device} and {v_cache.device}")
    if position.numel() != 1 or position.dtype != torch.int64 or position.device != qkv.device:
        raise ValueError(f"{name}: position must be a one-element int64 tensor on {qkv.device}, got "
                         f"{tuple(position.shape)} {position.dtype} on {position.device}")


def _float32(x: float) -> float:
    """``x`` rounded to the nearest float32."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _log2_halves(base: float) -> tuple[float, float]:
    """``log2(base)`` as float32 ``(hi, lo)`` with ``hi + lo`` ~ the float64 value (kernel float
    arguments are float32). ``base`` is first rounded to float32, as ``torch.pow(base, float32)`` does."""
    log2_base = math.log2(_float32(base))
    hi = _float32(log2_base)
    return hi, _float32(log2_base - hi)


def rope_cache_write_(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, position: Tensor, *, n_head: int,
                      n_kv_head: int, head_dim: int, rope: str, base: float, grid_size: int | None = None,
                      block_h: int | None = None, num_warps: int = 4) -> Tensor:
    """Rotate the current token's q and k by its position, write k and v into the caches there,
    return q (module docstring).

    Reference (p = ``position``; float32 inside, as ``Attention.step``)::

        q, k, v = qkv.unflatten(-1, (H + 2 * Hkv, hd)).split([H, Hkv, Hkv], dim=1)
        cos, sin = rotary_angles(p) or rotary_angles_2d(p, grid_size)       # (1, hd / 2)
        k_cache[:, :, p] = apply_rotary(k, cos, sin).to(k_cache.dtype)
        v_cache[:, :, p] = v.to(v_cache.dtype)
        return apply_rotary(q, cos, sin).reshape(B, Hkv, H // Hkv, hd)

    Args:
        qkv: (B, (n_head + 2 * n_kv_head) * head_dim), the fused projection of the current token,
            laid out ``[q heads | k heads | v heads]`` with each head's channels contiguous; float16,
            bfloat16 or float32 with a contiguous last dim (rows may be strided, e.g. a column slice).
        k_cache: (B, n_kv_head, S, head_dim), any strides but a contiguous last dim (a row view
            ``cache[:B]`` of a larger cache is fine); float16, bfloat16 or float32.
        v_cache: (B, n_kv_head, S, head_dim), like ``k_cache`` and of its dtype.
        position: one-element int64 tensor on qkv's device, the current token's index, read by the
            kernel only. Outside ``[0, S)`` nothing is written to the caches (q is still returned).
        n_head: query heads H, a multiple of ``n_kv_head``.
        n_kv_head: key/value heads Hkv.
        head_dim: channels per head hd: even for ``"1d"``, a multiple of 4 for ``"2d"``; any size
            (not only powers of two).
        rope: ``"1d"`` or ``"2d"`` (module docstring).
        base: rotary frequency base theta.
        grid_size: side G of the token grid, required for ``"2d"``.
        block_h: heads per program, a power of two; default: about 512 channel pairs per program.
        num_warps: warps per program.

    Returns:
        (B, n_kv_head, n_head // n_kv_head, head_dim) rotated queries in ``qkv.dtype``, contiguous:
        the grouped layout :func:`~aimkit.kernels.attention_decode.decode_attention` takes.
    """
    name = "rope_cache_write_"
    _check_heads(name, n_head, n_kv_head, head_dim, rope, base, grid_size)
    _check_tensors(name, qkv, k_cache, v_cache, position, n_head, n_kv_head, head_dim)
    check_last_dim_contiguous(name, qkv=qkv, k_cache=k_cache, v_cache=v_cache)
    if block_h is not None and (block_h < 1 or block_h & (block_h - 1)):
        raise ValueError(f"{name}: block_h must be a power of two, got {block_h}")
    batch = qkv.shape[0]
    heads = n_head + 2 * n_kv_head
    block_p = triton.next_power_of_2(head_dim // 2)
    if block_h is None:
        block_h = min(triton.next_power_of_2(heads), max(1, _PAIRS_PER_PROGRAM // block_p))
    q = torch.empty(batch, n_kv_head, n_head // n_kv_head, head_dim, device=qkv.device, dtype=qkv.dtype)
    if batch == 0:
        return q
    log2_base_hi, log2_base_lo = _log2_halves(base)
    with on_device(qkv):
        _rope_cache_kernel[(batch, triton.cdiv(heads, block_h))](
            qkv, k_cache, v_cache, position, q,
            n_head, n_kv_head, head_dim, k_cache.shape[2], grid_size or 1, log2_base_hi, log2_base_lo,
            qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            ROPE_2D=rope == "2d", BLOCK_H=block_h, BLOCK_P=block_p,
            num_warps=num_warps,
        )
    return q
