"""The compiled training glue (policy ``compile_glue``): same maths as the block-by-block forward.

On CPU the wrappers are given the ``aot_eager`` backend, which traces through dynamo and
AOTAutograd exactly as Inductor would (so a graph break or an untraceable op fails here) but
runs the traced graph with eager kernels (the backbone's ``_glue`` wrapper is replaced by one with
that backend; Inductor serves CUDA only). The Inductor kernels themselves run on the GPU
(``benchmarks/profile_train.py``). The wrapper itself: ``tests/kernels/test_compiled.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_

import aimkit
from aimkit import generator
from aimkit.backbones.base import Backbone, InferenceParams
from aimkit.backbones.mamba2 import Mamba2Backbone, Mamba2Config
from aimkit.backbones.transformer import TransformerBackbone, TransformerConfig
from aimkit.kernels.compiled import TrainCompiled
from aimkit.kernels.glue import add_norm_modulate
from aimkit.policy import ExecutionPolicy

COMPILED = ExecutionPolicy.reference(chunk_size=8, compile_glue=True)
EAGER = ExecutionPolicy.reference(chunk_size=8)


def _backbone(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "mamba2":
        net = Mamba2Backbone(32, 3, Mamba2Config(d_state=16, headdim=8), policy=EAGER)
    else:
        net = TransformerBackbone(32, 2, TransformerConfig(n_head=4), policy=EAGER)
    return randomize_(net, seed=1)


def _set_policy(net, policy):
    for module in net.modules():
        if isinstance(getattr(module, "policy", None), ExecutionPolicy):
            module.policy = policy


def _forward_and_grads(net, x, mods):
    x = x.clone().requires_grad_(True)
    mods = [m.clone().requires_grad_(True) for m in mods]
    out = net(x, mods)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = [x.grad, *[m.grad for m in mods], *[p.grad for p in net.parameters()]]
    net.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("kind", ["mamba2", "transformer"])
def test_compiled_glue_forward_and_backward_equal_blocks(kind):
    net = _backbone(kind)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, 32, generator=g)
    mods = [torch.randn(2, net.mod_chunks, 32, generator=g) * 0.3 for _ in net.layers]
    # a function of its own: dynamo's recompile limit counts per code object, across tests
    net._glue = glue = TrainCompiled(lambda *args: add_norm_modulate(*args), "glue", backend="aot_eager")

    ref_out, ref_grads = _forward_and_grads(net, x, mods)  # compile_glue off: the block-by-block reference
    assert not glue._proven, "the compiled glue ran with compile_glue off"

    _set_policy(net, COMPILED)
    out, grads = _forward_and_grads(net, x, mods)
    assert glue._proven and not glue._failed, "the compiled-glue loop did not run"
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_compiled_glue_only_for_whole_sequences_without_a_cache():
    """A prefill (a cache) and a decode step keep the block-by-block path; grad mode does not matter."""
    net = _backbone("mamba2")
    _set_policy(net, COMPILED)
    x = torch.randn(2, 4, 32)
    mods = [torch.randn(2, 3, 32) * 0.3 for _ in net.layers]
    net._glue = glue = TrainCompiled(lambda *args: add_norm_modulate(*args), "glue", backend="aot_eager")
    with torch.no_grad():
        params = InferenceParams(8, 2, position=torch.zeros((), dtype=torch.long))
        params.key_value_memory_dict = net.allocate_inference_cache(2, 8)
        net(x, mods, inference_params=params)
        params.advance(4)
        net.step(x[:, :1], mods, params)
        assert not glue._proven
        net(x, mods)  # inference without a cache: compiled too (the policy decides, not grad mode)
        assert glue._proven
    assert Backbone._glue is not glue and Backbone._glue.backend == "inductor"
    assert not Backbone._glue.wants_compile(torch.device("cpu"))  # Inductor serves CUDA tensors only


def test_generator_loss_uses_token_cross_entropy(tiny_gen):
    codes = torch.randint(tiny_gen.vocab_size, (2, tiny_gen.num_tokens))
    labels = torch.tensor([1, 2])
    logits = tiny_gen(codes, labels)
    want = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
    torch.testing.assert_close(tiny_gen.loss(codes, labels), want)
    torch.testing.assert_close(generator.token_cross_entropy(logits, codes, compiled=False), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inductor_glue_matches_reference_on_gpu():
    gen = randomize_(aimkit.build("aim-b", d_model=64, n_layer=2, num_classes=10, num_tokens=16, vocab_size=64,
                                  tokenizer=None, d_state=16, headdim=16, device="cuda",
                                  policy=ExecutionPolicy(chunk_size=8, compile_glue=False, compile_loss=False)))
    codes = torch.randint(64, (4, 16), device="cuda")
    labels = torch.arange(4, device="cuda")

    def loss_and_grads():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = gen.loss(codes, labels)
        grads = torch.autograd.grad(loss, list(gen.parameters()), allow_unused=True)
        return loss.detach(), grads

    ref_loss, ref_grads = loss_and_grads()
    gen.set_policy(gen.policy.replace(compile_glue=True, compile_loss=True))
    loss, grads = loss_and_grads()
    assert Backbone._glue._proven and generator._CROSS_ENTROPY._proven
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, ref_grads):
        if want is not None:
            error = torch.linalg.vector_norm(got.float() - want.float())
            assert error <= 3e-2 * torch.linalg.vector_norm(want.float()) + 1e-6
