"""A small VQ tokenizer for 64x64 images (registry name ``vq-f4-tiny``).

The same architecture as :mod:`aimkit.tokenizers.vq` (LlamaGen's VQ model) at a much smaller
size: three levels of widths 32, 64, 64 halve a 64x64 image twice to a 16x16 grid, whose vectors
are projected to 8 dimensions and matched against 512 L2-normalised codebook rows by cosine
similarity. It is the tokenizer of the ``aim-tiny-shapes`` generator, trained on aimkit's
procedural shapes by ``recipes/train_tokenizer.py``.

Its weights are stored under the ``tokenizer.`` prefix (the key layout of a
``Generator.save_pretrained`` file), so one file serves both as a tokenizer checkpoint and as a
tokenizer-only init for a generator::

    tok = VQTiny().load_weights("runs/vq_f4_tiny/tokenizer.safetensors")
    tok = VQTiny().load_weights("aimkit/assets/aim_tiny_shapes")   # from the whole shipped model
    codes = tok.encode(images)       # (B, 3, 64, 64) in [-1, 1] -> (B, 256) int64
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import TOKENIZERS
from .vq import VQConfig, VQModel

__all__ = ["VQTiny", "VQTinyConfig"]


@dataclass(frozen=True)
class VQTinyConfig(VQConfig):
    """:class:`VQConfig` with the ``vq-f4-tiny`` defaults (1,076,843 parameters, ~4.3 MB in fp32).

    Attention sits at the 16x16 level, as in every :class:`VQModel` (cheap at this size).
    """

    codebook_size: int = 512  # codes; the generator's vocab_size
    codebook_embed_dim: int = 8  # dimension of a (normalised) codebook row
    z_channels: int = 64  # channels between encoder/decoder and the 1x1 quant convs
    ch: int = 32  # base width: levels of 32, 64, 64 channels (GroupNorm needs multiples of 32)
    ch_mult: tuple[int, ...] = (1, 2, 2)  # three levels -> two halvings -> f4: 64 px -> 16x16 codes
    encoder_res_blocks: int = 1  # residual blocks per encoder level
    decoder_res_blocks: int = 2  # residual blocks per decoder level
    image_size: int = 64  # training resolution


@TOKENIZERS.register("vq-f4-tiny")
class VQTiny(VQModel):
    """64x64 images <-> 16x16 grids of 512 codes; see the module docstring.

    Args:
        config: the hyperparameters; the default is the shipped ``vq-f4-tiny``.
    """

    config_cls = VQTinyConfig
    name = "vq-f4-tiny"
    checkpoint_prefixes = ("tokenizer.",)

    def __init__(self, config: VQTinyConfig = VQTinyConfig()):
        super().__init__(config)
