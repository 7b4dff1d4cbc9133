"""VQ decode speed study: codes (B, N) -> images under dtype, layout, compile and CUDA-graph variants.

Issue #17 goal 2: 256 VQ-f16 images in <= 0.15 s on an H200, pixels within bf16 precision of float32.
On the GPU machine (10-minute limit; no new row starts after --budget-s seconds)::

    source benchmarks/device_env.sh; python3 benchmarks/vq_decode_study.py --out $OUT/vq

CPU smoke test (< 1 minute)::

    python3 benchmarks/vq_decode_study.py --device cpu --tokenizer vq-f4-tiny --batch 8

What each variant changes is ``post_quant_conv`` + ``decoder`` (aimkit/tokenizers/vq.py); the codebook
lookup (``quantize.lookup``) stays eager, as in ``VQModel.decode``, except inside a CUDA graph, which
captures the whole decode (lookup included) per chunk shape. Chunks go into a preallocated output.
generate() (aimkit/samplers/api.py) decodes in the tokenizer's dtype (the generator's: bf16 in
``aimkit bench``), contiguous layout, chunks of 16; so ``bf16`` at ``--chunks 16`` is the bench row.
Variants (--variants): fp32 (the reference: TF32 off), bf16, bf16_cl (channels_last), bf16_cl_bench
(and cudnn.benchmark), bf16_cl_graph, bf16_cl_compile (torch.compile, --compile-mode), bf16_cl_compile_graph,
fp16_cl_compile_graph. Weights: the tokenizer's seeded random init, or --weights; codes: uniform random.
Per variant and chunk: first call s (compile/capture included), median of --repeats, images/s, max abs
error vs fp32 after clamp to [-1, 1] (decode itself returns unclamped [-1, 1]-scale pixels), PSNR (dB)
of generate's uint8 pixels vs fp32's, peak GB. Part ``ops``: one profiled eager bf16_cl chunk by op
family; parts ``gn_swish`` / ``attention``: GroupNorm + swish eager vs compiled (what a fused kernel
could save) at each decoder shape, and the 16x16 attention blocks eager vs F.scaled_dot_product_attention.
Writes vq_decode_study.json and vq_decode_study.md (rewritten after every row) to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aimkit.registry import TOKENIZERS  # noqa: E402
from aimkit.tokenizers.vq import _swish  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
VARIANTS = {  # dtype, channels_last, cudnn.benchmark, torch.compile, CUDA graph
    "fp32": (FP32, False, False, False, False),
    "bf16": (BF16, False, False, False, False),
    "bf16_cl": (BF16, True, False, False, False),
    "bf16_cl_bench": (BF16, True, True, False, False),
    "bf16_cl_graph": (BF16, True, False, False, True),
    "bf16_cl_compile": (BF16, True, False, True, False),
    "bf16_cl_compile_graph": (BF16, True, False, True, True),
    "fp16_cl_compile_graph": (FP16, True, False, True, True),
}


class Body(nn.Module):
    """``post_quant_conv`` then ``decoder``: the part of ``VQModel.decode`` after the lookup."""

    def __init__(self, tok):
        super().__init__()
        self.post_quant_conv, self.decoder = tok.post_quant_conv, tok.decoder

    def forward(self, z):
        return self.decoder(self.post_quant_conv(z))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    """Seconds of one call: CUDA events on the GPU, a host clock after a sync elsewhere."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_decoder(tok, spec, args, grid, bodies):
    """codes (c, N) -> images (c, 3, H, W) for one variant; cast/compiled bodies are shared by key."""
    dtype, cl, _, comp, graph = spec
    if (dtype, cl, comp) not in bodies:
        t = copy.deepcopy(tok).to(dtype)
        if cl:
            t.channels_last()
        body = Body(t)
        bodies[(dtype, cl, comp)] = (t, torch.compile(body, mode=args.compile_mode, dynamic=False) if comp else body)
    t, body = bodies[(dtype, cl, comp)]
    fmt = torch.channels_last if cl else torch.contiguous_format

    def eager(codes):
        return body(t.quantize.lookup(codes, grid, dtype).contiguous(memory_format=fmt))

    if not graph:
        return eager
    graphs = {}

    def replay(codes):
        if codes.shape[0] not in graphs:  # warm up on a side stream, then capture once per shape
            static, side = codes.clone(), torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    eager(static)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = eager(static)
            graphs[codes.shape[0]] = (g, static, out)
        g, static, out = graphs[codes.shape[0]]
        static.copy_(codes)
        g.replay()
        return out

    return replay


def to_u8(img):
    """generate's uint8 pixels from [-1, 1]-clamped float images."""
    return ((img + 1) * 127.5).round().to(torch.uint8)


def run_row(name, spec, chunk, tok, codes, args, device, bodies, ref):
    row = {"variant": name, "chunk": chunk, "dtype": str(spec[0]).replace("torch.", ""), "channels_last": spec[1],
           "cudnn_benchmark": spec[2], "compile": spec[3], "cuda_graph": spec[4]}
    if spec[4] and device.type != "cuda":
        return {**row, "status": "skipped: CUDA graphs need CUDA"}
    if spec[3] and device.type != "cuda" and not args.compile:
        return {**row, "status": "skipped: compile on CPU needs --compile"}
    torch.backends.cudnn.benchmark = spec[2]
    n = codes.shape[1]
    grid = (math.isqrt(n), n // math.isqrt(n))
    dec = make_decoder(tok, spec, args, grid, bodies)
    h, w = grid[0] * tok.downsample, grid[1] * tok.downsample
    out = torch.empty(codes.shape[0], tok.in_channels, h, w, dtype=spec[0], device=device)

    def call():
        for s in range(0, codes.shape[0], chunk):
            out[s:s + chunk].copy_(dec(codes[s:s + chunk]))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        first = timed(call, device)
        for _ in range(args.warmup):
            call()
        times = [timed(call, device) for _ in range(args.repeats)]
        img = out.float().clamp(-1, 1)
    med = statistics.median(times)
    row.update(first_s=first, median_s=med, min_s=min(times), images_per_s=codes.shape[0] / med,
               peak_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None)
    if name == "fp32" and "img" not in ref:
        ref["img"] = img.clone()
    if "img" in ref:
        diff = (img - ref["img"]).abs()
        mse = (to_u8(img).float() - to_u8(ref["img"]).float()).pow(2).mean().item()
        row.update(max_abs_err=diff.max().item(), mean_abs_err=diff.mean().item(),
                   psnr_db=10 * math.log10(255**2 / mse) if mse > 0 else "inf")
    return {**row, "status": "ok"}


def op_family(name: str) -> str:
    for key, fam in (("conv", "conv"), ("group_norm", "group_norm"), ("sigmoid", "swish sigmoid"),
                     ("aten::mul", "mul (swish, attn scale)"), ("bmm", "attention bmm"), ("softmax", "attention softmax"),
                     ("upsample", "upsample"), ("aten::add", "residual add"), ("copy", "copy / layout"),
                     ("embedding", "lookup")):
        if key in name:
            return fam
    return "other"


def parts(tok, args, device, bodies, parts_out):
    """Profile one eager bf16_cl chunk by op family, then time GN + swish and attention alone."""
    spec, c = VARIANTS["bf16_cl"], min(64, args.batch)
    t = bodies.get((BF16, True, False)) or make_decoder(tok, spec, args, (16, 16), bodies) and bodies[(BF16, True, False)]
    t = t[0]
    codes = torch.randint(0, tok.codebook_size, (c, 256), device=device)
    z = t.post_quant_conv(t.quantize.lookup(codes, (16, 16), BF16).contiguous(memory_format=torch.channels_last))
    shapes, hooks = {}, []
    for mname, m in t.decoder.named_modules():  # norms followed by swish: res-block norm1/norm2, norm_out
        if isinstance(m, nn.GroupNorm) and mname.split(".")[-1] in ("norm1", "norm2", "norm_out"):
            hooks.append(m.register_forward_hook(lambda m, i, o: shapes.setdefault((m, tuple(i[0].shape)), 0)))
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        t.decoder(z)
        for hk in hooks:
            hk.remove()
        sync(device)
        with torch.profiler.profile(activities=acts) as prof:
            t.decoder(z)
            sync(device)
    fams = {}
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for ev in prof.key_averages():
        fams[op_family(ev.key)] = fams.get(op_family(ev.key), 0.0) + getattr(ev, attr, 0.0) / 1e3
    total = sum(fams.values())
    parts_out["ops"] = {"chunk": c, "total_ms": total, "ms": dict(sorted(fams.items(), key=lambda kv: -kv[1]))}

    def med_ms(fn):
        return 1e3 * statistics.median(timed(fn, device) for _ in range(args.repeats))

    compile_ok = device.type == "cuda" or args.compile
    fused = torch.compile(lambda norm, x: _swish(norm(x)), dynamic=False) if compile_ok else None
    rows = []
    with torch.inference_mode():
        for (m, shape) in shapes:  # one entry per (module, shape): every call site counted once
            x = torch.randn(shape, device=device, dtype=BF16).contiguous(memory_format=torch.channels_last)
            r = {"shape": list(shape), "eager_ms": med_ms(lambda: _swish(m(x)))}
            if fused is not None:
                fused(m, x)
                r["compiled_ms"] = med_ms(lambda: fused(m, x))
            rows.append(r)
    parts_out["gn_swish"] = {"calls": rows, "eager_ms_total": sum(r["eager_ms"] for r in rows),
                             "compiled_ms_total": sum(r.get("compiled_ms", 0.0) for r in rows) if fused else None}

    def sdpa_attn(blk, x):
        b, ch, hh, ww = x.shape
        y = blk.norm(x)
        q, k, v = (p(y).flatten(2).transpose(1, 2).unsqueeze(1) for p in (blk.q, blk.k, blk.v))  # (B,1,HW,C)
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b, ch, hh, ww)
        return x + blk.proj_out(o.contiguous(memory_format=torch.channels_last))

    blocks = [t.decoder.mid[1], *t.decoder.conv_blocks[0].attn]
    x = torch.randn(c, blocks[0].q.in_channels, 16, 16, device=device, dtype=BF16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        err = (sdpa_attn(blocks[0], x).float() - blocks[0](x).float()).abs().max().item()
        parts_out["attention"] = {"blocks": len(blocks), "shape": list(x.shape), "eager_ms_per_block": med_ms(lambda: blocks[0](x)),
                                  "sdpa_ms_per_block": med_ms(lambda: sdpa_attn(blocks[0], x)), "sdpa_max_abs_diff": err}


def fmt(v, spec=".4g"):
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def write(out: Path, meta, rows, parts_out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "vq_decode_study.json").write_text(json.dumps({"meta": meta, "rows": rows, "parts": parts_out}, indent=1))
    lines = [f"VQ decode, {meta['tokenizer']}, {meta['batch']} codes x {meta['tokens']} on {meta['device_name']} "
             f"(torch {meta['torch']}, weights {meta['weights']})", "",
             "| variant | chunk | first call s | median s | images/s | max abs err | PSNR dB | peak GB | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['chunk']} | {fmt(r.get('first_s'))} | {fmt(r.get('median_s'))} | "
                     f"{fmt(r.get('images_per_s'), '.1f')} | {fmt(r.get('max_abs_err'))} | {fmt(r.get('psnr_db'), '.2f')} | "
                     f"{fmt(r.get('peak_gb'), '.2f')} | {r['status']} |")
    if "ops" in parts_out:
        o = parts_out["ops"]
        lines += ["", f"Eager bf16_cl decoder, one chunk of {o['chunk']}: {o['total_ms']:.2f} ms of op self time", "",
                  "| op family | ms | share |", "|---|---|---|"]
        lines += [f"| {k} | {v:.3f} | {v / max(o['total_ms'], 1e-9):.0%} |" for k, v in o["ms"].items()]
    if "gn_swish" in parts_out:
        g = parts_out["gn_swish"]
        lines += ["", f"GroupNorm + swish, {len(g['calls'])} calls: eager {g['eager_ms_total']:.3f} ms, "
                  f"compiled {fmt(g['compiled_ms_total'])} ms"]
    if "attention" in parts_out:
        a = parts_out["attention"]
        lines += [f"Attention ({a['blocks']} blocks at {a['shape']}): eager {a['eager_ms_per_block']:.3f} ms, "
                  f"SDPA {a['sdpa_ms_per_block']:.3f} ms per block (max abs diff {a['sdpa_max_abs_diff']:.3g})"]
    lines += [f"{k}: {v}" for k, v in parts_out.items() if k.endswith("_error")]
    (out / "vq_decode_study.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokenizer", default="vq-f16")
    ap.add_argument("--weights", default=None, help="checkpoint for tokenizer.load_weights (default: seeded random)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--chunks", default="all,64", help="comma list of chunk sizes; 'all' = the whole batch")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also compile on CPU")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    ap.add_argument("--no-parts", action="store_true", help="skip the op profile and GN/attention timings")
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.environ["OUT"], "vq") if os.environ.get("OUT") else "/tmp/vq_study")
    args = ap.parse_args()
    t_start, device = time.perf_counter(), torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 = true float32
    torch.manual_seed(args.seed)
    tok = TOKENIZERS.get(args.tokenizer)()
    if args.weights:
        tok.load_weights(args.weights)
    tok = tok.eval().to(device)
    codes = torch.randint(0, tok.codebook_size, (args.batch, 256), device=device, generator=None)
    chunks = sorted({args.batch if c == "all" else min(int(c), args.batch) for c in args.chunks.split(",")}, reverse=True)
    meta = {"tokenizer": args.tokenizer, "batch": args.batch, "tokens": codes.shape[1], "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "weights": args.weights or f"random (seed {args.seed})",
            "compile_mode": args.compile_mode, "repeats": args.repeats, "tf32": False}
    rows, parts_out, bodies, ref = [], {}, {}, {}
    for name in args.variants.split(","):
        for chunk in chunks:
            if time.perf_counter() - t_start > args.budget_s:
                rows.append({"variant": name, "chunk": chunk, "status": "skipped: budget"})
                continue
            try:
                rows.append(run_row(name, VARIANTS[name], chunk, tok, codes, args, device, bodies, ref))
            except Exception as exc:  # one failed variant must not lose the table
                rows.append({"variant": name, "chunk": chunk, "status": f"error: {type(exc).__name__}: {exc}"[:300]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write(Path(args.out), meta, rows, parts_out)
    torch.backends.cudnn.benchmark = False
    if not args.no_parts and time.perf_counter() - t_start <= args.budget_s:
        try:
            parts(tok, args, device, bodies, parts_out)
        except Exception as exc:
            parts_out["parts_error"] = f"{type(exc).__name__}: {exc}"[:300]
    meta["elapsed_s"] = time.perf_counter() - t_start
    print(write(Path(args.out), meta, rows, parts_out))


if __name__ == "__main__":
    main()
