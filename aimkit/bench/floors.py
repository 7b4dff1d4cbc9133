"""The physical floor of decoding and training: bytes to move and FLOPs to do, pure arithmetic.

Decoding a batch of B images with guidance runs R = 2B sequences for N steps. A step must at least

* read and write every sequence's recurrent state once (Mamba2: ``nheads*headdim*d_state`` SSM
  values plus the ``conv_dim*d_conv`` convolution window per layer), or read every cached key and
  value once and write one more position (transformer);
* read the weights that act on every token once (the blocks, the final norm, the tied LM head);
* do ``2 * matmul_params * R`` FLOPs (plus ``4 * d_model * keys`` per layer and row for attention).

``memory_s = bytes / copy bandwidth`` and ``compute_s = FLOPs / matmul rate``; the floor is the
larger of the two. The cache sizes are read off ``model.allocate_inference_cache`` itself (exactly
what the sampler allocates, whatever the state dtype or backbone): a fixed part per sequence
(recurrent state) and a part per cached position (KV cache), found by allocating two lengths.

A training step does at least ``6 * matmul_params`` FLOPs per token (forward 2, backward 4);
:func:`utilization` divides the achieved rate by the measured matmul rate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "CacheProfile",
    "Floor",
    "cache_profile",
    "decode_floor",
    "kv_cache_bytes_per_image",
    "mamba_state_bytes_per_step",
    "step_params",
    "train_flops_per_token",
    "utilization",
]

# parameters a decode step does not apply to every token: once per image (class embedding,
# conditioning, final modulation), one row per step (position table), or not at all (tokenizer)
_PER_STEP_EXCLUDE = ("class_embed.", "pos_embed.", "conditioning.", "final_layer.modulation.", "tokenizer.")


def mamba_state_bytes_per_step(
    n_layer: int,
    d_model: int,
    *,
    expand: int = 2,
    headdim: int = 64,
    d_state: int = 128,
    itemsize: int = 2,
    sequences: int = 2,
) -> int:
    """SSM-state bytes one decode step moves for one image (read + write), convolution excluded.

    ``sequences * n_layer * (nheads * headdim * d_state) * itemsize * 2``; 2 sequences = guidance.
    AiM-B (24 x 768) in bf16: 37,748,736 bytes (37.7 MB).
    """
    nheads = expand * d_model // headdim
    return sequences * n_layer * nheads * headdim * d_state * itemsize * 2


def kv_cache_bytes_per_image(
    n_layer: int, d_kv: int, num_tokens: int, *, itemsize: int = 2, sequences: int = 2
) -> int:
    """KV-cache bytes read over a whole image: step k reads k + 1 keys and values per layer.

    ``sequences * 2 * n_layer * d_kv * itemsize * N(N+1)/2``; a 36 x 1280 model at 256 tokens:
    about 12 GB per image with guidance.
    """
    return sequences * 2 * n_layer * d_kv * itemsize * num_tokens * (num_tokens + 1) // 2


@dataclass(frozen=True)
class CacheProfile:
    """Inference-cache bytes of one sequence, split by how decoding touches them.

    Attributes:
        fixed_bytes: read and written once per step (recurrent SSM state, convolution window).
        per_position_bytes: per cached position, read by every later step (keys and values).
        per_position_elements: the same in elements (sets the attention FLOPs).
        dtypes: dtypes of the cache tensors, e.g. ``("bfloat16", "float32")``.
    """

    fixed_bytes: int
    per_position_bytes: int
    per_position_elements: int
    dtypes: tuple[str, ...]


def _cache_totals(model, max_seqlen: int) -> tuple[int, int, list[torch.dtype]]:
    """``(bytes, elements, dtypes)`` of the cache ``model`` allocates for one sequence."""
    params = model.allocate_inference_cache(1, max_seqlen=max_seqlen)
    tensors = [t for entry in params.key_value_memory_dict.values() for t in entry]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return nbytes, sum(t.numel() for t in tensors), [t.dtype for t in tensors]


def cache_profile(model) -> CacheProfile:
    """Measure :class:`CacheProfile` by allocating the model's own cache for one sequence twice.

    Args:
        model: a generator (``num_tokens``, ``allocate_inference_cache``); a meta-device model works.
    """
    n0, extra = model.num_tokens + 1, 8
    bytes0, elems0, dtypes = _cache_totals(model, n0)
    bytes1, elems1, _ = _cache_totals(model, n0 + extra)
    per_pos, per_pos_elems = (bytes1 - bytes0) // extra, (elems1 - elems0) // extra
    names = tuple(sorted({str(d).replace("torch.", "") for d in dtypes}))
    return CacheProfile(bytes0 - per_pos * n0, per_pos, per_pos_elems, names)


def step_params(model: nn.Module) -> tuple[int, int]:
    """``(bytes, matmul_params)`` of the weights a decode step applies to every token.

    Excludes what runs once per image (class embedding, conditioning, final modulation), the
    position table (one row per step), an untied token embedding (one row per token) and the
    tokenizer; tied weights count once (a tied embedding is the head, read whole). ``matmul_params``
    counts the elements of 2-D weights (linear layers, the LM head), the FLOP-carrying part.
    """
    seen, nbytes, matmul = set(), 0, 0
    for name, p in model.named_parameters():
        gathered = name == "tok_embed.weight" and not getattr(getattr(model, "config", None), "tie_head", True)
        if name.startswith(_PER_STEP_EXCLUDE) or gathered or id(p) in seen:
            continue
        seen.add(id(p))
        nbytes += p.numel() * p.element_size()
        if p.dim() == 2:
            matmul += p.numel()
    return nbytes, matmul


@dataclass(frozen=True)
class Floor:
    """The floor of one decoding run (all sequences, all steps).

    Attributes:
        cache_bytes: recurrent state read + written, or KV cache read + written, in total.
        weight_bytes: step weights read once per step, in total.
        flops: matmul FLOPs (linear layers and attention), in total.
        memory_s: ``(cache_bytes + weight_bytes) / bandwidth``.
        compute_s: ``flops / matmul rate``.
        seconds: ``max(memory_s, compute_s)``.
        bound: ``"memory"`` or ``"compute"``.
    """

    cache_bytes: float
    weight_bytes: float
    flops: float
    memory_s: float
    compute_s: float
    seconds: float
    bound: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def decode_floor(
    profile: CacheProfile,
    rows: int,
    steps: int,
    weight_bytes: int,
    matmul_params: int,
    bandwidth: float,
    flop_rate: float,
    *,
    first_step: int = 0,
) -> Floor:
    """Floor of ``steps`` decode steps of ``rows`` sequences, starting at cache position ``first_step``.

    Step ``k`` reads ``k + 1`` cached positions and writes one; the fixed state is read and
    written at every step; the step weights are read once per step for all rows.

    Args:
        profile: from :func:`cache_profile`.
        rows: sequences decoded together (2 x images under guidance).
        steps: decode steps (``num_tokens`` for a whole image: the class token, then N - 1 tokens).
        weight_bytes, matmul_params: from :func:`step_params`.
        bandwidth: bytes/s (measured copy rate, read + write counted).
        flop_rate: FLOP/s (measured matmul rate).
        first_step: position of the first step (for a single mid-sequence step).
    """
    keys = sum(k + 1 for k in range(first_step, first_step + steps))  # positions read, summed over steps
    cache = rows * (2 * profile.fixed_bytes * steps + profile.per_position_bytes * (keys + steps))
    weights = weight_bytes * steps
    flops = rows * (2 * matmul_params * steps + 2 * profile.per_position_elements * keys)
    memory_s, compute_s = (cache + weights) / bandwidth, flops / flop_rate
    return Floor(float(cache), float(weights), float(flops), memory_s, compute_s, max(memory_s, compute_s),
                 "memory" if memory_s >= compute_s else "compute")


def train_flops_per_token(matmul_params: int) -> int:
    """Matmul FLOPs of one training token: ``6 * matmul_params`` (forward 2, backward 4).

    ``matmul_params`` as from :func:`step_params`: lookup tables (class and position embeddings)
    do no multiply-adds and are not counted; the scan and attention scores are left out, so this
    is a lower bound of the work done.
    """
    return 6 * matmul_params


def utilization(achieved_flops: float, flop_rate: float) -> tuple[float, bool]:
    """``(achieved / flop_rate clamped to 1, whether it had to be clamped)``.

    Above 1 the measured matmul rate was not the device's ceiling for this work (another dtype,
    a noisy host); the row is flagged rather than reporting a utilization over 100%.
    """
    fraction = achieved_flops / flop_rate
    return min(fraction, 1.0), fraction > 1.0
