"""How to add a component: a backbone registered from outside aimkit (name ``example-conv``).

A plugin subclasses the shipped contract, gives its component a small frozen config and registers
it under a name; importing the module is all it takes (a package does it through the
``aimkit.plugins`` entry point). ``tests/test_contracts.py`` imports this one, so every contract
test (forward/backward, cached decoding against teacher forcing, save/build round trip, samplers)
runs over it too::

    gen = aimkit.build("aim-test-mamba2", backbone="example-conv", kernel_size=3)

The mixer is a gated causal depthwise convolution: ``out_proj(silu(z) * conv(x))`` with
``(x, z) = in_proj(u)``. Its decode cache is a ring buffer of the last ``kernel_size`` inputs;
the step reads its position from the device tensor ``inference_params.position``, so it can be
captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aimkit.backbones.base import Backbone, InferenceParams, rms_norm_factory
from aimkit.policy import ExecutionPolicy
from aimkit.registry import BACKBONES

__all__ = ["ConvMixerConfig", "GatedConvMixer", "ConvBackbone"]


@dataclass(frozen=True)
class ConvMixerConfig:
    kernel_size: int = 4  # causal window in positions
    expand: int = 2  # inner width = expand * d_model

    @classmethod
    def tiny(cls) -> ConvMixerConfig:
        """The config the contract tests use (the hook is optional: without it they use ``cls()``)."""
        return cls(kernel_size=3)


class GatedConvMixer(nn.Module):
    """``(B, L, D) -> (B, L, D)``; cache per layer: ``(ring,)`` of shape (B, inner, kernel_size)."""

    def __init__(self, d_model: int, layer_idx: int, config: ConvMixerConfig, device=None, dtype=None):
        super().__init__()
        self.layer_idx, self.k = layer_idx, config.kernel_size
        inner = config.expand * d_model
        self.in_proj = nn.Linear(d_model, 2 * inner, bias=False, device=device, dtype=dtype)
        self.conv = nn.Conv1d(inner, inner, self.k, groups=inner, device=device, dtype=dtype)
        self.out_proj = nn.Linear(inner, d_model, bias=False, device=device, dtype=dtype)

    def forward(self, u: Tensor, inference_params: InferenceParams | None = None) -> Tensor:
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, L, inner) each
        x = x.transpose(1, 2)  # (B, inner, L)
        history = x.new_zeros(x.shape[0], x.shape[1], self.k - 1)  # positions before 0
        if inference_params is not None and inference_params.seqlen_offset > 0:
            history = self._window(inference_params, inference_params.seqlen_offset - 1)[..., 1:]
        y = F.conv1d(torch.cat([history, x], dim=-1), self.conv.weight, self.conv.bias, groups=x.shape[1])
        if inference_params is not None:  # prefill: keep the last kernel_size inputs
            start = inference_params.seqlen_offset
            for t in range(max(0, x.shape[-1] - self.k), x.shape[-1]):
                self._ring(inference_params)[..., (start + t) % self.k] = x[..., t]
        return self.out_proj(y.transpose(1, 2) * F.silu(z))  # (B, L, D)

    def step(self, u: Tensor, inference_params: InferenceParams) -> Tensor:
        x, z = self.in_proj(u[:, 0]).chunk(2, dim=-1)  # (B, inner) each
        ring, position = self._ring(inference_params), inference_params.position  # position: () int64
        ring.index_copy_(2, (position % self.k).view(1), x.unsqueeze(-1).to(ring.dtype))
        window = self._window(inference_params, position)  # (B, inner, k): positions p-k+1 .. p
        y = (window * self.conv.weight[:, 0]).sum(-1) + self.conv.bias  # (B, inner)
        return self.out_proj(y * F.silu(z)).unsqueeze(1)  # (B, 1, D)

    def _ring(self, inference_params: InferenceParams) -> Tensor:
        return inference_params.key_value_memory_dict[self.layer_idx][0]

    def _window(self, inference_params: InferenceParams, last) -> Tensor:
        """Inputs of positions ``last - k + 1 .. last`` (oldest first); ``last`` an int or a () tensor."""
        ring = self._ring(inference_params)
        slots = (torch.arange(1, self.k + 1, device=ring.device) + last) % self.k
        return ring.index_select(2, slots)

    def reset_inference_cache(self, inference_params: InferenceParams, batch: int) -> None:
        """Zero the history before a new sequence (called by ``Backbone.prefill_first``)."""
        self._ring(inference_params)[:batch].zero_()

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None) -> tuple[Tensor]:
        w = self.conv.weight
        return (torch.zeros(batch_size, w.shape[0], self.k, device=w.device, dtype=dtype or w.dtype),)


@BACKBONES.register("example-conv")
class ConvBackbone(Backbone):
    """``n_layer`` adaLN-modulated blocks of one :class:`GatedConvMixer` each (no MLP)."""

    config_cls = ConvMixerConfig

    def __init__(self, d_model: int, n_layer: int, config: ConvMixerConfig = ConvMixerConfig(),
                 norm_eps: float = 1e-5, policy: ExecutionPolicy | None = None, device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__(d_model, n_layer, mixer_cls=partial(GatedConvMixer, config=config, **factory),
                         norm_cls=rms_norm_factory(norm_eps, **factory), policy=policy)
        self.config = config

