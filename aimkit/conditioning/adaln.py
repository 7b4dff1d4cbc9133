"""adaLN conditioning modules: per-layer (``adaln``), grouped (``adaln-group``), single (``adaln-single``).

Every kind maps the class embedding ``c`` (B, D) to one modulation tensor (B, chunks, D) per layer
(``chunks`` = 3 per sublayer: shift, scale, gate). Each is an affine map of ``SiLU(c)``, so every
kind can be written as per-layer weights ``W_i`` (chunks·D, D) and biases ``b_i`` (chunks·D,):
:meth:`AdaLNBase.per_layer_affine` returns them and :meth:`AdaLNBase.from_per_layer_affine`
builds a module of any kind from them, exactly when the kind can express them.

* ``adaln``: layer i owns ``Linear(D, chunks·D)``, zero-initialised (DiT's adaLN-Zero).
* ``adaln-group``: G shared projections in one ``Linear(D, G·chunks·D)``; layer i uses group
  ``i % G`` (interleaved) plus a learnable per-layer table (1, chunks, D) added to its group's output.
* ``adaln-single``: ``adaln-group`` with G = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check_fields
from ..errors import ConfigError
from ..registry import CONDITIONING

__all__ = [
    "AdaLNConfig",
    "AdaLNGroupConfig",
    "AdaLNSingleConfig",
    "AdaLNBase",
    "AdaLN",
    "AdaLNGroup",
    "AdaLNSingle",
    "InexactConversionError",
]


class InexactConversionError(ConfigError):
    """The requested conditioning kind cannot represent the source module's projections exactly."""


@dataclass(frozen=True)
class AdaLNConfig:
    """Per-layer adaLN has no options."""


@dataclass(frozen=True)
class AdaLNGroupConfig:
    num_groups: int = 4  # G shared projections; layer i uses group i % G

    def __post_init__(self):
        check_fields(self, "adaln-group")
        if self.num_groups < 1:
            raise ConfigError(f"num_groups must be a positive integer, got {self.num_groups!r}")


@dataclass(frozen=True)
class AdaLNSingleConfig:
    """adaLN-single is adaLN-group with one group; it has no options."""


def _affine(t: Tensor) -> Tensor:
    """``t`` in the dtype of the per-layer maps: float32, or float64 for a float64 module."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class AdaLNBase(nn.Module):
    """Common interface of the adaLN kinds.

    Args:
        d_model: width D.
        n_layer: number of modulated layers.
        chunks: modulation rows per layer (3 for Mamba2 blocks, 6 with an MLP sublayer).
    """

    final_modulation = True  # the generator adds a final adaLN layer (FinalLayer) modulated by c

    def __init__(self, d_model: int, n_layer: int, chunks: int):
        super().__init__()
        self.d_model, self.n_layer, self.chunks = d_model, n_layer, chunks

    def forward(self, c: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        """c (B, D) -> n_layer tensors (B, chunks, D)."""
        raise NotImplementedError

    def per_layer_affine(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """Weights (n_layer, chunks·D, D) and biases (n_layer, chunks·D) of each layer's map of SiLU(c),
        in float32 at least (a float64 module's stay float64, so its conversions stay exact)."""
        raise NotImplementedError

    @classmethod
    def from_per_layer_affine(
        cls, weight: Tensor, bias: Tensor, chunks: int, config, approximate: bool = False
    ) -> tuple[AdaLNBase, float]:  # pragma: no cover - abstract
        """Build this kind from per-layer maps; returns (module, max abs weight error introduced)."""
        raise NotImplementedError

    # official-checkpoint key maps: aimkit name -> official name (under "mamba.")
    def official_key_map(self) -> dict[str, str]:  # pragma: no cover - abstract
        raise NotImplementedError


@CONDITIONING.register("adaln")
class AdaLN(AdaLNBase):
    """Per-layer adaLN: ``mod_i = Linear_i(SiLU(c))`` reshaped to (B, chunks, D); zero-initialised."""

    config_cls = AdaLNConfig

    def __init__(self, d_model: int, n_layer: int, chunks: int = 3, config: AdaLNConfig = AdaLNConfig(),
                 device=None, dtype=None):
        super().__init__(d_model, n_layer, chunks)
        self.config = config
        self.layers = nn.ModuleList(
            nn.Linear(d_model, chunks * d_model, device=device, dtype=dtype) for _ in range(n_layer)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """adaLN-Zero: every modulation starts at zero, so each block starts as the identity."""
        for lin in self.layers:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, c: Tensor) -> list[Tensor]:
        s = F.silu(c)  # (B, D)
        return [lin(s).view(c.shape[0], self.chunks, self.d_model) for lin in self.layers]

    def per_layer_affine(self) -> tuple[Tensor, Tensor]:
        return (torch.stack([_affine(lin.weight) for lin in self.layers]),
                torch.stack([_affine(lin.bias) for lin in self.layers]))

    @classmethod
    def from_per_layer_affine(cls, weight, bias, chunks, config=AdaLNConfig(), approximate=False):
        n_layer, _, d = weight.shape
        mod = cls(d, n_layer, chunks, config, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for i, lin in enumerate(mod.layers):
                lin.weight.copy_(weight[i])
                lin.bias.copy_(bias[i])
        return mod, 0.0

    def official_key_map(self) -> dict[str, str]:
        out = {}
        for i in range(self.n_layer):
            for p in ("weight", "bias"):
                out[f"layers.{i}.{p}"] = f"backbone.layers.{i}.adaLN_modulation.1.{p}"
        return out


@CONDITIONING.register("adaln-group")
class AdaLNGroup(AdaLNBase):
    """Grouped adaLN (AiM's adaLN-group): G shared projections plus a per-layer table.

    ``mod_i = proj(SiLU(c)).view(B, G, chunks, D)[:, i % G] + tables[i]``.
    Initialisation follows the official AiM code: default ``Linear`` weight init, zero bias, tables
    drawn from N(0, 1/D).
    """

    config_cls = AdaLNGroupConfig

    def __init__(self, d_model: int, n_layer: int, chunks: int = 3,
                 config: AdaLNGroupConfig = AdaLNGroupConfig(), device=None, dtype=None):
        super().__init__(d_model, n_layer, chunks)
        if not isinstance(config.num_groups, int) or config.num_groups < 1:
            raise ConfigError(f"num_groups must be a positive integer, got {config.num_groups!r}")
        if config.num_groups > n_layer:
            raise ConfigError(f"num_groups ({config.num_groups}) cannot exceed n_layer ({n_layer})")
        self.config = config
        self.num_groups = config.num_groups
        self.proj = nn.Linear(d_model, self.num_groups * chunks * d_model, device=device, dtype=dtype)
        self.tables = nn.ParameterList(
            nn.Parameter(torch.empty(1, chunks, d_model, device=device, dtype=dtype)) for _ in range(n_layer)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.proj.reset_parameters()
        nn.init.zeros_(self.proj.bias)
        for t in self.tables:
            nn.init.normal_(t, std=1 / math.sqrt(self.d_model))

    def forward(self, c: Tensor) -> list[Tensor]:
        groups = self.proj(F.silu(c)).view(c.shape[0], self.num_groups, self.chunks, self.d_model)
        return [groups[:, i % self.num_groups] + self.tables[i] for i in range(self.n_layer)]

    def per_layer_affine(self) -> tuple[Tensor, Tensor]:
        w = _affine(self.proj.weight).view(self.num_groups, self.chunks * self.d_model, self.d_model)
        b = _affine(self.proj.bias).view(self.num_groups, self.chunks * self.d_model)
        idx = [i % self.num_groups for i in range(self.n_layer)]
        tables = torch.stack([_affine(t).reshape(-1) for t in self.tables])
        return w[idx], b[idx] + tables

    @classmethod
    def from_per_layer_affine(cls, weight, bias, chunks, config=AdaLNGroupConfig(), approximate=False):
        n_layer, _, d = weight.shape
        g_count = config.num_groups
        mod = cls(d, n_layer, chunks, config, device=weight.device, dtype=weight.dtype)
        max_err = 0.0
        with torch.no_grad():
            for g in range(g_count):
                members = list(range(g, n_layer, g_count))
                ws = weight[members]
                shared = ws[0] if not approximate else ws.mean(0)
                err = (ws - shared).abs().max().item()
                if err > 0 and not approximate:
                    raise InexactConversionError(
                        f"cannot convert to {cls._kind_name(config)} exactly: layers {members} would share "
                        f"one projection but their weights differ (max abs difference {err:.3g}); "
                        "pass approximate=True to average them"
                    )
                max_err = max(max_err, err)
                bs = bias[members]
                shared_b = bs.mean(0)
                sl = slice(g * chunks * d, (g + 1) * chunks * d)
                mod.proj.weight[sl].copy_(shared)
                mod.proj.bias[sl].copy_(shared_b)
                for i, b in zip(members, bs):
                    mod.tables[i].copy_((b - shared_b).view(1, chunks, d))
        return mod, max_err

    @staticmethod
    def _kind_name(config) -> str:
        return f"adaln-group with num_groups={config.num_groups}"

    def official_key_map(self) -> dict[str, str]:
        out = {"proj.weight": "backbone.adaln_group.1.weight", "proj.bias": "backbone.adaln_group.1.bias"}
        for i in range(self.n_layer):
            out[f"tables.{i}"] = f"backbone.layers.{i}.scale_shift_table"
        return out


@CONDITIONING.register("adaln-single")
class AdaLNSingle(AdaLNGroup):
    """adaLN-single (PixArt-α style): one shared projection for all layers plus per-layer tables."""

    config_cls = AdaLNSingleConfig

    def __init__(self, d_model: int, n_layer: int, chunks: int = 3,
                 config: AdaLNSingleConfig = AdaLNSingleConfig(), device=None, dtype=None):
        super().__init__(d_model, n_layer, chunks, AdaLNGroupConfig(num_groups=1), device=device, dtype=dtype)
        self.config = config

    @classmethod
    def from_per_layer_affine(cls, weight, bias, chunks, config=AdaLNSingleConfig(), approximate=False):
        group, err = AdaLNGroup.from_per_layer_affine(
            weight, bias, chunks, AdaLNGroupConfig(num_groups=1), approximate=approximate
        )
        n_layer, _, d = weight.shape
        mod = cls(d, n_layer, chunks, config, device=weight.device, dtype=weight.dtype)
        mod.load_state_dict(group.state_dict())
        return mod, err

    @staticmethod
    def _kind_name(config) -> str:
        return "adaln-single"
