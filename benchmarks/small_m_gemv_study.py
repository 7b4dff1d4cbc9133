"""Decode-step projections at small batch: cuBLAS against a Triton GEMV candidate (a study, not package code).

Batch 16 is kernel-bound (``docs/benchmarks.md``, "Batch 16: the profile"): at 32 decode rows cuBLAS reads
AiM-B's in_proj weights at 1.0 TB/s and out_proj's at 0.5 TB/s, 10 of the 24 µs of a layer. This script
times ``y = x @ W.T`` (x (M, K) bf16, W (N, K) bf16, y (M, N) bf16, float32 accumulation) at the decode
shapes of AiM-B/L/XL for cuBLAS (``F.linear``) and for a Triton kernel swept over its tiling, each as
the median of replays of a CUDA graph of ``--calls`` back-to-back calls (as inside the captured decode
step), and checks every candidate against ``F.linear`` in float32. A candidate that wins here by more
than a kernel launch is worth a policy operation; one that does not is recorded in
``benchmarks/notes.md`` and dropped.

GPU machine: ``source benchmarks/device_env.sh; python3 benchmarks/small_m_gemv_study.py --out $OUT/gemv``
(about a minute). CPU smoke test of the kernel's maths in Triton's interpreter (no timing)::

    TRITON_INTERPRET=1 python3 benchmarks/small_m_gemv_study.py --device cpu --shapes aim-b --rows 32
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aimkit.bench.timing import graphed_call_seconds  # noqa: E402

# (K, N) of in_proj (d_model -> 2 d_inner + 2 G N + H) and out_proj (d_inner -> d_model)
SHAPES = {
    "aim-b": {"in_proj": (768, 3352), "out_proj": (1536, 768)},
    "aim-l": {"in_proj": (1024, 4384), "out_proj": (2048, 1024)},
    "aim-xl": {"in_proj": (1536, 6448), "out_proj": (3072, 1536)},
}


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, k_per_split,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    # program (block of N, split of K): y[:, n-block] (+)= x[:, k-split] @ W[n-block, k-split].T
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k in range(k_start, k_start + k_per_split, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        acc += tl.dot(x, tl.trans(w))
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * N + rn[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:  # y is a zeroed float32 buffer here
        tl.atomic_add(y_ptr + offs, acc, mask=mask)


def gemv(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, split_k: int, num_warps: int,
         num_stages: int) -> torch.Tensor:
    """x (M, K) @ w (N, K).T -> (M, N) in x's dtype; split_k > 1 adds a zeroed float32 buffer and a cast."""
    m, k = x.shape
    n = w.shape[0]
    block_m = max(16, triton.next_power_of_2(m))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    y = torch.empty(m, n, device=x.device, dtype=x.dtype) if split_k == 1 else \
        torch.zeros(m, n, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, block_n), split_k)
    _gemv_kernel[grid](x, w, y, m, n, k, k_per_split, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                       SPLIT_K=split_k, num_warps=num_warps, num_stages=num_stages)
    return y if split_k == 1 else y.to(x.dtype)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="aim-b,aim-l,aim-xl")
    ap.add_argument("--rows", default="32,64,128", help="M: decode rows (2 x images with guidance)")
    ap.add_argument("--block-n", default="16,32,64")
    ap.add_argument("--block-k", default="64,128,256")
    ap.add_argument("--split-k", default="1,2,4")
    ap.add_argument("--warps", default="2,4")
    ap.add_argument("--stages", default="3,4")
    ap.add_argument("--calls", type=int, default=50, help="calls per captured graph")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gemv_study")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    tilings = list(itertools.product(ints(args.block_n), ints(args.block_k), ints(args.split_k), ints(args.warps),
                                     ints(args.stages)))
    dtype = torch.bfloat16
    if not cuda:  # the interpreter (no bf16 there): one tiling of each kind is enough to check the maths
        tilings, dtype = [(16, 64, 1, 4, 3), (32, 128, 2, 4, 3)], torch.float32
    rows_out, gen = [], torch.Generator(device=args.device).manual_seed(0)
    for model in args.shapes.split(","):
        for proj, (k, n) in SHAPES[model].items():
            w = (torch.randn(n, k, device=args.device, generator=gen) / k**0.5).to(dtype)
            for m in ints(args.rows):
                x = torch.randn(m, k, device=args.device, generator=gen).to(dtype)
                want = F.linear(x.float(), w.float())
                row = {"model": model, "proj": proj, "M": m, "K": k, "N": n, "weight_mb": n * k * 2 / 1e6}
                if cuda:
                    row["cublas_us"] = graphed_call_seconds(lambda: F.linear(x, w), args.calls, 20) * 1e6
                best = None
                for bn, bk, sk, nw, ns in tilings:
                    if sk > 1 and triton.cdiv(k, sk) < bk:
                        continue
                    got = gemv(x, w, bn, bk, sk, nw, ns).float()
                    err = float((got - want).abs().max() / want.abs().max())
                    if err > 1e-2:
                        raise AssertionError(f"{model} {proj} M={m} tiling {(bn, bk, sk, nw, ns)}: rel err {err:.2e}")
                    if cuda:
                        us = graphed_call_seconds(lambda: gemv(x, w, bn, bk, sk, nw, ns), args.calls, 20) * 1e6
                        if best is None or us < best[0]:
                            best = (us, (bn, bk, sk, nw, ns), err)
                if best is not None:
                    row.update(triton_us=best[0], tiling=dict(zip(("block_n", "block_k", "split_k", "warps", "stages"),
                                                                    best[1])), rel_err=best[2],
                               speedup=row["cublas_us"] / best[0],
                               triton_tb_s=row["weight_mb"] * 1e6 / (best[0] * 1e-6) / 1e12,
                               cublas_tb_s=row["weight_mb"] * 1e6 / (row["cublas_us"] * 1e-6) / 1e12)
                    print(f"{model:7s} {proj:8s} M={m:4d} cuBLAS {row['cublas_us']:6.2f} us "
                          f"({row['cublas_tb_s']:.2f} TB/s)  Triton {best[0]:6.2f} us ({row['triton_tb_s']:.2f} TB/s) "
                          f"{best[1]}", flush=True)
                else:
                    print(f"{model:7s} {proj:8s} M={m:4d}: every tiling within tolerance (interpreter)", flush=True)
                rows_out.append(row)
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / "small_m_gemv_study.json").write_text(json.dumps(rows_out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
