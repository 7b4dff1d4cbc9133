"""Tests of the Mamba2 mixer and backbone (CPU, PyTorch path) and of the kernel loader."""

import importlib
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aimkit.backbones import _mamba_kernels
from aimkit.backbones._ssd import ssd_chunked, ssd_naive, ssd_recurrent_step
from aimkit.backbones.base import InferenceParams
from aimkit.backbones.mamba2 import GatedRMSNorm, Mamba2, Mamba2Backbone, Mamba2Config
from aimkit.errors import ConfigError
from aimkit.registry import BACKBONES

from conftest import assert_float_close

# official tensor names, shapes and counts (a copy of shared/reference/official_aim_state_dict.json)
OFFICIAL = Path(__file__).resolve().parent / "data" / "official_aim_state_dict.json"
TINY = Mamba2Config(d_state=16, headdim=8, chunk_size=8)
D_MODEL = 32


def _tiny_mixer(seed=0, dtype=torch.float32, **overrides):
    """A small mixer with every parameter perturbed away from its structured init."""
    torch.manual_seed(seed)
    fields = {**TINY.__dict__, **overrides}
    mixer = Mamba2(D_MODEL, layer_idx=0, config=Mamba2Config(**fields), dtype=dtype)
    with torch.no_grad():
        mixer.D.normal_()
        mixer.norm.weight.add_(0.2 * torch.randn_like(mixer.norm.weight))
        mixer.conv1d.bias.normal_(0, 0.2)
    return mixer.eval()


def _cache(module, batch, max_seqlen=32, dtype=None):
    params = InferenceParams(max_seqlen, batch, position=torch.zeros((), dtype=torch.long))
    if isinstance(module, Mamba2):
        params.key_value_memory_dict = {module.layer_idx: module.allocate_inference_cache(batch, max_seqlen, dtype)}
    else:
        params.key_value_memory_dict = module.allocate_inference_cache(batch, max_seqlen, dtype)
    return params


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


# ------------------------------------------------------------------------------------ parameters


# mamba.backbone.layers.0.mixer.* of the official AiM-B checkpoint (d_model 768)
OFFICIAL_AIM_B_MIXER = {
    "dt_bias": [24],
    "A_log": [24],
    "D": [24],
    "in_proj.weight": [3352, 768],
    "conv1d.weight": [1792, 1, 4],
    "conv1d.bias": [1792],
    "norm.weight": [1536],
    "out_proj.weight": [768, 1536],
}


def test_parameter_names_and_shapes_match_official_aim_b():
    mixer = Mamba2(768, layer_idx=0, device="meta")
    ours = {k: list(v.shape) for k, v in mixer.state_dict().items()}
    assert ours == OFFICIAL_AIM_B_MIXER
    assert mixer.nheads == 24 and mixer.conv_dim == 1792

    backbone = Mamba2Backbone(768, 2, device="meta")
    names = set(backbone.state_dict())
    assert {"layers.0.norm.weight", "layers.1.mixer.A_log", "norm_f.weight"} <= names
    assert backbone.mod_chunks == 3


def test_official_listing_agrees():
    official = json.loads(OFFICIAL.read_text())["models"]["AiM-B"]["state_dict"]
    prefix = "mamba.backbone.layers.0.mixer."
    listed = {k[len(prefix):]: list(v) for k, v in official.items() if k.startswith(prefix)}
    assert listed == OFFICIAL_AIM_B_MIXER


def test_initialisation_follows_mamba_ssm():
    cfg = Mamba2Config()
    mixer = Mamba2(64, layer_idx=3, config=cfg)
    dt = F.softplus(mixer.dt_bias)
    assert ((dt >= cfg.dt_min * (1 - 1e-5)) & (dt <= cfg.dt_max * (1 + 1e-5))).all()
    A = torch.exp(mixer.A_log)
    assert ((A >= cfg.A_init_range[0]) & (A <= cfg.A_init_range[1])).all()
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    assert torch.equal(mixer.norm.weight, torch.ones_like(mixer.norm.weight))
    for p in (mixer.dt_bias, mixer.A_log, mixer.D):
        assert p._no_weight_decay is True
    low = Mamba2(64, layer_idx=0, dtype=torch.bfloat16)
    assert low.in_proj.weight.dtype == torch.bfloat16 and low.D.dtype == torch.float32


def test_config_validation():
    with pytest.raises(ConfigError, match="use_kernels"):
        Mamba2Config(use_kernels="sometimes")
    with pytest.raises(ConfigError, match="state_dtype"):
        Mamba2Config(state_dtype="bf16")
    with pytest.raises(ConfigError, match="A_init_range"):
        Mamba2Config(A_init_range=(0, 4))
    with pytest.raises(ConfigError, match="headdim"):
        Mamba2(30, layer_idx=0, config=Mamba2Config(headdim=8))
    with pytest.raises(ConfigError, match="ngroups"):
        Mamba2(32, layer_idx=0, config=Mamba2Config(headdim=16, ngroups=3))


# ------------------------------------------------------------------------------------ SSD maths


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


def test_gated_rmsnorm_groups():
    norm = GatedRMSNorm(8, group_size=4, eps=0.0)
    x, z = torch.randn(3, 8), torch.randn(3, 8)
    out = norm(x, z)
    h = (x * F.silu(z)).view(3, 2, 4)
    assert torch.allclose(out.view(3, 2, 4).pow(2).mean(-1), torch.ones(3, 2), atol=1e-5)
    assert torch.allclose(out.view(3, 2, 4), h / h.pow(2).mean(-1, keepdim=True).sqrt(), atol=1e-6)


# ------------------------------------------------------------------------------------ mixer


def _decode(mixer, x, prefills, dtype=None):
    """Prefill the given chunk lengths through forward(..., inference_params), step the rest."""
    params = _cache(mixer, x.shape[0], dtype=dtype)
    outs, pos = [], 0
    for n in prefills:
        outs.append(mixer(x[:, pos:pos + n], inference_params=params))
        params.advance(n)
        pos += n
    while pos < x.shape[1]:
        outs.append(mixer.step(x[:, pos:pos + 1], params))
        params.advance()
        pos += 1
    return torch.cat(outs, dim=1), params


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("prefills", [(1,), (2,), (5,), (9,), (7, 6), (3, 2), (2, 1, 6)])
def test_forward_matches_cached_decoding(ngroups, prefills):
    mixer = _tiny_mixer(ngroups=ngroups)
    x = torch.randn(2, 20, D_MODEL)
    with torch.no_grad():
        full = mixer(x)
        decoded, params = _decode(mixer, x, prefills)
    assert full.shape == x.shape
    assert (decoded - full).abs().max().item() <= 1e-5

    # the cached states equal those of a single prefill over the whole sequence
    with torch.no_grad():
        ref = _cache(mixer, 2)
        mixer(x, inference_params=ref)
    for got, want in zip(params.key_value_memory_dict[0], ref.key_value_memory_dict[0]):
        assert (got - want).abs().max().item() <= 1e-5


def test_float64_model_with_model_dtype_state_is_exact():
    mixer = _tiny_mixer(dtype=torch.float64, state_dtype="model")
    x = torch.randn(1, 13, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        decoded, params = _decode(mixer, x, (3,))
        full = mixer(x)
    assert params.key_value_memory_dict[0][1].dtype == torch.float64
    assert (decoded - full).abs().max().item() <= 1e-12


def test_prefill_conv_state_is_zero_padded_for_short_prompts():
    """Two positions of a width-4 conv: slots 0 and 1 hold them, slots 2 and 3 (positions -2, -1) zeros."""
    mixer = _tiny_mixer()
    params = _cache(mixer, 1)
    x = torch.randn(1, 2, D_MODEL)
    with torch.no_grad():
        mixer(x, inference_params=params)
        xBC = mixer.in_proj(x)[..., mixer.d_inner:mixer.d_inner + mixer.conv_dim]  # (1, 2, conv_dim)
    conv_state = params.key_value_memory_dict[0][0]
    assert torch.equal(conv_state[..., 2:], torch.zeros_like(conv_state[..., 2:]))
    assert torch.allclose(conv_state[..., :2], xBC.transpose(1, 2))


def _ring_reference(xBC, end, width):
    """The ring after positions [0, end) of xBC (B, L, C): slot k holds the latest position q < end
    with q % width == k, zeros where that q < 0. -> (B, C, width)."""
    ring = torch.zeros(xBC.shape[0], xBC.shape[2], width, dtype=xBC.dtype)
    for k in range(width):
        q = end - 1 - (end - 1 - k) % width  # the latest q <= end - 1 with q % width == k
        if q >= 0:
            ring[..., k] = xBC[:, q]
    return ring


@pytest.mark.parametrize("prefills", [(1,), (3,), (4,), (6,), (3, 2), (5, 3), (2, 1, 6), (4, 4)])
def test_prefill_conv_state_is_a_ring_by_position(prefills):
    """After prefills ending at position ``end``, conv_state[..., q % d_conv] holds input q for the
    last d_conv positions q (zeros before the sequence), however the prefix was split."""
    mixer = _tiny_mixer()
    seqlen = sum(prefills)
    x = torch.randn(2, seqlen, D_MODEL)
    params = _cache(mixer, 2)
    with torch.no_grad():
        xBC = mixer.in_proj(x)[..., mixer.d_inner:mixer.d_inner + mixer.conv_dim]  # (2, L, conv_dim)
        pos = 0
        for n in prefills:
            mixer(x[:, pos:pos + n], inference_params=params)
            params.advance(n)
            pos += n
    conv_state = params.key_value_memory_dict[0][0]
    # the slots are placed by position; their values come from differently shaped matmuls (prefill
    # chunks against the whole sequence), so they agree up to rounding, not bit for bit
    assert_float_close(conv_state, _ring_reference(xBC, seqlen, TINY.d_conv))


def test_step_reads_the_device_position():
    """The decode step finds its ring slot from inference_params.position (what a CUDA graph
    captures), not from the host offset; without a position tensor it uses the host offset."""
    mixer = _tiny_mixer()
    x = torch.randn(2, 10, D_MODEL)
    with torch.no_grad():
        full = mixer(x)
        params = _cache(mixer, 2)
        mixer(x[:, :3], inference_params=params)
        params.advance(3)
        outs = []
        for t in range(3, 10):
            outs.append(mixer.step(x[:, t:t + 1], params))
            params.position.add_(1)  # seqlen_offset stays at 3
        torch.testing.assert_close(torch.cat(outs, 1), full[:, 3:], atol=1e-5, rtol=1e-5)

        host_only = InferenceParams(32, 2)  # no position tensor
        host_only.key_value_memory_dict = {0: mixer.allocate_inference_cache(2, 32)}
        mixer(x[:, :3], inference_params=host_only)
        host_only.advance(3)
        outs = []
        for t in range(3, 10):
            outs.append(mixer.step(x[:, t:t + 1], host_only))
            host_only.advance()
        torch.testing.assert_close(torch.cat(outs, 1), full[:, 3:], atol=1e-5, rtol=1e-5)


def test_step_updates_cache_in_place():
    mixer = _tiny_mixer()
    params = _cache(mixer, 3)
    conv_state, ssm_state = params.key_value_memory_dict[0]
    ptrs = (conv_state.data_ptr(), ssm_state.data_ptr())
    with torch.no_grad():
        mixer(torch.randn(3, 4, D_MODEL), inference_params=params)
        params.advance(4)
        before = ssm_state.clone()
        out = mixer.step(torch.randn(3, 1, D_MODEL), params)
    assert out.shape == (3, 1, D_MODEL)
    assert params.key_value_memory_dict[0][0] is conv_state and params.key_value_memory_dict[0][1] is ssm_state
    assert (conv_state.data_ptr(), ssm_state.data_ptr()) == ptrs
    assert not torch.equal(before, ssm_state)


def test_smaller_batch_uses_the_leading_cache_rows():
    mixer = _tiny_mixer()
    x = torch.randn(2, 10, D_MODEL)
    params = _cache(mixer, 4)
    with torch.no_grad():
        mixer(x[:, :6], inference_params=params)
        params.advance(6)
        outs = []
        for t in range(6, 10):
            outs.append(mixer.step(x[:, t:t + 1], params))
            params.advance()
        full = mixer(x)
    assert (torch.cat(outs, 1) - full[:, 6:]).abs().max().item() <= 1e-5
    assert torch.equal(params.key_value_memory_dict[0][1][2:], torch.zeros_like(params.key_value_memory_dict[0][1][2:]))
    with pytest.raises(ValueError, match="exceeds"):
        mixer(torch.randn(5, 2, D_MODEL), inference_params=params)


def test_allocate_inference_cache():
    mixer = Mamba2(D_MODEL, layer_idx=0, config=TINY)
    conv_state, ssm_state = mixer.allocate_inference_cache(5, 64)
    assert conv_state.shape == (5, mixer.conv_dim, TINY.d_conv) and conv_state.stride(1) == 1
    assert ssm_state.shape == (5, mixer.nheads, TINY.headdim, TINY.d_state)
    assert ssm_state.dtype == torch.float32 and not conv_state.any() and not ssm_state.any()
    conv16, ssm32 = mixer.allocate_inference_cache(2, 8, dtype=torch.bfloat16)
    assert conv16.dtype == torch.bfloat16 and ssm32.dtype == torch.float32
    model_state = Mamba2(D_MODEL, layer_idx=0, config=Mamba2Config(**{**TINY.__dict__, "state_dtype": "model"}))
    assert model_state.allocate_inference_cache(2, 8, dtype=torch.bfloat16)[1].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="no inference cache"):
        mixer.step(torch.randn(1, 1, D_MODEL), InferenceParams(8, 1))


def test_backward_gradients_are_finite():
    mixer = _tiny_mixer(ngroups=2).train()
    x = torch.randn(2, 19, D_MODEL, requires_grad=True)
    mixer(x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in mixer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_use_kernels_always_on_cpu_raises():
    mixer = _tiny_mixer(use_kernels="always")
    with pytest.raises(ConfigError, match="needs CUDA inputs"):
        mixer(torch.randn(1, 4, D_MODEL))
    with pytest.raises(ConfigError, match="needs CUDA inputs"):
        mixer.step(torch.randn(1, 1, D_MODEL), _cache(mixer, 1))


def test_cpu_path_never_loads_kernels(monkeypatch):
    def forbidden():
        raise AssertionError("the CPU path must not import the kernels")

    already = {"mamba_ssm", "causal_conv1d", "triton"} & set(sys.modules)
    monkeypatch.setattr(_mamba_kernels, "load_kernels", forbidden)
    mixer = _tiny_mixer()
    x = torch.randn(1, 6, D_MODEL, requires_grad=True)
    _decode(mixer, x.detach(), (3,))
    mixer(x).sum().backward()
    assert {"mamba_ssm", "causal_conv1d", "triton"} & set(sys.modules) == already


# ------------------------------------------------------------------------------------ backbone


def test_backbone_registered_and_decodes():
    assert BACKBONES.get("mamba2") is Mamba2Backbone
    assert Mamba2Backbone.config_cls is Mamba2Config
    torch.manual_seed(0)
    backbone = Mamba2Backbone(D_MODEL, 2, config=TINY).eval()
    x = torch.randn(2, 11, D_MODEL)
    mods = [0.1 * torch.randn(2, 3, D_MODEL) for _ in range(2)]
    params = _cache(backbone, 2)
    with torch.no_grad():
        full = backbone(x, mods)
        outs = [backbone(x[:, :4], mods, inference_params=params)]
        params.advance(4)
        for t in range(4, 11):
            outs.append(backbone.step(x[:, t:t + 1], mods, params))
            params.advance()
    assert (torch.cat(outs, 1) - full).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------ kernel loader


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """An isolated import world: fake packages under tmp_path, module cache restored afterwards."""
    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] in ("mamba_ssm", "causal_conv1d")}
    for name in saved:
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(tmp_path))
    _mamba_kernels._reset_for_tests()
    yield tmp_path
    for name in [n for n in sys.modules if n.split(".")[0] in ("mamba_ssm", "causal_conv1d")]:
        del sys.modules[name]
    sys.modules.update(saved)
    _mamba_kernels._reset_for_tests()


def _write_fake_mamba(root: Path, init_source: str) -> None:
    files = {
        "mamba_ssm/__init__.py": init_source,
        "mamba_ssm/ops/__init__.py": "",
        "mamba_ssm/ops/triton/__init__.py": "",
        "mamba_ssm/ops/triton/ssd_combined.py": ("def mamba_chunk_scan_combined(*a, **k):\n    return 'scan'\n\n"
                                                 "def mamba_split_conv1d_scan_combined(*a, **k):\n    return 'mixer'\n"),
        "mamba_ssm/ops/triton/selective_state_update.py": "def selective_state_update(*a, **k):\n    return 'step'\n",
        "mamba_ssm/ops/triton/layernorm_gated.py": "def rmsnorm_fn(*a, **k):\n    return 'norm'\n",
        "causal_conv1d/__init__.py": "def causal_conv1d_fn(*a, **k):\n    pass\n\ndef causal_conv1d_update(*a, **k):\n    pass\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    importlib.invalidate_caches()


def test_loader_bypasses_missing_compiled_extension(fresh_loader):
    # like mamba-ssm 2.3.2.post1 built without CUDA: __init__ imports submodules, then the extension
    _write_fake_mamba(fresh_loader, "from mamba_ssm.ops.triton import layernorm_gated\nimport selective_scan_cuda\n")
    kernels = _mamba_kernels.load_kernels()
    assert kernels is not None
    assert kernels.mamba_chunk_scan_combined() == "scan" and kernels.rmsnorm_fn() == "norm"
    assert kernels.causal_conv1d_fn is not None and kernels.causal_conv1d_update is not None
    info = _mamba_kernels.kernel_info()
    assert info["available"] and info["bare_package"] and all(info["kernels"].values())
    package = sys.modules["mamba_ssm"]
    assert package.ops.triton.layernorm_gated is sys.modules["mamba_ssm.ops.triton.layernorm_gated"]
    assert not hasattr(package, "Mamba")


def test_loader_uses_a_working_package_normally(fresh_loader):
    _write_fake_mamba(fresh_loader, "Mamba = 'mamba-1'\n")
    assert _mamba_kernels.kernels_available()
    assert _mamba_kernels.kernel_info()["bare_package"] is False
    assert sys.modules["mamba_ssm"].Mamba == "mamba-1"


def test_loader_does_not_mask_other_import_errors(fresh_loader):
    _write_fake_mamba(fresh_loader, "import some_other_missing_dependency\n")
    with pytest.warns(UserWarning, match="some_other_missing_dependency"):
        assert _mamba_kernels.load_kernels() is None
    info = _mamba_kernels.kernel_info()
    assert not info["available"] and not info["bare_package"] and "some_other_missing" in info["error"]


def test_loader_is_silent_when_mamba_ssm_is_absent(fresh_loader, monkeypatch):
    class _Hide:  # make mamba_ssm unimportable even where it is installed
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] == "mamba_ssm":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(sys, "meta_path", [_Hide, *sys.meta_path])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _mamba_kernels.load_kernels() is None
    assert not _mamba_kernels.kernels_available()
    assert "ModuleNotFoundError" in _mamba_kernels.kernel_info()["error"]


# ------------------------------------------------------------------------------------ GPU kernels


@pytest.fixture
def cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not _mamba_kernels.kernels_available():
        pytest.skip(f"mamba-ssm kernels unavailable: {_mamba_kernels.kernel_info().get('error')}")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("ngroups,split_scan", [(1, False), (2, False), (1, True), (2, True)])
def test_kernel_path_matches_reference(cuda_kernels, ngroups, split_scan):
    kernel = _tiny_mixer(ngroups=ngroups, use_kernels="always", chunk_size=16, fused_split_scan=split_scan).cuda()
    if split_scan and _mamba_kernels.load_kernels().causal_conv1d_fn is None:
        pytest.skip("fused_split_scan needs causal-conv1d")
    assert kernel._split_scan_usable(_mamba_kernels.load_kernels()) == split_scan
    ref = _tiny_mixer(ngroups=ngroups, use_kernels="never", chunk_size=16, dtype=torch.float64).cuda()
    ref.load_state_dict(kernel.state_dict())
    x = torch.randn(2, 40, D_MODEL, device="cuda")
    runs = []
    for mixer, xin in ((kernel, x), (ref, x.double())):
        xin = xin.clone().requires_grad_()
        out = mixer(xin)
        out.backward(torch.ones_like(out))
        runs.append((out, xin.grad, {n: p.grad for n, p in mixer.named_parameters()}))
    (out, dx, grads), (out_ref, dx_ref, grads_ref) = runs
    assert _rel(out, out_ref) < 1e-3 and _rel(dx, dx_ref) < 1e-3  # Triton dots run in tf32
    for name, grad in grads.items():
        assert _rel(grad, grads_ref[name]) < 1e-2, name


@pytest.mark.gpu
def test_kernel_decode_and_cuda_graph_step(cuda_kernels):
    mixer = _tiny_mixer(use_kernels="always", chunk_size=16).cuda()
    x = torch.randn(2, 24, D_MODEL, device="cuda")
    with torch.no_grad():
        full = mixer(x)
        params = InferenceParams(32, 2, position=torch.zeros((), dtype=torch.long, device="cuda"))
        params.key_value_memory_dict = {0: mixer.allocate_inference_cache(2, 32)}
        outs = [mixer(x[:, :20], inference_params=params)]
        params.advance(20)
        cache = params.key_value_memory_dict[0]
        snapshot = [t.clone() for t in cache]
        static_x = x[:, 20:21].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            mixer.step(static_x, params)  # warm-up (compiles) outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = mixer.step(static_x, params)
        for t, s in zip(cache, snapshot):
            t.copy_(s)
        for t in range(20, 24):
            static_x.copy_(x[:, t:t + 1])
            graph.replay()  # reads the device position: the conv ring slot moves with it
            outs.append(static_out.clone())
            params.advance(1)
    assert _rel(torch.cat(outs, 1), full) < 1e-3


@pytest.mark.parametrize("kind", ["mamba2", "transformer"])
def test_prefill_first_equals_forward_from_a_dirty_cache(kind):
    """The class-token prefill through the step path equals the chunked forward, whatever the cache held."""
    from aimkit.backbones.transformer import TransformerBackbone, TransformerConfig

    torch.manual_seed(0)
    if kind == "mamba2":
        net = Mamba2Backbone(D_MODEL, 2, Mamba2Config(d_state=16, headdim=8))
    else:
        net = TransformerBackbone(D_MODEL, 2, TransformerConfig(n_head=4))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    mods = [torch.randn(3, net.mod_chunks, D_MODEL) * 0.3 for _ in range(2)]
    x = torch.randn(3, 1, D_MODEL)

    def fresh():
        params = InferenceParams(max_seqlen=8, max_batch_size=3, position=torch.zeros((), dtype=torch.long))
        params.key_value_memory_dict = net.allocate_inference_cache(3, 8)
        return params

    with torch.no_grad():
        ref_params = fresh()
        ref = net(x, mods, inference_params=ref_params)
        params = fresh()
        for ts in params.key_value_memory_dict.values():  # garbage from an earlier run
            for t in ts:
                t.normal_()
        out = net.prefill_first(x, mods, params)
        params.advance(1)
        with pytest.raises(ValueError, match="starts a sequence"):
            net.prefill_first(x, mods, params)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if kind == "mamba2":
        for i, ts in ref_params.key_value_memory_dict.items():
            for a, b in zip(ts, params.key_value_memory_dict[i]):
                torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
