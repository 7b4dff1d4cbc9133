"""Training checkpoints: written atomically, verified before use, resumed from exactly.

Layout::

    OUT/checkpoints/step-00001000/      model.safetensors, optimizer.pt, scheduler.pt, [scaler.pt,]
                                        [ema.safetensors,] rng-00000.pt (one per process),
                                        trainer_state.json
    OUT/checkpoints/latest              name of the newest checkpoint (informational)
    OUT/checkpoints/abandoned-step-*/   checkpoints newer than the one a run resumed from, set aside
                                        (never resumed from by --resume auto; delete them at will)

A checkpoint is written to ``.tmp-step-*``, flushed to disk and renamed; trainer_state.json,
written last, records the size and SHA-256 of every file. A resume takes the newest checkpoint
that verifies (:func:`verify_checkpoint`) and loads, naming each newer one it passes over and
why. Nothing whose parameters are not finite is ever saved. Every process takes part in a save;
the main process writes the shared files (full, unsharded state: what DDP needs).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import fsync_dir, fsync_tree, sha256_file, write_text_atomic
from ..errors import CheckpointError, ConfigError
from ._guards import all_ok, check_finite
from .ema import EMA_FILE

__all__ = ["STATE_NAME", "Checkpointer", "ResumeSearch", "find_checkpoint", "resume_search", "verify_checkpoint"]

STATE_NAME = "trainer_state.json"
_PREFIX = "step-"
_REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt")

# ------------------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Python's, numpy's, torch's and (if any) every CUDA device's RNG state."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].copy()), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------- finding


def _read_state(path: Path) -> dict[str, Any] | None:
    """``path/trainer_state.json`` when it parses and records a step; None otherwise."""
    try:
        state = json.loads((path / STATE_NAME).read_text())
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    step = state.get("step") if isinstance(state, dict) else None
    ok = isinstance(step, int) and not isinstance(step, bool) and step >= 0
    return state if ok else None


def _is_complete(path: Path) -> bool:
    """Complete in structure (not checksummed): a visible directory with every file and a step."""
    if not path.is_dir() or path.name.startswith("."):
        return False
    return all((path / f).is_file() for f in _REQUIRED_FILES) and _read_state(path) is not None


def _number(path: Path) -> int | None:
    digits = path.name[len(_PREFIX):]
    return int(digits) if path.name.startswith(_PREFIX) and digits.isdigit() else None


def _step_dirs(folder: Path) -> list[Path]:
    """The ``step-*`` directories of ``folder``, newest first, complete or not."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _number(p) is not None and p.is_dir()]
    return sorted(found, key=_number, reverse=True)


def checkpoint_dirs(path: Path) -> list[Path]:
    """``step-*`` directories in ``path/checkpoints``, else in ``path``, newest first."""
    return _step_dirs(path / "checkpoints") or _step_dirs(path)


def _is_checkpoint_dir(path: Path) -> bool:
    """``path`` names one checkpoint (rather than a run directory or a checkpoints folder)."""
    if (path / "checkpoints").is_dir():
        return False
    return (path / STATE_NAME).is_file() or (_number(path) is not None and path.is_dir())


def _file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file of a checkpoint directory (kept in its trainer_state.json)."""
    return {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != STATE_NAME}


def _is_record(name: Any, rec: Any) -> bool:
    return (isinstance(name, str) and name == Path(name).name and not name.startswith(".")
            and isinstance(rec, dict) and isinstance(rec.get("size"), int) and isinstance(rec.get("sha256"), str))


def _check_records(path: Path, records: dict[str, dict[str, Any]]) -> str | None:
    for name, rec in records.items():  # sizes first: a cut file is found without reading anything
        if not (path / name).is_file():
            return f"{name} is missing"
        size = (path / name).stat().st_size
        if size != rec["size"]:
            return f"{name} is {size} bytes, recorded {rec['size']}"
    for name, rec in records.items():
        if sha256_file(path / name) != rec["sha256"]:
            return f"{name} does not match its recorded SHA-256 (the file is damaged)"
    return None


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """Why the checkpoint directory ``path`` cannot be resumed from; None when it can.

    trainer_state.json must parse and name a step, the model, optimizer and scheduler files must
    be there, and every file it records must have the recorded size and SHA-256. Checkpoints
    written before aimkit recorded checksums are checked for their files only.
    """
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    if not (path / STATE_NAME).is_file():
        return f"{STATE_NAME} is missing (an interrupted write?)"
    state = _read_state(path)
    if state is None:
        return f"{STATE_NAME} is not valid JSON with a step number"
    missing = next((name for name in _REQUIRED_FILES if not (path / name).is_file()), None)
    if missing is not None:
        return f"{missing} is missing"
    records = state.get("files", {})
    if not isinstance(records, dict) or not all(_is_record(k, v) for k, v in records.items()):
        return f"{STATE_NAME} holds a malformed file list"
    return _check_records(path, records)


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest checkpoint at ``path`` that verifies (:func:`verify_checkpoint`): ``path`` itself
    when it is a checkpoint directory, else the newest ``step-*`` of ``path/checkpoints`` or
    ``path``. Incomplete or damaged checkpoints and interrupted ``.tmp-*`` writes are passed over."""
    path = Path(path)
    if _is_checkpoint_dir(path):
        return path if verify_checkpoint(path) is None else None
    return next((p for p in checkpoint_dirs(path) if verify_checkpoint(p) is None), None)


# ------------------------------------------------------------------------------------- resuming


def _load_ema(path: Path, ema) -> None:
    """The moving average of checkpoint ``path`` into ``ema`` (a run that turns the average on at
    a resume starts it from the resumed weights; one that turns it off ignores the file)."""
    from ..weights import read_state_dict

    if ema is None:
        return
    if (path / EMA_FILE).is_file():
        ema.load_state_dict(read_state_dict(path / EMA_FILE), source=str(path / EMA_FILE))
    else:
        print(f"note: {path.name} holds no {EMA_FILE}; the moving average starts from the resumed weights")
        ema.reset()


def _load(path: Path, accelerator, gen, optimizer, scheduler, ema=None) -> dict[str, Any]:
    """Load checkpoint ``path`` into the run; returns its trainer state."""
    from ..weights import read_state_dict

    state = json.loads((path / STATE_NAME).read_text())
    gen.load_aimkit_state_dict(read_state_dict(path / "model.safetensors"), source=str(path))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    _load_ema(path, ema)
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng = path / f"rng-{accelerator.process_index:05d}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    else:
        print(f"warning: {rng.name} missing in {path} (different number of processes?); RNG reseeded")
        torch.manual_seed(state["step"] * 7919 + accelerator.process_index)
    return state


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ResumeSearch:
    """The checkpoints a resume may use, newest first, each verified when reached; every one
    passed over is reported through ``say`` on one line with the reason."""

    def __init__(self, dirs: list[Path], base: Path, say: Callable[[str], None], explicit: bool = False):
        self.base, self.say, self.explicit, self.any = base, say, explicit, bool(dirs)
        self.skipped: list[tuple[Path, str]] = []
        self._dirs = iter(dirs)

    def _name(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.base))
        except ValueError:
            return str(path)

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append((path, reason))
        self.say(f"skipping {self._name(path)}: {reason}")

    def next(self) -> Path | None:
        """The next checkpoint that verifies, or None when none is left."""
        for path in self._dirs:
            reason = verify_checkpoint(path)
            if reason is None:
                return path
            self.skip(path, reason)
        return None

    def failure(self) -> CheckpointError:
        if self.explicit:
            path, reason = self.skipped[0]
            return CheckpointError(f"cannot resume from {path}: {reason}")
        listed = "; ".join(f"{self._name(p)}: {r}" for p, r in self.skipped[:3])
        more = f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
        return CheckpointError(f"no checkpoint in {self.base} can be resumed from ({listed}{more}); "
                               "move the damaged ones away to start afresh")

    def load(self, path: Path, accelerator, gen, optimizer, scheduler, ema=None) -> tuple[Path, dict[str, Any]]:
        """Load ``path`` (and its moving average into ``ema``, if given); when it (or a process's
        part) does not load, fall back to the next older checkpoint that verifies. Returns
        ``(checkpoint, trainer_state)``."""
        while path is not None:
            try:
                state, problem = _load(path, accelerator, gen, optimizer, scheduler, ema), None
            except Exception as exc:  # an old checkpoint without checksums can be damaged in many ways
                state, problem = None, _one_line(exc)
            if all_ok(accelerator, problem is None):
                return path, state
            self.skip(path, f"it does not load ({problem})" if problem else "another process could not load it")
            path = self.next()
        raise self.failure()


def _describe_missing(path: Path) -> str:
    if not path.exists():
        return f"resume path {path} does not exist"
    partial = sorted(p.name for folder in (path, path / "checkpoints") if folder.is_dir() for p in folder.iterdir()
                     if p.name.startswith((".tmp-", _PREFIX)))
    seen = f" (found only incomplete: {', '.join(partial[:5])})" if partial else ""
    return f"no valid checkpoint in {path}{seen}; a checkpoint is a step-* directory holding {STATE_NAME}"


def resume_search(resume: str | None, out: Path, say: Callable[[str], None]) -> ResumeSearch | None:
    """Where ``resume`` (None, "auto" or a path) looks for checkpoints; refuses to start afresh
    over a run directory that holds checkpoints."""
    if resume is None:
        if checkpoint_dirs(out):
            raise ConfigError(
                f"{out} already holds checkpoints; pass --resume auto to continue, or use a new output_dir"
            )
        return None
    base = out if resume == "auto" else Path(resume).expanduser()
    if resume != "auto" and _is_checkpoint_dir(base):
        return ResumeSearch([base], base.parent, say, explicit=True)
    dirs = checkpoint_dirs(base)
    if not dirs and resume != "auto":
        raise ConfigError(_describe_missing(base))
    return ResumeSearch(dirs, base, say)


# ------------------------------------------------------------------------------------- writing


class _WriteRecorder:
    """The file object :func:`_write_torch` hands to ``torch.save``: it keeps the OSError of a
    failed write, which torch itself reports only as a RuntimeError ("unexpected pos")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def _write_torch(obj: Any, path: Path) -> None:
    """``torch.save`` one file of a checkpoint; a full disk raises the OSError (ENOSPC), naming the file."""
    try:
        with open(path, "wb") as f:
            recorder = _WriteRecorder(f)
            try:
                torch.save(obj, recorder)
            except RuntimeError:
                if recorder.error is None:
                    raise
                raise recorder.error from None
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from None


@contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Re-raise a write failure that a library reports in its own type (safetensors: "... (os
    error 28)") as the OSError behind it: a full disk then ends with one line, not a traceback."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        match = re.search(r"os error (\d+)", str(exc))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def _remove_dir(path: Path) -> None:
    """Delete a directory so that an interruption leaves a hidden ``.tmp-*`` name, never a part."""
    trash = path.with_name(f".tmp-del-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


class Checkpointer:
    """Writes, lists and prunes ``root/step-*``; every process takes part in a save.

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        root: the checkpoints folder (``OUT/checkpoints``).
        keep_last: complete checkpoints kept (0: all).
        ema: the run's :class:`~aimkit.training.ema.EMA` (saved as ``ema.safetensors``), or None.
    """

    def __init__(self, accelerator, root: Path, keep_last: int, ema=None):
        self.acc, self.root, self.keep_last, self.ema = accelerator, root, keep_last, ema
        self.last: Path | None = None  # the newest checkpoint written or resumed from

    def save(self, step: int, gen, optimizer, scheduler, state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` into ``.tmp-step-*`` and rename it; on any error the temporary
        directory is removed and the older checkpoints stay as they were."""
        check_finite(gen, step, self.last, "the checkpoint")
        acc, main = self.acc, self.acc.is_main_process
        final = self.root / f"{_PREFIX}{step:08d}"
        tmp = self.root / f".tmp-{_PREFIX}{step:08d}"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            _write_torch(rng_state(), tmp / f"rng-{acc.process_index:05d}.pt")
            if main:
                self._write_shared(tmp, step, gen, optimizer, scheduler)
            acc.wait_for_everyone()
            if main:
                self._publish(tmp, final, state)
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        acc.wait_for_everyone()
        self.last = final
        return final

    def _write_shared(self, tmp: Path, step: int, gen, optimizer, scheduler) -> None:
        """The files the main process writes: weights, optimizer, schedule, loss scaler."""
        from .. import weights

        with disk_errors(tmp / "model.safetensors"):
            weights.save_safetensors_atomic(gen.generator_state_dict(), tmp / "model.safetensors",
                                            metadata={"step": step})
        _write_torch(optimizer.state_dict(), tmp / "optimizer.pt")
        _write_torch(scheduler.state_dict(), tmp / "scheduler.pt")
        if self.ema is not None:
            with disk_errors(tmp / EMA_FILE):
                weights.save_safetensors_atomic(self.ema.state_dict(), tmp / EMA_FILE, metadata={"step": step})
        if self.acc.scaler is not None:
            _write_torch(self.acc.scaler.state_dict(), tmp / "scaler.pt")

    def _publish(self, tmp: Path, final: Path, state: dict[str, Any]) -> None:
        """Record every file's size and checksum (trainer_state.json last), flush, rename."""
        write_text_atomic(tmp / STATE_NAME, json.dumps(dict(state, files=_file_records(tmp)), indent=1) + "\n")
        fsync_tree(tmp)
        if final.exists():  # the same step again, after a resume from an older checkpoint
            _remove_dir(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        write_text_atomic(self.root / "latest", final.name + "\n")
        self._prune(final)

    def set_aside_later(self, step: int) -> list[Path]:
        """Rename the checkpoints numbered after ``step`` (left by a branch that a resume from an
        older checkpoint abandons) to ``abandoned-step-*``, so that ``--resume auto`` never goes back
        to them; nothing is deleted. Main process only; returns the new names."""
        moved: list[Path] = []
        if not self.acc.is_main_process:
            return moved
        for path in _step_dirs(self.root):
            if _number(path) <= step:
                continue
            target, i = path.with_name(f"abandoned-{path.name}"), 1
            while target.exists():
                target, i = path.with_name(f"abandoned-{path.name}-{i}"), i + 1
            os.replace(path, target)
            moved.append(target)
        if moved:
            fsync_dir(self.root)
        return moved

    def _prune(self, newest: Path) -> None:
        """Keep the ``keep_last`` newest complete checkpoints up to ``newest`` (later-numbered ones
        were set aside when the run resumed, :meth:`set_aside_later`)."""
        limit = _number(newest)
        done = [p for p in reversed(_step_dirs(self.root)) if _number(p) <= limit and _is_complete(p)]
        for old in done[: max(0, len(done) - self.keep_last)] if self.keep_last else []:
            _remove_dir(old)
        for stale in self.root.glob(".tmp-*"):  # left behind by an interrupted save or removal
            shutil.rmtree(stale, ignore_errors=True)
