"""Review findings in data / eval / training: each test pins one fixed bug."""

from __future__ import annotations

import pytest
import torch

from aimkit.data.shapes import make_batch
from aimkit.errors import ConfigError
from aimkit.eval.quality import evaluate_generated


def test_quality_refuses_uint8_images_instead_of_scoring_them_as_minus_one_to_one():
    """uint8 pixels (0..255) were fed to the classifier as if in [-1, 1]: accuracy 0.11, distance
    4.6e6 for real images, no error."""
    images, labels = make_batch(8, seed=777)
    pixels = ((images + 1) * 127.5).round().to(torch.uint8)
    with pytest.raises(ConfigError, match="float"):
        evaluate_generated(pixels, labels)


def test_export_without_average_removes_the_stale_average_record(tmp_path):
    """A run exported with ema_decay, then resumed and exported without it, kept ema.json ("model.safetensors
    holds the moving average", step 4) and raw/ (the step-4 weights) beside the new step-8 weights."""
    from aimkit.training import load_config, train

    common = ["progress_bar=false", "log_every=100", "checkpoint_every=4", f"output_dir={tmp_path}"]
    train(load_config("tiny_test", [*common, "max_steps=4", "ema_decay=0.9"]))
    assert (tmp_path / "final" / "ema.json").is_file() and (tmp_path / "final" / "raw").is_dir()
    train(load_config("tiny_test", [*common, "max_steps=8"]), resume="auto")
    assert not (tmp_path / "final" / "ema.json").exists()
    assert not (tmp_path / "final" / "raw").exists()


def test_resume_auto_continues_the_branch_of_the_last_resume_not_a_later_numbered_one(tmp_path):
    """Resumed from step-4 of a run that reached step 12, stopped at 6 ("continue with --resume auto"):
    --resume auto then continued from the abandoned step-12, not from step-6."""
    from aimkit.training import load_config, train

    common = ["progress_bar=false", "log_every=100", "checkpoint_every=4", "keep_last=0", f"output_dir={tmp_path}",
              "max_steps=12"]
    train(load_config("tiny_test", common))
    train(load_config("tiny_test", [*common, "stop_after=6"]), resume=str(tmp_path / "checkpoints" / "step-00000004"))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "abandoned-step-00000012" in names and "step-00000012" not in names  # kept, never deleted
    result = train(load_config("tiny_test", [*common, "stop_after=8"]), resume="auto")
    assert result.step == 8 and result.stopped_by == "stop_after"  # from step-6, not step-12


def test_resume_with_other_total_steps_says_the_schedule_changes(tmp_path, capsys):
    from aimkit.training import load_config, train

    common = ["progress_bar=false", "log_every=100", "checkpoint_every=2", f"output_dir={tmp_path}"]
    train(load_config("tiny_test", [*common, "max_steps=4", "stop_after=2"]))
    capsys.readouterr()
    train(load_config("tiny_test", [*common, "max_steps=4", "stop_after=3"]), resume="auto")
    assert "total steps changed" not in capsys.readouterr().out
    train(load_config("tiny_test", [*common, "max_steps=6"]), resume="auto")
    assert "warning: total steps changed (4 -> 6)" in capsys.readouterr().out
