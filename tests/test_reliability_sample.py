"""Reliability of sampling (issue #15): locks, shard checksums, numerics, atomic writes, bad input, kill -9.

Every bad input ends in one line (exit 2 on the command line, an AimkitError in the library) and
loses nothing; shards are trusted only when they match their record; an interrupted `aimkit
sample` resumes to a bit-identical npz.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MAMBA, randomize_

import aimkit
import aimkit._io as aimkit_io
from aimkit._lock import LOCK_NAME, FolderBusyError, FolderLock
from aimkit.cli import main
from aimkit.errors import AimkitError, ConfigError
from aimkit.eval.fid_sampling import (
    LABELS_NAME,
    MANIFEST_NAME,
    MAX_NUM,
    pack_npz,
    record_name,
    resolve_sample_labels,
    sample_to_shards,
    shard_name,
)
from aimkit.samplers import AutoregressiveSampler, generate, save_grid
from aimkit.samplers.api import MAX_IMAGES
from aimkit.samplers.autoregressive import _FiniteCheck
from aimkit.samplers.logits import (
    GREEDY_TEMPERATURE,
    MAX_CFG_SCALE,
    NonFiniteLogitsError,
    check_sampling_args,
    sample,
    top_p_filter,
)

TINY = TINY_MAMBA
ROOT = Path(__file__).resolve().parents[1]
RUN = dict(labels="random", seed=5, batch_size=2, shard_size=2, progress=False)  # 6 images: 3 shards


# ------------------------------------------------------------------------------------------ helpers


class StubGen:
    """A generator double: images depend only on (seed, labels); a pixel holds the label."""

    def __init__(self, num_classes=4, black=False):
        self.num_classes, self.black = num_classes, black

    def generate(self, labels, *, seed, output, batch_size, progress=False, **sampling):
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (len(labels), 8, 8, 3), generator=g, dtype=torch.uint8).numpy()
        if self.black:
            images[:] = 0
        images[:, 0, 0, 0] = labels.numpy()
        return images


class _Evil:
    """Unpickling this creates a file: proof that a loader executed pickled code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _FullDiskOs:
    """Stands in for the ``os`` module inside aimkit._io: every write fails with ENOSPC."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def write(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def _tiny(seed=0):
    torch.manual_seed(seed)
    return randomize_(aimkit.build("aim-b", **TINY), seed=seed)


def _one_line(capsys, prefix):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(prefix), err
    return err[0]


def _one_warning(caplog, prefix):
    """The one warning logged since the last call (library calls log; the CLI shows them on stderr)."""
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    lines = [r.getMessage() for r in records]
    assert len(lines) == 1 and lines[0].startswith(prefix) and records[0].name.startswith("aimkit."), lines
    return lines[0]


def _shards(tmp_path, num=6, **kw):
    out = tmp_path / "shards"
    sample_to_shards(StubGen(), out, num, **RUN, **kw)
    return out


def _npz(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


# ------------------------------------------------------------------------------------------ 1. locks


def test_second_sample_run_into_a_held_shard_folder_is_refused(tmp_path, capsys, fresh_accelerate_state):
    out = tmp_path / "s.npz"
    shard_dir = tmp_path / "s.npz.shards"
    with FolderLock(shard_dir, command="aimkit sample"):  # run A holds the folder
        code = main(["sample", "--model", "aim-tiny-shapes", "--num", "2", "--labels", "random", "--out", str(out),
                     "--seed", "7", "--device", "cpu", "--no-progress"])
        line = _one_line(capsys, "aimkit sample: error: ")
    assert code == 2 and "in use by pid" in line and "aimkit sample" in line
    assert sorted(p.name for p in shard_dir.iterdir()) == [LOCK_NAME] and not out.exists()  # B wrote nothing


def test_library_calls_take_the_lock(tmp_path):
    shard_dir = tmp_path / "shards"
    with FolderLock(shard_dir, command="aimkit sample"):
        with pytest.raises(FolderBusyError, match="in use by"):
            sample_to_shards(StubGen(), shard_dir, 6, **RUN)
        with pytest.raises(FolderBusyError):
            pack_npz(shard_dir, tmp_path / "x.npz")
    assert not (shard_dir / MANIFEST_NAME).exists()


def test_every_process_of_a_refused_run_stops(tmp_path, monkeypatch):
    from aimkit.commands import sample as sample_cmd

    class State:
        def __init__(self, main):
            self.is_main_process, self.num_processes = main, 2

    sent = []

    def fake_broadcast(box, src=0):  # the main process's outcome reaches every process
        sent.append(box[0])
        box[0] = "busy: pid 1 on host h (aimkit sample)"

    monkeypatch.setattr("torch.distributed.broadcast_object_list", fake_broadcast)
    with pytest.raises(FolderBusyError, match="busy: pid 1"):
        sample_cmd.lock_shard_dir(State(main=False), tmp_path / "d")  # a non-main process never locks
    assert sent == [None] and not (tmp_path / "d").exists()
    with FolderLock(tmp_path / "e"):
        monkeypatch.setattr("torch.distributed.broadcast_object_list", lambda box, src=0: sent.append(box[0]))
        with pytest.raises(FolderBusyError, match="in use by"):
            sample_cmd.lock_shard_dir(State(main=True), tmp_path / "e")
    assert "in use by" in sent[-1]
    lock = sample_cmd.lock_shard_dir(State(main=True), tmp_path / "f")  # free: the main process holds it
    assert lock.held and sent[-1] is None
    lock.release()


# ------------------------------------------------------------------------------------------ 1. shard records


def test_every_shard_has_a_record_and_packing_is_bit_reproducible(tmp_path, monkeypatch):
    shards = _shards(tmp_path)
    for s in range(3):
        record = json.loads((shards / record_name(s)).read_text())
        assert record["shard"] == s and record["count"] == 2 and record["image_shape"] == [8, 8, 3]
        assert record["size"] == (shards / shard_name(s)).stat().st_size
        assert record["sha256"] == aimkit_io.sha256_file(shards / shard_name(s))
    first = pack_npz(shards, tmp_path / "a.npz").read_bytes()
    later = time.time() + 3 * 86400
    monkeypatch.setattr(zipfile.time, "time", lambda: later)  # another day: no timestamp in the archive
    assert pack_npz(shards, tmp_path / "b.npz").read_bytes() == first


def _tamper_cases(shards, tmp_path):
    """(name, damage) pairs; each damages shard 1 in another way."""
    other = tmp_path / "other"
    sample_to_shards(StubGen(black=True), other, 6, **dict(RUN, seed=6))

    def swap_file(d):
        shutil.copy(d / shard_name(2), d / shard_name(1))

    def swap_file_and_record(d):
        swap_file(d)
        shutil.copy(d / record_name(2), d / record_name(1))

    def black_images(d):
        with np.load(d / shard_name(1)) as data:
            labels = data["labels"]
        np.savez(d / shard_name(1), images=np.zeros((2, 8, 8, 3), np.uint8), labels=labels)

    def other_runs_shard(d):  # a valid shard + record of a run with other settings
        shutil.copy(other / shard_name(1), d / shard_name(1))
        shutil.copy(other / record_name(1), d / record_name(1))

    def truncated(d):
        data = (d / shard_name(1)).read_bytes()
        (d / shard_name(1)).write_bytes(data[: len(data) // 2])

    def record_garbage(d):
        (d / record_name(1)).write_bytes(b"\xff{not json")

    def record_wrong_types(d):
        record = json.loads((d / record_name(1)).read_text())
        record.update(size="25102", shard=True)
        (d / record_name(1)).write_text(json.dumps(record))

    def record_missing(d):  # killed between the shard and its record
        (d / record_name(1)).unlink()

    return [("swap", swap_file, "SHA-256|bytes"), ("swap+record", swap_file_and_record, "that of shard 2"),
            ("black", black_images, "SHA-256|bytes"), ("other run", other_runs_shard, "another run"),
            ("truncated", truncated, "bytes"), ("garbage record", record_garbage, "unreadable"),
            ("typed record", record_wrong_types, "malformed"), ("no record", record_missing, "no record")]


def test_damaged_or_swapped_shards_are_refused_then_regenerated(tmp_path, caplog):
    shards = _shards(tmp_path)
    good = _npz(pack_npz(shards, tmp_path / "good.npz"))
    good_bytes = (tmp_path / "good.npz").read_bytes()
    for name, damage, why in _tamper_cases(shards, tmp_path):
        damage(shards)
        with pytest.raises(ConfigError, match=f"shard-00001.npz: .*({why})") as info:
            pack_npz(shards, tmp_path / "good.npz")
        assert "\n" not in str(info.value), name
        assert (tmp_path / "good.npz").read_bytes() == good_bytes  # the old result is untouched
        caplog.clear()
        run = sample_to_shards(StubGen(), shards, 6, **RUN)
        assert run.written == (1,) and run.skipped == (0, 2), name  # never counted as done
        line = _one_warning(caplog, "aimkit sample: shard-00001.npz")
        assert "generating it again" in line, name
        again = _npz(pack_npz(shards, tmp_path / "again.npz"))
        np.testing.assert_array_equal(again["arr_0"], good["arr_0"])
        np.testing.assert_array_equal(again["arr_1"], good["arr_1"])


def test_pickled_shard_is_refused_without_running_it(tmp_path, caplog):
    shards = _shards(tmp_path)
    marker = tmp_path / "pwned"
    labels = np.load(shards / LABELS_NAME)[2:4]
    evil = np.empty(2, dtype=object)
    evil[:] = [_Evil(str(marker)), _Evil(str(marker))]
    np.savez(shards / shard_name(1), images=evil, labels=labels)
    record = json.loads((shards / record_name(1)).read_text())  # a forged record that matches the file
    record.update(size=(shards / shard_name(1)).stat().st_size, sha256=aimkit_io.sha256_file(shards / shard_name(1)))
    (shards / record_name(1)).write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="shard-00001.npz .*cannot be read"):
        pack_npz(shards, tmp_path / "x.npz")
    assert not marker.exists() and not (tmp_path / "x.npz").exists()
    run = sample_to_shards(StubGen(), shards, 6, **RUN)
    assert run.written == (1,) and not marker.exists()
    assert "cannot be read" in _one_warning(caplog, "aimkit sample: shard-00001.npz")
    pack_npz(shards, tmp_path / "x.npz")


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"',
                                     b'{"format": "aimkit.sample_shards/2", "num": "ten", "shard_size": 2}',
                                     b'{"format": "aimkit.sample_shards/2", "num": 6, "shard_size": true}',
                                     b'{"format": "aimkit.sample_shards/2", "num": 6, "shard_size": 2}'])
def test_damaged_manifest_is_one_error(tmp_path, content):
    shards = _shards(tmp_path)
    (shards / MANIFEST_NAME).write_bytes(content)
    for call in (lambda: pack_npz(shards, tmp_path / "x.npz"),
                 lambda: sample_to_shards(StubGen(), shards, 6, **RUN)):
        with pytest.raises(ConfigError) as info:
            call()
        assert "\n" not in str(info.value) and str(shards) in str(info.value)
    assert not (tmp_path / "x.npz").exists()


def test_damaged_labels_file_is_refused_then_rewritten(tmp_path, caplog):
    shards = _shards(tmp_path)
    caplog.clear()
    expected = np.load(shards / LABELS_NAME)
    for bad in (b"garbage", None):
        if bad is None:
            np.save(shards / LABELS_NAME, np.array([object()], dtype=object), allow_pickle=True)
        else:
            (shards / LABELS_NAME).write_bytes(bad)
        with pytest.raises(ConfigError, match="labels.npy is missing or damaged"):
            pack_npz(shards, tmp_path / "x.npz")
        sample_to_shards(StubGen(), shards, 6, **RUN)
        assert "labels.npy" in _one_warning(caplog, "aimkit sample: ")
        np.testing.assert_array_equal(np.load(shards / LABELS_NAME), expected)
    pack_npz(shards, tmp_path / "x.npz")


def _label_file_cases(tmp_path):
    cases = {
        "words.txt": b"1\nabc\n",
        "binary.txt": b"\x00\xff\xfe\x80garbage",
        "huge.txt": b"99999999999999999999\n1\n",
        "float.txt": b"1.5\n2\n",
        "empty.txt": b"",
        "notnpy.npy": b"\x93NUMPY garbage",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "pickled.npy", np.array([_Evil(str(tmp_path / "pwned"))] * 2, dtype=object), allow_pickle=True)
    np.save(tmp_path / "uint64.npy", np.array([2**63, 1], dtype=np.uint64))
    np.save(tmp_path / "matrix.npy", np.zeros((2, 1), np.int64))
    np.save(tmp_path / "floats.npy", np.zeros(2, np.float32))
    np.savez(tmp_path / "archive.npz", a=np.zeros(2, np.int64))
    os.replace(tmp_path / "archive.npz", tmp_path / "archive.npy")
    (tmp_path / "folder.npy").mkdir()
    return [tmp_path / n for n in [*cases, "pickled.npy", "uint64.npy", "matrix.npy", "floats.npy", "archive.npy",
                                   "folder.npy", "missing.txt"]]


def test_garbage_label_files_are_one_error(tmp_path):
    for path in _label_file_cases(tmp_path):
        with pytest.raises(ConfigError) as info:
            resolve_sample_labels(path, 2, 4)
        assert "\n" not in str(info.value), path
    assert not (tmp_path / "pwned").exists()
    for labels in ({1: 2}, np.array([2**63, 0], dtype=np.uint64), [2**70, 1], [[1], [2]], "x.txt", [1.5, 2.0]):
        with pytest.raises(ConfigError):
            resolve_sample_labels(labels, 2, 4)
    with pytest.raises(ConfigError, match="more than one sampling run supports"):
        resolve_sample_labels("balanced", MAX_NUM + 1, 4)


# ------------------------------------------------------------------------------------------ 2. numerics


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _tokens(model, **kw):
    args = dict(cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return AutoregressiveSampler().sample_tokens(model, torch.tensor([1, 7, 3]), **args)


def test_tiny_temperature_and_top_p_tend_to_greedy(tiny):
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 5
    greedy = logits.argmax(-1)
    for temperature in (1e-300, 5e-324, GREEDY_TEMPERATURE / 2):
        assert torch.equal(sample(logits, temperature, generator=torch.Generator().manual_seed(0)), greedy)
    for p in (1e-300, 5e-324, 1e-45):
        kept = top_p_filter(logits, p)
        assert torch.equal(torch.isfinite(kept).sum(-1), torch.ones(64, dtype=torch.long))
        assert not kept.isnan().any()
        assert torch.equal(sample(logits, 1.0, top_p=p, generator=torch.Generator().manual_seed(0)), greedy)
    reference = _tokens(tiny, temperature=0.0, cfg_scale=2.0)
    for kw in (dict(temperature=1e-300), dict(top_p=1e-300), dict(temperature=1e-300, top_p=1e-300, top_k=5)):
        assert torch.equal(_tokens(tiny, cfg_scale=2.0, **kw), reference), kw
    assert reference.bool().any()  # not the all-zero tokens of NaN probabilities


def test_fused_path_never_sees_a_tiny_temperature(tiny, monkeypatch):
    seen = []

    def spy(self, device, vocab, temperature, top_k, top_p):
        seen.append(temperature)
        return None

    monkeypatch.setattr(AutoregressiveSampler, "_fused_sampler", spy)
    _tokens(tiny, temperature=1e-300)
    _tokens(tiny, temperature=0.5)
    assert seen == [0.0, 0.5]


class _Poisoned:
    """Wraps a generator; from decode step ``at`` on its logits hold ``value`` in one entry."""

    def __init__(self, model, at, value):
        self.model, self.at, self.value, self.steps = model, at, value, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _poison(self, logits):
        self.steps += 1
        if self.steps > self.at:
            logits = logits.clone()
            logits[0, 5] = self.value
        return logits

    def prefill(self, cond, params):
        return self._poison(self.model.prefill(cond, params))

    def decode_step(self, tokens, cond, params):
        return self._poison(self.model.decode_step(tokens, cond, params))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("at", [0, 3])
def test_non_finite_logits_raise(tiny, value, at):
    for kw in (dict(temperature=0.0), dict(temperature=1.0, cfg_scale=2.0), dict(top_k=4, top_p=0.5)):
        with pytest.raises(NonFiniteLogitsError, match=f"NaN or infinite logits at token {at}"):
            _tokens(_Poisoned(tiny, at, value), **kw)
    assert issubclass(NonFiniteLogitsError, AimkitError)


def test_cuda_style_check_reads_the_flag_once_at_the_end():
    check = _FiniteCheck(torch.device("cuda"))  # the deferred path, on CPU tensors
    check.update(torch.zeros(2, 3), 0)
    check.update(torch.tensor([[float("nan"), 0.0, 0.0]]), 1)  # no host read, no raise here
    check.update(torch.zeros(2, 3), 2)
    with pytest.raises(NonFiniteLogitsError, match="during this batch"):
        check.finish()
    fine = _FiniteCheck(torch.device("cuda"))
    fine.update(torch.zeros(2, 3), 0)
    fine.finish()


@pytest.mark.parametrize("returned", [float("nan"), float("inf"), -float("inf"), 1e300, "3", None, True])
def test_bad_schedule_value_is_a_config_error(tiny, returned):
    with pytest.raises(ConfigError, match="guidance schedule .* returned"):
        _tokens(tiny, cfg_scale=2.0, schedule=lambda k, n, s: returned if k == 2 else s)


@pytest.mark.parametrize("scale", [1e300, -1e300, MAX_CFG_SCALE * 1.5, float("nan")])
def test_huge_cfg_scale_is_refused(tiny, scale):
    with pytest.raises(ConfigError, match="cfg_scale must be a finite number"):
        generate(tiny, [1], cfg_scale=scale, output="tokens", progress=False)
    assert check_sampling_args(MAX_CFG_SCALE, 1.0, 0, 1.0)[0] == MAX_CFG_SCALE


# ------------------------------------------------------------------------------------------ 4. bad input


@pytest.mark.parametrize("kwargs", [
    dict(labels={1: 2}), dict(labels={1, 2}), dict(labels=b"\x01"), dict(labels="12"),
    dict(labels=[2**63]), dict(labels=[2**70]), dict(labels=[-2**70]), dict(labels=np.array([2**63], np.uint64)),
    dict(labels=[10]), dict(labels=torch.tensor([10], dtype=torch.int32)),
    dict(labels=None, num_images=10**12), dict(labels=[1], num_images=MAX_IMAGES + 1),
    dict(labels=[1], num_images=10**12),
])
def test_bad_labels_and_counts_are_config_errors(tiny, kwargs):
    kwargs = dict(kwargs)
    labels = kwargs.pop("labels")
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        generate(tiny, labels, output="tokens", progress=False, **kwargs)
    assert "\n" not in str(info.value) and time.perf_counter() - start < 5  # refused before allocating


def _generate_argv(*extra):
    return ["generate", "--model", "aim-tiny-shapes", "--num", "1", "--cfg-scale", "1", "--device", "cpu",
            "--no-progress", *extra]


def test_generate_bad_input_is_one_line_before_sampling(tmp_path, capsys, monkeypatch, no_build):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    cases = [
        (["--labels", "99999999999999999999", "--out", str(tmp_path / "g.png")], "label 99999999999999999999"),
        (["--labels", "36", "--out", str(tmp_path / "g.png")], "label 36 is outside [0, 36)"),
        (["--num", "10000000000000", "--out", str(tmp_path / "g.png")], "holds in memory"),
        (["--cfg-scale", "1e300", "--out", str(tmp_path / "g.png")], "cfg_scale"),
        (["--out", str(tmp_path / "adir")], "is an existing directory"),
        (["--out-dir", str(tmp_path / "afile")], "is an existing file"),
        (["--out", str(tmp_path / "afile" / "g.png")], "exists and is not a directory"),
        (["--out", str(tmp_path / "fifo.png")], "exists and is not a regular file"),
        (["--out", str(tmp_path / "g.jpg")], "ending in .png"),
        (["--batch-size", "99999999999999999999", "--out", str(tmp_path / "g.png")], "below 2**63"),
        (["--batch-size", str(2**63), "--out", str(tmp_path / "g.png")], "below 2**63"),
    ]
    os.mkfifo(tmp_path / "fifo.png")  # stands for /dev/null: a file that is no regular file
    for extra, words in cases:
        try:
            code = main(_generate_argv(*extra))
        except SystemExit as exc:  # argparse's own one-line error
            code = exc.code
        assert code == 2, extra
        assert words in _one_line(capsys, "aimkit generate: error: "), extra
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo.png").st_mode)  # left as it was
    monkeypatch.setattr(aimkit_io, "os", _FullDiskOs())
    assert main(_generate_argv("--out", str(tmp_path / "full" / "g.png"))) == 2
    assert "the disk is full" in _one_line(capsys, "aimkit generate: error: ")
    assert main(_generate_argv("--out-dir", str(tmp_path / "full2"), "--out", "")) == 2
    assert "the disk is full" in _one_line(capsys, "aimkit generate: error: ")
    with pytest.raises(SystemExit) as info:
        main(_generate_argv("--seed", "-1"))
    assert info.value.code == 2
    _one_line(capsys, "aimkit generate: error: ")
    assert main(_generate_argv("--labels", "1,x", "--out", str(tmp_path / "g.png"))) == 2  # 'x' is a name here
    assert "unknown class name 'x'" in _one_line(capsys, "aimkit generate: error: ")


def _sample_argv(out, *extra):
    return ["sample", "--model", "aim-tiny-shapes", "--num", "2", "--labels", "random", "--out", str(out),
            "--device", "cpu", "--no-progress", *extra]


def test_sample_bad_input_is_one_line_before_sampling(tmp_path, capsys, monkeypatch, no_build,
                                                      fresh_accelerate_state):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "labels.txt").write_text("1\n99\n")
    (tmp_path / "adir.npz").mkdir()
    cases = [
        (_sample_argv(tmp_path / "afile" / "s.npz"), "exists and is not a directory"),
        (_sample_argv(tmp_path / "adir.npz"), "is an existing directory"),
        (_sample_argv(tmp_path / "s.npz", "--shard-dir", str(tmp_path / "afile")), "is an existing file"),
        (_sample_argv(tmp_path / "s.npz", "--labels", str(tmp_path / "labels.txt")), "label 99"),
        (_sample_argv(tmp_path / "s.npz", "--num", "99999999999999999999"), "below 2**63"),
        (_sample_argv(tmp_path / "s.npz", "--num", str(2**62)), "more than one sampling run"),
    ]
    for argv, words in cases:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own one-line error
            code = exc.code
        assert code == 2, argv
        assert words in _one_line(capsys, "aimkit sample: error: "), argv
    monkeypatch.setattr(aimkit_io, "os", _FullDiskOs())
    assert main(_sample_argv(tmp_path / "full" / "s.npz")) == 2
    assert "the disk is full" in _one_line(capsys, "aimkit sample: error: ")


# ------------------------------------------------------------------------------------------ 3. atomic writes


@pytest.fixture
def failing_png_save(monkeypatch):
    """PIL writes part of the file, then the disk is full."""
    from PIL import Image

    def save(self, fp, format=None, **params):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", save)


def test_failed_png_writes_keep_the_old_files(tmp_path, capsys, failing_png_save):
    grid, out_dir = tmp_path / "grid.png", tmp_path / "singles"
    out_dir.mkdir()
    grid.write_bytes(b"OLD GRID")
    (out_dir / "00000_class3.png").write_bytes(b"OLD IMAGE")
    with pytest.raises(OSError):
        save_grid(np.zeros((1, 4, 4, 3), np.uint8), grid)
    assert main(_generate_argv("--labels", "3", "--out", str(grid))) == 2
    assert "no space left" in _one_line(capsys, "aimkit generate: error: ")
    assert main(_generate_argv("--labels", "3", "--out", "", "--out-dir", str(out_dir))) == 2
    _one_line(capsys, "aimkit generate: error: ")
    assert grid.read_bytes() == b"OLD GRID" and (out_dir / "00000_class3.png").read_bytes() == b"OLD IMAGE"
    leftovers = [p.name for p in [*tmp_path.iterdir(), *out_dir.iterdir()] if p.name.endswith(".tmp")]
    assert leftovers == []


def test_eval_json_is_written_atomically(tmp_path, capsys, monkeypatch):
    from dataclasses import dataclass

    @dataclass
    class Report:
        num_images: int = 2
        conditional_accuracy: float = 0.5
        classifier_accuracy_real: float = 1.0
        frechet_distance: float = 3.0
        num_real: int = 2

    class Gen:
        num_classes = 36

        def generate(self, labels, **kw):
            return torch.zeros(len(labels), 3, 8, 8)

    monkeypatch.setattr(aimkit, "build", lambda *a, **k: Gen())
    monkeypatch.setattr("aimkit.eval.quality.evaluate_generated", lambda images, labels: Report())
    report = tmp_path / "report.json"
    report.write_text("OLD")
    real_replace = os.replace

    def replace(src, dst):  # the disk fills up just as the report is moved into place
        if str(dst).endswith(".json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    argv = ["eval", "--num", "2", "--device", "cpu", "--grid", str(tmp_path / "g.png"), "--json", str(report)]
    monkeypatch.setattr(os, "replace", replace)
    assert main(argv) == 2
    assert report.read_text() == "OLD" and "no space left" in capsys.readouterr().err
    monkeypatch.setattr(os, "replace", real_replace)
    assert main(argv) == 0
    assert json.loads(report.read_text())["frechet_distance"] == 3.0
    assert f"wrote {report}" in capsys.readouterr().err  # the status lines (logged on stderr)
    assert main([*argv[:-1], str(tmp_path)]) == 2  # --json naming a folder
    assert "existing directory" in _one_line(capsys, "aimkit eval: error: ")


# ------------------------------------------------------------------------------------------ 5. kill -9


def _sample_cmd(out, seed="0"):
    return [sys.executable, "-m", "aimkit.cli", "sample", "--model", "aim-tiny-shapes", "--num", "3",
            "--shard-size", "1", "--batch-size", "1", "--labels", "random", "--cfg-scale", "1", "--seed", seed,
            "--out", str(out), "--device", "cpu", "--no-progress"]


def _wait_for(condition, proc, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_kill_9_then_rerun_packs_a_bit_identical_npz(tmp_path, capsys, fresh_accelerate_state):
    # one thread: the same arithmetic in every run, and no OpenMP spin-waiting on a busy machine
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run = dict(cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reference = subprocess.run(_sample_cmd(tmp_path / "ref.npz"), timeout=120, **run)
    assert reference.returncode == 0, reference.stderr.decode()

    out = tmp_path / "out.npz"
    shard_dir = tmp_path / "out.npz.shards"
    rng = random.Random(15)
    # round 1: killed after its first shard; while it runs, a second run with other settings is refused
    proc = subprocess.Popen(_sample_cmd(out), **run)
    _wait_for(lambda: (shard_dir / LOCK_NAME).is_file() and (shard_dir / LOCK_NAME).stat().st_size > 0, proc)
    assert main(_sample_argv(out, "--seed", "9")) == 2
    assert f"in use by pid {proc.pid}" in _one_line(capsys, "aimkit sample: error: ")
    _wait_for(lambda: (shard_dir / record_name(0)).is_file(), proc)
    time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    # round 2: killed at a random point (possibly during start-up or mid-write)
    proc = subprocess.Popen(_sample_cmd(out), **run)
    time.sleep(rng.uniform(1.0, 3.0))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    if out.exists():  # complete or absent, never a partial file under the final name
        assert out.read_bytes() == (tmp_path / "ref.npz").read_bytes()
    final = subprocess.run(_sample_cmd(out), timeout=120, **run)
    assert final.returncode == 0, final.stderr.decode()
    assert out.read_bytes() == (tmp_path / "ref.npz").read_bytes()
    assert not [p for p in shard_dir.iterdir() if p.name.endswith(".tmp")]
    assert len(list(shard_dir.glob("shard-*.npz"))) == 3


def test_sample_to_shards_refuses_bad_sampling_settings_before_recording_them(tmp_path):
    """A bad top_p recorded in the manifest would make the corrected rerun 'a run with other settings'."""
    out = tmp_path / "shards"
    with pytest.raises(ConfigError, match="top_p"):
        sample_to_shards(_tiny(), out, 4, **RUN, top_p=2.0)
    assert not (out / MANIFEST_NAME).exists()
