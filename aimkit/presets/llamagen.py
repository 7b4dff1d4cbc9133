"""LlamaGen's class-conditional GPTs (``llamagen-b``, ``-l``, ``-xl``, ``-xxl``, ``-3b``) at 256 px.

LlamaGen (FoundationVision/LlamaGen, "Autoregressive Model Beats Diffusion") is the transformer
AiM compares itself with. Its models share aimkit's VQ-f16 tokenizer (``vq_ds16_c2i.pt``); here
each is built exactly, with the ``transformer`` backbone and ``class-token`` conditioning:

* the class embedding (1,000 classes + the null class) is the first position, nothing is modulated;
* blocks: RMSNorm (eps 1e-5) -> attention (fused q/k/v, no biases, LlamaGen's 2-D rotary with zero
  tables at the class token) and RMSNorm -> SwiGLU of width ``find_multiple(int(8 * d / 3), 256)``;
* no learned position table, a final RMSNorm and an untied output head.

:mod:`aimkit.llamagen` maps LlamaGen's tensor names (``tok_embeddings``, ``cls_embedding``,
``layers.N.attention.wqkv``, ``feed_forward.w1/w2/w3``, ``attention_norm``, ``ffn_norm``, ``norm``,
``output``) to aimkit's. Parameter counts (generator only) are in each docstring and asserted in
the tests. LlamaGen's published XL, XXL and 3B weights were trained at 384 px (24 x 24 tokens):
the weights hold no position table, so they load into these presets too; build with
``num_tokens=576, grid_size=24`` to sample them as trained.
"""

from __future__ import annotations

from ..backbones.transformer import TransformerConfig
from ..class_names import imagenet_class_names
from ..config import ComponentSpec, GeneratorConfig, SamplingDefaults
from ..registry import GENERATORS
from .aim import PublishedWeights

__all__ = ["LLAMAGEN_WEIGHTS", "llamagen", "llamagen_b", "llamagen_l", "llamagen_xl", "llamagen_xxl", "llamagen_3b"]

_REPO = "FoundationVision/LlamaGen"
_SOURCE = "LlamaGen authors (FoundationVision/LlamaGen)"

LLAMAGEN_WEIGHTS: dict[str, PublishedWeights] = {
    "llamagen-b": PublishedWeights(_REPO, "c2i_B_256.pt", _SOURCE, "MIT"),
    "llamagen-l": PublishedWeights(_REPO, "c2i_L_256.pt", _SOURCE, "MIT"),
    "llamagen-xl": PublishedWeights(_REPO, "c2i_XL_384.pt", _SOURCE + ", trained at 384 px", "MIT"),
    "llamagen-xxl": PublishedWeights(_REPO, "c2i_XXL_384.pt", _SOURCE + ", trained at 384 px", "MIT"),
    "llamagen-3b": PublishedWeights(_REPO, "c2i_3B_384.pt", _SOURCE + ", trained at 384 px", "MIT"),
}


def llamagen(d_model: int, n_layer: int, n_head: int, cfg_scale: float, *, num_tokens: int = 256,
             grid_size: int = 16, vocab_size: int = 16384, num_classes: int = 1000,
             tokenizer: str | None = "vq-f16") -> GeneratorConfig:
    """A LlamaGen class-conditional GPT of the given size (the component builder of the presets).

    Args:
        d_model, n_layer, n_head: width, depth and attention heads.
        cfg_scale: the guidance scale of LlamaGen's published FID numbers.
        num_tokens, grid_size: image tokens and the side of their square grid.
        vocab_size, num_classes, tokenizer: codebook, classes and tokenizer.
    """
    return GeneratorConfig(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=vocab_size,
        num_classes=num_classes,
        num_tokens=num_tokens,
        class_dropout=0.1,
        norm_eps=1e-5,
        pos_embed=False,
        tie_head=False,
        backbone=ComponentSpec("transformer", TransformerConfig(
            n_head=n_head, n_kv_head=None, mlp_hidden=None, multiple_of=256, rope_base=10000.0, norm_eps=1e-5,
            qkv_bias=False, rope="2d", grid_size=grid_size)),
        conditioning=ComponentSpec("class-token"),
        tokenizer=None if tokenizer is None else ComponentSpec(tokenizer),
        fid_sampling=SamplingDefaults(cfg_scale=cfg_scale, temperature=1.0, top_k=0, top_p=1.0),
        pretty_sampling=SamplingDefaults(cfg_scale=4.0, temperature=1.0, top_k=2000, top_p=1.0),
        class_names=imagenet_class_names() if num_classes == 1000 else None,
    )


@GENERATORS.register("llamagen-b")
def llamagen_b() -> GeneratorConfig:
    """LlamaGen GPT-B: 110,888,448 parameters; d_model 768, 12 layers, 12 heads."""
    return llamagen(768, 12, 12, cfg_scale=2.0)


@GENERATORS.register("llamagen-l")
def llamagen_l() -> GeneratorConfig:
    """LlamaGen GPT-L: 342,910,976 parameters; d_model 1024, 24 layers, 16 heads."""
    return llamagen(1024, 24, 16, cfg_scale=2.0)


@GENERATORS.register("llamagen-xl")
def llamagen_xl() -> GeneratorConfig:
    """LlamaGen GPT-XL: 774,699,520 parameters; d_model 1280, 36 layers, 20 heads."""
    return llamagen(1280, 36, 20, cfg_scale=1.75)


@GENERATORS.register("llamagen-xxl")
def llamagen_xxl() -> GeneratorConfig:
    """LlamaGen GPT-XXL: 1,410,972,672 parameters; d_model 1536, 48 layers, 24 heads."""
    return llamagen(1536, 48, 24, cfg_scale=1.75)


@GENERATORS.register("llamagen-3b")
def llamagen_3b() -> GeneratorConfig:
    """LlamaGen GPT-3B: 3,096,659,200 parameters; d_model 3200, 24 layers, 32 heads (head_dim 100)."""
    return llamagen(3200, 24, 32, cfg_scale=1.65)
