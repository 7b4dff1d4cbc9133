"""Changing a generator's conditioning kind (:meth:`aimkit.Generator.convert_conditioning`).

The new module is built from the old one's per-layer maps in their stored parts
(:meth:`~aimkit.conditioning.adaln.AdaLNBase.per_layer_parts`), so a target that keeps the source's
projections keeps its tensors bit for bit; everything else of the generator (embeddings, backbone,
head, tokenizer, config fields, dtype, device, train/eval mode, policy) is carried over unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ComponentSpec, check_value, config_from_dict
from ..registry import CONDITIONING
from .adaln import AdaLNBase, InexactConversionError

__all__ = ["convert_conditioning"]


def convert_conditioning(gen: nn.Module, kind: str, approximate: bool = False, **options: Any) -> nn.Module:
    """A copy of the generator ``gen`` whose conditioning is ``kind`` with ``options`` (see
    :meth:`aimkit.Generator.convert_conditioning`); sets ``conversion_error`` on the copy."""
    check_value(kind, str, "conditioning kind")
    check_value(approximate, bool, "approximate")
    target_cls = CONDITIONING.get(kind)
    target_config = config_from_dict(target_cls.config_cls, options, where=f"conditioning {kind!r}")
    source = gen.conditioning
    dtype = _dtype_of(source, gen)  # the module's storage dtype, kept
    for owner, method in ((type(source), "per_layer_affine"), (target_cls, "from_per_layer_affine")):
        if not callable(getattr(owner, method, None)):
            raise InexactConversionError(f"cannot convert {gen.config.conditioning.name} conditioning to {kind}: "
                                         f"{owner.__name__} has no {method}(), so its maps cannot be carried over")
    if getattr(target_cls, "final_modulation", True) != getattr(source, "final_modulation", True):
        raise InexactConversionError(
            f"cannot convert {gen.config.conditioning.name} conditioning to {kind}: one modulates a final "
            "adaLN layer and the other has none, so no conversion reproduces the model exactly")
    if not target_cls.final_modulation:  # class-token to class-token: nothing to map (no (L, cD, D) zeros)
        target, err, rounding = copy.deepcopy(source), 0.0, 0.0
    else:
        target, err, rounding = _convert_module(source, target_cls, target_config, approximate, dtype)
    target.train(source.training)
    if any(True for _ in source.parameters()) and not any(p.requires_grad for p in source.parameters()):
        target.requires_grad_(False)  # a frozen conditioning stays frozen
    new = _copy_with(gen, target, ComponentSpec(kind, target_config))
    new.conversion_error = max(err, rounding)
    if err > 0:
        warnings.warn(
            f"approximate conversion to {kind}: layers that now share a projection use the average of their "
            f"weights, which changes them by up to {err:.4g} (the logits change too)", stacklevel=3)
    elif rounding > 0:
        warnings.warn(
            f"conversion to {kind} is exact in float32, but storing it in {dtype} rounds the "
            f"modulation maps by up to {rounding:.3g}; convert in float32 for identical logits", stacklevel=3)
    return new


def _convert_module(source: nn.Module, target_cls: type, config, approximate: bool,
                    dtype: torch.dtype) -> tuple[nn.Module, float, float]:
    """(new module, max abs weight change of an approximation, max abs rounding of storing it)."""
    with torch.no_grad():
        weight, bias, table, shared = _parts(source)
        if _takes_parts(target_cls):
            target, err = target_cls.from_per_layer_affine(
                weight, bias, source.chunks, config, approximate=approximate, table=table, shared=shared)
        else:  # a kind with the plain (weight, bias) interface
            target, err = target_cls.from_per_layer_affine(
                weight, bias + table, source.chunks, config, approximate=approximate)
        if weight.is_meta:
            return target.to(dtype), 0.0, 0.0  # no values, nothing to round
        # exact: the new maps must be the source's; approximated: the ones built (before storing)
        w_want, b_want = source.per_layer_affine() if err == 0 else target.per_layer_affine()
        target = target.to(dtype)
        w_new, b_new = target.per_layer_affine()
        rounding = max(_max_abs_diff(w_new, w_want), _max_abs_diff(b_new, b_want))
    return target, float(err), float(rounding)


def _parts(module: nn.Module) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """``per_layer_parts()``, or for a kind that only has ``per_layer_affine()`` its maps with zero
    tables, each layer its own projection."""
    if getattr(type(module), "per_layer_parts", AdaLNBase.per_layer_parts) is not AdaLNBase.per_layer_parts:
        weight, bias, table, shared = module.per_layer_parts()
    else:
        weight, bias = module.per_layer_affine()
        table, shared = torch.zeros_like(bias), list(range(weight.shape[0]))
    return weight.detach(), bias.detach(), table.detach(), list(shared)


def _takes_parts(target_cls: type) -> bool:
    params = inspect.signature(target_cls.from_per_layer_affine).parameters
    return "table" in params and "shared" in params


def _dtype_of(module: nn.Module, gen: nn.Module) -> torch.dtype:
    """The dtype the module's floating tensors are stored in (the generator's when it has none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return gen.dtype


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.to(b.dtype) - b).abs().max().item()


def _copy_with(gen: nn.Module, conditioning: nn.Module, spec: ComponentSpec) -> nn.Module:
    """A deep copy of ``gen`` holding ``conditioning`` (the old module is not copied) and the
    same (immutable) execution policy object."""
    memo = {id(gen.conditioning): conditioning, id(gen.policy): gen.policy}
    new = copy.deepcopy(gen, memo)
    new.config = dataclasses.replace(gen.config, conditioning=spec)
    return new
