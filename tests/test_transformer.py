"""Tests of the transformer backbone: cached decoding, causality, GQA, graph-safe step, backward."""

import pytest
import torch
from conftest import assert_float_close

from aimkit.backbones.base import InferenceParams
from aimkit.backbones.transformer import (
    Attention,
    SwiGLU,
    TransformerBackbone,
    TransformerConfig,
    apply_rotary,
    rotary_angles,
)
from aimkit.errors import ConfigError
from aimkit.registry import BACKBONES

D, N_LAYER, B, L = 32, 2, 2, 9


def _backbone(n_kv_head=None, seed=0):
    torch.manual_seed(seed)
    config = TransformerConfig(n_head=4, n_kv_head=n_kv_head)
    return TransformerBackbone(D, N_LAYER, config=config).eval()


def _inputs(seed=1, batch=B, seqlen=L):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seqlen, D, generator=gen)
    mods = [torch.randn(batch, 6, D, generator=gen) * 0.1 for _ in range(N_LAYER)]
    return x, mods


def _inference_params(backbone, batch=B, max_seqlen=16):
    params = InferenceParams(max_seqlen, batch, position=torch.zeros((), dtype=torch.long))
    params.key_value_memory_dict = backbone.allocate_inference_cache(batch, max_seqlen)
    return params


def _decode(backbone, x, mods, prefill_lens=(3,)):
    """Prefill the given chunk lengths, then step token by token; returns (B, L, D)."""
    params = _inference_params(backbone, batch=x.shape[0])
    outs, start = [], 0
    for n in prefill_lens:
        outs.append(backbone(x[:, start : start + n], mods, inference_params=params))
        params.advance(n)
        start += n
    for t in range(start, x.shape[1]):
        outs.append(backbone.step(x[:, t : t + 1], mods, params))
        params.advance(1)
    return torch.cat(outs, dim=1)


def test_registered():
    assert BACKBONES.get("transformer") is TransformerBackbone
    assert TransformerBackbone.config_cls is TransformerConfig


def test_config_resolution():
    config = TransformerConfig()
    assert config.head_counts(768) == (12, 12)
    assert TransformerConfig(n_head=None).head_counts(1024) == (16, 16)
    assert config.mlp_width(768) == 2048  # LlamaGen-B
    assert config.mlp_width(1024) == 2816  # LlamaGen-L
    assert TransformerConfig(mlp_hidden=100).mlp_width(768) == 100
    with pytest.raises(ConfigError):
        TransformerConfig(n_head=4, n_kv_head=3).head_counts(32)
    with pytest.raises(ConfigError):
        TransformerConfig(n_head=5).head_counts(32)


def test_shapes_and_params():
    backbone = _backbone()
    assert backbone.mod_chunks == 6
    attn = backbone.layers[0].mixer
    assert isinstance(attn, Attention) and isinstance(backbone.layers[0].mlp, SwiGLU)
    assert attn.wqkv.weight.shape == (3 * D, D) and attn.wqkv.bias is None
    assert backbone.layers[0].mlp.w1.weight.shape == (256, D)
    k_cache, v_cache = attn.allocate_inference_cache(3, 11)
    assert k_cache.shape == v_cache.shape == (3, 4, 11, D // 4)
    assert not k_cache.any()
    x, mods = _inputs()
    assert backbone(x, mods).shape == (B, L, D)


def test_rotary_is_relative():
    """Scores of rotated q, k depend only on the position difference."""
    q, k = torch.randn(2, 1, 1, 1, 8).unbind(0)  # (1, 1, 1, 8) each
    def score(pq, pk):
        cq, sq = rotary_angles(torch.tensor([pq]), 8, 10000.0)
        ck, sk = rotary_angles(torch.tensor([pk]), 8, 10000.0)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()
    torch.testing.assert_close(score(5, 2), score(13, 10))
    cos, sin = rotary_angles(torch.tensor([0]), 8, 10000.0)
    torch.testing.assert_close(apply_rotary(q, cos, sin), q)


@pytest.mark.parametrize("n_kv_head", [None, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("prefill_lens", [(3,), (1,), (2, 4)], ids=["p3", "p1", "p2+4"])
def test_cached_decoding_matches_forward(n_kv_head, prefill_lens):
    backbone = _backbone(n_kv_head)
    x, mods = _inputs()
    with torch.no_grad():
        full = backbone(x, mods)
        decoded = _decode(backbone, x, mods, prefill_lens)
    assert (full - decoded).abs().max().item() <= 1e-5


def test_gqa_shares_kv_heads():
    backbone = _backbone(n_kv_head=2)
    attn = backbone.layers[0].mixer
    assert (attn.n_head, attn.n_kv_head, attn.n_rep) == (4, 2, 2)
    assert attn.wqkv.weight.shape == (D + 2 * 2 * (D // 4), D)
    assert attn.allocate_inference_cache(1, 5)[0].shape == (1, 2, 5, D // 4)


@pytest.mark.parametrize("n_kv_head", [None, 2], ids=["mha", "gqa"])
def test_causal(n_kv_head):
    backbone = _backbone(n_kv_head)
    x, mods = _inputs()
    x2 = x.clone()
    x2[:, 5:] = torch.randn(B, L - 5, D)
    with torch.no_grad():
        out, out2 = backbone(x, mods), backbone(x2, mods)
    assert_float_close(out[:, :5], out2[:, :5])
    assert (out[:, 5:] - out2[:, 5:]).abs().max() > 1e-3


def test_step_reads_only_position_tensor():
    """A wrong host-side seqlen_offset does not change step: it uses the device tensor only."""
    backbone = _backbone()
    x, mods = _inputs()
    with torch.no_grad():
        expected = _decode(backbone, x, mods, prefill_lens=(3,))
        params = _inference_params(backbone)
        backbone(x[:, :3], mods, inference_params=params)
        params.position.fill_(3)  # advance the tensor only, as a replayed CUDA graph would
        params.seqlen_offset = 1000
        steps = []
        for t in range(3, L):
            steps.append(backbone.step(x[:, t : t + 1], mods, params))
            params.position.add_(1)
            params.seqlen_offset = -7 * t  # garbage: must be ignored
    assert_float_close(torch.cat(steps, dim=1), expected[:, 3:])


def test_step_batch_smaller_than_cache():
    backbone = _backbone()
    x, mods = _inputs(batch=1)
    with torch.no_grad():
        full = backbone(x, mods)
        params = _inference_params(backbone, batch=3)
        backbone(x[:, :4], mods, inference_params=params)
        params.advance(4)
        out = backbone.step(x[:, 4:5], mods, params)
    assert (out - full[:, 4:5]).abs().max().item() <= 1e-5


def test_prefill_overflow_raises():
    backbone = _backbone()
    x, mods = _inputs(seqlen=L)
    params = _inference_params(backbone, max_seqlen=L - 1)
    with pytest.raises(ValueError):
        backbone(x, mods, inference_params=params)


def test_backward_finite():
    backbone = _backbone(n_kv_head=2).train()
    x, mods = _inputs()
    x.requires_grad_(True)
    mods = [m.requires_grad_(True) for m in mods]
    backbone(x, mods).pow(2).mean().backward()
    grads = [p.grad for p in backbone.parameters()] + [x.grad] + [m.grad for m in mods]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert backbone.layers[0].mixer.wqkv.weight.grad.abs().sum() > 0


def test_bf16_keeps_float32_rotary():
    backbone = _backbone().to(torch.bfloat16)
    x, mods = _inputs()
    out = backbone(x.bfloat16(), [m.bfloat16() for m in mods])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    params = _inference_params(backbone)
    assert params.key_value_memory_dict[0][0].dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n_kv_head", [None, 2], ids=["mha", "gqa"])
def test_cuda_graph_step(n_kv_head):
    """One captured Backbone.step, replayed with only the position tensor advancing."""
    backbone = _backbone(n_kv_head).cuda()
    x, mods = _inputs()
    x, mods = x.cuda(), [m.cuda() for m in mods]
    with torch.no_grad():
        full = backbone(x, mods)
        params = InferenceParams(16, B, position=torch.zeros((), dtype=torch.long, device="cuda"))
        params.key_value_memory_dict = backbone.allocate_inference_cache(B, 16)
        backbone(x[:, :3], mods, inference_params=params)
        params.advance(3)
        static_x = x[:, 3:4].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph, as capture requires
            backbone.step(static_x, mods, params)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = backbone.step(static_x, mods, params)
        outs = []
        for t in range(3, L):
            static_x.copy_(x[:, t : t + 1])
            graph.replay()
            outs.append(static_out.clone())
            params.advance(1)
    torch.testing.assert_close(torch.cat(outs, dim=1), full[:, 3:], rtol=0, atol=1e-4)
