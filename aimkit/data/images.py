"""Reading an ImageFolder tree for ``aimkit tokenize``: the folder scan, image loading, crops.

Scan (:func:`scan_image_folder`): ``ROOT/<class>/<image>``, images anywhere below their class
folder. Symbolic links are followed, but every directory is entered once (no loops) and every
file is listed once (by its real path). A file or directory whose real location lies inside
another class folder belongs to that class: it is not listed again under the class that links to
it, so a link never gives an image the wrong label. Class folders without images stay classes
(their ids do not shift); the scan names them.

Loading (:func:`load_image`): only the header is read before the size checks, so a tiny file that
claims a huge image costs nothing. Images over :data:`MAX_PIXELS` pixels or more elongated than
:data:`MAX_ASPECT_RATIO` are skipped (:class:`ImageSkipped` says why), as are PIL decompression
bombs. Every PIL mode becomes 8-bit RGB (:func:`to_rgb`):

* ``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ...: PIL's own conversion.
* 16-bit gray (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``): the top 8 bits (``v >> 8``; 65535 -> 255).
* 32-bit integer ``I``: read as 16-bit when its real depth is 16 bits (a 16-bit PNG, a TIFF
  with 16 bits per sample, or values that fit in 16 bits: ``v >> 8``), else a 32-bit signed
  value whose positive range 0..2**31-1 maps to 0..255 (``v >> 23``); negative values become 0.
* float ``F``: values in [0, 1] are scaled by 255; otherwise values are taken as 0..255 and
  clipped (as PIL does); NaN becomes 0.
* Transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour, premultiplied
  modes): composited on WHITE, as an image viewer shows it (the colour of a fully transparent
  pixel is arbitrary and often black, so dropping the alpha would invent black shapes).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = [
    "IMAGE_EXTENSIONS",
    "RESIZE_RATIO",
    "MAX_PIXELS",
    "MAX_ASPECT_RATIO",
    "ImageScan",
    "ImageSkipped",
    "scan_image_folder",
    "find_images",
    "check_image_size",
    "to_rgb",
    "load_image",
    "variant_names",
    "crop_variants",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
RESIZE_RATIO = 1.125  # resize the short side to 1.125 x the crop size (288 for 256), as AiM and LlamaGen
MAX_PIXELS = 64 * 1024 * 1024  # larger images are skipped (decoding one takes ~200 MB and more)
MAX_ASPECT_RATIO = 20.0  # long side / short side; beyond it the resized strip would be huge
_FIVE = ("top-left", "top-right", "bottom-left", "bottom-right", "center")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_GRAY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


# --------------------------------------------------------------------------------------------
# the folder scan
# --------------------------------------------------------------------------------------------


@dataclass
class ImageScan:
    """What :func:`scan_image_folder` found."""

    files: list[tuple[str, int]]  # sorted (path, label) pairs
    classes: list[str]  # class folder names, index = label
    empty_classes: list[str] = field(default_factory=list)  # class folders holding no image
    skipped_links: int = 0  # links not followed: loops, repeats, or into another class folder


class _Walker:
    """Walks the class folders of one root; shared state makes every directory/file appear once.

    Real paths are resolved once per directory (and once per linked file), not per file, so a
    scan of a million files stays cheap. A linked file is dropped at the end when its target is
    listed directly (its folder was walked) or by an earlier link.
    """

    def __init__(self, roots: Sequence[Path]):
        self.real_roots = [os.path.realpath(r) for r in roots]
        self.seen_dirs: set[tuple[int, int]] = set()
        self.links: dict[str, str] = {}  # linked image file -> its real path
        self.skipped = 0

    def owner(self, real: str) -> int | None:
        """The class whose real folder holds ``real`` most closely (None: outside all of them)."""
        best, depth = None, -1
        for label, root in enumerate(self.real_roots):
            if (real == root or real.startswith(root.rstrip(os.sep) + os.sep)) and len(root) > depth:
                best, depth = label, len(root)
        return best

    def _enter(self, folder: str, label: int) -> list[os.DirEntry] | None:
        """The sorted entries of a folder not seen yet that belongs to ``label`` (else None)."""
        try:
            st = os.stat(folder)
            real = os.path.realpath(folder)
            owner = self.owner(real)
            if (st.st_dev, st.st_ino) in self.seen_dirs or (owner is not None and owner != label):
                self.skipped += 1
                return None
            self.seen_dirs.add((st.st_dev, st.st_ino))
            return sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            self.skipped += 1
            return None

    def walk(self, folder: str, label: int) -> list[str]:
        """Image paths below ``folder`` (sorted, depth first) that belong to class ``label``."""
        found: list[str] = []
        stack = [folder]
        while stack:
            entries = self._enter(stack.pop(), label)
            if entries is None:
                continue
            subdirs = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    is_dir, is_file, is_link = entry.is_dir(), entry.is_file(), entry.is_symlink()
                except OSError:
                    continue
                if is_dir:
                    subdirs.append(entry.path)
                elif is_file and _is_image_name(entry.name):
                    if is_link:
                        real = os.path.realpath(entry.path)
                        owner = self.owner(real)
                        if owner is not None and owner != label:
                            self.skipped += 1
                            continue
                        self.links[entry.path] = real
                    found.append(entry.path)
            stack.extend(reversed(subdirs))  # visit sub-folders in sorted order
        return found

    def keep(self, path: str, taken: set[str]) -> bool:
        """Whether ``path`` is listed: false for a link to a file listed elsewhere."""
        real = self.links.get(path)
        if real is None:
            return True
        try:
            st = os.stat(os.path.dirname(real))
            listed_directly = (st.st_dev, st.st_ino) in self.seen_dirs and _is_image_name(os.path.basename(real))
        except OSError:
            listed_directly = False
        if listed_directly or real in taken:
            self.skipped += 1
            return False
        taken.add(real)
        return True


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_image_folder(root: os.PathLike) -> ImageScan:
    """Scan an ImageFolder tree (see the module docstring for links and empty classes).

    Raises:
        ConfigError: ``root`` is missing, not a directory, has no class folders or no images.
    """
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"--data {root} is not a directory: it does not exist (expected DATA/<class>/<image>)")
    if not root.is_dir():
        raise ConfigError(f"--data {root} is not a directory")
    try:
        classes = sorted(e.name for e in os.scandir(root) if not e.name.startswith(".") and e.is_dir())
    except OSError as exc:
        raise ConfigError(f"cannot read --data {root}: {exc.strerror}") from None
    if not classes:
        raise ConfigError(f"--data {root} has no class sub-folders (expected DATA/<class>/<image>)")
    walker = _Walker([root / name for name in classes])
    found = [walker.walk(str(root / name), label) for label, name in enumerate(classes)]
    taken: set[str] = set()
    files = [(path, label) for label, paths in enumerate(found) for path in paths if walker.keep(path, taken)]
    counts = [0] * len(classes)
    for _, label in files:
        counts[label] += 1
    empty = [name for name, n in zip(classes, counts) if n == 0]
    if not files:
        raise ConfigError(f"--data {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageScan(files, classes, empty, walker.skipped)


def find_images(root: os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """``(files, classes)`` of :func:`scan_image_folder`: ``(path, label)`` pairs and class names."""
    scan = scan_image_folder(root)
    return scan.files, scan.classes


# --------------------------------------------------------------------------------------------
# loading and mode conversion
# --------------------------------------------------------------------------------------------


class ImageSkipped(Exception):
    """An image that is not encoded; the message says why (one line)."""


def check_image_size(width: int, height: int) -> str | None:
    """Why an image of this size is refused (None when it is fine)."""
    if width < 1 or height < 1:
        return f"empty image ({width}x{height})"
    if width * height > MAX_PIXELS:
        return f"{width}x{height} is over the {MAX_PIXELS // (1024 * 1024)} Mpx limit"
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        return f"{width}x{height} is more elongated than {MAX_ASPECT_RATIO:g}:1"
    return None


def _int_depth(image) -> int:
    """Real bits per sample of a 32-bit integer (``I``) image."""
    if image.format == "PNG":
        return 16  # PNG has no 32-bit gray: ``I`` is its 16-bit gray
    tags = getattr(image, "tag_v2", None)
    if tags is not None:  # TIFF BitsPerSample
        bits = tags.get(258)
        bits = bits[0] if isinstance(bits, tuple) else bits
        if isinstance(bits, int) and bits in (8, 16, 32):
            return bits
    values = np.asarray(image)
    return 16 if values.size == 0 or int(values.max()) <= 65535 else 32


def _gray_to_rgb(values: np.ndarray):
    from PIL import Image

    return Image.fromarray(values.astype(np.uint8), "L").convert("RGB")


def to_rgb(image):
    """An 8-bit RGB copy of a PIL image of any mode (see the module docstring for the rules).

    Raises:
        ImageSkipped: a mode PIL cannot convert to RGB.
    """
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _GRAY16_MODES:
        return _gray_to_rgb(np.asarray(image).astype(np.uint32) >> 8)
    if mode == "I":
        values = np.asarray(image).astype(np.int64).clip(0, None)
        shift = {8: 0, 16: 8, 32: 23}[_int_depth(image)]  # 32 bits: 0..2**31-1 (``I`` is signed)
        return _gray_to_rgb((values >> shift).clip(0, 255))
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        return _gray_to_rgb(np.rint(values.clip(0.0, 255.0)))
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageSkipped(f"cannot convert mode {mode} to RGB ({exc})") from None


def load_image(path: os.PathLike):
    """Open, check and decode one image file; returns an 8-bit RGB PIL image.

    Raises:
        ImageSkipped: the file is unreadable, corrupt, over the size limits or a
            decompression bomb; the message says which (one line).
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only
                reason = check_image_size(*image.size)
                if reason is not None:
                    raise ImageSkipped(reason)
                image.load()  # decode now, so truncated files fail here
                return to_rgb(image)
    except ImageSkipped:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageSkipped(f"decompression bomb: {_first_line(exc)}") from None
    except MemoryError:
        raise ImageSkipped("out of memory while decoding") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise ImageSkipped(f"{type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""


# --------------------------------------------------------------------------------------------
# crops
# --------------------------------------------------------------------------------------------


def variant_names(crops: int, hflip: bool) -> list[str]:
    """Storage order of the variants: the crops, then (if any) their mirror images."""
    if crops not in (1, 5, 10):
        raise ConfigError(f"--crops must be 1, 5 or 10, got {crops}")
    base = ["center"] if crops == 1 else list(_FIVE)
    flipped = hflip or crops == 10
    return base + ([f"{b}-flip" for b in base] if flipped else [])


def _corners(w: int, h: int, s: int) -> dict[str, tuple[int, int]]:
    return {
        "top-left": (0, 0),
        "top-right": (w - s, 0),
        "bottom-left": (0, h - s),
        "bottom-right": (w - s, h - s),
        "center": ((w - s) // 2, (h - s) // 2),
    }


def crop_variants(image, image_size: int, names: Sequence[str]) -> Tensor:
    """Resize the short side of a PIL image to ``1.125 * image_size`` (Lanczos) and crop.

    The image is first converted to RGB with :func:`to_rgb`; images beyond the size limits
    (:func:`check_image_size`) raise :class:`ConfigError` instead of allocating a huge strip.

    Returns:
        float32 (V, 3, image_size, image_size) in [-1, 1], one row per name in ``names``.
    """
    from PIL import Image

    reason = check_image_size(*image.size)
    if reason is not None:
        raise ConfigError(f"image not cropped: {reason}")
    image = to_rgb(image)
    w, h = image.size
    short = round(RESIZE_RATIO * image_size)
    scale = short / min(w, h)
    size = (max(short, round(w * scale)), max(short, round(h * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    corners = _corners(*image.size, image_size)
    s = image_size
    out = []
    for name in names:
        x, y = corners[name[: -len("-flip")] if name.endswith("-flip") else name]
        crop = image.crop((x, y, x + s, y + s))
        if name.endswith("-flip"):
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(np.asarray(crop, dtype=np.uint8))
    pixels = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()  # (V, 3, s, s)
    return pixels.div_(127.5).sub_(1.0)
