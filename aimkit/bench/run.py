"""One ``aimkit bench`` run: check the options, measure the device, plan the rows, run them.

Rows run in priority order, each in its own ``try`` (one out-of-memory row does not lose the
table); ``bench.json`` and ``bench.md`` are rewritten after every row; a time budget stops
starting new rows.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ._recorder import Recorder
from .options import SUITES, BenchOptions
from .plots import plots
from .report import compact_table, fmt, load_reference, row_floor
from .rows import CORRECTNESS_TOLERANCE, correctness_check, decode_row, sampling_row
from .timing import free_memory, measure_device
from .train_rows import train_row

__all__ = ["plan", "run"]

Job = tuple[str, Any]


def _sampling_jobs(opts: BenchOptions) -> list[Job]:
    """The sampling grid (all batches of one model share a build), then the comparison's extra rows."""
    backbones = ["mamba2"] + (["transformer"] if opts.transformer else [])
    jobs: list[Job] = [("sampling", (name, backbone, tuple(opts.batches), tokens))
                       for name in opts.models for backbone in backbones for tokens in opts.tokens]
    done = {(name, b, batch, tokens) for name in opts.models for b in backbones
            for batch in opts.batches for tokens in opts.tokens}
    for name in opts.compare_models:
        for backbone in ("mamba2", "transformer"):
            for tokens in opts.compare_tokens:
                batches = tuple(b for b in opts.compare_batches if (name, backbone, b, tokens) not in done)
                if batches:
                    jobs.append(("sampling", (name, backbone, batches, tokens)))
    return jobs


def plan(opts: BenchOptions) -> list[Job]:
    """Row jobs of resolved ``opts`` in priority order (the budget cuts the tail)."""
    jobs: list[Job] = _sampling_jobs(opts) if opts.wants("sampling") else []
    if opts.wants("decode"):
        jobs += [("decode", (name, batch)) for name in opts.decode_models for batch in opts.decode_batches]
    if opts.wants("train"):
        modes = ("eager", "layer-graphs", "cuda-graph") if opts.device.startswith("cuda") else ("eager",)
        jobs += [("train", (name, mode)) for name in opts.train_models for mode in modes]
    return jobs


def _check_options(opts: BenchOptions) -> torch.device:
    if opts.suite not in SUITES:
        raise ConfigError(f"unknown suite {opts.suite!r}; choose sampling, decode, train or all")
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("no CUDA device; pass --device cpu for a (slow, small) CPU run")
    if not isinstance(getattr(torch, opts.dtype, None), torch.dtype):
        raise ConfigError(f"unknown dtype {opts.dtype!r}")
    return device


def _over_budget(opts: BenchOptions, report: Recorder) -> bool:
    return bool(opts.budget_s) and report.elapsed() > opts.budget_s


def _device_row(opts: BenchOptions, device: torch.device, report: Recorder) -> bool:
    """Measure the device; False when the run must stop (CUDA without kernels, ``require_kernels``)."""
    facts = report.data["device"] = measure_device(device, getattr(torch, opts.dtype))
    report.save()
    report.log(f"device {facts.get('gpu') or facts.get('cpu')}: copy {facts['copy_bandwidth'] / 1e12:.3g} TB/s, "
               f"{facts['matmul_dtype']} matmul {facts['matmul_flops'] / 1e12:.3g} TFLOP/s, kernels "
               f"{facts['kernels'].get('available')}, mamba-ssm {facts['mamba-ssm']}, "
               f"causal-conv1d {facts['causal-conv1d']}")
    report.log(f"policy {opts.policy.describe()}; resolved {opts.policy.resolved(device)}")
    if device.type == "cuda" and not facts["kernels"].get("available"):
        report.log("WARNING: mamba-ssm kernels unavailable: Mamba2 rows measure the PyTorch path "
                   f"({facts['kernels'].get('error')})")
        if opts.require_kernels:
            report.log("aborting (--require-kernels)")
            return False
    return True


def _correctness_row(opts: BenchOptions, report: Recorder) -> int:
    """The correctness check; returns the exit status so far (1 when it failed)."""
    chk = report.data["correctness"] = correctness_check(opts, report)
    report.save()
    if chk.get("passed"):
        report.log(f"correctness: forward {chk['forward_rel_err']:.2e}, decode {chk['decode_rel_err']:.2e} (ok)")
        return 0
    report.log("!" * 72)
    report.log(f"CORRECTNESS FAILED: forward {chk.get('forward_rel_err')}, decode {chk.get('decode_rel_err')} "
               f"(tolerance {CORRECTNESS_TOLERANCE}) {chk.get('error', '')}")
    report.log("!" * 72)
    return 1


def _run_sampling(job: tuple, opts: BenchOptions, report: Recorder) -> None:
    """Every batch of one (model, backbone, tokens), the model built once (again after an OOM)."""
    name, backbone, batches, tokens = job
    device, model = torch.device(opts.device), None
    for batch in batches:
        if _over_budget(opts, report):
            report.skip(f"sampling {name} {backbone} {batch} {tokens}")
            continue
        report.log(f"sampling {name} {backbone} batch {batch} tokens {tokens}")
        row, model = sampling_row(name, backbone, batch, tokens, opts, report.data["device"], report, model)
        _add(report, row)
        if row["status"] == "oom":
            model = None  # rebuild after an OOM so the next row starts clean
        free_memory(device)
    del model


def _run_job(kind: str, job: tuple, opts: BenchOptions, report: Recorder) -> None:
    facts = report.data["device"]
    if kind == "sampling":
        _run_sampling(job, opts, report)
    elif kind == "decode":
        report.log(f"decode step {job[0]} batch {job[1]}")
        _add(report, decode_row(*job, opts, facts, report))
    else:
        report.log(f"train {job[0]} ({job[1]}) batch {opts.train_batch} x {opts.tokens[0]}")
        _add(report, train_row(job[0], opts, facts, report, mode=job[1]))


def _finish(report: Recorder) -> None:
    """Plots, the last save, and the compact table (printed last)."""
    report.data["plots"] = plots(report.data, report.out)
    report.save()
    report.log("wrote " + ", ".join(["bench.json", "bench.md", "bench.log"] + report.data["plots"]))
    table = compact_table(report.data)
    report.log_file.write(table + "\n")
    report.close()
    print(table, flush=True)


def run(opts: BenchOptions) -> int:
    """Run the benchmark; returns the exit status (1 when the correctness check fails, 3 when
    ``require_kernels`` stops it on CUDA).

    Raises:
        FolderBusyError: another run holds the output folder (nothing in it is touched).
    """
    opts = opts.resolved()
    device = _check_options(opts)
    reference = load_reference(opts.reference) if opts.reference else None
    report = Recorder(opts)  # holds the output folder until closed
    try:
        return _run_all(opts, device, report, reference)
    finally:
        report.close()


def _run_all(opts: BenchOptions, device: torch.device, report: Recorder, reference: Any) -> int:
    """The rows of :func:`run`, recorded in ``report``; the exit status."""
    report.data["reference"] = reference
    report.log(f"aimkit bench: suite {opts.suite}, out {report.out}")
    if not _device_row(opts, device, report):
        return 3
    status = _correctness_row(opts, report) if opts.check else 0
    for kind, job in plan(opts):
        if _over_budget(opts, report):
            report.log(f"budget of {opts.budget_s:.0f} s spent: skipping {kind} {job}")
            report.skip(f"{kind} {job}")
            continue
        _run_job(kind, job, opts, report)
        free_memory(device)
    _finish(report)
    return status


def _add(report: Recorder, row: dict[str, Any]) -> None:
    """Record ``row`` and log its headline figures."""
    report.add(row)
    if row["status"] != "ok":
        return
    f = row_floor(row)
    if row["suite"] == "sampling":
        report.log(f"  {row['seconds_per_batch']:.3f} s/batch, {row['images_per_s']:.1f} img/s, first "
                   f"{row['first_call_s']:.1f} s, floor {f['seconds']:.3f} s ({f['bound']}), "
                   f"fraction {row['fraction_of_floor']:.3f}, peak {fmt(row['peak_memory_gb'], '.1f')} GB")
    elif row["suite"] == "decode":
        report.log(f"  step {row['step_s'] * 1e3:.3f} ms, floor {f['seconds'] * 1e3:.3f} ms, "
                   f"fraction {row['fraction_of_floor']:.3f}")
    else:
        report.log(f"  step {row['step_s']:.3f} s, {row['tokens_per_s']:,.0f} tok/s, {row['model_tflops']:.3g} "
                   f"TFLOP/s, MFU {row['mfu']:.1%}, peak {fmt(row['peak_memory_gb'], '.1f')} GB")
