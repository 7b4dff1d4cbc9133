"""``torch.compile`` for the small element-wise regions of a training step, with a safe fallback.

A training step of an AiM model spends a third of its GPU time in short chains of element-wise
kernels and reductions (residual add, RMSNorm, adaLN modulation, gate, the float32 cast in the
loss) that eager PyTorch runs one kernel at a time, forward and backward (`benchmarks/notes.md`).
Inductor fuses each such region into one or two kernels per direction. Compiling only these pure
functions, not the whole model, keeps the compile short (seconds) and leaves the mamba-ssm
kernels, the GEMMs and CUDA-graph capture as they are.

:class:`TrainCompiled` wraps one such function. It compiles for CUDA inputs while autograd is on
(training), runs the plain function everywhere else, and falls back to the plain function for
good, with one warning, if the first compiled call fails (no working Inductor toolchain).

Switch: the environment variable ``AIMKIT_TRAIN_COMPILE`` (read at every call):

* unset or ``auto``: compile every region (:data:`REGIONS`) for CUDA inputs with autograd on;
* ``never``: never compile (the plain functions: identical maths, more kernels);
* a comma list of regions, e.g. ``glue,loss``: only those (for comparing them one by one).

Regions: ``glue`` (residual add, RMSNorm and modulation between sublayers) and ``loss`` (the
float32 cross-entropy). Mamba2's gated RMSNorm compiled the same way was measured no faster than
mamba-ssm's Triton norm (AiM-L CUDA-graph step 157.0 against 156.8 ms, benchmarks/notes.md).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Optional

import torch

__all__ = ["REGIONS", "TrainCompiled", "compile_enabled"]

_ENV = "AIMKIT_TRAIN_COMPILE"
REGIONS = ("glue", "loss")


def compile_enabled(region: Optional[str] = None) -> bool:
    """Whether ``AIMKIT_TRAIN_COMPILE`` allows compiling ``region`` (None: any region)."""
    if region is not None and region not in REGIONS:
        raise ValueError(f"unknown compile region {region!r}; known: {list(REGIONS)}")
    value = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if value == "auto":
        return True
    if value == "never":
        return False
    chosen = {r.strip() for r in value.split(",") if r.strip()}
    unknown = chosen - set(REGIONS)
    if unknown:
        raise ValueError(f"{_ENV}={value!r}: use 'auto', 'never' or a comma list of {list(REGIONS)}; "
                         f"unknown: {sorted(unknown)}")
    return bool(chosen) if region is None else region in chosen


class TrainCompiled:
    """``fn`` compiled by ``torch.compile`` when it runs on CUDA tensors in a training step.

    Args:
        fn: a pure tensor function (no Python side effects, no data-dependent control flow).
        region: its name in ``AIMKIT_TRAIN_COMPILE`` (one of :data:`REGIONS`).
        backend: the ``torch.compile`` backend (``"inductor"``; tests use ``"aot_eager"``).

    Calling the wrapper runs the compiled function when ``device`` is a CUDA device (any device
    for a backend other than Inductor), autograd is enabled and :func:`compile_enabled` for its region; otherwise
    ``fn`` itself. Shapes are compiled statically (``dynamic=False``): a training run sees one or
    two batch shapes. The fallback covers the forward compile only: AOTAutograd compiles the
    backward at the first ``backward()``, and an error there is raised from that call.
    """

    def __init__(self, fn: Callable[..., Any], region: str, backend: str = "inductor"):
        if region not in REGIONS:
            raise ValueError(f"unknown compile region {region!r}; known: {list(REGIONS)}")
        self.fn = fn
        self.region = region
        self.backend = backend
        self._compiled: Optional[Callable[..., Any]] = None
        self._proven = False  # a compiled call has succeeded: errors from now on are the caller's
        self._failed = False

    def wants_compile(self, device: torch.device) -> bool:
        """Whether a call on ``device`` would use the compiled function."""
        return (device.type == "cuda" or self.backend != "inductor") and torch.is_grad_enabled() \
            and not self._failed and compile_enabled(self.region)

    def __call__(self, device: torch.device, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, compiled where :meth:`wants_compile` says so."""
        if torch.compiler.is_compiling() or not self.wants_compile(device):
            return self.fn(*args, **kwargs)  # (inside a whole-model compile: traced with the rest)
        if self._compiled is None:  # torch.compile only wraps: compiling happens at the first call
            self._compiled = torch.compile(self.fn, backend=self.backend, dynamic=False, fullgraph=True)
        if self._proven:
            return self._compiled(*args, **kwargs)
        try:
            out = self._compiled(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001  (Inductor unusable here: the plain function is complete)
            self._failed = True
            warnings.warn(f"torch.compile of {getattr(self.fn, '__name__', self.fn)} failed "
                          f"({type(exc).__name__}: {str(exc)[:300]}); using the uncompiled function. "
                          f"Set {_ENV}=never to skip the attempt.")
            return self.fn(*args, **kwargs)
        self._proven = True
        return out
