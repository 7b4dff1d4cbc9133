"""Where the end-to-end sampling time goes: tokens only, pixels (decoded behind the next batch), shards on disk.

Issue #17 goal 3 (``aimkit sample`` at batch 256: AiM-B >= 250, AiM-L >= 110, AiM-XL >= 75 img/s, decoding
and writing included). For each model and each number of batches N this times, in one process:

* ``tokens``: N batches of tokens only (``generate_batches(..., output="tokens")``);
* ``pixels``: N batches to uint8 pixels, batch k decoded on a side stream while batch k + 1 is sampled;
* ``serial``: the same pixels with every batch decoded right after its sampling, on one stream;
* ``shards``: ``sample_to_shards`` (what ``aimkit sample`` runs): N shards of one batch, written as .npz;

each once on the caller's (default) stream and once with the sampling on a high-priority stream
(``--priorities``), where the decoding's side stream keeps the default (lowest) priority, so that the
GPU's block scheduler prefers the decode steps and fills the gaps with convolutions. Random weights, bf16,
the default execution policy, the presets' FID sampling settings (guidance on).

GPU machine: ``source benchmarks/device_env.sh; python3 benchmarks/end_to_end_study.py --out $OUT/e2e``.
CPU smoke test (< 1 minute): ``python3 benchmarks/end_to_end_study.py --device cpu --models aim-test-vq --tokens 16
--batch 4 --batches 2 --priorities default``. Writes end_to_end_study.json (rewritten after every row).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aimkit.bench.models import build_bench_model  # noqa: E402
from aimkit.bench.timing import sync  # noqa: E402
from aimkit.eval.fid_sampling import sample_to_shards  # noqa: E402
from aimkit.policy import default_policy  # noqa: E402
from aimkit.samplers import generate_batches  # noqa: E402
from aimkit.samplers._decode_behind import decode_pixels  # noqa: E402

KINDS = ("tokens", "pixels", "serial", "shards")


def stream_context(priority: str, device: torch.device):
    """The sampling stream of a row: the caller's, or a new highest-priority one (CUDA)."""
    if priority == "default" or device.type != "cuda":
        return contextlib.nullcontext()
    high = torch.cuda.Stream(device, priority=torch.cuda.Stream.priority_range()[1])
    high.wait_stream(torch.cuda.current_stream(device))
    return torch.cuda.stream(high)


def run_kind(model, kind: str, batches: list, batch: int, seed: int) -> None:
    """One timed unit of work: ``len(batches)`` batches of ``kind``."""
    if kind == "shards":
        labels = [int(x) for labels, _ in batches for x in labels]
        with tempfile.TemporaryDirectory(prefix="aimkit-e2e-") as tmp:
            sample_to_shards(model, tmp, len(labels), labels=labels, seed=seed, batch_size=batch,
                             shard_size=batch, progress=False)
        return
    if kind == "serial":
        for codes in generate_batches(model, batches, output="tokens", progress=False):
            decode_pixels(model, codes.to(model.device), "uint8").cpu()
        return
    for _ in generate_batches(model, batches, output="tokens" if kind == "tokens" else "uint8", progress=False):
        pass


def timed(model, kind: str, batches: list, batch: int, seed: int, priority: str, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    with stream_context(priority, device):
        run_kind(model, kind, batches, batch, seed)
        sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="aim-b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per image (the CPU smoke test's preset: 16)")
    ap.add_argument("--batches", default="3,8", help="comma list: numbers of batches per timed call")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--priorities", default="default,high")
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no new row after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/e2e_study")
    args = ap.parse_args()
    t0, device, out = time.perf_counter(), torch.device(args.device), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    meta = {**vars(args), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__}
    for name in args.models.split(","):
        model = build_bench_model(name, device=device, dtype=dtype, num_tokens=args.tokens, policy=default_policy(),
                                  with_tokenizer=True)
        warm = [(torch.arange(args.batch) % model.num_classes, 0)]
        run_kind(model, "pixels", warm, args.batch, 0)  # graph capture, kernel compiles
        run_kind(model, "shards", warm, args.batch, 0)
        for n in (int(x) for x in args.batches.split(",")):
            batches = [(torch.arange(k * args.batch, (k + 1) * args.batch) % model.num_classes, k) for k in range(n)]
            for priority in args.priorities.split(","):
                for kind in args.kinds.split(","):
                    if time.perf_counter() - t0 > args.budget_s:
                        rows.append({"model": name, "batches": n, "kind": kind, "priority": priority,
                                     "status": "skipped: budget"})
                        continue
                    seconds = timed(model, kind, batches, args.batch, 0, priority, device)
                    rows.append({"model": name, "batch": args.batch, "batches": n, "kind": kind, "priority": priority,
                                 "seconds": seconds, "images_per_s": n * args.batch / seconds, "status": "ok"})
                    print(f"{name} b{args.batch} x{n} {kind:7s} {priority:8s} {seconds:7.3f} s "
                          f"{n * args.batch / seconds:8.1f} img/s", flush=True)
                    (out / "end_to_end_study.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta["elapsed_s"] = time.perf_counter() - t0
    (out / "end_to_end_study.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
