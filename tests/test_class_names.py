"""Class names: carried by the config, saved with the model, accepted as labels, shown in captions,
taken from a token folder for training."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import aimkit
from aimkit.class_names import (
    IMAGENET_CLASSES_FILE,
    class_names_for_training,
    data_class_names,
    imagenet_class_names,
    read_class_names,
)
from aimkit.config import GeneratorConfig
from aimkit.data.shapes import class_names as shapes_class_names
from aimkit.data.tokens import TokenShardWriter
from aimkit.errors import ConfigError
from aimkit.samplers import resolve_labels
from aimkit.samplers.grid import _captions, make_grid

NAMES10 = ("cat", "dog", "Golden Retriever", "tabby cat", "goldfish", "ant", "bee", "fox", "owl", "yak")


def _named(**kw):
    return aimkit.build("aim-test-mamba2", class_names=NAMES10, **kw)


# ---------------------------------------------------------------- where the names come from


def test_imagenet_names_file():
    from aimkit.assets import asset_path

    lines = asset_path(IMAGENET_CLASSES_FILE).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1000
    names = imagenet_class_names()
    assert names == tuple(lines)
    assert names[207] == "golden retriever" and names[0] == "tench" and names[999] == "toilet tissue"
    assert len({n.lower() for n in names}) == 1000  # the duplicated lemmas were made distinct
    assert {names[134], names[517]} == {"crane (bird)", "crane (machine)"}


def test_presets_carry_their_class_names():
    for name in ("aim-b", "aim-l", "aim-xl", "aim-1b"):
        assert aimkit.resolve_config(name).class_names == imagenet_class_names()
    shapes = aimkit.resolve_config("aim-tiny-shapes").class_names
    assert shapes == tuple(shapes_class_names()) and shapes[0] == "red circle"
    assert aimkit.build("aim-tiny-shapes").config.class_names == shapes  # with the shipped weights
    assert aimkit.resolve_config("aim-test-mamba2").class_names is None


def test_read_class_names_refuses_blank_lines(tmp_path):
    (tmp_path / "ok.txt").write_text("a\nb\n")
    assert read_class_names(tmp_path / "ok.txt") == ("a", "b")
    (tmp_path / "bad.txt").write_text("a\n\nb\n")
    with pytest.raises(ConfigError, match="one non-empty class name per line"):
        read_class_names(tmp_path / "bad.txt")


# ---------------------------------------------------------------- the config field


@pytest.mark.parametrize("names, message", [
    (("a", "b"), "class_names has 2 names but num_classes is 3"),
    (("a", "b", "A"), r"class_names\[2\] 'A' repeats class_names\[0\] 'a'"),
    (("a", " ", "c"), r"class_names\[1\] is empty"),
    (("a", 2, "c"), "class_names must be a list of strs or null"),
    ("abc", "class_names must be"),
])
def test_class_names_are_validated(names, message):
    with pytest.raises(ConfigError, match=message):
        GeneratorConfig(num_classes=3, class_names=names)


def test_class_names_list_becomes_tuple_and_config_stays_hashable():
    config = GeneratorConfig(num_classes=2, class_names=["a", "b"])
    assert config.class_names == ("a", "b")
    hash(config)


def test_class_names_are_saved_in_generation_config(tmp_path):
    gen = _named()
    gen.save_pretrained(tmp_path / "m")
    generation = json.loads((tmp_path / "m" / "generation_config.json").read_text())["generation"]
    architecture = json.loads((tmp_path / "m" / "config.json").read_text())["generator"]
    assert generation["class_names"] == list(NAMES10) and "class_names" not in architecture
    assert aimkit.build(tmp_path / "m").config.class_names == NAMES10


def test_saved_dir_without_class_names_still_loads(tmp_path):
    aimkit.build("aim-test-mamba2").save_pretrained(tmp_path / "m")
    data = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    data["generation"].pop("class_names")  # as written before the field existed
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps(data))
    assert aimkit.build(tmp_path / "m").config.class_names is None


def test_bad_class_names_in_a_saved_file_are_one_line(tmp_path):
    _named().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "generation_config.json"
    data = json.loads(path.read_text())
    data["generation"]["class_names"] = data["generation"]["class_names"][:3]
    path.write_text(json.dumps(data))
    with pytest.raises(aimkit.AimkitError, match="class_names has 3 names but num_classes is 10"):
        aimkit.build(tmp_path / "m")


# ---------------------------------------------------------------- labels by name


def test_labels_by_name_resolve_ignoring_case():
    config = aimkit.resolve_config("aim-b")
    assert resolve_labels(config, ["golden retriever"]).tolist() == [207]
    assert resolve_labels(config, ["Golden Retriever", 1, " tench "]).tolist() == [207, 1, 0]
    assert resolve_labels(config, "golden retriever", 3).tolist() == [207] * 3
    assert resolve_labels(config, np.array(["goldfish", "tench"])).tolist() == [1, 0]


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ConfigError) as info:
        resolve_labels(aimkit.resolve_config("aim-b"), ["golden retreiver"])
    text = str(info.value)
    assert "unknown class name 'golden retreiver'" in text and "did you mean 'golden retriever'" in text
    assert "\n" not in text


def test_names_need_a_model_with_names():
    with pytest.raises(ConfigError, match="this model has no class names"):
        resolve_labels(aimkit.resolve_config("aim-test-mamba2"), ["cat"])


def test_generate_accepts_names():
    gen = _named()
    by_name = gen.generate(["golden retriever", "yak", 1], output="tokens", seed=0, cfg_scale=1.0)
    by_id = gen.generate([2, 9, 1], output="tokens", seed=0, cfg_scale=1.0)
    assert torch.equal(by_name, by_id)


# ---------------------------------------------------------------- captions


def test_captions_show_names_and_wrap_instead_of_cutting():
    names = shapes_class_names()
    lines, _, _ = _captions(list(range(36)), names, 128)  # the eval grid's cells (64 px images shown at 2x)
    for label, caption in enumerate(lines):
        assert " ".join(caption) == f"{label} {names[label]}"  # whole, nothing cut
    (long,), _, _ = _captions([0], ["a very long class name that cannot fit in two short lines"], 64)
    assert len(long) == 2 and long[1].endswith("..")


def test_grid_grows_for_two_line_captions():
    images = np.zeros((2, 32, 32, 3), np.uint8)
    one = make_grid(images, labels=[0, 1], class_names=["a", "b"])
    two = make_grid(images, labels=[0, 1], class_names=["a", "magenta triangle"])
    assert two.shape[0] > one.shape[0] and two.shape[1] == one.shape[1]


# ---------------------------------------------------------------- a token folder's names for training


def _token_folder(path, classes):
    writer = TokenShardWriter(path, num_sources=0, shard_size=4, tokenizer="vq-f4-tiny", codebook_size=512,
                              image_size=16, grid_size=4, variants=["center"], classes=classes)
    writer.finalize()
    return path


def test_a_model_trained_on_a_token_folder_gets_its_names(tmp_path):
    data = _token_folder(tmp_path / "tokens", ["cat", "dog", "fox"])
    assert data_class_names(data) == ("cat", "dog", "fox")
    extra = class_names_for_training(data, "aim-test-vq", {"num_classes": 3})
    assert extra == {"class_names": ("cat", "dog", "fox")}
    gen = aimkit.build("aim-test-vq", pretrained=False, num_classes=3, **extra)  # what the trainer builds
    gen.save_pretrained(tmp_path / "final")
    assert aimkit.build(tmp_path / "final").config.class_names == ("cat", "dog", "fox")


def test_training_names_that_do_not_fit_are_dropped_with_a_warning(tmp_path):
    data = _token_folder(tmp_path / "tokens", ["cat", "dog", "fox"])
    with pytest.warns(UserWarning, match="names 3 classes but the model has 36"):
        assert class_names_for_training(data, "aim-tiny-shapes") == {"class_names": None}
    clash = _token_folder(tmp_path / "clash", ["Cat", "cat"])
    with pytest.warns(UserWarning, match="not used"):
        assert class_names_for_training(clash, "aim-test-vq", {"num_classes": 2}) == {"class_names": None}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert class_names_for_training("random", "aim-b") == {}  # no names: the model keeps its own
        assert class_names_for_training(data, "aim-test-vq", {"class_names": ("a",) * 0}) == {}
    assert class_names_for_training("shapes", "aim-tiny-shapes") == {"class_names": tuple(shapes_class_names())}
