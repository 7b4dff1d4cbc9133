"""The training row: one optimiser step on random codes, timed, against the measured matmul rate.

The step is :mod:`aimkit.training.step`'s, the one the trainer runs (:func:`make_train_step` is
the only function here that knows it): autocast, AdamW, grad clip 1.0, eager or captured in CUDA
graphs as the execution policy's ``train_step`` says.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..policy import ExecutionPolicy
from ._recorder import Recorder
from .floors import step_params, train_flops_per_token, utilization
from .models import build_bench_model
from .options import BenchOptions
from .rows import model_fields, new_row
from .timing import peak_gb, reset_peak, time_call, time_calls

__all__ = ["make_train_step", "train_row"]


def make_train_step(model, codes: Tensor, labels: Tensor, amp_dtype: torch.dtype,
                    policy: ExecutionPolicy) -> tuple[Callable[[], Tensor], float]:
    """``(step, first_step_seconds)``: a callable running one optimiser step on ``codes`` (B, N)
    and ``labels`` (B,), and the seconds of the first call (``train_step="graph"``: warm-up and
    capture included).

    The step is :func:`aimkit.training.step.make_train_step`'s (the trainer's own) with
    :func:`aimkit.training.optim.make_optimizer`'s AdamW (lr 1e-4, betas (0.9, 0.95), weight decay
    0.05; fused on CUDA), ``amp_dtype`` autocast and gradient clipping at 1.0; the policy's
    ``train_step`` picks eager or CUDA graphs.
    """
    from ..training.optim import make_optimizer
    from ..training.step import make_train_step as training_step

    opt = make_optimizer(model, lr=1e-4, capturable=policy.train_step == "graph")
    step = functools.partial(training_step(model, opt, policy, max_grad_norm=1.0, amp_dtype=amp_dtype,
                                           graph_warmup=2), codes, labels)
    first_s, _ = time_call(step, codes.device)
    return step, first_s


def _throughput(row: dict[str, Any], matmul_params: int, flop_rate: float) -> dict[str, Any]:
    """tokens/s, model TFLOP/s (``6 * matmul_params`` per token) and MFU against ``flop_rate``."""
    tokens_per_s = row["batch"] * row["tokens"] / row["step_s"]
    achieved = train_flops_per_token(matmul_params) * tokens_per_s
    mfu, over = utilization(achieved, flop_rate)
    return {"matmul_params": matmul_params, "tokens_per_s": tokens_per_s, "model_tflops": achieved / 1e12,
            "mfu": mfu, "mfu_unclamped": achieved / flop_rate, "mfu_over_ceiling": over}


TRAIN_STEP_OF_MODE = {"eager": "eager", "layer-graphs": "layer_graphs", "cuda-graph": "graph"}  # row mode -> train_step


def train_row(name: str, opts: BenchOptions, facts: dict[str, Any], report: Recorder,
              mode: str = "eager") -> dict[str, Any]:
    """One optimiser step on ``train_batch`` x N random codes (float32 weights, ``opts.dtype``
    autocast), timed over ``max(train_steps, repeats)`` steps after two warm-up steps.

    MFU is ``6 * matmul_params * tokens/s`` (:func:`~aimkit.bench.floors.train_flops_per_token`)
    over the matmul rate measured in the autocast dtype, clamped at 1 and flagged
    (``mfu_over_ceiling``) if the measured rate was not the ceiling."""
    device = torch.device(opts.device)
    batch, tokens = opts.train_batch, opts.tokens[0]
    from ..training.step import step_policy

    policy = step_policy(opts.policy, TRAIN_STEP_OF_MODE[mode])  # the eager row: what auto falls back to
    row = new_row("train", name, "mamba2", batch, tokens, opts, mode=mode)
    row.update(dtype=f"float32 + {opts.dtype} autocast", policy=policy.to_dict())
    try:
        model = build_bench_model(name, device=device, dtype=torch.float32, num_tokens=tokens, policy=policy,
                                  overrides=opts.overrides, seed=opts.seed).train()
        row.update(model_fields(model))
        g = torch.Generator(device="cpu").manual_seed(opts.seed)
        codes = torch.randint(model.vocab_size, (batch, tokens), generator=g).to(device)
        labels = torch.randint(model.num_classes, (batch,), generator=g).to(device)
        reset_peak(device)
        step, row["first_step_s"] = make_train_step(model, codes, labels, getattr(torch, opts.dtype), policy)
        loss = step()
        row["step_s_all"] = times = time_calls(step, device, max(opts.train_steps, opts.repeats), warmup=1)
        row["loss"] = float(loss.detach())
        row["step_s"] = statistics.median(times)
        row.update(_throughput(row, step_params(model)[1], facts["matmul_flops"]))
        row["peak_memory_gb"] = peak_gb(device)
        if row["mfu_over_ceiling"]:
            report.log(f"  WARNING: {row['mfu_unclamped']:.1%} of the measured matmul rate: MFU clamped to 100%")
    except Exception as exc:
        report.row_error(row, exc)
    return row
