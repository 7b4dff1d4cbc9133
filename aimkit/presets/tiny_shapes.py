"""``aim-tiny-shapes``: the small generator whose trained weights ship inside aimkit.

It generates 64x64 images of aimkit's 36 procedural shape classes (:mod:`aimkit.data.shapes`)
through the ``vq-f4-tiny`` tokenizer (16x16 = 256 codes of 512), on a CPU in seconds::

    gen = aimkit.build("aim-tiny-shapes")          # weights from aimkit/assets/aim_tiny_shapes
    images = gen.generate(list(range(36)), seed=0, output="pil")

How the shipped weights were made (one command, ``recipes/build_tiny_shapes.py``) and how well
they do (conditional accuracy and Fréchet distance with the shipped shapes classifier) is
recorded in ``aimkit/assets/aim_tiny_shapes/training_record.json``.
"""

from __future__ import annotations

from ..backbones.mamba2 import Mamba2Config
from ..conditioning.adaln import AdaLNGroupConfig
from ..config import ComponentSpec, GeneratorConfig, SamplingDefaults
from ..registry import GENERATORS

__all__ = ["aim_tiny_shapes"]


@GENERATORS.register("aim-tiny-shapes")
def aim_tiny_shapes() -> GeneratorConfig:
    """AiM-tiny-shapes: 4,195,520 parameters (+1,076,843 in the vq-f4-tiny tokenizer).

    d_model 256, 8 Mamba2 layers (d_state 64, headdim 64: 8 heads), adaLN-group G=2, 36 classes,
    256 tokens of a 512-code vocabulary. Guidance 3.0 for both the FID and the pretty defaults.
    """
    from ..data.shapes import class_names  # "red circle", ..., "cyan star"

    return GeneratorConfig(
        d_model=256,
        n_layer=8,
        vocab_size=512,  # = vq-f4-tiny codebook_size
        num_classes=36,  # aimkit.data.shapes.NUM_CLASSES
        num_tokens=256,  # 16 x 16 codes of a 64 x 64 image
        class_dropout=0.1,
        backbone=ComponentSpec("mamba2", Mamba2Config(d_state=64, headdim=64)),
        conditioning=ComponentSpec("adaln-group", AdaLNGroupConfig(num_groups=2)),
        tokenizer=ComponentSpec("vq-f4-tiny"),
        fid_sampling=SamplingDefaults(cfg_scale=3.0, temperature=1.0, top_k=0, top_p=1.0),
        pretty_sampling=SamplingDefaults(cfg_scale=3.0, temperature=1.0, top_k=0, top_p=1.0),
        class_names=tuple(class_names()),
    )
