"""Key maps between aimkit's state-dict layout and the official AiM checkpoints.

Official checkpoints (hp-l33/aim-base, aim-large, aim-xlarge) hold the generator under ``mamba.``
and LlamaGen's VQ-f16 tokenizer under ``vqvae.``. The tied ``lm_head.weight`` /
``word_embeddings.weight`` pair may appear once or twice. Every rename is explicit: a key that no
map knows is reported as unexpected, never dropped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import CheckpointError

__all__ = ["official_key_map", "from_official", "to_official", "is_official"]

_TIED_OFFICIAL = ("mamba.lm_head.weight", "mamba.backbone.embeddings.word_embeddings.weight")


def official_key_map(gen) -> dict[str, str]:
    """aimkit key -> official key for the generator part of ``gen`` (AiM's layout only: a Mamba2
    backbone, a learned position table, a tied head and an adaLN kind with its final layer)."""
    config, problems = gen.config, []
    if config.backbone.name != "mamba2":
        problems.append(f"backbone {config.backbone.name!r} (AiM: 'mamba2')")
    if not config.pos_embed:
        problems.append("no position table (AiM: a learned one)")
    if not config.tie_head:
        problems.append("an untied head (AiM: tied to the token embedding)")
    if gen.final_layer is None:
        problems.append(f"conditioning {config.conditioning.name!r} without a final adaLN layer")
    if problems:
        raise CheckpointError("official AiM checkpoints hold AiM's layout; this generator has " + "; ".join(problems))
    out = {
        "tok_embed.weight": "backbone.embeddings.word_embeddings.weight",
        "pos_embed.weight": "backbone.embeddings.position_embeddings.weight",
        "class_embed.embedding_table.weight": "backbone.cls_embed.embedding_table.weight",
        "final_layer.norm.weight": "backbone.final_layer.norm_final.weight",
        "final_layer.modulation.weight": "backbone.final_layer.adaLN_modulation.1.weight",
        "final_layer.modulation.bias": "backbone.final_layer.adaLN_modulation.1.bias",
        "backbone.norm_f.weight": "backbone.norm_f.weight",
    }
    for key in gen.backbone.state_dict():
        if key.startswith("layers."):
            out[f"backbone.{key}"] = f"backbone.{key}"
    for key, official in gen.conditioning.official_key_map().items():
        out[f"conditioning.{key}"] = official
    return {k: f"mamba.{v}" for k, v in out.items()}


def is_official(state: dict[str, Tensor]) -> bool:
    """True when the keys look like an official AiM checkpoint (``mamba.`` / ``vqvae.`` prefixes)."""
    return any(k.startswith(("mamba.", "vqvae.")) for k in state)


def from_official(gen, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an official state dict to aimkit keys; unknown keys are kept (and later reported),
    and a tensor that two keys would give one aimkit name raises."""
    state = dict(state)
    tied = [state[k] for k in _TIED_OFFICIAL if k in state]
    if len(tied) == 2 and not torch.equal(tied[0], tied[1]):
        raise CheckpointError("lm_head.weight and word_embeddings.weight differ, but AiM ties them")
    if tied:
        state.pop(_TIED_OFFICIAL[0], None)
        state[_TIED_OFFICIAL[1]] = tied[0]
    reverse = {v: k for k, v in official_key_map(gen).items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        target = "tokenizer." + key[len("vqvae."):] if key.startswith("vqvae.") else reverse.get(key, key)
        if target in out:
            raise CheckpointError(f"official AiM checkpoint holds {target!r} twice (under its official and "
                                  "its aimkit name)")
        out[target] = value
    return out


def to_official(gen) -> dict[str, Tensor]:
    """The generator (and tokenizer) as an official-layout state dict (both tied keys present)."""
    mapping = official_key_map(gen)
    own = gen.state_dict()
    out = {official: own[key] for key, official in mapping.items()}
    out["mamba.lm_head.weight"] = own["tok_embed.weight"]
    if gen.tokenizer is not None:
        out.update({f"vqvae.{k}": v for k, v in gen.tokenizer.state_dict().items()})
    return out


def split_expected(gen) -> tuple[int, int]:  # pragma: no cover - helper for reports
    return len(official_key_map(gen)), len(gen.tokenizer.state_dict()) if gen.tokenizer is not None else 0
