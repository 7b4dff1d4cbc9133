"""A run's record as text: Markdown tables for ``docs/benchmarks.md`` and a compact log table.

Both read only the ``bench.json`` data (``options``, ``device``, ``correctness``, ``rows`` and,
when the run was given reference figures, ``reference``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["compact_table", "load_reference", "markdown", "reference_images_per_s"]

_COLUMNS = {
    "sampling": ["model", "backbone", "params", "batch", "tokens", "cache dtype", "s / batch", "images/s",
                 "first call (s)", "peak GB", "floor (s)", "bound", "fraction of floor", "VQ decode (s)",
                 "to disk, 3 batches (img/s)", "status"],
    "decode": ["model", "batch (rows)", "cache dtype", "step (ms)", "floor (ms)", "state GB / step",
               "achieved TB/s", "fraction of floor", "status"],
    "train": ["model", "step", "params", "batch x tokens", "step (s)", "tokens/s",
              "6·N_matmul·tokens/s (TFLOP/s)", "MFU", "peak GB", "status"],
}
_TITLES = {
    "sampling": "## Sampling (tokens only, guidance, median of repeats)",
    "decode": "## One decode step (mid-sequence; CUDA-graph replay where the policy has decode_graph on CUDA)",
    "train": "## Training step (autocast, AdamW, grad clip 1.0)",
}


def load_reference(path: str | Path) -> dict[str, Any]:
    """Reference figures to draw beside a run (e.g. ``docs/data/official_reference.json``).

    The file holds ``{"description": ..., "sampling": [{"model", "batch", "tokens",
    "images_per_s", "source", "date", ...}, ...]}``; every entry is checked for those keys.

    Raises:
        ConfigError: the file cannot be read or an entry lacks a key.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read reference figures {path}: {exc}") from None
    entries = data.get("sampling") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected an object with a 'sampling' list")
    for i, entry in enumerate(entries):
        missing = {"model", "batch", "tokens", "images_per_s", "source", "date"} - set(entry)
        if missing:
            raise ConfigError(f"{path}: sampling entry {i} lacks {sorted(missing)}")
    return {"file": str(path), **data}


def reference_images_per_s(data: dict[str, Any], model: str, tokens: int) -> dict[int, float]:
    """``{batch: images/s}`` of the run's reference figures for ``model`` at ``tokens`` (may be empty)."""
    entries = (data.get("reference") or {}).get("sampling", [])
    return {e["batch"]: e["images_per_s"] for e in entries if e["model"] == model and e["tokens"] == tokens}


def fmt(value: Any, spec: str = ".3g") -> str:
    """``value`` formatted with ``spec`` when a float, ``"-"`` when None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _int(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"


def row_floor(row: dict[str, Any]) -> dict[str, Any]:
    return row.get("floor") or {}


def _scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


def _sampling_cells(r: dict[str, Any]) -> list[Any]:
    f = row_floor(r)
    return [r["model"], r["backbone"], _int(r.get("params")), r["batch"], r["tokens"],
            "/".join(r.get("cache_dtypes", [])) or "-", fmt(r.get("seconds_per_batch"), ".3f"),
            fmt(r.get("images_per_s"), ".1f"), fmt(r.get("first_call_s"), ".1f"),
            fmt(r.get("peak_memory_gb"), ".1f"), fmt(f.get("seconds"), ".3f"), f.get("bound", "-"),
            fmt(r.get("fraction_of_floor"), ".2f"), fmt(r.get("vq_decode_s"), ".3f"),
            fmt(r.get("end_to_end_images_per_s"), ".1f"),
            r["status"] + (f" (end to end: {r['end_to_end_error']})" if r.get("end_to_end_error") else "")]


def _decode_cells(r: dict[str, Any]) -> list[Any]:
    f = row_floor(r)
    return [r["model"], f"{r['batch']} ({r.get('rows', '-')})", "/".join(r.get("cache_dtypes", [])) or "-",
            fmt(_scaled(r.get("step_s"), 1e3), ".3f"), fmt(_scaled(f.get("seconds"), 1e3), ".3f"),
            fmt(r.get("state_gb_per_step"), ".2f"), fmt(_scaled(r.get("achieved_bandwidth"), 1e-12), ".2f"),
            fmt(r.get("fraction_of_floor"), ".2f"), r["status"]]


def _train_cells(r: dict[str, Any]) -> list[Any]:
    mfu = fmt(r.get("mfu"), ".1%") + (" (clamped)" if r.get("mfu_over_ceiling") else "")
    return [r["model"], r.get("mode", "eager"), _int(r.get("params")), f"{r['batch']} x {r['tokens']}",
            fmt(r.get("step_s"), ".3f"), fmt(r.get("tokens_per_s"), ",.0f"), fmt(r.get("model_tflops"), ".3g"),
            mfu, fmt(r.get("peak_memory_gb"), ".1f"), r["status"]]


_CELLS = {"sampling": _sampling_cells, "decode": _decode_cells, "train": _train_cells}


def _device_lines(dev: dict[str, Any]) -> list[str]:
    kern = dev.get("kernels") or {}
    return [
        f"- device: {dev.get('gpu') or dev.get('cpu')} ({dev.get('device')}), {dev.get('date')}",
        f"- torch {dev.get('torch')} (CUDA {dev.get('cuda')}), triton {dev.get('triton')}, "
        f"mamba-ssm {dev.get('mamba-ssm')}, causal-conv1d {dev.get('causal-conv1d')}, aimkit {dev.get('aimkit')}",
        f"- fused kernels: {kern.get('available')}; causal-conv1d kernels: "
        f"{(kern.get('kernels') or {}).get('causal_conv1d_fn')}",
        f"- measured copy bandwidth: {fmt(dev.get('copy_bandwidth', 0) / 1e12, '.3g')} TB/s "
        f"(read + write); measured {dev.get('matmul_dtype')} matmul ({dev.get('matmul_n')}^3): "
        f"{fmt(dev.get('matmul_flops', 0) / 1e12, '.3g')} TFLOP/s",
        "",
    ]


def _policy_lines(data: dict[str, Any]) -> list[str]:
    policy = (data.get("options") or {}).get("policy")
    rows = data.get("rows") or []
    resolved = rows[0].get("policy_resolved") if rows else None
    if not policy:
        return []
    return [f"- execution policy: {', '.join(f'{k}={v}' for k, v in policy.items())}",
            f"- resolved on this device: {', '.join(f'{k}: {v}' for k, v in (resolved or {}).items()) or '-'}", ""]


def _correctness_line(chk: dict[str, Any]) -> str:
    verdict = "passed" if chk.get("passed") else "FAILED"
    return (f"Correctness ({chk.get('model')}, 4 layers, batch {chk.get('batch')}, {chk.get('dtype')} vs CPU "
            f"float32): forward {fmt(chk.get('forward_rel_err'), '.2e')}, "
            f"decode {fmt(chk.get('decode_rel_err'), '.2e')} (tolerance {chk.get('tolerance')}): **{verdict}**"
            + (f" {chk['error']}" if chk.get("error") else ""))


def _mamba2_sampling_row(data: dict[str, Any], model: str, batch: int, tokens: int) -> dict[str, Any] | None:
    """This run's successful Mamba2 sampling row of ``model`` at ``batch`` and ``tokens``, if any."""
    return next((r for r in data.get("rows", []) if r["suite"] == "sampling" and r.get("backbone") == "mamba2"
                 and r["model"] == model and r["batch"] == batch and r["tokens"] == tokens and r["status"] == "ok"),
                None)


def _ratio(ours: float | None, theirs: float | None, spec: str = ".2f") -> str:
    """``ours / theirs`` as ``1.23x``, ``-`` where either is missing."""
    return "-" if not ours or not theirs else format(ours / theirs, spec) + "x"


def _reference_lines(data: dict[str, Any]) -> list[str]:
    """The reference figures, each beside this run's matching row and the ratio (aimkit / reference):
    sampling images/s, VQ decoding seconds (reference / aimkit: > 1 means aimkit is faster) and, for
    reference training entries, tokens/s of each training mode of this run."""
    ref = data.get("reference")
    if not ref:
        return []
    lines = [f"## Reference figures ({ref.get('file')})", "", ref.get("description", ""), "",
             "| model | batch | tokens | reference images/s | aimkit images/s | aimkit / reference | "
             "reference VQ decode s | aimkit VQ decode s | speed-up | aimkit end to end images/s | source | date |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in ref.get("sampling", []):
        ours = _mamba2_sampling_row(data, e["model"], e["batch"], e["tokens"]) or {}
        rate = ours.get("images_per_s")
        lines.append(f"| {e['model']} | {e['batch']} | {e['tokens']} | {e['images_per_s']} | "
                     f"{fmt(rate, '.1f')} | {_ratio(rate, e['images_per_s'])} | "
                     f"{fmt(e.get('vq_decode_s'), '.3f')} | {fmt(ours.get('vq_decode_s'), '.3f')} | "
                     f"{_ratio(e.get('vq_decode_s'), ours.get('vq_decode_s'))} | "
                     f"{fmt(ours.get('end_to_end_images_per_s'), '.1f')} | {e['source']} | {e['date']} |")
    training = ref.get("training") or []
    if training:
        lines += ["", "| model | batch x tokens | reference tokens/s | aimkit mode | aimkit tokens/s | "
                  "aimkit / reference |", "|---|---|---|---|---|---|"]
        for e in training:
            ours = [r for r in data.get("rows", []) if r["suite"] == "train" and r["model"] == e["model"]
                    and r["batch"] == e["batch"] and r["tokens"] == e["tokens"] and r["status"] == "ok"]
            for r in ours or [{}]:
                lines.append(f"| {e['model']} | {e['batch']} x {e['tokens']} | {fmt(e['tokens_per_s'], ',.0f')} | "
                             f"{r.get('mode', '-')} | {fmt(r.get('tokens_per_s'), ',.0f')} | "
                             f"{_ratio(r.get('tokens_per_s'), e['tokens_per_s'])} |")
    return lines + [""]


def markdown(data: dict[str, Any]) -> str:
    """The run as Markdown tables, ready to paste into ``docs/benchmarks.md``."""
    lines = ["# aimkit bench", ""]
    if data.get("device"):
        lines += _device_lines(data["device"])
    lines += _policy_lines(data)
    if data.get("correctness"):
        lines += [_correctness_line(data["correctness"]), ""]
    rows = data.get("rows", [])
    for suite, columns in _COLUMNS.items():
        selected = [r for r in rows if r["suite"] == suite]
        if selected:
            lines += [_TITLES[suite], "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(c) for c in _CELLS[suite](r)) + " |" for r in selected]
            lines.append("")
    lines += _reference_lines(data)
    lines += ["Floors: state (or KV cache) bytes + step weights over the measured copy bandwidth, matmul FLOPs over "
              "the measured matmul rate; the larger one. `fraction of floor` = floor / measured.", ""]
    return "\n".join(lines)


def _compact_figures(r: dict[str, Any]) -> tuple[Any, Any, str, Any, Any]:
    """``(seconds, rate, unit, first-call seconds, fraction)`` of a row for :func:`compact_table`."""
    if r["suite"] == "sampling":
        return r.get("seconds_per_batch"), r.get("images_per_s"), "img/s", r.get("first_call_s"), \
            r.get("fraction_of_floor")
    if r["suite"] == "decode":
        return r.get("step_s"), None, "", r.get("capture_s"), r.get("fraction_of_floor")
    return r.get("step_s"), r.get("tokens_per_s"), "tok/s", r.get("first_step_s"), r.get("mfu")


def _compact_line(r: dict[str, Any]) -> str:
    secs, rate, unit, first, frac = _compact_figures(r)
    floor_s = row_floor(r).get("seconds")
    return (f"{r['suite']:8} {r['model']:7} {r.get('mode', r['backbone']):11} {r['batch']:>5} {r['tokens']:>5} "
            f"{fmt(secs, '9.4f') if secs else '-':>9} {(fmt(rate, '8.1f') + unit) if rate else '-':>10} "
            f"{fmt(floor_s, '9.4f') if floor_s else '-':>9} "
            f"{fmt(frac, '6.3f') if frac else '-':>6} {fmt(r.get('peak_memory_gb'), '7.1f'):>7} "
            f"{fmt(first, '8.1f') if first is not None else '-':>8} {r['status']}")


def compact_table(data: dict[str, Any]) -> str:
    """A short fixed-width table of every row (printed last, so a truncated log still shows it)."""
    head = f"{'suite':8} {'model':7} {'backbone':11} {'batch':>5} {'tok':>5} {'seconds':>9} {'rate':>10} " \
           f"{'floor_s':>9} {'frac':>6} {'peakGB':>7} {'first_s':>8} status"
    out = [head, "-" * len(head)]
    out += [_compact_line(r) for r in data.get("rows", [])]
    chk = data.get("correctness")
    if chk:
        out.append(f"correctness: forward {fmt(chk.get('forward_rel_err'), '.2e')}, decode "
                   f"{fmt(chk.get('decode_rel_err'), '.2e')} -> {'PASSED' if chk.get('passed') else 'FAILED'}")
    dev = data.get("device") or {}
    if dev:
        out.append(f"device: {dev.get('gpu') or dev.get('cpu')}; copy {dev.get('copy_bandwidth', 0) / 1e12:.3g} TB/s; "
                   f"{dev.get('matmul_dtype')} matmul {dev.get('matmul_flops', 0) / 1e12:.3g} TFLOP/s; kernels "
                   f"{(dev.get('kernels') or {}).get('available')}")
    return "\n".join(out)
