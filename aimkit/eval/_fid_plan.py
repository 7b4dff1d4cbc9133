"""The plan of a FID sampling run, fixed by its settings alone: labels, shards and seeds.

The ``num`` images are cut into global shards of ``shard_size`` images; process ``p`` of ``P``
generates the shards ``s ≡ p (mod P)``. Batch ``j`` of shard ``s`` is seeded from
``(seed, s, j)``, and the labels from ``seed`` on a separate stream, so the images do not depend
on the number of processes.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

MAX_NUM = 100_000_000  # images of one run: the (num,) int64 label table alone is 800 MB at this size
# A damaged or hostile .npy / .npz makes numpy's reader raise almost anything (ValueError, EOFError,
# BadZipFile, zlib.error, tokenize.TokenError or SyntaxError from the header, MemoryError from a forged
# shape, KeyError for a missing member): around np.load and member reads, each of them means "unreadable".
READ_ERRORS = (Exception,)
# Streams of the seed tree: labels and shard batches never share random numbers.
_LABEL_STREAM = 0
_SHARD_STREAM = 1


def is_int(value: Any) -> bool:
    """True for an integer (Python or numpy) that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _derive(*parts: int) -> int:
    """A 63-bit seed that depends on every part (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def shard_seed(seed: int, shard: int, batch: int = 0) -> int:
    """Seed of batch ``batch`` of global shard ``shard`` of a run seeded with ``seed``."""
    return _derive(seed, _SHARD_STREAM, shard, batch)


def num_shards(num: int, shard_size: int) -> int:
    """Number of shards holding ``num`` images (the last one may be short)."""
    return math.ceil(num / shard_size)


def shards_of_process(total_shards: int, process_index: int, num_processes: int) -> list[int]:
    """The global shards process ``process_index`` of ``num_processes`` generates (s ≡ p mod P)."""
    return list(range(process_index, total_shards, num_processes))


def check_num(num: Any) -> None:
    """Refuse a number of images that is not an integer in ``[1, MAX_NUM]`` (ConfigError)."""
    if not is_int(num) or num < 1:
        raise ConfigError(f"num must be an integer >= 1, got {num!r}")
    if num > MAX_NUM:
        raise ConfigError(f"{num} images is more than one sampling run supports ({MAX_NUM}); split it into runs")


def balanced_labels(num: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """``num / num_classes`` images of every class, in a seeded random order.

    Args:
        num: number of images; must be a multiple of ``num_classes``.
        num_classes: number of classes.
        seed: the order is a permutation drawn from this seed (the same for every process).

    Returns:
        (num,) int64 labels.

    Raises:
        ConfigError: ``num`` is not a multiple of ``num_classes``.
    """
    if num % num_classes:
        lower = (num // num_classes) * num_classes
        upper = lower + num_classes
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        raise ConfigError(
            f"balanced labels need a number of images divisible by the {num_classes} classes; "
            f"{num} is not (use e.g. {nearest}, or pass a label file)"
        )
    ordered = np.repeat(np.arange(num_classes, dtype=np.int64), num // num_classes)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _LABEL_STREAM]))
    return ordered[rng.permutation(num)]


def _as_int64(array: np.ndarray, source: str) -> np.ndarray:
    """A 1-D integer array as int64, refusing values that int64 cannot hold (instead of wrapping)."""
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ConfigError(
            f"labels ({source}) must be a 1-D array of integer class ids, got {array.dtype} {array.shape}"
        )
    if array.dtype.kind == "u" and array.size and int(array.max()) >= 2**63:
        raise ConfigError(f"label {int(array.max())} ({source}) is not a class id (beyond int64)")
    return array.astype(np.int64)


def _read_npy_labels(path: Path) -> np.ndarray:
    try:
        raw = np.load(path, allow_pickle=False)
    except READ_ERRORS as exc:
        raise ConfigError(f"cannot read label file {path}: {type(exc).__name__}: {str(exc)[:100]}") from None
    if not isinstance(raw, np.ndarray):  # an .npz archive under an .npy name
        raw.close()
        raise ConfigError(f"label file {path} is not a .npy array")
    return _as_int64(raw, f"file {path.name}")


def _read_text_labels(path: Path) -> np.ndarray:
    values = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                try:
                    value = int(text)
                except ValueError:
                    value = None
                if value is None or not -(2**63) <= value < 2**63:
                    shown = text if len(text) <= 40 else text[:37] + "..."
                    raise ConfigError(f"{path}:{lineno}: expected one integer class id per line, got {shown!r}")
                values.append(value)
    except UnicodeDecodeError:
        raise ConfigError(f"label file {path} is not UTF-8 text with one class id per line (nor a .npy file)") from None
    return np.asarray(values, dtype=np.int64)


def _read_label_file(path: Path) -> np.ndarray:
    if not path.exists():
        raise ConfigError(f"label file {path} does not exist (expected 'balanced', 'random' or a file)")
    if not path.is_file():
        raise ConfigError(f"label file {path} is not a file")
    if path.suffix.lower() == ".npy":
        return _read_npy_labels(path)
    return _read_text_labels(path)


def resolve_sample_labels(
    labels: Any, num: int, num_classes: int, seed: int = 0
) -> tuple[np.ndarray, str]:
    """The (num,) int64 labels of a sampling run and a short description of where they came from.

    Args:
        labels: ``"balanced"`` (``num / num_classes`` per class, seeded order), ``None`` or
            ``"random"`` (independent uniform classes from the seed), a path to a label file
            (``.npy`` 1-D integer array, or text with one integer per line), or the labels
            themselves (a sequence, array or tensor of ``num`` ints).
        num: number of images, at most :data:`MAX_NUM`.
        num_classes: labels must lie in ``[0, num_classes)``.
        seed: seed of the balanced order or the random labels.

    Raises:
        ConfigError: wrong count, out-of-range class, unreadable or malformed file.
    """
    check_num(num)
    if isinstance(labels, str) and labels == "balanced":
        return balanced_labels(num, num_classes, seed), "balanced"
    if labels is None or (isinstance(labels, str) and labels == "random"):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), _LABEL_STREAM]))
        return rng.integers(0, num_classes, size=num, dtype=np.int64), "random"
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels).expanduser()
        array, source = _read_label_file(path), f"file {path.name}"
    else:
        if torch.is_tensor(labels):
            labels = labels.detach().cpu().numpy()
        array, source = _as_int64(np.asarray(labels), "given"), "given"
    if array.shape[0] != num:
        raise ConfigError(f"{num} images were asked for but the labels ({source}) hold {array.shape[0]}")
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        bad = int(array.min()) if array.min() < 0 else int(array.max())
        raise ConfigError(f"label {bad} ({source}) is outside [0, {num_classes}): the model has {num_classes} classes")
    return array, source
