"""Pre-tokenized code shards: writing, reading, variant policies, resuming, ``aimkit tokenize``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from aimkit.cli import main as cli_main
from aimkit.data.images import crop_variants, find_images, variant_names
from aimkit.data.shapes import NUM_CLASSES, export_image_folder
from aimkit.data.tokenize import tokenize_folder
from aimkit.data.tokens import INDEX_NAME, TokenDataset, TokenShardWriter, shard_name
from aimkit.errors import ConfigError
from aimkit.tokenizers.base import Tokenizer


class BrightnessTokenizer(Tokenizer):
    """A parameter-free stand-in: the code of an 8x8 patch is its quantised mean brightness."""

    name = "brightness"

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # gives .dtype / .device
        self.calls = 0
        self.images = 0

    codebook_size = property(lambda self: 16)
    downsample = property(lambda self: 8)
    embed_dim = property(lambda self: 1)
    in_channels = property(lambda self: 3)

    def encode(self, images):
        self.check_images(images)
        self.calls += 1
        self.images += images.shape[0]
        patches = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 8)  # (B, 1, h, w)
        return ((patches + 1) / 2 * 16).long().clamp(0, 15).flatten(1)

    def decode(self, codes, *, grid=None, clamp=False):  # pragma: no cover - not needed
        raise NotImplementedError


def _plan(**kw):
    plan = dict(
        num_sources=10, shard_size=4, tokenizer="brightness", codebook_size=16, image_size=32,
        grid_size=2, variants=["center", "center-flip"], classes=["a", "b", "c"],
    )
    plan.update(kw)
    return plan


def _fake_shard(writer, shard, seed=0):
    start, stop = writer.shard_range(shard)
    g = torch.Generator().manual_seed(seed + shard)
    codes = torch.randint(0, 16, (stop - start, 2, 4), generator=g)
    labels = torch.arange(start, stop) % 3
    writer.write_shard(shard, codes, labels)
    return codes, labels


# ---------------------------------------------------------------------------------- crops


def test_variant_names():
    assert variant_names(1, False) == ["center"]
    assert variant_names(1, True) == ["center", "center-flip"]
    assert len(variant_names(5, False)) == 5
    ten = variant_names(10, False)
    assert len(ten) == 10 and ten[5:] == [f"{n}-flip" for n in ten[:5]]
    assert variant_names(10, True) == ten
    with pytest.raises(ConfigError, match="--crops"):
        variant_names(3, False)


def test_crop_variants_geometry():
    # a wide gradient image: the short side becomes round(1.125 * 32) = 36
    x = np.tile(np.linspace(0, 255, 90, dtype=np.float64)[None, :, None], (50, 1, 3)).astype(np.uint8)
    image = Image.fromarray(x)
    names = variant_names(10, False)
    crops = crop_variants(image, 32, names)
    assert crops.shape == (10, 3, 32, 32) and crops.dtype == torch.float32
    assert crops.min() >= -1 and crops.max() <= 1
    for k in range(5):  # every mirrored crop is its crop flipped
        assert torch.equal(crops[5 + k], crops[k].flip(-1))
    left, right = crops[names.index("top-left")], crops[names.index("top-right")]
    assert left.mean() < right.mean()  # the gradient rises to the right


# ---------------------------------------------------------------------------------- shards


def test_writer_reader_roundtrip(tmp_path):
    writer = TokenShardWriter(tmp_path, **_plan())
    assert writer.num_shards == 3 and writer.pending() == [0, 1, 2]
    written = [_fake_shard(writer, s) for s in range(3)]
    index = writer.finalize()
    assert index["complete"] and [s["count"] for s in index["shards"]] == [4, 4, 2]

    ds = TokenDataset(tmp_path, variant="first")
    codes = torch.cat([c for c, _ in written])
    labels = torch.cat([lab for _, lab in written])
    assert len(ds) == 10 and ds.num_tokens == 4 and ds.num_classes == 3 and ds.codebook_size == 16
    for i in range(10):
        c, lab = ds[i]
        assert c.dtype == torch.int64 and c.shape == (4,)
        assert torch.equal(c, codes[i, 0]) and int(lab) == int(labels[i])
    raw = json.loads((tmp_path / INDEX_NAME).read_text())
    assert raw["tokenizer"] == "brightness" and raw["grid_size"] == 2


def test_variant_policies(tmp_path):
    writer = TokenShardWriter(tmp_path, **_plan())
    codes = torch.cat([_fake_shard(writer, s)[0] for s in range(3)])
    writer.finalize()

    ds = TokenDataset(tmp_path, variant="epoch")
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i in range(10):
            assert torch.equal(ds[i][0], codes[i, (epoch + i) % 2])
    fixed = TokenDataset(tmp_path, variant=1)
    assert torch.equal(fixed[3][0], codes[3, 1])

    a, b = TokenDataset(tmp_path, variant="random", seed=0), TokenDataset(tmp_path, variant="random", seed=0)
    a.set_epoch(5)
    b.set_epoch(5)
    assert [a.variant_of(i) for i in range(10)] == [b.variant_of(i) for i in range(10)]  # reproducible
    picks = set()
    for epoch in range(8):
        a.set_epoch(epoch)
        picks.add(tuple(a.variant_of(i) for i in range(10)))
    assert len(picks) > 1  # changes from epoch to epoch
    with pytest.raises(ConfigError, match="out of range"):
        TokenDataset(tmp_path, variant=2)


def test_resume_and_plan_checks(tmp_path):
    writer = TokenShardWriter(tmp_path, **_plan())
    first, _ = _fake_shard(writer, 0)
    (tmp_path / f".{shard_name(1)}.123.tmp").write_bytes(b"half a shard")  # an interrupted write

    with pytest.raises(ConfigError, match="incomplete"):
        TokenDataset(tmp_path)
    partial = TokenDataset(tmp_path, allow_incomplete=True, variant="first")
    assert len(partial) == 4 and torch.equal(partial[0][0], first[0, 0])

    again = TokenShardWriter(tmp_path, **_plan())  # a rerun picks up where the first stopped
    assert again.pending() == [1, 2]
    with pytest.raises(ConfigError, match="another run"):
        TokenShardWriter(tmp_path, **_plan(shard_size=5))
    with pytest.raises(ConfigError, match="covers 4 sources"):
        again.write_shard(1, torch.zeros(3, 2, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    root = export_image_folder(tmp_path_factory.mktemp("shapes"), num_per_class=1, seed=0, image_size=32)
    first = sorted(p for p in root.iterdir() if not p.name.startswith("."))[0]  # the export's record is hidden
    (first / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (first / "notes.txt").write_text("ignored: not an image extension")
    return root


def test_tokenize_folder_skips_corrupt_and_resumes(image_tree, tmp_path):
    files, classes = find_images(image_tree)
    assert len(files) == NUM_CLASSES + 1 and len(classes) == NUM_CLASSES

    tok = BrightnessTokenizer()
    report = tokenize_folder(image_tree, tmp_path, tok, image_size=32, hflip=True, batch_size=8,
                             shard_size=10, progress=False)
    assert report.complete and report.num_written == NUM_CLASSES and report.num_skipped == 1
    assert report.shards_total == 4 and report.shards_resumed == 0
    assert any("zz_corrupt" in f for f in report.bad_files)
    assert "skipped 1 unreadable" in report.summary()

    ds = TokenDataset(tmp_path, variant="first")
    assert len(ds) == NUM_CLASSES
    image = Image.open(files[0][0])  # the corrupt file sorts after it
    expected = tok.encode(crop_variants(image, 32, ["center"]))[0]
    assert torch.equal(ds[0][0], expected) and int(ds[0][1]) == 0

    # resume: only the missing shard is encoded again; the skipped count survives
    (tmp_path / shard_name(2)).unlink()
    tok2 = BrightnessTokenizer()
    report2 = tokenize_folder(image_tree, tmp_path, tok2, image_size=32, hflip=True, batch_size=8,
                              shard_size=10, progress=False)
    assert report2.shards_resumed == 3 and report2.complete
    assert tok2.images == 10 * 2  # 10 images x 2 variants
    assert report2.num_written == NUM_CLASSES and report2.num_skipped == 1
    assert torch.equal(TokenDataset(tmp_path, variant="first")[25][0], ds[25][0])


def test_tokenize_cli_messages(image_tree, tmp_path, capsys):
    code = cli_main(["tokenize", "--data", str(image_tree), "--out", str(tmp_path / "t"), "--tokenizer", "vq-f16"])
    err = capsys.readouterr().err
    assert code == 2 and "--tokenizer-weights" in err and len(err.strip().splitlines()) == 1
    code = cli_main(["tokenize", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "t"),
                     "--tokenizer", "vq-f16", "--random-tokenizer", "--tokenizer-option", "ch=32",
                     "--tokenizer-option", "ch_mult=[1,1,1,1,1]"])
    err = capsys.readouterr().err
    assert code == 2 and "is not a directory" in err
    code = cli_main(["tokenize", "--data", str(image_tree), "--out", str(tmp_path / "t"),
                     "--tokenizer", "vq-f16", "--random-tokenizer", "--tokenizer-option", "codebok_size=64"])
    err = capsys.readouterr().err
    assert code == 2 and "codebook_size" in err  # the closest option is suggested


def test_resuming_into_an_out_folder_of_other_images_is_refused(image_tree, tmp_path):
    """Same count and classes, other files: the resume would mix two folders' tokens. The same
    images from a moved folder resume."""
    import shutil

    out = tmp_path / "tokens"
    kw = dict(image_size=32, batch_size=8, shard_size=10, progress=False)
    tokenize_folder(image_tree, out, BrightnessTokenizer(), **kw)
    moved = shutil.copytree(image_tree, tmp_path / "moved")
    assert tokenize_folder(moved, out, BrightnessTokenizer(), **kw).complete
    other = shutil.copytree(image_tree, tmp_path / "other")
    first = sorted(p for p in other.rglob("*") if p.is_file() and not p.name.startswith("."))[0]
    first.rename(first.with_name("renamed_" + first.name))
    with pytest.raises(ConfigError, match="tokens of other images"):
        tokenize_folder(other, out, BrightnessTokenizer(), **kw)
