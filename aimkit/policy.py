"""Which implementation of each operation runs: one explicit, immutable execution policy.

Every numerical operation with a fast path has two implementations: a pure-PyTorch reference that
runs anywhere (and that the fast path is tested against) and a kernel (Triton, mamba-ssm,
``torch.compile``, CUDA graphs). An :class:`ExecutionPolicy` says which one each operation uses.
It is decided once, when a model or trainer is built (``aimkit.build(..., policy=...)``), stored
on it (``gen.policy``), shown by ``repr(gen)`` and ``aimkit info MODEL``, written into benchmark
results, and part of every CUDA-graph key, so a captured graph never replays another policy.
Nothing reads global state per call.

Per-operation choices take three values:

* ``"auto"`` (default): the kernel for CUDA tensors when it can be imported, else the reference;
* ``"kernel"``: the kernel or an error (CPU tensors, or the package missing), for tests that must
  exercise the fast path;
* ``"reference"``: always the PyTorch reference.

Environment variables only give the default (:func:`default_policy`, read when an object is
built without an explicit policy, never per call): ``AIMKIT_DECODE_KERNELS`` (``all``, ``none``
or a comma list of ``ssm``, ``conv``, ``norm``, ``gnorm``, ``attn``) and ``AIMKIT_TRAIN_COMPILE``
(``auto``, ``never`` or a comma list of ``glue``, ``loss``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .config import check_fields, config_from_dict, option
from .errors import ConfigError

__all__ = ["CHOICES", "OPERATIONS", "ExecutionPolicy", "default_policy", "kernel_available"]

CHOICES = ("auto", "kernel", "reference")

# operation -> (what its kernel is, the package the kernel needs)
OPERATIONS: dict[str, tuple] = {
    "scan": ("mamba-ssm's chunked scan, gated norm and causal-conv1d for whole sequences", "mamba_ssm"),
    "state_update": ("aimkit's one-pass Mamba2 state-update kernel (decode step)", "triton"),
    "conv_step": ("aimkit's ring-buffer convolution-step kernel (decode step)", "triton"),
    "decode_glue": ("aimkit's fused residual-add + RMSNorm + modulation kernel (decode step)", "triton"),
    "sampling": ("aimkit's fused guidance + temperature + Gumbel-max sampling kernels", "triton"),
    "decode_attention": ("aimkit's rotary + KV-cache write kernel and split-key attention over the valid prefix "
                         "(transformer decode step)", "triton"),
    "vq_norm": ("aimkit's fused GroupNorm + swish kernel (the VQ tokenizer's blocks, without autograd)", "triton"),
}
TRAIN_STEPS = ("auto", "eager", "layer_graphs", "graph")
STATE_DTYPES = ("float32", "model")

_DECODE_ENV = "AIMKIT_DECODE_KERNELS"
_COMPILE_ENV = "AIMKIT_TRAIN_COMPILE"
_DECODE_KINDS = {"ssm": "state_update", "conv": "conv_step", "norm": "decode_glue", "attn": "decode_attention"}


@dataclass(frozen=True)
class ExecutionPolicy:
    """How a model computes, as opposed to what it computes (its config): same maths, other speed.

    Attributes:
        scan: Mamba2 over whole sequences (training, prefill): mamba-ssm's Triton chunked scan and
            gated norm, causal-conv1d's convolution when installed; reference: aimkit's chunked SSD.
        state_update: the Mamba2 decode-step state update (aimkit's Triton kernel).
        conv_step: the Mamba2 decode-step convolution (aimkit's Triton kernel).
        decode_glue: the decode step's glue between sublayers (gated residual add, RMSNorm,
            modulation) as one Triton kernel per sublayer.
        sampling: plain temperature sampling (no top-k / top-p) as two Triton kernels per step.
        decode_attention: the transformer's decode step around attention as two Triton kernels
            (rotary of q and k with the cache write; attention over the cache's valid prefix only);
            reference: PyTorch rotary, ``index_copy_`` and SDPA over the whole cache under a mask.
        vq_norm: the VQ tokenizer's GroupNorm and the swish after it as one Triton kernel (two
            passes over the activations instead of four); used where no gradient is recorded.
        decode_graph: on CUDA, replay each decode step from a captured CUDA graph (one launch
            per step instead of one per kernel).
        decode_streams: on CUDA, split each decode step's rows into this many groups and issue
            each group's layers on its own CUDA stream, so that one group's memory-bound kernels
            (the state update, attention over the cache) can run beside another's matmuls; the
            result is the same row by row. 1 (default): one stream. Not yet measured faster
            (``aimkit bench --suite decode --policy decode_streams=2`` times it); the weights
            are read once per group.
        fold_gated_norm: fold Mamba2's gated RMSNorm into the state-update and glue kernels
            (needs both as kernels).
        split_scan: in training, Mamba2's whole mixer after ``in_proj`` as mamba-ssm's one
            autograd function (needs ``scan`` as kernel and causal-conv1d).
        chunk_size: chunk length of the chunked scan (either implementation).
        state_dtype: decoding SSM state: ``"model"`` (default: the model's dtype, e.g. bf16 as the
            official code keeps it, half the memory traffic of a decode step of a float32 state;
            the quality evidence is in docs/benchmarks.md) or ``"float32"`` (float64 for a
            float64 model).
        compile_glue: ``torch.compile`` the glue between sublayers in whole-sequence forwards
            without a cache on CUDA (training); falls back to eager with one warning. Where
            ``train_step: auto`` falls back to the eager step, the trainer turns it off (host-bound
            there: measured faster uncompiled; :func:`aimkit.training.step.step_policy`).
        compile_loss: ``torch.compile`` the float32 cross-entropy on CUDA.
        train_step: the trainer's step: ``"auto"`` (default): graph wherever a run allows it (one
            CUDA process, any ``grad_accum``, bf16 or no mixed precision, no ``compile``), else
            layer_graphs on CUDA without ``compile`` (several processes under DDP, fp16; FSDP and
            DeepSpeed shard the parameters: eager), else eager; the
            trainer resolves it once at setup and logs and records the step it runs
            (:func:`aimkit.training.step.resolve_train_step`). ``"graph"`` (forward, backward,
            clipping and the optimizer step replayed from CUDA graphs), ``"layer_graphs"`` (the
            eager step with each sublayer's forward and backward replayed from CUDA graphs) or
            ``"eager"`` insist.
    """

    scan: str = option("auto", choices=CHOICES)
    state_update: str = option("auto", choices=CHOICES)
    conv_step: str = option("auto", choices=CHOICES)
    decode_glue: str = option("auto", choices=CHOICES)
    sampling: str = option("auto", choices=CHOICES)
    decode_attention: str = option("auto", choices=CHOICES)
    vq_norm: str = option("auto", choices=CHOICES)
    decode_graph: bool = True
    decode_streams: int = option(1, low=1, high=8)
    fold_gated_norm: bool = True
    split_scan: bool = True
    chunk_size: int = option(128, low=1)
    state_dtype: str = option("model", choices=STATE_DTYPES)
    compile_glue: bool = True
    compile_loss: bool = True
    train_step: str = option("auto", choices=TRAIN_STEPS)

    def __post_init__(self):
        check_fields(self, "policy")  # types, choices and ranges of every field

    # ------------------------------------------------------------------------- construction

    @classmethod
    def reference(cls, **changes: Any) -> ExecutionPolicy:
        """Every operation on its PyTorch reference, nothing compiled (``changes`` applied last)."""
        base = {op: "reference" for op in OPERATIONS}
        base.update(decode_graph=False, fold_gated_norm=False, split_scan=False, compile_glue=False, compile_loss=False)
        base.update(changes)
        return cls.from_dict(base)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "policy") -> ExecutionPolicy:
        """A policy from a plain mapping (a recipe's ``policy:`` section, a benchmark record);
        unknown keys name the closest valid ones."""
        return config_from_dict(cls, dict(data), where)

    def replace(self, **changes: Any) -> ExecutionPolicy:
        """A copy with ``changes`` (checked like :meth:`from_dict`)."""
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON values (benchmark records, ``aimkit info``)."""
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------------- decisions

    def use_kernel(self, op: str, x: torch.Tensor | torch.device) -> bool:
        """Whether ``op`` runs its kernel for tensors like ``x`` (a tensor or a device).

        ``"auto"``: CUDA, not float64 (the kernels compute in float32 or lower), and the kernel's
        package importable. ``"kernel"``: the same conditions or a :class:`ConfigError` that says
        which one fails. ``"reference"``: never."""
        choice = getattr(self, op) if op in OPERATIONS else _unknown_op(op)
        if choice == "reference":
            return False
        device = x if isinstance(x, torch.device) else x.device
        float64 = torch.is_tensor(x) and x.dtype == torch.float64
        usable = device.type == "cuda" and not float64 and kernel_available(op)
        if not usable and choice == "kernel":
            why = ("float64 tensors" if float64 else f"tensors on {device}" if device.type != "cuda"
                   else f"{OPERATIONS[op][1]} cannot be imported")
            raise ConfigError(f"policy {op}='kernel' needs CUDA float tensors and {OPERATIONS[op][1]}, "
                              f"got {why}; use {op}='auto' or 'reference'")
        return usable

    def resolved(self, device: str | torch.device) -> dict[str, str]:
        """What each operation runs on ``device`` (``"kernel"`` / ``"reference"``), for reports."""
        device = torch.device(device)
        out = {}
        for op in OPERATIONS:
            try:
                out[op] = "kernel" if self.use_kernel(op, device) else "reference"
            except ConfigError:
                out[op] = "unavailable"
        return out

    def describe(self) -> str:
        """One line of the fields that differ from the defaults (``"defaults"`` when none do)."""
        default = ExecutionPolicy()
        changed = [f"{k}={v!r}" for k, v in self.to_dict().items() if getattr(default, k) != v]
        return ", ".join(changed) if changed else "defaults"

    def __repr__(self) -> str:
        return f"ExecutionPolicy({self.describe()})"


def _unknown_op(op: str):
    raise ValueError(f"unknown operation {op!r}; known: {list(OPERATIONS)}")


@functools.cache
def _importable(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def kernel_available(op: str) -> bool:
    """Whether the package ``op``'s kernel needs can be found (cached: installs don't change
    under a running process). CUDA itself is checked per tensor by :meth:`ExecutionPolicy.use_kernel`."""
    return _importable(OPERATIONS[op][1])


def _decode_env(value: str) -> dict[str, Any]:
    value = value.strip().lower()
    if value in ("", "all"):
        return {}
    kinds = set() if value == "none" else {k.strip() for k in value.split(",") if k.strip()}
    unknown = kinds - set(_DECODE_KINDS) - {"gnorm"}
    if unknown:
        raise ConfigError(f"{_DECODE_ENV}={value!r}: unknown kernel kinds {sorted(unknown)}; use 'all', "
                          f"'none' or a comma list of {sorted(_DECODE_KINDS) + ['gnorm']}")
    changes: dict[str, Any] = {op: "auto" if kind in kinds else "reference" for kind, op in _DECODE_KINDS.items()}
    changes["fold_gated_norm"] = "gnorm" in kinds
    return changes


def _compile_env(value: str) -> dict[str, Any]:
    value = value.strip().lower()
    if value in ("", "auto"):
        return {}
    regions = set() if value == "never" else {r.strip() for r in value.split(",") if r.strip()}
    unknown = regions - {"glue", "loss"}
    if unknown:
        raise ConfigError(f"{_COMPILE_ENV}={value!r}: use 'auto', 'never' or a comma list of "
                          f"['glue', 'loss']; unknown: {sorted(unknown)}")
    return {"compile_glue": "glue" in regions, "compile_loss": "loss" in regions}


def default_policy(environ: Mapping[str, str] | None = None) -> ExecutionPolicy:
    """The policy an object gets when built without one: the defaults, changed only by
    ``AIMKIT_DECODE_KERNELS`` and ``AIMKIT_TRAIN_COMPILE`` in ``environ`` (default
    ``os.environ``), read now and never again by that object."""
    env = os.environ if environ is None else environ
    changes = {**_decode_env(env.get(_DECODE_ENV, "")), **_compile_env(env.get(_COMPILE_ENV, ""))}
    return ExecutionPolicy(**changes)
