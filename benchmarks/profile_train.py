"""Where an AiM training step spends its time, and which speed knobs move it (GPU only).

    python benchmarks/profile_train.py --model aim-b --batch 64
    python benchmarks/profile_train.py --variants "chunk_size=256;chunk_size=64" --compile-variant
    python benchmarks/profile_train.py --variants "" --no-profile --host 5    # the eager step's host time

Times the step of ``train_throughput.py`` (:class:`aimkit.training.TrainStep`: bf16 autocast,
fused AdamW with the recipe's parameter groups, grad clip) for the default build and policy and
for each ``--variants`` entry (``;``-separated sets of ``KEY=VALUE``: a field of
:class:`aimkit.ExecutionPolicy` such as ``chunk_size=256``, ``split_scan=false`` or
``train_step=graph`` or ``compile_glue=false`` changes the policy; a key starting with ``AIMKIT_``
is set as an environment variable for that variant, read by ``default_policy`` when the variant's
model is built; any other key is an ``aimkit.build`` override), then profiles a few
default steps and prints the top CUDA kernels. Writes ``$OUT/profile_train_MODEL.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from train_throughput import _parse_set, build_step, measure  # noqa: E402

from aimkit.policy import ExecutionPolicy  # noqa: E402

POLICY_FIELDS = set(ExecutionPolicy().to_dict())


def _warm_step(name: str, batch: int, policy: list[str]):
    """``step()`` of ``name`` at ``batch`` under the ``policy`` changes, after three warm-up steps."""
    args = SimpleNamespace(device="cuda", compile=False, policy=policy, precision="bf16", batch=batch, warmup=3)
    _, step, _ = build_step(name, args, {})
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return step


def _profile(name: str, batch: int, steps: int = 3) -> dict:
    step = _warm_step(name, batch, [])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events) / steps
    top = [{"kernel": e.key[:100], "ms_per_step": e.device_time_total / steps / 1e3, "calls_per_step": e.count / steps}
           for e in sorted(events, key=lambda e: -e.device_time_total)[:30]]
    return {"kernel_ms_per_step": total / 1e3, "top": top}


def _host_profile(name: str, batch: int, steps: int) -> dict:
    """Where the eager step's host (Python) time goes (an explicit ``train_step=eager``: the compiled
    glue kept, unlike the trainer's eager fallback): the wall time per step without the profiler,
    then cProfile over ``steps`` more steps, the top functions by own and by cumulative time."""
    import cProfile
    import pstats
    import time

    step = _warm_step(name, batch, ["train_step=eager"])
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler)

    def top(key: str) -> list:
        rows = []
        for (file, line, func), (_, calls, own, cum, _) in stats.stats.items():
            rows.append({"function": f"{Path(file).name}:{line}({func})", "calls_per_step": calls / steps,
                         "own_ms_per_step": own / steps * 1e3, "cum_ms_per_step": cum / steps * 1e3})
        return sorted(rows, key=lambda r: -r[key])[:30]

    return {"eager_step_wall_ms": wall * 1e3, "by_own_time": top("own_ms_per_step"),
            "by_cumulative_time": top("cum_ms_per_step")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="aim-b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variants", default="chunk_size=256;split_scan=false")
    ap.add_argument("--compile-variant", action="store_true", help="also time torch.compile of the generator")
    ap.add_argument("--graph-variant", action="store_true", help="also time the step captured in CUDA graphs")
    ap.add_argument("--no-profile", action="store_true", help="timings only")
    ap.add_argument("--host", type=int, default=0, metavar="STEPS",
                    help="also cProfile STEPS eager steps: where the host time of the eager step goes")
    ap.add_argument("--all-graphed", action="store_true", help="time every variant with the CUDA-graph step")
    args = ap.parse_args()
    result = {"gpu": torch.cuda.get_device_name(), "model": args.model, "batch": args.batch, "timings": []}
    base_policy = ["train_step=graph"] if args.all_graphed else []
    base = SimpleNamespace(device="cuda", compile=False, policy=base_policy, precision="bf16",
                           batch=args.batch, warmup=3, steps=args.steps)
    plans = [("default", {}, {})]
    for v in [v for v in args.variants.split(";") if v.strip()]:
        plans.append((v, _parse_set(v.split(",")), {}))
    if args.graph_variant:
        plans.append(("cuda graph", {}, {"policy": [*base_policy, "train_step=graph"]}))
    if args.compile_variant:
        plans.append(("torch.compile", {}, {"compile": True}))
    for label, overrides, flags in plans:
        # '+' stands for ',' inside an environment value (',' separates the overrides)
        env = {k: str(overrides.pop(k)).replace("+", ",") for k in list(overrides) if k.startswith("AIMKIT_")}
        policy = [f"{k}={overrides.pop(k)}" for k in list(overrides) if k in POLICY_FIELDS]
        flags = {"policy": [*base.policy, *policy], **flags}
        try:
            with mock.patch.dict(os.environ, env):
                row = measure(args.model, SimpleNamespace(**{**vars(base), **flags}), overrides)
            row["variant"] = label
            print(f"{label:24s} step {row['step_s_median'] * 1e3:7.1f} ms  {row['tokens_per_s']:>9,.0f} tok/s  "
                  f"peak {row['peak_memory_gb']:.1f} GB", flush=True)
        except Exception as exc:  # keep the other variants
            row = {"variant": label, "error": f"{type(exc).__name__}: {exc}"}
            print(f"{label}: failed: {row['error']}", flush=True)
        result["timings"].append(row)
        torch.cuda.empty_cache()
    if args.host:
        result["host"] = _host_profile(args.model, args.batch, args.host)
        print(f"\neager step wall {result['host']['eager_step_wall_ms']:.1f} ms; top functions by own time:")
        for r in result["host"]["by_own_time"][:20]:
            print(f"{r['own_ms_per_step']:8.2f} ms own {r['cum_ms_per_step']:8.2f} ms cum {r['calls_per_step']:8.1f}x  "
                  f"{r['function']}")
        print("top functions by cumulative time:")
        for r in result["host"]["by_cumulative_time"][:25]:
            print(f"{r['cum_ms_per_step']:8.2f} ms cum {r['calls_per_step']:8.1f}x  {r['function']}")
    if args.no_profile:
        return _write(result)
    result["profile"] = _profile(args.model, args.batch)
    print(f"\nkernel time per step {result['profile']['kernel_ms_per_step']:.1f} ms; top kernels:")
    for r in result["profile"]["top"]:
        print(f"{r['ms_per_step']:8.2f} ms {r['calls_per_step']:7.1f}  {r['kernel']}")
    return _write(result)


def _write(result: dict) -> int:
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"profile_train_{result['model']}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
