"""``aimkit plot RUN``: loss, learning rate and gradient norm of RUN/metrics.jsonl to a PNG."""

import json
import sys

import pytest

from aimkit.cli import main as cli_main


def _run(tmp_path, rows=20):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": s, "loss": 5.0 / s, "lr": 1e-3 * min(1, s / 5), "grad_norm": 1.0 + s % 3})
             for s in range(1, rows + 1)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 21, "loss": 0.1')  # a line cut by a kill
    return run


def _one_line(capsys, argv):
    code = cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_plot_draws_three_panels_to_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    run = _run(tmp_path)
    assert cli_main(["plot", str(run)]) == 0
    assert "20 metric lines, steps 1..20" in capsys.readouterr().out
    with Image.open(run / "metrics.png") as png:
        assert png.format == "PNG" and png.height > png.width  # three panels, one above the other
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "metrics.png"]  # no temporary left
    other = tmp_path / "curves.png"
    assert cli_main(["plot", str(run / "metrics.jsonl"), "--out", str(other), "--log-loss"]) == 0
    assert other.stat().st_size > 1000


def test_plot_of_a_real_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from aimkit.training import load_config, train

    out = tmp_path / "tiny"
    train(load_config("tiny_test", [f"output_dir={out}", "max_steps=3", "log_every=1", "progress_bar=false"]))
    assert cli_main(["plot", str(out)]) == 0
    assert (out / "metrics.png").is_file()


def test_plot_errors_are_one_line(tmp_path, capsys):
    assert "does not exist" in _one_line(capsys, ["plot", str(tmp_path / "missing")])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert "holds no metric lines" in _one_line(capsys, ["plot", str(empty)])
    run = _run(tmp_path)
    assert "is a directory" in _one_line(capsys, ["plot", str(run), "--out", str(tmp_path)])


def test_plot_without_matplotlib_says_what_to_install(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    err = _one_line(capsys, ["plot", str(_run(tmp_path))])
    assert "needs matplotlib: pip install 'aimkit[plots]'" in err
