"""Image grids: many samples in one PNG, optionally captioned with their class."""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_path
from ..errors import ConfigError

__all__ = ["CAPTION_LINES", "make_grid", "save_grid", "save_png"]

CAPTION_LINES = 2  # a caption wraps onto at most this many lines under its image


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


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
    """``"207 golden retriever"`` (the id, then the name where known), or ``"207"``."""
    if class_names is None:
        return str(label)
    if not isinstance(class_names, Mapping) and not 0 <= label < len(class_names):
        return str(label)  # a list indexed by -1 would name the last class
    try:
        return f"{label} {class_names[label]}"
    except (KeyError, IndexError):
        return str(label)


def _fit(text: str, width: float, measure: Callable[[str], float]) -> str:
    """``text`` cut to ``width`` pixels, ending in ``..`` when cut."""
    if measure(text) <= width:
        return text
    while len(text) > 1 and measure(text + "..") > width:
        text = text[:-1]
    return text.rstrip() + ".."


def _wrap(text: str, width: float, measure: Callable[[str], float], max_lines: int = CAPTION_LINES) -> list[str]:
    """``text`` broken at spaces into at most ``max_lines`` lines of ``width`` pixels; the last
    line is cut (ending in ``..``) when the rest does not fit."""
    lines: list[str] = []
    words = text.split(" ")
    while words and len(lines) < max_lines - 1:
        line = words.pop(0)
        while words and measure(f"{line} {words[0]}") <= width:
            line = f"{line} {words.pop(0)}"
        if measure(line) > width:  # one word wider than the image: cut it
            words.insert(0, line)
            break
        lines.append(line)
    if words:
        lines.append(_fit(" ".join(words), width, measure))
    return lines


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
        labels: optional (B,) class ids; each image gets a caption below it: the id and, with
            ``class_names``, the name, wrapped onto up to two lines as wide as the image.
        class_names: names for the captions (a list indexed by class, or a mapping).
        padding: white pixels between and around images.

    Returns:
        (rows * (H + caption + padding) + padding, nrow * (W + padding) + padding, 3) uint8.
    """
    images = _as_uint8_array(images)
    count, height, width, _ = images.shape
    nrow = math.ceil(math.sqrt(count)) if nrow is None else nrow
    if not _is_int(nrow) or nrow <= 0:
        raise ConfigError(f"nrow must be a positive integer, got {nrow!r}")
    if not _is_int(padding) or padding < 0:
        raise ConfigError(f"padding must be an integer >= 0, got {padding!r}")
    nrow, padding = int(nrow), int(padding)
    if labels is not None and hasattr(labels, "tolist"):  # a tensor or an array: Python numbers
        labels = labels.tolist()
    if labels is not None and len(labels) != count:
        raise ConfigError(f"got {len(labels)} labels for {count} images")
    if labels is not None and not all(_is_int(label) for label in labels):
        raise ConfigError(f"labels must be integer class ids, got {list(labels)[:8]!r}")
    captions = None if labels is None else _captions(labels, class_names, width)
    line_h = 0 if captions is None else captions[1]
    caption_h = 0 if captions is None else line_h * max(len(lines) for lines in captions[0]) + 4
    rows = math.ceil(count / nrow)
    cell_h, cell_w = height + caption_h + padding, width + padding
    canvas = np.full((rows * cell_h + padding, nrow * cell_w + padding, 3), 255, dtype=np.uint8)
    for i in range(count):
        y, x = padding + (i // nrow) * cell_h, padding + (i % nrow) * cell_w
        canvas[y : y + height, x : x + width] = images[i]
    if captions is None:
        return canvas
    from PIL import Image, ImageDraw

    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for i, lines in enumerate(captions[0]):
        y, x = padding + (i // nrow) * cell_h + height + 2, padding + (i % nrow) * cell_w
        for k, line in enumerate(lines):
            draw.text((x, y + k * line_h), line, fill=(0, 0, 0), font=captions[2])
    return np.asarray(picture)


def _captions(labels: Sequence[int], class_names, width: int) -> tuple[list[list[str]], int, Any]:
    """Each image's caption lines, the height of one line in pixels, and the font."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    _, top, _, bottom = font.getbbox("Ag")
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    measure = functools.partial(draw.textlength, font=font)
    lines = [_wrap(_caption(int(label), class_names), width, measure) for label in labels]
    return lines, bottom - top + 3, font


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
