"""The aimkit command line: help, one-line errors with exit code 2, convert."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_

import aimkit
from aimkit.cli import COMMANDS, main
from aimkit.official import to_official
from aimkit.weights import save_safetensors_atomic


def test_every_command_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert "usage: aimkit " + name in capsys.readouterr().out


def test_bad_arguments_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", "aim-tiny-shapes", "--num", "0"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected a positive integer" in err[0]


def test_user_error_is_one_line_not_a_traceback(capsys, tmp_path):
    code = main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "out"), "--model", "aim-tiny-shapes"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aimkit convert: error: pretrained weights not found")


def test_convert_official_file_to_aimkit_dir(tmp_path, capsys):
    torch.manual_seed(0)
    src = randomize_(aimkit.build("aim-tiny-shapes", pretrained=False), seed=7)
    save_safetensors_atomic(to_official(src), tmp_path / "official.safetensors")
    code = main(["convert", str(tmp_path / "official.safetensors"), str(tmp_path / "out"),
                 "--model", "aim-tiny-shapes", "--conditioning", "adaln"])
    assert code == 0, capsys.readouterr().err
    out = aimkit.build(tmp_path / "out")
    assert out.config.conditioning.name == "adaln"
    codes = torch.randint(0, src.vocab_size, (2, src.num_tokens), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 30])
    with torch.no_grad():
        assert (src(codes, labels) - out(codes, labels)).abs().max() <= 1e-5


def test_python_dash_m_aimkit_is_the_cli():
    """``python -m aimkit`` runs the same command line (and the same one-line errors)."""
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "aimkit", "--version"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("aimkit ")
    bad = subprocess.run([sys.executable, "-m", "aimkit", "generate", "--model", "aim-tiny-shapes", "--seed", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


# ============================================================ weights on the command line


def _one_line(capsys, code, *needles):
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_generate_refuses_a_model_without_weights(tmp_path, capsys, no_build):
    out = tmp_path / "grid.png"
    code = main(["generate", "--model", "aim-xl", "--num", "1", "--out", str(out)])
    _one_line(capsys, code, "aim-xl has no weights loaded", "--pretrained published", "hf-hub:hp-l33/aim-xlarge",
              "--random-weights")
    assert not out.exists()
    code = main(["generate", "--model", "aim-test-vq", "--num", "1", "--out", str(out)])
    _one_line(capsys, code, "aim-test-vq has no weights loaded", "--pretrained PATH", "--random-weights")


def test_sample_refuses_a_model_without_weights(tmp_path, capsys, no_build):
    out = tmp_path / "s.npz"
    code = main(["sample", "--model", "aim-b", "--num", "2", "--out", str(out), "--device", "cpu"])
    _one_line(capsys, code, "aim-b has no weights loaded", "hf-hub:hp-l33/aim-base", "--random-weights")
    assert list(tmp_path.iterdir()) == []  # refused before any folder was made


def test_eval_refuses_a_model_without_weights(tmp_path, capsys, monkeypatch, no_build):
    import aimkit.assets

    monkeypatch.delitem(aimkit.assets._EMBEDDED, "aim-tiny-shapes")  # as if it shipped no weights
    code = main(["eval", "--num", "2", "--device", "cpu", "--grid", str(tmp_path / "g.png")])
    _one_line(capsys, code, "aim-tiny-shapes has no weights loaded", "--random-weights")


def test_random_weights_must_be_asked_for_and_exclude_pretrained(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["generate", "--model", "aim-test-vq", "--num", "1", "--out", str(out), "--random-weights",
                 "--device", "cpu", "--no-progress"]) == 0
    assert out.is_file()
    capsys.readouterr()
    code = main(["generate", "--model", "aim-tiny-shapes", "--random-weights", "--pretrained", "published",
                 "--out", str(out)])
    _one_line(capsys, code, "--random-weights and --pretrained exclude each other")


def test_pretrained_published_is_the_shipped_weights_where_a_preset_ships_them(tmp_path, capsys, monkeypatch):
    import sys

    from aimkit.assets import embedded_weights
    from aimkit.commands._args import weights_for

    assert weights_for("aim-tiny-shapes", "published") == str(embedded_weights("aim-tiny-shapes"))
    assert weights_for("aim-b", "published") is True  # the Hub record of aimkit.presets.PUBLISHED_WEIGHTS
    real_build, asked = sys.modules["aimkit.build"].build, []

    def spy(name, pretrained=None, **kwargs):
        asked.append(pretrained)
        return real_build(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(sys.modules["aimkit.build"], "build", spy)
    out = tmp_path / "grid.png"
    assert main(["generate", "--model", "aim-tiny-shapes", "--pretrained", "published", "--num", "1",
                 "--cfg-scale", "1", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert out.is_file() and asked == [str(embedded_weights("aim-tiny-shapes"))]


def test_pretrained_published_without_published_weights(capsys, no_build, tmp_path):
    code = main(["generate", "--model", "aim-1b", "--pretrained", "published", "--out", str(tmp_path / "g.png")])
    _one_line(capsys, code, "aim-1b ships no weights and none are published")
    aimkit.build("aim-test-vq").save_pretrained(tmp_path / "saved")
    code = main(["generate", "--model", str(tmp_path / "saved"), "--pretrained", "published",
                 "--out", str(tmp_path / "g.png")])
    _one_line(capsys, code, "is a saved model folder")


# ============================================================ aimkit list


def test_list_shows_size_resolution_and_weights(capsys):
    assert main(["list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  aim-")}
    assert rows["aim-b"].split()[1:4] == ["147.6M", "256x256", "1000"]
    assert rows["aim-b"].endswith("published: hf-hub:hp-l33/aim-base")
    assert rows["aim-tiny-shapes"].split()[1:4] == ["4.2M", "64x64", "36"]
    assert rows["aim-tiny-shapes"].endswith("shipped with aimkit")
    assert rows["aim-1b"].split()[1] == "1.34B" and rows["aim-1b"].endswith("none")
    assert rows["aim-test-mamba2"].split()[1:4] == ["27.5K", "4x4", "tokens"]


def test_list_classes(capsys):
    assert main(["list", "aim-b", "--classes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "aim-b: 1000 classes" and lines[208] == "  207 golden retriever"
    assert main(["list", "aim-test-vq", "--classes"]) == 0
    assert "unnamed" in capsys.readouterr().out


# ============================================================ class names on the command line

NAMES = ("cat", "dog", "Golden Retriever", "tabby cat", "goldfish", "ant", "bee", "fox", "owl", "yak")


@pytest.fixture
def captions(monkeypatch):
    """The caption lines of every grid written (labels through the names the command passed)."""
    from aimkit.samplers import grid

    seen, real = [], grid.make_grid

    def spy(images, nrow=None, labels=None, class_names=None, padding=2):
        seen.append([" ".join(c) for c in grid._captions(labels, class_names, 10**6)[0]] if labels else None)
        return real(images, nrow=nrow, labels=labels, class_names=class_names, padding=padding)

    monkeypatch.setattr(grid, "make_grid", spy)
    return seen


def test_generate_labels_by_name(tmp_path, capsys, captions):
    aimkit.build("aim-test-vq", class_names=NAMES).save_pretrained(tmp_path / "m")
    argv = ["generate", "--model", str(tmp_path / "m"), "--labels", "Yak,golden retriever,3", "--num", "3",
            "--out", str(tmp_path / "g.png"), "--out-dir", str(tmp_path / "each"), "--captions", "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == [
        "00000_class9.png", "00001_class2.png", "00002_class3.png"]
    assert captions == [["9 yak", "2 Golden Retriever", "3 tabby cat"]]
    assert "generated 3 images" in capsys.readouterr().err  # the status line (logged on stderr)
    argv[4] = "golden retreiver"
    _one_line(capsys, main(argv), "unknown class name 'golden retreiver'", "did you mean 'golden retriever'")


def test_unnamed_classes_are_captioned_by_id_only(tmp_path, captions):
    """A 36-class vq-f4-tiny model trained on other data was captioned with the shapes names ("0 red circle")."""
    aimkit.build("aim-test-vq", num_classes=36).save_pretrained(tmp_path / "m")
    assert main(["generate", "--model", str(tmp_path / "m"), "--labels", "0,35", "--out", str(tmp_path / "g.png"),
                 "--captions", "--device", "cpu", "--no-progress"]) == 0
    assert captions == [["0", "35"]]
