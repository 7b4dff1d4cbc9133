"""Reliability of ``aimkit train``: hostile settings, a second writer, damaged checkpoints,
``kill -9`` at random points, a full disk, metrics across resumes, ``init_from`` preset names.

Every run is the tiny ``tiny_test`` recipe on random codes (64 items, 16 per step: 4 steps per
epoch), on the CPU; a run of 8 steps takes well under a second in-process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

import aimkit.training.checkpoint as checkpoint
import aimkit.training.cli as training_cli
from aimkit._lock import FolderBusyError, FolderLock
from aimkit.cli import main as cli_main
from aimkit.errors import ConfigError
from aimkit.training import TrainConfig, TrainingStopped, find_checkpoint, load_config, train, verify_checkpoint
from aimkit.training._metrics import MetricsFile
from aimkit.weights import read_state_dict

ARGS = ["progress_bar=false", "log_every=1", "data_size=64", "max_steps=8", "checkpoint_every=2", "keep_last=3"]
STEP = "checkpoints/step-{:08d}"


def _cfg(out, *extra):
    return load_config("tiny_test", [f"output_dir={out}", *ARGS, *extra])


def _cli(capsys, *argv):
    """Run ``aimkit train`` in-process: (exit code, stdout, stderr)."""
    code = cli_main(["train", "--config", "tiny_test", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def _one_line_error(code, err):
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (code, err)
    return err


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _final(out):
    return read_state_dict(Path(out) / "final" / "model.safetensors")


def _assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # the resume contract is bit-exactness on CPU


def _snapshot(folder):
    """Every file under ``folder`` (the lock file aside) with its size, checksum and mtime."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".aimkit.lock"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 8-step run: what every interrupted and resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(_cfg(out))
    return {"params": _final(out), "metrics": _metrics(out)}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """The same run stopped after step 6: checkpoints step-2, step-4 and step-6, no final/."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(_cfg(out, "stop_after=6"))
    return out


@pytest.fixture
def run_copy(stopped, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    return out


def _same_metric_rows(got, want):
    keys = ("step", "loss", "lr", "grad_norm")
    assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in want]


# ------------------------------------------------------------------------------------------
# 1. hostile settings: one line, exit 2, nothing written, no model built
# ------------------------------------------------------------------------------------------

HOSTILE = [
    ("lr", "lr=.inf"), ("lr", "lr=-.inf"), ("lr", "lr=.nan"), ("lr", "lr=0"), ("lr", "lr=-3e-4"),
    ("lr_per_256", "lr=null lr_per_256=.inf"), ("lr_per_256", "lr=null lr_per_256=.nan"),
    ("lr_per_256", "lr=null lr_per_256=0"), ("lr_per_256", "lr=null lr_per_256=-1"),
    ("betas", "betas=[2,3]"), ("betas", "betas=[0.9,1.0]"), ("betas", "betas=[-0.1,0.95]"),
    ("betas", "betas=[.nan,0.95]"), ("betas", "betas=[0.9,.inf]"),
    ("adam_eps", "adam_eps=-1"), ("adam_eps", "adam_eps=0"), ("adam_eps", "adam_eps=.nan"),
    ("adam_eps", "adam_eps=.inf"),
    ("weight_decay", "weight_decay=.nan"), ("weight_decay", "weight_decay=.inf"), ("weight_decay", "weight_decay=-0.1"),
    ("grad_clip", "grad_clip=.nan"), ("grad_clip", "grad_clip=.inf"), ("grad_clip", "grad_clip=-1"),
    ("epochs", "epochs=.nan"), ("epochs", "epochs=.inf"), ("epochs", "epochs=0"), ("epochs", "epochs=-2"),
    ("seed", "seed=-1"), ("seed", "seed=4294967296"), ("seed", "seed=99999999999999999999999"),
    ("min_lr_ratio", "min_lr_ratio=.nan"), ("min_lr_ratio", "min_lr_ratio=1.5"), ("min_lr_ratio", "min_lr_ratio=-0.1"),
    ("warmup_steps", "warmup_steps=-1"), ("warmup_steps", "warmup_steps=9223372036854775808"),
    ("max_steps", "max_steps=0"), ("max_steps", "max_steps=-5"), ("max_steps", "max_steps=9223372036854775808"),
    ("max_steps", "max_steps=1" + "0" * 400),  # beyond any float
    ("stop_after", "stop_after=0"), ("stop_after", "stop_after=-1"),
    ("global_batch_size", "global_batch_size=0"), ("global_batch_size", "global_batch_size=-16"),
    ("batch_size", "batch_size=0"), ("grad_accum", "grad_accum=-1"), ("grad_accum", "grad_accum=0"),
    ("data_size", "data_size=0"), ("data_size", "data_size=100000000000000000000"),
    ("data_size", "data_size=1099511627776"), ("num_workers", "num_workers=100000"),
    ("global_batch_size", "global_batch_size=1000000000000"), ("num_workers", "num_workers=-1"),
    ("max_nonfinite", "max_nonfinite=0"),
    ("checkpoint_every", "checkpoint_every=0"), ("keep_last", "keep_last=-1"), ("log_every", "log_every=0"),
    ("check_replicas_every", "check_replicas_every=-1"),
    ("ema_decay", "ema_decay=1.0"), ("ema_decay", "ema_decay=-0.5"), ("ema_decay", "ema_decay=.nan"),
    ("sample_every", "sample_every=-1"), ("sample_num", "sample_num=0"), ("sample_num", "sample_num=100000"),
]


@pytest.mark.parametrize("key,overrides", HOSTILE, ids=[h[1][:48] for h in HOSTILE])
def test_hostile_numbers_are_refused(key, overrides, tmp_path, capsys, no_build):
    out = tmp_path / "run"
    err = _one_line_error(*_cli(capsys, f"output_dir={out}", *ARGS, *overrides.split())[::2])
    assert f"'{key}'" in err, err
    assert not out.exists()  # refused before anything was written


def test_every_numeric_option_has_hostile_cases():
    def numeric(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        return args[0] in (int, float)

    keys = {k for k, tp in typing.get_type_hints(TrainConfig).items() if numeric(tp)}
    assert keys == {h[0] for h in HOSTILE}


def test_yaml_spellings_of_good_values_are_accepted(tmp_path):
    base = [f"output_dir={tmp_path}"]
    assert load_config("tiny_test", base + ["mixed_precision=no"]).mixed_precision == "no"  # YAML: False
    assert load_config("tiny_test", base + ["mixed_precision=off"]).mixed_precision == "no"
    assert load_config("tiny_test", base + ["lr=3e-4"]).lr == 3e-4  # YAML 1.1: the string '3e-4'
    with pytest.raises(ConfigError, match="'mixed_precision' must be one of"):
        load_config("tiny_test", base + ["mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="'lr' must be a finite float"):
        load_config("tiny_test", base + ["lr=fast"])


@pytest.mark.parametrize("where", ["/dev/null", "file", "file/below", "no-permission"])
def test_unusable_output_dir_is_refused_before_the_model(where, tmp_path, capsys, no_build):
    (tmp_path / "file").write_text("not a folder\n")
    path = where if where.startswith("/") else str(tmp_path / where)
    if where == "no-permission":
        (tmp_path / where).mkdir(mode=0o500)
        if os.access(tmp_path / where, os.W_OK):
            pytest.skip("this user (root?) may write into a read-only folder")
    code, _, err = _cli(capsys, f"output_dir={path}", *ARGS)
    assert "output_dir" in _one_line_error(code, err) and path in err
    assert (tmp_path / "file").read_text() == "not a folder\n"


# ------------------------------------------------------------------------------------------
# 2. non-finite parameters are never saved
# ------------------------------------------------------------------------------------------


def test_nonfinite_parameters_stop_before_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"  # a decay of 1e300 turns the matrices to inf in the first update
    code, _, err = _cli(capsys, f"output_dir={out}", *ARGS, "weight_decay=1e300", "checkpoint_every=1")
    err = _one_line_error(code, err)
    assert "step 1: parameter " in err and "is not finite" in err and "last good checkpoint is none" in err
    assert not (out / "checkpoints").exists() and not (out / "final").exists()  # nothing saved


def test_nonfinite_parameters_stop_before_the_export(tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # after the third update one tensor goes bad; later losses are NaN
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=r"step 8: parameter \S+ is not finite") as info:
        train(_cfg(out, "max_nonfinite=100"))
    message = str(info.value)
    assert str(out / "final") in message and f"last good checkpoint is {out / STEP.format(2)}" in message
    assert not (out / "final").exists()
    assert [p.name for p in find_checkpoint(out).parent.glob("step-*")] == ["step-00000002"]
    assert all(torch.isfinite(t).all() for t in read_state_dict(out / STEP.format(2) / "model.safetensors").values())


# ------------------------------------------------------------------------------------------
# 3. one writer per output_dir
# ------------------------------------------------------------------------------------------


def test_second_writer_is_refused_and_touches_nothing(run_copy, tmp_path, capsys):
    before = _snapshot(run_copy)
    with FolderLock(run_copy, command="pytest holder"):
        code, _, err = _cli(capsys, f"output_dir={run_copy}", *ARGS, "--resume", "auto")
        assert "in use by" in _one_line_error(code, err) and "pytest holder" in err
        fresh = tmp_path / "fresh"
        with FolderLock(fresh, command="pytest holder"):
            _one_line_error(*_cli(capsys, f"output_dir={fresh}", *ARGS)[::2])
        assert [p.name for p in fresh.iterdir()] == [".aimkit.lock"]
    assert _snapshot(run_copy) == before  # no metric rows, no checkpoint touched


def test_lock_is_held_for_the_whole_run_and_released(tmp_path, monkeypatch):
    out, seen = tmp_path / "run", []
    real = MetricsFile.append

    def append(self, record):
        with pytest.raises(FolderBusyError):
            FolderLock(out).acquire()
        seen.append(record["step"])
        real(self, record)

    monkeypatch.setattr(MetricsFile, "append", append)
    train(_cfg(out, "max_steps=3"))
    assert seen == [1, 2, 3]
    FolderLock(out).acquire().release()  # free again once the run is over


# ------------------------------------------------------------------------------------------
# 4. damaged checkpoints: the newest one that verifies, and why the newer ones were skipped
# ------------------------------------------------------------------------------------------


def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _grow(path):
    with open(path, "ab") as f:
        f.write(b"\0" * 10)


def _state_text(text):
    return lambda ckpt: (ckpt / "trainer_state.json").write_bytes(text if isinstance(text, bytes) else text.encode())


DAMAGE = {  # name -> (damage(ckpt_dir), the reason printed)
    "cut-model": (lambda c: _cut(c / "model.safetensors"), "model.safetensors is "),
    "cut-optimizer": (lambda c: _cut(c / "optimizer.pt"), "optimizer.pt is "),
    "cut-scheduler": (lambda c: _cut(c / "scheduler.pt"), "scheduler.pt is "),
    "cut-rng": (lambda c: _cut(c / "rng-00000.pt"), "rng-00000.pt is "),
    "grown-optimizer": (lambda c: _grow(c / "optimizer.pt"), "optimizer.pt is "),
    "flip-model": (lambda c: _flip(c / "model.safetensors"), "model.safetensors does not match"),
    "flip-optimizer": (lambda c: _flip(c / "optimizer.pt"), "optimizer.pt does not match"),
    "flip-scheduler": (lambda c: _flip(c / "scheduler.pt"), "scheduler.pt does not match"),
    "flip-rng": (lambda c: _flip(c / "rng-00000.pt"), "rng-00000.pt does not match"),
    "cut-state": (lambda c: _cut(c / "trainer_state.json"), "trainer_state.json is not valid JSON"),
    "state-not-json": (_state_text("{step: 6"), "trainer_state.json is not valid JSON"),
    "state-binary": (_state_text(b"\xff\xfe\x00garbage"), "trainer_state.json is not valid JSON"),
    "state-list": (_state_text("[6]"), "trainer_state.json is not valid JSON"),
    "state-step-text": (_state_text('{"step": "six"}'), "trainer_state.json is not valid JSON"),
    "state-step-negative": (_state_text('{"step": -6}'), "trainer_state.json is not valid JSON"),
    "state-files-text": (_state_text('{"step": 6, "files": "all"}'), "trainer_state.json holds a malformed file list"),
    "state-files-escape": (_state_text('{"step": 6, "files": {"../x": {"size": 1, "sha256": "0"}}}'),
                           "trainer_state.json holds a malformed file list"),
    "state-is-dir": (lambda c: ((c / "trainer_state.json").unlink(), (c / "trainer_state.json").mkdir()),
                     "trainer_state.json is missing"),
    "no-state": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "no-model": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors is missing"),
    "no-optimizer": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "no-rng": (lambda c: (c / "rng-00000.pt").unlink(), "rng-00000.pt is missing"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_exactly(kind, run_copy, reference, capsys):
    damage, reason = DAMAGE[kind]
    newest = run_copy / STEP.format(6)
    damage(newest)
    assert find_checkpoint(run_copy) == run_copy / STEP.format(4)  # never raises on a damaged state
    assert verify_checkpoint(newest) is not None
    code, out, err = _cli(capsys, f"output_dir={run_copy}", *ARGS, "--resume", "auto")
    assert code == 0, err
    skipped = [line for line in out.splitlines() if line.startswith("skipping")]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipping {STEP.format(6)}: {reason}"), out
    assert f"resumed from {run_copy / STEP.format(4)} at step 4" in out
    _assert_same_params(_final(run_copy), reference["params"])
    _same_metric_rows(_metrics(run_copy), reference["metrics"])
    assert verify_checkpoint(newest) is None  # written anew by the resumed run


def test_reported_sizes_name_the_file(run_copy, capsys):
    opt = run_copy / STEP.format(6) / "optimizer.pt"
    size = opt.stat().st_size
    _cut(opt)
    code, out, _ = _cli(capsys, f"output_dir={run_copy}", *ARGS, "--resume", "auto")
    assert code == 0 and f"skipping {STEP.format(6)}: optimizer.pt is {size // 2} bytes, recorded {size}" in out


def _strip_checksums(ckpt):
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["files"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def test_checkpoint_without_checksums_still_loads(run_copy, reference, capsys):
    _strip_checksums(run_copy / STEP.format(6))
    code, out, _ = _cli(capsys, f"output_dir={run_copy}", *ARGS, "--resume", "auto")
    assert code == 0 and "skipping" not in out and f"resumed from {run_copy / STEP.format(6)} at step 6" in out
    _assert_same_params(_final(run_copy), reference["params"])


@pytest.mark.parametrize("name", ["optimizer.pt", "rng-00000.pt", "model.safetensors", "scheduler.pt"])
def test_damaged_checkpoint_without_checksums_is_skipped_when_it_does_not_load(name, run_copy, reference, capsys):
    _strip_checksums(run_copy / STEP.format(6))
    _cut(run_copy / STEP.format(6) / name)
    code, out, err = _cli(capsys, f"output_dir={run_copy}", *ARGS, "--resume", "auto")
    assert code == 0 and "Traceback" not in err, err
    assert f"skipping {STEP.format(6)}: it does not load (" in out
    assert f"resumed from {run_copy / STEP.format(4)} at step 4" in out
    _assert_same_params(_final(run_copy), reference["params"])


def test_explicit_damaged_checkpoint_is_one_line(run_copy, capsys):
    ckpt = run_copy / STEP.format(6)
    _cut(ckpt / "optimizer.pt")
    before = _snapshot(run_copy)
    code, _, err = _cli(capsys, f"output_dir={run_copy}", *ARGS, "--resume", str(ckpt))
    assert f"cannot resume from {ckpt}: optimizer.pt is" in _one_line_error(code, err)
    assert _snapshot(run_copy) == before


def test_explicit_run_directory_falls_back(run_copy, tmp_path, reference, capsys):
    _flip(run_copy / STEP.format(6) / "model.safetensors")
    out = tmp_path / "continued"
    code, text, err = _cli(capsys, f"output_dir={out}", *ARGS, "--resume", str(run_copy))
    assert code == 0, err
    assert f"skipping {STEP.format(6)}: model.safetensors does not match" in text
    _assert_same_params(_final(out), reference["params"])


def test_no_usable_checkpoint_is_one_line_and_loses_nothing(run_copy, capsys):
    for step, damage in ((2, _cut), (4, _flip), (6, _grow)):
        damage(run_copy / STEP.format(step) / "optimizer.pt")
    before = _snapshot(run_copy)
    code, out, err = _cli(capsys, f"output_dir={run_copy}", *ARGS, "--resume", "auto")
    assert "can be resumed from" in _one_line_error(code, err)
    assert len([line for line in out.splitlines() if line.startswith("skipping")]) == 3
    assert _snapshot(run_copy) == before  # metrics not truncated, checkpoints left for inspection
    code, _, err = _cli(capsys, f"output_dir={run_copy}", *ARGS)  # nor overwritten by a fresh start
    assert "already holds checkpoints" in _one_line_error(code, err)


# ------------------------------------------------------------------------------------------
# 5. kill -9 at random points, then --resume auto: the same parameters, bit for bit
# ------------------------------------------------------------------------------------------


def test_kill9_at_random_points_then_resume_is_exact(tmp_path):
    args = [*ARGS, "max_steps=32", "checkpoint_every=1", "keep_last=2"]  # a save every step: kills land in saves
    ref = tmp_path / "reference"
    train(load_config("tiny_test", [f"output_dir={ref}", *args]))
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "aimkit.training", "--config", "tiny_test", f"output_dir={out}", *args,
           "--resume", "auto"]
    kills = []
    for _ in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                                env=subprocess_env(torch.get_num_threads()))  # the reference run's threads
        for line in proc.stdout:  # wait until it trains, then kill it a random moment later
            if line.startswith("step"):
                break
        delay = rng.uniform(0.0, 0.3)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        kills.append((round(delay, 3), proc.returncode))
    where = f"(seed {seed}, kills {kills})"
    assert any(code == -signal.SIGKILL for _, code in kills), where
    result = train(load_config("tiny_test", [f"output_dir={out}", *args]), resume="auto")
    assert result.step == 32, where
    _assert_same_params(_final(out), _final(ref))
    _same_metric_rows(_metrics(out), _metrics(ref))  # every step once, the same numbers
    assert not list((out / "checkpoints").glob(".tmp-*")), where


# ------------------------------------------------------------------------------------------
# 6. a full disk: one line, exit 2, the previous checkpoint intact, nothing half-written visible
# ------------------------------------------------------------------------------------------


def _after_full_disk(out, reference):
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".aimkit")) == ["latest", "step-00000002"]
    assert (ckpts / "latest").read_text().strip() == "step-00000002"
    assert verify_checkpoint(ckpts / "step-00000002") is None
    result = train(_cfg(out), resume="auto")  # the disk has room again
    assert result.step == 8
    _assert_same_params(_final(out), reference["params"])
    _same_metric_rows(_metrics(out), reference["metrics"])


@pytest.mark.parametrize("victim", ["optimizer.pt", "rng-00000.pt", "model.safetensors"])
def test_full_disk_while_saving_a_checkpoint(victim, tmp_path, capsys, monkeypatch, reference):
    import aimkit.weights

    def full(path):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)  # a part got written before the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    real_torch, real_st = checkpoint._write_torch, aimkit.weights.save_safetensors_atomic
    monkeypatch.setattr(checkpoint, "_write_torch",
                        lambda obj, path: full(path) if path.name == victim and path.parent.name.endswith("04")
                        else real_torch(obj, path))
    monkeypatch.setattr(aimkit.weights, "save_safetensors_atomic",
                        lambda sd, path, **kw: full(path) if path.name == victim and path.parent.name.endswith("04")
                        else real_st(sd, path, **kw))
    out = tmp_path / "run"
    code, _, err = _cli(capsys, f"output_dir={out}", *ARGS)
    assert "no space left on the device" in _one_line_error(code, err) and victim in err
    monkeypatch.undo()
    _after_full_disk(out, reference)


def test_full_disk_while_logging_through_module_main(tmp_path, capsys, monkeypatch):
    def full(self, record):
        if record["step"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(MetricsFile, "append", full)
    code = training_cli.main(["--config", "tiny_test", f"output_dir={tmp_path / 'run'}", *ARGS])
    err = capsys.readouterr().err.strip()
    assert "aimkit train: error: no space left on the device" in _one_line_error(code, err)


def test_full_disk_while_rewriting_metrics_keeps_them(run_copy, capsys, monkeypatch):
    metrics = run_copy / "metrics.jsonl"
    with open(metrics, "a") as f:  # rows of a run killed after its last checkpoint, the last one cut
        f.write(json.dumps({"step": 7, "loss": 1.0}) + "\n" + '{"step": 8, "lo')
    before = metrics.read_bytes()
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "metrics.jsonl":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    code, _, err = _cli(capsys, f"output_dir={run_copy}", *ARGS, "--resume", "auto")
    assert "no space left" in _one_line_error(code, err)
    assert metrics.read_bytes() == before  # rewritten through a temporary file, never in place
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".metrics.jsonl")]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs (needs the right to mount: root in most containers), else skip."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                              check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (a real full-disk test needs it): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True, timeout=30)


def _fill(folder: Path, leave: int) -> Path:
    """Fill the file system of ``folder`` up, then give ``leave`` bytes back."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: closing it writes nothing more
        try:
            while True:
                f.write(b"\1" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with open(filler, "r+b") as f:
        f.truncate(max(0, filler.stat().st_size - leave))
    return filler


@pytest.mark.parametrize("leave,victim", [(0, "rng-00000.pt"), (64 << 10, "model.safetensors"),
                                          (160 << 10, "optimizer.pt")])  # the first file that does not fit
def test_real_full_disk_on_a_tmpfs(leave, victim, small_tmpfs, capsys, monkeypatch, reference):
    out, real_save = small_tmpfs / "run", checkpoint.Checkpointer.save
    fillers = []

    def save(self, step, *args, **kwargs):
        if step == 4:  # the disk fills up just before the second checkpoint
            fillers.append(_fill(small_tmpfs, leave))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    code, _, err = _cli(capsys, f"output_dir={out}", *ARGS)
    assert "no space left on the device" in _one_line_error(code, err) and err.endswith(f"step-00000004/{victim}")
    monkeypatch.undo()
    fillers[0].unlink()
    _after_full_disk(out, reference)


# ------------------------------------------------------------------------------------------
# 7. metrics across resumes; init_from preset names
# ------------------------------------------------------------------------------------------


def test_metrics_survive_resumes(tmp_path, reference):
    out = tmp_path / "run"
    train(_cfg(out, "stop_after=3"))
    with open(out / "metrics.jsonl", "a") as f:  # a killed run logged steps 4-5 after its last checkpoint
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n" + json.dumps({"step": 5, "loss": 9.0}) + "\n" + '{"st')
    train(_cfg(out, "stop_after=5"), resume="auto")
    train(_cfg(out), resume="auto")
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))  # each step once, in order
    _same_metric_rows(rows, reference["metrics"])


def test_init_from_a_preset_name(tmp_path, capsys):
    from aimkit.assets import embedded_weights

    config = tmp_path / "shapes.yaml"
    config.write_text("model: aim-tiny-shapes\ndata: random\ndata_size: 1\nnum_workers: 0\nglobal_batch_size: 1\n"
                      "lr: 1.0e-7\nlr_per_256: null\nweight_decay: 0.0\nmax_steps: 1\nmixed_precision: no\n"
                      "progress_bar: false\n")
    out = tmp_path / "run"
    train(load_config(str(config), [f"output_dir={out}", "init_from=aim-tiny-shapes"]))
    shipped = read_state_dict(embedded_weights("aim-tiny-shapes") / "model.safetensors")
    trained = _final(out)
    # one AdamW step of lr 1e-7 moves a weight by about 1e-7; a random start is ~1e-2 away
    common = trained.keys() & shipped.keys()
    assert "tok_embed.weight" in common
    worst = max((trained[k].float() - shipped[k].float()).abs().max().item() for k in common)
    assert worst < 1e-5

    code = cli_main(["train", "--config", str(config), f"output_dir={tmp_path / 'x'}", "init_from=aim-tiny-shape"])
    err = _one_line_error(code, capsys.readouterr().err.strip())
    assert "did you mean aim-tiny-shapes" in err and not (tmp_path / "x").exists()
