"""VQ decode speed study: codes (B, 256) -> images under dtype, layout, compile and CUDA-graph variants.

Issue #17 goal 2: 256 VQ-f16 images in <= 0.15 s on an H200, pixels within bf16 precision of float32.
GPU machine (10-minute limit; no row starts after --budget-s, the outputs are rewritten after each row)::

    source benchmarks/device_env.sh; python3 benchmarks/vq_decode_study.py --out $OUT/vq

CPU smoke test (< 1 minute): ``python3 benchmarks/vq_decode_study.py --device cpu --tokenizer vq-f4-tiny --batch 8``

Variants change ``post_quant_conv`` + ``decoder`` (aimkit/tokenizers/vq.py); the codebook lookup stays as in
``VQModel.decode``, but a CUDA graph captures the whole decode per chunk shape. Names: fp32/bf16/fp16 with
_cl (channels_last), _bench (cudnn.benchmark), _compile (--compile-mode), _graph, _ref (GroupNorm + swish
on PyTorch instead of aimkit's fused kernel, policy vq_norm). The first fp32 or fp32_ref row (TF32 off) is the
reference. generate() decodes in the generator's dtype (bf16 in ``aimkit bench``), contiguous, chunks of 16.
Seeded random weights (or --weights), uniform random codes. Per row: first call s (compile, capture), median
of --repeats, images/s, max abs error vs fp32 after the clamp to [-1, 1] (decode's raw scale), PSNR (dB) of
generate's uint8 pixels, peak GB. Then, on one eager bf16_ref chunk of 64: ms per top-level op family, GroupNorm
+ swish eager vs compiled (a fused kernel's saving), the attention blocks eager vs scaled_dot_product_attention.
Writes vq_decode_study.json and vq_decode_study.md to --out.
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

from aimkit.bench.timing import peak_gb, reset_peak, time_call, time_calls  # noqa: E402
from aimkit.registry import TOKENIZERS  # noqa: E402
from aimkit.tokenizers.vq import _swish  # noqa: E402

BF16, CL, TOKENS, GRID = torch.bfloat16, torch.channels_last, 256, (16, 16)  # 16x16 codes (vq-f4-tiny: 64 px)
VARIANTS = ("fp32_ref", "bf16_ref", "bf16", "bf16_graph",
            "bf16_cl", "bf16_cl_bench", "bf16_cl_graph", "bf16_cl_compile", "bf16_cl_compile_graph",
            "fp16_cl_compile_graph")
VARIANT_FLAGS = ("cl", "bench", "compile", "graph", "ref")  # channels_last, cudnn.benchmark, torch.compile,
# CUDA graph, GroupNorm + swish on the PyTorch reference (policy vq_norm=reference) instead of the fused kernel
FAMILIES = (("conv", "conv (+ bias)"), ("group_norm", "group_norm"), ("sigmoid", "swish: sigmoid"),
            ("aten::mul", "swish: mul (+ attn scale)"), ("bmm", "attention: bmm"), ("softmax", "attention: softmax"),
            ("upsample", "upsample"), ("aten::add", "residual add"))


def spec_of(name):  # (dtype, channels_last, cudnn.benchmark, torch.compile, CUDA graph, reference norm) from the name
    p = name.split("_")
    return {"fp32": torch.float32, "bf16": BF16, "fp16": torch.float16}[p[0]], *(k in p for k in VARIANT_FLAGS)


def make_decoder(tok, spec, args, bodies):
    """codes (c, 256) -> images (c, 3, H, W) for one variant; cast/compiled bodies are shared."""
    dtype, cl, _, comp, graph, ref = spec
    if (dtype, cl, comp, ref) not in bodies:
        t = copy.deepcopy(tok).to(dtype).channels_last(cl)
        for m in t.modules():  # the norm blocks hold the policy that picks the fused GroupNorm + swish
            if hasattr(m, "policy"):
                m.policy = m.policy.replace(vq_norm="reference" if ref else "auto")
        body = nn.Sequential(t.post_quant_conv, t.decoder)  # VQModel.decode after the lookup
        body = torch.compile(body, mode=args.compile_mode, dynamic=False) if comp else body
        bodies[(dtype, cl, comp, ref)] = (t, body)
    t, body = bodies[(dtype, cl, comp, ref)]
    graphs = {}

    def eager(codes):  # as VQModel.decode, without its checks
        return body(t.quantize.lookup(codes, GRID, dtype).contiguous(memory_format=t._memory_format))

    def replay(codes):
        if codes.shape[0] not in graphs:  # warm up on a side stream, then capture once per chunk shape
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

    return replay if graph else eager


def run_row(name, chunk, tok, codes, args, device, bodies, ref, left_s) -> dict:
    spec, cuda = spec_of(name), device.type == "cuda"
    row = dict(zip(("variant", "chunk", "dtype", "channels_last", "cudnn_benchmark", "compile", "cuda_graph",
                    "reference_norm"),
                   (name, chunk, str(spec[0])[6:], *spec[1:])))
    shape_key = ("compiled", spec[0], spec[1], spec[5], chunk)  # a compiled body compiles again for each chunk shape
    if spec[4] and not cuda or spec[3] and not (cuda or args.compile):
        return {**row, "status": "skipped: CUDA graphs need CUDA" if spec[4] else "skipped: CPU compile: --compile"}
    if spec[3] and shape_key not in bodies and left_s < args.compile_reserve_s:
        return {**row, "status": "skipped: budget (a new compile)"}
    bodies[shape_key], torch.backends.cudnn.benchmark = spec[3], spec[2]
    dec, f = make_decoder(tok, spec, args, bodies), tok.downsample
    out = torch.empty(codes.shape[0], tok.in_channels, GRID[0] * f, GRID[1] * f, dtype=spec[0], device=device)

    def call():
        for s in range(0, codes.shape[0], chunk):
            out[s:s + chunk].copy_(dec(codes[s:s + chunk]))

    reset_peak(device)
    with torch.inference_mode():
        first = time_call(call, device)[0]
        [call() for _ in range(args.warmup)]
        times = [time_call(call, device)[0] for _ in range(args.repeats)]
        img = out.float().clamp(-1, 1)
    med = statistics.median(times)
    row.update(first_s=first, median_s=med, min_s=min(times), images_per_s=len(codes) / med, peak_gb=peak_gb(device))
    ref.setdefault("img", img.clone()) if name in ("fp32", "fp32_ref") else None  # the first fp32 row's pixels
    if "img" in ref:
        u8 = lambda x: ((x + 1) * 127.5).round()  # noqa: E731  (generate's to_uint8 of [-1, 1]-clamped pixels)
        mse = (u8(img) - u8(ref["img"])).pow(2).mean().item()
        row["max_abs_err"] = (img - ref["img"]).abs().max().item()
        row["psnr_db"] = 10 * math.log10(255**2 / mse) if mse else "inf"
    return {**row, "status": "ok"}


def op_families(decoder, z, device) -> dict:
    """ms per top-level op family (FAMILIES) of one profiled ``decoder(z)`` after two warm-up calls."""
    cuda = device.type == "cuda"
    with torch.inference_mode():
        decoder(z), decoder(z)
        with torch.profiler.profile() as prof:  # CPU, and CUDA where there is one
            time_call(lambda: decoder(z), device)  # synchronises before returning
    fams = {}
    for ev in prof.events():  # top-level ops, their children's kernels included
        if str(ev.device_type).endswith("CPU") and ev.cpu_parent is None and not ev.name.startswith("cuda"):
            fam = next((f for k, f in FAMILIES if k in ev.name), "other: " + ev.name)
            fams[fam] = fams.get(fam, 0.0) + (getattr(ev, "device_time_total", 0) if cuda else ev.cpu_time_total) / 1e3
    ms = dict(sorted(fams.items(), key=lambda kv: -kv[1]))
    return {"chunk": z.shape[0], "total_ms": sum(fams.values()), "ms": ms}


def parts(tok, args, device, bodies, res):
    """One eager bf16 chunk (reference norm): time per op family; GroupNorm + swish (eager, compiled,
    aimkit's fused kernel) and attention timed alone."""
    c, key, cuda = min(64, args.batch), (BF16, False, False, True), device.type == "cuda"
    make_decoder(tok, spec_of("bf16_ref"), args, bodies)  # builds the bf16 reference-norm copy if not there yet
    t, codes = bodies[key][0], torch.randint(0, tok.codebook_size, (c, TOKENS), device=device)
    with torch.inference_mode():
        z = t.post_quant_conv(t.quantize.lookup(codes, GRID, BF16).contiguous())
    sites = {}  # (C, H, W) -> [a GroupNorm followed by swish at that shape, number of such calls]

    def count(m, inputs, output):
        sites.setdefault(tuple(inputs[0].shape[1:]), [m, 0])[1] += 1

    hooks = [m.register_forward_hook(count) for n, m in t.decoder.named_modules()
             if isinstance(m, nn.GroupNorm) and n.split(".")[-1] in ("norm1", "norm2", "norm_out")]
    with torch.inference_mode():
        t.decoder(z)
        [h.remove() for h in hooks]
    res["ops"] = op_families(t.decoder, z, device)
    if cuda:  # the same chunk channels_last (convolutions in cuDNN's native NHWC layout), benchmark off and on
        make_decoder(tok, spec_of("bf16_cl_ref"), args, bodies)
        t_cl = bodies[(BF16, True, False, True)][0]
        z_cl = z.contiguous(memory_format=CL)
        res["ops_channels_last"] = op_families(t_cl.decoder, z_cl, device)
        torch.backends.cudnn.benchmark = True
        res["ops_channels_last_bench"] = op_families(t_cl.decoder, z_cl, device)
        torch.backends.cudnn.benchmark = False
    med_ms = lambda fn: 1e3 * statistics.median(time_calls(fn, device, args.repeats, warmup=1))  # noqa: E731
    torch._dynamo.config.cache_size_limit = 64  # one graph per shape below (alias of recompile_limit)
    gn = lambda x, w, b: _swish(F.group_norm(x, 32, w, b, 1e-6))  # noqa: E731
    fused, rows = torch.compile(gn, dynamic=False) if cuda or args.compile else None, []
    with torch.inference_mode():
        for shape, (m, calls) in sites.items():
            x = torch.randn(c, *shape, device=device, dtype=BF16)
            rows.append({"shape": [c, *shape], "calls": calls, "eager_ms": med_ms(lambda: gn(x, m.weight, m.bias))})
            if fused is not None:
                rows[-1]["compiled_ms"] = med_ms(lambda: fused(x, m.weight, m.bias))
            if cuda:
                from aimkit.kernels.group_norm import group_norm_swish

                rows[-1]["kernel_ms"] = med_ms(lambda: group_norm_swish(x, m.weight, m.bias, 32, 1e-6))
    res["gn_swish"] = {"chunk": c, "shapes": rows, "calls": sum(r["calls"] for r in rows),
                       "eager_ms_total": sum(r["calls"] * r["eager_ms"] for r in rows),
                       "compiled_ms_total": sum(r["calls"] * r["compiled_ms"] for r in rows) if fused else None,
                       "kernel_ms_total": sum(r["calls"] * r["kernel_ms"] for r in rows) if cuda else None}

    def sdpa_attn(blk, x):  # the same block with PyTorch's fused attention (single head, head dim C)
        q, k, v = (p(blk.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1) for p in (blk.q, blk.k, blk.v))
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(x.shape)  # q: (B, 1, HW, C)
        return x + blk.proj_out(o.contiguous(memory_format=CL))

    blocks = [t.decoder.mid[1], *t.decoder.conv_blocks[0].attn]  # all at the code grid
    x = torch.randn(c, blocks[0].q.in_channels, *GRID, device=device, dtype=BF16)
    with torch.inference_mode():
        res["attention"] = {"chunk": c, "blocks": len(blocks), "shape": list(x.shape),
                            "sdpa_max_abs_diff": (sdpa_attn(blocks[0], x) - blocks[0](x)).abs().max().item(),
                            "eager_ms_per_block": med_ms(lambda: blocks[0](x)),
                            "sdpa_ms_per_block": med_ms(lambda: sdpa_attn(blocks[0], x))}


def fmt(v, spec=".4g"):
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def write(out: Path, meta, rows, res) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vq_decode_study.json").write_text(json.dumps({"meta": meta, "rows": rows, "parts": res}, indent=1))
    lines = [f"VQ decode, {meta['tokenizer']}, batch {meta['batch']}, {meta['device_name']}, torch {meta['torch']}, "
             f"weights: {meta['weights']}", "", "| variant | chunk | first call s | median s | images/s | "
             "max abs err | PSNR dB | peak GB | status |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['chunk']} | {fmt(r.get('first_s'))} | {fmt(r.get('median_s'))} | "
              f"{fmt(r.get('images_per_s'), '.1f')} | {fmt(r.get('max_abs_err'))} | {fmt(r.get('psnr_db'), '.2f')} | "
              f"{fmt(r.get('peak_gb'), '.2f')} | {r['status']} |" for r in rows]
    o, g, a = res.get("ops"), res.get("gn_swish"), res.get("attention")
    lines += ["", f"Eager bf16_ref decoder, chunk {o['chunk']}, {o['total_ms']:.2f} ms in top-level ops: " + ", ".join(
        f"{k} {v:.3f} ms ({v / max(o['total_ms'], 1e-9):.0%})" for k, v in o["ms"].items())] if o else []
    lines += ["", f"GroupNorm + swish alone, {g['calls']} calls at chunk {g['chunk']}: eager {g['eager_ms_total']:.3f}"
              f" ms, compiled (fused) {fmt(g['compiled_ms_total'], '.3f')} ms, aimkit kernel "
              f"{fmt(g['kernel_ms_total'], '.3f')} ms"] if g else []
    lines += [f"Attention, {a['blocks']} blocks at {a['shape']}: eager {a['eager_ms_per_block']:.3f} ms, SDPA "
              f"{a['sdpa_ms_per_block']:.3f} ms per block (max abs diff {a['sdpa_max_abs_diff']:.3g})"] if a else []
    lines += [f"parts error: {res['error']}"] if "error" in res else []
    (out / "vq_decode_study.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokenizer", default="vq-f16")
    ap.add_argument("--weights", default=None, help="checkpoint for load_weights (default: seeded random init)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--chunks", default="all,64", help="comma list of chunk sizes; all = the whole batch")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list (see the docstring)")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls (median) after --warmup untimed ones")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also compile on CPU")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no new row after this many seconds")
    ap.add_argument("--compile-reserve-s", type=float, default=180.0, help="no new compile with less budget left")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/vq_study")
    args = ap.parse_args()
    t0, device, out = time.perf_counter(), torch.device(args.device), Path(args.out)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 is float32
    torch.manual_seed(0)
    tok = TOKENIZERS.get(args.tokenizer)()
    tok = (tok.load_weights(args.weights) if args.weights else tok).eval().to(device)
    codes = torch.randint(0, tok.codebook_size, (args.batch, TOKENS), device=device)
    chunks = sorted({args.batch if c == "all" else min(int(c), args.batch) for c in args.chunks.split(",")})[::-1]
    meta = {**vars(args), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "weights": args.weights or "random init, seed 0", "tf32": False}
    rows, res, bodies, ref = [], {}, {}, {}
    for name in args.variants.split(","):
        for chunk in chunks:
            left = args.budget_s - (time.perf_counter() - t0)
            try:
                rows.append(run_row(name, chunk, tok, codes, args, device, bodies, ref, left) if left > 0
                            else {"variant": name, "chunk": chunk, "status": "skipped: budget"})
            except Exception as exc:  # one failed variant must not lose the table
                rows.append({"variant": name, "chunk": chunk, "status": f"error: {type(exc).__name__}: {exc}"[:300]})
            torch.cuda.empty_cache() if device.type == "cuda" else None
            write(out, meta, rows, res)
    torch.backends.cudnn.benchmark = False
    if time.perf_counter() - t0 <= args.budget_s:  # the op profile and GN/attention timings
        try:
            parts(tok, args, device, bodies, res)
        except Exception as exc:
            res["error"] = f"{type(exc).__name__}: {exc}"[:300]
    print(write(out, {**meta, "elapsed_s": time.perf_counter() - t0}, rows, res))


if __name__ == "__main__":
    main()
