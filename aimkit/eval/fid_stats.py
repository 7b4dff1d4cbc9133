"""The inputs and outputs of FID besides the network: image folders and statistics files.

Either side of an FID is one of

* an ``.npz`` of images in the ADM evaluator's layout (``arr_0``: (N, H, W, 3) uint8), read by
  :class:`aimkit.eval.fid.NpzArrayReader`;
* an ``.npz`` of statistics: ``mu`` (F,) and ``sigma`` (F, F) of the Inception pool features,
  the keys of ADM's reference batches (``VIRTUAL_imagenet256_labeled.npz`` holds both images and
  statistics) and of the files :func:`save_statistics` writes (``aimkit fid --save-stats``);
* a folder of images (PNG preferred: lossless), searched recursively, all of one size, read in
  sorted order in batches.

Example::

    kind = source_kind("samples/")            # "folder"
    n, batches = iter_folder_batches("samples/", 50)
    save_statistics("samples_stats.npz", stats)
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import ConfigError

__all__ = [
    "FOLDER_EXTENSIONS",
    "source_kind",
    "has_statistics",
    "list_image_folder",
    "iter_folder_batches",
    "read_stored_statistics",
    "save_statistics",
]

PathLike = str | os.PathLike
FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # lossy formats shift FID: prefer PNG


def _npz_members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConfigError(f"{path} is not an .npz archive: {exc}") from None


def source_kind(path: PathLike, what: str = "input") -> str:
    """``"folder"``, ``"images"`` (an npz with ``arr_0``) or ``"statistics"`` (``mu``/``sigma`` only).

    Raises:
        ConfigError: the path does not exist, or is a file that is neither kind.
    """
    path = Path(path)
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{what} {path} is neither a file nor a folder")
    names = _npz_members(path)
    if "arr_0" in names:
        return "images"
    if {"mu", "sigma"} <= set(names):
        return "statistics"
    raise ConfigError(f"{what} {path} holds neither images (arr_0) nor statistics (mu, sigma); "
                      f"it holds: {', '.join(names) or 'nothing'}")


def has_statistics(path: PathLike) -> bool:
    """Whether ``path`` is an ``.npz`` holding ``mu`` and ``sigma`` (False for anything unreadable)."""
    try:
        return Path(path).is_file() and {"mu", "sigma"} <= set(_npz_members(Path(path)))
    except ConfigError:
        return False


def list_image_folder(folder: PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden names skipped), in sorted order.

    Raises:
        ConfigError: no images there.
    """
    folder = Path(folder)
    files = sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in FOLDER_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise ConfigError(f"{folder} holds no images ({', '.join(FOLDER_EXTENSIONS)})")
    return files


def _read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 of one file, any PIL mode converted to 8-bit RGB."""
    from ..data.images import ImageSkipped, load_image

    try:
        return np.asarray(load_image(path), dtype=np.uint8)
    except ImageSkipped as exc:
        raise ConfigError(f"cannot read image {path}: {exc}") from None


def iter_folder_batches(folder: PathLike, batch_size: int) -> tuple[int, Iterator[np.ndarray]]:
    """``(N, batches)`` of (n, H, W, 3) uint8 arrays from a folder of images of one size.

    Images are decoded batch by batch (never all at once); the first image fixes the size.

    Raises:
        ConfigError: fewer than 2 images, or (while iterating) an unreadable image or one of
            another size, named.
    """
    files = list_image_folder(folder)
    if len(files) < 2:
        raise ConfigError(f"{folder} holds {len(files)} image; statistics need at least 2")
    first = _read_image(files[0])

    def stream() -> Iterator[np.ndarray]:
        for start in range(0, len(files), batch_size):
            batch = []
            for i in range(start, min(start + batch_size, len(files))):
                image = first if i == 0 else _read_image(files[i])
                if image.shape != first.shape:
                    raise ConfigError(
                        f"{files[i]} is {image.shape[1]}x{image.shape[0]}, but {files[0]} is "
                        f"{first.shape[1]}x{first.shape[0]}: every image of an FID set must have one size"
                    )
                batch.append(image)
            yield np.stack(batch)  # (n, H, W, 3)

    return len(files), stream()


def read_stored_statistics(path: PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mu, sigma)`` in float64 stored in an ``.npz``, or None when it has none.

    Raises:
        ConfigError: an unreadable file, or statistics of inconsistent shapes.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data.files or "sigma" not in data.files:
                return None
            mu = np.asarray(data["mu"], dtype=np.float64)
            sigma = np.asarray(data["sigma"], dtype=np.float64)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"cannot read statistics from {path}: {exc}") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ConfigError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (F,) and (F, F)")
    return mu, sigma


def save_statistics(path: PathLike, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write ``mu`` and ``sigma`` (float64) to an ``.npz`` atomically, under ADM's key names.

    Raises:
        ConfigError: ``path`` does not end in ``.npz`` or is a folder.
    """
    from .._io import atomic_write

    path = Path(path)
    if path.suffix != ".npz":
        raise ConfigError(f"--save-stats {path}: the file name must end in .npz")
    if path.is_dir():
        raise ConfigError(f"--save-stats {path} is a folder; give a file name ending in .npz")
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma))
    return path
