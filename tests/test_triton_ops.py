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

    return SimpleNamespace(**{name: counted(name) for name in ("ssm_step_", "conv_step_", "add_norm_modulate")})


def _use_kinds(monkeypatch, ops, kinds):
    """Route ``decode_ops`` of the backbone modules to ``ops`` for ``kinds`` (CPU tensors included)."""
    import aimkit.backbones.base as base_mod
    import aimkit.backbones.mamba2 as mamba_mod

    lookup = lambda x, kind: ops if kind in kinds else None  # noqa: E731
    monkeypatch.setattr(base_mod, "decode_ops", lookup)
    monkeypatch.setattr(mamba_mod, "decode_ops", lookup)


@pytest.mark.parametrize("kind,kinds,overrides,folds", [
    ("mamba2", _fused.KINDS, {}, True),  # the gated norm folded into ssm_step_ and the glue
    ("mamba2", _NO_GNORM, {}, False),
    ("mamba2", _fused.KINDS, {"ngroups": 2}, False),  # two norm groups: not foldable
    ("transformer", _fused.KINDS, {}, False),
])
def test_fused_backbone_step_matches_unfused(kind, kinds, overrides, folds, monkeypatch):
    """Backbone.step with the kernels equals the unfused step over several positions."""
    torch.manual_seed(0)
    if kind == "mamba2":
        net = Mamba2Backbone(32, 2, Mamba2Config(d_state=16, headdim=8, **overrides))
    else:
        net = TransformerBackbone(32, 2, TransformerConfig(n_head=4))
    net = net.to(DEVICE)
    _randomize(net, 3)
    batch = 3
    mods = [torch.randn(batch, net.mod_chunks, 32, device=DEVICE) * 0.5 for _ in range(2)]
    xs = torch.randn(batch, 4, 32, device=DEVICE)
    calls = dict.fromkeys(("ssm_step_", "conv_step_", "add_norm_modulate", "folded ssm_step_",
                           "pending add_norm_modulate"), 0)
    ops = _counted_ops(calls)

    def run(fused: bool):
        _use_kinds(monkeypatch, ops, kinds if fused else ())
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
        assert not any(calls.values())
        fused = run(True)
    torch.testing.assert_close(fused, unfused, atol=2e-5, rtol=2e-5)
    sublayers = 1 if kind == "mamba2" else 2
    assert calls["add_norm_modulate"] == 3 * (2 * sublayers + 1)  # 3 steps x (sublayers + final norm)
    assert calls["ssm_step_"] == calls["conv_step_"] == (3 * 2 if kind == "mamba2" else 0)
    # folded: every mixer output (3 steps x 2 layers) carries its row factor into the next glue kernel
    assert calls["folded ssm_step_"] == calls["pending add_norm_modulate"] == (3 * 2 if folds else 0)


@pytest.mark.parametrize("overrides,folds", [({}, True), ({"bias": True}, False), ({"ngroups": 2}, False)])
def test_mamba2_step_folds_gated_norm(overrides, folds, monkeypatch):
    """Mamba2.step_unnormed leaves the gated norm's row factor pending only where it commutes with
    out_proj (one norm group, no bias); Mamba2.step applies it and equals the unfused step."""
    torch.manual_seed(0)
    mixer = Mamba2(32, layer_idx=0, config=Mamba2Config(d_state=16, headdim=8, **overrides)).to(DEVICE)
    _randomize(mixer, 4)
    batch = 2
    xs = torch.randn(batch, 4, 32, device=DEVICE)
    calls = dict.fromkeys(("ssm_step_", "conv_step_", "add_norm_modulate", "folded ssm_step_",
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
