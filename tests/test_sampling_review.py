"""Edge cases of the sampling API found in review: numpy scalars, labels the sampler must refuse,
sampler classes, grid captions, class-name files."""

import numpy as np
import pytest
import torch
from conftest import tiny_generator

from aimkit.class_names import read_class_names
from aimkit.errors import ConfigError
from aimkit.samplers import AutoregressiveSampler, generate, generate_batches, make_grid, sample, top_k_filter

SETTINGS = dict(cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0)


@pytest.fixture(scope="module")
def gen():
    return tiny_generator().eval()


def _generate(gen, labels, **kwargs):
    return generate(gen, labels, output="tokens", progress=False, **SETTINGS, **kwargs)


# ---------------------------------------------------------------- numpy integers are integers
def test_numpy_seed_and_batch_size_act_as_python_ints(gen):
    """``_is_int`` accepts numpy integers, so the rest of the call must work with them too."""
    want = _generate(gen, [1, 2, 3], seed=3, batch_size=2)
    assert torch.equal(_generate(gen, [1, 2, 3], seed=np.int64(3), batch_size=np.int64(2)), want)
    big = 2**62 + 5  # the random-label seed is mixed with a salt: no int64 overflow
    assert torch.equal(generate(gen, None, num_images=2, seed=np.int64(big), output="tokens", progress=False),
                       generate(gen, None, num_images=2, seed=big, output="tokens", progress=False))
    (got,) = generate_batches(gen, [([1, 2, 3], np.uint64(3))], output="tokens", progress=False, **SETTINGS)
    assert torch.equal(got, _generate(gen, [1, 2, 3], seed=3, batch_size=3))


# ---------------------------------------------------------------- the sampler's labels
@pytest.mark.parametrize("labels", [torch.tensor([True, False]), torch.tensor([1 + 0j, 2 + 0j])])
def test_sampler_refuses_bool_and_complex_labels(gen, labels):
    with pytest.raises(ConfigError, match="labels must be an integer tensor"):
        AutoregressiveSampler().sample_tokens(gen, labels, **SETTINGS)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_sampler_refuses_the_null_class(gen, cfg_scale):
    """Label ``num_classes`` (an off-by-one) would silently sample unconditional images."""
    labels = torch.tensor([0, gen.null_class])
    with pytest.raises(ConfigError, match=rf"labels must be in \[0, {gen.num_classes}\)"):
        AutoregressiveSampler().sample_tokens(gen, labels, **{**SETTINGS, "cfg_scale": cfg_scale})


def test_sampler_class_instead_of_instance_is_a_config_error(gen):
    with pytest.raises(ConfigError, match="sampler"):
        _generate(gen, [1], sampler=AutoregressiveSampler)


# ---------------------------------------------------------------- logits functions
@pytest.mark.parametrize("top_k", [2.5, True])
def test_non_integer_top_k_is_a_config_error(top_k):
    logits = torch.randn(2, 8)
    with pytest.raises(ConfigError, match="top_k"):
        sample(logits, top_k=top_k)
    with pytest.raises(ConfigError, match="top_k"):
        top_k_filter(logits, top_k)


def test_greedy_sample_still_checks_its_arguments():
    with pytest.raises(ConfigError, match="top_p"):
        sample(torch.randn(2, 8), temperature=0.0, top_p=0.0)


# ---------------------------------------------------------------- grids
def test_grid_caption_of_a_negative_label_names_no_class():
    """A list of names indexed by -1 is the last name: the caption must not show it."""
    from aimkit.samplers.grid import _caption

    assert _caption(-1, ["cat", "dog"]) == "-1"
    assert _caption(1, ["cat", "dog"]) == "1 dog"


@pytest.mark.parametrize("kwargs, word", [(dict(nrow=1.5), "nrow"), (dict(padding=-1), "padding"),
                                          (dict(labels=[0.7, 1.0]), "labels"), (dict(labels=["a", "b"]), "labels")])
def test_grid_arguments_are_checked(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        make_grid(np.zeros((2, 8, 8, 3), np.uint8), **kwargs)


# ---------------------------------------------------------------- class names
def test_class_names_file_with_a_byte_order_mark(tmp_path):
    """Windows editors write UTF-8 with a BOM; it must not become part of the first name."""
    path = tmp_path / "names.txt"
    path.write_bytes("cat\r\ndog\n".encode("utf-8-sig"))
    assert read_class_names(path) == ("cat", "dog")


# ---------------------------------------------------------------- schedules
@pytest.mark.parametrize("base", [0.1, -0.9, -3.9, 0.3, 7.7])
def test_linear_schedule_ends_exactly_at_the_base_scale(base):
    """The docstring promises exactly ``base_scale`` for the last token; ``1 + (0.1 - 1)`` is not 0.1."""
    from aimkit.samplers.schedules import linear

    assert linear(255, 256, base) == base and linear(0, 256, base) == 1.0


def test_a_class_id_given_as_a_string_says_so():
    import aimkit
    from aimkit.samplers import resolve_labels

    with pytest.raises(ConfigError, match="unknown class name '207'.*as an integer"):
        resolve_labels(aimkit.resolve_config("aim-b"), ["207"])


def test_grid_takes_label_tensors_and_arrays():
    images = np.zeros((2, 8, 8, 3), np.uint8)
    want = make_grid(images, labels=[0, 1], class_names=["a", "b"])
    for labels in (torch.tensor([0, 1]), np.array([0, 1])):
        assert np.array_equal(make_grid(images, labels=labels, class_names=["a", "b"]), want)


def test_fewer_images_than_labels_is_refused_instead_of_dropping_labels():
    from aimkit.samplers.api import resolve_labels

    gen = tiny_generator()
    assert resolve_labels(gen, [1, 2], num_images=5).tolist() == [1, 2, 1, 2, 1]
    with pytest.raises(ConfigError, match="fewer than the 3 labels"):
        resolve_labels(gen, [1, 2, 3], num_images=2)


def test_sampling_defaults_refuse_a_guidance_scale_the_sampler_would_refuse():
    from aimkit.config import SamplingDefaults

    assert SamplingDefaults(cfg_scale=-1e4).cfg_scale == -1e4
    for bad in (1e5, float("nan")):
        with pytest.raises(ConfigError, match="cfg_scale"):
            SamplingDefaults(cfg_scale=bad)
