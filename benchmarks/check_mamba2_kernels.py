"""Check the fused Mamba2 kernel path against the PyTorch reference on one GPU, and time both.

Needs a CUDA GPU and mamba-ssm (a Triton-only build is enough); causal-conv1d is used if present.
Run from the repository root (no install needed)::

    python benchmarks/check_mamba2_kernels.py                       # d_model 768 and 1536, batch 8, L 256
    python benchmarks/check_mamba2_kernels.py --widths 768 --no-timing

For each width the same weights run through

* the kernel path (policy with every Mamba2 operation on ``"kernel"``) in three precisions: ``fp32`` (fp32 module),
  ``bf16-autocast`` (fp32 module under ``torch.autocast(bfloat16)``, the training setup) and
  ``bf16`` (module cast to bf16, the inference setup);
* the PyTorch reference (``ExecutionPolicy.reference()``) in float64, the ground truth, and in the same
  precision as the kernel run, which shows how much error that precision alone explains.

Printed as relative errors ``||out - ref|| / ||ref||`` against float64: the forward output, the
input gradient and every parameter gradient; then prefill + decode (``forward`` with a cache
followed by ``step``) against the float64 reference doing the same; then a CUDA-graph capture of
the kernel ``step`` replayed against eager. Timings (``triton.testing.do_bench`` medians, ms):
forward+backward and one decode step for both paths. With ``$OUT`` set, everything is written
to ``$OUT/mamba2_kernel_check.json``. Exit status 1 if a check fails or errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch

from aimkit.backbones.base import InferenceParams
from aimkit.backbones.mamba2 import Mamba2, Mamba2Config
from aimkit.kernels import mamba_ssm
from aimkit.policy import ExecutionPolicy

MODES = ("fp32", "bf16-autocast", "bf16")
# A wrong kernel gives relative errors of order 1; these bounds only catch such failures.
TOLERANCE = {"fp32": 1e-2, "bf16-autocast": 5e-2, "bf16": 5e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


POLICIES = {
    "kernel": ExecutionPolicy(**{op: "kernel" for op in ("scan", "state_update", "conv_step", "decode_glue")}),
    "reference": ExecutionPolicy.reference(),
}


def build(d_model: int, seed: int, path: str, dtype: torch.dtype, state=None) -> Mamba2:
    """A mixer on the GPU running ``path`` (``"kernel"`` or ``"reference"``); with ``state``
    given, its weights are loaded (cast to ``dtype``)."""
    torch.manual_seed(seed)
    mixer = Mamba2(d_model, layer_idx=0, device="cuda", dtype=dtype, policy=POLICIES[path])
    if state is None:
        with torch.no_grad():  # move D, norm and conv bias off their structured init
            mixer.D.normal_(1.0, 0.5)
            mixer.norm.weight.add_(0.1 * torch.randn_like(mixer.norm.weight))
            mixer.conv1d.bias.normal_(0, 0.1)
    else:
        mixer.load_state_dict(state)
    return mixer


def precision(mode: str):
    """(module dtype, input dtype, autocast context factory) for a mode.

    The autocast weight-cast cache is off: it must be for CUDA-graph capture, so it is off
    everywhere to keep the runs comparable.
    """
    if mode == "fp32":
        return torch.float32, torch.float32, nullcontext
    if mode == "bf16-autocast":
        return (torch.float32, torch.float32,
                lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False))
    return torch.bfloat16, torch.bfloat16, nullcontext


def fwd_bwd(mixer: Mamba2, x: torch.Tensor, gout: torch.Tensor, ctx) -> dict[str, object]:
    x = x.detach().clone().requires_grad_()
    mixer.zero_grad(set_to_none=True)
    with ctx():
        out = mixer(x)
    out.backward(gout.to(out.dtype))
    return {
        "out": out.detach(),
        "dx": x.grad.detach(),
        "dparams": {n: p.grad.detach() for n, p in mixer.named_parameters()},
    }


def compare(run: dict[str, object], ref: dict[str, object]) -> dict[str, object]:
    dparams = {n: rel(g, ref["dparams"][n]) for n, g in run["dparams"].items()}
    return {
        "out": rel(run["out"], ref["out"]),
        "dx": rel(run["dx"], ref["dx"]),
        "dparams": dparams,
        "dparams_max": max(dparams.values()),
    }


def cache_for(mixer: Mamba2, batch: int, seqlen: int, dtype=None) -> InferenceParams:
    params = InferenceParams(seqlen, batch, position=torch.zeros((), dtype=torch.long, device="cuda"))
    params.key_value_memory_dict = {0: mixer.allocate_inference_cache(batch, seqlen, dtype=dtype)}
    return params


@torch.no_grad()
def decode(mixer: Mamba2, x: torch.Tensor, prefill: int, ctx) -> dict[str, torch.Tensor]:
    """Prefill ``prefill`` positions through forward, step the rest; outputs and final cache."""
    params = cache_for(mixer, x.shape[0], x.shape[1])
    with ctx():
        outs = [mixer(x[:, :prefill], inference_params=params)]
        params.advance(prefill)
        for t in range(prefill, x.shape[1]):
            outs.append(mixer.step(x[:, t:t + 1], params))
            params.advance()
    conv_state, ssm_state = params.key_value_memory_dict[0]
    return {"out": torch.cat(outs, 1), "conv_state": conv_state, "ssm_state": ssm_state}


@torch.no_grad()
def cuda_graph_check(mixer: Mamba2, x: torch.Tensor, ctx) -> dict[str, object]:
    """Capture ``step`` in a CUDA graph after a prefill; replay and compare with eager."""
    batch, seqlen, _ = x.shape
    params = cache_for(mixer, batch, seqlen)
    with ctx():
        mixer(x[:, :-1], inference_params=params)
    params.advance(seqlen - 1)
    cache = params.key_value_memory_dict[0]
    snapshot = [t.clone() for t in cache]
    static_x = x[:, -1:].clone()

    def restore():
        for t, s in zip(cache, snapshot):
            t.copy_(s)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), ctx():
        for _ in range(3):  # compile / warm up outside the capture
            mixer.step(static_x, params)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), ctx():
        static_out = mixer.step(static_x, params)
    restore()
    graph.replay()
    graph_out, graph_state = static_out.clone(), [t.clone() for t in cache]
    restore()
    with ctx():
        eager_out = mixer.step(static_x, params)
    result = {
        "out": rel(graph_out, eager_out),
        "conv_state": rel(graph_state[0], cache[0]),
        "ssm_state": rel(graph_state[1], cache[1]),
        "replay_ms": bench(graph.replay),
    }
    restore()
    return result


def bench(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median time of ``fn`` in ms (triton.testing.do_bench)."""
    from triton.testing import do_bench

    try:
        return float(do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))
    except TypeError:  # older Triton without return_mode
        return float(do_bench(fn, grad_to_none=grad_to_none, quantiles=[0.5])[0])


def time_paths(kernel: Mamba2, ref: Mamba2, x: torch.Tensor, gout: torch.Tensor, ctx) -> dict[str, float]:
    timings = {}
    for name, mixer in (("kernel", kernel), ("reference", ref)):
        xg = x.detach().clone().requires_grad_()
        params = [xg, *mixer.parameters()]

        def train_step(mixer=mixer, xg=xg):
            with ctx():
                out = mixer(xg)
            out.backward(gout.to(out.dtype))

        timings[f"{name}_fwd_bwd_ms"] = bench(train_step, grad_to_none=params)
        cache = cache_for(mixer, x.shape[0], x.shape[1])
        with torch.no_grad(), ctx():
            mixer(x[:, :-1], inference_params=cache)
        cache.advance(x.shape[1] - 1)
        x1 = x[:, -1:].clone()

        @torch.no_grad()
        def step(mixer=mixer, cache=cache, x1=x1):
            with ctx():
                mixer.step(x1, cache)

        timings[f"{name}_step_ms"] = bench(step)
    return timings


def check_width(d_model: int, args, failures: list[str]) -> dict[str, object]:
    batch, seqlen = args.batch, args.seqlen
    base = build(d_model, args.seed, "kernel", torch.float32)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    ref64 = build(d_model, args.seed, "reference", torch.float64, state)
    gen = torch.Generator(device="cuda").manual_seed(args.seed + 1)
    x = torch.randn(batch, seqlen, d_model, device="cuda", generator=gen)
    gout = torch.randn(batch, seqlen, d_model, device="cuda", generator=gen)
    truth = fwd_bwd(ref64, x.double(), gout.double(), nullcontext)
    prefill = seqlen - args.decode_steps
    truth_decode = decode(ref64, x.double(), prefill, nullcontext)
    report: dict[str, object] = {"d_model": d_model, "nheads": base.nheads, "modes": {}}
    report["ref64_decode_vs_forward"] = rel(truth_decode["out"][:, prefill:], truth["out"][:, prefill:])

    for mode in MODES:
        module_dtype, input_dtype, ctx = precision(mode)
        entry: dict[str, object] = {}
        report["modes"][mode] = entry
        try:
            kernel = build(d_model, args.seed, "kernel", module_dtype, state)
            ref = build(d_model, args.seed, "reference", module_dtype, state)
            xin = x.to(input_dtype)
            entry["kernel_vs_f64"] = compare(fwd_bwd(kernel, xin, gout, ctx), truth)
            entry["reference_vs_f64"] = compare(fwd_bwd(ref, xin, gout, ctx), truth)
            dec = decode(kernel, xin, prefill, ctx)
            dec_ref = decode(ref, xin, prefill, ctx)
            entry["decode_kernel_vs_f64"] = {
                "prefill_out": rel(dec["out"][:, :prefill], truth_decode["out"][:, :prefill]),
                "step_out": rel(dec["out"][:, prefill:], truth_decode["out"][:, prefill:]),
                "conv_state": rel(dec["conv_state"], truth_decode["conv_state"]),
                "ssm_state": rel(dec["ssm_state"], truth_decode["ssm_state"]),
            }
            entry["decode_reference_vs_f64"] = {
                "step_out": rel(dec_ref["out"][:, prefill:], truth_decode["out"][:, prefill:]),
                "ssm_state": rel(dec_ref["ssm_state"], truth_decode["ssm_state"]),
            }
            entry["cuda_graph_step"] = cuda_graph_check(kernel, xin, ctx)
            if not args.no_timing:
                entry["timings"] = time_paths(kernel, ref, xin, gout, ctx)
            worst = max(
                entry["kernel_vs_f64"]["out"], entry["kernel_vs_f64"]["dx"],
                entry["kernel_vs_f64"]["dparams_max"], entry["decode_kernel_vs_f64"]["step_out"],
                entry["decode_kernel_vs_f64"]["ssm_state"],
            )
            entry["worst_kernel_rel_error"] = worst
            entry["ok"] = worst <= TOLERANCE[mode] and entry["cuda_graph_step"]["out"] <= 1e-6
            if not entry["ok"]:
                failures.append(f"d_model {d_model} {mode}: worst relative error {worst:.3g}")
        except Exception as exc:  # noqa: BLE001  (record it and go on with the next mode)
            entry["error"] = "".join(traceback.format_exception(exc))
            failures.append(f"d_model {d_model} {mode}: {type(exc).__name__}: {exc}")
        print_entry(d_model, mode, entry)
        torch.cuda.empty_cache()
    return report


def print_entry(d_model: int, mode: str, entry: dict[str, object]) -> None:
    print(f"\n== d_model {d_model}  {mode}")
    if "error" in entry:
        print(entry["error"])
        return
    for key in ("kernel_vs_f64", "reference_vs_f64"):
        e = entry[key]
        worst = max(e["dparams"], key=e["dparams"].get)
        print(f"  {key:18s} out {e['out']:.2e}  dx {e['dx']:.2e}  dparams max {e['dparams_max']:.2e} ({worst})")
    d = entry["decode_kernel_vs_f64"]
    print(f"  decode kernel      prefill {d['prefill_out']:.2e}  step {d['step_out']:.2e}  "
          f"conv_state {d['conv_state']:.2e}  ssm_state {d['ssm_state']:.2e}")
    d = entry["decode_reference_vs_f64"]
    print(f"  decode reference   step {d['step_out']:.2e}  ssm_state {d['ssm_state']:.2e}")
    g = entry["cuda_graph_step"]
    print(f"  cuda graph step    out {g['out']:.2e}  ssm_state {g['ssm_state']:.2e}  replay {g['replay_ms']:.3f} ms")
    if "timings" in entry:
        print("  timings (ms)       " + "  ".join(f"{k[:-3]} {v:.3f}" for k, v in entry["timings"].items()))
    print(f"  ok: {entry['ok']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[768, 1536])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=16, help="positions decoded with step()")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()

    record: dict[str, object] = {"args": vars(args)}
    failures: list[str] = []
    if not torch.cuda.is_available():
        record["error"] = "no CUDA device"
        failures.append(record["error"])
    else:
        record["device"] = torch.cuda.get_device_name()
        record["kernel_info"] = info = mamba_ssm.kernel_info()
        print("device:", record["device"])
        print("kernels:", json.dumps(info, indent=1))
        if not info["available"]:
            failures.append(f"mamba-ssm kernels unavailable: {info.get('error')}")
        else:
            record["config"] = dataclasses.asdict(Mamba2Config())
            record["policies"] = {name: policy.to_dict() for name, policy in POLICIES.items()}
            record["results"] = [check_width(d, args, failures) for d in args.widths]
    record["failures"] = failures
    print("\nFAILURES:\n  " + "\n  ".join(failures) if failures else "\nall checks passed")
    out_dir = os.environ.get("OUT")
    if out_dir:
        path = Path(out_dir) / "mamba2_kernel_check.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
        print("wrote", path)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
