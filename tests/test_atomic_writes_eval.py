"""aimkit.eval writes every file atomically: a failed save leaves the old file whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from aimkit.eval.classifier import ClassifierConfig, ShapesClassifier, load_classifier, save_classifier


def _interrupted_save_file(tensors, filename, metadata=None):
    """safetensors' writer killed half way: some bytes reach the file, then it fails."""
    Path(filename).write_bytes(b"\0" * 16)
    raise OSError("No space left on device")


def test_a_failed_classifier_save_keeps_the_old_weights(tmp_path, monkeypatch):
    path = tmp_path / "classifier.safetensors"
    torch.manual_seed(0)
    old = ShapesClassifier(ClassifierConfig())
    save_classifier(old, path)
    before = path.read_bytes()

    monkeypatch.setattr(safetensors.torch, "save_file", _interrupted_save_file)
    torch.manual_seed(1)
    with pytest.raises(OSError, match="No space left"):
        save_classifier(ShapesClassifier(ClassifierConfig()), path)

    assert path.read_bytes() == before  # the old weights, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left behind
    monkeypatch.undo()
    reloaded = load_classifier(path)
    for k, v in old.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
