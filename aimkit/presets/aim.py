"""The official AiM presets (``aim-b``, ``aim-l``, ``aim-xl``, ``aim-1b``) and where their weights
live (:data:`AIM_WEIGHTS`).

Each preset is a short function of literals returning a :class:`~aimkit.config.GeneratorConfig`;
its parameter count (generator only, tied embedding counted once) is in the docstring and
asserted in the tests. Where the weights come from is a separate :class:`PublishedWeights` record.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backbones.mamba2 import Mamba2Config
from ..class_names import imagenet_class_names
from ..conditioning.adaln import AdaLNGroupConfig
from ..config import ComponentSpec, GeneratorConfig, SamplingDefaults
from ..registry import GENERATORS

__all__ = ["PublishedWeights", "AIM_WEIGHTS", "aim_b", "aim_l", "aim_xl", "aim_1b"]


@dataclass(frozen=True)
class PublishedWeights:
    """Where a preset's official weights live (resolved by ``pretrained=True``)."""

    repo_id: str  # Hugging Face Hub repository
    filename: str  # file in that repository
    source: str  # who trained them
    licence: str


AIM_WEIGHTS: dict[str, PublishedWeights] = {
    "aim-b": PublishedWeights("hp-l33/aim-base", "model.safetensors", "AiM authors (hp-l33/AiM)", "MIT"),
    "aim-l": PublishedWeights("hp-l33/aim-large", "model.safetensors", "AiM authors (hp-l33/AiM)", "MIT"),
    "aim-xl": PublishedWeights("hp-l33/aim-xlarge", "model.safetensors", "AiM authors (hp-l33/AiM)", "MIT"),
}


def _aim(d_model: int, n_layer: int, num_groups: int | None, cfg_scale: float) -> GeneratorConfig:
    conditioning = (
        ComponentSpec("adaln") if num_groups is None else ComponentSpec("adaln-group", AdaLNGroupConfig(num_groups))
    )
    return GeneratorConfig(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=16384,
        num_classes=1000,  # ImageNet-1k, named in class_names
        num_tokens=256,
        class_dropout=0.1,
        backbone=ComponentSpec("mamba2", Mamba2Config()),
        conditioning=conditioning,
        tokenizer=ComponentSpec("vq-f16"),
        fid_sampling=SamplingDefaults(cfg_scale=cfg_scale, temperature=1.0, top_k=0, top_p=1.0),
        pretty_sampling=SamplingDefaults(cfg_scale=5.0, temperature=1.0, top_k=600, top_p=0.98),
        class_names=imagenet_class_names(),
    )


@GENERATORS.register("aim-b")
def aim_b() -> GeneratorConfig:
    """AiM-B: 147,622,080 parameters; d_model 768, 24 layers, per-layer adaLN (FID 3.52 at cfg 2.0)."""
    return _aim(768, 24, None, cfg_scale=2.0)


@GENERATORS.register("aim-l")
def aim_l() -> GeneratorConfig:
    """AiM-L: 349,760,000 parameters; d_model 1024, 48 layers, adaLN-group G=4 (FID 2.83 at cfg 1.75)."""
    return _aim(1024, 48, 4, cfg_scale=1.75)


@GENERATORS.register("aim-xl")
def aim_xl() -> GeneratorConfig:
    """AiM-XL: 763,291,392 parameters; d_model 1536, 48 layers, adaLN-group G=4 (FID 2.56 at cfg 1.75)."""
    return _aim(1536, 48, 4, cfg_scale=1.75)


@GENERATORS.register("aim-1b")
def aim_1b() -> GeneratorConfig:
    """AiM-1B (the paper's 1.3B model, no public weights): 1,335,944,192 parameters; d_model 2048, 48 layers, G=4."""
    return _aim(2048, 48, 4, cfg_scale=1.75)
