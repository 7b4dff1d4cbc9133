"""What trackers (tensorboard, wandb through HF accelerate) are handed: a flat config of scalars
and strings, and sample grids as images."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["flat_config", "log_image"]

Scalar = int | float | str | bool


def flat_config(data: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """``{"model_args": {"d_model": 64}, "betas": [0.9, 0.95], "init_from": None}`` ->
    ``{"model_args.d_model": 64, "betas.0": 0.9, "betas.1": 0.95, "init_from": "null"}``.

    Mappings and sequences become dotted keys (an empty one its YAML text, ``{}`` / ``[]``),
    ``None`` the string ``"null"``, anything else that is not a bool, int, float or str its
    ``str()``: tensorboard's ``add_hparams`` takes nothing else.
    """
    out: dict[str, Scalar] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, name + ".") if value else {name: "{}"})
        elif isinstance(value, (list, tuple)):
            items = {str(i): v for i, v in enumerate(value)}
            out.update(flat_config(items, name + ".") if items else {name: "[]"})
        elif value is None:
            out[name] = "null"
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def log_image(trackers, name: str, image: np.ndarray, step: int) -> list[str]:
    """Send one (H, W, 3) uint8 picture to every tracker that takes images; returns their names."""
    sent = []
    for tracker in trackers:
        if not callable(getattr(tracker, "log_images", None)):
            continue
        if tracker.name == "tensorboard":  # SummaryWriter.add_images: a batch, layout named
            tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
        else:  # wandb and others: a list of images
            tracker.log_images({name: [image]}, step=step)
        sent.append(tracker.name)
    return sent
