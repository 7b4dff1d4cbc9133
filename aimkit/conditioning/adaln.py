"""adaLN conditioning modules: per-layer (``adaln``), grouped (``adaln-group``), single (``adaln-single``).

Every kind maps the class embedding ``c`` (B, D) to one modulation tensor (B, chunks, D) per layer
(``chunks`` = 3 per sublayer: shift, scale, gate). Each is an affine map of ``SiLU(c)``, so every
kind can be written as per-layer weights ``W_i`` (chunks·D, D) and biases ``b_i`` (chunks·D,):
:meth:`AdaLNBase.per_layer_affine` returns them and :meth:`AdaLNBase.from_per_layer_affine`
builds a module of any kind from them, exactly when the kind can express them.

For exact conversions the bias is kept in its stored parts (:meth:`AdaLNBase.per_layer_parts`):
``b_i = bias_i + table_i``, where ``bias_i`` belongs to the projection layer i reads (``shared[i]``)
and ``table_i`` to the layer. A target that keeps the source's projections keeps both parts as
they are (bit-exact weights, also in bfloat16, and round trips give the same tensors back); only
where a target must merge projections whose biases differ does it fold them into its tables.

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

    def per_layer_affine(self) -> tuple[Tensor, Tensor]:
        """Weights (n_layer, chunks·D, D) and biases (n_layer, chunks·D) of each layer's map of SiLU(c),
        in float32 at least (a float64 module's stay float64, so its conversions stay exact)."""
        weight, bias, table, _ = self.per_layer_parts()
        return weight, bias + table

    def per_layer_parts(self) -> tuple[Tensor, Tensor, Tensor, list[int]]:  # pragma: no cover - abstract
        """The per-layer maps as stored: ``(weight, bias, table, shared)``.

        Layer i's map is ``weight[i] @ SiLU(c) + bias[i] + table[i]`` (weight (n_layer, chunks·D, D),
        bias and table (n_layer, chunks·D), dtypes as :meth:`per_layer_affine`); ``weight[i]`` and
        ``bias[i]`` are the stored projection ``shared[i]`` (layers with equal ``shared`` read one
        projection), ``table[i]`` is layer i's own (zeros for a kind without tables)."""
        raise NotImplementedError

    @classmethod
    def from_per_layer_affine(
        cls, weight: Tensor, bias: Tensor, chunks: int, config, approximate: bool = False, *,
        table: Tensor | None = None, shared: list[int] | None = None,
    ) -> tuple[AdaLNBase, float]:  # pragma: no cover - abstract
        """Build this kind from per-layer maps; returns (module, max abs weight error introduced).

        ``table`` and ``shared`` (as :meth:`per_layer_parts` gives them) let the result keep the
        source's bias split and skip comparing projections that are one stored tensor; without
        them the maps are ``weight[i] @ s + bias[i]``, each layer its own projection."""
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

    def per_layer_parts(self) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        weight = torch.stack([_affine(lin.weight) for lin in self.layers])
        bias = torch.stack([_affine(lin.bias) for lin in self.layers])
        return weight, bias, torch.zeros_like(bias), list(range(self.n_layer))

    @classmethod
    def from_per_layer_affine(cls, weight, bias, chunks, config=AdaLNConfig(), approximate=False, *,
                              table=None, shared=None):
        n_layer, _, d = weight.shape
        mod = cls(d, n_layer, chunks, config, device=weight.device, dtype=weight.dtype)
        if weight.is_meta:
            return mod, 0.0
        with torch.no_grad():
            for i, lin in enumerate(mod.layers):
                lin.weight.copy_(weight[i])
                lin.bias.copy_(bias[i] if table is None else bias[i] + table[i])
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

    def per_layer_parts(self) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        w = _affine(self.proj.weight).view(self.num_groups, self.chunks * self.d_model, self.d_model)
        b = _affine(self.proj.bias).view(self.num_groups, self.chunks * self.d_model)
        shared = [i % self.num_groups for i in range(self.n_layer)]
        tables = torch.stack([_affine(t).reshape(-1) for t in self.tables])
        return w[shared], b[shared], tables, shared

    @classmethod
    def from_per_layer_affine(cls, weight, bias, chunks, config=AdaLNGroupConfig(), approximate=False, *,
                              table=None, shared=None):
        """Group ``g`` takes layers ``g, g + G, ...``: their weights must be equal (or, with
        ``approximate``, are averaged). Their bias becomes the group's when it is one value for
        all of them (the tables stay as given); otherwise the group's bias is zero and each layer's
        whole bias goes into its table."""
        n_layer, _, d = weight.shape
        g_count = cls._groups(config)
        mod = cls(d, n_layer, chunks, config, device=weight.device, dtype=weight.dtype)
        table = torch.zeros_like(bias) if table is None else table
        shared = list(range(n_layer)) if shared is None else list(shared)
        max_err = 0.0
        with torch.no_grad():
            for g in range(g_count):
                members = list(range(g, n_layer, g_count))
                one_projection = len({shared[i] for i in members}) == 1  # one stored tensor: equal
                if weight.is_meta and not one_projection:
                    raise InexactConversionError(
                        f"cannot convert to {cls._kind_name(config)} on the meta device: layers {members} would "
                        "share one projection, and whether their weights are equal needs their values; "
                        "load the weights first")
                if weight.is_meta:
                    continue
                ws = weight[members]
                same = one_projection or all(torch.equal(ws[0], w) for w in ws[1:])
                if not same and not approximate:
                    err = (ws - ws[0]).abs().max().item()
                    raise InexactConversionError(
                        f"cannot convert to {cls._kind_name(config)} exactly: layers {members} would share "
                        f"one projection but their weights differ (max abs difference {err:.3g}); "
                        "pass approximate=True (aimkit convert --approximate) to average them"
                    )
                shared_w = ws[0] if same else ws.mean(0)
                if not same:
                    max_err = max(max_err, (ws - shared_w).abs().max().item())
                bs = bias[members]
                one_bias = one_projection or all(torch.equal(bs[0], b) for b in bs[1:])
                shared_b = bs[0] if one_bias else torch.zeros_like(bs[0])
                sl = slice(g * chunks * d, (g + 1) * chunks * d)
                mod.proj.weight[sl].copy_(shared_w)
                mod.proj.bias[sl].copy_(shared_b)
                for i in members:
                    own = table[i] if one_bias else bias[i] + table[i]
                    mod.tables[i].copy_(own.view(1, chunks, d))
        return mod, max_err

    @staticmethod
    def _groups(config) -> int:
        return config.num_groups

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
    def from_per_layer_affine(cls, weight, bias, chunks, config=AdaLNSingleConfig(), approximate=False, *,
                              table=None, shared=None):
        return super().from_per_layer_affine(weight, bias, chunks, config, approximate, table=table, shared=shared)

    @staticmethod
    def _groups(config) -> int:
        return 1

    @staticmethod
    def _kind_name(config) -> str:
        return "adaln-single"
