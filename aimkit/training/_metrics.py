"""``OUT/metrics.jsonl``: one JSON line per log step, durable line by line, consistent across resumes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .._io import write_text_atomic

__all__ = ["MetricsFile", "StepWindow"]


class MetricsFile:
    """The metric lines of a run (``path``: ``OUT/metrics.jsonl``)."""

    def __init__(self, path: Path):
        self.path = path

    def truncate(self, step: int) -> None:
        """Drop lines after ``step`` (written by a run that was killed after its last checkpoint)
        and cut lines; the file is replaced atomically, so a kill keeps the old one."""
        if not self.path.is_file():
            return
        text = self.path.read_text(errors="replace")
        keep = []
        for line in text.splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        new = "".join(line + "\n" for line in keep)
        if new != text:
            write_text_atomic(self.path, new)

    def append(self, record: dict[str, Any]) -> None:
        """Append one JSON line and flush it to disk (a crash loses at most the line being written)."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


class StepWindow:
    """Loss and time of the steps since the last metric line."""

    def __init__(self):
        self.loss, self.good, self.seconds, self.steps = 0.0, 0, 0.0, 0
        self._t0 = time.perf_counter()

    def start(self) -> None:
        """A step begins (its time runs until :meth:`add`)."""
        self._t0 = time.perf_counter()

    def add(self, loss: float, counted: bool) -> None:
        """A step ended with mean ``loss``; ``counted``: it entered the mean (not skipped)."""
        if counted:
            self.loss += loss
            self.good += 1
        self.seconds += time.perf_counter() - self._t0
        self.steps += 1

    def mean_loss(self) -> float:
        return self.loss / self.good if self.good else float("nan")

    def step_time(self) -> float:
        return self.seconds / max(1, self.steps)

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return tokens_per_step * self.steps / max(self.seconds, 1e-9)
