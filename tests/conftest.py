"""Shared fixtures: tiny generators and deterministic parameter randomisation."""

from __future__ import annotations

import pytest
import torch

import aimkit


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fill every floating parameter with seeded noise (zero-inits would hide wiring bugs).

    Mamba2's A_log and dt_bias keep sensible ranges so the scan stays stable.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.is_floating_point():
                continue
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 2.0)
            elif name.endswith("dt_bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 2.0 - 3.0)
            elif name.endswith(("norm.weight", "norm2.weight", "norm_f.weight")) or name.endswith(".D"):
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


# overrides giving a fast Mamba2 generator without a tokenizer: aimkit.build("aim-b", **TINY_MAMBA)
TINY_MAMBA = dict(
    d_model=32, n_layer=2, num_classes=10, num_tokens=16, vocab_size=64, tokenizer=None,
    d_state=16, headdim=8, chunk_size=8,
)


@pytest.fixture
def tiny_kwargs():
    """Overrides giving a fast Mamba2 generator without a tokenizer (a fresh copy of TINY_MAMBA)."""
    return dict(TINY_MAMBA)


@pytest.fixture
def tiny_gen(tiny_kwargs):
    torch.manual_seed(0)
    return randomize_(aimkit.build("aim-b", **tiny_kwargs))


def assert_float_close(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 64) -> None:
    """``actual`` equals ``expected`` up to rounding: within ``ulps`` machine epsilons of
    ``expected``'s dtype, scaled by its largest magnitude (at least 1).

    The tolerance for two float computations that agree mathematically but may sum in another
    order (other matmul shapes, thread counts or CPU kernels: AVX-512 here, AVX2 on AMD EPYC).
    Bit-exact ``torch.equal`` is kept for contracts that are bit-exactness (copies, resume, seeds).
    """
    eps = torch.finfo(expected.dtype).eps
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    err = (actual.detach().to(expected.dtype) - expected.detach()).abs().max().item() if expected.numel() else 0.0
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert err <= ulps * eps * scale, f"max abs error {err:.3g} > {ulps} eps x {scale:.3g} ({expected.dtype})"
