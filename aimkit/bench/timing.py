"""Timing on any device, peak memory, and the device's two measured ceilings (copy and matmul rate)."""

from __future__ import annotations

import datetime as _dt
import gc
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch

__all__ = ["device_facts", "free_memory", "measure_device", "peak_gb", "reset_peak", "time_call", "time_calls"]

GB = 1e9


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """``(seconds, result)`` of one call: CUDA events on the GPU, a host clock after a sync elsewhere."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return [time_call(fn, device)[0] for _ in range(repeats)]


def graphed_call_seconds(fn: Callable[[], Any], calls: int = 20, replays: int = 10) -> float:
    """Median device seconds per call of ``fn``, replayed from one CUDA graph of ``calls`` calls
    (launch overhead removed, as inside a captured decode step); CUDA only."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, allocations) outside the capture
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return statistics.median(time_calls(graph.replay, torch.device("cuda"), replays, warmup=1)) / calls


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """Peak allocated GB since :func:`reset_peak` (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    """Drop captured decode graphs and cached blocks between rows."""
    from ..samplers import clear_decode_graphs

    clear_decode_graphs()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def copy_rate(device: torch.device, numel: int, repeats: int) -> tuple[int, float]:
    """``(bytes, bytes/s)`` of a float32 copy of ``numel`` random elements, read + write counted."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = time_calls(lambda: dst.copy_(src), device, repeats, warmup=3)
    nbytes = 2 * src.numel() * src.element_size()
    return nbytes, nbytes / statistics.median(times)


_CPU_MATMUL_SECONDS = 0.05  # target duration of one CPU product of measure_device
_CPU_MATMUL_SIZES = (1024, 512, 256, 128)


def _cpu_matmul_size(dtype: torch.dtype) -> int:
    """The largest of :data:`_CPU_MATMUL_SIZES` whose ``dtype`` product should take at most
    :data:`_CPU_MATMUL_SECONDS` at the rate of a 128^3 probe (the smallest size whatever the rate)."""
    probe = _CPU_MATMUL_SIZES[-1]
    rate = matmul_rate(torch.device("cpu"), probe, dtype, repeats=3)
    return next((n for n in _CPU_MATMUL_SIZES if 2 * n**3 / rate <= _CPU_MATMUL_SECONDS), probe)


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of an ``n^3`` product of random ``dtype`` matrices (never zeros: they run faster)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_calls(lambda: a @ b, device, repeats, warmup=3)
    return 2 * n**3 / statistics.median(times)


def device_facts(device: torch.device) -> dict[str, Any]:
    """Date, host, versions, the device and whether the mamba-ssm kernels can be imported."""
    from .. import __version__

    facts: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "aimkit": __version__,
        "triton": _version("triton"),
        "mamba-ssm": _version("mamba-ssm"),
        "causal-conv1d": _version("causal-conv1d"),
    }
    if device.type == "cuda":
        from ..kernels.mamba_ssm import kernel_info

        prop = torch.cuda.get_device_properties(device)
        facts.update(gpu=prop.name, gpu_memory_gb=prop.total_memory / GB, sm_count=prop.multi_processor_count,
                     capability=f"{prop.major}.{prop.minor}")
        info = kernel_info()
        facts["kernels"] = {k: info.get(k) for k in ("available", "kernels", "bare_package", "error",
                                                     "causal_conv1d_error")}
    else:
        facts.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
        facts["kernels"] = {"available": False, "error": "CPU run: PyTorch path"}
    return facts


def measure_device(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> dict[str, Any]:
    """:func:`device_facts` and the two measured ceilings.

    Copy bandwidth: a 1 GiB device-to-device copy (64 MiB on the CPU), bytes read + written,
    median of ``repeats``. Matmul rate: an 8192^3 product on CUDA of random ``dtype`` matrices,
    median of ``repeats``; on the CPU the largest power-of-two size up to 1024 whose product takes
    about :data:`_CPU_MATMUL_SECONDS` (:func:`_cpu_matmul_size`), so that a host without fast
    ``dtype`` instructions (bf16 on many CPUs runs at ~1 GFLOP/s) is measured in well under a
    second, not in minutes. ``dtype`` is the one the rows compute in (bf16 matmuls run several
    times faster than float32 ones on CPUs with bf16 instructions too), so a row is never measured
    against the ceiling of a slower dtype.
    """
    facts = device_facts(device)
    cuda = device.type == "cuda"
    facts["copy_bytes"], facts["copy_bandwidth"] = copy_rate(device, (1 << 28) if cuda else (1 << 24), repeats)
    facts["matmul_n"] = n = 8192 if cuda else _cpu_matmul_size(dtype)
    facts["matmul_dtype"] = str(dtype).replace("torch.", "")
    facts["matmul_flops"] = matmul_rate(device, n, dtype, repeats)
    free_memory(device)
    return facts
