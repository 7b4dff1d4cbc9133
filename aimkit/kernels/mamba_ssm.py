"""Lazy, cached access to the kernels of operation ``scan``: mamba-ssm's and causal-conv1d's.

The reference of the scan is :func:`aimkit.kernels.ssd.ssd_chunked` (and the mixer's PyTorch
convolution and :class:`~aimkit.backbones.mamba2.GatedRMSNorm`). Nothing here is imported until
:func:`load_kernels` is first called, and the Mamba2 mixer only calls it when its policy picks the
kernel for CUDA inputs, so CPU code never imports mamba-ssm, causal-conv1d or Triton.

Kernels used (mamba-ssm >= 2.x, causal-conv1d >= 1.4):

* ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``: chunked scan, forward + backward.
* ``mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn``: the gated RMSNorm.
* ``causal_conv1d.causal_conv1d_fn``: optional, the prefill / training convolution; without it
  the mixer uses its PyTorch depthwise convolution. ``causal_conv1d_update`` is loaded and
  reported but not used: it shifts its window, while aimkit's decode step keeps the convolution
  state as a ring buffer by position (:mod:`aimkit.backbones.mamba2`).
* ``mamba_ssm.ops.triton.ssd_combined.mamba_split_conv1d_scan_combined``: the whole mixer after
  ``in_proj`` as one autograd function (``ExecutionPolicy.split_scan``, on by default; calls
  causal-conv1d).

The decode step does not use mamba-ssm: its state update is aimkit's own kernel
(:mod:`aimkit.kernels.ssm_step`) or the PyTorch recurrence (:func:`aimkit.kernels.ssd.ssd_recurrent_step_`).

Triton-only installs. mamba-ssm 2.3.2.post1 imports its compiled ``selective_scan_cuda``
extension unconditionally in ``mamba_ssm/__init__.py``, so a build made without its CUDA
extension (``MAMBA_SKIP_CUDA_BUILD=TRUE``) fails at ``import mamba_ssm`` even though the Triton
kernels above need nothing compiled. The loader first imports the Triton submodules normally.
Only if that fails with an ImportError for the module named ``selective_scan_cuda`` does it put a
bare package object for ``mamba_ssm`` into ``sys.modules`` (built from the installed package's
spec, with its ``__path__``, without running ``__init__``) and import the Triton submodules
through it. Consequences: ``mamba_ssm.Mamba`` (Mamba-1, which needs the compiled extension
anyway), ``mamba_ssm.Mamba2`` and the other names ``mamba_ssm/__init__.py`` would export are not
available as package attributes in that process; their submodules can still be imported. With a
full build installed the normal import succeeds and this workaround never runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Any

__all__ = ["MambaKernels", "kernel_info", "kernels_available", "load_kernels"]

_COMPILED_EXTENSION = "selective_scan_cuda"
_SSD_MODULE = "mamba_ssm.ops.triton.ssd_combined"
_NORM_MODULE = "mamba_ssm.ops.triton.layernorm_gated"


@dataclass(frozen=True)
class MambaKernels:
    """The kernel entry points found; the causal-conv1d pair is None when not installed."""

    mamba_chunk_scan_combined: Callable[..., Any]
    rmsnorm_fn: Callable[..., Any]
    causal_conv1d_fn: Callable[..., Any] | None = None
    causal_conv1d_update: Callable[..., Any] | None = None
    mamba_split_conv1d_scan_combined: Callable[..., Any] | None = None  # needs causal-conv1d


_lock = threading.Lock()
_loaded = False
_kernels: MambaKernels | None = None
_status: dict[str, Any] = {}


def _missing_module(exc: BaseException) -> str | None:
    """The module name an ImportError is about (None when it names none)."""
    return getattr(exc, "name", None) if isinstance(exc, ImportError) else None


def _install_bare_package() -> None:
    """Register ``mamba_ssm`` in ``sys.modules`` without executing its ``__init__``."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("mamba_ssm is not an installed package", name="mamba_ssm")
    package = importlib.util.module_from_spec(spec)
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["mamba_ssm"] = package


def _link_loaded_submodules(root: str = "mamba_ssm") -> None:
    """Set ``parent.child`` attributes for submodules already in ``sys.modules``.

    Submodules imported during the failed ``import mamba_ssm`` stay in ``sys.modules`` while their
    parent was dropped; the bare package would otherwise lack them as attributes.
    """
    for name in sorted(n for n in list(sys.modules) if n.startswith(root + ".")):
        parent_name, _, child = name.rpartition(".")
        parent = sys.modules.get(parent_name)
        module = sys.modules.get(name)
        if isinstance(parent, ModuleType) and module is not None and not hasattr(parent, child):
            setattr(parent, child, module)


def _import_triton_ops() -> dict[str, ModuleType]:
    """Import the two Triton submodules, falling back to a bare package (see module docs)."""
    names = (_SSD_MODULE, _NORM_MODULE)
    try:
        return {name: importlib.import_module(name) for name in names}
    except ImportError as exc:
        if _missing_module(exc) != _COMPILED_EXTENSION:
            raise
    _install_bare_package()
    _status["bare_package"] = True
    modules = {name: importlib.import_module(name) for name in names}
    _link_loaded_submodules()
    return modules


# Triton's on-disk cache of autotuning results (knob ``TRITON_CACHE_AUTOTUNING``): mamba-ssm's
# scan kernels autotune on their first call in every process (most of a training run's first step,
# 77-106 s for AiM-B on an H200, docs/benchmarks.md); cached, a later process reuses the choices.
# Set only when the user has not set it, and before mamba-ssm is imported: each ``triton.autotune``
# object reads it when the module defining the kernel builds it. Results are keyed by kernel
# source, arguments and device.
_AUTOTUNE_CACHE_ENV = "TRITON_CACHE_AUTOTUNING"


def _load() -> MambaKernels | None:
    _status.update(bare_package=False, error=None)
    try:
        if importlib.util.find_spec("mamba_ssm") is not None:  # each autotuner reads it when it is built
            os.environ.setdefault(_AUTOTUNE_CACHE_ENV, "1")
        mods = _import_triton_ops()
        ssd, norm = (mods[n] for n in (_SSD_MODULE, _NORM_MODULE))
        found = {
            "mamba_chunk_scan_combined": ssd.mamba_chunk_scan_combined,
            "rmsnorm_fn": norm.rmsnorm_fn,
            "mamba_split_conv1d_scan_combined": getattr(ssd, "mamba_split_conv1d_scan_combined", None),
        }
    except Exception as exc:  # noqa: BLE001  (not installed, or broken: fall back to PyTorch)
        _status["error"] = f"{type(exc).__name__}: {exc}"
        if _missing_module(exc) != "mamba_ssm":  # installed but unusable: say so once
            # stacklevel 3: past _load and load_kernels, at the code that asked for the kernels
            warnings.warn(f"mamba-ssm kernels unavailable, using the PyTorch path ({_status['error']})", stacklevel=3)
        return None
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update

        found.update(causal_conv1d_fn=causal_conv1d_fn, causal_conv1d_update=causal_conv1d_update)
    except Exception as exc:  # noqa: BLE001  (optional: the mixer has a PyTorch convolution)
        _status["causal_conv1d_error"] = f"{type(exc).__name__}: {exc}"
    return MambaKernels(**found)


def load_kernels() -> MambaKernels | None:
    """The kernels, imported on the first call and cached; None when mamba-ssm is unusable."""
    global _loaded, _kernels
    if not _loaded:
        with _lock:
            if not _loaded:
                _kernels = _load()
                _loaded = True
    return _kernels


def kernels_available() -> bool:
    """Whether the mamba-ssm Triton kernels can be used (imports them on the first call)."""
    return load_kernels() is not None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def kernel_info() -> dict[str, Any]:
    """What was found, for benchmark records.

    Returns:
        ``{"available", "versions": {mamba-ssm, causal-conv1d, triton, torch}, "kernels":
        {name: bool}, "bare_package": bool, "error": str | None, ...}``.
    """
    kernels = load_kernels()
    names = ("mamba_chunk_scan_combined", "rmsnorm_fn",
             "causal_conv1d_fn", "causal_conv1d_update", "mamba_split_conv1d_scan_combined")
    return {
        "available": kernels is not None,
        "versions": {d: _version(d) for d in ("mamba-ssm", "causal-conv1d", "triton", "torch")},
        "kernels": {n: kernels is not None and getattr(kernels, n) is not None for n in names},
        # Triton's on-disk autotuning results, as set when mamba-ssm was imported
        "autotune_cache": os.environ.get(_AUTOTUNE_CACHE_ENV),
        **_status,
    }


def _reset_for_tests() -> None:
    """Forget the cached result so the next call imports again (tests only)."""
    global _loaded, _kernels
    with _lock:
        _loaded, _kernels = False, None
        _status.clear()
