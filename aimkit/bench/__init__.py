"""Performance harness behind ``aimkit bench``: sampling, decode-step and training throughput,
each number next to the physical floor it is measured against.

One run goes, in this order (``bench.json`` and ``bench.md`` are rewritten after every row)::

    device facts       device, versions, measured copy bandwidth and matmul rate, date
    correctness        fast path (device dtype, the policy's kernels and graphs) vs CPU float32
    sampling           model x batch x tokens: generate(output="tokens") median, first call apart
    comparison         Mamba2 vs a transformer of matching size over token counts
    decode             one decode step at mid-sequence per model and batch
    train              batch x N random codes, autocast, AdamW, grad clip 1.0

The kernel variant under test is an :class:`aimkit.policy.ExecutionPolicy`
(:attr:`BenchOptions.policy`), stored on every model built and written into every row
(``policy``, ``policy_resolved``). Modules, one job each:

* :mod:`.floors`: bytes and FLOPs of a decode run or a training token (pure arithmetic);
* :mod:`.timing`: timers, peak memory, the device's measured copy and matmul rates;
* :mod:`.models`: random-weight bench models and the transformer of matching size;
* :mod:`.rows`, :mod:`.train_rows`: the measured rows and the correctness check;
* :mod:`.report`, :mod:`.plots`: Markdown, the compact table, reference figures, plots;
* :mod:`.options`, :mod:`.run`: what to run (per-device defaults), the plan and the run.

Example::

    aimkit bench --suite all --models aim-b,aim-xl --batches 16,256 --out /tmp/bench
    aimkit bench --device cpu                                  # tiny models, seconds
"""

from .floors import (
    CacheProfile,
    Floor,
    cache_profile,
    decode_floor,
    kv_cache_bytes_per_image,
    mamba_state_bytes_per_step,
    step_params,
    train_flops_per_token,
    utilization,
)
from .models import MAMBA2_ONLY_FIELDS, build_bench_model, matched_transformer_layers
from .options import CPU_DEFAULTS, CUDA_DEFAULTS, BenchOptions
from .plots import plots
from .report import compact_table, load_reference, markdown
from .rows import CORRECTNESS_TOLERANCE, correctness_check, decode_row, sampling_row
from .run import plan, run
from .timing import measure_device
from .train_rows import make_train_step, train_row

__all__ = [
    "BenchOptions",
    "CORRECTNESS_TOLERANCE",
    "CPU_DEFAULTS",
    "CUDA_DEFAULTS",
    "CacheProfile",
    "Floor",
    "MAMBA2_ONLY_FIELDS",
    "build_bench_model",
    "cache_profile",
    "compact_table",
    "correctness_check",
    "decode_floor",
    "decode_row",
    "kv_cache_bytes_per_image",
    "load_reference",
    "make_train_step",
    "mamba_state_bytes_per_step",
    "markdown",
    "matched_transformer_layers",
    "measure_device",
    "plan",
    "plots",
    "run",
    "sampling_row",
    "step_params",
    "train_flops_per_token",
    "train_row",
    "utilization",
]
