"""aimkit's fused decode kernels against their PyTorch references.

On a CPU machine the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set here before
Triton is imported); on a GPU machine the same checks run compiled on CUDA tensors. Skipped only
when Triton is not installed at all.
"""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from aimkit.backbones import _fused, _triton_ops  # noqa: E402
from aimkit.backbones._ssd import ssd_recurrent_step  # noqa: E402
from aimkit.backbones.mamba2 import GatedRMSNorm, Mamba2, Mamba2Backbone, Mamba2Config  # noqa: E402
from aimkit.backbones.base import InferenceParams  # noqa: E402
from aimkit.backbones.transformer import TransformerBackbone, TransformerConfig  # noqa: E402

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
    y = _triton_ops.ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, block_p=block_p)
    tol = 1e-5 if state_dtype == torch.float32 else 1e-2
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(state.float(), state_ref.to(state_dtype).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("tiles,tiles_first", [(2, False), (3, False), (1, True), (3, True)])
def test_ssm_step_programs_walking_several_tiles(tiles, tiles_first):
    """A program that walks several tiles (with a ragged last one), and either launch order (rows
    or a row's tiles on grid axis 0), give the same result."""
    state, x, dt, dt_bias, A_log, B, C, D = _ssm_inputs(2, 5, 8, 1, 16, torch.float32)
    y_ref, state_ref = ssd_recurrent_step(state.clone(), x, F.softplus(dt + dt_bias), -torch.exp(A_log), B, C, D)
    y = _triton_ops.ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, block_p=8, tiles=tiles, stages=2,
                              tiles_first=tiles_first)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-5)


def test_ssm_step_without_skip_and_large_dt():
    state, x, dt, dt_bias, A_log, B, C, _ = _ssm_inputs(2, 4, 8, 1, 16, torch.float32, seed=1)
    dt = dt * 30  # softplus beyond its threshold is the identity
    y_ref, state_ref = ssd_recurrent_step(state.clone(), x, F.softplus(dt + dt_bias), -torch.exp(A_log), B, C)
    y = _triton_ops.ssm_step_(state, x, dt, dt_bias, A_log, B, C)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-5)


def test_ssm_step_rejects_bad_layout():
    state, x, dt, dt_bias, A_log, B, C, D = _ssm_inputs(2, 4, 8, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        _triton_ops.ssm_step_(state, x.transpose(1, 2).contiguous().transpose(1, 2), dt, dt_bias, A_log, B, C, D)
    with pytest.raises(ValueError, match="do not match"):
        _triton_ops.ssm_step_(state, x[:1], dt, dt_bias, A_log, B, C, D)
    with pytest.raises(ValueError, match="block_p 64 must divide headdim 8 or cover whole heads"):
        _triton_ops.ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, block_p=64)  # 8 heads, only 4 exist


def _gated_norm_reference(y, z, weight, block_p):
    """mamba's gated norm split as ssm_step_ does: (g * weight (R, H*P), per-tile sums of g^2 (R, T))."""
    g = (y.float() * F.silu(z.float())).flatten(-2)  # (R, H*P)
    return g * weight.float(), g.square().unflatten(-1, (-1, block_p)).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nheads,headdim,groups,block_p,tiles", [
    (4, 8, 1, 4, 1),  # tiles are parts of a head
    (8, 8, 2, 16, 1),  # a tile spans two heads
    (4, 8, 1, 32, 1),  # one tile per row
    (5, 8, 1, 8, 2),  # programs walking two tiles, the last one past the end
    (6, 8, 2, 4, 3),
])
def test_ssm_step_folds_gated_norm(dtype, nheads, headdim, groups, block_p, tiles):
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
    out, partials = _triton_ops.ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, block_p=block_p, tiles=tiles,
                                          stages=2 if tiles > 1 else 1, z=z, norm_weight=weight)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.shape == x.shape and out.dtype == dtype
    assert partials.shape == (3, nheads * headdim // block_p) and partials.dtype == torch.float32
    torch.testing.assert_close(out.flatten(-2).float(), out_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(partials, partials_ref, atol=1e-4, rtol=1e-5)  # y stays float32 in the kernel
    torch.testing.assert_close(state.float(), state_ref.to(dtype).float(), atol=tol, rtol=tol)
    # the folded norm: out * rsqrt(mean) == rmsnorm(y * silu(z)) * weight
    normed = _fused.PendingRowNorm(partials, nheads * headdim, 1e-5).apply(out.flatten(-2).float())
    expected = GatedRMSNorm(nheads * headdim, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        expected.weight.copy_(weight.float())
    torch.testing.assert_close(normed, expected(y_ref.flatten(-2), z.flatten(-2).float()), atol=tol, rtol=tol)


def test_ssm_step_gated_norm_rejects_bad_arguments():
    state, x, dt, dt_bias, A_log, B, C, D = _ssm_inputs(2, 4, 8, 1, 16, torch.float32)
    z, w = torch.randn_like(x), torch.ones(32, device=DEVICE)
    with pytest.raises(ValueError, match="both z and norm_weight"):
        _triton_ops.ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, z=z)
    with pytest.raises(ValueError, match="z .* does not match x"):
        _triton_ops.ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, z=z[:, :2], norm_weight=w)
    with pytest.raises(ValueError, match=r"norm_weight must be a contiguous \(32,\)"):
        _triton_ops.ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, z=z, norm_weight=w[:16])
    with pytest.raises(ValueError, match="z needs a contiguous last dimension"):
        _triton_ops.ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, z=z.transpose(1, 2).contiguous().transpose(1, 2),
                              norm_weight=w)


def _ring_of(history, width, channels_last=True):
    """The conv ring buffer (R, C, W) after inputs ``history`` (R, C, L) at positions 0..L-1: slot
    q % W holds input q for the last W positions, zeros where no position has been (module
    docstring of _triton_ops); stored channels-contiguous as aimkit's cache when ``channels_last``."""
    rows, channels, length = history.shape
    ring = torch.zeros(rows, width, channels, dtype=history.dtype).transpose(1, 2)
    if not channels_last:
        ring = ring.contiguous()
    for q in range(max(0, length - width), length):
        ring[..., q % width] = history[..., q]
    return ring.to(DEVICE)


def _conv_reference(history, weight, bias):
    """silu(causal depthwise conv) at the last position of ``history`` (R, C, L), float32: the
    window of the last W inputs, zeros before position 0. -> (R, C)."""
    width = weight.shape[-1]
    window = F.pad(history.float(), (width, 0))[..., -width:]  # (R, C, W), oldest first
    out = (window * weight.float()).sum(-1)
    return F.silu(out + bias.float().cpu() if bias is not None else out)


@pytest.mark.parametrize("channels_last,with_bias,width,start,dtype", [
    (True, True, 4, 0, torch.float32),  # from the empty history
    (True, True, 4, 6, torch.float32),  # the ring wrapped already
    (False, True, 4, 2, torch.float32),  # any strides
    (True, False, 3, 1, torch.float32),
    (True, True, 4, 3, torch.bfloat16),  # a bf16 ring keeps the inputs rounded to bf16
])
def test_conv_step_matches_ring_reference(channels_last, with_bias, width, start, dtype):
    """Several positions in a row from a filled ring: output = silu(conv of the last W inputs), and
    the ring holds exactly the last W inputs by position (the kernel reads the position tensor)."""
    g = torch.Generator().manual_seed(4)
    rows, channels = 3, 40
    history = torch.randn(rows, channels, start, generator=g).to(dtype)  # positions 0..start-1
    state = _ring_of(history, width, channels_last)
    weight = torch.randn(channels, width, generator=g).to(DEVICE)
    bias = torch.randn(channels, generator=g).to(DEVICE) if with_bias else None
    position = torch.tensor(start, device=DEVICE)
    for _ in range(width + 1):  # round the ring once
        # float32 inputs exactly representable in the ring's dtype: Triton's interpreter truncates
        # float32 -> bf16 casts where the GPU (and torch) round to nearest
        proj = torch.randn(rows, channels + 7, generator=g).to(dtype).float().to(DEVICE)
        x = proj[:, 5:5 + channels]  # a strided view, as the split of in_proj's output
        history = torch.cat([history, x.cpu().to(dtype).unsqueeze(-1)], dim=-1)
        out = _triton_ops.conv_step_(x, state, weight, bias, position)
        torch.testing.assert_close(out, _conv_reference(history, weight.cpu(), bias).to(DEVICE), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state, _ring_of(history, width), atol=0, rtol=0)  # one slot written, exactly
        position.add_(1)
    with pytest.raises(ValueError, match="do not fit"):
        _triton_ops.conv_step_(x[:, :8], state, weight, bias, position)
    with pytest.raises(ValueError, match="position must be a one-element int64 tensor"):
        _triton_ops.conv_step_(x, state, weight, bias, position.float())


_CONV_SSM_CASES = [  # nheads, headdim, groups, block_p, tiles, start, gnorm, conv bias
    (4, 8, 1, 4, 1, 0, False, True),  # tiles are parts of a head; from the empty history
    (4, 8, 2, 8, 1, 2, True, True),  # one head per tile, two groups; position < d_conv
    (8, 8, 2, 16, 1, 5, True, False),  # a tile spans two heads of a group
    (4, 8, 1, 32, 1, 7, False, False),  # one tile per row
    (5, 8, 1, 8, 2, 3, True, True),  # programs walking two tiles, the last one past the end
    (6, 8, 2, 4, 3, 9, False, True),  # three parts of a head per program
    (2, 64, 1, None, 1, 1, True, True),  # the default tiling
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nheads,headdim,groups,block_p,tiles,start,gnorm,with_bias", _CONV_SSM_CASES)
def test_conv_ssm_step_matches_reference(dtype, nheads, headdim, groups, block_p, tiles, start, gnorm, with_bias):
    """conv_ssm_step_ over several positions from a filled ring equals the convolution (float32,
    from the full history) followed by the recurrence; the ring holds the last inputs by position.

    ``dtype`` is that of the inputs, the ring and the SSM state (rounded after every step)."""
    width, dstate, rows = 4, 16, 3
    inner = nheads * headdim
    conv_dim = inner + 2 * groups * dstate
    g = torch.Generator().manual_seed(8)
    history = torch.randn(rows, conv_dim, start, generator=g).to(dtype)
    conv_state = _ring_of(history, width)
    conv_w = (torch.randn(conv_dim, width, generator=g) * 0.5).to(DEVICE)
    conv_b = torch.randn(conv_dim, generator=g).to(DEVICE) if with_bias else None
    dt_bias = torch.randn(nheads, generator=g).to(DEVICE)
    A_log = torch.rand(nheads, generator=g).mul(2.5).to(DEVICE)
    D = torch.randn(nheads, generator=g).to(DEVICE)
    norm_w = (torch.randn(inner, generator=g) * 0.5 + 1).to(DEVICE, dtype)
    state = torch.randn(rows, nheads, headdim, dstate, generator=g).to(DEVICE, dtype)
    state_ref = state.float()
    position = torch.tensor(start, device=DEVICE)
    # bf16: the state is rounded after every step (and Triton's interpreter truncates the casts,
    # a bias that adds up over the N terms of each read-out)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    for _ in range(width + 1):
        proj = torch.randn(rows, 2 * inner + conv_dim + nheads + 3, generator=g).to(DEVICE, dtype)
        z = proj[:, 3:3 + inner].unflatten(-1, (nheads, headdim))  # views of one projection, as in Mamba2.step
        xBC = proj[:, 3 + inner:3 + inner + conv_dim]
        dt = proj[:, 3 + inner + conv_dim:3 + inner + conv_dim + nheads]
        history = torch.cat([history, xBC.cpu().unsqueeze(-1)], dim=-1)  # already in the ring's dtype
        conv = _conv_reference(history, conv_w.cpu(), conv_b.cpu() if with_bias else None).to(DEVICE)
        x, B, C = torch.split(conv, [inner, groups * dstate, groups * dstate], dim=-1)
        y_ref, state_ref = ssd_recurrent_step(
            state_ref, x.unflatten(-1, (nheads, headdim)), F.softplus(dt.float() + dt_bias), -torch.exp(A_log),
            B.unflatten(-1, (groups, dstate)), C.unflatten(-1, (groups, dstate)), D)
        state_ref = state_ref.to(dtype).float()  # the kernel stores the state in its dtype

        out = _triton_ops.conv_ssm_step_(
            state, xBC, dt, dt_bias, A_log, conv_state, conv_w, conv_b, position, D, block_p=block_p, tiles=tiles,
            stages=2 if tiles > 1 else 1, **({"z": z, "norm_weight": norm_w} if gnorm else {}))
        if gnorm:
            out, partials = out
            tiles_per_row = partials.shape[1]
            out_ref, partials_ref = _gated_norm_reference(y_ref, z, norm_w, inner // tiles_per_row)
            torch.testing.assert_close(partials, partials_ref, atol=1e-4, rtol=1e-4 if dtype == torch.float32 else tol)
            torch.testing.assert_close(out.flatten(-2).float(), out_ref, atol=tol, rtol=tol)
        else:
            torch.testing.assert_close(out.float(), y_ref, atol=tol, rtol=tol)
        assert out.dtype == dtype and out.shape == (rows, nheads, headdim)
        torch.testing.assert_close(state.float(), state_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(conv_state, _ring_of(history, width), atol=0, rtol=0)  # x, B and C slots
        position.add_(1)


def test_conv_ssm_step_rejects_bad_arguments():
    state = torch.zeros(2, 4, 8, 16, device=DEVICE)
    xBC = torch.zeros(2, 32 + 2 * 16, device=DEVICE)
    dt, vec = torch.zeros(2, 4, device=DEVICE), torch.zeros(4, device=DEVICE)
    ring, w = torch.zeros(2, 64, 4, device=DEVICE), torch.zeros(64, 4, device=DEVICE)
    position = torch.zeros((), dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"xBC \(2, 60\) is not"):
        _triton_ops.conv_ssm_step_(state, xBC[:, :60], dt, vec, vec, ring, w, None, position)
    with pytest.raises(ValueError, match="do not fit together"):
        _triton_ops.conv_ssm_step_(state, xBC, dt, vec, vec, ring[..., :3], w, None, position)
    with pytest.raises(ValueError, match="conv bias must be"):
        _triton_ops.conv_ssm_step_(state, xBC, dt, vec, vec, ring, w, vec, position)
    with pytest.raises(ValueError, match="position must be"):
        _triton_ops.conv_ssm_step_(state, xBC, dt, vec, vec, ring, w, None, torch.zeros(2, dtype=torch.long))


def _exact_bf16(shape, g, scale):
    """Random multiples of ``scale`` in [-2*scale, 2*scale]: projections of these stay exact in
    bfloat16 (small multiples of a power of two), so rounding modes cannot differ (Triton's
    interpreter truncates float32 -> bf16 casts where torch and the GPU round to nearest)."""
    return (torch.randint(-2, 3, shape, generator=g) * scale).to(torch.bfloat16)


@pytest.mark.parametrize("rows,start,block_m,with_bias,with_conv_bias,ring_dtype", [
    (19, 0, None, True, True, torch.bfloat16),  # from the empty history; one ragged row tile of 32
    (19, 2, 16, False, True, torch.bfloat16),  # position < W; two row tiles, the second ragged
    (5, 6, None, True, False, torch.bfloat16),  # the ring wrapped already
    (40, 9, None, False, False, torch.float32),  # a float32 ring holds the bf16 projection
])
def test_in_proj_conv_step_matches_linear_and_ring_conv(rows, start, block_m, with_bias, with_conv_bias, ring_dtype):
    """in_proj_conv_step_ over several positions equals F.linear, then the ring convolution step on
    the conv columns; the ring holds exactly the raw projections by position. The conv segment
    starts and ends mid-tile (64-column tiles), one tile lies past it, N_in and D are ragged."""
    g = torch.Generator().manual_seed(11)
    width, d_model, conv_start, conv_dim, n_out = 4, 80, 37, 70, 200  # tiles 0..63 | 64..127 | 128..191 | 192..
    seg = slice(conv_start, conv_start + conv_dim)
    weight = _exact_bf16((n_out, d_model), g, 0.25).to(DEVICE)
    bias = _exact_bf16((n_out,), g, 0.5).to(DEVICE) if with_bias else None
    conv_w = (torch.randn(conv_dim, width, generator=g) * 0.5).to(DEVICE, torch.bfloat16)
    conv_b = torch.randn(conv_dim, generator=g).to(DEVICE, torch.bfloat16) if with_conv_bias else None
    history = _exact_bf16((rows, conv_dim, start), g, 1.0).to(ring_dtype)  # positions 0..start-1
    conv_state = _ring_of(history, width)
    position = torch.tensor(start, device=DEVICE)
    for _ in range(width + 2):  # round the ring once and more
        x = _exact_bf16((rows, d_model), g, 0.5).to(DEVICE)
        proj = F.linear(x, weight, bias)  # (R, N_in) exact
        history = torch.cat([history, proj[:, seg].cpu().to(ring_dtype).unsqueeze(-1)], dim=-1)
        out = _triton_ops.in_proj_conv_step_(x, weight, bias, conv_state, conv_w, conv_b, position, conv_start,
                                             conv_dim, block_m=block_m, block_n=64)
        assert out.shape == (rows, n_out) and out.dtype == torch.bfloat16
        plain = torch.ones(n_out, dtype=torch.bool)
        plain[seg] = False
        torch.testing.assert_close(out[:, plain], proj[:, plain], atol=0, rtol=0)
        conv_ref = _conv_reference(history, conv_w.float().cpu(), conv_b.float().cpu() if with_conv_bias else None)
        torch.testing.assert_close(out[:, seg].float(), conv_ref.to(DEVICE), atol=1e-2, rtol=1e-2)  # bf16 output
        torch.testing.assert_close(conv_state, _ring_of(history, width), atol=0, rtol=0)  # one slot, exactly
        position.add_(1)


def test_in_proj_conv_step_default_config_and_random_inputs():
    """Random (inexact) bf16 inputs with the default tiling: the projection within bf16 rounding."""
    g = torch.Generator().manual_seed(12)
    rows, d_model, conv_start, conv_dim, n_out, width = 3, 48, 16, 40, 70, 4
    x = torch.randn(rows, 2 * d_model, generator=g).to(DEVICE, torch.bfloat16)[:, 7:7 + d_model]  # strided rows
    weight = (torch.randn(n_out, d_model, generator=g) * 0.2).to(DEVICE, torch.bfloat16)
    conv_w = torch.randn(conv_dim, width, generator=g).to(DEVICE, torch.bfloat16)
    conv_state = _ring_of(torch.randn(rows, conv_dim, 5, generator=g).to(torch.bfloat16), width)
    ring_before = conv_state.clone()
    position = torch.tensor(5, device=DEVICE)
    out = _triton_ops.in_proj_conv_step_(x, weight, None, conv_state, conv_w, None, position, conv_start, conv_dim)
    proj = F.linear(x.float(), weight.float())
    torch.testing.assert_close(out[:, :conv_start].float(), proj[:, :conv_start], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out[:, conv_start + conv_dim:].float(), proj[:, conv_start + conv_dim:],
                               atol=2e-2, rtol=2e-2)
    new = conv_state[..., 5 % width].float()
    torch.testing.assert_close(new, proj[:, conv_start:conv_start + conv_dim], atol=2e-2, rtol=2e-2)
    window = torch.cat([ring_before[..., [2, 3, 0]].float(), new.unsqueeze(-1)], dim=-1)  # positions 2..5
    conv_ref = F.silu((window * conv_w.float()).sum(-1))
    torch.testing.assert_close(out[:, conv_start:conv_start + conv_dim].float(), conv_ref, atol=2e-2, rtol=2e-2)
    untouched = [k for k in range(width) if k != 5 % width]
    torch.testing.assert_close(conv_state[..., untouched], ring_before[..., untouched], atol=0, rtol=0)


def test_in_proj_conv_step_rejects_bad_arguments():
    x = torch.zeros(2, 32, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.zeros(48, 32, device=DEVICE, dtype=torch.bfloat16)
    ring, conv_w = torch.zeros(2, 24, 4, device=DEVICE), torch.zeros(24, 4, device=DEVICE)
    position = torch.zeros((), dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="needs bfloat16 or float16"):
        _triton_ops.in_proj_conv_step_(x.float(), weight.float(), None, ring, conv_w, None, position, 8, 24)
    with pytest.raises(ValueError, match="needs bfloat16 or float16"):
        _triton_ops.in_proj_conv_step_(x, weight.half(), None, ring, conv_w, None, position, 8, 24)
    with pytest.raises(ValueError, match="outside the 48 columns"):
        _triton_ops.in_proj_conv_step_(x, weight, None, ring, conv_w, None, position, 30, 24)
    with pytest.raises(ValueError, match="do not fit together"):
        _triton_ops.in_proj_conv_step_(x, weight, None, ring, conv_w, None, position, 8, 20)
    with pytest.raises(ValueError, match="position must be"):
        _triton_ops.in_proj_conv_step_(x, weight, None, ring, conv_w, None, position.float(), 8, 24)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        _triton_ops.in_proj_conv_step_(x, weight, None, ring, conv_w, None, position, 8, 24, block_n=48)


def _norm_reference(hidden, gate, residual, weight, eps, shift, scale):
    r = hidden.float() * (gate.float() if gate is not None else 1.0)
    r = r + residual if residual is not None else r
    xn = r.to(weight.dtype).float()
    out = xn * torch.rsqrt(xn.square().mean(-1, keepdim=True) + eps) * weight.float()
    if shift is not None:
        out = out * (1 + scale.float()) + shift.float()
    return out.to(weight.dtype), r


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_gate,with_residual,with_mod", [(True, True, True), (False, False, True), (True, True, False)])
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
    out, res = _triton_ops.add_norm_modulate(hidden, gate, residual, weight, 1e-5, shift, scale)
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
    out, res = _triton_ops.add_norm_modulate(hidden, mods[:, 2], residual, weight, 1e-5, shift, scale,
                                             hidden_sq_partials=partials, hidden_norm_dim=norm_dim,
                                             hidden_norm_eps=1e-3)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(res, ref_res, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="hidden_norm_dim must be positive"):
        _triton_ops.add_norm_modulate(hidden, None, None, weight, 1e-5, hidden_sq_partials=partials)
    with pytest.raises(ValueError, match="hidden_sq_partials must be a float32"):
        _triton_ops.add_norm_modulate(hidden, None, None, weight, 1e-5, hidden_sq_partials=partials[:2],
                                      hidden_norm_dim=norm_dim)


def test_pending_row_norm_apply():
    partials = torch.tensor([[1.0, 3.0], [8.0, 0.0]])
    out = torch.ones(2, 1, 3, dtype=torch.bfloat16)
    normed = _fused.PendingRowNorm(partials, 4, 0.0).apply(out)  # rows: rsqrt(1) = 1, rsqrt(2)
    assert normed.dtype == torch.bfloat16 and normed.shape == out.shape
    torch.testing.assert_close(normed[:, 0, 0].float(), torch.tensor([1.0, 2 ** -0.5]), atol=1e-2, rtol=0)


def test_add_norm_modulate_rejects_bad_arguments():
    hidden = torch.randn(2, 8, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="both shift and scale"):
        _triton_ops.add_norm_modulate(hidden, None, None, w, 1e-5, shift=hidden)
    with pytest.raises(ValueError, match="float32"):
        _triton_ops.add_norm_modulate(hidden, None, hidden.bfloat16(), w, 1e-5)
    with pytest.raises(ValueError, match=r"gate must be \(2, 8\)"):
        _triton_ops.add_norm_modulate(hidden, hidden[:1], None, w, 1e-5)


def test_kernel_switch(monkeypatch):
    monkeypatch.setenv("AIMKIT_DECODE_KERNELS", "ssm")
    assert _fused.enabled_kinds() == {"ssm"}
    monkeypatch.setenv("AIMKIT_DECODE_KERNELS", "none")
    assert _fused.enabled_kinds() == set()
    monkeypatch.setenv("AIMKIT_DECODE_KERNELS", "ssm,conv,norm,gnorm")
    assert _fused.enabled_kinds() == set(_fused.KINDS) == {"ssm", "conv", "norm", "gnorm"}
    monkeypatch.setenv("AIMKIT_DECODE_KERNELS", " ssm, GNORM ")
    assert _fused.enabled_kinds() == {"ssm", "gnorm"}
    monkeypatch.setenv("AIMKIT_DECODE_KERNELS", "all")
    assert "conv-in-ssm" not in _fused.enabled_kinds()  # opt-in only
    monkeypatch.setenv("AIMKIT_DECODE_KERNELS", "ssm,conv-in-ssm")
    assert _fused.enabled_kinds() == {"ssm", "conv-in-ssm"}
    monkeypatch.setenv("AIMKIT_DECODE_KERNELS", "all")
    assert "proj-conv" not in _fused.enabled_kinds()  # opt-in only
    monkeypatch.setenv("AIMKIT_DECODE_KERNELS", "ssm,conv,proj-conv")
    assert _fused.enabled_kinds() == {"ssm", "conv", "proj-conv"}
    monkeypatch.setenv("AIMKIT_DECODE_KERNELS", "ssm,fast")
    with pytest.raises(ValueError, match="unknown kernel kinds"):
        _fused.enabled_kinds()
    monkeypatch.delenv("AIMKIT_DECODE_KERNELS")
    assert _fused.decode_ops(torch.zeros(1), "ssm") is None  # CPU tensors never take the kernels
    assert _fused.decode_ops(torch.zeros(1), "gnorm") is None
    with pytest.raises(ValueError, match="unknown decode kernel kind"):
        _fused.decode_ops(torch.zeros(1), "scan")


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


_NO_GNORM = tuple(k for k in _fused.KINDS if k != "gnorm")


def _counted_ops(calls):
    """The kernel module with every call counted in ``calls`` (and folded-norm calls apart)."""
    def counted(name):
        def call(*args, **kwargs):
            calls[name] += 1
            if kwargs.get("z") is not None:
                calls["folded ssm_step_"] += 1
            if kwargs.get("hidden_sq_partials") is not None:
                calls["pending add_norm_modulate"] += 1
            return getattr(_triton_ops, name)(*args, **kwargs)
        return call

    names = ("ssm_step_", "conv_step_", "conv_ssm_step_", "add_norm_modulate", "in_proj_conv_step_")
    return SimpleNamespace(**{name: counted(name) for name in names})


def _use_kinds(monkeypatch, ops, kinds):
    """Route ``decode_ops`` of the backbone modules to ``ops`` for ``kinds`` (CPU tensors included)."""
    import aimkit.backbones.base as base_mod
    import aimkit.backbones.mamba2 as mamba_mod

    lookup = lambda x, kind: ops if kind in kinds else None  # noqa: E731
    monkeypatch.setattr(base_mod, "decode_ops", lookup)
    monkeypatch.setattr(mamba_mod, "decode_ops", lookup)


_COUNTED = ("ssm_step_", "conv_step_", "conv_ssm_step_", "add_norm_modulate", "folded ssm_step_",
            "pending add_norm_modulate", "in_proj_conv_step_")  # kernel calls the backbone tests count


def _prefill_then_steps(net, xs, mods, prefill: int):
    """Outputs (B, L, D) of a prefill of ``xs[:, :prefill]`` then one decode step per later position."""
    batch, length = xs.shape[:2]
    params = InferenceParams(max_seqlen=length + 1, max_batch_size=batch,
                             position=torch.zeros((), dtype=torch.long, device=DEVICE))
    params.key_value_memory_dict = net.allocate_inference_cache(batch, length + 1)
    outs = [net(xs[:, :prefill], mods, inference_params=params)]
    params.advance(prefill)
    for t in range(prefill, length):
        outs.append(net.step(xs[:, t:t + 1], mods, params))
        params.advance(1)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("kind,kinds,overrides,folds", [
    ("mamba2", _fused.KINDS, {}, True),  # conv_step_, ssm_step_, the gated norm folded into it and the glue
    ("mamba2", ("ssm", "conv-in-ssm", "norm", "gnorm"), {}, True),  # conv inside the state kernel
    ("mamba2", _fused.KINDS + ("proj-conv",), {}, True),  # a float32 model: proj-conv falls back to conv_step_
    ("mamba2", _NO_GNORM, {}, False),
    ("mamba2", _fused.KINDS, {"ngroups": 2}, False),  # two norm groups: not foldable
    ("mamba2", ("conv", "norm"), {}, False),  # conv_step_, then the PyTorch state update
    ("mamba2", ("ssm", "norm"), {}, False),  # the PyTorch ring convolution, then ssm_step_
    ("transformer", _fused.KINDS, {}, False),
])
def test_fused_backbone_step_matches_unfused(kind, kinds, overrides, folds, monkeypatch):
    """Backbone.step with the kernels equals the unfused step over several positions (a prefill of
    two, then steps around the conv ring and past it)."""
    torch.manual_seed(0)
    if kind == "mamba2":
        net = Mamba2Backbone(32, 2, Mamba2Config(d_state=16, headdim=8, **overrides))
    else:
        net = TransformerBackbone(32, 2, TransformerConfig(n_head=4))
    net = net.to(DEVICE)
    _randomize(net, 3)
    batch = 3
    mods = [torch.randn(batch, net.mod_chunks, 32, device=DEVICE) * 0.5 for _ in range(2)]
    prefill, steps = 2, 5
    xs = torch.randn(batch, prefill + steps, 32, device=DEVICE)
    calls = dict.fromkeys(_COUNTED, 0)
    ops = _counted_ops(calls)

    def run(fused: bool):
        _use_kinds(monkeypatch, ops, kinds if fused else ())
        return _prefill_then_steps(net, xs, mods, prefill)

    with torch.no_grad():
        unfused = run(False)
        assert not any(calls.values())
        fused = run(True)
    torch.testing.assert_close(fused, unfused, atol=2e-5, rtol=2e-5)
    sublayers = 1 if kind == "mamba2" else 2
    assert calls["add_norm_modulate"] == steps * (2 * sublayers + 1)  # steps x (sublayers + final norm)
    mixer_steps = steps * 2 if kind == "mamba2" else 0  # 2 layers
    in_state_kernel = {"ssm", "conv-in-ssm"} <= set(kinds)
    assert calls["conv_ssm_step_"] == (mixer_steps if in_state_kernel else 0)
    assert calls["ssm_step_"] == (mixer_steps if "ssm" in kinds and not in_state_kernel else 0)
    conv_kernel = "conv" in kinds and not in_state_kernel
    assert calls["conv_step_"] == (mixer_steps if conv_kernel else 0)
    assert calls["in_proj_conv_step_"] == 0  # float32: in_proj stays cuBLAS / torch
    # folded: every mixer output carries its row factor into the next glue kernel
    assert calls["folded ssm_step_"] == calls["pending add_norm_modulate"] == (mixer_steps if folds else 0)


@pytest.mark.parametrize("kinds,overrides", [
    (_fused.KINDS + ("proj-conv",), {}),  # in_proj_conv_step_, then the folded ssm_step_ and the glue
    (("proj-conv", "norm"), {"bias": True}),  # in_proj and conv1d biases; the PyTorch state update
    (("ssm", "conv", "conv-in-ssm", "proj-conv"), {}),  # conv-in-ssm wins: in_proj stays unfused
])
def test_fused_bf16_backbone_step_with_proj_conv(kinds, overrides, monkeypatch):
    """A bf16 Mamba2 backbone decoding with in_proj_conv_step_ (kind proj-conv) matches the unfused
    bf16 step within bf16 rounding; the conv kernel does not run beside it."""
    torch.manual_seed(0)
    net = Mamba2Backbone(32, 2, Mamba2Config(d_state=16, headdim=8, **overrides)).to(DEVICE)
    _randomize(net, 3)
    net = net.to(torch.bfloat16)
    batch, prefill, steps = 3, 2, 5
    mods = [(torch.randn(batch, net.mod_chunks, 32, device=DEVICE) * 0.5).bfloat16() for _ in range(2)]
    xs = torch.randn(batch, prefill + steps, 32, device=DEVICE).bfloat16()
    calls = dict.fromkeys(_COUNTED, 0)
    ops = _counted_ops(calls)

    def run(fused: bool):
        _use_kinds(monkeypatch, ops, kinds if fused else ())
        return _prefill_then_steps(net, xs, mods, prefill).float()

    with torch.no_grad():
        unfused = run(False)
        fused = run(True)
    # bf16 through two layers: a few ulps (outputs up to ~5); in Triton's interpreter every
    # projection is also truncated to bf16 (the GPU rounds), a bias the unfused path does not have
    torch.testing.assert_close(fused, unfused, atol=1e-1, rtol=2e-2)
    mixer_steps = steps * 2  # 2 layers
    in_state_kernel = "conv-in-ssm" in kinds
    assert calls["in_proj_conv_step_"] == (0 if in_state_kernel else mixer_steps)
    assert calls["conv_ssm_step_"] == (mixer_steps if in_state_kernel else 0)
    assert calls["conv_step_"] == 0


@pytest.mark.parametrize("overrides,folds", [({}, True), ({"bias": True}, False), ({"ngroups": 2}, False)])
def test_mamba2_step_folds_gated_norm(overrides, folds, monkeypatch):
    """Mamba2.step_unnormed leaves the gated norm's row factor pending only where it commutes with
    out_proj (one norm group, no bias); Mamba2.step applies it and equals the unfused step."""
    torch.manual_seed(0)
    mixer = Mamba2(32, layer_idx=0, config=Mamba2Config(d_state=16, headdim=8, **overrides)).to(DEVICE)
    _randomize(mixer, 4)
    batch = 2
    xs = torch.randn(batch, 4, 32, device=DEVICE)
    calls = dict.fromkeys(("ssm_step_", "conv_step_", "conv_ssm_step_", "add_norm_modulate", "folded ssm_step_",
                           "pending add_norm_modulate"), 0)
    ops = _counted_ops(calls)

    def run(kinds, unnormed: bool, pends: bool = False):
        _use_kinds(monkeypatch, ops, kinds)
        params = InferenceParams(max_seqlen=8, max_batch_size=batch)
        params.key_value_memory_dict = {0: mixer.allocate_inference_cache(batch, 8)}
        outs = []
        for t in range(xs.shape[1]):
            if unnormed:
                out, pending = mixer.step_unnormed(xs[:, t:t + 1], params)
                assert (pending is not None) == pends
                if pending is not None:
                    assert pending.partials.shape[0] == batch and pending.partials.dtype == torch.float32
                    assert pending.dim == 64 and pending.eps == mixer.norm.eps
                    normed = pending.apply(out)
                    assert not torch.allclose(normed, out, atol=1e-3)  # the factor matters
                    out = normed
            else:
                out = mixer.step(xs[:, t:t + 1], params)
            outs.append(out)
            params.advance(1)
        return torch.cat(outs, dim=1), params.key_value_memory_dict[0][1].clone()

    with torch.no_grad():
        reference, ref_state = run((), unnormed=False)
        for unnormed in (False, True):
            out, state = run(_fused.KINDS, unnormed, pends=folds)
            torch.testing.assert_close(out, reference, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=1e-5)
        assert calls["folded ssm_step_"] == (2 * 4 if folds else 0)
        out, _ = run(_NO_GNORM, unnormed=True, pends=False)  # gnorm switched off: nothing pending
        torch.testing.assert_close(out, reference, atol=2e-5, rtol=2e-5)


def test_pdl_only_on_hopper_cuda_when_asked(monkeypatch):
    monkeypatch.setenv("AIMKIT_DECODE_KERNELS", "ssm,conv,norm,gnorm,pdl")
    assert not _triton_ops._pdl(torch.zeros(1))  # a CPU tensor never launches with PDL
    monkeypatch.setenv("AIMKIT_DECODE_KERNELS", "all")
    assert "pdl" not in _fused.enabled_kinds()  # opt-in


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs a Hopper GPU")
def test_pdl_launches_give_the_same_results(monkeypatch):
    """The three kernels launched with PDL, in a stream of dependent launches, equal plain launches."""
    def run():
        state, x, dt, dt_bias, A_log, B, C, D = _ssm_inputs(64, 4, 16, 1, 32, torch.bfloat16)
        xbc = torch.cat([x.flatten(1), B.flatten(1), C.flatten(1)], dim=1).contiguous()
        ring = torch.randn(64, 4, xbc.shape[1], generator=torch.Generator().manual_seed(3)).to(DEVICE).transpose(1, 2)
        weight = torch.randn(xbc.shape[1], 4, generator=torch.Generator().manual_seed(4)).to(DEVICE)
        position = torch.tensor(5, device=DEVICE)
        outs = []
        for _ in range(3):  # back-to-back dependent launches
            conv = _triton_ops.conv_step_(xbc, ring, weight, None, position)
            xs = conv[:, :64].unflatten(-1, (4, 16))
            y = _triton_ops.ssm_step_(state, xs, dt, dt_bias, A_log, conv[:, 64:96].unsqueeze(1),
                                      conv[:, 96:].unsqueeze(1), D)
            h, res = _triton_ops.add_norm_modulate(y.flatten(1), None, None, torch.ones(64, device=DEVICE), 1e-5)
            outs += [conv, y, h, res]
            xbc = conv.to(xbc.dtype).contiguous()
            position.add_(1)
        torch.cuda.synchronize()
        return outs + [state, ring]

    monkeypatch.setenv("AIMKIT_DECODE_KERNELS", "all")
    plain = run()
    monkeypatch.setenv("AIMKIT_DECODE_KERNELS", "ssm,conv,norm,gnorm,pdl")
    with_pdl = run()
    for a, b in zip(with_pdl, plain):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
