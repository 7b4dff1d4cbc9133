"""Time to the first image in a fresh process: ``import aimkit``, ``aimkit.build``, one ``generate``.

Each run starts a new Python process (so nothing is warm but the on-disk caches: Triton's compiled
kernels and, with ``TRITON_CACHE_AUTOTUNING``, its autotuning choices) and reports the seconds of
each phase: import, build (random weights, or ``--pretrained``), the first ``generate`` of
``--batch`` images to pixels, and a second ``generate`` for comparison. The first run of a fresh
machine fills the caches; the later runs show what a user sees from then on. Goal (issue #17):
AiM-XL's first image within 10 s; the official code takes 7-55 s.

On a GPU machine (``source benchmarks/device_env.sh`` first)::

    python3 benchmarks/first_image.py --model aim-xl --runs 3 --out $OUT/first_image.json

On the CPU (smoke test, about 30 s)::

    python3 benchmarks/first_image.py --model aim-tiny-shapes --device cpu --runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the timed child: each phase's seconds as one JSON line on stdout
_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import aimkit
t_import = time.perf_counter()
model, device, dtype, batch, pretrained = sys.argv[1:6]
kw = {"pretrained": pretrained} if pretrained else {}
gen = aimkit.build(model, device=device, dtype=getattr(torch, dtype), **kw)
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
sync()
t_build = time.perf_counter()
labels = [i % gen.num_classes for i in range(int(batch))]
gen.generate(labels, seed=0, output="uint8", batch_size=int(batch), progress=False)
sync()
t_first = time.perf_counter()
gen.generate(labels, seed=1, output="uint8", batch_size=int(batch), progress=False)
sync()
t_second = time.perf_counter()
print(json.dumps({"import_s": t_import - t0, "build_s": t_build - t_import, "first_generate_s": t_first - t_build,
                  "to_first_image_s": t_first - t0, "second_generate_s": t_second - t_first}))
"""


def run_once(args) -> dict:
    """One fresh process; its phases, or the error it printed."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-c", _CHILD, args.model, args.device, args.dtype, str(args.batch), args.pretrained or ""]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": [f"no image within {args.timeout:.0f} s"]}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="aim-xl", help="preset or saved directory")
    parser.add_argument("--pretrained", default=None, help="weights to load (default: random or shipped)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=1, help="images of the first generate call")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes, one after the other")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    runs = []
    for i in range(args.runs):
        runs.append(run_once(args))
        phases = " | ".join(f"{k} {v:.2f}" for k, v in runs[-1].items() if isinstance(v, float))
        print(f"run {i + 1}: {phases or runs[-1]}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1) + "\n")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
