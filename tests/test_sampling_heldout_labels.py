"""Held-out label forms: a 0-d integer tensor or array is one class id, as an int is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aimkit.errors import ConfigError
from aimkit.samplers import resolve_labels


class _Config:
    num_classes = 10
    class_names = tuple(f"class {i}" for i in range(10))


@pytest.mark.parametrize("label", [torch.tensor(3), torch.tensor(3, dtype=torch.int32), np.array(3),
                                   np.array(3, dtype=np.uint8), torch.arange(10)[3]])
def test_zero_dim_integer_label_is_one_class_id(label):
    assert resolve_labels(_Config(), label).tolist() == [3]
    assert resolve_labels(_Config(), label, num_images=2).tolist() == [3, 3]


def test_list_of_a_tensor_elements_is_its_labels():
    """``list(tensor)`` holds 0-d tensors; they are class ids like the tensor's values."""
    labels = torch.tensor([1, 4, 9])
    assert resolve_labels(_Config(), list(labels)).tolist() == [1, 4, 9]
    assert resolve_labels(_Config(), [np.array(2), "CLASS 5 ", torch.tensor(0)]).tolist() == [2, 5, 0]


@pytest.mark.parametrize("label", [torch.tensor(3.0), torch.tensor(True), np.array(2.0), np.array(False),
                                   [torch.tensor(1.0)], [np.array(True)]])
def test_zero_dim_non_integer_labels_are_refused(label):
    with pytest.raises(ConfigError, match="integer class ids"):
        resolve_labels(_Config(), label)


@pytest.mark.parametrize("label", [torch.tensor(10), np.array(-1), [torch.tensor(10)]])
def test_zero_dim_labels_are_range_checked(label):
    with pytest.raises(ConfigError, match=r"outside \[0, 10\)"):
        resolve_labels(_Config(), label)


def test_zero_dim_label_through_generate():
    import aimkit

    model = aimkit.build("aim-tiny-shapes")
    kwargs = dict(seed=0, output="tokens", progress=False, temperature=0.0, cfg_scale=1.0)
    assert torch.equal(model.generate(torch.tensor(7), **kwargs), model.generate(7, **kwargs))
