"""One decode step of causal self-attention over a preallocated KV cache as Triton kernels:
operation ``decode_attention`` (flash-decoding).

The query of the current token (one row per query head, grouped by key/value head) attends to
the keys ``0 .. position`` of the cache and to nothing after them: positions past ``position``
may hold garbage (even NaN) and are never loaded. ``position`` is a device tensor read by the
kernels, so a decode step built from :func:`decode_attention` can be captured in a CUDA graph
once and replayed at every position: nothing is read on the host, every launch size comes from
shapes alone.

Two kernels:

* split: the key axis is cut into ``num_splits`` contiguous ranges of whole ``BLOCK_N``-key blocks;
  program (row, split) walks its range for all G query heads of one key/value head (each K/V tile
  is loaded once and serves the G queries) with an online softmax in float32 (running max, sum
  and weighted values). A range starting past ``position`` exits before any load. With more
  than one split, each program stores its normalized partial output and its log-sum-exp;
  with one split, the output itself.
* combine: per (row, query head), the partials of the splits that hold valid keys (counted from
  ``position`` again) are merged by the log-sum-exp rule
  ``out = sum_s exp(lse_s - max lse) * o_s / sum_s exp(lse_s - max lse)``.

``num_splits`` is fixed at launch from the shapes (enough programs for about two per SM), so at
early positions only the first splits work: the cost follows the cache length, not the position.

Reference: :func:`decode_attention_reference` (masked softmax attention in float32 PyTorch), the
same computation as ``Attention.step`` of :mod:`aimkit.backbones.transformer`. Importing this
module imports Triton.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_last_dim_contiguous, on_device

__all__ = ["decode_attention", "decode_attention_reference"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PROGRAMS_PER_SM = 2  # split-kernel programs per SM that ``num_splits`` aims for
_CPU_SM_COUNT = 132  # an H200's SMs: the split count Triton's interpreter runs on CPU tensors


def decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, position: Tensor,
                               scale: float | None = None) -> Tensor:
    """Attention of one token to the cache's valid prefix, in float32 PyTorch.

    Keys and values past ``position`` are replaced by zeros before any arithmetic, so garbage
    (NaN, inf) there cannot reach the result; their scores are masked to -inf.

    Args:
        q: (B, Hkv, G, D) queries, G query heads per key/value head.
        k_cache: (B, Hkv, S, D) keys by position.
        v_cache: (B, Hkv, S, D) values by position.
        position: () integer tensor, the current token's index: keys 0..position are valid.
        scale: score scale; default ``D ** -0.5``.

    Returns:
        (B, Hkv, G, D) ``softmax(q k^T * scale) v`` over the valid keys, in ``q.dtype``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    valid = torch.arange(k_cache.shape[2], device=k_cache.device) <= position.reshape(())  # (S,)
    k = torch.where(valid[:, None], k_cache.float(), 0.0)  # (B, Hkv, S, D)
    v = torch.where(valid[:, None], v_cache.float(), 0.0)
    scores = (q.float() @ k.transpose(-1, -2)) * scale  # (B, Hkv, G, S)
    scores = scores.masked_fill(~valid, float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)  # (B, Hkv, G, D)


@triton.jit
def _last_key(pos_ptr, seqlen):
    # the last valid key: the position, kept inside the cache (a device value cannot raise)
    return tl.minimum(tl.load(pos_ptr), seqlen - 1)


@triton.jit
def _dot(a, b, F32_DOT: tl.constexpr):
    # a @ b accumulated in float32: exact float32 products (no TF32) when F32_DOT, else in b's
    # 16-bit dtype on the tensor cores (``a`` is rounded to it, as flash attention rounds p)
    if F32_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a.to(b.dtype), b)
    return out


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, lse_ptr,
    heads, group, head_dim, seqlen, keys_per_split, qk_scale,
    s_q_b, s_q_h, s_q_g, s_k_b, s_k_h, s_k_s, s_v_b, s_v_h, s_v_s,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    F32_DOT: tl.constexpr, STORE_LSE: tl.constexpr,
):
    # program (row, split): row = b * heads + h, keys [split * keys_per_split, ... + keys_per_split)
    # up to the position. Stores o = softmax-weighted values over those keys, (G, D) at
    # o_ptr[row, split] of a contiguous (rows, splits, G, D) tensor, and with STORE_LSE the
    # log2-sum-exp2 of the scaled scores (log2 units: qk_scale includes log2(e)) at lse_ptr[row, split].
    row = tl.program_id(0)
    split = tl.program_id(1)
    last = _last_key(pos_ptr, seqlen)
    start = split * keys_per_split
    if start > last:  # a range past the position: no loads, no stores (the combine skips it)
        return
    end = tl.minimum(start + keys_per_split, last + 1)
    b = (row // heads).to(tl.int64)
    h = row % heads
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_gd = (offs_g[:, None] < group) & (offs_d[None, :] < head_dim)
    q = tl.load(q_ptr + b * s_q_b + h * s_q_h + offs_g[:, None] * s_q_g + offs_d[None, :],
                mask=mask_gd, other=0.0)  # (BLOCK_G, BLOCK_D); padded heads score 0, stored nowhere
    k_ptr += b * s_k_b + h * s_k_h
    v_ptr += b * s_v_b + h * s_v_h
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max of the scores
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)  # running sum of exp2(score - m_i) * v
    for n0 in range(start, end, BLOCK_N):  # every block holds at least one valid key
        keys = n0 + offs_n
        mask_n = keys < end
        mask_nd = mask_n[:, None] & (offs_d[None, :] < head_dim)
        k = tl.load(k_ptr + keys[:, None] * s_k_s + offs_d[None, :], mask=mask_nd, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_ptr + keys[:, None] * s_v_s + offs_d[None, :], mask=mask_nd, other=0.0)
        s = _dot(q, tl.trans(k), F32_DOT) * qk_scale  # (BLOCK_G, BLOCK_N)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the block has a valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p, v, F32_DOT)
        m_i = m_new
    part = row * tl.num_programs(1) + split
    o = acc / l_i[:, None]
    tl.store(o_ptr + (part * group + offs_g[:, None]) * head_dim + offs_d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=mask_gd)
    if STORE_LSE:
        tl.store(lse_ptr + part * group + offs_g, m_i + tl.log2(l_i), mask=offs_g < group)


@triton.jit
def _combine_kernel(
    o_ptr, lse_ptr, pos_ptr, out_ptr,
    group, head_dim, seqlen, keys_per_split, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # program (row * group + g): merges query head g's partials of the splits that hold valid keys
    # (the others exited without storing) by the log-sum-exp rule, into out (rows * G, D) contiguous
    pid = tl.program_id(0)
    row = pid // group
    g = pid % group
    valid_splits = _last_key(pos_ptr, seqlen) // keys_per_split + 1
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < valid_splits
    part = (row * num_splits + offs_s) * group + g  # (BLOCK_S,) into (rows, splits, G)
    lse = tl.load(lse_ptr + part, mask=mask_s, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))  # 0 for the skipped splits
    o = tl.load(o_ptr + part[:, None] * head_dim + offs_d[None, :],
                mask=mask_s[:, None] & (offs_d[None, :] < head_dim), other=0.0)  # (BLOCK_S, BLOCK_D)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + pid * head_dim + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < head_dim)


def _check_args(q: Tensor, k_cache: Tensor, v_cache: Tensor, position: Tensor, block_n: int,
                num_splits: int | None) -> None:
    name = "decode_attention"
    if q.dim() != 4 or k_cache.dim() != 4:
        raise ValueError(f"{name}: q (B, Hkv, G, D) and the caches (B, Hkv, S, D) must be 4-D, got q "
                         f"{tuple(q.shape)} and k_cache {tuple(k_cache.shape)}")
    batch, heads, _, head_dim = q.shape
    if v_cache.shape != k_cache.shape or k_cache.shape[:2] != (batch, heads) or k_cache.shape[3] != head_dim:
        raise ValueError(f"{name}: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)} and v_cache "
                         f"{tuple(v_cache.shape)} do not fit together")
    if q.dtype not in _FLOAT_DTYPES or k_cache.dtype not in _FLOAT_DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{name}: q and the caches must be float16, bfloat16 or float32 (the two caches "
                         f"alike), got {q.dtype}, {k_cache.dtype} and {v_cache.dtype}")
    if k_cache.device != q.device or v_cache.device != q.device:
        raise ValueError(f"{name}: q and the caches must be on one device, got {q.device}, "
                         f"{k_cache.device} and {v_cache.device}")
    check_last_dim_contiguous(name, q=q, k_cache=k_cache, v_cache=v_cache)
    if position.numel() != 1 or position.dtype != torch.int64 or position.device != q.device:
        raise ValueError(f"{name}: position must be a one-element int64 tensor on {q.device}, got "
                         f"{tuple(position.shape)} {position.dtype} on {position.device}")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"{name}: block_n must be a power of two >= 16, got {block_n}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"{name}: num_splits must be at least 1, got {num_splits}")


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_plan(rows: int, blocks: int, num_splits: int | None, device: torch.device) -> tuple[int, int]:
    """(splits, key blocks per split) for ``rows`` = B * Hkv and ``blocks`` key blocks in the cache:
    by default enough splits for about two programs per SM; never a split without a block."""
    if num_splits is None:
        num_splits = -(-_PROGRAMS_PER_SM * _sm_count(device) // rows)
    per_split = -(-blocks // min(max(num_splits, 1), blocks))
    return -(-blocks // per_split), per_split


def _f32_dot(q: Tensor, k_cache: Tensor) -> bool:
    """Whether the tiles multiply in float32 (exact products) rather than in the caches' 16-bit dtype:
    for float32 caches, for a query of another dtype, and for bfloat16 on CPU tensors, which only
    Triton's interpreter runs: its ``tl.dot`` multiplies bfloat16 bit patterns (triton-lang/triton#11584)."""
    return (k_cache.dtype == torch.float32 or q.dtype != k_cache.dtype
            or (k_cache.dtype == torch.bfloat16 and not k_cache.is_cuda))


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, position: Tensor, scale: float | None = None,
                     *, block_n: int = 64, num_splits: int | None = None, num_warps: int | None = None) -> Tensor:
    """Attention of the current token to the cache's keys ``0 .. position`` (module docstring).

    Reference (p = ``position``, float32 inside)::

        valid = arange(S) <= p
        out = softmax(where(valid, q @ k_cache^T * scale, -inf)) @ where(valid, v_cache, 0)

    Nothing is read on the host and nothing past ``position`` is loaded: a captured launch
    follows ``position`` and the cache may hold anything after it.

    Args:
        q: (B, Hkv, G, D) queries of the current token, G query heads per key/value head
            (grouped-query attention; G = 1 for plain multi-head), last dim contiguous.
        k_cache: (B, Hkv, S, D) keys by position, any strides but a contiguous last dim (a row
            view ``cache[:B]`` of a larger cache is fine); float16, bfloat16 or float32.
        v_cache: (B, Hkv, S, D) values, like ``k_cache`` and of its dtype.
        position: () int64 tensor on q's device, the current token's index in ``[0, S)`` (a
            larger value reads as S - 1); read by the kernels.
        scale: score scale; default ``D ** -0.5``.
        block_n: keys per tile (a power of two >= 16; at most S rounded up to a power of two).
        num_splits: ranges the key axis is cut into; default: enough for about two programs per
            SM, at most one per key block. Fixed by shapes alone, so CUDA-graph safe.
        num_warps: warps per split-kernel program; default 1 for head_dim <= 64 (measured fastest
            or equal at LlamaGen-B/XL shapes on an H200, docs/benchmarks.md), else 4.

    Returns:
        (B, Hkv, G, D) in ``q.dtype``. With float32 operands the products are exact float32 (no
        TF32); with 16-bit caches the tiles multiply on the tensor cores in the cache dtype.
    """
    _check_args(q, k_cache, v_cache, position, block_n, num_splits)
    batch, heads, group, head_dim = q.shape
    if q.numel() == 0:  # no rows: nothing to launch
        return torch.empty_like(q)
    seqlen = k_cache.shape[2]
    rows = batch * heads
    block_n = max(16, min(block_n, triton.next_power_of_2(seqlen)))
    splits, per_split = _split_plan(rows, triton.cdiv(seqlen, block_n), num_splits, q.device)
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.empty(batch, heads, group, head_dim, device=q.device, dtype=q.dtype)
    if splits == 1:  # the split kernel writes the output itself
        partial, lse = out, out
    else:
        partial = torch.empty(rows, splits, group, head_dim, device=q.device, dtype=torch.float32)
        lse = torch.empty(rows, splits, group, device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(head_dim))
    num_warps = (1 if block_d <= 64 else 4) if num_warps is None else num_warps
    with on_device(q):
        _split_kernel[(rows, splits)](
            q, k_cache, v_cache, position, partial, lse,
            heads, group, head_dim, seqlen, per_split * block_n, scale * math.log2(math.e),
            q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
            F32_DOT=_f32_dot(q, k_cache), STORE_LSE=splits > 1,
            num_warps=num_warps,
        )
        if splits > 1:
            _combine_kernel[(rows * group,)](
                partial, lse, position, out,
                group, head_dim, seqlen, per_split * block_n, splits,
                BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
            )
    return out
