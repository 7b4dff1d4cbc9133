"""The measured rows: sampling throughput, one decode step, and the fast path's correctness.

Every row is a plain dict (a line of ``bench.json``) that records the execution policy under test
(``policy``: its fields; ``policy_resolved``: what each operation ran on the device) beside the
model, the timings and the floor they are measured against (:mod:`aimkit.bench.floors`).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from torch import Tensor

from ..policy import ExecutionPolicy
from ..samplers._decode_behind import DECODE_CHUNK
from ._recorder import Recorder
from .floors import cache_profile, decode_floor, step_params
from .models import build_bench_model
from .options import BenchOptions
from .timing import GB, peak_gb, reset_peak, time_call, time_calls

__all__ = ["CORRECTNESS_TOLERANCE", "correctness_check", "decode_row", "new_row", "sampling_row"]

CORRECTNESS_TOLERANCE = 2e-2  # ||fast - ref|| / ||ref|| of bf16 logits against CPU float32


def new_row(suite: str, name: str, backbone: str, batch: int, tokens: int, opts: BenchOptions,
            **extra: Any) -> dict[str, Any]:
    """The fields every row starts with: what was run, under which policy, status ``"ok"``."""
    return {"suite": suite, "model": name, "backbone": backbone, "batch": batch, "tokens": tokens,
            "dtype": opts.dtype, **extra, "policy": opts.policy.to_dict(),
            "policy_resolved": opts.policy.resolved(opts.device), "status": "ok"}


def floor_fields(model, rows: int, steps: int, facts: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """The cache profile, step weights and :func:`~aimkit.bench.floors.decode_floor` of a run."""
    profile = cache_profile(model)
    wbytes, mparams = step_params(model)
    floor = decode_floor(profile, rows, steps, wbytes, mparams, facts["copy_bandwidth"], facts["matmul_flops"], **kw)
    return {
        "cache_dtypes": list(profile.dtypes),
        "state_bytes_per_seq": profile.fixed_bytes,
        "kv_bytes_per_seq_position": profile.per_position_bytes,
        "step_weight_bytes": wbytes,
        "floor": floor.to_dict(),
    }


def model_fields(model) -> dict[str, Any]:
    """Size and sampling settings of the model a row measured."""
    cfg = model.config
    return {"params": model.num_params(), "n_layer": cfg.n_layer, "d_model": cfg.d_model,
            "backbone": cfg.backbone.name, "cfg_scale": cfg.fid_sampling.cfg_scale}


def _build(name: str, opts: BenchOptions, tokens: int, backbone: str = "mamba2", **kw: Any):
    return build_bench_model(name, device=torch.device(opts.device), dtype=getattr(torch, opts.dtype),
                             num_tokens=tokens, policy=opts.policy, backbone=backbone,
                             overrides=opts.overrides, seed=opts.seed, **kw)


def _time_sampling(model, batch: int, tokens: int, opts: BenchOptions, facts: dict[str, Any]) -> tuple[dict, Tensor]:
    """Time ``generate(output="tokens")``: the first call apart, then the median of ``opts.repeats``."""
    from ..samplers import AutoregressiveSampler, generate

    device = torch.device(opts.device)
    cfg_scale = model.config.fid_sampling.cfg_scale
    labels = torch.arange(batch) % model.num_classes
    sampler = AutoregressiveSampler()

    def call():
        return generate(model, labels, cfg_scale=cfg_scale, seed=opts.seed, output="tokens",
                        batch_size=batch, progress=False, sampler=sampler)

    out: dict[str, Any] = {}
    reset_peak(device)
    out["first_call_s"], codes = time_call(call, device)
    out["capture_s"] = sampler.last_capture_seconds
    out["seconds_all"] = times = [time_call(call, device)[0] for _ in range(opts.repeats)]
    out["seconds_per_batch"] = statistics.median(times)
    out["images_per_s"] = batch / out["seconds_per_batch"]
    out["peak_memory_gb"] = peak_gb(device)
    out.update(floor_fields(model, 2 * batch if cfg_scale != 1.0 else batch, tokens, facts))
    out["fraction_of_floor"] = out["floor"]["seconds"] / out["seconds_per_batch"]
    return out, codes


def sampling_row(name: str, backbone: str, batch: int, tokens: int, opts: BenchOptions,
                 facts: dict[str, Any], report: Recorder, model=None) -> tuple[dict[str, Any], Any]:
    """Time ``generate(output="tokens")`` for one configuration; returns ``(row, model)``.

    ``model`` (from the previous row of the same preset, backbone and tokens) is reused when given.
    """
    row = new_row("sampling", name, backbone, batch, tokens, opts)
    try:
        if model is None:
            t0 = time.perf_counter()
            model = _build(name, opts, tokens, backbone, with_tokenizer=opts.decode_vq)
            row["build_s"] = time.perf_counter() - t0
        row.update(model_fields(model))
        timed, codes = _time_sampling(model, batch, tokens, opts, facts)
        row.update(timed)
    except Exception as exc:  # one failed row must not lose the table
        report.row_error(row, exc)
        return row, model
    if opts.decode_vq and getattr(model, "tokenizer", None) is not None:
        try:  # the sampling timings above stand even when the pixels' part fails
            row.update(vq_decode(model, codes.to(opts.device), torch.device(opts.device), opts.repeats))
            row.update(to_disk(model, batch, opts))
        except Exception as exc:
            row["end_to_end_error"] = f"{type(exc).__name__}: {exc}"[:300]
            report.log(f"  VQ decoding / end to end failed (the sampling row stands): {row['end_to_end_error']}")
    return row, model


def vq_decode(model, codes: Tensor, device: torch.device, repeats: int, chunk: int = DECODE_CHUNK) -> dict[str, Any]:
    """Seconds to decode ``codes`` (B, N) to pixels in chunks of ``chunk`` (as ``generate`` does)."""

    def call():
        with torch.inference_mode():
            for part in codes.split(chunk):
                model.tokenizer.decode(part)

    first, _ = time_call(call, device)
    times = [time_call(call, device)[0] for _ in range(repeats)]
    return {"vq_decode_first_s": first, "vq_decode_s": statistics.median(times), "vq_chunk": chunk}


def to_disk(model, batch: int, opts: BenchOptions, batches: int = 3) -> dict[str, Any]:
    """Images/s of ``aimkit sample``'s loop (:func:`~aimkit.eval.fid_sampling.sample_to_shards`):
    ``batches`` batches of ``batch`` images, one shard each, sampled, decoded (behind the next
    batch's sampling) and written as .npz shards to a temporary folder; the last write included."""
    import tempfile

    from ..eval.fid_sampling import sample_to_shards

    labels = [i % model.num_classes for i in range(batches * batch)]
    with tempfile.TemporaryDirectory(prefix="aimkit-bench-") as tmp:
        seconds, _ = time_call(lambda: sample_to_shards(model, tmp, len(labels), labels=labels, seed=opts.seed,
                                                        batch_size=batch, shard_size=batch, progress=False),
                               torch.device(opts.device))
    return {"end_to_end_images_per_s": len(labels) / seconds, "end_to_end_s": seconds,
            "end_to_end_what": f"aimkit sample loop: {batches} batches of {batch}, decoded behind sampling, "
                               "written as .npz shards"}


class _Decoder:
    """Decode steps of ``rows`` sequences: replayed from a captured CUDA graph when the policy says
    so on CUDA (``decode_graph``), else eager ``model.decode_step``.

    Attributes:
        params: the inference cache the steps read and write.
        cond: the decoding condition prefill must read.
        capture_s: seconds of warm-up plus capture (None when eager).
    """

    def __init__(self, model, cond: Any, rows: int, policy: ExecutionPolicy):
        from ..samplers._cuda_graph import DecodeGraph

        device = next(model.parameters()).device
        self.model, self.graph, self.capture_s = model, None, None
        if device.type == "cuda" and policy.decode_graph:
            self.graph = DecodeGraph(model, cond, rows)
            self.graph.start(cond)
            self.params, self.cond = self.graph.inference_params, self.graph.cond
            self.capture_s = self.graph.capture_seconds
        else:
            self.params, self.cond = model.allocate_inference_cache(rows), cond
        self._tokens = torch.zeros(rows, dtype=torch.long, device=device)

    def step(self, tokens: Tensor) -> Tensor:
        """One step for ``tokens`` (rows,); returns (rows, V) logits (a static buffer under a graph)."""
        if self.graph is not None:
            return self.graph.step(tokens)
        return self.model.decode_step(tokens, self.cond, self.params)

    def set_tokens(self, tokens: Tensor) -> None:
        """The tokens :meth:`replay` feeds."""
        (self.graph.tokens if self.graph is not None else self._tokens).copy_(tokens)

    def replay(self) -> None:
        """One step on the tokens of :meth:`set_tokens`, nothing copied (the bare step to time)."""
        if self.graph is not None:
            self.graph.graph.replay()
        else:
            self.model.decode_step(self._tokens, self.cond, self.params)


def _time_decode_step(model, rows: int, tokens: int, opts: BenchOptions, replays: int) -> dict[str, Any]:
    device = torch.device(opts.device)
    labels = torch.arange(rows, device=device) % model.num_classes
    out: dict[str, Any] = {}
    with torch.inference_mode():
        decoder = _Decoder(model, model.condition(labels), rows, opts.policy)
        out["capture_s"] = decoder.capture_s
        model.prefill(decoder.cond, decoder.params)
        decoder.params.advance(tokens // 2)  # mid-sequence: a KV cache is half full
        decoder.set_tokens(torch.randint(model.vocab_size, (rows,), device=device))

        def many():
            for _ in range(replays):
                decoder.replay()

        times = time_calls(many, device, opts.repeats, warmup=1)
    out["step_s"] = statistics.median(times) / replays
    out["step_s_all"] = [t / replays for t in times]
    out["replays_per_timing"] = replays
    return out


def decode_row(name: str, batch: int, opts: BenchOptions, facts: dict[str, Any], report: Recorder,
               replays: int = 20) -> dict[str, Any]:
    """One decode step at mid-sequence (``2 * batch`` rows): a captured graph's replay on CUDA
    (policy ``decode_graph``), an eager step otherwise."""
    tokens, rows = opts.tokens[0], 2 * batch
    row = new_row("decode", name, "mamba2", batch, tokens, opts, rows=rows)
    try:
        model = _build(name, opts, tokens)
        row.update(model_fields(model))
        row.update(_time_decode_step(model, rows, tokens, opts, replays))
        row.update(floor_fields(model, rows, 1, facts, first_step=tokens // 2))
        row["fraction_of_floor"] = row["floor"]["seconds"] / row["step_s"]
        row["state_gb_per_step"] = 2 * row["state_bytes_per_seq"] * rows / GB
        row["achieved_bandwidth"] = (row["floor"]["cache_bytes"] + row["floor"]["weight_bytes"]) / row["step_s"]
    except Exception as exc:
        report.row_error(row, exc)
    return row


def _teacher_forced_decode(model, codes: Tensor, labels: Tensor, policy: ExecutionPolicy) -> Tensor:
    """(B, N, V) logits of prefill + decode steps fed ``codes`` (B, N), as float64 on the CPU."""
    decoder = _Decoder(model, model.condition(labels), codes.shape[0], policy)
    logits = [model.prefill(decoder.cond, decoder.params).clone()]
    decoder.params.advance(1)
    for k in range(codes.shape[1] - 1):
        logits.append(decoder.step(codes[:, k]).clone())
        decoder.params.advance(1)
    return torch.stack(logits, dim=1).double().cpu()


def _relative_errors(ref, fast, codes: Tensor, labels: Tensor, policy: ExecutionPolicy) -> dict[str, float]:
    device = next(fast.parameters()).device
    with torch.inference_mode():
        want = ref(codes, labels).double()  # (B, N, V)
        got_fwd = fast(codes.to(device), labels.to(device)).double().cpu()
        got_dec = _teacher_forced_decode(fast, codes.to(device), labels.to(device), policy)

    def rel(got: Tensor) -> float:
        return float((got - want).norm() / want.norm())

    return {"forward_rel_err": rel(got_fwd), "decode_rel_err": rel(got_dec)}


def correctness_check(opts: BenchOptions, report: Recorder, batch: int = 2) -> dict[str, Any]:
    """Fast-path logits vs the CPU float32 reference on the same weights (``check_model``, 4 layers).

    Two checks on random codes: the teacher-forced forward (chunked-scan kernel on CUDA) and
    teacher-forced decoding (prefill + decode steps, replayed from a CUDA graph when the policy
    says so), each as ``||fast - ref|| / ||ref||`` of the logits against the float32 CPU forward
    of the same model under :meth:`ExecutionPolicy.reference`.
    """
    overrides = {**opts.overrides, "n_layer": 4}
    name, tokens = opts.check_model, opts.tokens[0]
    result: dict[str, Any] = {"model": name, "overrides": {k: str(v) for k, v in overrides.items()},
                              "batch": batch, "dtype": opts.dtype, "tolerance": CORRECTNESS_TOLERANCE,
                              "policy": opts.policy.to_dict(), "policy_resolved": opts.policy.resolved(opts.device)}
    try:
        common = dict(num_tokens=tokens, overrides=overrides, seed=opts.seed + 1)
        ref = build_bench_model(name, device=torch.device("cpu"), dtype=torch.float32,
                                policy=ExecutionPolicy.reference(), **common)
        fast = build_bench_model(name, device=torch.device(opts.device), dtype=getattr(torch, opts.dtype),
                                 policy=opts.policy, **common)
        fast.load_state_dict(ref.state_dict())
        g = torch.Generator(device="cpu").manual_seed(opts.seed + 2)
        codes = torch.randint(ref.vocab_size, (batch, tokens), generator=g)
        labels = torch.randint(ref.num_classes, (batch,), generator=g)
        result.update(_relative_errors(ref, fast, codes, labels, opts.policy))
        worst = max(result["forward_rel_err"], result["decode_rel_err"])
        result["passed"] = bool(math.isfinite(worst) and worst <= CORRECTNESS_TOLERANCE)
        kernels = report.data["device"].get("kernels", {}).get("available")
        result["kernels"] = opts.device.startswith("cuda") and bool(kernels)
    except Exception as exc:
        result["passed"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"[:300]
        report.log_traceback()
    return result
