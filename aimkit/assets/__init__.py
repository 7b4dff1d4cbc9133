"""Weights shipped inside the package (small models that work with no network)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["embedded_weights", "asset_path"]

# preset name -> directory (inside this package) written by Generator.save_pretrained
_EMBEDDED = {"aim-tiny-shapes": "aim_tiny_shapes"}


def asset_path(name: str) -> Path:
    """Path of a file or folder shipped in ``aimkit/assets``."""
    return Path(str(resources.files(__name__).joinpath(name)))


def embedded_weights(preset: str) -> Path | None:
    """The shipped weights of ``preset`` (a save_pretrained directory), or None."""
    folder = _EMBEDDED.get(preset)
    if folder is None:
        return None
    path = asset_path(folder)
    return path if (path / "model.safetensors").is_file() else None
