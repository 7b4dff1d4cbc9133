"""Tiny presets for tests (random weights, no tokenizer or the tiny VQ): ``aim-test-*``.

They build in milliseconds and run a whole forward, prefill and decode of 16 tokens on a CPU, so
tests of any part (samplers, weights, training, commands) can use a real generator without
copying size overrides around::

    gen = aimkit.build("aim-test-mamba2")                           # 32 wide, 2 layers, 16 tokens
    gen = aimkit.build("aim-test-transformer", n_layer=4)           # overrides merge last
    gen = aimkit.build("aim-test-mamba2", conditioning="adaln-group", num_groups=2)

Every ``aim-test-*`` has 10 classes, 16 tokens (a 4 x 4 grid) and per-layer adaLN; ``aim-test-mamba2`` is
``aim-b`` at these sizes (``aimkit.resolve_config("aim-b", d_model=32, ...)`` gives the same config).
``llamagen-test`` is a LlamaGen GPT (:mod:`aimkit.presets.llamagen`) of the same small sizes.
"""

from __future__ import annotations

from ..backbones.mamba2 import Mamba2Config
from ..backbones.transformer import TransformerConfig
from ..config import ComponentSpec, GeneratorConfig
from ..registry import GENERATORS
from .llamagen import llamagen

__all__ = ["aim_test_mamba2", "aim_test_transformer", "aim_test_vq", "llamagen_test"]


def _tiny(backbone: ComponentSpec, tokenizer=None, vocab_size: int = 64) -> GeneratorConfig:
    return GeneratorConfig(
        d_model=32,
        n_layer=2,
        vocab_size=vocab_size,
        num_classes=10,
        num_tokens=16,  # a 4 x 4 grid
        backbone=backbone,
        conditioning=ComponentSpec("adaln"),
        tokenizer=tokenizer,
    )


def _tiny_mamba2() -> ComponentSpec:
    # 8 heads of 8 channels (d_inner 64), state 16
    return ComponentSpec("mamba2", Mamba2Config(d_state=16, headdim=8))


@GENERATORS.register("aim-test-mamba2")
def aim_test_mamba2() -> GeneratorConfig:
    """Tiny Mamba2 generator for tests: 27,504 parameters; d_model 32, 2 layers, vocab 64, no tokenizer."""
    return _tiny(_tiny_mamba2())


@GENERATORS.register("aim-test-transformer")
def aim_test_transformer() -> GeneratorConfig:
    """Tiny transformer generator for tests: 38,400 parameters; 4 heads of 8, SwiGLU width 64, d_model 32, 2 layers."""
    return _tiny(ComponentSpec("transformer", TransformerConfig(n_head=4, mlp_hidden=64)))


@GENERATORS.register("aim-test-vq")
def aim_test_vq() -> GeneratorConfig:
    """``aim-test-mamba2`` with the ``vq-f4-tiny`` tokenizer: 41,840 parameters (vocab 512; +1,076,843 in the
    tokenizer); its 16 tokens decode to 16 x 16 images."""
    return _tiny(_tiny_mamba2(), tokenizer=ComponentSpec("vq-f4-tiny"), vocab_size=512)


@GENERATORS.register("llamagen-test")
def llamagen_test() -> GeneratorConfig:
    """Tiny LlamaGen GPT for tests: 140,288 parameters; d_model 64, 2 layers, 4 heads of 16, SwiGLU width 256,
    2-D rotary on a 4 x 4 grid, class-token conditioning, untied head, vocab 64, no tokenizer."""
    return llamagen(64, 2, 4, cfg_scale=2.0, num_tokens=16, grid_size=4, vocab_size=64, num_classes=10,
                    tokenizer=None)
