"""Rotary position tables and the rotation, in PyTorch (torch only: no Triton).

The transformer backbone computes its positions with these functions, and
:mod:`aimkit.kernels.rope_cache` states its reference with them, so the decode kernel is checked
against the very maths the model runs. Two schemes:

* ``"1d"``: position p rotated by ``p * base ** (-2i / head_dim)`` on channel pair i;
* ``"2d"``: LlamaGen's grid: sequence position 0 is the class token (zero tables, as LlamaGen
  stores them), position p >= 1 the image token at cell ``(p - 1) // G, (p - 1) % G`` of a G x G
  grid; the first half of the pairs turns with the row, the second with the column, at
  frequencies ``base ** (-4j / head_dim)``.

Channel pairs ``(2i, 2i + 1)`` are rotated, as in LlamaGen's complex-number formulation. Tables
are computed from the positions on every call (float32, never cast with the module).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_rotary", "rotary_angles", "rotary_angles_2d", "rotary_tables"]


def rotary_angles(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """Rotary cos/sin tables for the given absolute positions.

    Args:
        positions: (L,) integer positions (device tensor; never read on the host).
        head_dim: per-head channels, even.
        base: frequency base theta.

    Returns:
        ``(cos, sin)``, each (L, head_dim // 2) float32.
    """
    channels = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    exponents = channels / head_dim  # (head_dim / 2,)
    inv_freq = 1.0 / torch.pow(base, exponents)  # (head_dim / 2,)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (L, head_dim / 2)
    return angles.cos(), angles.sin()


def rotary_angles_2d(positions: Tensor, head_dim: int, base: float, grid_size: int) -> tuple[Tensor, Tensor]:
    """LlamaGen's 2-D rotary cos/sin tables for sequence positions (module docstring).

    Args:
        positions: (L,) integer sequence positions: 0 is the class token, p >= 1 the image token
            at grid cell ``p - 1`` (device tensor; never read on the host).
        head_dim: per-head channels, a multiple of 4.
        base: frequency base theta.
        grid_size: side G of the square token grid.

    Returns:
        ``(cos, sin)``, each (L, head_dim // 2) float32; zeros at position 0.
    """
    quarter = head_dim // 4
    channels = torch.arange(0, 2 * quarter, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / torch.pow(base, channels / (head_dim // 2))  # (head_dim / 4,)
    cell = (positions - 1).clamp(min=0)  # (L,)
    rows, cols = (cell // grid_size).to(torch.float32), (cell % grid_size).to(torch.float32)
    angles = torch.cat((rows[:, None] * inv_freq, cols[:, None] * inv_freq), dim=-1)  # (L, head_dim / 2)
    image = (positions >= 1)[:, None]  # the class token's tables are zero
    return angles.cos() * image, angles.sin() * image


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs ``(2i, 2i + 1)`` of x by the position angles.

    Args:
        x: (B, L, H, head_dim).
        cos: (L, head_dim // 2) from :func:`rotary_angles`.
        sin: (L, head_dim // 2).

    Returns:
        (B, L, H, head_dim) in x's dtype (the rotation itself runs in float32).
    """
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, head_dim / 2) each
    cos, sin = cos[:, None, :], sin[:, None, :]  # (L, 1, head_dim / 2)
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def rotary_tables(positions: Tensor, head_dim: int, base: float, rope: str,
                  grid_size: int | None = None) -> tuple[Tensor, Tensor]:
    """The ``(cos, sin)`` tables of scheme ``rope`` (``"1d"`` or ``"2d"``, which needs ``grid_size``)."""
    if rope == "2d":
        return rotary_angles_2d(positions, head_dim, base, grid_size)
    return rotary_angles(positions, head_dim, base)
