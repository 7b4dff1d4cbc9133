"""``aimkit train`` refused during setup (a bad model_args, batch layout, data size, execution
policy): one line, exit code 2, and the output folder is left as it was (no folder, no lock file)."""

from __future__ import annotations

import pytest

from aimkit.cli import main as cli_main

ARGS = ["progress_bar=false", "max_steps=2", "model_args.n_layer=1"]
REFUSED = [
    "grad_accum=3",  # 16 is not divisible by 3
    "batch_size=4 grad_accum=2",  # 4 x 2 != 16
    "data_size=8",  # fewer items than one global batch
    "model_args.d_model=abc",
    "model_args.num_classes=0",
    "policy.train_step=graph",  # needs CUDA
]


def _refused(capsys, out, overrides):
    code = cli_main(["train", "--config", "tiny_test", f"output_dir={out}", *ARGS, *overrides.split()])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (code, err)


@pytest.mark.parametrize("overrides", REFUSED)
def test_setup_refusal_creates_no_folder(overrides, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    _refused(capsys, out, overrides)
    assert not (tmp_path / "new").exists()


def test_setup_refusal_leaves_an_existing_folder_as_it_was(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    _refused(capsys, out, "grad_accum=3")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_missing_resume_path_creates_no_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["train", "--config", "tiny_test", f"output_dir={out}", *ARGS, "--resume", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "does not exist" in err and len(err.splitlines()) == 1, (code, err)
    assert not out.exists()
