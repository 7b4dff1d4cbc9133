"""Reliability of ``aimkit tokenize`` and token folders (issue #15): hostile images, trees, shards
and indexes, the folder lock, kill -9 and rerun, and the tokenizer provenance that training uses."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import subprocess_env
from PIL import Image

import aimkit
from aimkit._lock import FolderLock
from aimkit.cli import main as cli_main
from aimkit.data.images import MAX_PIXELS, crop_variants, load_image, scan_image_folder, to_rgb
from aimkit.data.provenance import adopt_recorded_tokenizer, tokenizer_fingerprint
from aimkit.data.tokenize import tokenize_folder
from aimkit.data.tokens import INDEX_NAME, TokenDataset, TokenShardWriter, shard_name
from aimkit.errors import ConfigError
from aimkit.tokenizers.base import Tokenizer
from aimkit.weights import read_state_dict

MODEL = "aim-tiny-shapes"  # vq-f4-tiny: 64 px -> 16 x 16 codes of 512
SMALL = ["model_args.d_model=32", "model_args.n_layer=2", "num_workers=0", "mixed_precision=no",
         "global_batch_size=4", "log_every=1", "progress_bar=false"]


def _cli(capsys, *argv):
    """Run ``aimkit ARGV`` in-process: (exit code, stdout, stderr)."""
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *needles):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _png(path: Path, color, size=(40, 48)):
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:] = color
    a[4:16, 4:16] = (255, 255, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def _photos(root: Path, per_class=4) -> Path:
    for c, color in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
        for i in range(per_class):
            _png(root / c / f"{i}.png", tuple(max(0, v - 20 * i) for v in color), size=(40 + 4 * i, 48))
    return root


def _tokenize(capsys, data, out, *extra):
    return _cli(capsys, "tokenize", "--data", data, "--out", out, "--model", MODEL, "--workers", "0",
                "--no-progress", *extra)


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    """8 PNGs of 2 classes tokenized with aim-tiny-shapes (default image size)."""
    root = tmp_path_factory.mktemp("prov")
    photos = _photos(root / "photos")
    out = root / "codes"
    assert cli_main(["tokenize", "--data", str(photos), "--out", str(out), "--model", MODEL, "--workers", "0",
                     "--no-progress", "--shard-size", "3"]) == 0
    return SimpleNamespace(root=root, photos=photos, out=out, index=json.loads((out / INDEX_NAME).read_text()))


class TinyTokenizer(Tokenizer):
    """Parameter-free stand-in: the code of a 4x4 patch is its quantised brightness (16 codes)."""

    name = "tiny-brightness"

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    codebook_size = property(lambda self: 16)
    downsample = property(lambda self: 4)
    embed_dim = property(lambda self: 1)
    in_channels = property(lambda self: 3)

    def encode(self, images):
        patches = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 4)
        return ((patches + 1) / 2 * 16).long().clamp(0, 15).flatten(1)

    def decode(self, codes, *, grid=None, clamp=False):  # pragma: no cover - not needed
        raise NotImplementedError


def _plan(**kw):
    plan = dict(num_sources=6, shard_size=3, tokenizer="t", codebook_size=16, image_size=8, grid_size=2,
                variants=["center"], classes=["a", "b", "c"])
    plan.update(kw)
    return plan


def _written(root: Path) -> Path:
    """A finished 2-shard folder of known codes (value 1..) and labels 0..2."""
    w = TokenShardWriter(root, **_plan())
    for s in range(2):
        codes = torch.arange(12).view(3, 1, 4) % 15 + 1
        w.write_shard(s, codes, torch.arange(3))
    w.finalize()
    return root


# =========================================================================== 1, 2: provenance


def test_index_records_tokenizer_and_model_image_size(codes):
    idx = codes.index
    assert idx["image_size"] == 64 and idx["grid_size"] == 16  # the model's size, not 256
    rec = idx["tokenizer_record"]
    assert rec["name"] == "vq-f4-tiny" and rec["config"]["codebook_size"] == 512
    assert rec["source"]["model"] == MODEL and rec["source"]["random"] is False
    assert rec["fingerprint"] == tokenizer_fingerprint(aimkit.build(MODEL).tokenizer)
    assert all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in idx["shards"])


def test_training_saves_the_recorded_tokenizer(codes, capsys):
    want = codes.index["tokenizer_record"]["fingerprint"]
    assert tokenizer_fingerprint(aimkit.build(MODEL, pretrained=False).tokenizer) != want  # what train builds
    out = codes.root / "run"
    code, stdout, err = _cli(capsys, "train", "--config", "aim_tiny_shapes", f"data={codes.out}",
                             f"output_dir={out}", "max_steps=2", "checkpoint_every=1", *SMALL)
    assert code == 0, err
    assert "now has the weights that made these codes" in stdout
    final = aimkit.build(out / "final")
    assert tokenizer_fingerprint(final.tokenizer) == want
    # a resumed run rebuilds the model from scratch; it must adopt the same weights again
    code, _, err = _cli(capsys, "train", "--config", "aim_tiny_shapes", f"data={codes.out}", f"output_dir={out}",
                        "max_steps=3", "checkpoint_every=1", *SMALL, "--resume", "auto")
    assert code == 0, err
    assert tokenizer_fingerprint(aimkit.build(out / "final").tokenizer) == want


def _gen():
    return aimkit.build(MODEL, pretrained=False, d_model=32, n_layer=2)


def test_adopt_recorded_tokenizer_cases(codes, tmp_path):
    ds = TokenDataset(codes.out)
    rec = ds.tokenizer_record
    gen = _gen()
    note = adopt_recorded_tokenizer(gen, ds)
    assert note and tokenizer_fingerprint(gen.tokenizer) == rec["fingerprint"]
    before = {k: v.clone() for k, v in gen.tokenizer.state_dict().items()}
    assert adopt_recorded_tokenizer(gen, ds) is None  # already there: nothing changes
    assert all(torch.equal(before[k], v) for k, v in gen.tokenizer.state_dict().items())
    assert adopt_recorded_tokenizer(SimpleNamespace(tokenizer=None), ds) is None
    assert adopt_recorded_tokenizer(gen, [1, 2, 3]) is None

    def with_record(**changes):
        ds.index["tokenizer_record"] = {**rec, **changes}
        return ds

    with pytest.raises(ConfigError, match="'vq-f16'.*'vq-f4-tiny'"):
        adopt_recorded_tokenizer(_gen(), with_record(name="vq-f16"))
    with pytest.raises(ConfigError, match="codebook_size 1024 there, 512 in the model"):
        adopt_recorded_tokenizer(_gen(), with_record(config={**rec["config"], "codebook_size": 1024}))
    with pytest.raises(ConfigError, match="tokenizer_record entry is damaged"):
        adopt_recorded_tokenizer(_gen(), with_record(fingerprint=12))
    # weights from a file that later changes or disappears
    weights = tmp_path / "tok.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in aimkit.build(MODEL).tokenizer.state_dict().items()}, weights)
    source = {**rec["source"], "model": None, "tokenizer": "vq-f4-tiny", "tokenizer_weights": str(weights)}
    assert adopt_recorded_tokenizer(_gen(), with_record(source=source))  # rebuilt from the file: same weights
    other = {k: v + 1 if v.is_floating_point() else v for k, v in read_state_dict(weights).items()}
    save_file(other, weights)
    with pytest.raises(ConfigError, match="have changed since"):
        adopt_recorded_tokenizer(_gen(), with_record(source=source))
    weights.unlink()
    with pytest.raises(ConfigError, match="cannot rebuild the tokenizer.*not found|cannot rebuild"):
        adopt_recorded_tokenizer(_gen(), with_record(source=source))
    # an older folder without a record keeps a warning
    ds.index.pop("tokenizer_record")
    assert adopt_recorded_tokenizer(_gen(), ds).startswith("warning:")
    ds.index["tokenizer"] = "vq-f16"
    assert "'vq-f16'" in adopt_recorded_tokenizer(_gen(), ds)


def test_train_refuses_folder_of_another_tokenizer(codes, tmp_path, capsys):
    bad = tmp_path / "codes"
    shutil.copytree(codes.out, bad)
    index = json.loads((bad / INDEX_NAME).read_text())
    index["tokenizer_record"]["source"]["model"] = str(tmp_path / "gone")  # the weights moved away
    (bad / INDEX_NAME).write_text(json.dumps(index))
    code, _, err = _cli(capsys, "train", "--config", "aim_tiny_shapes", f"data={bad}",
                        f"output_dir={tmp_path / 'run'}", "max_steps=1", *SMALL)
    _one_line_error(code, err, "cannot rebuild the tokenizer")
    assert not (tmp_path / "run" / "final").exists()


# =========================================================================== 3: image modes


def _pixel(image) -> tuple:
    return tuple(int(v) for v in np.asarray(to_rgb(image))[0, 0])


def _palette(transparent: bool):
    p = Image.new("P", (1, 1), 0)
    p.putpalette([10, 20, 30] + [0] * 765)
    if transparent:
        p.info["transparency"] = 0
    return p


MODES = {
    "I;16 max": (lambda: Image.fromarray(np.array([[65535]], np.uint16)), (255, 255, 255)),
    "I;16 half": (lambda: Image.fromarray(np.array([[32768]], np.uint16)), (128, 128, 128)),
    "I;16B": (lambda: Image.frombytes("I;16B", (1, 1), np.array([32768], ">u2").tobytes()), (128, 128, 128)),
    "I 16-bit values": (lambda: Image.fromarray(np.array([[65535]], np.int32)), (255, 255, 255)),
    "I negative": (lambda: Image.fromarray(np.array([[-5]], np.int32)), (0, 0, 0)),
    "F unit": (lambda: Image.fromarray(np.array([[0.5]], np.float32)), (128, 128, 128)),
    "F 0..255": (lambda: Image.fromarray(np.array([[200.0]], np.float32)), (200, 200, 200)),
    "F nan": (lambda: Image.fromarray(np.array([[np.nan]], np.float32)), (0, 0, 0)),
    "L": (lambda: Image.new("L", (1, 1), 77), (77, 77, 77)),
    "LA transparent": (lambda: Image.new("LA", (1, 1), (77, 0)), (255, 255, 255)),
    "LA opaque": (lambda: Image.new("LA", (1, 1), (77, 255)), (77, 77, 77)),
    "P": (lambda: _palette(False), (10, 20, 30)),
    "P transparent": (lambda: _palette(True), (255, 255, 255)),
    "PA": (lambda: Image.new("RGBA", (1, 1), (10, 20, 30, 0)).convert("PA"), (255, 255, 255)),
    "RGBA transparent": (lambda: Image.new("RGBA", (1, 1), (0, 0, 0, 0)), (255, 255, 255)),
    "RGBA opaque": (lambda: Image.new("RGBA", (1, 1), (10, 20, 30, 255)), (10, 20, 30)),
    "CMYK": (lambda: Image.new("CMYK", (1, 1), (0, 0, 0, 0)), (255, 255, 255)),
    "YCbCr": (lambda: Image.new("YCbCr", (1, 1), (255, 128, 128)), (255, 255, 255)),
    "1": (lambda: Image.new("1", (1, 1), 1), (255, 255, 255)),
}


@pytest.mark.parametrize("case", list(MODES))
def test_every_mode_becomes_8bit_rgb(case):
    make, expected = MODES[case]
    out = to_rgb(make())
    assert out.mode == "RGB" and _pixel(out) == expected


def test_half_transparent_rgba_on_white():
    r, g, b = _pixel(Image.new("RGBA", (1, 1), (0, 0, 0, 128)))
    assert abs(r - 127) <= 1 and r == g == b


def test_16bit_files_round_trip(tmp_path):
    Image.fromarray(np.array([[65535, 32768, 0]], np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").convert("RGB").getpixel((1, 0)) == (255, 255, 255)  # PIL's clip
    assert [int(v) for v in np.asarray(load_image(tmp_path / "g16.png"))[0, :, 0]] == [255, 128, 0]
    Image.fromarray(np.array([[2**31 - 1, 2**23]], np.int32)).save(tmp_path / "i32.tif")  # 32 bits per sample
    assert [int(v) for v in np.asarray(load_image(tmp_path / "i32.tif"))[0, :, 0]] == [255, 1]


# =========================================================================== 4: the lock


def test_second_writer_is_refused(tmp_path, capsys):
    photos = _photos(tmp_path / "photos", per_class=1)
    out = tmp_path / "codes"
    with FolderLock(out, command="someone else"):
        code, _, err = _tokenize(capsys, photos, out)
    _one_line_error(code, err, "in use", "someone else")
    assert not (out / INDEX_NAME).exists()
    code, _, err = _tokenize(capsys, photos, out)  # the lock died with its holder
    assert code == 0, err


# =========================================================================== 5: links


def test_symlink_loops_and_links_into_other_classes(tmp_path):
    root = tmp_path / "data"
    for c in ("cat", "dog"):
        for i in range(3):
            _png(root / c / f"{i}.png", (9, 9, 9), size=(8, 8))
    outside = tmp_path / "elsewhere"
    _png(outside / "x.png", (9, 9, 9), size=(8, 8))
    os.symlink("..", root / "cat" / "loop")  # -> data/
    os.symlink(".", root / "cat" / "self")
    os.symlink("../dog", root / "cat" / "dogs")  # another class folder
    os.symlink("../dog/0.png", root / "cat" / "dog0.png")  # a file of another class
    os.symlink(str(outside), root / "cat" / "extra")  # outside every class: belongs to cat
    os.symlink(str(outside / "x.png"), root / "dog" / "x-again.png")  # the same file twice
    os.symlink("missing.png", root / "dog" / "dangling.png")
    scan = scan_image_folder(root)
    labels = {os.path.relpath(p, root): lab for p, lab in scan.files}
    assert sorted(labels) == ["cat/0.png", "cat/1.png", "cat/2.png", "cat/extra/x.png",
                              "dog/0.png", "dog/1.png", "dog/2.png"]
    assert all(lab == (0 if p.startswith("cat/") else 1) for p, lab in labels.items())
    assert len({os.path.realpath(p) for p, _ in scan.files}) == len(scan.files)
    assert scan.skipped_links >= 4


# =========================================================================== 6, 7: shards and indexes


def test_damaged_shards_are_named_and_redone(tmp_path):
    root = _written(tmp_path / "t")
    good = (root / shard_name(1)).read_bytes()
    assert len(TokenDataset(root)) == 6

    (root / shard_name(1)).write_bytes(good[:-7])  # cut
    with pytest.raises(ConfigError, match=f"{shard_name(1)} is damaged: {len(good) - 7} bytes"):
        TokenDataset(root)
    flipped = bytearray(good)
    (n,) = struct.unpack("<Q", good[:8])
    begin = json.loads(good[8: 8 + n])["codes"]["data_offsets"][0]
    flipped[8 + n + begin + 1] ^= 0xFF  # the high byte of the first code: far out of the codebook
    (root / shard_name(1)).write_bytes(bytes(flipped))
    with pytest.raises(ConfigError, match=f"{shard_name(1)} is damaged: .*checksum"):
        TokenDataset(root)
    cheap = TokenDataset(root, verify="size", variant="first")  # sizes agree: served, checked per item
    with pytest.raises(ConfigError, match="outside the codebook"):
        [cheap[i] for i in range(len(cheap))]

    again = TokenShardWriter(root, **_plan())  # the rerun: the damaged shard is pending again
    assert again.pending() == [1] and len(again.problems) == 1 and "checksum" in again.problems[0]
    assert not (root / shard_name(1)).exists()
    again.write_shard(1, torch.arange(12).view(3, 1, 4) % 15 + 1, torch.arange(3))
    again.finalize()
    assert (root / shard_name(1)).read_bytes() == good and len(TokenDataset(root)) == 6


def _forge_shard(root: Path, shard: int, codes, labels, dtype="U16", extra=b""):
    """Write a shard by hand and make the index agree with its size and checksum."""
    from safetensors.numpy import save_file

    path = root / shard_name(shard)
    save_file({"codes": np.asarray(codes, np.uint16 if dtype == "U16" else np.int64),
               "labels": np.asarray(labels, np.int64)}, str(path),
              metadata={"start": str(3 * shard), "stop": str(3 * shard + 3), "count": str(len(labels)), "skipped": "0"})
    with open(path, "ab") as f:
        f.write(extra)
    _restamp(root, shard)


def _restamp(root: Path, shard: int):
    import hashlib

    index = json.loads((root / INDEX_NAME).read_text())
    data = (root / shard_name(shard)).read_bytes()
    index["shards"][shard].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (root / INDEX_NAME).write_text(json.dumps(index))


def test_hostile_shard_contents(tmp_path):
    root = _written(tmp_path / "t")
    _forge_shard(root, 0, np.full((3, 1, 4), 99), [0, 1, 2])  # valid checksum, codes >= codebook
    with pytest.raises(ConfigError, match="shard-00000.safetensors holds code 99, outside the codebook of 16"):
        TokenDataset(root)
    again = TokenShardWriter(root, **_plan())
    assert again.pending() == [0] and "code 99" in again.problems[0]

    root = _written(tmp_path / "u")
    _forge_shard(root, 0, np.ones((3, 1, 4)), [0, 1, 7])  # label 7 of 3 classes
    with pytest.raises(ConfigError, match="label 7, but the folder has 3 classes"):
        TokenDataset(root, verify="size")
    _forge_shard(root, 0, np.ones((3, 1, 4)), [0, 1, 2], extra=b"junk")
    with pytest.raises(ConfigError, match="4 bytes after its tensors"):
        TokenDataset(root)
    _forge_shard(root, 0, np.ones((2, 1, 4)), [0, 1])  # metadata says 2, index says 3
    with pytest.raises(ConfigError, match="holds 2 images, the index records 3"):
        TokenDataset(root)

    # a header whose shape does not fit its byte range: the memmap would read past the data
    root = _written(tmp_path / "v")
    path = root / shard_name(0)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    header["codes"]["shape"] = [3000, 1, 4]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    _restamp(root, 0)
    with pytest.raises(ConfigError, match="needs 24000 bytes"):
        TokenDataset(root)
    path.write_bytes(struct.pack("<Q", 10**9) + raw[8:])  # header length beyond the file
    _restamp(root, 0)
    with pytest.raises(ConfigError, match="truncated or not a safetensors file"):
        TokenDataset(root)
    path.write_bytes(b"abc")
    _restamp(root, 0)
    with pytest.raises(ConfigError, match="truncated"):
        TokenDataset(root)


BAD_INDEXES = {
    "garbage": ("{not json", "cannot read"),
    "a list": ("[1, 2]", "not an aimkit token index"),
    "shards not a list": ({"shards": "x"}, "'shards' should be a list"),
    "count a string": ({"shards.0.count": "7"}, "shards[0].count should be an integer"),
    "completed a string": ({"shards.0.completed": "yes"}, "shards[0].completed should be true or false"),
    "negative start": ({"shards.0.start": -3}, "shards[0].start should be an integer >= 0"),
    "count over range": ({"shards.0.count": 99}, "count 99"),
    "classes a number": ({"classes": 5}, "'classes' should be a list"),
    "no variants": ({"variants": []}, "'variants' should be a non-empty list"),
    "bool codebook": ({"codebook_size": True}, "'codebook_size' should be a positive integer"),
    "num_tokens": ({"num_tokens": 5}, "num_tokens 5 is not grid_size 2 squared"),
    "sha256 a number": ({"shards.0.sha256": 5}, "shards[0].sha256 should be a hex digest"),
    "shard not a mapping": ({"shards.0": 3}, "shards[0] should be a mapping"),
    "missing key": ({"-grid_size": None}, "no 'grid_size' entry"),
    "parent path": ({"shards.0.file": "../outside.safetensors"}, "lies outside"),
    "absolute path": ({"shards.0.file": "/etc/passwd"}, "an absolute path"),
}


@pytest.mark.parametrize("case", list(BAD_INDEXES))
def test_hostile_index(tmp_path, case):
    root = _written(tmp_path / "t")
    change, message = BAD_INDEXES[case]
    (tmp_path / "outside.safetensors").write_bytes((root / shard_name(0)).read_bytes())
    if isinstance(change, str):
        (root / INDEX_NAME).write_text(change)
    else:
        index = json.loads((root / INDEX_NAME).read_text())
        for key, value in change.items():
            if key.startswith("-"):
                index.pop(key[1:])
                continue
            *path, last = key.split(".")
            target = index
            for part in path:
                target = target[int(part)] if part.isdigit() else target[part]
            target[int(last) if last.isdigit() else last] = value
        (root / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        TokenDataset(root)
    assert "\n" not in str(info.value)


def test_shard_link_out_of_the_folder(tmp_path):
    root = _written(tmp_path / "t")
    moved = tmp_path / "moved.safetensors"
    os.replace(root / shard_name(0), moved)
    os.symlink(moved, root / shard_name(0))
    with pytest.raises(ConfigError, match="lies outside"):
        TokenDataset(root)


def test_rerun_redoes_a_cut_shard(codes, tmp_path, capsys):
    out = tmp_path / "codes"
    shutil.copytree(codes.out, out)
    original = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    cut = out / shard_name(1)
    cut.write_bytes(original[cut.name][:100])
    code, stdout, err = _tokenize(capsys, codes.photos, out, "--shard-size", "3")
    assert code == 0, err
    assert f"{cut} has the wrong size (100 bytes" in err and "encoding its images again" in err
    assert "2 shards already done" in stdout and "redid 1 damaged shard" in stdout
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == original
    assert json.loads((out / INDEX_NAME).read_text()) == codes.index


# =========================================================================== 8: user errors


def test_user_errors_are_one_line(tmp_path, capsys):
    photos = _photos(tmp_path / "photos", per_class=1)
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "noclasses").mkdir()
    (tmp_path / "noimages" / "a").mkdir(parents=True)
    (tmp_path / "noimages" / "a" / "notes.txt").write_text("x")
    cases = [
        (["--workers", "-1"], photos, tmp_path / "o1", "--workers must be an integer in [0, 256]"),
        (["--workers", "99999999999999999999"], photos, tmp_path / "o1", "--workers must be an integer in [0, 256]"),
        (["--batch-size", "0"], photos, tmp_path / "o2", "--batch-size must be an integer in [1, "),
        (["--batch-size", str(2**40)], photos, tmp_path / "o2", "--batch-size must be an integer in [1, "),
        (["--shard-size", "0"], photos, tmp_path / "o2", "--shard-size must be an integer in [1, "),
        (["--image-size", "-64"], photos, tmp_path / "o2", "--image-size must be positive"),
        (["--image-size", "30"], photos, tmp_path / "o2", "not a positive multiple of 4"),
        ([], photos, afile, "exists and is not a directory"),
        ([], tmp_path / "missing", tmp_path / "o3", "does not exist"),
        ([], afile, tmp_path / "o3", "is not a directory"),
        ([], tmp_path / "noclasses", tmp_path / "o3", "has no class sub-folders"),
        ([], tmp_path / "noimages", tmp_path / "o3", "holds no images"),
        (["--tokenizer-option", "nope"], photos, tmp_path / "o3", "expects KEY=VALUE"),
    ]
    for extra, data, out, message in cases:
        code, _, err = _tokenize(capsys, data, out, *extra)
        _one_line_error(code, err, message)
    assert afile.read_text() == "x"
    code, _, err = _cli(capsys, "tokenize", "--data", photos, "--out", tmp_path / "o4", "--tokenizer", "vq-f4-tiny",
                        "--pretrained", "x")
    _one_line_error(code, err, "--pretrained needs --model")


def test_empty_class_folders_keep_their_ids(tmp_path, capsys):
    photos = _photos(tmp_path / "photos", per_class=1)
    (photos / "ant").mkdir()  # sorts first: would shift every id if dropped
    (photos / "bee" / "deeper").mkdir(parents=True)
    code, stdout, err = _tokenize(capsys, photos, tmp_path / "codes")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "ant (class 0)" in warnings[0] and "bee (class 1)" in warnings[0]
    assert "2 empty class folder(s)" in stdout
    ds = TokenDataset(tmp_path / "codes")
    assert ds.classes == ["ant", "bee", "cat", "dog"] and ds.labels.tolist() == [2, 3]


# =========================================================================== 9: oversized images


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width x height`` (8-bit gray) and whose data is garbage."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_oversized_images_are_skipped_before_decoding(tmp_path, capsys):
    photos = _photos(tmp_path / "photos", per_class=1)
    strip = photos / "cat" / "strip.png"
    Image.new("L", (1, 20000), 128).save(strip)
    assert strip.stat().st_size < 1000
    huge = _png_header_only(photos / "dog" / "huge.png", 9000, 9000)  # 81 Mpx, under PIL's own limit
    bomb = _png_header_only(photos / "dog" / "bomb.png", 30000, 30000)  # PIL: decompression bomb
    side = int((MAX_PIXELS * 0.9) ** 0.5)
    _png_header_only(photos / "dog" / "z-truncated.png", side, side)  # within the limits, fails to decode
    reasons = {}
    for path in (strip, huge, bomb):
        t0 = time.perf_counter()
        with pytest.raises(Exception) as info:
            load_image(path)
        assert time.perf_counter() - t0 < 1.0
        reasons[path.name] = str(info.value)
    assert "more elongated than 20:1" in reasons["strip.png"]
    assert "over the 64 Mpx limit" in reasons["huge.png"]
    assert "decompression bomb" in reasons["bomb.png"]
    with pytest.raises(ConfigError, match="elongated"):
        crop_variants(Image.new("L", (1, 20000)), 64, ["center"])

    code, stdout, err = _tokenize(capsys, photos, tmp_path / "codes", "--image-size", "16")
    assert code == 0, err
    skipped = [line for line in err.splitlines() if line.startswith("skipping image")]
    assert len(skipped) == 4 and any("z-truncated.png" in line for line in skipped)
    assert "skipped 4 unreadable image(s)" in stdout and "2 images" in stdout


# =========================================================================== kill -9 and rerun




def _state(out: Path):
    names = [p for p in sorted(out.iterdir()) if p.name == INDEX_NAME or p.name.startswith("shard-")]
    return {p.name: p.read_bytes() for p in names}


def test_kill9_then_rerun_equals_uninterrupted(tmp_path):
    photos = _photos(tmp_path / "photos", per_class=6)

    def argv(out):
        return [sys.executable, "-m", "aimkit.cli", "tokenize", "--data", str(photos), "--out", str(out),
                "--model", MODEL, "--workers", "0", "--no-progress", "--shard-size", "1", "--batch-size", "1",
                "--crops", "5"]

    subprocess.run(argv(tmp_path / "ref"), env=subprocess_env(), check=True, capture_output=True, timeout=120)
    reference = _state(tmp_path / "ref")
    rng = random.Random(0)
    out = tmp_path / "killed"
    for low, high in ((1, 4), (5, 10)):  # kill -9 once a random number of shards is on disk
        target = rng.randint(low, high)
        proc = subprocess.Popen(argv(out), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if out.is_dir() and len(list(out.glob("shard-*"))) >= target:
                break
            time.sleep(0.005)
        proc.kill()
        proc.wait()
    assert 0 < len(list(out.glob("shard-*"))) < len(reference) - 1  # really interrupted
    done = subprocess.run(argv(out), check=False, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _state(out) == reference
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_tokenize_folder_library_locks_and_records(tmp_path):
    """The library entry point takes the lock too, and works without a record (no provenance)."""
    photos = _photos(tmp_path / "photos", per_class=1)
    out = tmp_path / "codes"
    with FolderLock(out, command="other"), pytest.raises(aimkit.errors.AimkitError, match="in use"):
        tokenize_folder(photos, out, TinyTokenizer(), image_size=8, progress=False)
    report = tokenize_folder(photos, out, TinyTokenizer(), image_size=8, progress=False)
    assert report.complete and TokenDataset(out).tokenizer_record is None


def test_rerun_on_a_damaged_index_says_what_to_do(tmp_path):
    root = _written(tmp_path / "t")
    shards = {p.name: p.read_bytes() for p in root.glob("shard-*")}
    (root / INDEX_NAME).write_text('{"format": 1, "shards": 7')
    with pytest.raises(ConfigError, match="delete it to rebuild it from the shards"):
        TokenShardWriter(root, **_plan())
    (root / INDEX_NAME).unlink()
    again = TokenShardWriter(root, **_plan())  # rebuilt from the checked shards: nothing redone
    assert again.pending() == [] and {p.name: p.read_bytes() for p in root.glob("shard-*")} == shards
