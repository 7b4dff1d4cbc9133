"""Where a model's class names come from: ImageNet-1k, the shapes dataset, a token folder.

A generator carries its class names in ``GeneratorConfig.class_names`` (saved in
``generation_config.json``); labels can then be given by name (``gen.generate(["golden
retriever"])``, ``aimkit generate --labels "tabby cat,goldfish"``) and grid captions show them.

* :func:`imagenet_class_names`: the 1000 ImageNet-1k names of the AiM presets, read from
  ``aimkit/assets/imagenet_classes.txt`` (its origin: ``aimkit/assets/README.md``);
* :func:`data_class_names`: the names of a training data source (``"shapes"``, or a token folder
  written by ``aimkit tokenize``, whose index records the class folder names);
* :func:`class_names_for_training`: the ``class_names=`` override a trainer passes to
  :func:`aimkit.build` so that a model trained on a folder carries that folder's names.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .assets import asset_path
from .errors import AimkitError, ConfigError

__all__ = ["IMAGENET_CLASSES_FILE", "imagenet_class_names", "read_class_names", "data_class_names",
           "class_names_for_training"]

IMAGENET_CLASSES_FILE = "imagenet_classes.txt"


def read_class_names(path: str | os.PathLike) -> tuple[str, ...]:
    """Class names from a UTF-8 text file (a byte-order mark is dropped), one per line in class-id
    order (no blank lines)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read class names from {path}: {exc}") from None
    names = tuple(text.splitlines())
    if not names or any(not name.strip() for name in names):
        raise ConfigError(f"{path} must hold one non-empty class name per line")
    return names


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index = class id (``[207] == "golden retriever"``)."""
    return read_class_names(asset_path(IMAGENET_CLASSES_FILE))


def data_class_names(data: str | os.PathLike) -> tuple[str, ...] | None:
    """The class names of a training data source: ``"shapes"`` (the procedural dataset), a token
    folder (its index's class folder names, empty folders included), else None (``"random"``)."""
    if data == "shapes":
        from .data.shapes import class_names

        return tuple(class_names())
    if data == "random" or not (Path(data) / "index.json").is_file():
        return None
    from .data.tokens import read_index

    names = read_index(data)["classes"]
    return tuple(names) if names else None


def class_names_for_training(data: str | os.PathLike, model: str | os.PathLike,
                             model_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``class_names`` override of ``aimkit.build(model, **model_args, **this)`` for a model
    trained on ``data``.

    ``{"class_names": names}`` when the data names one class per model class; ``{}`` (the model
    keeps its own names) when ``model_args`` sets them or the data has none (``"random"``);
    ``{"class_names": None}`` with a warning when the data's names do not fit the model (more
    model classes than data classes, or names equal ignoring case): names of the preset's own
    classes would caption the data's classes wrongly."""
    model_args = dict(model_args or {})
    if "class_names" in model_args:
        return {}
    names = data_class_names(data)
    if names is None:
        return {}
    from .build import resolve_config

    num_classes = resolve_config(model, **model_args).num_classes
    if len(names) != num_classes:
        warnings.warn(f"{data} names {len(names)} classes but the model has {num_classes}; "
                      "the model is saved without class names", stacklevel=2)
        return {"class_names": None}
    try:
        resolve_config(model, **model_args, class_names=names)
    except AimkitError as exc:  # e.g. folders "Cat" and "cat": names must differ ignoring case
        warnings.warn(f"the class names of {data} are not used: {exc}", stacklevel=2)
        return {"class_names": None}
    return {"class_names": names}
