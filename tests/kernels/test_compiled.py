"""TrainCompiled (aimkit.kernels.compiled): compiled where asked, the plain function elsewhere, and
a one-time fallback when compiling fails.

On CPU the wrappers are given the ``aot_eager`` backend, which traces through dynamo and
AOTAutograd exactly as Inductor would (so a graph break or an untraceable op fails here) but runs
the traced graph with eager kernels.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from aimkit import generator
from aimkit.kernels.compiled import TrainCompiled


def _broken_backend(graph_module, example_inputs):
    raise RuntimeError("no toolchain")


def test_failed_compile_warns_once_and_falls_back():
    wrapper = TrainCompiled(lambda a, b: a * b + 1, "glue", backend=_broken_backend)
    a = torch.ones(3, requires_grad=True)
    with pytest.warns(UserWarning, match="no toolchain"):
        out = wrapper(a.device, a, torch.full((3,), 2.0))
    torch.testing.assert_close(out, torch.full((3,), 3.0))
    assert wrapper._failed and not wrapper.wants_compile(a.device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the plain function runs directly
        wrapper(a.device, a, a)


def test_which_devices_compile():
    cpu = torch.device("cpu")
    wrapper = TrainCompiled(torch.add, "glue")
    assert not wrapper.wants_compile(cpu)  # Inductor only for CUDA tensors
    assert not wrapper.wants_compile(torch.device("meta"))
    assert wrapper.wants_compile(torch.device("cuda"))
    assert wrapper.name == "glue" and TrainCompiled(torch.add).name == "add"
    assert TrainCompiled(torch.add, "glue", backend="aot_eager").wants_compile(cpu)
    with torch.no_grad():  # grad mode is not the wrapper's business: the caller decides
        assert TrainCompiled(torch.add, "glue", backend="aot_eager").wants_compile(cpu)


def test_compiled_cross_entropy_matches_eager():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g).bfloat16().requires_grad_(True)
    targets = torch.randint(50, (3, 7), generator=g)
    want = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    (want_grad,) = torch.autograd.grad(want, logits)

    wrapper = TrainCompiled(generator._cross_entropy_fp32, "loss", backend="aot_eager")
    got = wrapper(logits.device, logits, targets)
    (got_grad,) = torch.autograd.grad(got, logits)
    assert wrapper._proven
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    plain = generator.token_cross_entropy(logits, targets, compiled=False)
    torch.testing.assert_close(plain, want)


def test_beyond_the_recompile_limit_calls_run_uncompiled(monkeypatch):
    """A process that meets more shapes than the limit keeps working: those calls run the plain function."""
    import aimkit.kernels.compiled as compiled

    monkeypatch.setattr(compiled, "RECOMPILE_LIMIT", 2)

    def double_plus_one(x):
        return x * 2 + 1

    wrapped = compiled.TrainCompiled(double_plus_one, backend="aot_eager")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2), pytest.warns(UserWarning, match="more than 2 specialisations"):
        for n in range(1, 7):  # six shapes, each a specialisation (dynamic=False)
            x = torch.arange(float(n))
            torch.testing.assert_close(wrapped(x.device, x), x * 2 + 1)
    assert wrapped._proven and not wrapped._failed
