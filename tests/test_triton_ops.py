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
from aimkit.backbones.mamba2 import Mamba2Backbone, Mamba2Config  # noqa: E402
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


@pytest.mark.parametrize("tiles", [2, 3])
def test_ssm_step_programs_walking_several_tiles(tiles):
    """A program that walks several tiles (with a ragged last one) gives the same result."""
    state, x, dt, dt_bias, A_log, B, C, D = _ssm_inputs(2, 5, 8, 1, 16, torch.float32)
    y_ref, state_ref = ssd_recurrent_step(state.clone(), x, F.softplus(dt + dt_bias), -torch.exp(A_log), B, C, D)
    y = _triton_ops.ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, block_p=8, tiles=tiles, stages=2)
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


@pytest.mark.parametrize("channels_last,with_bias,width", [(True, True, 4), (False, True, 4), (True, False, 3)])
def test_conv_step_matches_window_reference(channels_last, with_bias, width):
    g = torch.Generator().manual_seed(4)
    rows, channels = 3, 40
    if channels_last:  # aimkit's cache layout: (R, W, C) storage seen as (R, C, W)
        state = torch.randn(rows, width, channels, generator=g).to(DEVICE).transpose(1, 2)
    else:
        state = torch.randn(rows, channels, width, generator=g).to(DEVICE)
    proj = torch.randn(rows, channels + 7, generator=g).to(DEVICE)
    x = proj[:, 5:5 + channels]  # a strided view, as the split of in_proj's output
    weight = torch.randn(channels, width, generator=g).to(DEVICE)
    bias = torch.randn(channels, generator=g).to(DEVICE) if with_bias else None
    window = torch.cat([state[..., 1:], x.unsqueeze(-1)], dim=-1)
    expected = F.silu((window * weight).sum(-1) + (bias if with_bias else 0.0))
    out = _triton_ops.conv_step_(x, state, weight, bias)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, window, atol=0, rtol=0)  # the window shifted in place, exactly
    with pytest.raises(ValueError, match="do not fit"):
        _triton_ops.conv_step_(x[:, :8], state, weight, bias)


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
    monkeypatch.setenv("AIMKIT_DECODE_KERNELS", "ssm,fast")
    with pytest.raises(ValueError, match="unknown kernel kinds"):
        _fused.enabled_kinds()
    monkeypatch.delenv("AIMKIT_DECODE_KERNELS")
    assert _fused.decode_ops(torch.zeros(1), "ssm") is None  # CPU tensors never take the kernels
    with pytest.raises(ValueError, match="unknown decode kernel kind"):
        _fused.decode_ops(torch.zeros(1), "scan")


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


@pytest.mark.parametrize("kind", ["mamba2", "transformer"])
def test_fused_backbone_step_matches_unfused(kind, monkeypatch):
    """Backbone.step with the kernels equals the unfused step over several positions."""
    import aimkit.backbones.base as base_mod
    import aimkit.backbones.mamba2 as mamba_mod

    torch.manual_seed(0)
    if kind == "mamba2":
        net = Mamba2Backbone(32, 2, Mamba2Config(d_state=16, headdim=8))
    else:
        net = TransformerBackbone(32, 2, TransformerConfig(n_head=4))
    net = net.to(DEVICE)
    _randomize(net, 3)
    batch = 3
    mods = [torch.randn(batch, net.mod_chunks, 32, device=DEVICE) * 0.5 for _ in range(2)]
    xs = torch.randn(batch, 4, 32, device=DEVICE)
    calls = {"ssm_step_": 0, "conv_step_": 0, "add_norm_modulate": 0}

    def counted(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return getattr(_triton_ops, name)(*args, **kwargs)
        return call

    ops = SimpleNamespace(**{name: counted(name) for name in calls})

    def run(fused: bool):
        lookup = (lambda x, kind: ops) if fused else (lambda x, kind: None)  # noqa: E731
        monkeypatch.setattr(base_mod, "decode_ops", lookup)
        monkeypatch.setattr(mamba_mod, "decode_ops", lookup)
        params = InferenceParams(max_seqlen=8, max_batch_size=batch,
                                 position=torch.zeros((), dtype=torch.long, device=DEVICE))
        params.key_value_memory_dict = net.allocate_inference_cache(batch, 8)
        outs = [net(xs[:, :1], mods, inference_params=params)]
        params.advance(1)
        for t in range(1, xs.shape[1]):
            outs.append(net.step(xs[:, t:t + 1], mods, params))
            params.advance(1)
        return torch.cat(outs, dim=1)

    with torch.no_grad():
        unfused = run(False)
        assert calls == {"ssm_step_": 0, "conv_step_": 0, "add_norm_modulate": 0}
        fused = run(True)
    torch.testing.assert_close(fused, unfused, atol=2e-5, rtol=2e-5)
    sublayers = 1 if kind == "mamba2" else 2
    assert calls["add_norm_modulate"] == 3 * (2 * sublayers + 1)  # 3 steps x (sublayers + final norm)
    assert calls["ssm_step_"] == calls["conv_step_"] == (3 * 2 if kind == "mamba2" else 0)
