"""The optimizer and learning-rate schedule every training caller uses (trainer, benchmarks, probes).

:func:`param_groups` is the one definition of which parameters get weight decay: trainable
tensors with >= 2 dims (matrices, embeddings, convolutions) unless marked ``_no_weight_decay``
(Mamba2's ``A_log``, ``D``, ``dt_bias``); biases and norms never decay.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["lr_factor", "make_optimizer", "make_scheduler", "param_groups"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: ``[decayed, not decayed]``. Tied weights appear once (``named_parameters``
    de-duplicates them); frozen parameters (``requires_grad=False``) appear in neither."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
    capturable: bool = False,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` of ``model``.

    Args:
        model: the module to train (its first parameter's device decides ``fused``).
        lr: peak learning rate.
        weight_decay: decay of the decayed group.
        betas: AdamW's betas.
        eps: AdamW's eps.
        fused: the fused CUDA implementation; None: on CUDA.
        capturable: an update that a CUDA graph can capture (:class:`~aimkit.training.step.GraphedStep`);
            the learning rate is then a device tensor, which the schedule changes in place.
    """
    device = next(model.parameters()).device
    fused = device.type == "cuda" if fused is None else fused
    return torch.optim.AdamW(
        param_groups(model, weight_decay),
        lr=torch.tensor(lr, device=device) if capturable else lr,
        betas=betas, eps=eps, fused=fused or None, capturable=capturable,
    )


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup over
    ``warmup`` steps, then ``constant``, ``cosine`` or ``linear`` decay to ``min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - min_ratio) * progress  # linear


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, total: int, warmup: int = 0, schedule: str = "constant", min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The :func:`lr_factor` schedule as a ``LambdaLR`` (its ``state_dict`` is what checkpoints hold)."""
    shape = dict(total=total, warmup=warmup, schedule=schedule, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, **shape))
