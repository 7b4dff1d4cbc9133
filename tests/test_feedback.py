"""Feedback on long work: progress by token step (sampler callback, generate, FID sampling, eval,
tokenize), logging with ``--verbose`` / ``--quiet``, and a library that configures no logging."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import aimkit
from aimkit.cli import main
from aimkit.eval import fid_sampling
from aimkit.samplers import api
from aimkit.samplers.autoregressive import AutoregressiveSampler

PACKAGE = Path(aimkit.__file__).resolve().parent
SETTINGS = dict(cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0)


class RecordingBar:
    """A stand-in for a tqdm bar: records the count after every update."""

    disable = False

    def __init__(self):
        self.n, self.seen, self.closed = 0, [], False

    def update(self, delta):
        self.n += delta
        self.seen.append(self.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.closed = True


@pytest.fixture(scope="module")
def tiny():
    return aimkit.build("aim-test-vq")  # 16 tokens, a tokenizer, 10 classes


@pytest.fixture
def terminal(monkeypatch):
    """Make stderr count as a terminal, so bars show by default (as they do for a user at a shell)."""
    monkeypatch.setattr(api, "_stderr_is_terminal", lambda: True)


# ------------------------------------------------------------------------------ sampler callback


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_on_step_is_called_once_per_token_in_order_with_host_ints(tiny, cfg_scale):
    calls = []
    labels = torch.tensor([1, 2, 3])
    settings = {**SETTINGS, "cfg_scale": cfg_scale}
    codes = AutoregressiveSampler().sample_tokens(tiny, labels, **settings, generator=torch.Generator().manual_seed(0),
                                                  on_step=lambda k, n: calls.append((k, n)))
    assert calls == [(k, tiny.num_tokens) for k in range(tiny.num_tokens)]
    assert all(type(k) is int and type(n) is int for k, n in calls)  # never a device value: no sync
    same = AutoregressiveSampler().sample_tokens(tiny, labels, **settings, generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, same)  # the callback changes nothing


def test_generate_advances_the_bar_by_token_steps_inside_each_batch(tiny):
    bar = RecordingBar()
    out = api.generate(tiny, [0, 1, 2, 3, 4], batch_size=2, output="tokens", seed=0, progress=bar, **SETTINGS)
    n = tiny.num_tokens
    expected = [2 * (k + 1) / n for k in range(n)] + [2 + 2 * (k + 1) / n for k in range(n)]
    expected += [4 + (k + 1) / n for k in range(n)]
    assert bar.seen == pytest.approx(expected)  # 3 batches x 16 token steps, fractions of images
    assert bar.n == 5 and not bar.closed  # a bar handed in is advanced, never closed
    assert torch.equal(out, api.generate(tiny, [0, 1, 2, 3, 4], batch_size=2, output="tokens", seed=0,
                                         progress=False, **SETTINGS))


def test_generate_with_a_sampler_without_on_step_still_counts_batches(tiny):
    class Plain:
        def sample_tokens(self, model, labels, *, cfg_scale, temperature, top_k, top_p, generator, schedule):
            return torch.zeros(labels.shape[0], model.num_tokens, dtype=torch.long)

    bar = RecordingBar()
    api.generate(tiny, [0, 1, 2], batch_size=2, output="tokens", progress=bar, sampler=Plain(), **SETTINGS)
    assert bar.seen == [2, 3]


def test_generate_progress_writes_a_bar_that_reaches_the_total(tiny, capsys):
    api.generate(tiny, [0, 1, 2, 3, 4], batch_size=2, output="tokens", progress=True, **SETTINGS)
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("generating: 100%") and "5/5 img" in final, err
    assert re.search(r"\d+(\.\d+)?(img/s|s/img)", final), final  # the rate; the elapsed and ETA in [..<..]
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", final), final


def test_generate_progress_off_and_automatic(tiny, capsys, monkeypatch):
    api.generate(tiny, [0, 1], output="tokens", progress=False, **SETTINGS)
    assert capsys.readouterr().err == ""
    api.generate(tiny, [0, 1], output="tokens", **SETTINGS)  # a log, not a terminal, and short work: no bar
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(api, "_stderr_is_terminal", lambda: True)
    api.generate(tiny, [0, 1], output="tokens", **SETTINGS)  # a terminal: a bar by default
    assert "generating: 100%" in capsys.readouterr().err


# -------------------------------------------------------------------------------- FID sampling


def test_sample_to_shards_drives_one_bar_by_token_steps_across_batches(tiny, tmp_path, monkeypatch):
    bars = []

    def recording_bar(total, desc, show=None, **kwargs):
        bars.append(RecordingBar())
        bars[-1].total = total
        return bars[-1]

    monkeypatch.setattr(fid_sampling, "progress_bar", recording_bar)
    fid_sampling.sample_to_shards(tiny, tmp_path / "s", 5, labels="random", batch_size=2, shard_size=3,
                                  cfg_scale=1.0)
    (bar,) = bars
    n = tiny.num_tokens
    assert bar.total == 5 and bar.n == 5 and bar.closed
    assert len(bar.seen) == 3 * n  # batches of 2 and 1 (shard 0), 2 (shard 1): a step per token
    assert bar.seen[n - 1] == pytest.approx(2) and bar.seen[2 * n - 1] == pytest.approx(3)
    assert bar.seen == sorted(bar.seen)


def test_sample_to_shards_bar_on_stderr_reaches_the_total(tiny, tmp_path, capsys):
    fid_sampling.sample_to_shards(tiny, tmp_path / "s", 3, labels="random", batch_size=2, shard_size=2,
                                  cfg_scale=1.0, progress=True)
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("sampling: 100%") and "3/3 img" in final, final


def test_sample_to_shards_counts_batches_of_a_generate_that_ignores_the_bar(tmp_path, monkeypatch):
    class Stub:
        num_classes = 4

        def generate(self, labels, *, seed, output, batch_size, progress=False, **sampling):
            return np.zeros((len(labels), 4, 4, 3), np.uint8)

    bars = []
    monkeypatch.setattr(fid_sampling, "progress_bar", lambda *a, **k: bars.append(RecordingBar()) or bars[-1])
    fid_sampling.sample_to_shards(Stub(), tmp_path / "s", 5, labels="random", batch_size=2, shard_size=3)
    assert bars[0].seen == [2, 3, 5]


# --------------------------------------------------------------------------- command line


def _generate_argv(tmp_path, *extra):
    return ["generate", "--model", "aim-test-vq", "--random-weights", "--labels", "1,2", "--batch-size", "1",
            "--out", str(tmp_path / "g.png"), "--device", "cpu", *extra]


def test_generate_shows_a_status_line_and_a_bar_by_default(tmp_path, capsys, terminal):
    assert main(_generate_argv(tmp_path)) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert "generating: 100%" in err and "2/2 img" in err
    assert re.search(r"^generated 2 images in .* s .* wrote .*g\.png$", err, re.M), err
    assert "debug:" not in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_suppresses_status_lines_and_bars(tmp_path, capsys, terminal, where):
    argv = _generate_argv(tmp_path)
    argv = ["-q", *argv] if where == "before" else [*argv, "--quiet"]
    assert main(argv) == 0
    assert capsys.readouterr() == ("", "")
    assert (tmp_path / "g.png").is_file()


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_shows_debug_lines(tmp_path, capsys, where):
    argv = _generate_argv(tmp_path, "--no-progress")
    argv = ["--verbose", *argv] if where == "before" else [*argv, "-v"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "debug: aimkit.commands.generate: building aim-test-vq" in err, err
    assert "generated 2 images" in err


def test_verbose_and_quiet_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["-v", *_generate_argv(tmp_path), "-q"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not allowed with" in err[0]


def test_quiet_keeps_warnings(tmp_path, capsys):
    for c, color in (("cat", 200), ("dog", 40)):
        (tmp_path / "photos" / c).mkdir(parents=True)
        Image.fromarray(np.full((20, 20, 3), color, np.uint8)).save(tmp_path / "photos" / c / "0.png")
    (tmp_path / "photos" / "empty").mkdir()
    code = main(["-q", "tokenize", "--data", str(tmp_path / "photos"), "--out", str(tmp_path / "codes"),
                 "--model", "aim-test-vq", "--random-tokenizer", "--workers", "0"])
    assert code == 0
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [line for line in err.strip().splitlines() if line.startswith("warning:")]
    assert "1 class folder(s) hold no images: empty (class 2)" in err  # a warning, shown under -q
    assert "2 images in 1 shards" in out  # the command's output


def test_tokenize_bar_reports_images_with_rate_and_eta(tmp_path, capsys):
    for i in range(3):
        (tmp_path / "photos" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 20, 3), 50 * i, np.uint8)).save(tmp_path / "photos" / "a" / f"{i}.png")
    assert main(["tokenize", "--data", str(tmp_path / "photos"), "--out", str(tmp_path / "codes"),
                 "--model", "aim-test-vq", "--random-tokenizer", "--workers", "0", "--batch-size", "2"]) == 0
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("tokenize: 100%") and "3/3 img" in final, final
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, +\d+(\.\d+)?(img/s|s/img)\]", final), final


def test_eval_progress_and_status_follow_the_flags(tmp_path, capsys, terminal):
    argv = ["eval", "--model", "aim-tiny-shapes", "--random-weights", "--num", "2", "--device", "cpu",
            "--grid", str(tmp_path / "grid.png")]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "generating: 100%" in err and f"wrote {tmp_path / 'grid.png'}" in err
    assert "conditional accuracy" in out  # the command's result stays on stdout
    assert main([*argv, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "generating" not in err and "wrote" in err
    assert main(["-q", *argv]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "conditional accuracy" in out


# ------------------------------------------------------------------------------------- logging


def test_the_library_configures_no_logging(tiny, tmp_path, capsys):
    """Only the command line adds a handler, for the length of a command; library code never does."""
    configuring = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "cli.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("addHandler", "basicConfig", "setLevel",
                                                                 "dictConfig", "fileConfig"):
                configuring.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.attr}")
    assert not configuring, configuring
    api.generate(tiny, [0], output="tokens", progress=False, **SETTINGS)
    loggers = [logging.getLogger("aimkit")] + [
        logger for name, logger in logging.root.manager.loggerDict.items()
        if name.startswith("aimkit.") and isinstance(logger, logging.Logger)]
    assert all(not logger.handlers for logger in loggers)
    level = logging.getLogger("aimkit").level
    assert main(_generate_argv(tmp_path, "--no-progress")) == 0
    assert not logging.getLogger("aimkit").handlers and logging.getLogger("aimkit").level == level  # restored
