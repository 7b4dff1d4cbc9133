"""One writer per output folder: a held lock file that names its owner.

``aimkit sample``, ``aimkit train`` and ``aimkit tokenize`` each take :class:`FolderLock` on the
folder they write before they read or write anything in it. The lock is an ``flock`` on
``FOLDER/.aimkit.lock``, so it is released by the kernel when the owner exits, however it exits
(``kill -9`` included): a stale file never blocks a later run. The file holds the owner's pid,
host, command and start time, which a second run prints in its one-line refusal.

Example::

    with FolderLock("runs/b", command="aimkit train"):
        ...  # nobody else writes runs/b meanwhile
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .errors import AimkitError

__all__ = ["FolderLock", "FolderBusyError", "LOCK_NAME", "lock_on_main_process"]

LOCK_NAME = ".aimkit.lock"

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: the lock file is created exclusively instead
    fcntl = None


class FolderBusyError(AimkitError):
    """Another process holds the lock of an output folder."""


def _owner_text(info: dict[str, Any]) -> str:
    if not info:
        return "another process"
    started = info.get("started")
    since = ""
    if isinstance(started, (int, float)):
        since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started))
    command = f" ({info['command']})" if info.get("command") else ""
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{command}{since}"


class FolderLock:
    """Exclusive, process-lifetime lock on an output folder (created if missing).

    Args:
        folder: the folder to guard; ``FOLDER/.aimkit.lock`` is the lock file.
        command: what the owner is doing, shown to a second writer (``"aimkit sample"``).
        remove: delete the lock file on release, for a folder that is a deliverable (a saved
            model): a writer that opened the file just before could then lock the deleted file
            beside a newcomer, a narrow race that suits only folders whose files are checked
            when read (``save_pretrained``'s save ids).

    Raises:
        FolderBusyError: on :meth:`acquire` (or ``with``) when another process holds the lock;
            the message names its pid, host, command and start time.
    """

    def __init__(self, folder: str | os.PathLike, command: str = "", *, remove: bool = False):
        self.folder = Path(folder)
        self.remove = remove
        self.path = self.folder / LOCK_NAME
        self.command = command or " ".join(Path(sys.argv[0]).name.split()[:1] + sys.argv[1:2])
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"FolderLock({str(self.folder)!r}, held={self.held})"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def owner(self) -> dict[str, Any]:
        """The owner record in the lock file ({} when unreadable or empty)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> FolderLock:
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            fd = self._acquire_exclusive_file()
        else:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise FolderBusyError(
                    f"{self.folder} is in use by {_owner_text(self.owner())}; wait for that run to finish "
                    "or choose another output folder"
                ) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _acquire_exclusive_file(self) -> int:  # pragma: no cover - non-POSIX fallback
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise FolderBusyError(
                f"{self.folder} is in use by {_owner_text(self.owner())}; if no such run is alive, delete {self.path}"
            ) from None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self.remove:
                self.path.unlink(missing_ok=True)  # while still held
            else:
                os.ftruncate(fd, 0)  # the file stays (unlinking it would race a second writer)
        finally:
            os.close(fd)
        if fcntl is None:  # pragma: no cover
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _main_process_outcome(state, message: str | None) -> str | None:
    """Every process gets the main process's ``message`` (None: go on); one process: unchanged."""
    if state.num_processes == 1:
        return message
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def lock_on_main_process(state, folder: str | os.PathLike, command: str) -> FolderLock | None:
    """The main process of a (possibly multi-process) run takes ``folder``'s lock, and every
    process learns whether it got it, so a refused run stops everywhere instead of hanging.

    Args:
        state: accelerate's ``PartialState`` (``is_main_process``, ``num_processes``).
        folder: the output folder to guard.
        command: what the owner is doing (``"aimkit sample"``).

    Returns:
        The held :class:`FolderLock` in the main process, None in the others.

    Raises:
        FolderBusyError: in every process, when another run holds the folder.
    """
    lock, message = None, None
    if state.is_main_process:
        try:
            lock = FolderLock(folder, command=command).acquire()
        except FolderBusyError as exc:
            message = str(exc)
    message = _main_process_outcome(state, message)
    if message is not None:
        raise FolderBusyError(message)
    return lock
