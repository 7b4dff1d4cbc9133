"""Shared fixtures: tiny generators, deterministic parameter randomisation, cached decoding,
and the environment of a subprocess that runs this checkout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import aimkit
from aimkit.config import _REGISTRIES, ComponentSpec


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fill every floating parameter with seeded noise (zero-inits would hide wiring bugs).

    Mamba2's A_log and dt_bias keep sensible ranges so the scan stays stable.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.is_floating_point():
                continue
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 2.0)
            elif name.endswith("dt_bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 2.0 - 3.0)
            elif name.endswith(("norm.weight", "norm2.weight", "norm_f.weight")) or name.endswith(".D"):
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def llamagen_reference(seed: int = 11):
    """A random ``llamagen-test`` generator, codes (2, 16), labels (2,) and its teacher-forced logits."""
    import aimkit

    gen = randomize_(aimkit.build("llamagen-test"), seed=seed).eval()
    codes, labels = torch.randint(64, (2, 16)), torch.tensor([3, 10])
    with torch.no_grad():
        logits = gen(codes, labels)
    return gen, codes, labels, logits


# overrides giving a fast Mamba2 generator without a tokenizer: aimkit.build("aim-b", **TINY_MAMBA) is the
# registered preset aimkit.build("aim-test-mamba2"); new tests use the preset or tiny_generator() below
TINY_MAMBA = dict(
    d_model=32, n_layer=2, num_classes=10, num_tokens=16, vocab_size=64, tokenizer=None,
    d_state=16, headdim=8,
)


def tiny_config(kind: str, name: str) -> Any:
    """The config a tiny test generator gives component ``name`` of ``kind`` (``"backbone"``, ...).

    In this order: the component's ``config_cls.tiny()`` classmethod, if it defines one; the
    config a registered ``aim-test-*`` preset gives it; the defaults ``config_cls()``; None for a
    component without ``config_cls``. The sizes around it: d_model 32, 2 layers, 16 tokens.
    """
    config_cls = getattr(_REGISTRIES[kind].get(name), "config_cls", None)
    if config_cls is None:
        return None
    if hasattr(config_cls, "tiny"):
        return config_cls.tiny()
    for preset in aimkit.list_models("aim-test-*"):
        spec = getattr(aimkit.resolve_config(preset), kind)
        if spec is not None and spec.name == name:
            return spec.config
    return config_cls()


def tiny_generator(backbone: str = "mamba2", conditioning: str = "adaln", tokenizer: str | None = None,
                   seed: int = 0, **overrides: Any) -> aimkit.Generator:
    """A tiny generator with seeded random weights (:func:`randomize_`) from ``aim-test-mamba2``.

    Each named component gets :func:`tiny_config`; a tokenizer also sets ``vocab_size`` to its
    ``codebook_size``. ``overrides`` go to :func:`aimkit.build` last (``n_layer=4``, ``dtype=...``).
    """
    specs = {kind: ComponentSpec(name, tiny_config(kind, name))
             for kind, name in (("backbone", backbone), ("conditioning", conditioning), ("tokenizer", tokenizer))
             if name is not None}
    if tokenizer is not None:
        overrides = {"vocab_size": specs["tokenizer"].config.codebook_size, **overrides}
    torch.manual_seed(seed)
    gen = aimkit.build("aim-test-mamba2", pretrained=False, **{"tokenizer": None, **specs, **overrides})
    return randomize_(gen, seed=seed)


@pytest.fixture
def tiny_gen():
    """``aim-test-mamba2`` with seeded random weights."""
    return tiny_generator()


def assert_float_close(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 64) -> None:
    """``actual`` equals ``expected`` up to rounding: within ``ulps`` machine epsilons of
    ``expected``'s dtype, scaled by its largest magnitude (at least 1).

    The tolerance for two float computations that agree mathematically but may sum in another
    order (other matmul shapes, thread counts or CPU kernels: AVX-512 here, AVX2 on AMD EPYC).
    Bit-exact ``torch.equal`` is kept for contracts that are bit-exactness (copies, resume, seeds).
    """
    eps = torch.finfo(expected.dtype).eps
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    err = (actual.detach().to(expected.dtype) - expected.detach()).abs().max().item() if expected.numel() else 0.0
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert err <= ulps * eps * scale, f"max abs error {err:.3g} > {ulps} eps x {scale:.3g} ({expected.dtype})"


REPO = Path(__file__).resolve().parent.parent


def subprocess_env(threads: int | str = 1) -> dict[str, str]:
    """``os.environ`` for a child process that imports this checkout's aimkit, with ``threads``
    intra-op threads (1 on a 2-core CI machine; pass ``torch.get_num_threads()`` to match this one)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def decode_all(gen, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logits (B, N, V) of prefill then a cached decode step per token (teacher-forced tokens)."""
    cond = gen.condition(labels)
    params = gen.allocate_inference_cache(codes.shape[0])
    seen = [gen.prefill(cond, params)]
    params.advance(1)
    for k in range(codes.shape[1] - 1):
        seen.append(gen.decode_step(codes[:, k], cond, params))
        params.advance(1)
    return torch.stack(seen, dim=1)


class ScalingAccelerator:
    """What HF accelerate does for one process with mixed_precision fp16, for training-step tests:
    the loss scaled before backward, the gradients unscaled before the clip (``optimizer``: the
    torch optimizer the scaler unscales). The model's forward autocasts itself."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: str, init_scale: float):
        self.scaler, self.optimizer = torch.amp.GradScaler(device, init_scale=init_scale), optimizer

    @staticmethod
    def no_sync(model):
        from contextlib import nullcontext

        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        self.scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if a command builds a model (a refusal must come before the slow build)."""
    import importlib

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the bad input was refused")

    monkeypatch.setattr(importlib.import_module("aimkit.build"), "build", refuse)  # the module, not aimkit.build()
    monkeypatch.setattr("aimkit.commands.sample.build", refuse)


@pytest.fixture
def fresh_accelerate_state():
    """`aimkit sample` creates accelerate's process-wide PartialState; drop it afterwards."""
    from accelerate.state import PartialState

    yield
    PartialState._reset_state()
