"""Image grids: many samples in one PNG, optionally captioned with their class."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_path
from ..errors import ConfigError

__all__ = ["make_grid", "save_grid", "save_png"]


def _as_uint8_array(images: Any) -> np.ndarray:
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().cpu().numpy()
    elif isinstance(images, (list, tuple)):  # PIL images or arrays
        images = np.stack([np.asarray(im) for im in images])
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise ConfigError(
            f"images must be a non-empty uint8 array of shape (B, H, W, 3), got "
            f"{images.dtype} {tuple(images.shape)} (use generate(..., output='uint8'))"
        )
    return images


def _caption(label: int, class_names: Sequence[str] | Mapping[int, str] | None) -> str:
    if class_names is None:
        return str(label)
    try:
        return f"{label} {class_names[label]}"
    except (KeyError, IndexError):
        return str(label)


def make_grid(
    images: Any,
    nrow: int | None = None,
    labels: Sequence[int] | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    padding: int = 2,
) -> np.ndarray:
    """Tile images into one picture.

    Args:
        images: (B, H, W, 3) uint8 array or tensor (or a list of PIL images).
        nrow: images per row; default ``ceil(sqrt(B))``.
        labels: optional (B,) class ids; each image gets a caption strip below it.
        class_names: names for the captions (a list indexed by class, or a mapping).
        padding: white pixels between and around images.

    Returns:
        (rows * (H + caption + padding) + padding, nrow * (W + padding) + padding, 3) uint8.
    """
    images = _as_uint8_array(images)
    count, height, width, _ = images.shape
    nrow = nrow or math.ceil(math.sqrt(count))
    if nrow <= 0:
        raise ConfigError(f"nrow must be positive, got {nrow}")
    if labels is not None and len(labels) != count:
        raise ConfigError(f"got {len(labels)} labels for {count} images")
    rows = math.ceil(count / nrow)
    font = None
    caption_h = 0
    if labels is not None:
        from PIL import ImageFont

        font = ImageFont.load_default()
        _, top, _, bottom = font.getbbox("Ag")
        caption_h = bottom - top + 6
    cell_h, cell_w = height + caption_h + padding, width + padding
    canvas = np.full((rows * cell_h + padding, nrow * cell_w + padding, 3), 255, dtype=np.uint8)
    for i in range(count):
        y, x = padding + (i // nrow) * cell_h, padding + (i % nrow) * cell_w
        canvas[y : y + height, x : x + width] = images[i]
    if labels is None:
        return canvas
    from PIL import Image, ImageDraw

    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for i, label in enumerate(labels):
        text = _caption(int(label), class_names)
        while len(text) > 1 and draw.textlength(text, font=font) > width:
            text = text[:-1]
        y, x = padding + (i // nrow) * cell_h + height + 2, padding + (i % nrow) * cell_w
        draw.text((x, y), text, fill=(0, 0, 0), font=font)
    return np.asarray(picture)


def save_grid(
    images_uint8: Any,
    path: str | os.PathLike,
    nrow: int | None = None,
    labels: Sequence[int] | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
) -> Path:
    """Write a PNG grid of images (see :func:`make_grid` for the arguments).

    The PNG is written atomically: on any failure (a full disk, say) an existing file at ``path``
    is left as it was and no partial file remains.

    Returns:
        The path written; parent folders are created.

    Raises:
        ConfigError: bad images, or ``path`` is an existing directory.
    """
    grid = make_grid(images_uint8, nrow=nrow, labels=labels, class_names=class_names)
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"cannot write the grid to {path}: it is a directory (give a .png file name)")
    save_png(grid, path)
    return path


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Write one (H, W, 3) uint8 image as a PNG, atomically (see :func:`aimkit._io.atomic_path`)."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
