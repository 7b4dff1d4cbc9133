"""Atomic file writes: a reader never sees a half-written file, a crash leaves the old one.

Every writer in aimkit (weights, configs, token shards, sample shards, manifests) goes through
:func:`atomic_path`: write to a temporary file in the same folder, flush it to disk, give it the
permissions of an ordinary new file (``mkstemp`` makes 0600), then rename it over the target.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_write",
    "read_json",
    "write_text_atomic",
    "fsync_dir",
    "fsync_tree",
    "sha256_file",
    "check_writable_dir",
]

PathLike = str | os.PathLike


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

    Example::

        with atomic_path("model.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_file():  # a device, a folder, a socket: never replaced
        raise FileExistsError(errno.EEXIST, "exists and is not a regular file; refusing to replace it", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself reaches the disk
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: PathLike, write: Callable) -> None:
    """Call ``write(binary_file_object)`` on a temporary file, then move it to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_json(path: PathLike, error: type = ValueError) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file raises ``error`` naming the path."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"cannot read {path}: {exc}") from None


def fsync_dir(path: PathLike) -> None:
    """Flush a directory's entries (new names, renames) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(path: PathLike) -> None:
    """Flush every file under ``path`` and every directory (itself included) to disk."""
    path = Path(path)
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def check_writable_dir(path: PathLike, what: str = "output folder", error: type = OSError) -> Path:
    """Make sure ``path`` is (or can become) a directory we can write a file into, before long work.

    Creates the directory when missing and writes, flushes and removes a probe file there, so a
    read-only location, a path that is a file, or a full disk is reported now rather than after
    hours of sampling. Raises ``error`` with one line naming the path and the reason.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"{what} {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".aimkit-probe-")
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        reason = {errno.ENOSPC: "the disk is full", errno.EROFS: "it is on a read-only file system",
                  errno.EACCES: "permission denied", errno.EPERM: "permission denied"}.get(exc.errno, exc.strerror)
        raise error(f"cannot write to {what} {path}: {reason}") from None
    return path
