"""Where a LlamaGen decode step's time goes outside attention, and what its matmuls could gain (a study,
not package code).

Issue #19 asks for the transformer's decode step at >= 0.7 of its floor; LlamaGen-XL at batch 256 (512
rows) is at 0.559 (6.10 ms against 3.41 ms, `docs/benchmarks.md`). The decode-attention kernel reads
the valid KV prefix at the copy rate (~3.0 ms of the step); the other ~3.0 ms are the projections and
the glue, whose matmuls alone need 0.94 ms at the measured bf16 rate. 0.7 means a 4.87 ms step: the
part outside attention must fall from ~3.0 to ~1.9 ms. This script measures, in one call:

* ``profile``: the captured decode step (the library's default path) under torch.profiler, its
  kernel time per step grouped as attention, matmuls, rotary + cache write, glue, SwiGLU pointwise
  and the rest;
* ``gemms``: each projection at the step's shape, replayed from a CUDA graph of ``n_layer`` calls
  (as inside the step): cuBLAS (``F.linear``), and Inductor's autotuned Triton templates
  (``torch.compile(mode="max-autotune-no-cudagraphs")``), with the rate each reaches;
* ``ffn``: the SwiGLU sublayer three ways: as the library runs it (``w1``, ``w3``, SiLU, multiply,
  ``w2``), with ``w1`` and ``w3`` as one matmul of twice the width (one launch, twice the output
  tiles), and that compiled with max-autotune (SiLU x gate fused into the matmul's epilogue),
  each checked against the first in float32.

GPU machine: ``source benchmarks/device_env.sh; python3 benchmarks/transformer_decode_study.py --out $OUT/tds``
(about two minutes, most of it autotuning). CPU smoke test of the maths (no timing)::

    python3 benchmarks/transformer_decode_study.py --device cpu --model llamagen-test --batches 2 --parts ffn
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aimkit  # noqa: E402
from aimkit._io import write_text_atomic  # noqa: E402
from aimkit.bench.rows import _Decoder  # noqa: E402
from aimkit.bench.timing import graphed_call_seconds  # noqa: E402

CATEGORIES = (  # (name, pattern of the kernel's name); the first match wins
    ("attention", r"_split_kernel|_combine_kernel|flash|fmha|attention"),
    ("rotary + cache write", r"_rope_cache"),
    ("glue (residual + RMSNorm)", r"_add_norm_modulate"),
    ("matmuls", r"nvjet|gemm|cutlass|xmma|sm90_|triton_tem"),
    ("SwiGLU pointwise", r"silu|mul|triton_poi"),
    ("sampling", r"_sample_"),
)


def _model(name: str, device: str):
    return aimkit.build(name, pretrained=False, device=device, dtype=torch.bfloat16 if device == "cuda" else None)


def profile_step(model, rows: int, steps: int = 20) -> dict:
    """Kernel milliseconds per captured decode step by category (mid-sequence, ``rows`` rows)."""
    from torch.profiler import ProfilerActivity, profile

    labels = torch.arange(rows, device="cuda") % model.num_classes
    with torch.inference_mode():
        decoder = _Decoder(model, model.condition(labels), rows, model.policy)
        model.prefill(decoder.cond, decoder.params)
        decoder.params.advance(model.num_tokens // 2)
        decoder.set_tokens(torch.randint(model.vocab_size, (rows,), device="cuda"))
        for _ in range(3):
            decoder.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                decoder.replay()
            torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if device_us and event.key != "cudaGraphLaunch":
            per_kernel[event.key] += device_us / 1e3 / steps
    groups: dict[str, float] = defaultdict(float)
    for kernel, ms in per_kernel.items():
        group = next((g for g, pattern in CATEGORIES if re.search(pattern, kernel)), "the rest")
        groups[group] += ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
    return {"rows": rows, "kernel_ms_per_step": sum(per_kernel.values()), "groups_ms": dict(groups),
            "top_kernels_ms": top}


def _shapes(model) -> dict[str, tuple[int, int]]:
    """``name -> (in_features, out_features)`` of one block's projections."""
    block = model.backbone.layers[0]
    mixer, mlp = block.mixer, block.mlp
    return {"wqkv": tuple(mixer.wqkv.weight.shape[::-1]), "wo": tuple(mixer.wo.weight.shape[::-1]),
            "w1": tuple(mlp.w1.weight.shape[::-1]), "w1+w3 (one matmul)": (mlp.w1.in_features, 2 * mlp.w1.out_features),
            "w2": tuple(mlp.w2.weight.shape[::-1])}


def _linear(x, w):
    return F.linear(x, w)


def time_gemms(model, rows: int, compile_too: bool) -> list[dict]:
    """Each projection at ``rows`` rows: µs per call and TFLOP/s, cuBLAS and (optionally) Inductor."""
    out, calls = [], model.config.n_layer
    for name, (k, n) in _shapes(model).items():
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        variants = {"cublas": lambda x=x, w=w: F.linear(x, w)}
        if compile_too:
            compiled = torch.compile(_linear, mode="max-autotune-no-cudagraphs", dynamic=False)
            variants["inductor max-autotune"] = lambda x=x, w=w, f=compiled: f(x, w)
        for variant, fn in variants.items():
            seconds = graphed_call_seconds(fn, calls=calls)
            out.append({"rows": rows, "projection": name, "k": k, "n": n, "variant": variant,
                        "us": seconds * 1e6, "tflops": 2 * rows * k * n / seconds / 1e12})
    return out


def ffn_variants(mlp, compile_too: bool = True) -> dict:
    """The SwiGLU sublayer as the library runs it, with ``w1 | w3`` as one matmul, and that compiled."""
    w13 = torch.cat((mlp.w1.weight, mlp.w3.weight))  # (2F, D)
    hidden = mlp.w1.out_features

    def fused(x):
        a, gate = F.linear(x, w13).split(hidden, dim=-1)
        return mlp.w2(F.silu(a) * gate)

    variants = {"library (w1, w3, SiLU, multiply, w2)": mlp, "w1 | w3 as one matmul": fused}
    if w13.is_cuda and compile_too:
        variants["w1 | w3, max-autotune"] = torch.compile(fused, mode="max-autotune-no-cudagraphs", dynamic=False)
    return variants


def _ffn_float32(mlp, x):
    """``w2(silu(w1 x) * w3 x)`` in float32, (rows, D) -> (rows, D)."""
    w1, w2, w3 = (layer.weight.float() for layer in (mlp.w1, mlp.w2, mlp.w3))
    x = x.float()
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def time_ffn(model, rows: int, compile_too: bool = True) -> list[dict]:
    """Each SwiGLU variant at ``rows`` rows: its largest difference from float32, and µs per call on CUDA."""
    mlp = model.backbone.layers[0].mlp
    x = torch.randn(rows, mlp.w1.in_features, device=mlp.w1.weight.device, dtype=mlp.w1.weight.dtype)
    out = []
    with torch.inference_mode():
        want = _ffn_float32(mlp, x)
        for variant, fn in ffn_variants(mlp, compile_too).items():
            error = (fn(x).float() - want).abs().max().item()
            row = {"rows": rows, "variant": variant, "max_abs_error_vs_float32": error}
            if x.is_cuda:
                row["us"] = graphed_call_seconds(lambda fn=fn: fn(x), calls=model.config.n_layer) * 1e6
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llamagen-xl")
    ap.add_argument("--batches", default="256,16", help="images per batch; the step has twice as many rows")
    ap.add_argument("--parts", default="profile,gemms,ffn", help="any of profile, gemms, ffn")
    ap.add_argument("--no-compile", action="store_true", help="cuBLAS only (no Inductor autotuning)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", default=os.environ.get("OUT", "transformer_decode_study"))
    args = ap.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if args.device == "cpu" and parts - {"ffn"}:
        ap.error("on the CPU only --parts ffn runs (the maths check; the rest needs CUDA)")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device; pass --device cpu --parts ffn for the maths check")
    model = _model(args.model, args.device).eval()
    record: dict = {"model": args.model, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "torch": torch.__version__, "profile": [], "gemms": [], "ffn": []}
    for batch in (int(b) for b in args.batches.split(",")):
        rows = 2 * batch
        if "profile" in parts:
            record["profile"].append(profile_step(model, rows))
            print(json.dumps(record["profile"][-1]["groups_ms"] | {"rows": rows}), flush=True)
        if "gemms" in parts:
            rows_timed = time_gemms(model, rows, compile_too=not args.no_compile)
            record["gemms"] += rows_timed
            for row in rows_timed:
                print(f"{row['rows']:5d} rows {row['projection']:>20} {row['variant']:>22}: "
                      f"{row['us']:8.1f} us {row['tflops']:6.0f} TFLOP/s", flush=True)
        if "ffn" in parts:
            rows_timed = time_ffn(model, rows, compile_too=not args.no_compile)
            record["ffn"] += rows_timed
            for row in rows_timed:
                print(json.dumps(row), flush=True)
    path = Path(args.out) / "transformer_decode_study.json"
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")  # creates the folder
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
