"""What one ``aimkit bench`` run measures: :class:`BenchOptions` and its per-device defaults."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..policy import ExecutionPolicy, default_policy

__all__ = ["BenchOptions", "CPU_DEFAULTS", "CUDA_DEFAULTS", "SUITES"]

SUITES = ("sampling", "decode", "train", "all")

# the grid on a GPU: the AiM presets at the batches of the published comparisons
CUDA_DEFAULTS: dict[str, Any] = dict(
    models=("aim-b", "aim-l", "aim-xl"), batches=(16, 64, 256), tokens=(256,), compare_batches=(64,),
    compare_tokens=(256, 576, 1024), decode_models=("aim-xl",), decode_batches=(16, 256),
    train_models=("aim-b", "aim-l"), train_batch=64, check_model="aim-b",
)
# the grid on a CPU: the tiny registered preset at small batches (seconds, not hours)
CPU_DEFAULTS: dict[str, Any] = dict(
    models=("aim-tiny-shapes",), batches=(1, 4), tokens=(256,), compare_batches=(4,), compare_tokens=(64, 256),
    decode_models=("aim-tiny-shapes",), decode_batches=(4,), train_models=("aim-tiny-shapes",), train_batch=4,
    check_model="aim-tiny-shapes",
)


@dataclass
class BenchOptions:
    """What to run. Lists are Python sequences; see ``aimkit bench --help`` for each option.

    Fields left None take the device's defaults (:data:`CUDA_DEFAULTS`, :data:`CPU_DEFAULTS`)
    in :meth:`resolved`.
    """

    suite: str = "sampling"  # sampling | decode | train | all
    models: Sequence[str] | None = None  # presets of the sampling grid
    batches: Sequence[int] | None = None  # images per sampling batch
    tokens: Sequence[int] | None = None  # tokens per image; the first one for decode, train, check
    dtype: str = "bfloat16"  # parameter dtype of sampling and decode, autocast dtype of training
    transformer: bool = False  # transformer rows beside every sampling row
    compare_models: Sequence[str] = ()  # Mamba2 vs transformer over compare_tokens
    compare_batches: Sequence[int] | None = None  # batches of the comparison
    compare_tokens: Sequence[int] | None = None
    decode_vq: bool = False  # also time VQ decoding of every sampled batch
    decode_models: Sequence[str] | None = None
    decode_batches: Sequence[int] | None = None
    train_models: Sequence[str] | None = None
    train_batch: int | None = None
    train_steps: int = 10
    repeats: int = 3
    out: str | None = None
    device: str = "cuda"
    overrides: dict[str, Any] = field(default_factory=dict)  # architecture overrides for every model
    policy: ExecutionPolicy = field(default_factory=default_policy)  # the execution policy under test
    check_model: str | None = None  # preset of the correctness check (4 layers)
    reference: str | None = None  # JSON of reference figures drawn beside the results
    budget_s: float = 0.0  # stop starting new rows after this many seconds (0 = no limit)
    check: bool = True  # the correctness row
    require_kernels: bool = False  # abort on CUDA when mamba-ssm's kernels cannot be imported
    seed: int = 0

    def resolved(self) -> BenchOptions:
        """A copy with every None field set to the device's default."""
        defaults = CUDA_DEFAULTS if self.device.startswith("cuda") else CPU_DEFAULTS
        missing = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **missing)

    def out_dir(self) -> Path:
        """``out``, else ``$OUT``, else ``./bench_out``."""
        return Path(self.out or os.environ.get("OUT") or "bench_out")

    def wants(self, part: str) -> bool:
        """Whether the suite includes ``part`` (``"sampling"``, ``"decode"`` or ``"train"``)."""
        return self.suite == "all" or self.suite == part

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (lists for sequences, the policy as its fields)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["policy"] = self.policy.to_dict()
        return {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in data.items()}
