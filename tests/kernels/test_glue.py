"""The PyTorch glue reference (aimkit.kernels.glue): the whole-sequence add-norm-modulate and the
deferred row factor of a folded RMSNorm."""

import torch

from aimkit.kernels.glue import DeferredRowNorm, add_norm_modulate


def test_glue_returns_out_dtype_and_float32_residual():
    g = torch.Generator().manual_seed(0)
    hidden, residual = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    gate, shift, scale = (torch.randn(2, 8, generator=g) for _ in range(3))
    weight = torch.rand(8, generator=g) + 0.5
    out, res = add_norm_modulate(hidden, gate, residual, weight, 1e-5, shift, scale, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and res.dtype == torch.float32
    r = hidden * gate[:, None] + residual
    want = r * torch.rsqrt(r.square().mean(-1, keepdim=True) + 1e-5) * weight * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(res, r)
    torch.testing.assert_close(out, want.bfloat16())


def test_deferred_row_norm_apply():
    partials = torch.tensor([[1.0, 3.0], [8.0, 0.0]])
    out = torch.ones(2, 1, 3, dtype=torch.bfloat16)
    normed = DeferredRowNorm(partials, 4, 0.0).apply(out)  # rows: rsqrt(1) = 1, rsqrt(2)
    assert normed.dtype == torch.bfloat16 and normed.shape == out.shape
    torch.testing.assert_close(normed[:, 0, 0].float(), torch.tensor([1.0, 2 ** -0.5]), atol=1e-2, rtol=0)
