"""At most three PNGs of a run: throughput vs batch, Mamba2 vs transformer over tokens, fraction of floor.

Matplotlib is optional: without it no plot is written. Reference figures (``data["reference"]``,
see :func:`aimkit.bench.report.load_reference`) are drawn on the throughput plot, labelled as such.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._io import atomic_write
from .report import reference_images_per_s

__all__ = ["plots"]

Rows = list[dict[str, Any]]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # plots are optional
        return None
    return plt


def _finish(plt, fig, ax, path: Path, xs: list[int], xlabel: str, ylabel: str, title: str) -> str:
    """Log-log axes ticked at ``xs``, labels, legend and grid; write (110 dpi), close; the file name."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> str:
    """Write ``fig`` as a PNG atomically (an earlier plot stays whole if this write fails), close it."""
    try:
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path.name


def _throughput(plt, data: dict[str, Any], rows: Rows, out: Path) -> str | None:
    """images/s against batch per (model, backbone) at the first token count, floors dotted."""
    tokens = (data.get("options") or {}).get("tokens", [256])[0]
    series: dict[tuple[str, str], Rows] = {}
    for r in rows:
        if r["suite"] == "sampling" and r["tokens"] == tokens:
            series.setdefault((r["model"], r["backbone"]), []).append(r)
    if not any(len(v) > 1 for v in series.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    batches = set()
    for i, ((model, backbone), rs) in enumerate(sorted(series.items())):
        rs = sorted(rs, key=lambda r: r["batch"])
        xs = [r["batch"] for r in rs]
        batches.update(xs)
        ax.plot(xs, [r["images_per_s"] for r in rs], "-" if backbone == "mamba2" else "-.", marker="o",
                color=f"C{i}", label=f"{model} {backbone}")
        ax.plot(xs, [r["batch"] / r["floor"]["seconds"] for r in rs], ":", color=f"C{i}", alpha=0.6)
        ref = reference_images_per_s(data, model, tokens) if backbone == "mamba2" else {}
        if ref:
            ax.plot(list(ref), list(ref.values()), "x", color=f"C{i}", markersize=8)
            batches.update(ref)
    ax.plot([], [], ":", color="gray", label="floor (ceiling on images/s)")
    if data.get("reference"):
        ax.plot([], [], "x", color="gray", label="reference figures (not this run)")
    device = (data.get("device") or {}).get("gpu") or (data.get("device") or {}).get("cpu")
    return _finish(plt, fig, ax, out / "sampling_throughput.png", sorted(batches), "batch (images)",
                   "images/s (tokens only)", f"Sampling throughput, {tokens} tokens ({device})")


def _comparison(plt, rows: Rows, out: Path) -> str | None:
    """Seconds per batch against tokens, Mamba2 beside the transformer at the same batch."""
    by_model: dict[tuple[str, int], dict[str, Rows]] = {}
    for r in rows:
        if r["suite"] == "sampling":
            by_model.setdefault((r["model"], r["batch"]), {}).setdefault(r["backbone"], []).append(r)
    pairs = {k: v for k, v in by_model.items()
             if len(v) > 1 and any(len({r["tokens"] for r in rs}) > 1 for rs in v.values())}
    if not pairs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, ((model, batch), by_backbone) in enumerate(sorted(pairs.items())):
        for backbone, rs in sorted(by_backbone.items()):
            rs = sorted(rs, key=lambda r: r["tokens"])
            style = "-" if backbone == "mamba2" else "--"
            xs = [r["tokens"] for r in rs]
            ax.plot(xs, [r["seconds_per_batch"] for r in rs], style, marker="o" if backbone == "mamba2" else "s",
                    color=f"C{i}", label=f"{model} {backbone} (batch {batch})")
            ax.plot(xs, [r["floor"]["seconds"] for r in rs], style, color=f"C{i}", alpha=0.35)
    ax.plot([], [], color="gray", alpha=0.35, label="floors (same line style)")
    tokens = sorted({r["tokens"] for group in pairs.values() for rs in group.values() for r in rs})
    return _finish(plt, fig, ax, out / "mamba_vs_transformer.png", tokens, "tokens per image",
                   "seconds per batch (tokens only)", "Mamba2 state vs transformer KV cache")


def _fractions(plt, rows: Rows, out: Path) -> str | None:
    """One bar per row with a fraction of the floor (blue: Mamba2, orange: transformer)."""
    fracs = [r for r in rows if r.get("fraction_of_floor")]
    if not fracs:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(fracs) + 2), 4.5))
    labels = [f"{r['suite'][:3]} {r['model']}{'' if r['backbone'] == 'mamba2' else ' T'} b{r['batch']} n{r['tokens']}"
              for r in fracs]
    colors = ["C0" if r["backbone"] == "mamba2" else "C1" for r in fracs]
    ax.bar(range(len(fracs)), [r["fraction_of_floor"] for r in fracs], color=colors)
    ax.set_xticks(range(len(fracs)), labels, rotation=70, ha="right", fontsize=7)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("floor / measured (1 = at the floor)")
    ax.set_title("Fraction of the physical floor (blue: Mamba2, orange: transformer)")
    return _save(plt, fig, out / "fraction_of_floor.png")


def plots(data: dict[str, Any], out: Path) -> list[str]:
    """Write the plots the run's rows allow into ``out``; returns the file names written."""
    plt = _pyplot()
    if plt is None:
        return []
    rows = [r for r in data.get("rows", []) if r.get("status") == "ok"]
    written = [_throughput(plt, data, rows, out), _comparison(plt, rows, out), _fractions(plt, rows, out)]
    return [name for name in written if name]
