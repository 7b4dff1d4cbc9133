"""Tests of the procedural shapes dataset (aimkit.data.shapes)."""

import time
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from aimkit.data.shapes import (
    COLOURS,
    NUM_CLASSES,
    SHAPES,
    ShapesDataset,
    class_folder_names,
    class_names,
    export_image_folder,
    make_batch,
    render,
)
from aimkit.errors import ConfigError


def test_class_names():
    names = class_names()
    assert NUM_CLASSES == len(SHAPES) * len(COLOURS) == 36 == len(names) == len(set(names))
    assert names[0] == "red circle" and names[-1] == "cyan star"
    assert class_folder_names()[3] == "03_yellow_circle"


def test_item_shape_range_dtype():
    ds = ShapesDataset(40, seed=0)
    image, label = ds[5]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert -1.0 <= image.min().item() and image.max().item() <= 1.0
    assert isinstance(label, int) and label == 5
    assert ds[-1][1] == 39 % NUM_CLASSES
    with pytest.raises(IndexError):
        ds[40]
    small, _ = ShapesDataset(4, seed=0, image_size=32)[0]
    assert small.shape == (3, 32, 32)


def test_render_uint8():
    pixels = render(7, np.random.default_rng(0), image_size=48)
    assert pixels.shape == (48, 48, 3) and pixels.dtype == np.uint8
    with pytest.raises(ConfigError):
        render(NUM_CLASSES, np.random.default_rng(0))


def test_determinism_same_seed_and_index():
    a, b = ShapesDataset(100, seed=3), ShapesDataset(100, seed=3)
    for i in (0, 17, 99):
        assert torch.equal(a[i][0], b[i][0])
    assert torch.equal(a[17][0], a[17][0])  # repeated access


def test_different_seeds_and_indices_differ():
    a, b = ShapesDataset(72, seed=0), ShapesDataset(72, seed=1)
    assert not torch.equal(a[10][0], b[10][0])
    assert not torch.equal(a[10][0], a[10 + NUM_CLASSES][0])  # same class, different image


def test_label_balance():
    ds = ShapesDataset(NUM_CLASSES * 5, seed=0)
    counts = Counter(ds.label(i) for i in range(len(ds)))
    assert set(counts) == set(range(NUM_CLASSES)) and set(counts.values()) == {5}


def test_make_batch_matches_dataset():
    images, labels = make_batch(8, seed=2, start=30)
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [(30 + j) % NUM_CLASSES for j in range(8)]
    ds = ShapesDataset(40, seed=2)
    for j in (0, 7):
        assert torch.equal(images[j], ds[30 + j][0])
    custom, custom_labels = make_batch(3, seed=2, labels=[5, 5, 6])
    assert custom_labels.tolist() == [5, 5, 6] and custom.shape == (3, 3, 64, 64)
    with pytest.raises(ConfigError):
        make_batch(3, seed=2, labels=[1, 2])


def test_shape_is_visible_and_coloured():
    """The shape's colour dominates a sizeable part of the image, the background is dark."""
    ds = ShapesDataset(NUM_CLASSES, seed=0)
    for i in range(NUM_CLASSES):
        pixels = ds.render_uint8(i).astype(np.float32) / 255
        saturation = pixels.max(axis=2) - pixels.min(axis=2)
        coverage = (saturation > 0.5).mean()
        assert 0.03 < coverage < 0.6, (class_names()[i], coverage)


def test_export_image_folder(tmp_path):
    root = export_image_folder(tmp_path / "shapes", num_per_class=2, seed=4, image_size=32)
    folders = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))  # not the lock, the record
    assert folders == class_folder_names()
    assert sorted(p.name for p in (root / "05_cyan_circle").iterdir()) == ["00000.png", "00001.png"]
    ds = ShapesDataset(2 * NUM_CLASSES, seed=4, image_size=32)
    for c, i in ((0, 0), (5, 1), (35, 1)):
        reread = np.asarray(Image.open(root / class_folder_names()[c] / f"{i:05d}.png").convert("RGB"))
        assert np.array_equal(reread, ds.render_uint8(i * NUM_CLASSES + c))


def test_render_speed_sanity(capsys):
    """Reports images/s; only asserts a very loose bound so a busy machine cannot fail it."""
    n = 200
    start = time.perf_counter()
    make_batch(n, seed=0)
    rate = n / (time.perf_counter() - start)
    with capsys.disabled():
        print(f"\n[shapes] make_batch: {rate:.0f} images/s (64 px)")
    assert rate > 50
