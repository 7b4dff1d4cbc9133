"""One-kernel token sampling for plain temperature sampling with guidance (CUDA, Triton).

The PyTorch sampling chain (:func:`aimkit.samplers.logits.sample` after
:func:`~aimkit.samplers.logits.apply_guidance`) is about ten kernels per decode step: guidance
mix, softmax, exponential noise, clamp, divide, argmax, then writing the token into the code
table and the next step's doubled input. At AiM-B batch 256 on an H200 that is ~0.2 ms of a
3.5 ms step. :func:`sample_guided_` does all of it in one pass over the logits, one program per
image:

    l = (uncond + s * (cond - uncond)) / T          # guidance, temperature
    token = argmax(l + Gumbel noise)                # Gumbel-max: a draw from softmax(l)
    codes[:, step] = token; next_tokens[b] = next_tokens[b + B] = token

The noise is Triton's Philox generator keyed by ``seed + step`` and counted by ``row * V + v``,
so a run is reproducible from its seed (drawn once per run from the caller's torch generator)
but draws differ from the PyTorch path's. Top-k and top-p need sorting and stay on that path.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["draw_seed", "sample_guided_"]


@triton.jit(do_not_specialize=["step", "scale", "inv_temperature"])
def _sample_kernel(
    logits_ptr, s_logits, vocab, half, scale, inv_temperature, seed_ptr, step,
    next_ptr, codes_ptr, s_codes,
    GUIDED: tl.constexpr, BLOCK_V: tl.constexpr, NUM_BLOCKS: tl.constexpr,
):
    row = tl.program_id(0)
    seed = tl.load(seed_ptr) + step
    best_val = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.full((), 0, tl.int32)
    for i in range(NUM_BLOCKS):  # a constexpr trip count (Triton's CPU interpreter needs one)
        v0 = i * BLOCK_V
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < vocab
        logit = tl.load(logits_ptr + row * s_logits + offs, mask=mask, other=0.0).to(tl.float32)
        if GUIDED:
            uncond = tl.load(logits_ptr + (row + half) * s_logits + offs, mask=mask, other=0.0).to(tl.float32)
            logit = uncond + scale * (logit - uncond)
        u = tl.rand(seed, row * vocab + offs)  # uniform [0, 1)
        val = logit * inv_temperature - tl.log(-tl.log(u))  # + Gumbel(0, 1); u = 0 gives -inf
        val = tl.where(mask, val, float("-inf"))
        blk_max = tl.max(val, axis=0)
        blk_idx = tl.argmax(val, axis=0).to(tl.int32) + v0
        better = blk_max > best_val
        best_idx = tl.where(better, blk_idx, best_idx)
        best_val = tl.where(better, blk_max, best_val)
    token = best_idx.to(tl.int64)
    tl.store(codes_ptr + row * s_codes + step, token)
    tl.store(next_ptr + row, token)
    if GUIDED:
        tl.store(next_ptr + row + half, token)


def draw_seed(generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """A (1,) int64 run seed on ``device``, drawn from ``generator`` (or the default one), no sync."""
    source = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=source, dtype=torch.long)
    return seed.to(device)


def sample_guided_(
    logits: Tensor, scale: Optional[float], temperature: float, seed: Tensor, step: int,
    next_tokens: Tensor, codes: Tensor,
) -> None:
    """Sample one token per image into ``codes[:, step]`` and the next step's input.

    Args:
        logits: (2B, V) with guidance (rows ``[0, B)`` conditional, ``[B, 2B)`` unconditional) or
            (B, V) without; any float dtype, last dim contiguous.
        scale: guidance scale, or None for no guidance.
        temperature: > 0.
        seed: (1,) int64 run seed on the logits' device (:func:`draw_seed`).
        step: token index; keys the noise, and the column of ``codes`` written.
        next_tokens: (2B,) or (B,) int64, receives the token (both halves under guidance).
        codes: (B, N) int64 with a contiguous last dim.
    """
    rows, vocab = logits.shape
    batch = rows // 2 if scale is not None else rows
    if scale is not None and rows % 2:
        raise ValueError(f"guidance needs an even number of rows, got {rows}")
    if not temperature > 0:
        raise ValueError(f"sample_guided_ needs temperature > 0, got {temperature}")
    if (logits.stride(-1) != 1 or codes.stride(-1) != 1 or codes.shape[0] != batch or next_tokens.shape != (rows,)
            or not next_tokens.is_contiguous() or next_tokens.dtype != torch.long or codes.dtype != torch.long):
        raise ValueError(f"sample_guided_: logits {tuple(logits.shape)}, codes {tuple(codes.shape)} and "
                         f"next_tokens {tuple(next_tokens.shape)} do not fit (int64, contiguous)")
    if not 0 <= step < codes.shape[1]:
        raise ValueError(f"sample_guided_: step {step} is outside the {codes.shape[1]} code columns")
    if seed.shape != (1,) or seed.device != logits.device:
        raise ValueError(f"sample_guided_: seed must be a (1,) tensor on {logits.device}, got {tuple(seed.shape)} "
                         f"on {seed.device}")
    block = min(triton.next_power_of_2(vocab), 2048)
    _sample_kernel[(batch,)](
        logits, logits.stride(0), vocab, batch, float(scale if scale is not None else 1.0), 1.0 / temperature,
        seed, step, next_tokens, codes, codes.stride(0),
        GUIDED=scale is not None, BLOCK_V=block, NUM_BLOCKS=triton.cdiv(vocab, block), num_warps=8,
    )
