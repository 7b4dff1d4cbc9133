"""``aimkit plot RUN``: loss, learning rate and gradient norm of a training run, as one PNG.

::

    aimkit plot runs/aim_b                      # reads runs/aim_b/metrics.jsonl -> runs/aim_b/metrics.png
    aimkit plot runs/aim_b/metrics.jsonl --out curves.png --log-loss

Needs matplotlib (``pip install 'aimkit[plots]'``). The PNG is written atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import AimkitError, ConfigError

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "plot_metrics", "read_metrics", "run"]

HELP = "draw loss, learning rate and gradient norm of a training run (RUN/metrics.jsonl) to a PNG"
DESCRIPTION = ("Draw the loss, learning rate and gradient norm that `aimkit train` logged in RUN/metrics.jsonl "
               "against the step, to RUN/metrics.png (or --out). Needs matplotlib: pip install 'aimkit[plots]'.")

PANELS = (("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"))


def add_arguments(parser) -> None:
    parser.add_argument("run", metavar="RUN", help="a training output_dir, or its metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG to write (default RUN/metrics.png)")
    parser.add_argument("--log-loss", action="store_true", help="logarithmic loss axis")


def _metrics_file(run: str) -> Path:
    path = Path(run).expanduser()
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; RUN is a training output_dir (with metrics.jsonl) or that file")
    return path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` that carry a step (a cut or foreign line is passed over)."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    if not rows:
        raise ConfigError(f"{path} holds no metric lines (has the run logged a step yet?)")
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], float(r[key])) for r in rows
             if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_metrics(rows: list[dict[str, Any]], out: Path, title: str = "", log_loss: bool = False) -> Path:
    """Three panels (loss, learning rate, gradient norm) over the step, written to ``out``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise AimkitError("aimkit plot needs matplotlib: pip install 'aimkit[plots]'") from None
    from .._io import atomic_path

    fig = Figure(figsize=(6, 7), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: no global backend, no window
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    for ax, (key, label) in zip(axes, PANELS):
        steps, values = _series(rows, key)
        ax.plot(steps, values, lw=1.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "loss" and log_loss and values and min(values) > 0:
            ax.set_yscale("log")
    axes[-1].set_xlabel("step")
    if title:
        axes[0].set_title(title, fontsize=9)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    return out


def run(args) -> int:
    path = _metrics_file(args.run)
    out = Path(args.out).expanduser() if args.out else path.parent / "metrics.png"
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a .png file name")
    if out.exists() and out.samefile(path):
        raise ConfigError(f"--out {out} is the metrics file itself; give a .png file name")
    rows = read_metrics(path)
    plot_metrics(rows, out, title=str(path.parent), log_loss=args.log_loss)
    print(f"wrote {out} ({len(rows)} metric lines, steps {rows[0]['step']}..{rows[-1]['step']})")
    return 0
