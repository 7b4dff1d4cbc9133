"""Step-by-step measurement of the fused decode kernels (benchmarks/notes.md, "Changes").

On a GPU machine with the kernels installed (``source benchmarks/device_env.sh`` sets them up)::

    python benchmarks/decode_kernels.py                       # everything below, ~3 minutes
    python benchmarks/decode_kernels.py --parts micro,step --models aim-b

Parts:

* ``micro``: the SSM state update alone on one layer's state (AiM-B and AiM-XL head shapes):
  mamba-ssm's ``selective_state_update`` (when installed; aimkit no longer uses it) against
  aimkit's ``ssm_step_`` with several tilings and with the gated norm folded in (``z``), and
  ``conv_step_`` then ``ssm_step_``; reports microseconds and the achieved state bandwidth
  (state bytes read + written / time).
* ``step``: one whole decode step (CUDA-graph replay) per model and batch under each execution
  policy of ``--policies`` (default below: each change measured on its own), bf16 state, plus the
  float32 state with every kernel; and the largest logit difference of each variant from the
  first after the same steps. The default variants (``ExecutionPolicy`` changes):

  - ``reference``: PyTorch convolution, state update and glue;
  - ``ssm``: aimkit's state kernel (``state_update``);
  - ``ssm,norm``: and the fused glue between sublayers (``decode_glue``);
  - ``ssm,norm,gnorm``: and the gated norm folded into both (``fold_gated_norm``; the convolution
    still in PyTorch);
  - ``all``: and the convolution in its own kernel (``conv_step``): the default policy.
* ``generate``: tokens-only ``generate`` for the acceptance rows (AiM-B/L/XL at 256 images, AiM-XL
  at 16), median of ``--repeats``, with and without the fused sampler (policy ``sampling``).
* ``profile``: the top kernels of one AiM-B decode step at ``--profile-rows`` rows with every
  kernel on.
* ``breakdown``: where one profiled tokens-only ``generate`` of AiM-B at 256 images spends its
  wall time (kernel families, GPU idle time).

Variants measured slower and removed from aimkit (the convolution inside the state kernel, the
convolution in ``in_proj``'s epilogue, programmatic dependent launch, multi-tile walks, concurrent
graph branches) are recorded in benchmarks/notes.md and docs/benchmarks.md.

Prints a table per part and writes ``$OUT/decode_kernels.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import aimkit  # noqa: E402
from aimkit.bench import build_bench_model  # noqa: E402
from aimkit.bench.timing import graphed_call_seconds  # noqa: E402
from aimkit.kernels.mamba_ssm import kernel_info  # noqa: E402
from aimkit.policy import ExecutionPolicy, default_policy  # noqa: E402
from aimkit.samplers._cuda_graph import DecodeGraph, clear_decode_graphs  # noqa: E402

RESULTS: dict = {}

# --policies names -> AIMKIT_DECODE_KERNELS values, read by default_policy (reference: none)
_DECODE_VARIANTS = {"reference": "none", "ssm": "ssm", "ssm,norm": "ssm,norm", "ssm,norm,gnorm": "ssm,norm,gnorm",
                    "all": "all"}


def _policy(variant: str, **changes) -> ExecutionPolicy:
    """The execution policy of a ``--policies`` variant, with ``changes`` applied."""
    value = _DECODE_VARIANTS.get(variant, variant)
    return default_policy({"AIMKIT_DECODE_KERNELS": value}).replace(**changes)


def _cuda_ms(fn, iters: int = 50, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _graphed_ms(fn, calls: int = 20, replays: int = 10) -> float:
    """Device time per call of ``fn`` with launch overhead removed (``calls`` calls in one graph)."""
    return graphed_call_seconds(fn, calls, replays) * 1e3


def _selective_state_update():
    """mamba-ssm's decode-step kernel, for comparison only (None when not installed)."""
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except Exception:  # noqa: BLE001
        return None
    return selective_state_update


def _ssm_micro_variants(rows: int, nheads: int, state_dtype: torch.dtype, blocks, warps_list,
                        selective_state_update) -> tuple[dict, int]:
    """The timed state-update variants on fresh inputs of one layer's shape, and the state bytes
    each call moves (read + written)."""
    from aimkit.kernels.conv_step import conv_step_
    from aimkit.kernels.ssm_step import ssm_step_

    P, N = 64, 128
    state = torch.randn(rows, nheads, P, N, device="cuda", dtype=state_dtype)
    xbc = torch.randn(rows, nheads * P + 2 * N, device="cuda", dtype=torch.bfloat16)
    x = xbc[:, : nheads * P].unflatten(-1, (nheads, P))
    B = xbc[:, nheads * P: nheads * P + N].unsqueeze(1)
    C = xbc[:, nheads * P + N:].unsqueeze(1)
    dt = torch.randn(rows, nheads, device="cuda", dtype=torch.bfloat16)
    dt_bias = torch.randn(nheads, device="cuda")
    A_log = torch.rand(nheads, device="cuda")
    D = torch.randn(nheads, device="cuda")
    nbytes = 2 * state.numel() * state.element_size()
    variants = {}
    # ceilings: the same bytes through PyTorch's in-place scale and a copy
    other = torch.empty_like(state)
    variants["ceiling: state.mul_(1.0) (in place)"] = lambda: state.mul_(1.0)
    variants["ceiling: other.copy_(state)"] = lambda: other.copy_(state)
    if selective_state_update is not None:
        A = -torch.exp(A_log)
        hp = (nheads, P)
        variants["mamba-ssm selective_state_update"] = lambda: selective_state_update(
            state, x, dt.unsqueeze(-1).expand(rows, nheads, P), A[:, None, None].expand(*hp, N), B, C,
            D=D[:, None].expand(hp), z=None, dt_bias=dt_bias[:, None].expand(hp), dt_softplus=True)
    variants["aimkit ssm_step_ (default tiling)"] = lambda: ssm_step_(state, x, dt, dt_bias, A_log, B, C, D)
    z = torch.randn(rows, nheads, P, device="cuda", dtype=torch.bfloat16)
    norm_w = torch.randn(nheads * P, device="cuda", dtype=torch.bfloat16)
    variants["aimkit ssm_step_ + folded gated norm (default tiling)"] = lambda: ssm_step_(
        state, x, dt, dt_bias, A_log, B, C, D, z=z, norm_weight=norm_w)
    # the convolution too: its own kernel, then the state kernel
    ring = torch.randn(rows, 4, xbc.shape[1], device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    conv_w = torch.randn(xbc.shape[1], 4, device="cuda", dtype=torch.bfloat16)
    conv_b = torch.randn(xbc.shape[1], device="cuda", dtype=torch.bfloat16)
    position = torch.full((), 130, dtype=torch.long, device="cuda")

    def conv_then_ssm():
        xc = conv_step_(xbc, ring, conv_w, conv_b, position)
        ssm_step_(state, xc[:, :nheads * P].unflatten(-1, (nheads, P)), dt, dt_bias, A_log,
                  xc[:, nheads * P:nheads * P + N].unsqueeze(1),
                  xc[:, nheads * P + N:].unsqueeze(1), D, z=z, norm_weight=norm_w)

    variants["aimkit conv_step_ + ssm_step_ + folded gated norm"] = conv_then_ssm
    for bp in blocks:
        for warps in warps_list:
            variants[f"aimkit block_p={bp} warps={warps}"] = (
                lambda bp=bp, warps=warps: ssm_step_(state, x, dt, dt_bias, A_log, B, C, D, block_p=bp,
                                                     num_warps=warps))
    return variants, nbytes


def _micro_ssm(args) -> list[dict]:
    """Rows of the state-update micro-benchmark: every layer shape, row count and state dtype."""
    selective_state_update = _selective_state_update()
    out = []
    layers = [(f"{m} layer", {"aim-b": 24, "aim-xl": 48}[m]) for m in args.micro_models]
    for label, nheads in () if args.conv_micro_only else layers:
        for rows in args.micro_rows:
            for state_dtype in args.micro_dtypes:
                variants, nbytes = _ssm_micro_variants(rows, nheads, state_dtype, args.micro_blocks,
                                                       args.micro_warps, selective_state_update)
                for name, fn in variants.items():
                    ms = _graphed_ms(fn)
                    out.append({"shape": label, "rows": rows, "state_dtype": str(state_dtype).split(".")[-1],
                                "variant": name, "us": ms * 1e3, "state_GBps": nbytes / ms / 1e6})
    return out


def _micro_conv(args) -> list[dict]:
    """Rows of the convolution micro-benchmark (``--conv-micro``): block and warp sweeps."""
    from aimkit.kernels.conv_step import conv_step_

    out = []
    conv_shapes = (("aim-b conv", 1792), ("aim-xl conv", 3328))
    for label, conv_dim in (conv_shapes if args.conv_micro or args.conv_micro_only else ()):
        for rows in (32, 512):
            state = torch.randn(rows, 4, conv_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            proj = torch.randn(rows, conv_dim + 2000, device="cuda", dtype=torch.bfloat16)
            xc = proj[:, 1000:1000 + conv_dim]
            w = torch.randn(conv_dim, 4, device="cuda", dtype=torch.bfloat16)
            bias = torch.randn(conv_dim, device="cuda", dtype=torch.bfloat16)
            position = torch.full((), 130, dtype=torch.long, device="cuda")
            nbytes = 2 * state.numel() * 2 + 2 * xc.numel() * 2
            for block in (128, 256, 512, 1024):
                for warps in (1, 2, 4, 8):
                    ms = _graphed_ms(lambda: conv_step_(xc, state, w, bias, position, block_c=block,
                                                        num_warps=warps))
                    out.append({"shape": label, "rows": rows, "state_dtype": "bfloat16",
                                "variant": f"conv_step_ block_c={block} warps={warps}", "us": ms * 1e3,
                                "state_GBps": nbytes / ms / 1e6})
    return out


def _print_micro(out: list[dict]) -> None:
    print("\n## micro: one layer's state update")
    print(f"{'shape':13s} {'rows':>5s} {'state':>8s} {'us':>8s} {'GB/s':>7s}  variant")
    for r in out:
        print(f"{r['shape']:13s} {r['rows']:5d} {r['state_dtype']:>8s} {r['us']:8.1f} {r['state_GBps']:7.0f}  "
              f"{r['variant']}")


def part_micro(args) -> None:
    out = _micro_ssm(args) + _micro_conv(args)
    RESULTS["micro"] = out
    _print_micro(out)


def _step_ms(model, rows: int, replays: int = 30):
    labels = torch.arange(rows, device="cuda") % model.num_classes
    with torch.inference_mode():
        cond = model.condition(labels)
        graph = DecodeGraph(model, cond, rows)
        graph.start(cond)
        params = graph.inference_params
        model.prefill(cond, params)
        params.advance(128)
        graph.tokens.copy_(torch.randint(model.vocab_size, (rows,), device="cuda",
                                         generator=torch.Generator("cuda").manual_seed(0)))
        ms = _cuda_ms(graph.graph.replay, iters=replays)
        # same-state logits for the accuracy column: restart and replay a fixed number of steps
        graph.start(cond)
        model.prefill(cond, params)
        params.advance(1)
        for _ in range(8):
            graph.graph.replay()
            params.advance(1)
        logits = graph.logits.float().clone()
    del graph
    return ms, logits


def part_step(args) -> None:
    """Policy variants (bf16 state), then the float32 state with every kernel."""
    out = []
    for name in args.models:
        model = build_bench_model(name, device=torch.device("cuda"), dtype=torch.bfloat16, num_tokens=256,
                              policy=default_policy())
        for state_dtype in args.state_dtypes:
            for rows in args.rows:
                ref = None
                variants = args.policies if state_dtype == "model" else ["all"]
                for variant in variants:
                    model.set_policy(_policy(variant, state_dtype=state_dtype))
                    clear_decode_graphs()
                    ms, logits = _step_ms(model, rows)
                    if ref is None:
                        ref = logits
                    diff = float((logits - ref).abs().max() / ref.abs().max())
                    out.append({"model": name, "rows": rows, "state_dtype": state_dtype, "kernels": variant,
                                "policy": model.policy.to_dict(), "step_ms": ms,
                                "images_per_s_bound": (rows // 2) / (ms * 1e-3 * 256),
                                "rel_logit_diff_vs_first": diff})
                    print(f"{name} rows {rows} state {state_dtype} policy {model.policy.describe()}: "
                          f"{ms:.3f} ms/step (rel. logit diff vs first variant {diff:.2e})", flush=True)
        del model
        clear_decode_graphs()
        torch.cuda.empty_cache()
    RESULTS["step"] = out


def part_generate(args) -> None:
    from aimkit.samplers import AutoregressiveSampler

    out = []
    plan = [("aim-b", 256), ("aim-l", 256), ("aim-xl", 16), ("aim-xl", 256)]
    for name, batch in plan:
        if name not in args.models:
            continue
        model = build_bench_model(name, device=torch.device("cuda"), dtype=torch.bfloat16, num_tokens=256,
                              policy=default_policy())
        labels = torch.arange(batch) % model.num_classes
        for sampling in ("auto", "reference"):
            model.set_policy(_policy("all", state_dtype="model", sampling=sampling))
            clear_decode_graphs()
            out.append(_time_generate(model, labels, AutoregressiveSampler(), args.repeats, name=name,
                                      fused_sampling=sampling == "auto", policy=model.policy.to_dict()))
        del model
        clear_decode_graphs()
        torch.cuda.empty_cache()
    RESULTS["generate"] = out


def _time_generate(model, labels, sampler, repeats, **fields):
    """Median seconds of tokens-only ``generate`` (after one untimed call that captures the graph)."""
    from aimkit.samplers import generate

    batch = labels.shape[0]

    def call():
        codes = generate(model, labels, cfg_scale=model.config.fid_sampling.cfg_scale, seed=0,
                         output="tokens", batch_size=batch, progress=False, sampler=sampler)
        torch.cuda.synchronize()
        return codes

    call()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    row = {**fields, "batch": batch, "seconds_per_batch": sec, "images_per_s": batch / sec,
           "seconds_all": times, "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9}
    print(f"generate {fields} batch {batch}: {sec:.3f} s/batch, {batch / sec:.1f} img/s", flush=True)
    return row


def part_breakdown(args) -> None:
    """Where one tokens-only generate call (``--breakdown``, default AiM-B at 256 images) spends its wall time."""
    from aimkit.samplers import AutoregressiveSampler, generate

    name, batch = args.breakdown.split(":")
    batch = int(batch)
    model = build_bench_model(name, device=torch.device("cuda"), dtype=torch.bfloat16, num_tokens=256,
                              policy=default_policy())
    model.set_policy(_policy("all", state_dtype="model"))
    labels = torch.arange(batch) % model.num_classes
    sampler = AutoregressiveSampler()

    def call():
        generate(model, labels, cfg_scale=model.config.fid_sampling.cfg_scale, seed=0, output="tokens",
                 batch_size=batch, progress=False, sampler=sampler)
        torch.cuda.synchronize()

    call()
    t = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    wall = time.perf_counter() - t
    events = prof.key_averages()
    kernel_s = sum(e.device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
    top = [{"name": e.key[:90], "device_ms": e.device_time_total / 1e3, "count": e.count,
            "cpu_ms": e.cpu_time_total / 1e3}
           for e in sorted(events, key=lambda e: -e.device_time_total)[:25]]
    cpu_top = [{"name": e.key[:90], "cpu_ms": e.cpu_time_total / 1e3, "count": e.count}
               for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]]
    RESULTS["breakdown"] = {"model": name, "batch": batch, "wall_s_profiled": wall, "kernel_s": kernel_s,
                            "top_device": top, "top_cpu_self": cpu_top}
    print(f"\n## breakdown: {name} {batch} images, wall {wall:.3f} s (profiled), kernels {kernel_s:.3f} s")
    for r in top:
        print(f"{r['device_ms']:9.2f} ms {r['count']:6d}  {r['name']}")
    print("top host (self) time:")
    for r in cpu_top:
        print(f"{r['cpu_ms']:9.2f} ms {r['count']:6d}  {r['name']}")


def part_profile(args) -> None:
    model = build_bench_model("aim-b", device=torch.device("cuda"), dtype=torch.bfloat16, num_tokens=256,
                              policy=default_policy())
    model.set_policy(_policy("all", state_dtype="model"))
    rows = args.profile_rows
    with torch.inference_mode():
        cond = model.condition(torch.arange(rows, device="cuda") % model.num_classes)
        params = model.allocate_inference_cache(rows)
        model.prefill(cond, params)
        params.advance(1)
        tok = torch.randint(model.vocab_size, (rows,), device="cuda")
        for _ in range(3):
            model.decode_step(tok, cond, params)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model.decode_step(tok, cond, params)
            torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events) / 5
    top = [{"kernel": e.key[:90], "us_per_step": e.device_time_total / 5, "calls_per_step": e.count / 5}
           for e in sorted(events, key=lambda e: -e.device_time_total)[:20]]
    RESULTS["profile"] = {"model": "aim-b", "rows": rows, "kernel_us_per_step": total, "top": top}
    print(f"\n## profile: aim-b, {rows} rows, every kernel on: {total:.0f} us of kernels per step")
    for r in top:
        print(f"{r['us_per_step']:9.1f} {r['calls_per_step']:6.1f}  {r['kernel']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="micro,step,generate,profile,breakdown")
    ap.add_argument("--models", default="aim-b,aim-l,aim-xl")
    ap.add_argument("--rows", default="32,128,512", help="decode rows for the step part (2 x images)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--policies", default="reference;ssm;ssm,norm;ssm,norm,gnorm;all",
                    help="';'-separated decode policies (step part): 'reference', 'all' (the default policy) "
                         "or AIMKIT_DECODE_KERNELS-style comma lists of ssm, conv, norm, gnorm")
    ap.add_argument("--profile-rows", type=int, default=512)
    ap.add_argument("--breakdown", default="aim-b:256", help="breakdown part: model:images of the profiled generate")
    ap.add_argument("--state-dtypes", default="model,float32", help="SSM state dtypes for the step part")
    ap.add_argument("--conv-micro", action="store_true", help="also time conv_step_ tilings (micro part)")
    ap.add_argument("--conv-micro-only", action="store_true", help="micro part: only the conv_step_ tilings")
    ap.add_argument("--micro-models", default="aim-b,aim-xl", help="micro part: layer shapes (aim-b, aim-xl)")
    ap.add_argument("--micro-rows", default="32,128,512", help="micro part: rows of the state")
    ap.add_argument("--micro-dtypes", default="bfloat16,float32", help="micro part: state dtypes")
    ap.add_argument("--micro-blocks", default="64,128", help="micro part: block_p values of the tiling sweep")
    ap.add_argument("--micro-warps", default="4,8", help="micro part: num_warps values of the tiling sweep")
    args = ap.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.rows = [int(r) for r in args.rows.split(",") if r]
    args.state_dtypes = [d for d in args.state_dtypes.split(",") if d]
    args.policies = [k for k in args.policies.split(";") if k]
    args.micro_models = [m for m in args.micro_models.split(",") if m]
    args.micro_rows = [int(r) for r in args.micro_rows.split(",") if r]
    args.micro_dtypes = [getattr(torch, d) for d in args.micro_dtypes.split(",") if d]
    args.micro_blocks = [int(b) for b in args.micro_blocks.split(",") if b]
    args.micro_warps = [int(w) for w in args.micro_warps.split(",") if w]
    for variant in args.policies:  # fail before any model is built on an unknown kind
        _policy(variant)
    RESULTS["env"] = {"gpu": torch.cuda.get_device_name(), "aimkit": aimkit.__version__,
                      "date": time.strftime("%Y-%m-%d"), **kernel_info()["versions"]}
    print(json.dumps(RESULTS["env"]))
    parts = {"micro": part_micro, "step": part_step, "generate": part_generate, "profile": part_profile,
             "breakdown": part_breakdown}
    for part in args.parts.split(","):
        t = time.perf_counter()
        try:
            parts[part](args)
        except Exception as exc:  # keep the other parts' results
            RESULTS.setdefault("errors", []).append(f"{part}: {type(exc).__name__}: {exc}")
            print(f"part {part} failed: {type(exc).__name__}: {exc}", flush=True)
        print(f"[{part}: {time.perf_counter() - t:.0f} s]", flush=True)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "decode_kernels.json").write_text(json.dumps(RESULTS, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
