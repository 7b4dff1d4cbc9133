"""Fused token sampling for plain temperature sampling with guidance as Triton kernels:
operation ``sampling``.

Reference: :func:`aimkit.samplers.logits.sample` after :func:`~aimkit.samplers.logits.apply_guidance`,
a chain of about ten kernels per decode step (guidance mix, softmax, exponential noise, clamp,
divide, argmax, then writing the token into the code table and the next step's doubled input).
:func:`sample_guided_` does all of it in two kernels: one program per image and vocabulary block,
then a small pick of each image's best block::

    l = (uncond + s * (cond - uncond)) / T          # guidance, temperature
    token = argmax(l + Gumbel noise)                # Gumbel-max: a draw from softmax(l)
    codes[:, step] = token; next_tokens[b] = next_tokens[b + B] = token

The noise is Triton's Philox generator keyed by ``seed + step`` and counted by ``row * V + v``,
so a run is reproducible from its seed (drawn once per run from the caller's torch generator)
but draws differ from the PyTorch path's. Top-k and top-p need sorting and stay on that path.
Importing this module imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["draw_seed", "sample_guided_"]


@triton.jit(do_not_specialize=["step", "scale", "inv_temperature"])
def _sample_block_kernel(
    logits_ptr, s_logits, vocab, half, scale, inv_temperature, seed_ptr, step, best_val_ptr, best_idx_ptr,
    GUIDED: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # program (row, block): the best perturbed logit of vocabulary block `block` of image `row`
    row = tl.program_id(0)
    block = tl.program_id(1)
    blocks = tl.num_programs(1)
    seed = tl.load(seed_ptr) + step
    offs = block * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < vocab
    logit = tl.load(logits_ptr + row * s_logits + offs, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        uncond = tl.load(logits_ptr + (row + half) * s_logits + offs, mask=mask, other=0.0).to(tl.float32)
        logit = uncond + scale * (logit - uncond)
    u = tl.rand(seed, row * vocab + offs)  # uniform [0, 1); keyed by the token, not the block
    val = logit * inv_temperature - tl.log(-tl.log(u))  # + Gumbel(0, 1); u = 0 gives -inf
    val = tl.where(mask, val, float("-inf"))
    tl.store(best_val_ptr + row * blocks + block, tl.max(val, axis=0))
    tl.store(best_idx_ptr + row * blocks + block, tl.argmax(val, axis=0).to(tl.int32) + block * BLOCK_V)


@triton.jit(do_not_specialize=["step"])
def _sample_pick_kernel(
    best_val_ptr, best_idx_ptr, blocks, half, step, next_ptr, codes_ptr, s_codes,
    GUIDED: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # the best block of each image (the first on ties, like one scan over the vocabulary)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_S)
    mask = (rows < half)[:, None] & (cols < blocks)[None, :]
    vals = tl.load(best_val_ptr + rows[:, None] * blocks + cols[None, :], mask=mask, other=float("-inf"))
    first = tl.argmax(vals, axis=1)  # (BLOCK_ROWS,)
    token = tl.load(best_idx_ptr + rows * blocks + first, mask=rows < half, other=0).to(tl.int64)
    tl.store(codes_ptr + rows * s_codes + step, token, mask=rows < half)
    tl.store(next_ptr + rows, token, mask=rows < half)
    if GUIDED:
        tl.store(next_ptr + rows + half, token, mask=rows < half)


def draw_seed(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A (1,) int64 run seed on ``device``, drawn from ``generator`` (or the default one), no sync."""
    source = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=source, dtype=torch.long)
    return seed.to(device)


def sample_guided_(
    logits: Tensor, scale: float | None, temperature: float, seed: Tensor, step: int,
    next_tokens: Tensor, codes: Tensor, block_v: int | None = None,
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
        block_v: vocabulary entries per program (a power of two; default: up to 2048). Every
            (image, block) pair is one program; a second kernel picks each image's best block.
            The draws do not depend on it.
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
    block = block_v or min(triton.next_power_of_2(vocab), 2048)
    if block & (block - 1):
        raise ValueError(f"sample_guided_: block_v must be a power of two, got {block}")
    blocks = triton.cdiv(vocab, block)
    best_val = torch.empty(batch, blocks, device=logits.device, dtype=torch.float32)
    best_idx = torch.empty(batch, blocks, device=logits.device, dtype=torch.int32)
    guided = scale is not None
    _sample_block_kernel[(batch, blocks)](
        logits, logits.stride(0), vocab, batch, float(scale if guided else 1.0), 1.0 / temperature, seed, step,
        best_val, best_idx, GUIDED=guided, BLOCK_V=block, num_warps=4,
    )
    rows_per_program = 64
    _sample_pick_kernel[(triton.cdiv(batch, rows_per_program),)](
        best_val, best_idx, blocks, batch, step, next_tokens, codes, codes.stride(0),
        GUIDED=guided, BLOCK_ROWS=rows_per_program, BLOCK_S=triton.next_power_of_2(blocks), num_warps=4,
    )
