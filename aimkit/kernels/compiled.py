"""``torch.compile`` for the small element-wise regions of a training step, with a safe fallback.

A training step of an AiM model spends much of its GPU time in short chains of element-wise
kernels and reductions (residual add, RMSNorm, adaLN modulation, gate, the float32 cast in the
loss) that eager PyTorch runs one kernel at a time, forward and backward (``docs/benchmarks.md``).
Inductor fuses each such region into one or two kernels per direction. Compiling only these pure
functions, not the whole model, keeps the compile short (seconds) and leaves the mamba-ssm
kernels, the GEMMs and CUDA-graph capture as they are.

:class:`TrainCompiled` wraps one such function; the reference is the function itself. Whether a
call uses it is the caller's decision, made from its :class:`~aimkit.policy.ExecutionPolicy`
(``compile_glue`` in :class:`~aimkit.backbones.base.Backbone`, ``compile_loss`` in the
generator's loss): nothing here reads the environment. The wrapper compiles for CUDA inputs, runs
the plain function everywhere else, and falls back to the plain function for good, with one
warning, if the first compiled call fails (no working Inductor toolchain).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["RECOMPILE_LIMIT", "TrainCompiled"]

RECOMPILE_LIMIT = 64  # specialisations (shapes x dtypes x grad modes) one wrapped function may compile


class TrainCompiled:
    """``fn`` compiled by ``torch.compile`` for CUDA tensors, with an eager fallback.

    Args:
        fn: a pure tensor function (no Python side effects, no data-dependent control flow).
        name: what it is, for messages (default: ``fn.__name__``).
        backend: the ``torch.compile`` backend (``"inductor"``; tests use ``"aot_eager"``, or a
            callable backend).

    Calling the wrapper with a ``device`` runs the compiled function when that device is a CUDA
    device (any device for a backend other than Inductor); otherwise ``fn`` itself. Shapes are
    compiled statically (``dynamic=False``): a training run sees one or two batch shapes. The
    fallback covers the forward compile only: AOTAutograd compiles the backward at the first
    ``backward()``, and an error there is raised from that call.
    """

    def __init__(self, fn: Callable[..., Any], name: str | None = None,
                 backend: str | Callable[..., Any] = "inductor"):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", repr(fn))
        self.backend = backend
        self._compiled: Callable[..., Any] | None = None
        self._proven = False  # a compiled call has succeeded: errors from now on are the caller's
        self._failed = False
        self._warned_limit = False

    def __repr__(self) -> str:
        return f"TrainCompiled({self.name}, backend={self.backend!r})"

    def wants_compile(self, device: torch.device) -> bool:
        """Whether a call on ``device`` would use the compiled function."""
        return (device.type == "cuda" or self.backend != "inductor") and not self._failed

    def __call__(self, device: torch.device, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, compiled where :meth:`wants_compile` says so."""
        if torch.compiler.is_compiling() or not self.wants_compile(device):
            return self.fn(*args, **kwargs)  # (inside a whole-model compile: traced with the rest)
        if self._compiled is None:  # torch.compile only wraps: compiling happens at the first call
            self._compiled = torch.compile(self.fn, backend=self.backend, dynamic=False, fullgraph=True)
        if self._proven:
            return self._call_proven(*args, **kwargs)
        try:
            out = self._call_compiled(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001  (Inductor unusable here: the plain function is complete)
            self._failed = True
            warnings.warn(f"torch.compile of {self.name} failed ({type(exc).__name__}: {str(exc)[:300]}); "
                          "using the uncompiled function. Build with a policy that has compile_glue / "
                          "compile_loss false to skip the attempt.", stacklevel=2)
            return self.fn(*args, **kwargs)
        self._proven = True
        return out

    def _call_compiled(self, *args: Any, **kwargs: Any) -> Any:
        """The compiled function, allowed :data:`RECOMPILE_LIMIT` specialisations (shapes, dtypes,
        grad mode: one process that trains, evaluates and samples several models meets many)."""
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        with config.patch(**{name: max(getattr(config, name), RECOMPILE_LIMIT)}):
            return self._compiled(*args, **kwargs)

    def _call_proven(self, *args: Any, **kwargs: Any) -> Any:
        """A call after a compiled call succeeded: errors are the caller's, except running out of
        specialisations, where this call (and the rest beyond the limit) runs the plain function."""
        try:
            return self._call_compiled(*args, **kwargs)
        except Exception as exc:
            if "recompile" not in f"{type(exc).__name__} {exc}".lower():
                raise
            if not self._warned_limit:
                self._warned_limit = True
                warnings.warn(f"torch.compile of {self.name}: more than {RECOMPILE_LIMIT} specialisations in "
                              "this process; calls beyond them run uncompiled", stacklevel=3)
            return self.fn(*args, **kwargs)
