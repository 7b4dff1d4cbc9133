"""The run's record: rows and facts saved as ``bench.json`` + ``bench.md`` after every row, a log."""

from __future__ import annotations

import json
import time
import traceback
from typing import Any

import torch

from .._io import write_text_atomic
from .._lock import FolderLock
from .options import BenchOptions
from .report import markdown

__all__ = ["Recorder"]


class Recorder:
    """Rows and facts of one run, rewritten to ``bench.json`` + ``bench.md`` after every row.

    The output folder is held (:class:`~aimkit._lock.FolderLock`) from construction to
    :meth:`close`: a second run on the same folder raises ``FolderBusyError`` and changes nothing.

    Attributes:
        out: the output folder.
        data: what ``bench.json`` holds (``options``, ``device``, ``correctness``, ``rows``, ...).
        t0: ``time.perf_counter()`` at the start (log stamps, the time budget).
    """

    def __init__(self, options: BenchOptions):
        self.out = options.out_dir()
        # one run per folder: a second one stops here, before it truncates bench.log or rewrites bench.json
        self.lock = FolderLock(self.out, command="aimkit bench").acquire()
        try:
            self.log_file = open(self.out / "bench.log", "w")  # noqa: SIM115 (open for the whole run)
        except BaseException:
            self.lock.release()
            raise
        self.data: dict[str, Any] = {"options": options.to_dict(), "device": {}, "correctness": None, "rows": []}
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        """Print ``msg`` with the elapsed time and append it to ``bench.log``."""
        stamp = f"[{self.elapsed():7.1f}s] "
        print(stamp + msg, flush=True)
        self.log_file.write(stamp + msg + "\n")
        self.log_file.flush()

    def log_traceback(self) -> None:
        """The current exception's traceback, to ``bench.log`` only."""
        self.log_file.write(traceback.format_exc())

    def row_error(self, row: dict[str, Any], exc: BaseException) -> None:
        """Mark ``row`` as ``"oom"`` or ``"error"`` with a one-line reason (the table goes on)."""
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
        row["status"] = "oom" if oom else "error"
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        self.log(f"  {row['status'].upper()}: {row['error']}")
        if not oom:
            self.log_traceback()

    def add(self, row: dict[str, Any]) -> None:
        self.data["rows"].append(row)
        self.save()

    def skip(self, what: str) -> None:
        self.data.setdefault("skipped", []).append(what)

    def save(self) -> None:
        self.data["elapsed_s"] = self.elapsed()
        write_text_atomic(self.out / "bench.json", json.dumps(self.data, indent=1, default=str) + "\n")
        write_text_atomic(self.out / "bench.md", markdown(self.data))

    def close(self) -> None:
        """Close the log and release the folder (again: a no-op)."""
        self.log_file.close()
        self.lock.release()
