"""The decode-glue kernel (aimkit.kernels.decode_glue, op ``decode_glue``) against its reference
arithmetic, with and without a deferred row norm.

On a CPU machine the kernel runs in Triton's interpreter; on a GPU machine compiled on CUDA tensors.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run in Triton's interpreter on CPU
pytest.importorskip("triton")

from aimkit.kernels.decode_glue import add_norm_modulate  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _norm_reference(hidden, gate, residual, weight, eps, shift, scale):
    r = hidden.float() * (gate.float() if gate is not None else 1.0)
    r = r + residual if residual is not None else r
    xn = r.to(weight.dtype).float()
    out = xn * torch.rsqrt(xn.square().mean(-1, keepdim=True) + eps) * weight.float()
    if shift is not None:
        out = out * (1 + scale.float()) + shift.float()
    return out.to(weight.dtype), r


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_gate,with_residual,with_mod",
                         [(True, True, True), (False, False, True), (True, True, False)])
def test_add_norm_modulate_matches_reference(dtype, with_gate, with_residual, with_mod):
    g = torch.Generator().manual_seed(2)
    rows, dim = 3, 48  # not a power of two: masked lanes
    mods = torch.randn(rows, 3, dim, generator=g).to(DEVICE, dtype)  # strided rows, as the stacked mods
    hidden = torch.randn(rows, dim, generator=g).to(DEVICE, dtype)
    residual = torch.randn(rows, dim, generator=g).to(DEVICE) if with_residual else None
    weight = torch.randn(dim, generator=g).to(DEVICE, dtype)
    gate = mods[:, 2] if with_gate else None
    shift, scale = (mods[:, 0], mods[:, 1]) if with_mod else (None, None)
    ref_out, ref_res = _norm_reference(hidden, gate, residual, weight, 1e-5, shift, scale)
    residual_buffer = residual
    out, res = add_norm_modulate(hidden, gate, residual, weight, 1e-5, shift, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(res, ref_res, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    assert out.dtype == dtype and res.dtype == torch.float32
    if with_residual:
        assert res.data_ptr() == residual_buffer.data_ptr()  # the stream is updated in place


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_mod", [True, False])
def test_add_norm_modulate_applies_pending_row_norm(dtype, with_mod):
    """hidden_sq_partials: hidden is first scaled by rsqrt(sum(partials) / dim + eps), per row."""
    g = torch.Generator().manual_seed(7)
    rows, dim, tiles, norm_dim = 4, 48, 3, 96  # 3 tiles: masked lanes in the partials block
    mods = torch.randn(rows, 3, dim, generator=g).to(DEVICE, dtype)
    hidden = torch.randn(rows, dim, generator=g).to(DEVICE, dtype) * 5
    residual = torch.randn(rows, dim, generator=g).to(DEVICE)
    weight = torch.randn(dim, generator=g).to(DEVICE, dtype)
    partials = torch.rand(rows, tiles, generator=g).mul(torch.tensor([[1.0], [30.0], [900.0], [0.01]])).to(DEVICE)
    shift, scale = (mods[:, 0], mods[:, 1]) if with_mod else (None, None)
    factor = torch.rsqrt(partials.sum(-1, keepdim=True) / norm_dim + 1e-3)  # (R, 1), from 0.3 to 20
    ref_out, ref_res = _norm_reference(hidden.float() * factor, mods[:, 2], residual.clone(), weight, 1e-5,
                                       shift, scale)
    out, res = add_norm_modulate(hidden, mods[:, 2], residual, weight, 1e-5, shift, scale,
                                             hidden_sq_partials=partials, hidden_norm_dim=norm_dim,
                                             hidden_norm_eps=1e-3)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(res, ref_res, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="hidden_norm_dim must be positive"):
        add_norm_modulate(hidden, None, None, weight, 1e-5, hidden_sq_partials=partials)
    with pytest.raises(ValueError, match="hidden_sq_partials must be a float32"):
        add_norm_modulate(hidden, None, None, weight, 1e-5, hidden_sq_partials=partials[:2],
                                      hidden_norm_dim=norm_dim)


def test_add_norm_modulate_rejects_bad_arguments():
    hidden = torch.randn(2, 8, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="both shift and scale"):
        add_norm_modulate(hidden, None, None, w, 1e-5, shift=hidden)
    with pytest.raises(ValueError, match="float32"):
        add_norm_modulate(hidden, None, hidden.bfloat16(), w, 1e-5)
    with pytest.raises(ValueError, match=r"gate must be \(2, 8\)"):
        add_norm_modulate(hidden, hidden[:1], None, w, 1e-5)
