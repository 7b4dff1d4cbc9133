"""recipes/: records written atomically, output folders locked, an earlier run's files kept."""

from __future__ import annotations

import os

import pytest
import torch

import aimkit
from aimkit._lock import FolderLock
from aimkit.generator import Generator

TINY_TOKENIZER_RUN = "--steps 2 --batch-size 4 --num-workers 0 --mixed-precision no --eval-images 8 --cpu".split()


def _fail_replace_onto(monkeypatch, name: str) -> None:
    """``os.replace`` onto a file called ``name`` fails: the process dies as the file is published."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(dst) == name:
            raise OSError(f"killed while publishing {name}")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _listing(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- train_shapes_classifier.py --------------------------------------------------------------


def test_classifier_recipe_never_leaves_half_a_record(tmp_path, monkeypatch):
    from aimkit.recipes import train_shapes_classifier as recipe

    out = tmp_path / "classifier.safetensors"
    out.with_suffix(".json").write_text('{"heldout_accuracy": 0.99}\n')  # the record of earlier weights
    args = f"--steps 2 --batch-size 4 --eval-images 8 --threads {torch.get_num_threads()} --out {out}".split()
    monkeypatch.setattr("sys.argv", ["train_shapes_classifier.py", *args])
    _fail_replace_onto(monkeypatch, "classifier.json")
    with pytest.raises(OSError, match="killed while publishing"):
        recipe.main()
    assert out.with_suffix(".json").read_text() == '{"heldout_accuracy": 0.99}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier.json", "classifier.safetensors"]


# ---- train_tokenizer.py ----------------------------------------------------------------------


def test_tokenizer_recipe_keeps_an_earlier_runs_metrics_and_weights(tmp_path, capsys):
    from aimkit.recipes import train_tokenizer as recipe

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n')
    (tmp_path / "tokenizer.json").write_text('{"steps": 2}\n')
    before = _listing(tmp_path)
    assert recipe.main(["--out", str(tmp_path), *TINY_TOKENIZER_RUN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer.json, metrics.jsonl of an earlier run" in err[0], err
    assert _listing(tmp_path) == dict(before, **{".aimkit.lock": b""})


def test_tokenizer_recipe_refuses_a_folder_another_run_holds(tmp_path, capsys):
    from aimkit.recipes import train_tokenizer as recipe

    with FolderLock(tmp_path, command="train_tokenizer"):
        assert recipe.main(["--out", str(tmp_path), *TINY_TOKENIZER_RUN]) == 2
    assert "in use by pid" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".aimkit.lock"]  # nothing written


def test_tokenizer_recipe_publishes_its_record_whole_or_not_at_all(tmp_path, monkeypatch):
    from aimkit.recipes import train_tokenizer as recipe

    _fail_replace_onto(monkeypatch, "tokenizer.json")
    with pytest.raises(OSError, match="killed while publishing"):
        recipe.main(["--out", str(tmp_path), *TINY_TOKENIZER_RUN])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".aimkit.lock", "metrics.jsonl", "tokenizer.safetensors"], names  # no temp record left


# ---- build_tiny_shapes.py --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A saved random ``aim-tiny-shapes`` generator: what the training stage leaves in ROOT/generator/final."""
    torch.manual_seed(0)
    final = tmp_path_factory.mktemp("generator") / "final"
    aimkit.build("aim-tiny-shapes", pretrained=False).save_pretrained(final, model_card=False)
    return final


def _interrupted_save_pretrained(self, directory, *args, **kwargs):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(b"\0" * 64)
    raise OSError("No space left on device")


def _shipped(folder) -> None:
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "training_record.json"):
        (folder / name).write_bytes(f"previous {name}".encode())


def test_a_failed_export_keeps_the_shipped_weights(tmp_path, trained, monkeypatch):
    from aimkit.recipes import build_tiny_shapes as build

    assets = tmp_path / "assets" / "aim_tiny_shapes"
    _shipped(assets)
    before = _listing(assets)
    monkeypatch.setattr(Generator, "save_pretrained", _interrupted_save_pretrained)
    with pytest.raises(OSError, match="No space left"):
        build.export(trained, assets)
    assert _listing(assets) == before
    assert sorted(p.name for p in assets.parent.iterdir()) == ["aim_tiny_shapes"]  # no half-written folder


def test_an_export_killed_between_its_renames_gets_the_old_weights_back(tmp_path, trained, monkeypatch):
    from aimkit.recipes import build_tiny_shapes as build

    assets = tmp_path / "aim_tiny_shapes"
    _shipped(tmp_path / ".aim_tiny_shapes.old")  # the old folder moved aside, the new one never moved in
    before = _listing(tmp_path / ".aim_tiny_shapes.old")
    monkeypatch.setattr(Generator, "save_pretrained", _interrupted_save_pretrained)
    with pytest.raises(OSError, match="No space left"):
        build.export(trained, assets)
    assert _listing(assets) == before
    monkeypatch.undo()

    exported = build.export(trained, assets)
    assert sorted(exported["files"]) == sorted(p.name for p in assets.iterdir())
    assert "training_record.json" not in exported["files"]  # the new folder holds the new weights only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aim_tiny_shapes"]


def test_a_build_refuses_a_run_folder_another_build_holds(tmp_path, monkeypatch):
    from aimkit.recipes import build_tiny_shapes as build

    monkeypatch.setattr(build, "build", lambda *args: pytest.fail("the build must not start"))
    (tmp_path / "tokenizer.log").write_text("the other build's log\n")
    with FolderLock(tmp_path, command="build_tiny_shapes"):
        with pytest.raises(build.StageFailed, match="in use by pid"):
            build.main(["--out-root", str(tmp_path), "--smoke", "--overwrite"])
    assert (tmp_path / "tokenizer.log").read_text() == "the other build's log\n"


def test_a_run_folder_holding_only_a_released_lock_counts_as_empty(tmp_path, monkeypatch):
    from aimkit.recipes import build_tiny_shapes as build

    FolderLock(tmp_path).acquire().release()  # an earlier build's lock file stays behind
    calls = []
    monkeypatch.setattr(build, "build", lambda args, root, *rest: calls.append(root) or 0)
    assert build.main(["--out-root", str(tmp_path), "--smoke"]) == 0
    assert calls == [tmp_path.resolve()]


def test_clearing_the_run_folder_keeps_it_locked(tmp_path):
    from aimkit.recipes import build_tiny_shapes as build

    (tmp_path / "generator" / "final").mkdir(parents=True)
    (tmp_path / "tokenizer.log").write_text("old\n")
    with FolderLock(tmp_path, command="build_tiny_shapes"):
        build.clear_run_folder(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".aimkit.lock"]
        with pytest.raises(aimkit.errors.AimkitError, match="in use"):
            FolderLock(tmp_path).acquire()  # the lock file the holder locked is still the one in the folder
