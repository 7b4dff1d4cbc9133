"""What stops a training run, and the collectives that make every process stop together:
signals (SIGTERM / SIGINT), non-finite parameters, replicas that drifted apart."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

from ..errors import AimkitError

__all__ = ["StopSignal", "TrainingStopped", "all_ok", "check_finite", "check_replicas", "param_fingerprint",
           "signal_on_any_process"]


class TrainingStopped(AimkitError):
    """The run cannot continue (too many non-finite steps, diverged replicas, non-finite weights)."""


class StopSignal:
    """Remember SIGTERM / SIGINT so the loop can checkpoint and exit; a second SIGINT aborts."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self) -> StopSignal:
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def signal_on_any_process(accelerator, received: int | None) -> int:
    """The signal any process received (0: none), on every process, so that all join one save."""
    if accelerator.num_processes == 1:
        return received or 0
    t = torch.tensor([received or 0], dtype=torch.int64, device=accelerator.device)
    return int(accelerator.gather(t).max().item())


def all_ok(accelerator, ok: bool) -> bool:
    """``ok`` on every process (a collective when there are several)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int64, device=accelerator.device)
    return bool(accelerator.gather(flag).min().item())


def check_finite(gen: torch.nn.Module, step: int, last: Path | None, what: str) -> None:
    """Raise :class:`TrainingStopped` when a parameter holds NaN or inf (``what`` is not written)."""
    from ..weights import first_nonfinite

    found = first_nonfinite((name, p.detach()) for name, p in gen.named_parameters())
    if found is not None:
        raise TrainingStopped(
            f"step {step}: parameter {found[0]} is not finite (NaN or inf), so {what} was not written; "
            f"the last good checkpoint is {last if last else 'none (no checkpoint yet)'}; "
            "lower the lr or the weight_decay, or check the data"
        )


def param_fingerprint(module: torch.nn.Module) -> int:
    """A 56-bit hash of every tensor of ``module``'s state dict (equal iff bitwise equal, w.h.p.):
    the head of :func:`aimkit.weights.state_dict_fingerprint`, small enough for an int64 gather."""
    from ..weights import state_dict_fingerprint

    return int(state_dict_fingerprint(module)[:14], 16)


def check_replicas(accelerator, gen: torch.nn.Module, step: int) -> list[int]:
    """Every process's :func:`param_fingerprint`; raises :class:`TrainingStopped` when they differ."""
    fp = torch.tensor([param_fingerprint(gen)], dtype=torch.int64, device=accelerator.device)
    prints = [int(x) for x in accelerator.gather(fp).tolist()]
    if len(set(prints)) > 1:
        raise TrainingStopped(f"step {step}: parameters differ across processes (fingerprints {prints})")
    return prints
