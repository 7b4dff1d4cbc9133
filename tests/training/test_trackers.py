"""aimkit.training._trackers and the mixed-precision choice: what trackers and accelerate are handed."""

import math

import numpy as np
import pytest

from aimkit.errors import ConfigError
from aimkit.training import load_config
from aimkit.training._trackers import flat_config, log_image
from aimkit.training.config import resolve_mixed_precision
from aimkit.training.trainer import _plain

SCALARS = (bool, int, float, str)


def test_flat_config_is_scalars_and_strings_only():
    flat = flat_config({"model_args": {"d_model": 64, "nested": {"x": [1, 2]}}, "betas": (0.9, 0.95),
                        "init_from": None, "policy": {}, "steps": [], "lr": 1e-3, "name": "aim-b", "ok": True,
                        "path": object})
    assert flat == {"model_args.d_model": 64, "model_args.nested.x.0": 1, "model_args.nested.x.1": 2,
                    "betas.0": 0.9, "betas.1": 0.95, "init_from": "null", "policy": "{}", "steps": "[]",
                    "lr": 1e-3, "name": "aim-b", "ok": True, "path": str(object)}


def test_every_shipped_recipe_flattens_for_tensorboard():
    """add_hparams refuses dicts, lists and None (`log_with=tensorboard` crashed on model_args)."""
    for name in ("tiny_test", "aim_b", "aim_tiny_shapes"):
        flat = flat_config(_plain(load_config(name, ["output_dir=x", "data=random"])))
        assert flat and all(isinstance(v, SCALARS) for v in flat.values()), name
        assert not any(isinstance(v, float) and math.isnan(v) for v in flat.values())
    assert "model_args.d_model" in flat_config(_plain(load_config("tiny_test", ["output_dir=x"])))


class _Tracker:
    def __init__(self, name, images=True):
        self.name, self.calls = name, []
        if images:
            self.log_images = lambda values, step, **kw: self.calls.append((values, step, kw))


def test_images_go_to_trackers_that_take_them_in_their_layout():
    image = np.zeros((8, 10, 3), np.uint8)
    tb, wb, plain = _Tracker("tensorboard"), _Tracker("wandb"), _Tracker("other", images=False)
    assert log_image([tb, wb, plain], "samples", image, 7) == ["tensorboard", "wandb"]
    (values, step, kw), = tb.calls
    assert values["samples"].shape == (1, 8, 10, 3) and step == 7 and kw == {"dataformats": "NHWC"}
    (values, step, kw), = wb.calls
    assert len(values["samples"]) == 1 and values["samples"][0] is image and kw == {}


@pytest.mark.parametrize("env,recipe,want", [
    ({}, "no", ("no", "recipe")),
    ({"ACCELERATE_MIXED_PRECISION": "no"}, "bf16", ("bf16", "recipe")),  # the launcher's default: the recipe
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "bf16", ("bf16", "recipe")),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "no", ("bf16", "accelerate launch; the recipe says no")),
    ({"ACCELERATE_MIXED_PRECISION": "FP16"}, "bf16", ("fp16", "accelerate launch; the recipe says bf16")),
])
def test_an_accelerate_launch_precision_wins_over_the_recipe(env, recipe, want):
    assert resolve_mixed_precision(recipe, env) == want


def test_fp8_from_the_launcher_is_one_clear_error():
    with pytest.raises(ConfigError, match="mixed precision 'fp8'; aimkit trains in no, bf16 or fp16"):
        resolve_mixed_precision("bf16", {"ACCELERATE_MIXED_PRECISION": "fp8"})
