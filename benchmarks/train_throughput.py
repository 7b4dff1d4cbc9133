"""Training-step throughput of AiM generators: the step :mod:`aimkit.training` runs, without the loop.

One step is :class:`aimkit.training.TrainStep` (the trainer's own): teacher-forced forward on
random codes (batch x 256 tokens) under bf16 autocast, float32 cross-entropy, backward, global
grad-norm clip at 1.0, fused AdamW with the recipe's parameter groups (weight decay 0.05 on
matrices only, :func:`aimkit.training.param_groups`). The execution policy (``--policy``, over
:func:`aimkit.default_policy`) picks its implementations, the step's included (``train_step``:
eager or CUDA graphs). Reported per model: median / mean step time, tokens/s, ``6 * N *
tokens/s`` in TFLOP/s (N = generator parameters, the usual dense estimate; it ignores the scan's
own FLOPs) and peak GPU memory. Run from the repository root, no install needed::

    python benchmarks/train_throughput.py --models aim-b,aim-l --batch 64 --steps 20
    python benchmarks/train_throughput.py --models aim-b --compile          # torch.compile too
    python benchmarks/train_throughput.py --models aim-b,aim-l --policy train_step=graph  # CUDA graphs
    python benchmarks/train_throughput.py --models aim-b --policy train_step=graph --grad-accum 1,4
    python benchmarks/train_throughput.py --device cpu --models aim-b --batch 2 --steps 2 \\
        --set d_model=64 --set n_layer=2                                     # smoke test on CPU

With ``$OUT`` set, the results are also written to ``$OUT/train_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def _parse_set(items):
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def _int_list(text: str) -> list[int]:
    """``"1,4"`` -> ``[1, 4]``: positive integers, for ``--grad-accum``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def make_policy(args):
    """The run's execution policy: ``default_policy()`` (the environment's defaults, read now)
    with ``args.policy`` (KEY=VALUE strings) on top."""
    from aimkit.policy import default_policy

    return default_policy().replace(**_parse_set(getattr(args, "policy", [])))


def build_step(name: str, args, overrides):
    """The generator, its training step (``step() -> loss``) and the policy for ``args`` (device,
    precision, batch, compile, policy, warmup); the step timed here and profiled by
    ``profile_train.py`` is :class:`aimkit.training.TrainStep`, the trainer's."""
    import aimkit
    from aimkit.training import make_optimizer, make_train_step
    from aimkit.training.step import resolved_policy

    device = torch.device(args.device)
    policy = make_policy(args)
    # auto resolves here as the trainer does, so that the optimizer is capturable for the captured step
    policy, _ = resolved_policy(policy, device, processes=1, mixed_precision=args.precision,
                                compiled=bool(args.compile))
    graphed = policy.train_step == "graph"
    torch.manual_seed(0)
    gen = aimkit.build(name, tokenizer=None, device=device, policy=policy, **overrides).train()
    optimizer = make_optimizer(gen, lr=8e-4, weight_decay=0.05, betas=(0.9, 0.95), capturable=graphed)
    model = torch.compile(gen) if args.compile else gen
    accum = getattr(args, "grad_accum", 1)
    train_step = make_train_step(model, optimizer, policy, max_grad_norm=1.0, amp_dtype=AMP[args.precision],
                                 graph_warmup=max(1, args.warmup), grad_accum=accum)

    g = torch.Generator(device=device).manual_seed(0)
    micro = [(torch.randint(0, gen.vocab_size, (args.batch, gen.num_tokens), device=device, generator=g),
              torch.randint(0, gen.num_classes, (args.batch,), device=device, generator=g)) for _ in range(accum)]

    def step():
        loss, _ = train_step.forward_backward(micro)
        train_step.finish(update=True)
        return loss

    return gen, step, policy


def measure(name: str, args, overrides) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    gen, step, policy = build_step(name, args, overrides)
    n_params = gen.num_params()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # kernels' autotuning, compilation, allocator warm-up
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        sync()
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    tokens = args.batch * gen.num_tokens * getattr(args, "grad_accum", 1)
    median = statistics.median(times)
    result = {
        "model": name,
        "overrides": overrides,
        "params": n_params,
        "batch": args.batch,
        "grad_accum": getattr(args, "grad_accum", 1),
        "tokens_per_step": tokens,
        "precision": args.precision,
        "compile": args.compile,
        "policy": policy.to_dict(),
        "cuda_graph": policy.train_step == "graph",
        "steps": args.steps,
        "warmup_s": round(warmup_s, 3),
        "step_s_median": median,
        "step_s_mean": statistics.fmean(times),
        "tokens_per_s": tokens / median,
        "tflops_6n": 6 * n_params * tokens / median / 1e12,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
        "final_loss": float(loss),
    }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="aim-b,aim-l", help="comma-separated presets")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--grad-accum", type=_int_list, default=[1], metavar="N[,N...]",
                        help="micro-batches of --batch per step; a list times each in turn, in one process "
                             "(the kernels' autotuning is paid once)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16", help="autocast dtype")
    parser.add_argument("--compile", action="store_true", help="torch.compile the generator")
    parser.add_argument("--policy", action="append", default=[], metavar="KEY=VALUE",
                        help="an ExecutionPolicy field, e.g. train_step=graph (the step in CUDA graphs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="aimkit.build override")
    args = parser.parse_args(argv)
    overrides = _parse_set(args.set)

    env = {"torch": torch.__version__, "device": args.device}
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        from aimkit.kernels.mamba_ssm import kernel_info

        info = kernel_info()
        env["mamba_kernels"] = {k: info[k] for k in ("available", "versions", "kernels")}
    print(json.dumps(env))
    rows = []
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for name, accum in [(name, accum) for name in names for accum in args.grad_accum]:
        row = measure(name, argparse.Namespace(**{**vars(args), "grad_accum": accum}), overrides)
        rows.append(row)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the model and optimizer are gone with measure()'s frame
        mem = f"{row['peak_memory_gb']:.1f} GB" if row["peak_memory_gb"] is not None else "n/a"
        print(
            f"{name:8s} {row['params']:>13,d} params | accum {accum} | step {row['step_s_median'] * 1e3:8.1f} ms | "
            f"{row['tokens_per_s']:>10,.0f} tok/s | {row['tflops_6n']:6.1f} TFLOP/s (6N) | peak {mem}",
            flush=True,
        )
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "train_throughput.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"env": env, "results": rows}, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
