"""The compiled training glue (aimkit._compile): same maths as the block-by-block forward.

On CPU the wrappers are given the ``aot_eager`` backend, which traces through dynamo and
AOTAutograd exactly as Inductor would (so a graph break or an untraceable op fails here) but
runs the traced graph with eager kernels. The Inductor kernels themselves run on the GPU
(``benchmarks/profile_train.py``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import aimkit
from aimkit import _compile, generator
from aimkit._compile import TrainCompiled
from aimkit.backbones import base
from aimkit.backbones.mamba2 import Mamba2Backbone, Mamba2Config
from aimkit.backbones.transformer import TransformerBackbone, TransformerConfig

from conftest import randomize_


def _backbone(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "mamba2":
        net = Mamba2Backbone(32, 3, Mamba2Config(d_state=16, headdim=8, chunk_size=8))
    else:
        net = TransformerBackbone(32, 2, TransformerConfig(n_head=4))
    return randomize_(net, seed=1)


def _forward_and_grads(net, x, mods):
    x = x.clone().requires_grad_(True)
    mods = [m.clone().requires_grad_(True) for m in mods]
    out = net(x, mods)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = [x.grad, *[m.grad for m in mods], *[p.grad for p in net.parameters()]]
    net.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("kind", ["mamba2", "transformer"])
def test_compiled_glue_forward_and_backward_equal_blocks(kind, monkeypatch):
    net = _backbone(kind)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, 32, generator=g)
    mods = [torch.randn(2, net.mod_chunks, 32, generator=g) * 0.3 for _ in net.layers]

    monkeypatch.setenv("AIMKIT_TRAIN_COMPILE", "never")  # the block-by-block reference
    ref_out, ref_grads = _forward_and_grads(net, x, mods)

    monkeypatch.setenv("AIMKIT_TRAIN_COMPILE", "auto")
    glue = TrainCompiled(base.add_norm_modulate, "glue", backend="aot_eager")
    monkeypatch.setattr(base, "_GLUE", glue)
    calls = []
    monkeypatch.setattr(net, "_run_compiled_glue",
                        lambda *a: calls.append(1) or type(net)._run_compiled_glue(net, *a))
    out, grads = _forward_and_grads(net, x, mods)
    assert calls, "the compiled-glue loop did not run"
    assert glue._proven and not glue._failed
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    with torch.no_grad():  # inference keeps the block-by-block path
        calls.clear()
        net(x, mods)
        assert not calls


def test_glue_returns_out_dtype_and_float32_residual():
    g = torch.Generator().manual_seed(0)
    hidden, residual = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    gate, shift, scale = (torch.randn(2, 8, generator=g) for _ in range(3))
    weight = torch.rand(8, generator=g) + 0.5
    out, res = base.add_norm_modulate(hidden, gate, residual, weight, 1e-5, shift, scale, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and res.dtype == torch.float32
    r = hidden * gate[:, None] + residual
    want = r * torch.rsqrt(r.square().mean(-1, keepdim=True) + 1e-5) * weight * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(res, r)
    torch.testing.assert_close(out, want.bfloat16())


def test_token_cross_entropy_compiled_matches_eager(monkeypatch):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g).bfloat16().requires_grad_(True)
    targets = torch.randint(50, (3, 7), generator=g)
    want = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    (want_grad,) = torch.autograd.grad(want, logits)

    wrapper = TrainCompiled(generator._cross_entropy_fp32, "loss", backend="aot_eager")
    monkeypatch.setattr(generator, "_CROSS_ENTROPY", wrapper)
    got = generator.token_cross_entropy(logits, targets)
    (got_grad,) = torch.autograd.grad(got, logits)
    assert wrapper._proven
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


def test_generator_loss_uses_token_cross_entropy(tiny_gen, monkeypatch):
    calls = []
    wrapper = TrainCompiled(lambda *a: calls.append(1) or generator._cross_entropy_fp32(*a), "loss")
    monkeypatch.setattr(generator, "_CROSS_ENTROPY", wrapper)
    codes = torch.randint(tiny_gen.vocab_size, (2, tiny_gen.num_tokens))
    labels = torch.tensor([1, 2])
    logits = tiny_gen(codes, labels)
    want = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
    torch.testing.assert_close(tiny_gen.loss(codes, labels), want)
    assert calls, "Generator.loss bypassed token_cross_entropy"


def test_failed_compile_warns_once_and_falls_back(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no toolchain")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    wrapper = TrainCompiled(lambda a, b: a * b + 1, "glue", backend="aot_eager")
    a = torch.ones(3, requires_grad=True)
    with pytest.warns(UserWarning, match="no toolchain"):
        out = wrapper(a.device, a, torch.full((3,), 2.0))
    torch.testing.assert_close(out, torch.full((3,), 3.0))
    assert wrapper._failed and not wrapper.wants_compile(a.device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the plain function runs directly
        wrapper(a.device, a, a)


def test_compile_switch(monkeypatch):
    wrapper = TrainCompiled(torch.add, "glue")
    cpu = torch.device("cpu")
    assert not wrapper.wants_compile(cpu)  # Inductor only for CUDA tensors
    assert not wrapper.wants_compile(torch.device("meta"))
    monkeypatch.setenv("AIMKIT_TRAIN_COMPILE", "never")
    assert not _compile.compile_enabled()
    monkeypatch.setenv("AIMKIT_TRAIN_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="AIMKIT_TRAIN_COMPILE"):
        _compile.compile_enabled()
    monkeypatch.setenv("AIMKIT_TRAIN_COMPILE", "loss")  # regions one by one
    assert _compile.compile_enabled("loss") and not _compile.compile_enabled("glue")
    assert not TrainCompiled(torch.add, "glue", backend="aot_eager").wants_compile(cpu)
    monkeypatch.setenv("AIMKIT_TRAIN_COMPILE", "glue,norms")
    with pytest.raises(ValueError, match="unknown: \\['norms'\\]"):
        _compile.compile_enabled("glue")
    with pytest.raises(ValueError, match="unknown compile region"):
        TrainCompiled(torch.add, "norms")
    monkeypatch.setenv("AIMKIT_TRAIN_COMPILE", "auto")
    assert _compile.compile_enabled()
    assert TrainCompiled(torch.add, "glue", backend="aot_eager").wants_compile(cpu)
    with torch.no_grad():
        assert not TrainCompiled(torch.add, "glue", backend="aot_eager").wants_compile(cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inductor_glue_matches_reference_on_gpu(monkeypatch):
    gen = randomize_(aimkit.build("aim-b", d_model=64, n_layer=2, num_classes=10, num_tokens=16, vocab_size=64,
                                  tokenizer=None, d_state=16, headdim=16, chunk_size=8, device="cuda"))
    codes = torch.randint(64, (4, 16), device="cuda")
    labels = torch.arange(4, device="cuda")

    def loss_and_grads():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = gen.loss(codes, labels)
        grads = torch.autograd.grad(loss, list(gen.parameters()), allow_unused=True)
        return loss.detach(), grads

    monkeypatch.setenv("AIMKIT_TRAIN_COMPILE", "never")
    ref_loss, ref_grads = loss_and_grads()
    monkeypatch.setenv("AIMKIT_TRAIN_COMPILE", "auto")
    loss, grads = loss_and_grads()
    assert base._GLUE._proven and generator._CROSS_ENTROPY._proven
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, ref_grads):
        if want is not None:
            assert torch.linalg.vector_norm(got.float() - want.float()) <= 3e-2 * torch.linalg.vector_norm(want.float()) + 1e-6
