"""Where one Mamba2 decode step spends its time on a GPU (torch.profiler, eager step).

Usage (device machine, kernels installed): ``python benchmarks/profile_decode.py --model aim-b --batch 64``.
Prints the top CUDA kernels by total time over a few eager steps and the CUDA-graph replay time of
the same step, so speed work can target the largest item first (see benchmarks/notes.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aimkit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="aim-b")
    ap.add_argument("--batch", type=int, default=64, help="decode rows (2 x images with guidance)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--state-dtype", default="float32", choices=("float32", "model"))
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    gen = aimkit.build(args.model, device="cuda", dtype=args.dtype, tokenizer=None,
                       policy={"state_dtype": args.state_dtype})
    with torch.no_grad():
        for p in gen.parameters():
            p.normal_(0, 0.02)
    labels = torch.randint(0, gen.num_classes, (args.batch,), device="cuda")
    rows = []
    with torch.inference_mode():
        cond = gen.condition(labels)
        ip = gen.allocate_inference_cache(args.batch)
        gen.prefill(cond, ip)
        ip.advance(1)
        tok = torch.randint(0, gen.vocab_size, (args.batch,), device="cuda")
        for _ in range(3):
            gen.decode_step(tok, cond, ip)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                gen.decode_step(tok, cond, ip)
            torch.cuda.synchronize()
        events = prof.key_averages()
        total = sum(e.device_time_total for e in events) / args.steps
        for e in sorted(events, key=lambda e: -e.device_time_total)[:25]:
            rows.append({"name": e.key[:90], "us_per_step": e.device_time_total / args.steps,
                         "calls_per_step": e.count / args.steps})
        # graph replay of the same step
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            gen.decode_step(tok, cond, ip)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            gen.decode_step(tok, cond, ip)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()
        torch.cuda.synchronize()
        start.record()
        for _ in range(50):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        replay_ms = start.elapsed_time(end) / 50
    print(f"{args.model} batch {args.batch} {args.dtype} state {args.state_dtype}: "
          f"kernel time per eager step {total/1000:.3f} ms, graph replay {replay_ms:.3f} ms")
    print(f"{'us/step':>9} {'calls':>6}  kernel")
    for r in rows:
        print(f"{r['us_per_step']:9.1f} {r['calls_per_step']:6.1f}  {r['name']}")
    out = os.environ.get("OUT")
    if out:
        Path(out, f"profile_{args.model}_{args.batch}_{args.state_dtype}.json").write_text(
            json.dumps({"args": vars(args), "kernel_ms_per_step": total / 1000, "graph_replay_ms": replay_ms,
                        "top": rows}, indent=1))


if __name__ == "__main__":
    main()
