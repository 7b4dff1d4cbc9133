"""The PyTorch SSD reference (aimkit.kernels.ssd): the chunked scan and the recurrent step against
a per-position loop."""

import pytest
import torch
import torch.nn.functional as F

from aimkit.kernels.ssd import ssd_chunked, ssd_naive, ssd_recurrent_step, ssd_recurrent_step_


def _ssd_inputs(dtype, groups, seqlen, batch=2, nheads=4, headdim=3, dstate=5, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    x = randn(batch, seqlen, nheads, headdim)
    dt = F.softplus(randn(batch, seqlen, nheads) - 1)
    A = -torch.exp(randn(nheads).abs())
    B = randn(batch, seqlen, groups, dstate)
    C = randn(batch, seqlen, groups, dstate)
    D = randn(nheads)
    state = randn(batch, nheads, headdim, dstate)
    return x, dt, A, B, C, D, state


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("seqlen", [21, 24, 5])  # padded, exact multiple, shorter than a chunk
@pytest.mark.parametrize("with_state", [False, True])
def test_ssd_chunked_matches_naive(dtype, tol, groups, seqlen, with_state):
    x, dt, A, B, C, D, state = _ssd_inputs(dtype, groups, seqlen)
    init = state if with_state else None
    y, final = ssd_chunked(x, dt, A, B, C, 8, D=D, initial_state=init, return_final_state=True)
    y_ref, final_ref = ssd_naive(x, dt, A, B, C, D=D, initial_state=init)
    assert y.dtype == dtype and y.shape == x.shape and final.shape == state.shape
    scale = y_ref.abs().max().item()
    assert (y - y_ref).abs().max().item() <= tol * scale
    assert (final - final_ref).abs().max().item() <= tol * final_ref.abs().max().item()
    assert torch.allclose(ssd_chunked(x, dt, A, B, C, 8, D=D, initial_state=init), y)


def test_ssd_chunked_low_precision_inputs_compute_in_float32():
    x, dt, A, B, C, D, _ = _ssd_inputs(torch.float32, 2, 19)
    y16 = ssd_chunked(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), 8, D=D)
    y_ref, _ = ssd_naive(x.bfloat16().float(), dt, A, B.bfloat16().float(), C.bfloat16().float(), D=D)
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y_ref).abs().max() <= 1e-2 * y_ref.abs().max()


def test_ssd_chunked_gradcheck():
    inputs = _ssd_inputs(torch.float64, 2, 7, batch=1, nheads=2, headdim=2, dstate=3)
    inputs = tuple(t.clone().requires_grad_() for t in inputs)

    def fn(x, dt, A, B, C, D, state):
        return ssd_chunked(x, dt, A, B, C, 4, D=D, initial_state=state, return_final_state=True)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("groups", [1, 2])
def test_recurrent_step_matches_naive(groups):
    x, dt, A, B, C, D, state = _ssd_inputs(torch.float64, groups, 6)
    y_ref, final_ref = ssd_naive(x, dt, A, B, C, D=D, initial_state=state)
    for t in range(x.shape[1]):
        y, state = ssd_recurrent_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        assert torch.allclose(y, y_ref[:, t], atol=1e-12)
    assert torch.allclose(state, final_ref, atol=1e-12)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_in_place_recurrent_step_equals_the_pure_one(state_dtype):
    x, dt, A, B, C, D, state = _ssd_inputs(torch.float32, 2, 1)
    state = state.to(state_dtype)
    y_ref, state_ref = ssd_recurrent_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    y = ssd_recurrent_step_(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, state_ref.to(state_dtype), atol=1e-5, rtol=1e-5)
