"""Procedural class-conditional image dataset: coloured shapes on dark backgrounds.

Every image is generated on the fly from a seed, so the dataset needs no download and any
item can be reproduced exactly. A class is a (shape, colour) pair::

    class k  ->  shape SHAPES[k // len(COLOURS)], colour COLOURS[k % len(COLOURS)]

which gives 6 x 6 = 36 classes named like ``"red circle"``. An image shows one antialiased
shape (random centre, size 35-70% of the image, rotation, slight colour jitter) on a plain
dark/neutral background that may carry a subtle texture (low-amplitude noise or stripes), so
the shape's colour stays unambiguous.

Rendering draws a coverage mask with PIL at 4x resolution and box-reduces it (an exact
16-sample area average per pixel), then alpha-blends the shape colour onto the background in
PIL's C code (a LANCZOS downsample costs ~0.6 ms per mask and is not needed for flat shapes).
One 64 px image takes about 0.25 ms on one CPU core (~4000 images/s).

Seeding: item ``i`` of ``ShapesDataset(n, seed)`` is rendered from
``numpy.random.default_rng([seed, i])`` and has label ``i % NUM_CLASSES``; :func:`make_batch`
and :func:`export_image_folder` use the same stream, so the three views agree image for image.

Example:
    >>> ds = ShapesDataset(1000, seed=0)
    >>> image, label = ds[3]          # (3, 64, 64) float in [-1, 1], 3
    >>> class_names()[label]
    'yellow circle'
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .._io import atomic_path, write_text_atomic
from .._lock import LOCK_NAME, FolderLock
from ..errors import ConfigError

__all__ = [
    "COLOURS",
    "NUM_CLASSES",
    "SHAPES",
    "ShapesDataset",
    "class_folder_names",
    "class_names",
    "export_image_folder",
    "make_batch",
    "render",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross", "star")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
NUM_CLASSES: int = len(SHAPES) * len(COLOURS)

# Base RGB of each colour in [0, 1]; saturated and bright so they stand out on dark backgrounds.
_COLOUR_RGB = np.array(
    [
        (0.92, 0.12, 0.10),  # red
        (0.15, 0.80, 0.20),  # green
        (0.18, 0.38, 0.98),  # blue
        (0.95, 0.88, 0.12),  # yellow
        (0.90, 0.15, 0.85),  # magenta
        (0.10, 0.85, 0.92),  # cyan
    ],
    dtype=np.float64,
)

_SUPERSAMPLE = 4  # mask drawn at 4x resolution, then box-reduced (area antialiasing)
_SIZE_RANGE = (0.35, 0.70)  # diameter of the shape's bounding circle, as a fraction of the image
_COLOUR_JITTER = 0.06  # per-channel uniform jitter of the shape colour
_BACKGROUND_TONE = (0.05, 0.30)  # grey level of the background
_BACKGROUND_TINT = 0.04  # per-channel deviation of the background from neutral grey
_TEXTURE_AMPLITUDE = (0.01, 0.04)  # amplitude of background noise / stripes
_MIN_IMAGE_SIZE = 8


def class_names() -> list[str]:
    """Human-readable class names, index = label.

    Returns:
        ``NUM_CLASSES`` strings like ``"red circle"``, ``"green circle"``, ..., ``"cyan star"``.
    """
    return [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]


def class_folder_names() -> list[str]:
    """ImageFolder directory names, index = label: ``"00_red_circle"``, ``"01_green_circle"``, ..."""
    return [f"{k:02d}_{name.replace(' ', '_')}" for k, name in enumerate(class_names())]


def _check_label(label: int) -> int:
    label = int(label)
    if not 0 <= label < NUM_CLASSES:
        raise ConfigError(f"label must be in [0, {NUM_CLASSES}), got {label}")
    return label


def _check_image_size(image_size: int) -> int:
    if int(image_size) != image_size or image_size < _MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size must be an integer >= {_MIN_IMAGE_SIZE}, got {image_size!r}")
    return int(image_size)


def _polygon(shape: str, radius: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Vertices (V, 2) of a polygonal shape centred at the origin within a circle of ``radius``."""
    if shape == "square":
        t = angle + np.arange(4) * (math.pi / 2)
        r = np.full(4, radius)
    elif shape == "triangle":
        t = angle + np.arange(3) * (2 * math.pi / 3)
        r = np.full(3, radius)
    elif shape == "star":
        t = angle + np.arange(10) * (math.pi / 5)
        r = np.where(np.arange(10) % 2 == 0, radius, radius * rng.uniform(0.42, 0.50))
    elif shape == "cross":
        ratio = rng.uniform(0.28, 0.36)  # arm half-width / arm half-length
        arm = radius / math.sqrt(1.0 + ratio * ratio)  # outer corners touch the circle
        w = ratio * arm
        quarter = np.array([(w, arm), (w, w), (arm, w)])  # one arm tip's side, inner corner, next arm
        turn = np.array([[0.0, -1.0], [1.0, 0.0]])  # (x, y) -> (y, -x): a quarter turn
        xy = np.concatenate([quarter @ np.linalg.matrix_power(turn, q) for q in range(4)])  # (12, 2)
        c, s = math.cos(angle), math.sin(angle)
        return xy @ np.array([[c, s], [-s, c]])
    else:  # pragma: no cover - guarded by SHAPES
        raise ConfigError(f"unknown polygon shape {shape!r}")
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


_UNIT_LEVELS = np.linspace(-1.0, 1.0, 256)[:, None]  # (256, 1): uint8 texture code -> [-1, 1]


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    """A dark, near-neutral background, flat or with subtle noise/stripes: RGB (W=H=size)."""
    tone = rng.uniform(*_BACKGROUND_TONE) + rng.uniform(-_BACKGROUND_TINT, _BACKGROUND_TINT, 3)
    kind = rng.integers(3)  # 0 flat, 1 noise, 2 stripes
    amplitude = rng.uniform(*_TEXTURE_AMPLITUDE)
    if kind == 0:
        return Image.new("RGB", (size, size), tuple(int(v) for v in np.round(tone * 255.0)))
    # The texture is a uint8 code per pixel (0..255 <-> -1..1); a 256-entry RGB palette maps
    # each code to tone + amplitude * code, so the RGB image is made in one C pass.
    if kind == 1:
        codes = np.frombuffer(rng.bytes(size * size), dtype=np.uint8)  # uniform noise
    else:
        period = rng.uniform(4.0, 12.0)
        phi, phase = rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
        freq = 2 * math.pi / period
        coords = np.arange(size, dtype=np.float32)
        line = (coords * (math.sin(phi) * freq) + phase)[:, None] + coords * (math.cos(phi) * freq)
        codes = ((np.sin(line) + 1.0) * 127.5 + 0.5).astype(np.uint8)  # stripes (H, W)
    palette = np.clip(np.round((tone + amplitude * _UNIT_LEVELS) * 255.0), 0, 255).astype(np.uint8)
    image = Image.frombytes("L", (size, size), codes.tobytes())
    image.putpalette(palette.tobytes(), "RGB")  # (256, 3) palette; image becomes mode "P"
    return image.convert("RGB")


def render(label: int, rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
    """Render one image of class ``label``.

    Args:
        label: Class index in ``[0, NUM_CLASSES)``.
        rng: Source of all randomness (background, placement, size, rotation, jitter).
        image_size: Side length ``H = W`` in pixels.

    Returns:
        uint8 array (H, W, 3).
    """
    label = _check_label(label)
    size = _check_image_size(image_size)
    shape = SHAPES[label // len(COLOURS)]
    base = _COLOUR_RGB[label % len(COLOURS)]

    image = _background(size, rng)  # PIL RGB
    colour = np.clip(base + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, 3), 0.0, 1.0)
    radius = 0.5 * size * rng.uniform(*_SIZE_RANGE)
    margin = radius + 0.5
    cx, cy = rng.uniform(margin, size - margin, 2)
    angle = rng.uniform(0.0, 2 * math.pi)

    k = _SUPERSAMPLE
    mask = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(mask)
    if shape in ("circle", "ring"):
        r = radius * k
        draw.ellipse((cx * k - r, cy * k - r, cx * k + r, cy * k + r), fill=255)
        if shape == "ring":
            r_in = r * rng.uniform(0.50, 0.65)
            draw.ellipse((cx * k - r_in, cy * k - r_in, cx * k + r_in, cy * k + r_in), fill=0)
    else:
        xy = (_polygon(shape, radius, angle, rng) + (cx, cy)) * k
        draw.polygon([tuple(p) for p in xy.tolist()], fill=255)
    mask = mask.reduce(k)  # box filter: each pixel = fraction of its 16 sub-samples covered

    image.paste(tuple(int(v) for v in np.round(colour * 255)), mask=mask)  # alpha blend
    return np.array(image)  # writable copy


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3).float()
    return x.div_(127.5).sub_(1.0)


def make_batch(
    n: int,
    seed: int,
    image_size: int = 64,
    labels: Sequence[int] | torch.Tensor | None = None,
    start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render a batch of images; image ``j`` equals ``ShapesDataset(.., seed)[start + j]``.

    Args:
        n: Number of images.
        seed: Dataset seed; image ``j`` uses ``default_rng([seed, start + j])``.
        image_size: Side length in pixels.
        labels: Optional (n,) class indices overriding the default balanced labels
            ``(start + j) % NUM_CLASSES``.
        start: Index of the first image in the seed's stream (lets training walk an endless
            stream batch by batch).

    Returns:
        ``(images, labels)``: float32 (n, 3, H, W) in [-1, 1] and int64 (n,).
    """
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    size = _check_image_size(image_size)
    if labels is None:
        label_array = (np.arange(start, start + n) % NUM_CLASSES).astype(np.int64)
    else:
        label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
        if label_array.shape[0] != n:
            raise ConfigError(f"labels has {label_array.shape[0]} entries, expected n={n}")
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for j in range(n):
        out[j] = render(int(label_array[j]), np.random.default_rng([seed, start + j]), size)
    return _to_tensor(out), torch.from_numpy(label_array)


class ShapesDataset(Dataset):
    """A map-style dataset of ``num_samples`` procedural images, rendered on access.

    Item ``i`` is always the same image: it is rendered from ``default_rng([seed, i])`` and has
    label ``i % NUM_CLASSES``, so labels are balanced (exactly, when ``num_samples`` is a
    multiple of ``NUM_CLASSES``).

    Args:
        num_samples: Dataset length.
        seed: Seed of the image stream; different seeds give disjoint image streams.
        image_size: Side length ``H = W`` in pixels.
    """

    def __init__(self, num_samples: int, seed: int = 0, image_size: int = 64) -> None:
        if num_samples < 0:
            raise ConfigError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.image_size = _check_image_size(image_size)
        self.classes = class_names()

    def __len__(self) -> int:
        return self.num_samples

    def label(self, index: int) -> int:
        """The label of item ``index`` without rendering it."""
        return self._index(index) % NUM_CLASSES

    def render_uint8(self, index: int) -> np.ndarray:
        """Item ``index`` as uint8 (H, W, 3)."""
        i = self._index(index)
        return render(i % NUM_CLASSES, np.random.default_rng([self.seed, i]), self.image_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Returns ``(image, label)``: float32 (3, H, W) in [-1, 1] and an int."""
        return _to_tensor(self.render_uint8(index)), self.label(index)

    def _index(self, index: int) -> int:
        i = int(index)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {index} out of range for ShapesDataset of length {self.num_samples}")
        return i


def export_image_folder(out_dir: str | Path, num_per_class: int, seed: int = 0, image_size: int = 64) -> Path:
    """Write an ImageFolder tree of PNGs for the generic tokenize/train pipeline.

    Layout: ``out_dir/<class_idx:02d>_<colour>_<shape>/<i:05d>.png``. Image ``i`` of class
    ``c`` is item ``i * NUM_CLASSES + c`` of ``ShapesDataset(.., seed, image_size)``.

    Every PNG is written atomically (a kill never leaves a truncated image under its final
    name), the export holds :class:`~aimkit._lock.FolderLock` on ``out_dir`` while it writes, and
    its settings are recorded in ``out_dir/.shapes_export.json`` first. A rerun with the same
    settings resumes: images already there are kept, the missing ones are written. A folder
    holding anything else (another export's images, unrelated files) is refused, so images of
    two exports are never mixed and nothing in the folder is overwritten.

    Args:
        out_dir: Root directory (created if missing; must be empty or hold an interrupted or
            finished export with the same settings).
        num_per_class: Images per class.
        seed: Dataset seed.
        image_size: Side length in pixels.

    Returns:
        The root directory as a :class:`~pathlib.Path`.

    Raises:
        ConfigError: a bad setting, or ``out_dir`` holds something other than this export.
        FolderBusyError: another process is writing ``out_dir``.
    """
    if num_per_class < 0:
        raise ConfigError(f"num_per_class must be >= 0, got {num_per_class}")
    size = _check_image_size(image_size)
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"cannot export shapes to {root}: it exists and is not a folder")
    settings = {
        "format": "aimkit-shapes-export",
        "num_per_class": int(num_per_class),
        "seed": int(seed),
        "image_size": size,
    }
    with FolderLock(root, command="export_image_folder", remove=True):  # a data set, not a run folder
        _claim_export_folder(root, settings)
        folders = [root / name for name in class_folder_names()]
        for folder in folders:
            folder.mkdir(exist_ok=True)
            for stale in folder.glob(".?????.png.*.tmp"):  # temp files of a killed export; we hold the lock
                stale.unlink(missing_ok=True)
        for i in range(num_per_class):
            for c, folder in enumerate(folders):
                path = folder / f"{i:05d}.png"
                if path.is_file():  # written (atomically) by an interrupted run with these settings
                    continue
                pixels = render(c, np.random.default_rng([seed, i * NUM_CLASSES + c]), size)
                with atomic_path(path) as tmp:
                    Image.fromarray(pixels).save(tmp, format="PNG")
    return root


_EXPORT_RECORD = ".shapes_export.json"  # hidden: the image-folder scan skips dot files


def _claim_export_folder(root: Path, settings: dict) -> None:
    """Record ``settings`` in an empty ``root``, or check that ``root`` holds an export with them."""
    record = root / _EXPORT_RECORD
    if record.is_file():
        try:
            earlier = json.loads(record.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            earlier = None
        if earlier == settings:
            return
        if not isinstance(earlier, dict):
            raise ConfigError(f"{record} is damaged; export into an empty folder")
        changed = ", ".join(f"{k} {earlier.get(k)!r} -> {v!r}" for k, v in settings.items() if earlier.get(k) != v)
        raise ConfigError(
            f"{root} holds a shapes export with other settings ({changed}); "
            "rerun with the same settings to resume, or export into an empty folder"
        )
    if any(entry.name != LOCK_NAME for entry in root.iterdir()):
        raise ConfigError(f"{root} is not empty and holds no shapes export; export into an empty folder")
    write_text_atomic(record, json.dumps(settings, indent=1) + "\n")
