"""``class-token`` conditioning: the class reaches the model only as the first sequence position.

This is LlamaGen's conditioning (the class embedding is an in-context prefix token; blocks and
the head are not modulated). Behind the same interface as the adaLN kinds, every block receives
the identity modulation: ``shift = 0``, ``scale = 0``, ``gate = 1`` for each sublayer, which the
block arithmetic applies exactly (``x * (1 + 0) + 0 == x``, ``1 * h == h`` in every float dtype),
so the backbones, their fused glue and the decode graphs serve both kinds unchanged. The module
has no parameters and the generator builds no final adaLN layer for it
(:attr:`~aimkit.conditioning.adaln.AdaLNBase.final_modulation` is False).

Conversions (:meth:`aimkit.Generator.convert_conditioning`) between this kind and the adaLN kinds
are refused: the adaLN kinds also modulate a final norm (``final_layer``) that a class-token model
does not have, and no choice of its weights reproduces the class-token head exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..registry import CONDITIONING
from .adaln import AdaLNBase, InexactConversionError, _affine

__all__ = ["ClassTokenConfig", "ClassToken"]


@dataclass(frozen=True)
class ClassTokenConfig:
    """Class-token conditioning has no options."""


def identity_rows(chunks: int, d_model: int, device=None, dtype=None) -> Tensor:
    """(chunks, D): shift 0, scale 0, gate 1 for each sublayer (rows 3j, 3j + 1, 3j + 2)."""
    rows = torch.zeros(chunks, d_model, device=device, dtype=dtype)
    rows[2::3] = 1.0
    return rows


@CONDITIONING.register("class-token")
class ClassToken(AdaLNBase):
    """The class as a prefix token only; every block gets the identity modulation.

    Args:
        d_model: width D.
        n_layer: number of blocks.
        chunks: modulation rows per block (3 per sublayer).
    """

    config_cls = ClassTokenConfig
    final_modulation = False

    def __init__(self, d_model: int, n_layer: int, chunks: int = 3, config: ClassTokenConfig = ClassTokenConfig(),
                 device=None, dtype=None):
        super().__init__(d_model, n_layer, chunks)
        if chunks % 3:
            raise ValueError(f"chunks must be a multiple of 3 (shift, scale, gate per sublayer), got {chunks}")
        self.config = config
        self.register_buffer("rows", identity_rows(chunks, d_model, device=device, dtype=dtype), persistent=False)

    def forward(self, c: Tensor) -> list[Tensor]:
        """c (B, D) -> n_layer views of one (B, chunks, D) identity modulation (c is not read)."""
        rows = self.rows.to(c.dtype).expand(c.shape[0], self.chunks, self.d_model)
        return [rows] * self.n_layer

    def per_layer_parts(self) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        rows = _affine(self.rows)
        weight = rows.new_zeros(self.n_layer, self.chunks * self.d_model, self.d_model)
        bias = rows.reshape(1, -1).expand(self.n_layer, -1).clone()
        return weight, bias, torch.zeros_like(bias), [0] * self.n_layer

    @classmethod
    def from_per_layer_affine(cls, weight, bias, chunks, config=ClassTokenConfig(), approximate=False, *,
                              table=None, shared=None):
        """Exact only for maps that are already the identity modulation (another class-token
        module's); anything that depends on the class is refused, ``approximate`` or not."""
        n_layer, _, d = weight.shape
        if weight.is_meta:
            raise InexactConversionError("cannot convert to class-token conditioning on the meta device: whether "
                                         "the modulation is the identity needs the weights' values")
        total = bias if table is None else bias + table
        identity = identity_rows(chunks, d, device=bias.device, dtype=total.dtype).reshape(1, -1)
        if weight.count_nonzero() or not torch.equal(total, identity.expand_as(total)):
            raise InexactConversionError(
                "cannot convert to class-token conditioning: the modulation depends on the class or is not the "
                "identity, and class-token blocks are unmodulated (no exact conversion; none is approximated)")
        return cls(d, n_layer, chunks, config, device=weight.device), 0.0

    def official_key_map(self) -> dict[str, str]:
        return {}  # no tensors
