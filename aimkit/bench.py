"""Performance harness behind ``aimkit bench``: sampling, decode-step and training throughput,
each number next to the physical floor it is measured against.

One run goes, in this order (each row in its own ``try``, so one out-of-memory row does not lose
the table; ``bench.json`` and ``bench.md`` are rewritten after every row)::

    device facts       GPU, versions, measured copy bandwidth and bf16 matmul rate, date
    correctness        fast path (device dtype, fused kernels, CUDA-graph decode) vs CPU float32
    sampling           model x batch x tokens: generate(output="tokens") median, first call apart
    comparison         Mamba2 vs a transformer of matching size over token counts
    decode             one captured decode step (graph replay) per model and batch
    train              batch x 256 random codes, bf16 autocast, fused AdamW, grad clip 1.0

Floors (see ``docs/benchmarks.md`` and ``shared/reference/performance.md``). Decoding a batch of
B images with guidance runs R = 2B sequences for N steps. A step must at least

* read and write every sequence's recurrent state once (Mamba2: ``nheads*headdim*d_state`` SSM
  values plus the ``conv_dim*d_conv`` convolution window per layer), or read every cached key and
  value once and write one more position (transformer);
* read the weights that act on every token once (the blocks, the final norm, the tied LM head);
* do ``2 * matmul_params * R`` FLOPs (plus ``4 * d_model * keys`` per layer and row for attention).

``memory_s = bytes / measured copy bandwidth`` and ``compute_s = FLOPs / measured matmul rate``;
the floor is the larger of the two and ``fraction_of_floor = floor / measured`` (1.0 = at the
floor). The cache sizes are read off ``model.allocate_inference_cache`` itself (exactly what the
sampler allocates, whatever the state dtype or backbone): a fixed part per sequence (recurrent
state) and a part per cached position (KV cache), found by allocating two lengths.

Example::

    aimkit bench --suite all --models aim-b,aim-xl --batches 16,256 --out /tmp/bench
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._io import write_text_atomic

__all__ = [
    "BenchOptions",
    "CacheProfile",
    "Floor",
    "mamba_state_bytes_per_step",
    "kv_cache_bytes_per_image",
    "cache_profile",
    "step_params",
    "decode_floor",
    "measure_device",
    "run",
]

CORRECTNESS_TOLERANCE = 2e-2  # ||fast - ref|| / ||ref|| of bf16 logits against CPU float32
_GB = 1e9
_PER_STEP_EXCLUDE = ("class_embed.", "pos_embed.", "conditioning.", "final_layer.modulation.", "tokenizer.")
_MAMBA_ONLY = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "A_init_range", "dt_min",
               "dt_max", "dt_init_floor", "conv_bias", "bias", "use_kernels", "state_dtype")
# The official AiM code on one H200 (bf16, guidance; with causal-conv1d where performance.md has
# that figure, else without), images/s. Drawn on the throughput plot as a reference, labelled as such.
OFFICIAL_H200_IMAGES_PER_S = {
    "aim-b": {64: 56.1, 256: 112.4},
    "aim-l": {64: 27.6, 256: 51.2},
    "aim-xl": {16: 11.4, 64: 21.3, 256: 36.4},
}


# ----------------------------------------------------------------------------------------- floors
def mamba_state_bytes_per_step(
    n_layer: int,
    d_model: int,
    *,
    expand: int = 2,
    headdim: int = 64,
    d_state: int = 128,
    itemsize: int = 2,
    sequences: int = 2,
) -> int:
    """SSM-state bytes one decode step moves for one image (read + write), convolution excluded.

    ``sequences * n_layer * (nheads * headdim * d_state) * itemsize * 2``; 2 sequences = guidance.
    AiM-B (24 x 768) in bf16: 37,748,736 bytes (37.7 MB), as in performance.md.
    """
    nheads = expand * d_model // headdim
    return sequences * n_layer * nheads * headdim * d_state * itemsize * 2


def kv_cache_bytes_per_image(
    n_layer: int, d_kv: int, num_tokens: int, *, itemsize: int = 2, sequences: int = 2
) -> int:
    """KV-cache bytes read over a whole image: step k reads k + 1 keys and values per layer.

    ``sequences * 2 * n_layer * d_kv * itemsize * N(N+1)/2``; a 36 x 1280 model at 256 tokens:
    about 12 GB per image with guidance, as in performance.md.
    """
    return sequences * 2 * n_layer * d_kv * itemsize * num_tokens * (num_tokens + 1) // 2


@dataclass(frozen=True)
class CacheProfile:
    """Inference-cache bytes of one sequence, split by how decoding touches them.

    Attributes:
        fixed_bytes: read and written once per step (recurrent SSM state, convolution window).
        per_position_bytes: per cached position, read by every later step (keys and values).
        per_position_elements: the same in elements (sets the attention FLOPs).
        dtypes: dtypes of the cache tensors, e.g. ``("bfloat16", "float32")``.
    """

    fixed_bytes: int
    per_position_bytes: int
    per_position_elements: int
    dtypes: Tuple[str, ...]


def _cache_totals(model, max_seqlen: int) -> Tuple[int, int, List[torch.dtype]]:
    params = model.allocate_inference_cache(1, max_seqlen=max_seqlen)
    tensors = [t for entry in params.key_value_memory_dict.values() for t in entry]
    return sum(t.numel() * t.element_size() for t in tensors), sum(t.numel() for t in tensors), [t.dtype for t in tensors]


def cache_profile(model) -> CacheProfile:
    """Measure :class:`CacheProfile` by allocating the model's own cache for one sequence twice."""
    n0, extra = model.num_tokens + 1, 8
    bytes0, elems0, dtypes = _cache_totals(model, n0)
    bytes1, elems1, _ = _cache_totals(model, n0 + extra)
    per_pos, per_pos_elems = (bytes1 - bytes0) // extra, (elems1 - elems0) // extra
    names = tuple(sorted({str(d).replace("torch.", "") for d in dtypes}))
    return CacheProfile(bytes0 - per_pos * n0, per_pos, per_pos_elems, names)


def step_params(model: nn.Module) -> Tuple[int, int]:
    """``(bytes, matmul_params)`` of the weights a decode step applies to every token.

    Excludes what runs once per image (class embedding, conditioning, final modulation), the
    position table (one row per step) and the tokenizer; tied weights count once. ``matmul_params``
    counts the elements of 2-D weights (linear layers, the LM head), the FLOP-carrying part.
    """
    seen, nbytes, matmul = set(), 0, 0
    for name, p in model.named_parameters():
        if name.startswith(_PER_STEP_EXCLUDE) or id(p) in seen:
            continue
        seen.add(id(p))
        nbytes += p.numel() * p.element_size()
        if p.dim() == 2:
            matmul += p.numel()
    return nbytes, matmul


@dataclass(frozen=True)
class Floor:
    """The floor of one decoding run (all sequences, all steps).

    Attributes:
        cache_bytes: recurrent state read + written, or KV cache read + written, in total.
        weight_bytes: step weights read once per step, in total.
        flops: matmul FLOPs (linear layers and attention), in total.
        memory_s: ``(cache_bytes + weight_bytes) / bandwidth``.
        compute_s: ``flops / matmul rate``.
        seconds: ``max(memory_s, compute_s)``.
        bound: ``"memory"`` or ``"compute"``.
    """

    cache_bytes: float
    weight_bytes: float
    flops: float
    memory_s: float
    compute_s: float
    seconds: float
    bound: str

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def decode_floor(
    profile: CacheProfile,
    rows: int,
    steps: int,
    weight_bytes: int,
    matmul_params: int,
    bandwidth: float,
    flop_rate: float,
    *,
    first_step: int = 0,
) -> Floor:
    """Floor of ``steps`` decode steps of ``rows`` sequences, starting at cache position ``first_step``.

    Step ``k`` reads ``k + 1`` cached positions and writes one; the fixed state is read and
    written at every step; the step weights are read once per step for all rows.

    Args:
        profile: from :func:`cache_profile`.
        rows: sequences decoded together (2 x images under guidance).
        steps: decode steps (``num_tokens`` for a whole image: the class token, then N - 1 tokens).
        weight_bytes, matmul_params: from :func:`step_params`.
        bandwidth: bytes/s (measured copy rate, read + write counted).
        flop_rate: FLOP/s (measured matmul rate).
        first_step: position of the first step (for a single mid-sequence step).
    """
    keys = sum(k + 1 for k in range(first_step, first_step + steps))  # positions read, summed over steps
    cache = rows * (2 * profile.fixed_bytes * steps + profile.per_position_bytes * (keys + steps))
    weights = weight_bytes * steps
    flops = rows * (2 * matmul_params * steps + 2 * profile.per_position_elements * keys)
    memory_s, compute_s = (cache + weights) / bandwidth, flops / flop_rate
    return Floor(float(cache), float(weights), float(flops), memory_s, compute_s, max(memory_s, compute_s),
                 "memory" if memory_s >= compute_s else "compute")


# ----------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_call(fn: Callable[[], Any], device: torch.device) -> Tuple[float, Any]:
    """Seconds of one call (CUDA events on the GPU, a host clock after a sync elsewhere)."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _median_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> List[float]:
    for _ in range(warmup):
        fn()
    return [_time_call(fn, device)[0] for _ in range(repeats)]


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / _GB if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    from .samplers import clear_decode_graphs

    clear_decode_graphs()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------- device
def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _aimkit_version() -> str:
    from . import __version__

    return __version__


def _copy_rate(device: torch.device, numel: int, repeats: int) -> Tuple[int, float]:
    """``(bytes, bytes/s)`` of a float32 copy of ``numel`` random elements, read + write counted."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = _median_time(lambda: dst.copy_(src), device, repeats, warmup=3)
    nbytes = 2 * src.numel() * src.element_size()
    return nbytes, nbytes / statistics.median(times)


def _matmul_rate(device: torch.device, n: int, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of an ``n^3`` product of random ``dtype`` matrices (never zeros: they run faster)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = _median_time(lambda: a @ b, device, repeats, warmup=3)
    return 2 * n**3 / statistics.median(times)


def measure_device(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> Dict[str, Any]:
    """Device facts and the two measured ceilings.

    Copy bandwidth: a 1 GiB device-to-device copy (64 MiB on the CPU), bytes read + written,
    median of ``repeats``. Matmul rate: an 8192^3 product of random ``dtype`` matrices (512^3 on
    the CPU), median of ``repeats``.
    """
    from .backbones._mamba_kernels import kernel_info

    facts: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "aimkit": _aimkit_version(),
        "triton": _version("triton"),
        "mamba-ssm": _version("mamba-ssm"),
        "causal-conv1d": _version("causal-conv1d"),
    }
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        facts.update(gpu=prop.name, gpu_memory_gb=prop.total_memory / _GB, sm_count=prop.multi_processor_count,
                     capability=f"{prop.major}.{prop.minor}")
        info = kernel_info()
        facts["kernels"] = {k: info.get(k) for k in ("available", "kernels", "bare_package", "error",
                                                     "causal_conv1d_error")}
    else:
        facts.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
        facts["kernels"] = {"available": False, "error": "CPU run: PyTorch path"}

    cuda = device.type == "cuda"
    facts["copy_bytes"], facts["copy_bandwidth"] = _copy_rate(device, (1 << 28) if cuda else (1 << 24), repeats)
    facts["matmul_n"] = n = 8192 if cuda else 512
    mm_dtype = dtype if cuda else torch.float32
    facts["matmul_dtype"] = str(mm_dtype).replace("torch.", "")
    facts["matmul_flops"] = _matmul_rate(device, n, mm_dtype, repeats)
    _free(device)
    return facts


# ----------------------------------------------------------------------------------------- models
def _randomize_zero_init(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Fill all-zero floating parameters (adaLN-Zero modulations) with N(0, std).

    Zero gates would skip every block; timing or checking such a model would measure less than
    the real work.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.device.type != "meta" and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _transformer_kwargs(overrides: Dict[str, Any]) -> Dict[str, Any]:
    kwargs = {k: v for k, v in overrides.items() if k not in _MAMBA_ONLY and not k.startswith("backbone__")}
    return kwargs


def matched_transformer_layers(name: str, overrides: Dict[str, Any]) -> Tuple[int, int]:
    """``(n_layer, n_head)`` of a transformer with about the parameters of ``name`` (+ overrides).

    ``n_head = d_model // 64`` (at least 1); the depth is solved from two meta-device builds
    (parameter count is linear in depth) and kept at or above the conditioning's group count.
    """
    from .build import build, resolve_config

    ref = build(name, device="meta", pretrained=False, **{**overrides, "tokenizer": None}).num_params()
    cfg = resolve_config(name, **{**overrides, "tokenizer": None})
    n_head = max(1, cfg.d_model // 64)
    kw = {**_transformer_kwargs(overrides), "tokenizer": None, "backbone": "transformer", "n_head": n_head}
    groups = getattr(cfg.conditioning.config, "num_groups", 1) or 1
    lo, hi = max(1, groups), max(2, groups + 1)
    p_lo = build(name, device="meta", pretrained=False, **{**kw, "n_layer": lo}).num_params()
    p_hi = build(name, device="meta", pretrained=False, **{**kw, "n_layer": hi}).num_params()
    per_layer = (p_hi - p_lo) / (hi - lo)
    n_layer = max(lo, round(lo + (ref - p_lo) / per_layer))
    return n_layer, n_head


def build_bench_model(
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    num_tokens: int,
    backbone: str = "mamba2",
    overrides: Optional[Dict[str, Any]] = None,
    with_tokenizer: bool = False,
    seed: int = 0,
):
    """A random-weight generator for timing: preset ``name`` with ``num_tokens`` and overrides.

    ``backbone="transformer"`` builds the transformer of matching size
    (:func:`matched_transformer_layers`); Mamba2-only overrides are dropped for it.
    """
    from .build import build

    kw = dict(overrides or {})
    kw["num_tokens"] = num_tokens
    if not with_tokenizer:
        kw["tokenizer"] = None
    if backbone == "transformer":
        n_layer, n_head = matched_transformer_layers(name, dict(overrides or {}))
        kw = {**_transformer_kwargs(kw), "backbone": "transformer", "n_layer": n_layer, "n_head": n_head}
    elif backbone != "mamba2":
        kw["backbone"] = backbone
    torch.manual_seed(seed)
    model = build(name, device=device, dtype=dtype, pretrained=False, **kw)
    _randomize_zero_init(model, seed)
    return model


# ----------------------------------------------------------------------------------------- options
@dataclass
class BenchOptions:
    """What to run. Lists are Python sequences; see ``aimkit bench --help`` for each option."""

    suite: str = "sampling"  # sampling | decode | train | all
    models: Sequence[str] = ("aim-b", "aim-l", "aim-xl")
    batches: Sequence[int] = (16, 64, 256)
    tokens: Sequence[int] = (256,)
    dtype: str = "bfloat16"
    transformer: bool = False  # transformer rows beside every sampling row
    compare_models: Sequence[str] = ()  # Mamba2 vs transformer over compare_tokens
    compare_batch: int = 64
    compare_tokens: Sequence[int] = (256, 576, 1024)
    decode_vq: bool = False
    decode_models: Sequence[str] = ("aim-xl",)
    decode_batches: Sequence[int] = (16, 256)
    train_models: Sequence[str] = ("aim-b", "aim-l")
    train_batch: int = 64
    train_steps: int = 10
    repeats: int = 3
    out: Optional[str] = None
    device: str = "cuda"
    overrides: Dict[str, Any] = field(default_factory=dict)
    state_dtype: Optional[str] = None  # mamba2 state_dtype override: "float32" | "model"
    budget_s: float = 0.0  # stop starting new rows after this many seconds (0 = no limit)
    check: bool = True  # the correctness row
    require_kernels: bool = False  # abort on CUDA when mamba-ssm's kernels cannot be imported
    seed: int = 0

    def out_dir(self) -> Path:
        return Path(self.out or os.environ.get("OUT") or "bench_out")

    def wants(self, part: str) -> bool:
        return self.suite == "all" or self.suite == part


# ----------------------------------------------------------------------------------------- report
class _Report:
    """Rows and facts, saved as ``bench.json`` + ``bench.md`` after every row; log to ``bench.log``."""

    def __init__(self, options: BenchOptions):
        self.out = options.out_dir()
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.out / "bench.log", "w")  # noqa: SIM115 (open for the whole run)
        self.data: Dict[str, Any] = {
            "options": {k: (list(v) if isinstance(v, (tuple, list)) else v)
                        for k, v in dataclasses.asdict(options).items()},
            "device": {},
            "correctness": None,
            "rows": [],
        }
        self.t0 = time.perf_counter()

    def log(self, msg: str) -> None:
        stamp = f"[{time.perf_counter() - self.t0:7.1f}s] "
        print(stamp + msg, flush=True)
        self.log_file.write(stamp + msg + "\n")
        self.log_file.flush()

    def add(self, row: Dict[str, Any]) -> None:
        self.data["rows"].append(row)
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = time.perf_counter() - self.t0
        write_text_atomic(self.out / "bench.json", json.dumps(self.data, indent=1, default=str) + "\n")
        write_text_atomic(self.out / "bench.md", markdown(self.data))

    def close(self) -> None:
        self.log_file.close()


def _row_error(row: Dict[str, Any], exc: BaseException, report: _Report) -> None:
    oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
    row["status"] = "oom" if oom else "error"
    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    report.log(f"  {row['status'].upper()}: {row['error']}")
    if not oom:
        report.log_file.write(traceback.format_exc())


# ----------------------------------------------------------------------------------------- rows
def _floor_fields(model, rows: int, steps: int, facts: Dict[str, Any], **kw) -> Dict[str, Any]:
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


def _model_fields(model) -> Dict[str, Any]:
    cfg = model.config
    return {"params": model.num_params(), "n_layer": cfg.n_layer, "d_model": cfg.d_model,
            "backbone": cfg.backbone.name, "cfg_scale": cfg.fid_sampling.cfg_scale}


def sampling_row(name: str, backbone: str, batch: int, tokens: int, opts: BenchOptions,
                 facts: Dict[str, Any], report: _Report, model=None) -> Tuple[Dict[str, Any], Any]:
    """Time ``generate(output="tokens")`` for one configuration; returns ``(row, model)``."""
    from .samplers import AutoregressiveSampler, generate

    device, dtype = torch.device(opts.device), getattr(torch, opts.dtype)
    row: Dict[str, Any] = {"suite": "sampling", "model": name, "backbone": backbone, "batch": batch,
                           "tokens": tokens, "dtype": opts.dtype, "status": "ok"}
    try:
        if model is None:
            t0 = time.perf_counter()
            model = build_bench_model(name, device=device, dtype=dtype, num_tokens=tokens, backbone=backbone,
                                      overrides=_overrides_for(opts, backbone),
                                      with_tokenizer=opts.decode_vq and backbone == "mamba2", seed=opts.seed)
            row["build_s"] = time.perf_counter() - t0
        row.update(_model_fields(model))
        cfg_scale = model.config.fid_sampling.cfg_scale
        labels = torch.arange(batch) % model.num_classes
        sampler = AutoregressiveSampler()
        rows = 2 * batch if cfg_scale != 1.0 else batch

        def call():
            return generate(model, labels, cfg_scale=cfg_scale, seed=opts.seed, output="tokens",
                            batch_size=batch, progress=False, sampler=sampler)

        _peak_reset(device)
        row["first_call_s"], codes = _time_call(call, device)
        row["capture_s"] = sampler.last_capture_seconds
        times = [_time_call(call, device)[0] for _ in range(opts.repeats)]
        row["seconds_all"] = times
        row["seconds_per_batch"] = statistics.median(times)
        row["images_per_s"] = batch / row["seconds_per_batch"]
        row["peak_memory_gb"] = _peak_gb(device)
        row.update(_floor_fields(model, rows, tokens, facts))
        row["fraction_of_floor"] = row["floor"]["seconds"] / row["seconds_per_batch"]
        if opts.decode_vq and getattr(model, "tokenizer", None) is not None:
            row.update(_vq_decode(model, codes.to(device), device, opts.repeats))
    except Exception as exc:  # one failed row must not lose the table
        _row_error(row, exc, report)
    return row, model


def _vq_decode(model, codes: Tensor, device: torch.device, repeats: int, chunk: int = 16) -> Dict[str, Any]:
    """Seconds to decode ``codes`` (B, N) to pixels in chunks of ``chunk`` (as ``generate`` does)."""

    def call():
        with torch.inference_mode():
            for part in codes.split(chunk):
                model.tokenizer.decode(part)

    first, _ = _time_call(call, device)
    times = [_time_call(call, device)[0] for _ in range(repeats)]
    return {"vq_decode_first_s": first, "vq_decode_s": statistics.median(times), "vq_chunk": chunk}


def decode_row(name: str, batch: int, opts: BenchOptions, facts: Dict[str, Any], report: _Report,
               replays: int = 20) -> Dict[str, Any]:
    """One decode step at mid-sequence: a captured graph's replay on CUDA, an eager step elsewhere."""
    from .samplers._cuda_graph import DecodeGraph

    device, dtype = torch.device(opts.device), getattr(torch, opts.dtype)
    tokens = opts.tokens[0]
    row: Dict[str, Any] = {"suite": "decode", "model": name, "backbone": "mamba2", "batch": batch,
                           "tokens": tokens, "dtype": opts.dtype, "status": "ok"}
    try:
        model = build_bench_model(name, device=device, dtype=dtype, num_tokens=tokens,
                                  overrides=_overrides_for(opts, "mamba2"), seed=opts.seed)
        row.update(_model_fields(model))
        rows = 2 * batch
        row["rows"] = rows
        labels = torch.arange(rows, device=device) % model.num_classes
        with torch.inference_mode():
            cond = model.condition(labels)
            if device.type == "cuda":
                graph = DecodeGraph(model, cond, rows)
                graph.start(cond)
                params, step = graph.inference_params, lambda: graph.graph.replay()
                row["capture_s"] = graph.capture_seconds
            else:
                params = model.allocate_inference_cache(rows)
                tok = torch.randint(model.vocab_size, (rows,), device=device)
                step = lambda: model.decode_step(tok, cond, params)
            model.prefill(cond, params)
            params.advance(tokens // 2)  # mid-sequence: a KV cache is half full
            if device.type == "cuda":
                graph.tokens.copy_(torch.randint(model.vocab_size, (rows,), device=device))

            def many():
                for _ in range(replays):
                    step()

            times = _median_time(many, device, opts.repeats, warmup=1)
        row["step_s"] = statistics.median(times) / replays
        row["step_s_all"] = [t / replays for t in times]
        row["replays_per_timing"] = replays
        row.update(_floor_fields(model, rows, 1, facts, first_step=tokens // 2))
        row["fraction_of_floor"] = row["floor"]["seconds"] / row["step_s"]
        row["state_gb_per_step"] = 2 * row["state_bytes_per_seq"] * rows / _GB
        row["achieved_bandwidth"] = (row["floor"]["cache_bytes"] + row["floor"]["weight_bytes"]) / row["step_s"]
    except Exception as exc:
        _row_error(row, exc, report)
    return row


def train_row(name: str, opts: BenchOptions, facts: Dict[str, Any], report: _Report,
              mode: str = "eager") -> Dict[str, Any]:
    """One optimiser step: batch x N random codes, bf16 autocast, fused AdamW, grad clip 1.0.

    ``mode="cuda-graph"`` times the same step captured by :class:`aimkit.train_graph.GraphedTrainStep`
    (CUDA only)."""
    device = torch.device(opts.device)
    batch, tokens = opts.train_batch, opts.tokens[0]
    row: Dict[str, Any] = {"suite": "train", "model": name, "backbone": "mamba2", "batch": batch,
                           "tokens": tokens, "dtype": f"float32 + {opts.dtype} autocast", "mode": mode,
                           "status": "ok"}
    try:
        model = build_bench_model(name, device=device, dtype=torch.float32, num_tokens=tokens,
                                  overrides=_overrides_for(opts, "mamba2"), seed=opts.seed).train()
        row.update(_model_fields(model))
        n_params = row["params"]
        fused = device.type == "cuda"
        graphed = mode == "cuda-graph"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=fused,
                                capturable=graphed)
        g = torch.Generator(device="cpu").manual_seed(opts.seed)
        codes = torch.randint(model.vocab_size, (batch, tokens), generator=g).to(device)
        labels = torch.randint(model.num_classes, (batch,), generator=g).to(device)
        autocast_dtype = getattr(torch, opts.dtype)

        if graphed:
            from .train_graph import GraphedTrainStep

            _peak_reset(device)
            row["first_step_s"], step = _time_call(lambda: GraphedTrainStep(
                model, opt, lambda m, c, y: m.loss(c, y), (codes, labels), max_grad_norm=1.0,
                amp_dtype=autocast_dtype, warmup=2), device)  # warm-up steps + capture
            loss = step(codes, labels)
            step = functools.partial(step, codes, labels)
        else:
            def step():
                with torch.autocast(device.type, dtype=autocast_dtype):
                    loss = model.loss(codes, labels)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            _peak_reset(device)
            row["first_step_s"], loss = _time_call(step, device)
        steps = max(opts.train_steps, opts.repeats)
        times = _median_time(step, device, steps, warmup=2)
        row["loss"] = float(loss.detach())
        row["step_s"] = statistics.median(times)
        row["step_s_all"] = times
        row["tokens_per_s"] = batch * tokens / row["step_s"]
        row["model_tflops"] = 6 * n_params * row["tokens_per_s"] / 1e12
        row["mfu"] = row["model_tflops"] * 1e12 / facts["matmul_flops"]
        row["peak_memory_gb"] = _peak_gb(device)
    except Exception as exc:
        _row_error(row, exc, report)
    return row


def correctness_check(opts: BenchOptions, report: _Report, batch: int = 2) -> Dict[str, Any]:
    """Fast-path logits vs the CPU float32 reference on the same weights (aim-b, 4 layers).

    Two checks on random codes: the teacher-forced forward (chunked-scan kernel on CUDA) and
    teacher-forced decoding (prefill + decode steps, replayed from a CUDA graph on CUDA), each as
    ``||fast - ref|| / ||ref||`` of the logits against the float32 CPU forward.
    """
    from .samplers._cuda_graph import DecodeGraph

    device, dtype = torch.device(opts.device), getattr(torch, opts.dtype)
    overrides = {**_overrides_for(opts, "mamba2"), "n_layer": 4}
    result: Dict[str, Any] = {"model": "aim-b", "overrides": {k: str(v) for k, v in overrides.items()},
                              "batch": batch, "dtype": opts.dtype, "tolerance": CORRECTNESS_TOLERANCE}
    try:
        tokens = opts.tokens[0]
        ref = build_bench_model("aim-b", device=torch.device("cpu"), dtype=torch.float32, num_tokens=tokens,
                                overrides=overrides, seed=opts.seed + 1)
        fast = build_bench_model("aim-b", device=device, dtype=dtype, num_tokens=tokens, overrides=overrides,
                                 seed=opts.seed + 1)
        fast.load_state_dict(ref.state_dict())
        g = torch.Generator(device="cpu").manual_seed(opts.seed + 2)
        codes = torch.randint(ref.vocab_size, (batch, tokens), generator=g)
        labels = torch.randint(ref.num_classes, (batch,), generator=g)
        with torch.inference_mode():
            want = ref(codes, labels).double()  # (B, N, V)
            got_fwd = fast(codes.to(device), labels.to(device)).double().cpu()
            cond = fast.condition(labels.to(device))
            if device.type == "cuda":
                graph = DecodeGraph(fast, cond, batch)
                graph.start(cond)
                params, step = graph.inference_params, graph.step
                graph_cond = graph.cond
            else:
                params = fast.allocate_inference_cache(batch)
                graph_cond = cond
                step = lambda t: fast.decode_step(t, cond, params)
            logits = [fast.prefill(graph_cond, params).clone()]
            params.advance(1)
            dev_codes = codes.to(device)
            for k in range(tokens - 1):
                logits.append(step(dev_codes[:, k]).clone())
                params.advance(1)
            got_dec = torch.stack(logits, dim=1).double().cpu()

        def rel(a: Tensor) -> float:
            return float((a - want).norm() / want.norm())

        result["forward_rel_err"] = rel(got_fwd)
        result["decode_rel_err"] = rel(got_dec)
        worst = max(result["forward_rel_err"], result["decode_rel_err"])
        result["passed"] = bool(math.isfinite(worst) and worst <= CORRECTNESS_TOLERANCE)
        result["kernels"] = device.type == "cuda" and bool(report.data["device"].get("kernels", {}).get("available"))
    except Exception as exc:
        result["passed"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"[:300]
        report.log_file.write(traceback.format_exc())
    return result


def _overrides_for(opts: BenchOptions, backbone: str) -> Dict[str, Any]:
    kw = dict(opts.overrides)
    if opts.state_dtype is not None and backbone == "mamba2":
        kw["state_dtype"] = opts.state_dtype
    return kw


# ----------------------------------------------------------------------------------------- output
def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _int(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"


def _row_floor(row: Dict[str, Any]) -> Dict[str, Any]:
    return row.get("floor") or {}


def markdown(data: Dict[str, Any]) -> str:
    """The run as Markdown tables, ready to paste into ``docs/benchmarks.md``."""
    dev = data.get("device") or {}
    lines = ["# aimkit bench", ""]
    if dev:
        kern = dev.get("kernels") or {}
        lines += [
            f"- device: {dev.get('gpu') or dev.get('cpu')} ({dev.get('device')}), {dev.get('date')}",
            f"- torch {dev.get('torch')} (CUDA {dev.get('cuda')}), triton {dev.get('triton')}, "
            f"mamba-ssm {dev.get('mamba-ssm')}, causal-conv1d {dev.get('causal-conv1d')}, aimkit {dev.get('aimkit')}",
            f"- fused kernels: {kern.get('available')}; causal-conv1d kernels: "
            f"{(kern.get('kernels') or {}).get('causal_conv1d_fn')}",
            f"- measured copy bandwidth: {_fmt(dev.get('copy_bandwidth', 0) / 1e12, '.2f')} TB/s "
            f"(read + write); measured {dev.get('matmul_dtype')} matmul ({dev.get('matmul_n')}^3): "
            f"{_fmt(dev.get('matmul_flops', 0) / 1e12, '.0f')} TFLOP/s",
            "",
        ]
    chk = data.get("correctness")
    if chk:
        verdict = "passed" if chk.get("passed") else "FAILED"
        lines += [f"Correctness (aim-b, 4 layers, batch {chk.get('batch')}, {chk.get('dtype')} vs CPU float32): "
                  f"forward {_fmt(chk.get('forward_rel_err'), '.2e')}, decode {_fmt(chk.get('decode_rel_err'), '.2e')} "
                  f"(tolerance {chk.get('tolerance')}): **{verdict}**" + (f" {chk['error']}" if chk.get("error") else ""),
                  ""]
    rows = data.get("rows", [])

    def sampling_cells(r):
        f = _row_floor(r)
        return [r["model"], r["backbone"], _int(r.get("params")), r["batch"], r["tokens"],
                "/".join(r.get("cache_dtypes", [])) or "-", _fmt(r.get("seconds_per_batch"), ".3f"),
                _fmt(r.get("images_per_s"), ".1f"), _fmt(r.get("first_call_s"), ".1f"),
                _fmt(r.get("peak_memory_gb"), ".1f"), _fmt(f.get("seconds"), ".3f"), f.get("bound", "-"),
                _fmt(r.get("fraction_of_floor"), ".2f"), _fmt(r.get("vq_decode_s"), ".3f"), r["status"]]

    def decode_cells(r):
        f = _row_floor(r)
        return [r["model"], f"{r['batch']} ({r.get('rows', '-')})", "/".join(r.get("cache_dtypes", [])) or "-",
                _fmt(r.get("step_s") and r["step_s"] * 1e3, ".3f"), _fmt(f.get("seconds") and f["seconds"] * 1e3, ".3f"),
                _fmt(r.get("state_gb_per_step"), ".2f"),
                _fmt(r.get("achieved_bandwidth") and r["achieved_bandwidth"] / 1e12, ".2f"),
                _fmt(r.get("fraction_of_floor"), ".2f"), r["status"]]

    def train_cells(r):
        return [r["model"], r.get("mode", "eager"), _int(r.get("params")), f"{r['batch']} x {r['tokens']}",
                _fmt(r.get("step_s"), ".3f"), _fmt(r.get("tokens_per_s"), ",.0f"), _fmt(r.get("model_tflops"), ".1f"),
                _fmt(r.get("mfu"), ".1%"), _fmt(r.get("peak_memory_gb"), ".1f"), r["status"]]

    sections = [
        ("sampling", "## Sampling (tokens only, guidance, median of repeats)",
         ["model", "backbone", "params", "batch", "tokens", "cache dtype", "s / batch", "images/s", "first call (s)",
          "peak GB", "floor (s)", "bound", "fraction of floor", "VQ decode (s)", "status"], sampling_cells),
        ("decode", "## One decode step (CUDA-graph replay on the GPU, eager elsewhere; mid-sequence)",
         ["model", "batch (rows)", "cache dtype", "step (ms)", "floor (ms)", "state GB / step", "achieved TB/s",
          "fraction of floor", "status"], decode_cells),
        ("train", "## Training step (bf16 autocast, fused AdamW, grad clip 1.0)",
         ["model", "step", "params", "batch x tokens", "step (s)", "tokens/s", "6·N·tokens/s (TFLOP/s)", "MFU",
          "peak GB", "status"], train_cells),
    ]
    for suite, title, columns, cells in sections:
        selected = [r for r in rows if r["suite"] == suite]
        if selected:
            lines += [title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(c) for c in cells(r)) + " |" for r in selected]
            lines.append("")
    lines += ["Floors: state (or KV cache) bytes + step weights over the measured copy bandwidth, matmul FLOPs over "
              "the measured matmul rate; the larger one. `fraction of floor` = floor / measured.", ""]
    return "\n".join(lines)


def compact_table(data: Dict[str, Any]) -> str:
    """A short fixed-width table of every row (printed last, so a truncated log still shows it)."""
    head = f"{'suite':8} {'model':7} {'backbone':11} {'batch':>5} {'tok':>5} {'seconds':>9} {'rate':>10} " \
           f"{'floor_s':>9} {'frac':>6} {'peakGB':>7} {'first_s':>8} status"
    out = [head, "-" * len(head)]
    for r in data.get("rows", []):
        if r["suite"] == "sampling":
            secs, rate = r.get("seconds_per_batch"), r.get("images_per_s")
            unit, first = "img/s", r.get("first_call_s")
        elif r["suite"] == "decode":
            secs, rate, unit, first = r.get("step_s"), None, "", r.get("capture_s")
        else:
            secs, rate = r.get("step_s"), r.get("tokens_per_s")
            unit, first = "tok/s", r.get("first_step_s")
        frac = r.get("fraction_of_floor") if r["suite"] != "train" else r.get("mfu")
        out.append(
            f"{r['suite']:8} {r['model']:7} {r.get('mode', r['backbone']):11} {r['batch']:>5} {r['tokens']:>5} "
            f"{_fmt(secs, '9.4f') if secs else '-':>9} {(_fmt(rate, '8.1f') + unit) if rate else '-':>10} "
            f"{_fmt(_row_floor(r).get('seconds'), '9.4f') if _row_floor(r) else '-':>9} "
            f"{_fmt(frac, '6.3f') if frac else '-':>6} {_fmt(r.get('peak_memory_gb'), '7.1f'):>7} "
            f"{_fmt(first, '8.1f') if first is not None else '-':>8} {r['status']}"
        )
    chk = data.get("correctness")
    if chk:
        out.append(f"correctness: forward {_fmt(chk.get('forward_rel_err'), '.2e')}, decode "
                   f"{_fmt(chk.get('decode_rel_err'), '.2e')} -> {'PASSED' if chk.get('passed') else 'FAILED'}")
    dev = data.get("device") or {}
    if dev:
        out.append(f"device: {dev.get('gpu') or dev.get('cpu')}; copy {dev.get('copy_bandwidth', 0) / 1e12:.2f} TB/s; "
                   f"matmul {dev.get('matmul_flops', 0) / 1e12:.0f} TFLOP/s; kernels "
                   f"{(dev.get('kernels') or {}).get('available')}")
    return "\n".join(out)


def _save_figure(plt, fig, path: Path) -> str:
    """Lay out, write (110 dpi) and close ``fig``; returns the file name."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plots(data: Dict[str, Any], out: Path) -> List[str]:
    """At most three PNGs: throughput vs batch, Mamba2 vs transformer over tokens, fraction of floor."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # plots are optional
        return []
    written = []
    rows = [r for r in data.get("rows", []) if r.get("status") == "ok"]
    base_tokens = (data.get("options") or {}).get("tokens", [256])[0]
    sampling = [r for r in rows if r["suite"] == "sampling" and r["tokens"] == base_tokens]
    series: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in sampling:
        series.setdefault((r["model"], r["backbone"]), []).append(r)
    if any(len(v) > 1 for v in series.values()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, ((model, backbone), rs) in enumerate(sorted(series.items())):
            rs = sorted(rs, key=lambda r: r["batch"])
            color = f"C{i}"
            style = "-" if backbone == "mamba2" else "-."
            xs = [r["batch"] for r in rs]
            ax.plot(xs, [r["images_per_s"] for r in rs], style, marker="o", color=color, label=f"{model} {backbone}")
            ax.plot(xs, [r["batch"] / r["floor"]["seconds"] for r in rs], ":", color=color, alpha=0.6)
            ref = OFFICIAL_H200_IMAGES_PER_S.get(model) if backbone == "mamba2" and base_tokens == 256 else None
            if ref:
                ax.plot(list(ref), list(ref.values()), "x", color=color, markersize=8)
        ax.plot([], [], ":", color="gray", label="floor (ceiling on images/s)")
        ax.plot([], [], "x", color="gray", label="official AiM code, H200 (reference)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        batches = sorted({r["batch"] for r in sampling} | {b for ref in OFFICIAL_H200_IMAGES_PER_S.values() for b in ref})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("batch (images)")
        ax.set_ylabel("images/s (tokens only)")
        ax.set_title(f"Sampling throughput, {base_tokens} tokens ({(data.get('device') or {}).get('gpu')})")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        written.append(_save_figure(plt, fig, out / "sampling_throughput.png"))

    comp = [r for r in rows if r["suite"] == "sampling"]
    by_model: Dict[Tuple[str, int], Dict[str, List[Dict[str, Any]]]] = {}
    for r in comp:
        by_model.setdefault((r["model"], r["batch"]), {}).setdefault(r["backbone"], []).append(r)
    pairs = {k: v for k, v in by_model.items()
             if len(v) > 1 and any(len({r["tokens"] for r in rs}) > 1 for rs in v.values())}
    if pairs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, ((model, batch), by_backbone) in enumerate(sorted(pairs.items())):
            for backbone, rs in sorted(by_backbone.items()):
                rs = sorted(rs, key=lambda r: r["tokens"])
                style = "-" if backbone == "mamba2" else "--"
                xs = [r["tokens"] for r in rs]
                ax.plot(xs, [r["seconds_per_batch"] for r in rs], style, marker="o" if backbone == "mamba2" else "s",
                        color=f"C{i}",
                        label=f"{model} {backbone} (batch {batch})")
                ax.plot(xs, [r["floor"]["seconds"] for r in rs], style, color=f"C{i}", alpha=0.35)
        ax.plot([], [], color="gray", alpha=0.35, label="floors (same line style)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        tokens = sorted({r["tokens"] for group in pairs.values() for rs in group.values() for r in rs})
        ax.set_xticks(tokens, [str(t) for t in tokens])
        ax.minorticks_off()
        ax.set_xlabel("tokens per image")
        ax.set_ylabel("seconds per batch (tokens only)")
        ax.set_title("Mamba2 state vs transformer KV cache")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        written.append(_save_figure(plt, fig, out / "mamba_vs_transformer.png"))

    fracs = [r for r in rows if r.get("fraction_of_floor")]
    if fracs:
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(fracs) + 2), 4.5))
        labels = [f"{r['suite'][:3]} {r['model']}{'' if r['backbone'] == 'mamba2' else ' T'} b{r['batch']} n{r['tokens']}"
                  for r in fracs]
        colors = ["C0" if r["backbone"] == "mamba2" else "C1" for r in fracs]
        ax.bar(range(len(fracs)), [r["fraction_of_floor"] for r in fracs], color=colors)
        ax.set_xticks(range(len(fracs)), labels, rotation=70, ha="right", fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylabel("floor / measured (1 = at the floor)")
        ax.set_title("Fraction of the physical floor (blue: Mamba2, orange: transformer)")
        written.append(_save_figure(plt, fig, out / "fraction_of_floor.png"))
    return written


# ----------------------------------------------------------------------------------------- driver
def _plan(opts: BenchOptions) -> List[Tuple[str, Any]]:
    """Row jobs in priority order (the budget cuts the tail)."""
    jobs: List[Tuple[str, Any]] = []
    if opts.wants("sampling"):
        backbones = ["mamba2"] + (["transformer"] if opts.transformer else [])
        for name in opts.models:
            for backbone in backbones:
                for tokens in opts.tokens:
                    jobs.append(("sampling", (name, backbone, tuple(opts.batches), tokens)))
        done = {(name, b, batch, tokens) for name in opts.models for b in backbones
                for batch in opts.batches for tokens in opts.tokens}
        for name in opts.compare_models:
            for backbone in ("mamba2", "transformer"):
                for tokens in opts.compare_tokens:
                    if (name, backbone, opts.compare_batch, tokens) not in done:
                        jobs.append(("sampling", (name, backbone, (opts.compare_batch,), tokens)))
    if opts.wants("decode"):
        for name in opts.decode_models:
            for batch in opts.decode_batches:
                jobs.append(("decode", (name, batch)))
    if opts.wants("train"):
        modes = ("eager", "cuda-graph") if opts.device.startswith("cuda") else ("eager",)
        for name in opts.train_models:
            for mode in modes:
                jobs.append(("train", (name, mode)))
    return jobs


def run(opts: BenchOptions) -> int:
    """Run the benchmark; returns the exit status (1 when the correctness check fails)."""
    from .errors import ConfigError

    if opts.suite not in ("sampling", "decode", "train", "all"):
        raise ConfigError(f"unknown suite {opts.suite!r}; choose sampling, decode, train or all")
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("no CUDA device; pass --device cpu for a (slow, small) CPU run")
    if not isinstance(getattr(torch, opts.dtype, None), torch.dtype):
        raise ConfigError(f"unknown dtype {opts.dtype!r}")
    report = _Report(opts)
    report.log(f"aimkit bench: suite {opts.suite}, out {report.out}")
    facts = measure_device(device, getattr(torch, opts.dtype))
    report.data["device"] = facts
    report.save()
    report.log(f"device {facts.get('gpu') or facts.get('cpu')}: copy {facts['copy_bandwidth'] / 1e12:.3f} TB/s, "
               f"matmul {facts['matmul_flops'] / 1e12:.1f} TFLOP/s, kernels {facts['kernels'].get('available')}, "
               f"mamba-ssm {facts['mamba-ssm']}, causal-conv1d {facts['causal-conv1d']}")
    if device.type == "cuda" and not facts["kernels"].get("available"):
        report.log("WARNING: mamba-ssm kernels unavailable: Mamba2 rows measure the PyTorch path "
                   f"({facts['kernels'].get('error')})")
        if opts.require_kernels:
            report.log("aborting (--require-kernels)")
            report.close()
            return 3
    status = 0
    if opts.check:
        chk = correctness_check(opts, report)
        report.data["correctness"] = chk
        report.save()
        if chk.get("passed"):
            report.log(f"correctness: forward {chk['forward_rel_err']:.2e}, decode {chk['decode_rel_err']:.2e} (ok)")
        else:
            status = 1
            report.log("!" * 72)
            report.log(f"CORRECTNESS FAILED: forward {chk.get('forward_rel_err')}, decode {chk.get('decode_rel_err')} "
                       f"(tolerance {CORRECTNESS_TOLERANCE}) {chk.get('error', '')}")
            report.log("!" * 72)

    for kind, job in _plan(opts):
        if opts.budget_s and time.perf_counter() - report.t0 > opts.budget_s:
            report.log(f"budget of {opts.budget_s:.0f} s spent: skipping {kind} {job}")
            report.data.setdefault("skipped", []).append(f"{kind} {job}")
            continue
        if kind == "sampling":
            name, backbone, batches, tokens = job
            model = None
            for batch in batches:
                if opts.budget_s and time.perf_counter() - report.t0 > opts.budget_s:
                    report.data.setdefault("skipped", []).append(f"sampling {name} {backbone} {batch} {tokens}")
                    continue
                report.log(f"sampling {name} {backbone} batch {batch} tokens {tokens}")
                row, model = sampling_row(name, backbone, batch, tokens, opts, facts, report, model)
                report.add(row)
                _log_row(report, row)
                from .samplers import clear_decode_graphs

                clear_decode_graphs()
                if row["status"] == "oom":
                    model = None  # rebuild after an OOM so the next row starts clean
                _free(device)
            del model
        elif kind == "decode":
            name, batch = job
            report.log(f"decode step {name} batch {batch}")
            row = decode_row(name, batch, opts, facts, report)
            report.add(row)
            _log_row(report, row)
        else:
            name, mode = job
            report.log(f"train {name} ({mode}) batch {opts.train_batch} x {opts.tokens[0]}")
            row = train_row(name, opts, facts, report, mode=mode)
            report.add(row)
            _log_row(report, row)
        _free(device)

    report.data["plots"] = plots(report.data, report.out)
    report.save()
    report.log("wrote " + ", ".join(["bench.json", "bench.md", "bench.log"] + report.data["plots"]))
    table = compact_table(report.data)
    report.log_file.write(table + "\n")
    report.close()
    print(table, flush=True)
    return status


def _log_row(report: _Report, row: Dict[str, Any]) -> None:
    if row["status"] != "ok":
        return
    f = _row_floor(row)
    if row["suite"] == "sampling":
        report.log(f"  {row['seconds_per_batch']:.3f} s/batch, {row['images_per_s']:.1f} img/s, first "
                   f"{row['first_call_s']:.1f} s, floor {f['seconds']:.3f} s ({f['bound']}), "
                   f"fraction {row['fraction_of_floor']:.3f}, peak {_fmt(row['peak_memory_gb'], '.1f')} GB")
    elif row["suite"] == "decode":
        report.log(f"  step {row['step_s'] * 1e3:.3f} ms, floor {f['seconds'] * 1e3:.3f} ms, "
                   f"fraction {row['fraction_of_floor']:.3f}")
    else:
        report.log(f"  step {row['step_s']:.3f} s, {row['tokens_per_s']:,.0f} tok/s, {row['model_tflops']:.1f} "
                   f"TFLOP/s, MFU {row['mfu']:.1%}, peak {_fmt(row['peak_memory_gb'], '.1f')} GB")


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
