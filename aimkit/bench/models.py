"""Random-weight generators to time: a preset with overrides, or a transformer of matching size."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from ..backbones.mamba2 import Mamba2Config
from ..backbones.transformer import TransformerConfig
from ..errors import ConfigError
from ..policy import ExecutionPolicy

__all__ = ["MAMBA2_ONLY_FIELDS", "build_bench_model", "matched_transformer_layers", "transformer_overrides"]


def _field_names(config_cls) -> frozenset:
    return frozenset(f.name for f in dataclasses.fields(config_cls))


# overrides that only a Mamba2 backbone takes: dropped when its matched transformer is built
MAMBA2_ONLY_FIELDS = _field_names(Mamba2Config) - _field_names(TransformerConfig)


def randomize_zero_init(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Fill all-zero floating parameters (adaLN-Zero modulations) with N(0, std).

    Zero gates would skip every block; timing or checking such a model would measure less than
    the real work.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.device.type != "meta" and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def transformer_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` without the Mamba2-only fields and the explicit ``backbone__*`` ones."""
    return {k: v for k, v in overrides.items() if k not in MAMBA2_ONLY_FIELDS and not k.startswith("backbone__")}


def matched_transformer_layers(name: str, overrides: dict[str, Any]) -> tuple[int, int]:
    """``(n_layer, n_head)`` of a transformer with about the parameters of ``name`` (+ overrides).

    ``n_head = d_model // 64`` (at least 1); the depth is solved from two meta-device builds
    (parameter count is linear in depth) and kept at or above the conditioning's group count.
    """
    from ..build import build, resolve_config

    ref = build(name, device="meta", pretrained=False, **{**overrides, "tokenizer": None}).num_params()
    cfg = resolve_config(name, **{**overrides, "tokenizer": None})
    n_head = max(1, cfg.d_model // 64)
    kw = {**transformer_overrides(overrides), "tokenizer": None, "backbone": "transformer", "n_head": n_head}
    groups = getattr(cfg.conditioning.config, "num_groups", 1) or 1
    lo, hi = max(1, groups), max(2, groups + 1)
    p_lo = build(name, device="meta", pretrained=False, **{**kw, "n_layer": lo}).num_params()
    p_hi = build(name, device="meta", pretrained=False, **{**kw, "n_layer": hi}).num_params()
    per_layer = (p_hi - p_lo) / (hi - lo)
    n_layer = max(lo, round(lo + (ref - p_lo) / per_layer))
    return n_layer, n_head


def build_bench_model(
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    num_tokens: int,
    policy: ExecutionPolicy,
    backbone: str = "mamba2",
    overrides: dict[str, Any] | None = None,
    with_tokenizer: bool = False,
    seed: int = 0,
):
    """A random-weight generator for timing: preset ``name`` with ``num_tokens`` and overrides.

    Args:
        name: a registered preset.
        device, dtype: where and in which dtype to build.
        num_tokens: tokens per image (the position table is sized for it).
        policy: the execution policy under test (stored on the model).
        backbone: ``"mamba2"``, or ``"transformer"`` for the transformer of matching size
            (:func:`matched_transformer_layers`; Mamba2-only overrides are dropped for it).
        overrides: architecture overrides for :func:`aimkit.build`.
        with_tokenizer: keep the preset's tokenizer (random weights) for VQ-decode timing.
        seed: weights seed; all-zero parameters are filled with noise (:func:`randomize_zero_init`).
    """
    from ..build import build, resolve_config

    kw = dict(overrides or {})
    kw["num_tokens"] = num_tokens
    if getattr(resolve_config(name).backbone.config, "grid_size", None) is not None:  # a 2-D rotary grid
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ConfigError(f"{name} places tokens on a square grid; {num_tokens} tokens are not a square")
        kw.setdefault("grid_size", side)
    if not with_tokenizer:
        kw["tokenizer"] = None
    if backbone == "transformer":
        n_layer, n_head = matched_transformer_layers(name, dict(overrides or {}))
        kw = {**transformer_overrides(kw), "backbone": "transformer", "n_layer": n_layer, "n_head": n_head}
    elif backbone != "mamba2":
        kw["backbone"] = backbone
    torch.manual_seed(seed)
    model = build(name, device=device, dtype=dtype, pretrained=False, **kw)
    model.set_policy(policy)
    randomize_zero_init(model, seed)
    return model
