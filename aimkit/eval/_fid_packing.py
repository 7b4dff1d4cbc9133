"""Packing a finished shard folder into one ADM-evaluator ``.npz`` (:func:`pack_npz`)."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write
from .._lock import FolderLock
from ..errors import ConfigError
from ._fid_plan import num_shards
from ._fid_shards import (
    LABELS_NAME,
    MANIFEST_NAME,
    PathLike,
    check_arrays,
    check_record,
    holding_lock,
    labels_digest,
    read_manifest,
    read_record,
    run_digest,
    shard_name,
    stored_labels,
)

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the packed npz carries no wall-clock time: reruns are bit-identical


def _write_npy_member(
    zf: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple[int, ...], chunks: Iterator[np.ndarray]
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


def _verified_labels(shard_dir: Path, manifest: dict[str, Any], num: int) -> np.ndarray:
    labels = stored_labels(shard_dir / LABELS_NAME)
    if labels is None or labels.shape != (num,) or labels_digest(labels) != manifest["labels_sha256"]:
        raise ConfigError(
            f"{shard_dir / LABELS_NAME} is missing or damaged (not the run's {num} labels); "
            "rerun the same sampling command to write it again"
        )
    return labels


def _verified_records(shard_dir: Path, manifest: dict[str, Any], labels: np.ndarray) -> tuple[int, ...]:
    """Check every shard against its record (size, SHA-256, run, index, labels); the image shape."""
    num, shard_size = int(manifest["num"]), int(manifest["shard_size"])
    total, run = num_shards(num, shard_size), run_digest(manifest)
    missing = [s for s in range(total) if not (shard_dir / shard_name(s)).is_file()]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ConfigError(
            f"{shard_dir} is missing {len(missing)} of {total} shards ({shown}); rerun the sampling to finish them"
        )
    bad, shapes = [], set()
    for s in range(total):
        planned = labels[s * shard_size:(s + 1) * shard_size]
        record, why = read_record(shard_dir, s)
        why = why or check_record(shard_dir, s, record, run, len(planned), planned)
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


def pack_npz(shard_dir: PathLike, out_path: PathLike, *, lock: FolderLock | None = None) -> Path:
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
    with holding_lock(shard_dir, lock, take=True):
        manifest = read_manifest(shard_dir)
        num, shard_size = int(manifest["num"]), int(manifest["shard_size"])
        all_labels = _verified_labels(shard_dir, manifest, num)
        image_shape = _verified_records(shard_dir, manifest, all_labels)

        def images() -> Iterator[np.ndarray]:
            for s in range(num_shards(num, shard_size)):
                why, batch = check_arrays(shard_dir / shard_name(s), all_labels[s * shard_size:(s + 1) * shard_size],
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
