"""The shard folder of a FID sampling run: its manifest, label file, shard files and their records.

::

    out_dir/
        .aimkit.lock         # FolderLock: one run at a time (held by process 0)
        manifest.json        # the settings; a rerun with other settings is refused
        labels.npy           # (num,) int64, every image's class
        shard-00000.npz      # images (n, H, W, 3) uint8, labels (n,) int64
        shard-00000.json     # its record: run, index, count, size, sha256, image shape, labels hash
        ...

Every file is written atomically (temporary file, fsync, rename). A shard counts as done only
when it matches its record (size, SHA-256, the run it belongs to, its index, count, and labels
equal to the planned labels of that shard). Everything is read without executing anything
(``np.load(allow_pickle=False)``, JSON).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write, read_json, sha256_file
from .._lock import FolderLock
from ..errors import ConfigError
from ._fid_plan import MAX_NUM, READ_ERRORS, is_int

PathLike = str | os.PathLike
log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
LABELS_NAME = "labels.npy"
MANIFEST_FORMAT = "aimkit.sample_shards/2"  # /2: every shard has a record (shard-NNNNN.json)
_RECORD_FORMAT = "aimkit.sample_shard_record/1"


def shard_name(shard: int) -> str:
    """File name of global shard ``shard``: ``shard-00000.npz``."""
    return f"shard-{shard:05d}.npz"


def record_name(shard: int) -> str:
    """File name of the record of global shard ``shard``: ``shard-00000.json``."""
    return f"shard-{shard:05d}.json"


def normalised(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, ...), for comparisons."""
    return json.loads(json.dumps(obj, sort_keys=True))


def run_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of a manifest's canonical JSON: the identity of a run, stored in every shard record."""
    text = json.dumps(normalised(manifest), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def labels_digest(labels: np.ndarray) -> str:
    """SHA-256 of (n,) labels as int64 bytes (in the manifest and in every shard record)."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def write_shard(out_dir: Path, shard: int, images: np.ndarray, labels: np.ndarray, run: str) -> None:
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
        "labels_sha256": labels_digest(labels),
        "size": path.stat().st_size,
        "sha256": sha256_file(path),
    }
    _write_json(out_dir / record_name(shard), record)


_RECORD_TYPES = {"format": str, "run": str, "shard": int, "file": str, "count": int, "image_shape": list,
                 "labels_sha256": str, "size": int, "sha256": str}


def read_record(out_dir: Path, shard: int) -> tuple[dict[str, Any] | None, str]:
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


def check_record(out_dir: Path, shard: int, record: dict[str, Any], run: str, count: int,
                 labels: np.ndarray) -> str:
    """Why ``record`` does not vouch for shard ``shard`` of this run ('' when it does)."""
    if record["format"] != _RECORD_FORMAT or record["run"] != run:
        return "its record belongs to another run"
    if record["shard"] != shard or record["file"] != shard_name(shard):
        return f"its record is that of shard {record['shard']} (a swapped file)"
    if record["count"] != count or record["labels_sha256"] != labels_digest(labels):
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


def _load_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A shard's arrays, loaded without executing anything (pickled objects are refused)."""
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError("not an npz archive")
    with data:
        return data["images"], data["labels"]


def check_arrays(path: Path, labels: np.ndarray, image_shape: tuple[int, ...] | None) -> tuple[str, Any]:
    """Load a shard and check dtype, shape and labels; ``(why not, None)`` or ``('', images)``."""
    try:
        images, found = _load_shard(path)
    except READ_ERRORS as exc:
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
    record, why = read_record(out_dir, shard)
    why = why or check_record(out_dir, shard, record, run, labels.shape[0], labels)
    if not why and load:
        why = check_arrays(out_dir / shard_name(shard), labels, tuple(record["image_shape"]))[0]
    return why


def _manifest_differences(existing: dict[str, Any], wanted: dict[str, Any]) -> str:
    keys = sorted(set(existing) | set(wanted))
    return "; ".join(
        f"{k}: {existing.get(k)!r} on disk vs {wanted.get(k)!r} now" for k in keys if existing.get(k) != wanted.get(k)
    )


def stored_labels(path: Path) -> np.ndarray | None:
    """``labels.npy`` as a 1-D int64 array, or None when missing, unreadable or of another kind."""
    try:
        array = np.load(path, allow_pickle=False)
    except READ_ERRORS:
        return None
    if not isinstance(array, np.ndarray):
        array.close()
        return None
    return array if array.ndim == 1 and array.dtype == np.int64 else None


def prepare_dir(out_dir: Path, manifest: dict[str, Any], labels: np.ndarray) -> None:
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
        wanted = normalised(manifest)
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
    stored = stored_labels(labels_path)
    if stored is None or not np.array_equal(stored, labels):
        if labels_path.exists():
            say(f"{labels_path} is damaged or differs from this run's labels; writing it again")
        atomic_write(labels_path, lambda f: np.save(f, labels))


def say(line: str) -> None:
    """A warning about the shard folder (a file redone), logged as ``aimkit sample: LINE``; the
    command line shows it on stderr without breaking the bar, a script through its logging setup
    (or Python's fallback to stderr)."""
    log.warning("aimkit sample: %s", line)


def _manifest_field(manifest: dict[str, Any], path: Path, key: str, low: int = 1) -> int:
    value = manifest.get(key)
    if not is_int(value) or value < low:
        raise ConfigError(f"{path} is damaged: {key!r} is {value!r}, expected an integer >= {low}")
    return int(value)


def read_manifest(shard_dir: Path) -> dict[str, Any]:
    """The checked ``manifest.json`` of a shard folder (format, ``num``, ``shard_size``, labels hash).

    Raises:
        ConfigError: the folder has no manifest, or it is of another format or damaged.
    """
    path = shard_dir / MANIFEST_NAME
    if not path.is_file():
        raise ConfigError(f"{shard_dir} is not a shard directory written by sample_to_shards (no {MANIFEST_NAME})")
    manifest = read_json(path, ConfigError)
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != MANIFEST_FORMAT:
        raise ConfigError(f"{path} has format {found!r}, expected {MANIFEST_FORMAT!r}")
    num = _manifest_field(manifest, path, "num")
    _manifest_field(manifest, path, "shard_size")
    if num > MAX_NUM:
        raise ConfigError(f"{path} is damaged: 'num' is {num}, more than {MAX_NUM}")
    if not isinstance(manifest.get("labels_sha256"), str):
        raise ConfigError(f"{path} is damaged: 'labels_sha256' is {manifest.get('labels_sha256')!r}")
    return manifest


@contextmanager
def holding_lock(folder: Path, lock: FolderLock | None, take: bool) -> Iterator[None]:
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
