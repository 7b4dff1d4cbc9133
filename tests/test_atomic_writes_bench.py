"""aimkit.bench: plots are written atomically, and one run at a time writes an output folder."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from aimkit._lock import FolderBusyError, FolderLock
from aimkit.bench import BenchOptions, plots
from aimkit.bench._recorder import Recorder

pytest.importorskip("matplotlib")
bench_run = importlib.import_module("aimkit.bench.run")  # the module; aimkit.bench.run is its function


def _row() -> dict:
    """A measured sampling row, as much of it as the fraction-of-floor plot reads."""
    row = dict(status="ok", suite="sampling", model="aim-tiny-shapes", backbone="mamba2", batch=2, tokens=16)
    return dict(row, fraction_of_floor=0.5)


def test_a_failed_plot_write_keeps_the_earlier_plot(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    (name,) = plots({"rows": [_row()]}, tmp_path)  # a fraction-of-floor bar chart
    before = (tmp_path / name).read_bytes()

    def interrupted_savefig(self, fname, *args, **kwargs):  # the disk fills half way through
        if hasattr(fname, "write"):
            fname.write(before[:100])
        else:
            Path(fname).write_bytes(before[:100])
        raise OSError("No space left on device")

    monkeypatch.setattr(Figure, "savefig", interrupted_savefig)
    with pytest.raises(OSError, match="No space left"):
        plots({"rows": [_row(), dict(_row(), batch=4)]}, tmp_path)
    assert (tmp_path / name).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no partial temp file either


def test_a_second_bench_run_on_a_folder_in_use_is_refused_and_changes_nothing(tmp_path):
    (tmp_path / "bench.log").write_text("the first run's log\n")
    (tmp_path / "bench.json").write_text('{"rows": []}\n')
    with FolderLock(tmp_path, command="aimkit bench"):
        with pytest.raises(FolderBusyError, match="aimkit bench"):
            Recorder(BenchOptions(device="cpu", out=str(tmp_path)))
    assert (tmp_path / "bench.log").read_text() == "the first run's log\n"
    assert (tmp_path / "bench.json").read_text() == '{"rows": []}\n'


def test_a_bench_run_lets_go_of_its_folder_however_it_ends(tmp_path, monkeypatch):
    def broken_device(device, dtype):
        raise RuntimeError("device lost")

    monkeypatch.setattr(bench_run, "measure_device", broken_device)
    with pytest.raises(RuntimeError, match="device lost"):
        bench_run.run(BenchOptions(device="cpu", out=str(tmp_path)))
    FolderLock(tmp_path).acquire().release()  # free again: a later run in this process may use it
