"""Several processes on the CPU (gloo through ``accelerate launch``): what a multi-GPU run relies on
that can be shown without GPUs.

* A run checkpointed by two processes resumes on one with the same global batch: the data order
  and the schedule continue, and the weights equal an uninterrupted one-process run.
* ``kill -9`` of one rank stops the whole launch within seconds (no rank left waiting in a
  collective), and the run resumes from its last checkpoint.
* ``aimkit sample`` in two processes writes the npz of one process, bit for bit.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

from aimkit.training import find_checkpoint
from aimkit.weights import read_state_dict

LAUNCHER = Path(sys.executable).parent / "accelerate"
RUN = ["--config", "tiny_test", "log_every=1", "progress_bar=false", "model_args={class_dropout: 0.0}"]




def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(*args: str) -> list[str]:
    """``accelerate launch`` of two CPU processes (gloo), as tiny_test.yaml's header documents."""
    return [str(LAUNCHER), "launch", "--main_process_port", str(_free_port()), "--multi_gpu", "--num_processes", "2",
            "-m", "aimkit.training", *RUN, *args]


def _one_process(*args: str) -> list[str]:
    return [sys.executable, "-m", "aimkit.training", *RUN, *args]


def _kill_tree(proc: subprocess.Popen) -> None:
    """The launcher and every process under it (torch elastic starts its workers in new sessions)."""
    psutil = pytest.importorskip("psutil")
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in [*family, proc]:
        try:
            p.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    proc.wait(timeout=30)


def _run(cmd: list[str], cwd: Path, timeout: float = 240) -> str:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                            cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


def _alive(p) -> bool:
    psutil = pytest.importorskip("psutil")
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for_step(proc: subprocess.Popen, step: int, deadline_s: float) -> None:
    """Read the launch's output (in a thread, so that a hung launch cannot block the test) until
    a log line of ``step`` or later."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            line = lines.get(timeout=max(0.1, end - time.monotonic()))
        except queue.Empty:
            break
        match = re.match(r"step\s+(\d+)\s+\|", line)
        if match and int(match.group(1)) >= step:
            return
    raise AssertionError(f"the launch logged no step {step} within {deadline_s:.0f} s")


def test_two_process_checkpoint_resumes_on_one_process(tmp_path):
    split, whole = tmp_path / "split", tmp_path / "whole"
    first = _run(_launch(f"output_dir={split}", "max_steps=6", "checkpoint_every=3", "stop_after=3"), tmp_path)
    assert "2 process(es) x batch 8" in first
    second = _run(_one_process(f"output_dir={split}", "max_steps=6", "checkpoint_every=3", "--resume", "auto"),
                  tmp_path)
    assert "1 process(es) x batch 16" in second and "at step 3" in second
    _run(_one_process(f"output_dir={whole}", "max_steps=6", "checkpoint_every=3"), tmp_path)
    a = read_state_dict(whole / "final" / "model.safetensors")
    b = read_state_dict(split / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # same items per step, same schedule; only the order of float sums differs
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5, msg=key)


def test_killing_one_rank_stops_the_launch_and_the_run_resumes(tmp_path):
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "run"
    proc = subprocess.Popen(_launch(f"output_dir={out}", "max_steps=100000", "checkpoint_every=2"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(),
                            cwd=tmp_path)
    try:
        _wait_for_step(proc, 5, deadline_s=180)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "aimkit.training" in " ".join(p.cmdline())]
        victim = next(p for p in workers if p.environ().get("RANK") == "1")
        start = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        proc.wait(timeout=120)
        stopped_after = time.monotonic() - start
        assert not [p for p in workers if _alive(p)]
    finally:
        _kill_tree(proc)  # nothing may outlive the test, whatever failed
    assert proc.returncode != 0
    assert stopped_after < 60, f"the launch took {stopped_after:.0f} s to stop after one rank was killed"
    checkpoint = find_checkpoint(out)
    assert checkpoint is not None
    resumed = _run(_one_process(f"output_dir={out}", "max_steps=8", "checkpoint_every=2", "--resume", "auto"),
                   tmp_path)
    assert f"resumed from {checkpoint}" in resumed and "done: 8 steps" in resumed


def test_sample_with_two_processes_writes_the_npz_of_one(tmp_path):
    """``aimkit sample`` under ``accelerate launch`` with two processes: the same packed file, to
    the bit, as one process writes (each shard's draws depend on the run's seed and the shard)."""
    import numpy as np

    args = ["sample", "--model", "aim-test-vq", "--random-weights", "--num", "20", "--batch-size", "4",
            "--shard-size", "4", "--device", "cpu", "--no-progress"]
    _run([str(LAUNCHER), "launch", "--main_process_port", str(_free_port()), "--multi_gpu", "--num_processes", "2",
          "-m", "aimkit.cli", *args, "--out", str(tmp_path / "two.npz")], tmp_path)
    _run([sys.executable, "-m", "aimkit.cli", *args, "--out", str(tmp_path / "one.npz")], tmp_path)
    with np.load(tmp_path / "two.npz") as two, np.load(tmp_path / "one.npz") as one:
        assert sorted(two.files) == sorted(one.files)
        for name in one.files:
            assert np.array_equal(two[name], one[name]), name
        assert one["arr_0"].shape[0] == 20
