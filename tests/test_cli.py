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
