"""Sampling many images for FID into resumable shards, then one ADM-layout ``.npz``.

The ``num`` images are cut into global shards of ``shard_size`` images. Everything about a
shard is fixed by its index ``s`` alone: its label slice, and the seed of each of its batches
(derived from ``(seed, s, batch)``). Process ``p`` of ``P`` generates the shards
``s ≡ p (mod P)``, so the packed result is the same whatever the number of processes, and a
shard that is already on disk is never generated again::

    out_dir/
        manifest.json        # the settings; a rerun with other settings is refused
        labels.npy           # (num,) int64, every image's class
        shard-00000.npz      # images (n, H, W, 3) uint8, labels (n,) int64
        shard-00001.npz
        ...

Each shard appears complete or not at all (written to a temporary file, then renamed), so an
interrupted run loses only the shards in flight. :func:`pack_npz` concatenates the shards in
order into the layout of the ADM evaluator (``openai/guided-diffusion`` ``evaluations/``):
``arr_0`` (N, H, W, 3) uint8 images and ``arr_1`` (N,) int64 labels, streamed so that 50,000
images never sit in memory at once.

Example::

    model = aimkit.build("aim-xl", pretrained=True, device="cuda")
    sample_to_shards(model, "samples.shards", 50_000, labels="balanced", seed=0)
    pack_npz("samples.shards", "samples.npz")
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from .._io import atomic_write, read_json
from ..errors import ConfigError

__all__ = [
    "MANIFEST_NAME",
    "LABELS_NAME",
    "ShardRun",
    "balanced_labels",
    "resolve_sample_labels",
    "shard_name",
    "shard_seed",
    "num_shards",
    "shards_of_process",
    "sample_to_shards",
    "pack_npz",
]

PathLike = Union[str, os.PathLike]

MANIFEST_NAME = "manifest.json"
LABELS_NAME = "labels.npy"
_FORMAT = "aimkit.sample_shards/1"
_SAMPLING_KEYS = ("cfg_scale", "temperature", "top_k", "top_p")
_JSON_SCALARS = (bool, int, float, str, type(None))
_FINGERPRINT_ELEMENTS = 4096  # leading elements of every tensor that enter the weights fingerprint
# Streams of the seed tree: labels and shard batches never share random numbers.
_LABEL_STREAM = 0
_SHARD_STREAM = 1


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _derive(*parts: int) -> int:
    """A 63-bit seed that depends on every part (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def shard_seed(seed: int, shard: int, batch: int = 0) -> int:
    """Seed of batch ``batch`` of global shard ``shard`` of a run seeded with ``seed``."""
    return _derive(seed, _SHARD_STREAM, shard, batch)


def shard_name(shard: int) -> str:
    """File name of global shard ``shard``: ``shard-00000.npz``."""
    return f"shard-{shard:05d}.npz"


def num_shards(num: int, shard_size: int) -> int:
    """Number of shards holding ``num`` images (the last one may be short)."""
    return math.ceil(num / shard_size)


def shards_of_process(total_shards: int, process_index: int, num_processes: int) -> List[int]:
    """The global shards process ``process_index`` of ``num_processes`` generates (s ≡ p mod P)."""
    return list(range(process_index, total_shards, num_processes))


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------


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


def _read_label_file(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ConfigError(f"label file {path} does not exist (expected 'balanced', 'random' or a file)")
    if path.suffix.lower() == ".npy":
        try:
            raw = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read label file {path}: {exc}") from None
        if raw.ndim != 1 or not (np.issubdtype(raw.dtype, np.integer)):
            raise ConfigError(f"label file {path} must hold a 1-D integer array, got {raw.dtype} {raw.shape}")
        return raw.astype(np.int64)
    values = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                values.append(int(text))
            except ValueError:
                raise ConfigError(
                    f"{path}:{lineno}: expected one integer class id per line, got {text!r}"
                ) from None
    return np.asarray(values, dtype=np.int64)


def resolve_sample_labels(
    labels: Any, num: int, num_classes: int, seed: int = 0
) -> Tuple[np.ndarray, str]:
    """The (num,) int64 labels of a sampling run and a short description of where they came from.

    Args:
        labels: ``"balanced"`` (``num / num_classes`` per class, seeded order), ``None`` or
            ``"random"`` (independent uniform classes from the seed), a path to a label file
            (``.npy`` 1-D integer array, or text with one integer per line), or the labels
            themselves (a sequence, array or tensor of ``num`` ints).
        num: number of images.
        num_classes: labels must lie in ``[0, num_classes)``.
        seed: seed of the balanced order or the random labels.

    Raises:
        ConfigError: wrong count, out-of-range class, unreadable file.
    """
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
        array = np.asarray(labels)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ConfigError(f"labels must be a 1-D sequence of integer class ids, got {array.dtype} {array.shape}")
        array, source = array.astype(np.int64), "given"
    if array.shape[0] != num:
        raise ConfigError(f"{num} images were asked for but the labels ({source}) hold {array.shape[0]}")
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        bad = int(array.min()) if array.min() < 0 else int(array.max())
        raise ConfigError(f"label {bad} ({source}) is outside [0, {num_classes}): the model has {num_classes} classes")
    return array, source


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def _write_shard(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, images=images, labels=labels))


def _normalised(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, ...), for comparisons."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _prepare_dir(out_dir: Path, manifest: Dict[str, Any], labels: np.ndarray) -> None:
    """Create ``out_dir`` with its manifest and labels, or check that it holds the same run.

    Every process may call this at once: each writes identical content by atomic renames.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            existing = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {manifest_path}: {exc}") from None
        wanted = _normalised(manifest)
        if existing != wanted:
            keys = sorted(set(existing) | set(wanted))
            diffs = [
                f"{k}: {existing.get(k)!r} on disk vs {wanted.get(k)!r} now"
                for k in keys
                if existing.get(k) != wanted.get(k)
            ]
            raise ConfigError(
                f"{out_dir} holds shards of a run with other settings ({'; '.join(diffs)}); "
                "rerun with the same settings to resume, or use another shard directory"
            )
    else:
        if any(out_dir.glob("shard-*.npz")):
            raise ConfigError(f"{out_dir} holds shard files but no {MANIFEST_NAME}; use an empty shard directory")
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        atomic_write(manifest_path, lambda f: f.write(text.encode()))
    labels_path = out_dir / LABELS_NAME
    if not labels_path.is_file():
        atomic_write(labels_path, lambda f: np.save(f, labels))


def _read_manifest(shard_dir: Path) -> Dict[str, Any]:
    path = shard_dir / MANIFEST_NAME
    if not path.is_file():
        raise ConfigError(f"{shard_dir} is not a shard directory written by sample_to_shards (no {MANIFEST_NAME})")
    manifest = read_json(path, ConfigError)
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != _FORMAT:
        raise ConfigError(f"{path} has format {found!r}, expected {_FORMAT!r}")
    return manifest


def _as_uint8_nhwc(images: Any, count: int) -> np.ndarray:
    """The generator's ``output="uint8"`` result as a (count, H, W, 3) uint8 numpy array."""
    if torch.is_tensor(images):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != count or images.shape[-1] != 3:
        raise ConfigError(
            f"the generator returned {images.dtype} images of shape {images.shape}; "
            f"expected uint8 ({count}, H, W, 3)"
        )
    return np.ascontiguousarray(images)


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRun:
    """What one call of :func:`sample_to_shards` did in this process.

    Attributes:
        total_shards: global shards of the run (all processes).
        written: shards this process generated now.
        skipped: shards of this process already on disk.
        images: images generated now.
    """

    total_shards: int
    written: Tuple[int, ...]
    skipped: Tuple[int, ...]
    images: int


def _weights_fingerprint(model) -> Optional[str]:
    """A cheap hash of a module's weights (names, shapes, dtypes, leading values of each tensor).

    Stored in the manifest so that resuming with other weights (a path overwritten with another
    checkpoint, say) is refused. None for objects that are not modules.
    """
    if not isinstance(model, torch.nn.Module):
        return None
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        head = tensor.detach().flatten()[:_FINGERPRINT_ELEMENTS].cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(head.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _sampling_settings(model, sampling: Dict[str, Any]) -> Dict[str, Any]:
    """The preset's FID settings (``model.config.fid_sampling``) overridden by non-None ``sampling``."""
    settings: Dict[str, Any] = {}
    preset = getattr(getattr(model, "config", None), "fid_sampling", None)
    if preset is not None:
        settings.update({k: getattr(preset, k) for k in _SAMPLING_KEYS if hasattr(preset, k)})
    settings.update({k: v for k, v in sampling.items() if v is not None})
    return settings


def sample_to_shards(
    model,
    out_dir: PathLike,
    num: int,
    *,
    labels: Any = "balanced",
    seed: int = 0,
    batch_size: int = 64,
    shard_size: int = 1000,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    metadata: Optional[Dict[str, Any]] = None,
    **sampling: Any,
) -> ShardRun:
    """Generate this process's share of ``num`` images into ``out_dir``, skipping finished shards.

    Args:
        model: a :class:`~aimkit.generator.Generator` with a tokenizer (anything with
            ``num_classes`` and ``generate(labels, *, seed, output="uint8", batch_size, ...)``
            returning (B, H, W, 3) uint8 images).
        out_dir: the shard directory (created).
        num: total number of images of the run (all processes).
        labels: ``"balanced"`` (default: ``num / num_classes`` per class in a seeded order),
            ``None`` / ``"random"`` (uniform random classes), a label file (``.npy`` or one int
            per line), or ``num`` labels; see :func:`resolve_sample_labels`.
        seed: seed of the whole run; with the same settings the images are the same.
        batch_size: images per ``generate`` call; part of the seeding, so a resumed run must
            use the same value.
        shard_size: images per shard file (the resume granularity).
        process_index: this process, in ``[0, num_processes)``.
        num_processes: processes sharing the run (``accelerate launch``).
        progress: show a tqdm bar (images/s) on process 0.
        metadata: JSON-serialisable facts stored in the manifest and checked on resume
            (the command line stores the model name, weights and dtype).
        **sampling: ``cfg_scale``, ``temperature``, ``top_k``, ``top_p`` (None = the preset's
            FID settings from ``model.config.fid_sampling``) and any other keyword of
            ``generate`` (e.g. ``schedule="linear"``).

    Returns:
        A :class:`ShardRun` summary of this process's work.

    Raises:
        ConfigError: bad arguments, or ``out_dir`` holds a run with other settings.
    """
    for name, value, low in (("num", num, 1), ("batch_size", batch_size, 1), ("shard_size", shard_size, 1),
                             ("num_processes", num_processes, 1), ("seed", seed, 0)):
        if not _is_int(value) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if not _is_int(process_index) or not 0 <= process_index < num_processes:
        raise ConfigError(f"process_index must be in [0, {num_processes}), got {process_index!r}")
    for key in ("output", "seed", "labels", "num_images", "progress", "batch_size"):
        if key in sampling:
            raise ConfigError(f"{key!r} is set by sample_to_shards and cannot be passed as a sampling option")

    label_array, label_source = resolve_sample_labels(labels, num, model.num_classes, seed)
    settings = _sampling_settings(model, sampling)
    manifest = {
        "format": _FORMAT,
        "num": num,
        "shard_size": shard_size,
        "batch_size": batch_size,
        "seed": seed,
        "labels": label_source,
        "labels_sha256": hashlib.sha256(label_array.tobytes()).hexdigest(),
        "sampling": {k: (v if isinstance(v, _JSON_SCALARS) else repr(v)) for k, v in settings.items()},
        "weights_fingerprint": _weights_fingerprint(model),
        "metadata": metadata or {},
    }
    out_dir = Path(out_dir)
    _prepare_dir(out_dir, manifest, label_array)

    total = num_shards(num, shard_size)
    mine = shards_of_process(total, process_index, num_processes)
    pending = [s for s in mine if not (out_dir / shard_name(s)).is_file()]
    skipped = tuple(sorted(set(mine) - set(pending)))
    todo = sum(min(shard_size, num - s * shard_size) for s in pending)

    from tqdm.auto import tqdm

    desc = "sampling" if num_processes == 1 else f"sampling (process 0 of {num_processes})"
    bar = tqdm(total=todo, unit="img", desc=desc, disable=not progress or process_index != 0, dynamic_ncols=True)
    if skipped and progress and process_index == 0:
        bar.write(f"{len(skipped)} of this process's {len(mine)} shards are already done; skipping them")
    written = []
    with bar, torch.no_grad():
        for s in pending:
            start, stop = s * shard_size, min((s + 1) * shard_size, num)
            parts = []
            for j, b0 in enumerate(range(start, stop, batch_size)):
                chunk = label_array[b0:min(b0 + batch_size, stop)]
                images = model.generate(
                    torch.from_numpy(chunk.copy()),
                    seed=shard_seed(seed, s, j),
                    output="uint8",
                    batch_size=len(chunk),
                    progress=False,
                    **settings,
                )
                parts.append(_as_uint8_nhwc(images, len(chunk)))
                bar.update(len(chunk))
            _write_shard(out_dir / shard_name(s), np.concatenate(parts), label_array[start:stop])
            written.append(s)
    return ShardRun(total, tuple(written), skipped, todo)


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------


def _shard_arrays(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["images"], data["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"cannot read shard {path}: {exc}; delete it and rerun sampling to regenerate it") from None


def _write_npy_member(
    zf: zipfile.ZipFile, name: str, dtype: np.dtype, shape: Tuple[int, ...], chunks: Iterator[np.ndarray]
) -> None:
    """Stream ``chunks`` (C-order, concatenated along axis 0) as ``name`` of an npz archive."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    with zf.open(name, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def pack_npz(shard_dir: PathLike, out_path: PathLike) -> Path:
    """Concatenate a finished shard directory into one ADM-evaluator ``.npz``.

    The result reads like ``np.savez(out_path, arr_0=images, arr_1=labels)``: ``arr_0`` (N, H, W, 3)
    uint8, ``arr_1`` (N,) int64, in shard order. It is streamed shard by shard and appears at
    ``out_path`` only when complete.

    Raises:
        ConfigError: shards are missing (listed; rerun the sampling to finish them) or do not
            fit the manifest.
    """
    shard_dir, out_path = Path(shard_dir), Path(out_path)
    manifest = _read_manifest(shard_dir)
    num, shard_size = int(manifest["num"]), int(manifest["shard_size"])
    total = num_shards(num, shard_size)
    missing = [s for s in range(total) if not (shard_dir / shard_name(s)).is_file()]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ConfigError(
            f"{shard_dir} is missing {len(missing)} of {total} shards ({shown}); rerun the sampling to finish them"
        )
    all_labels = np.load(shard_dir / LABELS_NAME, allow_pickle=False)
    first_images, _ = _shard_arrays(shard_dir / shard_name(0))
    image_shape = tuple(first_images.shape[1:])
    del first_images

    def images() -> Iterator[np.ndarray]:
        for s in range(total):
            batch, labels = _shard_arrays(shard_dir / shard_name(s))
            start, stop = s * shard_size, min((s + 1) * shard_size, num)
            if batch.dtype != np.uint8 or tuple(batch.shape) != (stop - start,) + image_shape:
                raise ConfigError(
                    f"{shard_name(s)} holds {batch.dtype} images of shape {batch.shape}, expected "
                    f"uint8 {(stop - start,) + image_shape}; delete it and rerun the sampling"
                )
            if not np.array_equal(labels, all_labels[start:stop]):
                raise ConfigError(f"{shard_name(s)} has labels that differ from {LABELS_NAME}; delete it and rerun")
            yield batch

    out_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in shard_dir.glob(".shard-*.tmp"):  # left by interrupted runs; all processes are done
        stale.unlink(missing_ok=True)

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_npy_member(zf, "arr_0.npy", np.uint8, (num,) + image_shape, images())
            _write_npy_member(zf, "arr_1.npy", np.int64, (num,), iter([all_labels]))

    atomic_write(out_path, write)
    return out_path
