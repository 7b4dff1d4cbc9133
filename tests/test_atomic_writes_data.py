"""aimkit.data.shapes.export_image_folder: atomic PNGs, a locked folder, exports never mixed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import aimkit.data.shapes as shapes
from aimkit._lock import FolderBusyError, FolderLock
from aimkit.data.images import scan_image_folder
from aimkit.data.shapes import NUM_CLASSES, ShapesDataset, class_folder_names, export_image_folder
from aimkit.errors import ConfigError


def _images(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix == ".png")


def test_a_killed_export_leaves_no_truncated_png_and_a_rerun_completes_it(tmp_path, monkeypatch):
    root = tmp_path / "shapes"
    real_save, saved = Image.Image.save, []

    def killed_on_the_fifth(self, fp, *args, **kwargs):
        if len(saved) == 4:  # the process dies with half a PNG written
            with open(fp, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n\0\0")
            raise KeyboardInterrupt
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", killed_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        export_image_folder(root, num_per_class=1, seed=3, image_size=16)
    monkeypatch.undo()

    written = _images(root)
    assert len(written) == 4  # the four finished images, and nothing else under a PNG name
    for name in written:
        Image.open(root / name).load()  # each one whole
    FolderLock(root).acquire().release()  # the killed run let go of the folder

    export_image_folder(root, num_per_class=1, seed=3, image_size=16)  # the same settings: resumes
    assert len(_images(root)) == NUM_CLASSES
    assert not [p for p in root.rglob("*.tmp")]
    ds = ShapesDataset(NUM_CLASSES, seed=3, image_size=16)
    for c in (0, 4, 35):
        pixels = np.asarray(Image.open(root / class_folder_names()[c] / "00000.png").convert("RGB"))
        assert np.array_equal(pixels, ds.render_uint8(c))
    assert len(scan_image_folder(root).files) == NUM_CLASSES  # the lock and the record are not images


def test_an_export_into_a_folder_in_use_is_refused(tmp_path):
    root = tmp_path / "shapes"
    with FolderLock(root, command="another export"), pytest.raises(FolderBusyError, match="another export"):
        export_image_folder(root, num_per_class=1, image_size=16)
    assert _images(root) == []


def test_an_export_with_other_settings_keeps_the_earlier_images(tmp_path):
    root = export_image_folder(tmp_path / "shapes", num_per_class=1, seed=0, image_size=16)
    before = {name: (root / name).read_bytes() for name in _images(root)}
    with pytest.raises(ConfigError, match=r"other settings \(seed 0 -> 1\)"):
        export_image_folder(root, num_per_class=1, seed=1, image_size=16)
    assert {name: (root / name).read_bytes() for name in _images(root)} == before


def test_an_export_into_a_folder_of_other_files_is_refused(tmp_path):
    root = tmp_path / "mine"
    (root / "00_red_circle").mkdir(parents=True)
    (root / "00_red_circle" / "00000.png").write_bytes(b"my own picture")
    with pytest.raises(ConfigError, match="not empty"):
        export_image_folder(root, num_per_class=1, image_size=16)
    assert (root / "00_red_circle" / "00000.png").read_bytes() == b"my own picture"
    assert not (root / shapes._EXPORT_RECORD).exists()
