"""Tests of the Mamba2 mixer and backbone: the PyTorch path on CPU, the decode kernels chosen by
the execution policy (in Triton's interpreter on CPU), and the mamba-ssm path on the GPU."""

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the decode kernels run in Triton's interpreter on CPU: set before
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton is imported (torch may import it itself)

from conftest import assert_float_close  # noqa: E402

from aimkit.backbones.base import InferenceParams  # noqa: E402
from aimkit.backbones.mamba2 import GatedRMSNorm, Mamba2, Mamba2Backbone, Mamba2Config  # noqa: E402
from aimkit.errors import ConfigError  # noqa: E402
from aimkit.kernels import mamba_ssm  # noqa: E402
from aimkit.policy import ExecutionPolicy, default_policy  # noqa: E402
from aimkit.registry import BACKBONES  # noqa: E402

# official tensor names, shapes and counts (a copy of shared/reference/official_aim_state_dict.json)
OFFICIAL = Path(__file__).resolve().parent / "data" / "official_aim_state_dict.json"
TINY = Mamba2Config(d_state=16, headdim=8)
REFERENCE = ExecutionPolicy.reference(chunk_size=8)  # every operation in PyTorch, chunks of 8
D_MODEL = 32


def _tiny_mixer(seed=0, dtype=torch.float32, policy=REFERENCE, **overrides):
    """A small mixer with every parameter perturbed away from its structured init."""
    torch.manual_seed(seed)
    fields = {**TINY.__dict__, **overrides}
    mixer = Mamba2(D_MODEL, layer_idx=0, config=Mamba2Config(**fields), dtype=dtype, policy=policy)
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
    for removed in ("use_kernels", "state_dtype", "chunk_size", "fused_split_scan"):  # execution, not architecture
        with pytest.raises(TypeError, match=removed):
            Mamba2Config(**{removed: None})
    with pytest.raises(ConfigError, match="state_dtype"):
        ExecutionPolicy(state_dtype="bf16")
    with pytest.raises(ConfigError, match="A_init_range"):
        Mamba2Config(A_init_range=(0, 4))
    with pytest.raises(ConfigError, match="headdim"):
        Mamba2(30, layer_idx=0, config=Mamba2Config(headdim=8))
    with pytest.raises(ConfigError, match="ngroups"):
        Mamba2(32, layer_idx=0, config=Mamba2Config(headdim=16, ngroups=3))


# ------------------------------------------------------------------------------------ gated norm


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
    mixer = _tiny_mixer(dtype=torch.float64, policy=REFERENCE.replace(state_dtype="model"))
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
    conv16, ssm16 = mixer.allocate_inference_cache(2, 8, dtype=torch.bfloat16)  # default: the model's dtype
    assert conv16.dtype == torch.bfloat16 and ssm16.dtype == torch.bfloat16
    float_state = Mamba2(D_MODEL, layer_idx=0, config=TINY, policy=ExecutionPolicy(state_dtype="float32"))
    assert float_state.allocate_inference_cache(2, 8, dtype=torch.bfloat16)[1].dtype == torch.float32
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


def test_policy_kernel_on_cpu_raises():
    for op in ("scan", "state_update", "conv_step"):
        mixer = _tiny_mixer(policy=REFERENCE.replace(**{op: "kernel"}))
        with pytest.raises(ConfigError, match=f"policy {op}='kernel' needs CUDA"):
            if op == "scan":
                mixer(torch.randn(1, 4, D_MODEL))
            else:
                mixer.step(torch.randn(1, 1, D_MODEL), _cache(mixer, 1))


def test_cpu_path_never_loads_kernels():
    """The default policy on CPU tensors: the PyTorch path, without importing a kernel package."""
    already = {"mamba_ssm", "causal_conv1d", "triton"} & set(sys.modules)
    mamba_ssm._reset_for_tests()  # forget any earlier load: the loader must not run at all here
    mixer = _tiny_mixer(policy=ExecutionPolicy(chunk_size=8))
    x = torch.randn(1, 6, D_MODEL, requires_grad=True)
    _decode(mixer, x.detach(), (3,))
    mixer(x).sum().backward()
    assert not mamba_ssm._loaded
    assert {"mamba_ssm", "causal_conv1d", "triton"} & set(sys.modules) == already


# ------------------------------------------------------------------------------------ backbone


def test_backbone_registered_and_decodes():
    assert BACKBONES.get("mamba2") is Mamba2Backbone
    assert Mamba2Backbone.config_cls is Mamba2Config
    torch.manual_seed(0)
    backbone = Mamba2Backbone(D_MODEL, 2, config=TINY, policy=REFERENCE).eval()
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


# ------------------------------------------------------------------------------------ GPU kernels


@pytest.fixture
def cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not mamba_ssm.kernels_available():
        pytest.skip(f"mamba-ssm kernels unavailable: {mamba_ssm.kernel_info().get('error')}")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("ngroups,split_scan", [(1, False), (2, False), (1, True), (2, True)])
def test_kernel_path_matches_reference(cuda_kernels, ngroups, split_scan):
    policy = ExecutionPolicy(scan="kernel", split_scan=split_scan, chunk_size=16)
    kernel = _tiny_mixer(ngroups=ngroups, policy=policy).cuda()
    if split_scan and mamba_ssm.load_kernels().causal_conv1d_fn is None:
        pytest.skip("split_scan needs causal-conv1d")
    assert kernel._split_scan_usable(mamba_ssm.load_kernels()) == split_scan
    ref = _tiny_mixer(ngroups=ngroups, policy=ExecutionPolicy.reference(chunk_size=16), dtype=torch.float64).cuda()
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
    kernels = {op: "kernel" for op in ("scan", "state_update", "conv_step", "decode_glue")}
    mixer = _tiny_mixer(policy=ExecutionPolicy(chunk_size=16, **kernels)).cuda()
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
        net = Mamba2Backbone(D_MODEL, 2, Mamba2Config(d_state=16, headdim=8), policy=REFERENCE)
    else:
        net = TransformerBackbone(D_MODEL, 2, TransformerConfig(n_head=4), policy=REFERENCE)
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


# ------------------------------------------------------------------------------------ execution policy


def test_policy_is_shared_and_read_once_from_the_environment(monkeypatch):
    """default_policy reads the two variables; a built backbone keeps what it read, however the
    environment changes afterwards, and hands the same object to every mixer."""
    env = {"AIMKIT_DECODE_KERNELS": "ssm,gnorm", "AIMKIT_TRAIN_COMPILE": "loss"}
    policy = default_policy(env)
    assert (policy.state_update, policy.conv_step, policy.decode_glue) == ("auto", "reference", "reference")
    assert policy.fold_gated_norm and not policy.compile_glue and policy.compile_loss
    assert default_policy({}) == ExecutionPolicy()
    with pytest.raises(ConfigError, match="unknown kernel kinds"):
        default_policy({"AIMKIT_DECODE_KERNELS": "ssm,fast"})

    monkeypatch.setenv("AIMKIT_DECODE_KERNELS", "none")
    monkeypatch.setenv("AIMKIT_TRAIN_COMPILE", "never")
    torch.manual_seed(0)
    net = Mamba2Backbone(D_MODEL, 2, config=TINY).eval()
    built = net.policy
    assert built == ExecutionPolicy.reference(scan="auto", sampling="auto", vq_norm="auto", decode_graph=True,
                                              split_scan=True)  # the decode-step kernels only
    assert all(layer.mixer.policy is built for layer in net.layers)
    x, mods = torch.randn(2, 5, D_MODEL), [0.1 * torch.randn(2, 3, D_MODEL) for _ in range(2)]
    with torch.no_grad():
        before = net(x, mods)
        monkeypatch.setenv("AIMKIT_DECODE_KERNELS", "all")
        monkeypatch.setenv("AIMKIT_TRAIN_COMPILE", "auto")
        assert net.policy is built and net.layers[1].mixer.policy is built
        assert torch.equal(net(x, mods), before)
    assert "use_kernels" not in repr(net)


def _set_policy(net, policy):
    """What Generator.set_policy does: the new policy on every sub-module that holds one."""
    for module in net.modules():
        if isinstance(getattr(module, "policy", None), ExecutionPolicy):
            module.policy = policy


@pytest.mark.parametrize("chunk", [4, 16])
def test_changed_policy_is_read_at_the_next_call(chunk):
    torch.manual_seed(0)
    net = Mamba2Backbone(D_MODEL, 2, config=TINY, policy=REFERENCE).eval()
    x, mods = torch.randn(2, 11, D_MODEL), [0.1 * torch.randn(2, 3, D_MODEL) for _ in range(2)]
    with torch.no_grad():
        ref = net(x, mods)
        _set_policy(net, REFERENCE.replace(chunk_size=chunk, state_dtype="model"))
        assert all(layer.mixer.policy.chunk_size == chunk for layer in net.layers)
        torch.testing.assert_close(net(x, mods), ref, atol=1e-5, rtol=1e-5)  # same maths, other chunks
    cache = net.allocate_inference_cache(2, 8, dtype=torch.bfloat16)
    assert cache[0][1].dtype == torch.bfloat16  # state_dtype="model", read at allocation


# ------------------------------------------------------------------------------------ decode kernels


@dataclasses.dataclass(frozen=True)
class InterpretedPolicy(ExecutionPolicy):
    """A policy whose ``"kernel"`` operations also run on CPU tensors, in Triton's interpreter
    (the test module sets ``TRITON_INTERPRET=1`` off the GPU); on CUDA it is the plain policy."""

    def use_kernel(self, op, x):
        if getattr(self, op) == "kernel" and not torch.cuda.is_available():
            return True
        return super().use_kernel(op, x)


def _decode_policy(*ops, fold=True):
    """Kernels for ``ops`` (of state_update, conv_step, decode_glue), PyTorch for the rest."""
    return InterpretedPolicy.reference(fold_gated_norm=fold, **{op: "kernel" for op in ops})


_DECODE_OPS = ("state_update", "conv_step", "decode_glue")
_COUNTED = ("ssm_step_", "conv_step_", "add_norm_modulate", "folded ssm_step_", "deferred add_norm_modulate")


class _KernelCalls:
    """Counts the calls of the decode kernels' entry points with a profile hook (nothing replaced):
    ``with _KernelCalls() as calls: ...`` fills ``calls[name]`` for the names of ``_COUNTED``."""

    def __init__(self):
        from aimkit.kernels import conv_step, decode_glue, ssm_step

        self._names = {ssm_step.ssm_step_.__code__: "ssm_step_", conv_step.conv_step_.__code__: "conv_step_",
                       decode_glue.add_norm_modulate.__code__: "add_norm_modulate"}
        self.counts = dict.fromkeys(_COUNTED, 0)

    def _hook(self, frame, event, arg):
        name = self._names.get(frame.f_code) if event == "call" else None
        if name is not None:
            self.counts[name] += 1
            if name == "ssm_step_" and frame.f_locals.get("z") is not None:
                self.counts["folded ssm_step_"] += 1
            if name == "add_norm_modulate" and frame.f_locals.get("hidden_sq_partials") is not None:
                self.counts["deferred add_norm_modulate"] += 1

    def __enter__(self):
        self._previous = sys.getprofile()
        sys.setprofile(self._hook)
        return self.counts

    def __exit__(self, *exc):
        sys.setprofile(self._previous)


@pytest.fixture
def triton_kernels():
    """Triton importable; off the GPU its interpreter runs the kernels on CPU tensors (module top)."""
    pytest.importorskip("triton")


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


def _prefill_then_steps(net, xs, mods, prefill: int):
    """Outputs (B, L, D) of a prefill of ``xs[:, :prefill]`` then one decode step per later position."""
    batch, length = xs.shape[:2]
    params = InferenceParams(max_seqlen=length + 1, max_batch_size=batch,
                             position=torch.zeros((), dtype=torch.long, device=xs.device))
    params.key_value_memory_dict = net.allocate_inference_cache(batch, length + 1)
    outs = [net(xs[:, :prefill], mods, inference_params=params)]
    params.advance(prefill)
    for t in range(prefill, length):
        outs.append(net.step(xs[:, t:t + 1], mods, params))
        params.advance(1)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("kind,ops,fold,overrides,folds", [
    ("mamba2", _DECODE_OPS, True, {}, True),  # conv_step_, ssm_step_ with the gated norm folded, the glue
    ("mamba2", _DECODE_OPS, False, {}, False),
    ("mamba2", _DECODE_OPS, True, {"ngroups": 2}, False),  # two norm groups: not foldable
    ("mamba2", ("conv_step", "decode_glue"), True, {}, False),  # conv_step_, then the PyTorch state update
    ("mamba2", ("state_update", "decode_glue"), True, {}, True),  # the PyTorch ring convolution, then ssm_step_
    ("transformer", _DECODE_OPS, True, {}, False),
])
def test_fused_backbone_step_matches_unfused(triton_kernels, kind, ops, fold, overrides, folds):
    """Backbone.step with the policy's kernels equals the reference step over several positions (a
    prefill of two, then steps around the conv ring and past it); the same backbone switches path
    when its policy is replaced."""
    from aimkit.backbones.transformer import TransformerBackbone, TransformerConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if kind == "mamba2":
        net = Mamba2Backbone(32, 2, Mamba2Config(d_state=16, headdim=8, **overrides), policy=REFERENCE)
    else:
        net = TransformerBackbone(32, 2, TransformerConfig(n_head=4), policy=REFERENCE)
    net = net.to(device)
    _randomize(net, 3)
    batch, prefill, steps = 3, 2, 5
    mods = [torch.randn(batch, net.mod_chunks, 32, device=device) * 0.5 for _ in range(2)]
    xs = torch.randn(batch, prefill + steps, 32, device=device)
    with torch.no_grad(), _KernelCalls() as calls:
        unfused = _prefill_then_steps(net, xs, mods, prefill)
        assert not any(calls.values())
        _set_policy(net, _decode_policy(*ops, fold=fold))
        fused = _prefill_then_steps(net, xs, mods, prefill)
    torch.testing.assert_close(fused, unfused, atol=2e-5, rtol=2e-5)
    sublayers = 1 if kind == "mamba2" else 2
    assert calls["add_norm_modulate"] == steps * (2 * sublayers + 1)  # steps x (sublayers + final norm)
    mixer_steps = steps * 2 if kind == "mamba2" else 0  # 2 layers
    assert calls["ssm_step_"] == (mixer_steps if "state_update" in ops else 0)
    assert calls["conv_step_"] == (mixer_steps if "conv_step" in ops else 0)
    # folded: every mixer output carries its row factor into the next glue kernel
    assert calls["folded ssm_step_"] == calls["deferred add_norm_modulate"] == (mixer_steps if folds else 0)


@pytest.mark.parametrize("overrides,folds", [({}, True), ({"bias": True}, False), ({"ngroups": 2}, False)])
def test_mamba2_step_folds_gated_norm(triton_kernels, overrides, folds):
    """Mamba2.step_with_deferred_norm defers the gated norm's row factor only where it commutes
    with out_proj (one norm group, no bias); Mamba2.step applies it and equals the reference step."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    mixer = Mamba2(32, layer_idx=0, config=Mamba2Config(d_state=16, headdim=8, **overrides), policy=REFERENCE)
    mixer = mixer.to(device)
    _randomize(mixer, 4)
    batch = 2
    xs = torch.randn(batch, 4, 32, device=device)

    def run(policy, deferring: bool, defers: bool = False):
        mixer.policy = policy
        params = InferenceParams(max_seqlen=8, max_batch_size=batch)
        params.key_value_memory_dict = {0: mixer.allocate_inference_cache(batch, 8)}
        outs = []
        for t in range(xs.shape[1]):
            if deferring:
                out, deferred = mixer.step_with_deferred_norm(xs[:, t:t + 1], params)
                assert (deferred is not None) == defers
                if deferred is not None:
                    assert deferred.partials.shape[0] == batch and deferred.partials.dtype == torch.float32
                    assert deferred.dim == 64 and deferred.eps == mixer.norm.eps
                    normed = deferred.apply(out)
                    assert not torch.allclose(normed, out, atol=1e-3)  # the factor matters
                    out = normed
            else:
                out = mixer.step(xs[:, t:t + 1], params)
            outs.append(out)
            params.advance(1)
        return torch.cat(outs, dim=1), params.key_value_memory_dict[0][1].clone()

    with torch.no_grad(), _KernelCalls() as calls:
        reference, ref_state = run(REFERENCE, deferring=False)
        for deferring in (False, True):
            out, state = run(_decode_policy(*_DECODE_OPS), deferring, defers=folds)
            torch.testing.assert_close(out, reference, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=1e-5)
        assert calls["folded ssm_step_"] == (2 * 4 if folds else 0)
        out, _ = run(_decode_policy(*_DECODE_OPS, fold=False), deferring=True, defers=False)  # nothing deferred
        torch.testing.assert_close(out, reference, atol=2e-5, rtol=2e-5)
