"""The state-update kernel (aimkit.kernels.ssm_step, op ``state_update``) against its PyTorch
reference, the SSD recurrence (and the folded gated norm against GatedRMSNorm).

On a CPU machine the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set here before
Triton is imported); on a GPU machine the same checks run compiled on CUDA tensors.
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run in Triton's interpreter on CPU
pytest.importorskip("triton")

from aimkit.backbones.mamba2 import GatedRMSNorm  # noqa: E402
from aimkit.kernels.glue import DeferredRowNorm  # noqa: E402
from aimkit.kernels.ssd import ssd_recurrent_step  # noqa: E402
from aimkit.kernels.ssm_step import ssm_step_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _ssm_inputs(rows, nheads, headdim, groups, dstate, state_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv_dim = nheads * headdim + 2 * groups * dstate
    # x, B, C are views of one conv output and dt a view of a wider projection, as in Mamba2.step
    xBC = torch.randn(rows, conv_dim, generator=g).to(DEVICE)
    x, B, C = torch.split(xBC, [nheads * headdim, groups * dstate, groups * dstate], dim=-1)
    proj = torch.randn(rows, nheads + 5, generator=g).to(DEVICE)
    dt = proj[:, 3:3 + nheads]
    dt_bias = torch.randn(nheads, generator=g).to(DEVICE)
    A_log = torch.rand(nheads, generator=g).mul(2.5).to(DEVICE)
    D = torch.randn(nheads, generator=g).to(DEVICE)
    state = torch.randn(rows, nheads, headdim, dstate, generator=g).to(DEVICE, state_dtype)
    return (state, x.unflatten(-1, (nheads, headdim)), dt, dt_bias, A_log,
            B.unflatten(-1, (groups, dstate)), C.unflatten(-1, (groups, dstate)), D)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nheads,headdim,groups,dstate,block_p", [
    (4, 8, 1, 16, None), (6, 12, 2, 16, 4), (2, 64, 1, 128, None),
    (4, 8, 2, 16, 16),  # one program spans two heads of a group
    (8, 8, 1, 16, 64),  # ... or all heads
])
def test_ssm_step_matches_recurrence(state_dtype, nheads, headdim, groups, dstate, block_p):
    state, x, dt, dt_bias, A_log, B, C, D = _ssm_inputs(3, nheads, headdim, groups, dstate, state_dtype)
    y_ref, state_ref = ssd_recurrent_step(
        state.float(), x, F.softplus(dt + dt_bias), -torch.exp(A_log), B, C, D)
    y = ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, block_p=block_p)
    tol = 1e-5 if state_dtype == torch.float32 else 1e-2
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(state.float(), state_ref.to(state_dtype).float(), atol=tol, rtol=tol)


def test_ssm_step_without_skip_and_large_dt():
    state, x, dt, dt_bias, A_log, B, C, _ = _ssm_inputs(2, 4, 8, 1, 16, torch.float32, seed=1)
    dt = dt * 30  # softplus beyond its threshold is the identity
    y_ref, state_ref = ssd_recurrent_step(state.clone(), x, F.softplus(dt + dt_bias), -torch.exp(A_log), B, C)
    y = ssm_step_(state, x, dt, dt_bias, A_log, B, C)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-5)


def test_ssm_step_rejects_bad_layout():
    state, x, dt, dt_bias, A_log, B, C, D = _ssm_inputs(2, 4, 8, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        ssm_step_(state, x.transpose(1, 2).contiguous().transpose(1, 2), dt, dt_bias, A_log, B, C, D)
    with pytest.raises(ValueError, match="do not match"):
        ssm_step_(state, x[:1], dt, dt_bias, A_log, B, C, D)
    with pytest.raises(ValueError, match="block_p 64 must divide headdim 8 or cover whole heads"):
        ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, block_p=64)  # 8 heads, only 4 exist


def _gated_norm_reference(y, z, weight, block_p):
    """mamba's gated norm split as ssm_step_ does: (g * weight (R, H*P), per-tile sums of g^2 (R, T))."""
    g = (y.float() * F.silu(z.float())).flatten(-2)  # (R, H*P)
    return g * weight.float(), g.square().unflatten(-1, (-1, block_p)).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nheads,headdim,groups,block_p", [
    (4, 8, 1, 4),  # tiles are parts of a head
    (8, 8, 2, 16),  # a tile spans two heads
    (4, 8, 1, 32),  # one tile per row
    (5, 8, 1, 8),
    (6, 8, 2, 4),
])
def test_ssm_step_folds_gated_norm(dtype, nheads, headdim, groups, block_p):
    """With z: out = y * silu(z) * weight (x.dtype) and per-tile float32 sums of (y * silu(z))^2."""
    state, x, dt, dt_bias, A_log, B, C, D = _ssm_inputs(3, nheads, headdim, groups, 16, dtype, seed=5)
    x = x.to(dtype)
    g = torch.Generator().manual_seed(6)
    proj = torch.randn(3, 2 * nheads * headdim + 3, generator=g).to(DEVICE, dtype)
    z = proj[:, 3:3 + nheads * headdim].unflatten(-1, (nheads, headdim))  # strided view, as in Mamba2.step
    weight = (torch.randn(nheads * headdim, generator=g) * 0.5 + 1).to(DEVICE, dtype)
    y_ref, state_ref = ssd_recurrent_step(
        state.float(), x.float(), F.softplus(dt + dt_bias), -torch.exp(A_log), B, C, D)
    out_ref, partials_ref = _gated_norm_reference(y_ref, z, weight, block_p)
    out, partials = ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, block_p=block_p, z=z, norm_weight=weight)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.shape == x.shape and out.dtype == dtype
    assert partials.shape == (3, nheads * headdim // block_p) and partials.dtype == torch.float32
    torch.testing.assert_close(out.flatten(-2).float(), out_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(partials, partials_ref, atol=1e-4, rtol=1e-5)  # y stays float32 in the kernel
    torch.testing.assert_close(state.float(), state_ref.to(dtype).float(), atol=tol, rtol=tol)
    # the folded norm: out * rsqrt(mean) == rmsnorm(y * silu(z)) * weight
    normed = DeferredRowNorm(partials, nheads * headdim, 1e-5).apply(out.flatten(-2).float())
    expected = GatedRMSNorm(nheads * headdim, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        expected.weight.copy_(weight.float())
    torch.testing.assert_close(normed, expected(y_ref.flatten(-2), z.flatten(-2).float()), atol=tol, rtol=tol)


def test_ssm_step_gated_norm_rejects_bad_arguments():
    state, x, dt, dt_bias, A_log, B, C, D = _ssm_inputs(2, 4, 8, 1, 16, torch.float32)
    z, w = torch.randn_like(x), torch.ones(32, device=DEVICE)
    with pytest.raises(ValueError, match="both z and norm_weight"):
        ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, z=z)
    with pytest.raises(ValueError, match="z .* does not match x"):
        ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, z=z[:, :2], norm_weight=w)
    with pytest.raises(ValueError, match=r"norm_weight must be a contiguous \(32,\)"):
        ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, z=z, norm_weight=w[:16])
    with pytest.raises(ValueError, match="z needs a contiguous last dimension"):
        ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, z=z.transpose(1, 2).contiguous().transpose(1, 2),
                              norm_weight=w)
