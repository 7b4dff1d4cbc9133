"""The ``transformer`` backbone: a LlamaGen-style decoder behind the same contract as Mamba2.

Each block is RMSNorm -> causal self-attention (rotary positions, 1-D or LlamaGen's 2-D; optional
grouped-query attention) and RMSNorm -> SwiGLU, both sublayers adaLN-modulated by the conditioning module
(6 modulation rows per layer, see :class:`~aimkit.backbones.base.Block`). With the same width and
depth as an AiM model it serves as the reference in comparisons.

Inference cache per layer: ``(k_cache, v_cache)``, each ``(B, n_kv_head, max_seqlen, head_dim)``.
``Attention.step`` reads the position only from the device tensor ``inference_params.position``,
writes K and V there with ``index_copy_`` and attends over the whole preallocated cache under the
mask ``arange(max_seqlen) <= position``: no host sync, no cache allocation, no branching on tensor
values, so a decode step can be captured in a CUDA graph.

Rotary angles (:mod:`aimkit.kernels.rotary`, shared with the decode kernel's reference) are
computed from the positions on every call (a few hundred flops) instead of being stored as a
buffer, so they stay float32 when the module is cast to bf16 and need no resizing. Channel pairs
``(2i, 2i + 1)`` are rotated, as in LlamaGen's complex-number formulation. Two position schemes
(``TransformerConfig.rope``):

* ``"1d"``: position p (the class token at 0, image token k at k + 1) rotated by p;
* ``"2d"``: LlamaGen's 2-D rotary: image token k sits at grid cell ``(k // G, k % G)`` of a
  ``G = grid_size`` square; the first half of the channel pairs turns with the row, the second
  half with the column, each at frequencies ``base ** (-4j / head_dim)``; the class token's tables
  are zero (cos = sin = 0), as LlamaGen stores them, so its query and key are zero vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check_fields, option
from ..errors import ConfigError
from ..kernels.rotary import apply_rotary, rotary_angles, rotary_angles_2d, rotary_tables
from ..policy import ExecutionPolicy
from ..registry import BACKBONES
from .base import Backbone, InferenceParams, resolve_policy, rms_norm_factory

__all__ = [
    "TransformerConfig",
    "Attention",
    "SwiGLU",
    "TransformerBackbone",
    "rotary_angles",
    "rotary_angles_2d",
    "apply_rotary",
]


@dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of the transformer backbone (width and depth are the backbone's arguments).

    Attributes:
        n_head: query heads; None means ``d_model // 64``.
        n_kv_head: key/value heads; None means ``n_head``, fewer gives grouped-query attention.
        mlp_hidden: SwiGLU hidden width; None derives it from ``d_model`` (see :meth:`mlp_width`).
        multiple_of: rounding unit of the derived SwiGLU width.
        rope_base: base of the rotary frequencies.
        norm_eps: RMSNorm epsilon, used when the backbone is given no ``norm_eps``.
        qkv_bias: bias on the fused q/k/v projection.
        rope: ``"1d"`` or ``"2d"`` rotary positions (module docstring).
        grid_size: side G of the token grid, for ``rope="2d"`` (G * G = the generator's num_tokens).
    """

    n_head: int | None = 12  # query heads (LlamaGen-B/AiM-B width 768 -> 12 heads of 64)
    n_kv_head: int | None = None  # None -> n_head (plain multi-head attention)
    mlp_hidden: int | None = None  # None -> 4 * d * 2 / 3 rounded up to multiple_of
    multiple_of: int = 256  # SwiGLU width granularity, as in LlamaGen
    rope_base: float = 10000.0  # rotary theta
    norm_eps: float = 1e-5  # RMSNorm epsilon
    qkv_bias: bool = False  # LlamaGen uses no bias anywhere
    rope: str = option("1d", choices=("1d", "2d"))  # "2d": LlamaGen's row/column rotary
    grid_size: int | None = None  # token grid side for rope "2d" (16 for 256 tokens)

    def __post_init__(self):
        check_fields(self, "transformer")  # types: ints are ints (or None where allowed), floats finite
        if self.rope == "2d" and (self.grid_size is None or self.grid_size <= 0):
            raise ConfigError(f"transformer rope '2d' needs a positive grid_size, got {self.grid_size!r}")
        for name in ("n_head", "n_kv_head", "mlp_hidden"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"transformer {name} must be positive, got {value}")
        if self.multiple_of <= 0:
            raise ConfigError(f"transformer multiple_of must be positive, got {self.multiple_of}")
        if self.rope_base <= 0:
            raise ConfigError(f"transformer rope_base must be positive, got {self.rope_base}")
        if self.norm_eps <= 0:
            raise ConfigError(f"transformer norm_eps must be positive, got {self.norm_eps}")

    def check_num_tokens(self, num_tokens: int) -> None:
        """Raise a ConfigError unless a generator of ``num_tokens`` image tokens fits the position scheme."""
        if self.rope == "2d" and self.grid_size * self.grid_size != num_tokens:
            raise ConfigError(f"transformer rope '2d' with grid_size {self.grid_size} covers "
                              f"{self.grid_size ** 2} tokens, but num_tokens is {num_tokens}; "
                              f"set grid_size to its square root")

    def head_counts(self, d_model: int) -> tuple[int, int]:
        """``(n_head, n_kv_head)`` resolved for width ``d_model``, checked for consistency."""
        n_head = self.n_head if self.n_head is not None else d_model // 64
        n_kv_head = self.n_kv_head if self.n_kv_head is not None else n_head
        if n_head <= 0 or d_model % n_head:
            raise ConfigError(f"d_model {d_model} is not divisible into {n_head} heads")
        if (d_model // n_head) % (4 if self.rope == "2d" else 2):
            raise ConfigError(f"head_dim {d_model // n_head} must be a multiple of "
                              f"{4 if self.rope == '2d' else 2} for {self.rope} rotary embeddings")
        if n_head % n_kv_head:
            raise ConfigError(f"n_head {n_head} is not a multiple of n_kv_head {n_kv_head}")
        return n_head, n_kv_head

    def mlp_width(self, d_model: int) -> int:
        """SwiGLU hidden width: ``mlp_hidden``, else ``int(8 * d_model / 3)`` rounded up.

        The rounding is up to a multiple of ``multiple_of`` (768 -> 2048, 1024 -> 2816).
        """
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        hidden = int(2 * (4 * d_model) / 3)
        return -(-hidden // self.multiple_of) * self.multiple_of


def _init_linear(layer: nn.Linear, std: float) -> None:
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class Attention(nn.Module):
    """Causal multi-head (or grouped-query) self-attention with rotary positions (1-D or 2-D).

    Args:
        d_model: width D.
        layer_idx: key of this layer's cache in ``inference_params.key_value_memory_dict``.
        config: head counts, rotary base and bias flag.
        device: parameter device.
        dtype: parameter dtype.
        policy: its ``decode_attention`` picks the decode step's attention (None:
            :func:`~aimkit.policy.default_policy`, read once); stored as ``self.policy``.
    """

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int,
        config: TransformerConfig = TransformerConfig(),
        device=None,
        dtype=None,
        policy: ExecutionPolicy | None = None,
    ):
        super().__init__()
        self.policy = resolve_policy(policy)
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.head_counts(d_model)
        self.head_dim = d_model // self.n_head
        self.rope_base, self.rope, self.grid_size = config.rope_base, config.rope, config.grid_size
        kv_dim = self.n_kv_head * self.head_dim
        self.wqkv = nn.Linear(d_model, d_model + 2 * kv_dim, bias=config.qkv_bias, **factory)
        self.wo = nn.Linear(d_model, d_model, bias=False, **factory)
        self.reset_parameters()

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_head // self.n_kv_head

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) weights, zero biases."""
        _init_linear(self.wqkv, std)
        _init_linear(self.wo, std)

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, n_kv_head={self.n_kv_head}, head_dim={self.head_dim}, rope={self.rope}"

    def _project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D), positions (L,) -> q (B, H, L, hd), k and v (B, Hkv, L, hd), rotated."""
        batch, seqlen, _ = x.shape
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.d_model, kv_dim, kv_dim], dim=-1)
        q = q.view(batch, seqlen, self.n_head, self.head_dim)  # (B, L, H, hd)
        k = k.view(batch, seqlen, self.n_kv_head, self.head_dim)  # (B, L, Hkv, hd)
        v = v.view(batch, seqlen, self.n_kv_head, self.head_dim)
        cos, sin = rotary_tables(positions, self.head_dim, self.rope_base, self.rope, self.grid_size)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _cache(self, inference_params: InferenceParams, batch: int) -> tuple[Tensor, Tensor]:
        """This layer's ``(k_cache, v_cache)`` views for the first ``batch`` rows."""
        return inference_params.layer_cache(self.layer_idx, batch)

    def _expand_kv(self, t: Tensor) -> Tensor:
        """(B, Hkv, S, hd) -> (B, H, S, hd), each key/value head serving n_rep query heads."""
        return t if self.n_rep == 1 else t.repeat_interleave(self.n_rep, dim=1)

    def forward(self, x: Tensor, inference_params: InferenceParams | None = None) -> Tensor:
        """Attend over a whole chunk; with a cache, also store its K and V (prefill).

        Args:
            x: (B, L, D) normalized, modulated hidden states.
            inference_params: None for training; otherwise the chunk covers positions
                ``[seqlen_offset, seqlen_offset + L)`` and attends to the cached earlier ones.

        Returns:
            (B, L, D).
        """
        batch, seqlen, _ = x.shape
        offset = 0 if inference_params is None else inference_params.seqlen_offset
        positions = torch.arange(offset, offset + seqlen, device=x.device)  # (L,)
        q, k, v = self._project(x, positions)  # (B, H, L, hd), (B, Hkv, L, hd) x2
        mask = None
        if inference_params is not None:
            k_cache, v_cache = self._cache(inference_params, batch)
            if offset + seqlen > k_cache.shape[2]:
                raise ValueError(
                    f"positions up to {offset + seqlen} do not fit a cache of {k_cache.shape[2]}"
                )
            k_cache[:, :, offset : offset + seqlen].copy_(k)
            v_cache[:, :, offset : offset + seqlen].copy_(v)
            if offset > 0:  # earlier positions come from the cache
                k = k_cache[:, :, : offset + seqlen].to(q.dtype)  # (B, Hkv, S, hd)
                v = v_cache[:, :, : offset + seqlen].to(q.dtype)
                keys = torch.arange(offset + seqlen, device=x.device)
                mask = keys[None, :] <= positions[:, None]  # (L, S)
        out = F.scaled_dot_product_attention(
            q, self._expand_kv(k), self._expand_kv(v), attn_mask=mask, is_causal=mask is None
        )  # (B, H, L, hd)
        return self.wo(out.transpose(1, 2).reshape(batch, seqlen, self.d_model))

    def step(self, x: Tensor, inference_params: InferenceParams) -> Tensor:
        """Decode one token at position ``inference_params.position`` (CUDA-graph capturable).

        Args:
            x: (B, 1, D).
            inference_params: holds the cache and the ``()`` int64 device tensor ``position``; the
                host-side ``seqlen_offset`` is not read.

        Returns:
            (B, 1, D).
        """
        batch, seqlen, _ = x.shape
        if seqlen != 1:
            raise ValueError(f"step takes one token per sequence, got {seqlen}")
        if inference_params.position is None:
            raise ValueError("Attention.step needs inference_params.position (a () int64 tensor)")
        position = inference_params.position.reshape(1)  # (1,)
        k_cache, v_cache = self._cache(inference_params, batch)  # (B, Hkv, S, hd)
        if self.policy.use_kernel("decode_attention", x):
            return self.wo(self._step_kernels(x, k_cache, v_cache, position).reshape(batch, 1, self.d_model))
        q, k, v = self._project(x, position)  # (B, H, 1, hd), (B, Hkv, 1, hd) x2
        k_cache.index_copy_(2, position, k.to(k_cache.dtype))
        v_cache.index_copy_(2, position, v.to(v_cache.dtype))
        # All query heads of a group share one key/value head and the same mask, so the group's
        # heads stand in for the query length: no repeated copy of the cache.
        q = q.reshape(batch, self.n_kv_head, self.n_rep, self.head_dim)  # (B, Hkv, n_rep, hd)
        visible = (torch.arange(k_cache.shape[2], device=x.device) <= position)[None, :]  # (1, S)
        out = F.scaled_dot_product_attention(
            q, k_cache.to(q.dtype), v_cache.to(q.dtype), attn_mask=visible
        )  # (B, Hkv, n_rep, hd)
        return self.wo(out.reshape(batch, 1, self.d_model))

    def _step_kernels(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, position: Tensor) -> Tensor:
        """The decode step's attention as two kernels (policy ``decode_attention``): rotary of q and
        k with the cache write in one, attention over keys ``0..position`` in the other.

        x (B, 1, D) -> (B, Hkv, n_rep, hd)."""
        from ..kernels.attention_decode import decode_attention
        from ..kernels.rope_cache import rope_cache_write_

        q = rope_cache_write_(self.wqkv(x[:, 0]), k_cache, v_cache, position, n_head=self.n_head,
                              n_kv_head=self.n_kv_head, head_dim=self.head_dim, rope=self.rope,
                              base=self.rope_base, grid_size=self.grid_size)  # (B, Hkv, n_rep, hd)
        return decode_attention(q, k_cache, v_cache, position)

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """Zeroed ``(k_cache, v_cache)``, each (B, n_kv_head, max_seqlen, head_dim).

        Args:
            batch_size: sequences decoded together.
            max_seqlen: positions the cache holds.
            dtype: cache dtype; defaults to the projection weight's dtype.
        """
        weight = self.wqkv.weight
        shape = (batch_size, self.n_kv_head, max_seqlen, self.head_dim)
        kwargs = {"device": weight.device, "dtype": dtype or weight.dtype}
        return torch.zeros(shape, **kwargs), torch.zeros(shape, **kwargs)


class SwiGLU(nn.Module):
    """Gated MLP ``w2(silu(w1 x) * w3 x)`` without biases.

    Args:
        d_model: width D.
        hidden_features: hidden width F.
        device: parameter device.
        dtype: parameter dtype.
    """

    def __init__(self, d_model: int, hidden_features: int, *, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.w1 = nn.Linear(d_model, hidden_features, bias=False, **factory)
        self.w3 = nn.Linear(d_model, hidden_features, bias=False, **factory)
        self.w2 = nn.Linear(hidden_features, d_model, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) weights."""
        for layer in (self.w1, self.w3, self.w2):
            _init_linear(layer, std)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, D) -> (B, L, D)."""
        hidden = F.silu(self.w1(x)) * self.w3(x)  # (B, L, F)
        return self.w2(hidden)


@BACKBONES.register("transformer")
class TransformerBackbone(Backbone):
    """LlamaGen-style decoder: ``n_layer`` blocks of attention + SwiGLU with adaLN modulation.

    Every block consumes 6 modulation rows (shift, scale, gate for attention, then for the MLP).

    Args:
        d_model: width D.
        n_layer: number of blocks.
        config: :class:`TransformerConfig`.
        norm_eps: RMSNorm epsilon; None takes ``config.norm_eps``.
        device: parameter device.
        dtype: parameter dtype.
        policy: which implementation each operation runs (None:
            :func:`~aimkit.policy.default_policy`, read once): the decode glue, the decode step's
            attention and the compiled training glue.
    """

    config_cls = TransformerConfig

    def __init__(
        self,
        d_model: int,
        n_layer: int,
        config: TransformerConfig = TransformerConfig(),
        norm_eps: float | None = None,
        device=None,
        dtype=None,
        *,
        policy: ExecutionPolicy | None = None,
    ):
        factory = {"device": device, "dtype": dtype}
        default_eps = TransformerConfig.__dataclass_fields__["norm_eps"].default
        if norm_eps is not None and config.norm_eps not in (norm_eps, default_eps):
            # a Generator hands its norm_eps to every norm: the backbone's own would be stored and unused
            raise ConfigError(f"transformer norm_eps {config.norm_eps!r} differs from the generator's norm_eps "
                              f"{norm_eps!r}, which every RMSNorm of the stack uses; set norm_eps={config.norm_eps!r} "
                              "on the generator instead")
        eps = config.norm_eps if norm_eps is None else norm_eps
        policy = resolve_policy(policy)  # one object, shared with every attention layer
        super().__init__(
            d_model,
            n_layer,
            mixer_cls=partial(Attention, config=config, policy=policy, **factory),
            norm_cls=rms_norm_factory(eps, **factory),
            mlp_cls=partial(SwiGLU, hidden_features=config.mlp_width(d_model), **factory),
            residual_in_fp32=True,
            policy=policy,
        )
        self.config = config

    def reset_parameters(self, std: float = 0.02) -> None:
        """Re-initialize every block: normal(0, std) linear weights, unit norm weights."""
        for layer in self.layers:
            layer.mixer.reset_parameters(std)
            layer.mlp.reset_parameters(std)
            layer.norm.reset_parameters()
            layer.norm2.reset_parameters()
        self.norm_f.reset_parameters()
