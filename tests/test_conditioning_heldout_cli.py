"""``aimkit convert --conditioning``: bad inputs give one line on stderr, exit status 2 and write
nothing; ``--approximate`` is the explicit way to accept a conversion that changes the model.

Before the fix ``--conditioning ""`` was silently ignored (the model was written unconverted),
there was no ``--approximate`` although the refusal told the user to pass ``approximate=True``,
options were checked only after the weights were loaded, ``--num-groups`` with a kind without
groups ended in "Valid options: " with nothing after it, and a conversion warning printed as
Python's two-line warning."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_

import aimkit
from aimkit.cli import main


def _cli(capsys, argv):
    """(exit status, stderr lines, stdout) of the CLI run in-process."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random per-layer aim-test-mamba2 (2 layers) and a bfloat16 adaLN-group one, saved."""
    root = tmp_path_factory.mktemp("src")
    randomize_(aimkit.build("aim-test-mamba2"), seed=1).save_pretrained(root / "adaln")
    group = aimkit.build("aim-test-mamba2", conditioning="adaln-group", num_groups=2, dtype=torch.bfloat16)
    randomize_(group, seed=2).save_pretrained(root / "group-bf16")
    return root


@pytest.mark.parametrize(("extra", "message"), [
    (["--conditioning", ""], "must name a kind"),
    (["--conditioning", "  "], "must name a kind"),
    (["--conditioning", "bogus"], "unknown conditioning 'bogus'"),
    (["--conditioning", "adaln", "--num-groups", "2"], "--num-groups does not apply to --conditioning adaln"),
    (["--conditioning", "adaln-single", "--num-groups", "1"], "does not apply"),
    (["--conditioning", "adaln-group"], "pass --num-groups"),  # the default 4 > 2 layers
    (["--conditioning", "adaln-group", "--num-groups", "3"], "more than aim-test-mamba2's 2 layers"),
    (["--approximate"], "--approximate needs --conditioning"),
    (["--conditioning", "adaln-single"], "--approximate"),  # refused: the two layers' weights differ
    (["--conditioning", "class-token"], "final adaLN"),
])
def test_bad_conditioning_requests_exit_2_and_write_nothing(saved, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code, err, _ = _cli(capsys, ["convert", str(saved / "adaln"), str(out), "--model", "aim-test-mamba2", *extra])
    assert code == 2 and len(err) == 1 and err[0].startswith("aimkit convert: error: "), err
    assert message in err[0], err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_conditioning_is_checked_before_the_weights_are_read(tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    code, err, _ = _cli(capsys, ["convert", str(tmp_path / "junk.safetensors"), str(tmp_path / "out"),
                                 "--model", "aim-test-mamba2", "--conditioning", "adaln-grup"])
    assert code == 2 and len(err) == 1 and "unknown conditioning 'adaln-grup'" in err[0], err


def test_approximate_writes_the_averaged_model_and_says_so(saved, tmp_path, capsys):
    code, err, out = _cli(capsys, ["convert", str(saved / "adaln"), str(tmp_path / "out"), "--model", "aim-test-mamba2",
                                   "--conditioning", "adaln-single", "--approximate"])
    assert code == 0, err
    assert len(err) == 1 and err[0].startswith("warning: approximate conversion to adaln-single"), err
    assert "average" in err[0]
    assert "wrote" in out
    gen = aimkit.build(tmp_path / "out")
    assert gen.config.conditioning.name == "adaln-single"


def test_bfloat16_rounding_warning_is_one_line(saved, tmp_path, capsys):
    code, err, _ = _cli(capsys, ["convert", str(saved / "group-bf16"), str(tmp_path / "out"),
                                 "--model", str(saved / "group-bf16"), "--conditioning", "adaln"])
    assert code == 0, err
    assert len(err) == 1 and err[0].startswith("warning: conversion to adaln is exact in float32"), err
    gen = aimkit.build(tmp_path / "out")
    assert gen.config.conditioning.name == "adaln" and gen.dtype == torch.bfloat16


def test_exact_conversion_round_trips_through_the_cli(saved, tmp_path, capsys):
    src = aimkit.build(saved / "group-bf16")
    code, err, _ = _cli(capsys, ["convert", str(saved / "group-bf16"), str(tmp_path / "g2"),
                                 "--model", str(saved / "group-bf16"), "--conditioning", "adaln-group",
                                 "--num-groups", "2"])
    assert code == 0 and err == [], err
    again = aimkit.build(tmp_path / "g2")
    own = src.generator_state_dict()
    assert all(torch.equal(v, own[k]) for k, v in again.generator_state_dict().items())
