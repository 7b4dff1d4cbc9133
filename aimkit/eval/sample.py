"""Sampling many images for FID into resumable shards, then one ADM-layout ``.npz``.

The ``num`` images are cut into global shards of ``shard_size`` images. Everything about a
shard is fixed by its index ``s`` alone: its label slice, and the seed of each of its batches
(derived from ``(seed, s, batch)``). Process ``p`` of ``P`` generates the shards
``s ≡ p (mod P)``, so the packed result is the same whatever the number of processes, and a
shard that is already on disk (and verified) is never generated again::

    out_dir/
        .aimkit.lock         # FolderLock: one run at a time (held by process 0)
        manifest.json        # the settings; a rerun with other settings is refused
        labels.npy           # (num,) int64, every image's class
        shard-00000.npz      # images (n, H, W, 3) uint8, labels (n,) int64
        shard-00000.json     # its record: run, index, count, size, sha256, image shape, labels hash
        ...

Every file is written atomically (temporary file, fsync, rename), so an interrupted run loses
only the shards in flight. Each shard's record is written by the process that wrote the shard,
right after it, so processes never write the same file. A shard counts as done only when it
matches its record (size, SHA-256, the run it belongs to, its index, count, and labels equal to the
planned labels of that shard); on a rerun a shard that does not is generated again (one line says
why), and :func:`pack_npz` refuses to pack one. Shard files, records, the manifest and label files
are read without executing anything (``np.load(allow_pickle=False)``, JSON).

:func:`pack_npz` concatenates the shards in order into the layout of the ADM evaluator
(``openai/guided-diffusion`` ``evaluations/``): ``arr_0`` (N, H, W, 3) uint8 images and ``arr_1``
(N,) int64 labels, streamed so that 50,000 images never sit in memory at once. The archive's
bytes depend only on the images and labels (fixed zip timestamps), so an interrupted and resumed
run packs a file bit-identical to an uninterrupted one.

:func:`sample_to_shards` and :func:`pack_npz` hold :class:`~aimkit._lock.FolderLock` on the shard
folder while they run (in process 0 only; with several processes the caller's main process holds it
for the whole run, see ``aimkit sample``), so a second run into the same folder is refused at once.

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
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from .._io import atomic_write, read_json, sha256_file
from .._lock import FolderLock
from ..errors import ConfigError

__all__ = [
    "MANIFEST_NAME",
    "LABELS_NAME",
    "MAX_NUM",
    "ShardRun",
    "balanced_labels",
    "resolve_sample_labels",
    "shard_name",
    "record_name",
    "shard_seed",
    "num_shards",
    "shards_of_process",
    "verify_shard",
    "sample_to_shards",
    "pack_npz",
]

PathLike = Union[str, os.PathLike]

MANIFEST_NAME = "manifest.json"
LABELS_NAME = "labels.npy"
MAX_NUM = 100_000_000  # images of one run: the (num,) int64 label table alone is 800 MB at this size
_FORMAT = "aimkit.sample_shards/2"  # /2: every shard has a record (shard-NNNNN.json)
_RECORD_FORMAT = "aimkit.sample_shard_record/1"
_SAMPLING_KEYS = ("cfg_scale", "temperature", "top_k", "top_p")
_JSON_SCALARS = (bool, int, float, str, type(None))
_FINGERPRINT_ELEMENTS = 4096  # leading elements of every tensor that enter the weights fingerprint
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the packed npz carries no wall-clock time: reruns are bit-identical
# A damaged or hostile .npy / .npz makes numpy's reader raise almost anything (ValueError, EOFError,
# BadZipFile, zlib.error, tokenize.TokenError or SyntaxError from the header, MemoryError from a forged
# shape, KeyError for a missing member): around np.load and member reads, each of them means "unreadable".
_READ_ERRORS = (Exception,)
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


def record_name(shard: int) -> str:
    """File name of the record of global shard ``shard``: ``shard-00000.json``."""
    return f"shard-{shard:05d}.json"


def num_shards(num: int, shard_size: int) -> int:
    """Number of shards holding ``num`` images (the last one may be short)."""
    return math.ceil(num / shard_size)


def shards_of_process(total_shards: int, process_index: int, num_processes: int) -> List[int]:
    """The global shards process ``process_index`` of ``num_processes`` generates (s ≡ p mod P)."""
    return list(range(process_index, total_shards, num_processes))


def _check_num(num: Any) -> None:
    if not _is_int(num) or num < 1:
        raise ConfigError(f"num must be an integer >= 1, got {num!r}")
    if num > MAX_NUM:
        raise ConfigError(f"{num} images is more than one sampling run supports ({MAX_NUM}); split it into runs")


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
    except _READ_ERRORS as exc:
        raise ConfigError(f"cannot read label file {path}: {type(exc).__name__}: {str(exc)[:100]}") from None
    if not isinstance(raw, np.ndarray):  # an .npz archive under an .npy name
        raw.close()
        raise ConfigError(f"label file {path} is not a .npy array")
    return _as_int64(raw, f"file {path.name}")


def _read_text_labels(path: Path) -> np.ndarray:
    values = []
    try:
        with open(path, "r", encoding="utf-8") as f:
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
) -> Tuple[np.ndarray, str]:
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
    _check_num(num)
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


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def _normalised(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, ...), for comparisons."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _run_digest(manifest: Dict[str, Any]) -> str:
    """SHA-256 of a manifest's canonical JSON: the identity of a run, stored in every shard record."""
    text = json.dumps(_normalised(manifest), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _write_shard(out_dir: Path, shard: int, images: np.ndarray, labels: np.ndarray, run: str) -> None:
    """Write a shard, then its record (size, SHA-256, ...). A shard without a valid record is not done."""
    (out_dir / record_name(shard)).unlink(missing_ok=True)  # the old record must not vouch for the new file
    path = out_dir / shard_name(shard)
    atomic_write(path, lambda f: np.savez(f, images=images, labels=labels))
    record = {
        "format": _RECORD_FORMAT,
        "run": run,
        "shard": shard,
        "file": path.name,
        "count": int(images.shape[0]),
        "image_shape": [int(d) for d in images.shape[1:]],
        "labels_sha256": _labels_digest(labels),
        "size": path.stat().st_size,
        "sha256": sha256_file(path),
    }
    _write_json(out_dir / record_name(shard), record)


_RECORD_TYPES = {"format": str, "run": str, "shard": int, "file": str, "count": int, "image_shape": list,
                 "labels_sha256": str, "size": int, "sha256": str}


def _read_record(out_dir: Path, shard: int) -> Tuple[Optional[Dict[str, Any]], str]:
    """The parsed, type-checked record of ``shard``, or ``(None, why not)``."""
    path = out_dir / record_name(shard)
    if not path.is_file():
        return None, f"it has no record {path.name} (its write was interrupted)"
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None, f"its record {path.name} is unreadable"
    if not isinstance(record, dict) or any(
        not isinstance(record.get(k), t) or isinstance(record.get(k), bool) for k, t in _RECORD_TYPES.items()
    ):
        return None, f"its record {path.name} is malformed"
    return record, ""


def _check_record(out_dir: Path, shard: int, record: Dict[str, Any], run: str, count: int,
                  labels: np.ndarray) -> str:
    """Why ``record`` does not vouch for shard ``shard`` of this run ('' when it does)."""
    if record["format"] != _RECORD_FORMAT or record["run"] != run:
        return "its record belongs to another run"
    if record["shard"] != shard or record["file"] != shard_name(shard):
        return f"its record is that of shard {record['shard']} (a swapped file)"
    if record["count"] != count or record["labels_sha256"] != _labels_digest(labels):
        return "its record does not list the planned images and labels of this shard"
    path = out_dir / shard_name(shard)
    try:
        size = path.stat().st_size
    except OSError:
        return "its file is missing"
    if size != record["size"]:
        return f"it has {size} bytes, its record says {record['size']} (truncated or replaced)"
    if sha256_file(path) != record["sha256"]:
        return "its SHA-256 differs from its record (modified or replaced)"
    return ""


def _load_shard(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """A shard's arrays, loaded without executing anything (pickled objects are refused)."""
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError("not an npz archive")
    with data:
        return data["images"], data["labels"]


def _check_arrays(path: Path, labels: np.ndarray, image_shape: Optional[Tuple[int, ...]]) -> Tuple[str, Any]:
    """Load a shard and check dtype, shape and labels; ``(why not, None)`` or ``('', images)``."""
    try:
        images, found = _load_shard(path)
    except _READ_ERRORS as exc:
        return f"it cannot be read ({type(exc).__name__}: {str(exc)[:100]})", None
    if (not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4
            or images.shape[0] != labels.shape[0] or images.shape[-1] != 3
            or (image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape))):
        found_kind = f"{getattr(images, 'dtype', '?')} images of shape {getattr(images, 'shape', '?')}"
        return f"it holds {found_kind}, expected uint8 ({labels.shape[0]}, H, W, 3)", None
    if not isinstance(found, np.ndarray) or found.dtype != np.int64 or not np.array_equal(found, labels):
        return "its labels are not the planned labels of this shard", None
    return "", images


def verify_shard(out_dir: PathLike, shard: int, run: str, labels: np.ndarray, load: bool = True) -> str:
    """Why shard ``shard`` of ``out_dir`` is not a finished shard of run ``run`` ('' when it is).

    Checks its record (run, index, count, labels hash), size and SHA-256, and with ``load`` its
    arrays (uint8 (n, H, W, 3) images, labels equal to ``labels``, the planned labels of the shard).
    """
    out_dir = Path(out_dir)
    record, why = _read_record(out_dir, shard)
    why = why or _check_record(out_dir, shard, record, run, labels.shape[0], labels)
    if not why and load:
        why = _check_arrays(out_dir / shard_name(shard), labels, tuple(record["image_shape"]))[0]
    return why


def _manifest_differences(existing: Dict[str, Any], wanted: Dict[str, Any]) -> str:
    keys = sorted(set(existing) | set(wanted))
    return "; ".join(
        f"{k}: {existing.get(k)!r} on disk vs {wanted.get(k)!r} now" for k in keys if existing.get(k) != wanted.get(k)
    )


def _stored_labels(path: Path) -> Optional[np.ndarray]:
    """``labels.npy`` as a 1-D int64 array, or None when missing, unreadable or of another kind."""
    try:
        array = np.load(path, allow_pickle=False)
    except _READ_ERRORS:
        return None
    if not isinstance(array, np.ndarray):
        array.close()
        return None
    return array if array.ndim == 1 and array.dtype == np.int64 else None


def _prepare_dir(out_dir: Path, manifest: Dict[str, Any], labels: np.ndarray) -> None:
    """Create ``out_dir`` with its manifest and labels, or check that it holds the same run.

    Every process may call this at once: each writes identical content by atomic renames. A
    missing or damaged ``labels.npy`` of the same run is rewritten (it follows from the settings).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.is_file():
        existing = read_json(manifest_path, ConfigError)
        if not isinstance(existing, dict):
            raise ConfigError(f"{manifest_path} is not a sample manifest; use another shard directory")
        wanted = _normalised(manifest)
        if existing != wanted:
            raise ConfigError(
                f"{out_dir} holds shards of a run with other settings ({_manifest_differences(existing, wanted)}); "
                "rerun with the same settings to resume, or use another shard directory"
            )
    else:
        if any(out_dir.glob("shard-*.npz")) or any(out_dir.glob("shard-*.json")):
            raise ConfigError(f"{out_dir} holds shard files but no {MANIFEST_NAME}; use an empty shard directory")
        _write_json(manifest_path, manifest)
    labels_path = out_dir / LABELS_NAME
    stored = _stored_labels(labels_path)
    if stored is None or not np.array_equal(stored, labels):
        if labels_path.exists():
            _say(f"{labels_path} is damaged or differs from this run's labels; writing it again")
        atomic_write(labels_path, lambda f: np.save(f, labels))


def _say(line: str) -> None:
    """One line on stderr (without breaking a tqdm bar)."""
    from tqdm.auto import tqdm

    tqdm.write(f"aimkit sample: {line}", file=sys.stderr)


def _manifest_field(manifest: Dict[str, Any], path: Path, key: str, low: int = 1) -> int:
    value = manifest.get(key)
    if not _is_int(value) or value < low:
        raise ConfigError(f"{path} is damaged: {key!r} is {value!r}, expected an integer >= {low}")
    return int(value)


def _read_manifest(shard_dir: Path) -> Dict[str, Any]:
    path = shard_dir / MANIFEST_NAME
    if not path.is_file():
        raise ConfigError(f"{shard_dir} is not a shard directory written by sample_to_shards (no {MANIFEST_NAME})")
    manifest = read_json(path, ConfigError)
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != _FORMAT:
        raise ConfigError(f"{path} has format {found!r}, expected {_FORMAT!r}")
    num = _manifest_field(manifest, path, "num")
    _manifest_field(manifest, path, "shard_size")
    if num > MAX_NUM:
        raise ConfigError(f"{path} is damaged: 'num' is {num}, more than {MAX_NUM}")
    if not isinstance(manifest.get("labels_sha256"), str):
        raise ConfigError(f"{path} is damaged: 'labels_sha256' is {manifest.get('labels_sha256')!r}")
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


@contextmanager
def _holding_lock(folder: Path, lock: Optional[FolderLock], take: bool) -> Iterator[None]:
    """Run the block under the folder's lock: the caller's ``lock`` (acquired if it is not yet), or,
    when ``take``, a lock of our own that is released afterwards; otherwise no lock (process > 0)."""
    if lock is not None:
        lock.acquire()
        yield
    elif take:
        with FolderLock(folder, command="aimkit sample"):
            yield
    else:
        yield


def _check_run_args(num, batch_size, shard_size, process_index, num_processes, seed, sampling) -> None:
    _check_num(num)
    for name, value, low in (("batch_size", batch_size, 1), ("shard_size", shard_size, 1),
                             ("num_processes", num_processes, 1), ("seed", seed, 0)):
        if not _is_int(value) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if seed >= 2**63:
        raise ConfigError(f"seed must be below 2**63, got {seed}")
    if not _is_int(process_index) or not 0 <= process_index < num_processes:
        raise ConfigError(f"process_index must be in [0, {num_processes}), got {process_index!r}")
    for key in ("output", "seed", "labels", "num_images", "progress", "batch_size"):
        if key in sampling:
            raise ConfigError(f"{key!r} is set by sample_to_shards and cannot be passed as a sampling option")


def _pending_shards(out_dir: Path, mine: List[int], run: str, labels: np.ndarray, num: int,
                    shard_size: int) -> List[int]:
    """This process's shards that are not verified done; each rejected file gets one line saying why."""
    pending = []
    for s in mine:
        shard_file, record_file = out_dir / shard_name(s), out_dir / record_name(s)
        if not shard_file.exists() and not record_file.exists():
            pending.append(s)
            continue
        why = verify_shard(out_dir, s, run, labels[s * shard_size:min((s + 1) * shard_size, num)])
        if why:
            _say(f"{shard_name(s)} in {out_dir} is not usable ({why}); generating it again")
            pending.append(s)
    return pending


def _generate_shard(model, labels: np.ndarray, seed: int, shard: int, batch_size: int, settings, bar) -> np.ndarray:
    parts = []
    for j, b0 in enumerate(range(0, len(labels), batch_size)):
        chunk = labels[b0:b0 + batch_size]
        images = model.generate(
            torch.from_numpy(chunk.copy()),
            seed=shard_seed(seed, shard, j),
            output="uint8",
            batch_size=len(chunk),
            progress=False,
            **settings,
        )
        parts.append(_as_uint8_nhwc(images, len(chunk)))
        bar.update(len(chunk))
    return np.concatenate(parts)


def _manifest_of(model, num, shard_size, batch_size, seed, label_source, label_array, settings, metadata):
    return {
        "format": _FORMAT,
        "num": num,
        "shard_size": shard_size,
        "batch_size": batch_size,
        "seed": seed,
        "labels": label_source,
        "labels_sha256": _labels_digest(label_array),
        "sampling": {k: (v if isinstance(v, _JSON_SCALARS) else repr(v)) for k, v in settings.items()},
        "weights_fingerprint": _weights_fingerprint(model),
        "metadata": metadata or {},
    }


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
    lock: Optional[FolderLock] = None,
    **sampling: Any,
) -> ShardRun:
    """Generate this process's share of ``num`` images into ``out_dir``, skipping finished shards.

    Args:
        model: a :class:`~aimkit.generator.Generator` with a tokenizer (anything with
            ``num_classes`` and ``generate(labels, *, seed, output="uint8", batch_size, ...)``
            returning (B, H, W, 3) uint8 images).
        out_dir: the shard directory (created).
        num: total number of images of the run (all processes), at most :data:`MAX_NUM`.
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
        lock: a :class:`~aimkit._lock.FolderLock` on ``out_dir`` that the caller holds for longer
            (``aimkit sample`` holds it in its main process from start to packing). None: process 0
            takes the lock for this call; other processes take none (their main process holds it).
        **sampling: ``cfg_scale``, ``temperature``, ``top_k``, ``top_p`` (None = the preset's
            FID settings from ``model.config.fid_sampling``) and any other keyword of
            ``generate`` (e.g. ``schedule="linear"``).

    Returns:
        A :class:`ShardRun` summary of this process's work.

    Raises:
        ConfigError: bad arguments, or ``out_dir`` holds a run with other settings.
        FolderBusyError: another run holds ``out_dir``.
    """
    _check_run_args(num, batch_size, shard_size, process_index, num_processes, seed, sampling)
    label_array, label_source = resolve_sample_labels(labels, num, model.num_classes, seed)
    settings = _sampling_settings(model, sampling)
    manifest = _manifest_of(model, num, shard_size, batch_size, seed, label_source, label_array, settings, metadata)
    out_dir, run = Path(out_dir), _run_digest(manifest)
    with _holding_lock(out_dir, lock, take=process_index == 0):
        _prepare_dir(out_dir, manifest, label_array)
        total = num_shards(num, shard_size)
        mine = shards_of_process(total, process_index, num_processes)
        pending = _pending_shards(out_dir, mine, run, label_array, num, shard_size)
        skipped = tuple(sorted(set(mine) - set(pending)))
        todo = sum(min(shard_size, num - s * shard_size) for s in pending)

        from tqdm.auto import tqdm

        desc = "sampling" if num_processes == 1 else f"sampling (process 0 of {num_processes})"
        bar = tqdm(total=todo, unit="img", desc=desc, disable=not progress or process_index != 0, dynamic_ncols=True)
        if skipped and progress and process_index == 0:
            bar.write(f"{len(skipped)} of this process's {len(mine)} shards are already done; skipping them")
        with bar, torch.no_grad():
            for s in pending:
                shard_labels = label_array[s * shard_size:min((s + 1) * shard_size, num)]
                images = _generate_shard(model, shard_labels, seed, s, batch_size, settings, bar)
                _write_shard(out_dir, s, images, shard_labels, run)
    return ShardRun(total, tuple(pending), skipped, todo)


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------


def _write_npy_member(
    zf: zipfile.ZipFile, name: str, dtype: np.dtype, shape: Tuple[int, ...], chunks: Iterator[np.ndarray]
) -> None:
    """Stream ``chunks`` (C-order, concatenated along axis 0) as ``name`` of an npz archive.

    The member carries a fixed date, so the archive's bytes depend on the arrays only.
    """
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    with zf.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def _verified_labels(shard_dir: Path, manifest: Dict[str, Any], num: int) -> np.ndarray:
    labels = _stored_labels(shard_dir / LABELS_NAME)
    if labels is None or labels.shape != (num,) or _labels_digest(labels) != manifest["labels_sha256"]:
        raise ConfigError(
            f"{shard_dir / LABELS_NAME} is missing or damaged (not the run's {num} labels); "
            "rerun the same sampling command to write it again"
        )
    return labels


def _verified_records(shard_dir: Path, manifest: Dict[str, Any], labels: np.ndarray) -> Tuple[int, ...]:
    """Check every shard against its record (size, SHA-256, run, index, labels); the image shape."""
    num, shard_size = int(manifest["num"]), int(manifest["shard_size"])
    total, run = num_shards(num, shard_size), _run_digest(manifest)
    missing = [s for s in range(total) if not (shard_dir / shard_name(s)).is_file()]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ConfigError(
            f"{shard_dir} is missing {len(missing)} of {total} shards ({shown}); rerun the sampling to finish them"
        )
    bad, shapes = [], set()
    for s in range(total):
        planned = labels[s * shard_size:(s + 1) * shard_size]
        record, why = _read_record(shard_dir, s)
        why = why or _check_record(shard_dir, s, record, run, len(planned), planned)
        if why:
            bad.append(f"{shard_name(s)}: {why}")
        else:
            shapes.add(tuple(record["image_shape"]))
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ConfigError(f"{shard_dir} has {len(bad)} unusable shard(s): {'; '.join(bad[:3])}{more}; "
                          "rerun the same sampling command to generate them again")
    if len(shapes) != 1:
        raise ConfigError(f"the shards of {shard_dir} hold images of different shapes {sorted(shapes)}")
    return shapes.pop()


def pack_npz(shard_dir: PathLike, out_path: PathLike, *, lock: Optional[FolderLock] = None) -> Path:
    """Concatenate a finished shard directory into one ADM-evaluator ``.npz``.

    The result reads like ``np.savez(out_path, arr_0=images, arr_1=labels)``: ``arr_0`` (N, H, W, 3)
    uint8, ``arr_1`` (N,) int64, in shard order. Every shard is first checked against its record
    (size, SHA-256, run, index, labels), then loaded without pickles and checked again (shape, dtype,
    labels) while it is streamed into the archive, which appears at ``out_path`` only when complete.

    Args:
        shard_dir: a directory written by :func:`sample_to_shards`.
        out_path: the ``.npz`` to write.
        lock: the caller's :class:`~aimkit._lock.FolderLock` on ``shard_dir``; None takes it for
            this call.

    Raises:
        ConfigError: shards are missing or unusable (listed; rerun the sampling to regenerate
            them), or the manifest or label file is damaged.
        FolderBusyError: a sampling run holds ``shard_dir``.
    """
    shard_dir, out_path = Path(shard_dir), Path(out_path)
    with _holding_lock(shard_dir, lock, take=True):
        manifest = _read_manifest(shard_dir)
        num, shard_size = int(manifest["num"]), int(manifest["shard_size"])
        all_labels = _verified_labels(shard_dir, manifest, num)
        image_shape = _verified_records(shard_dir, manifest, all_labels)

        def images() -> Iterator[np.ndarray]:
            for s in range(num_shards(num, shard_size)):
                why, batch = _check_arrays(shard_dir / shard_name(s), all_labels[s * shard_size:(s + 1) * shard_size],
                                           image_shape)
                if why:
                    raise ConfigError(f"{shard_name(s)} in {shard_dir} is unusable ({why}); rerun the sampling "
                                      "command to generate it again")
                yield batch

        for pattern in (".shard-*.tmp", f".{MANIFEST_NAME}.*.tmp", f".{LABELS_NAME}.*.tmp"):
            for stale in shard_dir.glob(pattern):  # left by interrupted runs; we hold the lock
                stale.unlink(missing_ok=True)

        def write(f) -> None:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                _write_npy_member(zf, "arr_0.npy", np.uint8, (num,) + image_shape, images())
                _write_npy_member(zf, "arr_1.npy", np.int64, (num,), iter([all_labels]))

        atomic_write(out_path, write)
    return out_path
