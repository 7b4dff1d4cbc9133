"""Key maps between aimkit's state-dict layout and LlamaGen's class-conditional GPT checkpoints.

LlamaGen (FoundationVision/LlamaGen, ``autoregressive/models/gpt.py``) saves ``{"model": state_dict}``
from DDP training and a bare state dict from FSDP (``consolidated.pth``); its loaders also accept
``"module"`` (DeepSpeed) and ``"state_dict"`` wrappers. A DDP-wrapped model's ``module.`` and
``torch.compile``'s ``_orig_mod.`` key prefixes are removed here. Its names::

    tok_embeddings.weight                       -> tok_embed.weight
    cls_embedding.embedding_table.weight        -> class_embed.embedding_table.weight  (C + 1 rows)
    layers.N.attention.wqkv.weight / .wo.weight -> backbone.layers.N.mixer.wqkv / .wo
    layers.N.feed_forward.w1 / w2 / w3.weight   -> backbone.layers.N.mlp.w1 / w2 / w3
    layers.N.attention_norm.weight              -> backbone.layers.N.norm.weight
    layers.N.ffn_norm.weight                    -> backbone.layers.N.norm2.weight
    norm.weight                                 -> backbone.norm_f.weight
    output.weight                               -> lm_head.weight  (untied)

Only generators of LlamaGen's architecture take these names (the ``transformer`` backbone,
``class-token`` conditioning, no position table, an untied head: the ``llamagen-*`` presets).
Every rename is explicit; a key that the map does not know is kept and then reported as unexpected.
"""

from __future__ import annotations

from torch import Tensor

from .errors import CheckpointError

__all__ = ["llamagen_key_map", "is_llamagen", "from_llamagen", "to_llamagen"]

_MARKERS = ("tok_embeddings.weight", "cls_embedding.embedding_table.weight")
_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_LAYER_NAMES = {
    "attention.wqkv.weight": "mixer.wqkv.weight",
    "attention.wo.weight": "mixer.wo.weight",
    "feed_forward.w1.weight": "mlp.w1.weight",
    "feed_forward.w2.weight": "mlp.w2.weight",
    "feed_forward.w3.weight": "mlp.w3.weight",
    "attention_norm.weight": "norm.weight",
    "ffn_norm.weight": "norm2.weight",
}


def _check_architecture(gen) -> None:
    config = gen.config
    problems = []
    if config.backbone.name != "transformer":
        problems.append(f"backbone {config.backbone.name!r} (LlamaGen: 'transformer')")
    if config.conditioning.name != "class-token":
        problems.append(f"conditioning {config.conditioning.name!r} (LlamaGen: 'class-token')")
    if config.pos_embed:
        problems.append("a learned position table (LlamaGen: rotary positions only)")
    if config.tie_head:
        problems.append("a tied head (LlamaGen: its own output.weight)")
    if problems:
        raise CheckpointError("LlamaGen checkpoints fit LlamaGen's architecture (the llamagen-* presets); this "
                              "generator has " + "; ".join(problems))


def llamagen_key_map(gen) -> dict[str, str]:
    """aimkit key -> LlamaGen key for the generator part of ``gen`` (LlamaGen's architecture only)."""
    _check_architecture(gen)
    out = {
        "tok_embed.weight": "tok_embeddings.weight",
        "class_embed.embedding_table.weight": "cls_embedding.embedding_table.weight",
        "backbone.norm_f.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }
    for i in range(gen.config.n_layer):
        for theirs, ours in _LAYER_NAMES.items():
            out[f"backbone.layers.{i}.{ours}"] = f"layers.{i}.{theirs}"
    return out


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def is_llamagen(state: dict[str, Tensor]) -> bool:
    """True when the keys look like a LlamaGen GPT checkpoint (``tok_embeddings`` / ``cls_embedding``)."""
    return any(_strip_wrappers(k) in _MARKERS for k in state)


def from_llamagen(gen, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a LlamaGen state dict to aimkit keys; unknown keys are kept (and later reported)."""
    reverse = {v: k for k, v in llamagen_key_map(gen).items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = _strip_wrappers(key)
        target = reverse.get(name, name)
        if target in out:
            raise CheckpointError(f"LlamaGen checkpoint holds {name!r} twice (with and without a wrapper prefix)")
        out[target] = value
    return out


def to_llamagen(gen) -> dict[str, Tensor]:
    """The generator as a LlamaGen-layout state dict (what LlamaGen's ``GPT.load_state_dict`` takes)."""
    own = gen.state_dict()
    return {theirs: own[ours] for ours, theirs in llamagen_key_map(gen).items()}
