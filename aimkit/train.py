"""Train a class-conditional AiM generator with HF accelerate: one readable loop, one YAML config.

::

    aimkit train --config aim_b data=tokens/in256 output_dir=runs/aim_b          # one device
    accelerate launch --multi_gpu --num_processes 8 -m aimkit.train \\
        --config aim_b data=tokens/in256 output_dir=runs/aim_b                     # 8 GPUs (DDP)
    aimkit train --config aim_b output_dir=runs/aim_b --resume auto                # continue

The config is a YAML file (or the name of one shipped in ``aimkit/recipes/configs``) holding the
fields of :class:`TrainConfig`; ``key=value`` arguments override it (``model_args.d_model=64``
sets one entry of a mapping). Values are parsed as YAML (``lr=3e-4``, ``betas=[0.9,0.95]``).

The loop, top to bottom: build the generator from a preset (:func:`aimkit.build`), an AdamW with
weight decay on matrices only, a warmup + constant/cosine/linear schedule; then per optimizer step
``grad_accum`` micro-batches per process -> teacher-forced cross-entropy -> one clipped AdamW
update, skipped (and counted) when the loss or the gradient norm is not finite.

Data position: each optimizer step consumes the next ``global_batch_size`` items of a seeded
permutation of the dataset (one permutation per epoch), split across processes and micro-batches.
Step ``s`` therefore always sees the same items, which, with the RNG states saved in every
checkpoint, makes ``--resume`` continue exactly where the run stopped (bit for bit on CPU).

Output directory::

    OUT/config.yaml                     the resolved config
    OUT/metrics.jsonl                   one JSON line per log step
    OUT/checkpoints/step-00001000/      model.safetensors, optimizer.pt, scheduler.pt,
                                        rng-00000.pt (one per process), trainer_state.json
    OUT/checkpoints/latest              name of the newest checkpoint (informational)
    OUT/final/                          Generator.save_pretrained -> aimkit.build("OUT/final")

Checkpoints appear atomically (written to ``.tmp-step-*``, flushed to disk and renamed);
trainer_state.json, written last, records the size and SHA-256 of every file, and ``--resume``
takes the newest checkpoint that verifies, naming each newer one it passes over and why. Nothing
whose parameters are not finite is ever saved. One run at a time writes OUT (a lock file,
``OUT/.aimkit.lock``, held by the main process). SIGTERM / SIGINT finish the current step, write
a checkpoint and exit (a second SIGINT stops at once). Multi-node runs
need ``output_dir`` on a file system every node sees. FSDP is untested: the checkpoint code saves
full (unsharded) state from the main process, which is what DDP needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import typing
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ._io import check_writable_dir, fsync_dir, fsync_tree, sha256_file, write_text_atomic
from ._lock import FolderLock
from .errors import AimkitError, CheckpointError, ConfigError, environment_error_message
from .generator import token_cross_entropy

__all__ = [
    "TrainConfig",
    "TrainingStopped",
    "TrainResult",
    "load_config",
    "find_config",
    "find_checkpoint",
    "verify_checkpoint",
    "param_fingerprint",
    "train",
    "main",
]


class TrainingStopped(AimkitError):
    """The run cannot continue (too many non-finite steps, diverged replicas)."""


# ============================================================================================
# config
# ============================================================================================


_REQUIRED_KEY = {"required": True}


@dataclass
class TrainConfig:
    """Everything a training run needs; a YAML file holds these keys (see ``recipes/configs``)."""

    # --- what to train
    model: str = field(default=None, metadata=_REQUIRED_KEY)  # preset name ("aim-b") or a save_pretrained directory
    model_args: Dict[str, Any] = field(default_factory=dict)  # aimkit.build overrides: {d_model: 64, tokenizer: null}
    init_from: Optional[str] = None  # weights to start from (file, directory or hf-hub:ORG/NAME)
    # --- data
    # a token directory (aimkit tokenize), "random" (random codes) or "shapes" (encoded on the fly)
    data: str = field(default=None, metadata=_REQUIRED_KEY)
    data_size: int = 1_281_167  # items per epoch of "random" / "shapes" (ImageNet-1k train size)
    crop_variant: str = "random"  # which stored crop an item uses: random | epoch | first
    num_workers: int = 2  # data-loader worker processes per process
    # --- batch: global_batch_size = batch_size * num_processes * grad_accum
    global_batch_size: int = 2048  # the paper's batch
    batch_size: Optional[int] = None  # per-process micro-batch; default global / (processes * grad_accum)
    grad_accum: Optional[int] = None  # micro-batches per step; default from batch_size, else 1
    # --- optimizer (AdamW, decay on matrices only)
    lr: Optional[float] = None  # absolute peak learning rate; overrides lr_per_256
    lr_per_256: Optional[float] = 1e-4  # peak lr = lr_per_256 * global_batch_size / 256 (8e-4 at 2048)
    betas: Tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05  # on parameters with >= 2 dims, never on those marked _no_weight_decay
    adam_eps: float = 1e-8
    fused_adamw: Optional[bool] = None  # None: fused on CUDA
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    # --- schedule
    warmup_steps: int = 0  # linear warmup from 0
    schedule: str = "constant"  # constant | cosine | linear (decay after warmup)
    min_lr_ratio: float = 0.0  # floor of cosine / linear decay, as a fraction of the peak lr
    # --- length: max_steps wins over epochs; stop_after ends early without changing the schedule
    epochs: Optional[float] = None
    max_steps: Optional[int] = None
    stop_after: Optional[int] = None  # stop (with a checkpoint) after this step, e.g. for job slices
    # --- numerics
    mixed_precision: str = "bf16"  # no | bf16 | fp16
    compile: bool = False  # torch.compile the model (inductor)
    cuda_graph: bool = False  # replay the step from CUDA graphs (one GPU, no grad_accum, bf16 or no)
    seed: int = 0
    max_nonfinite: int = 20  # consecutive skipped steps before the run stops
    # --- output
    output_dir: str = field(default=None, metadata=_REQUIRED_KEY)  # where checkpoints, metrics and final/ go
    checkpoint_every: int = 1000  # steps; a checkpoint is also written at the end and on SIGTERM
    keep_last: int = 3  # checkpoints kept (older ones are deleted); 0 keeps all
    log_every: int = 10  # steps between metric lines
    log_with: Optional[str] = None  # tensorboard | wandb (if installed); metrics.jsonl is always written
    project_name: str = "aimkit"  # tracker project name
    check_replicas_every: int = 0  # compare parameter fingerprints across processes every N steps (0: off)
    progress_bar: bool = True


_REQUIRED = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("required")]
_CHOICES = {
    "crop_variant": ("random", "epoch", "first"),
    "schedule": ("constant", "cosine", "linear"),
    "mixed_precision": ("no", "bf16", "fp16"),
    "log_with": (None, "tensorboard", "wandb"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(key, value, inner)
    bad = ConfigError(f"config key {key!r} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    return value  # pragma: no cover - every field type is handled above


def _unknown_key(key: str, where: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def config_from_dict(data: Dict[str, Any], where: str = "config") -> TrainConfig:
    """Validate a plain mapping (from YAML) into a :class:`TrainConfig`.

    Raises:
        ConfigError: a required key is missing, a key is unknown (the closest keys are
            suggested), a value has the wrong type or is not one of the allowed choices.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    for key in data:
        if key not in hints:
            raise _unknown_key(key, where)
    for key in _REQUIRED:
        if data.get(key) is None:
            raise ConfigError(f"missing required config key {key!r} in {where} (set it there or pass {key}=...)")
    if data.get("mixed_precision") is False:  # YAML reads an unquoted `no` (and `off`) as False
        data = dict(data, mixed_precision="no")
    kwargs = {key: _coerce(key, value, hints[key]) for key, value in data.items()}
    for key, choices in _CHOICES.items():
        if key in kwargs and kwargs[key] not in choices:
            shown = ", ".join("null" if c is None else c for c in choices)
            raise ConfigError(f"config key {key!r} must be one of {shown}, got {kwargs[key]!r}")
    cfg = TrainConfig(**kwargs)
    _check_ranges(cfg, where)
    return cfg


_INF = math.inf
_INT_LIMIT = 2**63  # every integer option must fit an int64 (torch generators, tensors)
_SEED_LIMIT = 2**32  # numpy's legacy seeding (accelerate.set_seed) takes seeds below 2**32
_POSITIVE = (0, False, _INF, False)  # (low, low included, high, high included)
# sizes that allocate per item (a permutation of data_size int64s, batches, worker processes):
# far above any real run, far below what exhausts memory with an allocator traceback
_MAX_ITEMS = 2**31
_MAX_BATCH = 2**24
_MAX_WORKERS = 256
_NON_NEGATIVE = (0, True, _INF, False)
# every int / float option of TrainConfig and the range its values must lie in
_RANGES: Dict[str, Tuple[float, bool, float, bool]] = {
    "data_size": (0, False, _MAX_ITEMS, True), "num_workers": (0, True, _MAX_WORKERS, True),
    "global_batch_size": (0, False, _MAX_BATCH, True), "batch_size": (0, False, _MAX_BATCH, True), "grad_accum": _POSITIVE, "lr": _POSITIVE, "lr_per_256": _POSITIVE,
    "betas": (0, True, 1, False), "weight_decay": _NON_NEGATIVE, "adam_eps": _POSITIVE,
    "grad_clip": _NON_NEGATIVE, "warmup_steps": _NON_NEGATIVE, "min_lr_ratio": (0, True, 1, True),
    "epochs": _POSITIVE, "max_steps": _POSITIVE, "stop_after": _POSITIVE, "seed": (0, True, _SEED_LIMIT, False),
    "max_nonfinite": _POSITIVE, "checkpoint_every": _POSITIVE, "keep_last": _NON_NEGATIVE,
    "log_every": _POSITIVE, "check_replicas_every": _NON_NEGATIVE,
}


def _bound_text(x: float) -> str:
    names = {_INF: "inf", _INT_LIMIT: "2**63", _SEED_LIMIT: "2**32", _MAX_ITEMS: "2**31", _MAX_BATCH: "2**24"}
    return names.get(x, repr(x))


def _numeric_kind(key: str) -> type:
    """``int`` or ``float``: the number type of option ``key`` (inside Optional / Tuple)."""
    tp = typing.get_type_hints(TrainConfig)[key]
    inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return int if inner[0] is int else float


def _in_range(value: Union[int, float], low: float, low_in: bool, high: float, high_in: bool) -> bool:
    if isinstance(value, float) and not math.isfinite(value):  # nan passes no comparison; inf is no setting
        return False
    return (low <= value if low_in else low < value) and (value <= high if high_in else value < high)


def _check_numbers(cfg: TrainConfig, where: str) -> None:
    """Every numeric option finite and in its range (:data:`_RANGES`), else one ConfigError."""
    for key, bounds in _RANGES.items():
        value = getattr(cfg, key)
        if value is None:
            continue
        kind = _numeric_kind(key)
        low, low_in, high, high_in = bounds
        if kind is int and high == _INF:  # integers must also fit an int64
            high, high_in = _INT_LIMIT, False
        values = value if isinstance(value, tuple) else (value,)
        if all(_in_range(v, low, low_in, high, high_in) for v in values):
            continue
        span = f"{'[' if low_in else '('}{_bound_text(low)}, {_bound_text(high)}{']' if high_in else ')'}"
        what = f"config key {key!r}" + (" entries" if isinstance(value, tuple) else "")
        kind_text = "an integer" if kind is int else "a finite number"
        shown = list(value) if isinstance(value, tuple) else value
        raise ConfigError(f"{what} must be {kind_text} in {span}, got {shown!r} ({where})")


def _check_ranges(cfg: TrainConfig, where: str) -> None:
    _check_numbers(cfg, where)
    if cfg.lr is None and cfg.lr_per_256 is None:
        raise ConfigError(f"set either lr or lr_per_256 ({where})")
    if cfg.lr is not None and cfg.lr_per_256 is not None:
        raise ConfigError(
            f"set only one of lr ({cfg.lr}) and lr_per_256 ({cfg.lr_per_256}); use lr_per_256=null ({where})"
        )
    if cfg.max_steps is None and cfg.epochs is None:
        raise ConfigError(f"set max_steps or epochs ({where})")


def find_config(name_or_path: str) -> Path:
    """A config file: a path, or a name shipped in ``aimkit/recipes/configs`` (``aim_b``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    folders = []
    try:
        from importlib.resources import files

        folders.append(Path(str(files("aimkit") / "recipes" / "configs")))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        pass
    folders.append(Path(__file__).resolve().parent.parent / "recipes" / "configs")  # a source checkout
    available: List[str] = []
    for folder in folders:
        if (folder / f"{stem}.yaml").is_file() and os.sep not in name_or_path:
            return folder / f"{stem}.yaml"
        if folder.is_dir():
            available += [p.stem for p in folder.glob("*.yaml")]
    available = sorted(set(available))
    close = difflib.get_close_matches(stem, available, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"config {name_or_path!r} is neither a file nor a shipped config{hint} "
        f"(shipped: {', '.join(available) or 'none'})"
    )


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """``["lr=3e-4", "model_args.d_model=64"]`` -> ``{"lr": 3e-4, "model_args": {"d_model": 64}}``."""
    import yaml

    out: Dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"expected a key=value override, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a mapping")
        node[leaf] = value
    return out


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(name_or_path: Optional[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (by path or shipped name) and apply ``key=value`` overrides."""
    import yaml

    data: Dict[str, Any] = {}
    where = "the overrides"
    if name_or_path:
        path = find_config(name_or_path)
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping of keys to values")
    extra = parse_overrides(overrides)
    for key in extra:
        if key not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise _unknown_key(key, "the command-line overrides")
    return config_from_dict(_merge(data, extra), where=where)


def config_to_yaml(cfg: TrainConfig) -> str:
    import yaml

    data = dataclasses.asdict(cfg)
    data["betas"] = list(cfg.betas)
    return yaml.safe_dump(data, sort_keys=False)


# ============================================================================================
# data
# ============================================================================================


class RandomCodes(Dataset):
    """``size`` items of uniformly random codes (for throughput runs): item i is seeded by i."""

    def __init__(self, size: int, num_tokens: int, vocab_size: int, num_classes: int, seed: int = 0):
        self.size, self.num_tokens, self.vocab_size = size, num_tokens, vocab_size
        self.num_classes, self.seed = num_classes, seed

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        codes = torch.randint(0, self.vocab_size, (self.num_tokens,), generator=g)
        return codes, torch.tensor(int(i) % self.num_classes)


class ShapesImages(Dataset):
    """Procedural shapes images (:mod:`aimkit.data.shapes`), encoded in the loop by the model's tokenizer."""

    def __init__(self, size: int, image_size: int, seed: int = 0):
        from .data.shapes import ShapesDataset

        self.images = ShapesDataset(size, seed=seed, image_size=image_size)

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getitem__(self, i: int):
        image, label = self.images[i]
        return image, torch.tensor(label)


class StepBatches(Sampler):
    """The micro-batches one process reads in one epoch, from step ``start_step`` on.

    Optimizer step ``s`` of the epoch uses items ``perm[s * G : (s + 1) * G]`` of a permutation
    seeded by ``(seed, epoch)``, ``G = micro * accum * world``; micro-batch ``a`` of process
    ``r`` is the slice at ``(a * world + r) * micro``. The last incomplete global batch is dropped.
    """

    def __init__(
        self, n: int, *, seed: int, epoch: int, start_step: int, micro: int, accum: int, rank: int, world: int
    ):
        self.n, self.seed, self.epoch, self.start_step = n, seed, epoch, start_step
        self.micro, self.accum, self.rank, self.world = micro, accum, rank, world
        self.global_batch = micro * accum * world
        self.steps = n // self.global_batch

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.accum

    def __iter__(self) -> Iterator[List[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        for s in range(self.start_step, self.steps):
            block = perm[s * self.global_batch : (s + 1) * self.global_batch]
            for a in range(self.accum):
                offset = (a * self.world + self.rank) * self.micro
                yield block[offset : offset + self.micro].tolist()


def _make_dataset(cfg: TrainConfig, gen) -> Dataset:
    if cfg.data == "random":
        return RandomCodes(cfg.data_size, gen.num_tokens, gen.vocab_size, gen.num_classes, seed=cfg.seed)
    if cfg.data == "shapes":
        from .data.shapes import NUM_CLASSES

        if gen.tokenizer is None:
            raise ConfigError("data: shapes encodes images with the model's tokenizer, but this model has none")
        side = math.isqrt(gen.num_tokens)
        if gen.num_classes < NUM_CLASSES:
            raise ConfigError(f"data: shapes has {NUM_CLASSES} classes; set model_args.num_classes >= {NUM_CLASSES}")
        return ShapesImages(cfg.data_size, side * gen.tokenizer.downsample, seed=cfg.seed)
    from .data.tokens import TokenDataset

    ds = TokenDataset(cfg.data, variant=cfg.crop_variant, seed=cfg.seed)
    if ds.num_tokens != gen.num_tokens:
        raise ConfigError(
            f"{cfg.data} holds {ds.num_tokens} tokens per image but the model expects {gen.num_tokens} "
            f"(set model_args.num_tokens={ds.num_tokens} or re-tokenize)"
        )
    if ds.codebook_size > gen.vocab_size:
        raise ConfigError(
            f"{cfg.data} uses a codebook of {ds.codebook_size} codes but the model's vocab_size is {gen.vocab_size} "
            f"(set model_args.vocab_size={ds.codebook_size})"
        )
    if ds.num_classes > gen.num_classes:
        raise ConfigError(
            f"{cfg.data} has {ds.num_classes} classes but the model has {gen.num_classes} "
            f"(set model_args.num_classes={ds.num_classes})"
        )
    from .data.provenance import adopt_recorded_tokenizer

    note = adopt_recorded_tokenizer(gen, ds)  # the model saves the tokenizer that made the codes
    if note:
        print(note)
    if len(ds) == 0:
        raise ConfigError(f"{cfg.data} holds no images")
    return ds


# ============================================================================================
# optimizer and schedule
# ============================================================================================


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: decay on trainable tensors with >= 2 dims (matrices, embeddings, convs)
    unless marked ``_no_weight_decay`` (Mamba2's A_log, D, dt_bias); biases and norms never decay.
    Tied weights appear once (``named_parameters`` de-duplicates them)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - min_ratio) * progress  # linear


# ============================================================================================
# checkpoints
# ============================================================================================

STATE_NAME = "trainer_state.json"
_CKPT_PREFIX = "step-"


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].copy()), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt")


def _read_state(path: Path) -> Optional[Dict[str, Any]]:
    """``path/trainer_state.json`` when it parses and records a step; None otherwise."""
    try:
        state = json.loads((path / STATE_NAME).read_text())
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    step = state.get("step") if isinstance(state, dict) else None
    ok = isinstance(step, int) and not isinstance(step, bool) and step >= 0
    return state if ok else None


def _is_valid_checkpoint(path: Path) -> bool:
    """Complete in structure (not checksummed): a visible directory with every file and a step."""
    if not path.is_dir() or path.name.startswith("."):
        return False
    return all((path / f).is_file() for f in _REQUIRED_FILES) and _read_state(path) is not None


def _checkpoint_number(path: Path) -> Optional[int]:
    digits = path.name[len(_CKPT_PREFIX):]
    return int(digits) if path.name.startswith(_CKPT_PREFIX) and digits.isdigit() else None


def _step_dirs(folder: Path) -> List[Path]:
    """The ``step-*`` directories of ``folder``, newest first, complete or not."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _checkpoint_number(p) is not None and p.is_dir()]
    return sorted(found, key=_checkpoint_number, reverse=True)


def _checkpoint_dirs(path: Path) -> List[Path]:
    """``step-*`` directories in ``path/checkpoints``, else in ``path``, newest first."""
    return _step_dirs(path / "checkpoints") or _step_dirs(path)


def _is_checkpoint_dir(path: Path) -> bool:
    """``path`` names one checkpoint (rather than a run directory or a checkpoints folder)."""
    if (path / "checkpoints").is_dir():
        return False
    return (path / STATE_NAME).is_file() or (_checkpoint_number(path) is not None and path.is_dir())


def _file_records(folder: Path) -> Dict[str, Dict[str, Any]]:
    """Size and SHA-256 of every file of a checkpoint directory (kept in its trainer_state.json)."""
    return {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != STATE_NAME}


def _is_record(name: Any, rec: Any) -> bool:
    return (isinstance(name, str) and name == Path(name).name and not name.startswith(".")
            and isinstance(rec, dict) and isinstance(rec.get("size"), int) and isinstance(rec.get("sha256"), str))


def verify_checkpoint(path: Union[str, os.PathLike]) -> Optional[str]:
    """Why the checkpoint directory ``path`` cannot be resumed from; None when it can.

    trainer_state.json must parse and name a step, the model, optimizer and scheduler files must
    be there, and every file it records must have the recorded size and SHA-256. Checkpoints
    written before aimkit recorded checksums are checked for their files only.
    """
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    if not (path / STATE_NAME).is_file():
        return f"{STATE_NAME} is missing (an interrupted write?)"
    state = _read_state(path)
    if state is None:
        return f"{STATE_NAME} is not valid JSON with a step number"
    for name in _REQUIRED_FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
    records = state.get("files", {})
    if not isinstance(records, dict) or not all(_is_record(k, v) for k, v in records.items()):
        return f"{STATE_NAME} holds a malformed file list"
    for name, rec in records.items():  # sizes first: a cut file is found without reading anything
        if not (path / name).is_file():
            return f"{name} is missing"
        size = (path / name).stat().st_size
        if size != rec["size"]:
            return f"{name} is {size} bytes, recorded {rec['size']}"
    for name, rec in records.items():
        if sha256_file(path / name) != rec["sha256"]:
            return f"{name} does not match its recorded SHA-256 (the file is damaged)"
    return None


def find_checkpoint(path: Union[str, os.PathLike]) -> Optional[Path]:
    """The newest checkpoint at ``path`` that verifies (:func:`verify_checkpoint`): ``path`` itself
    when it is a checkpoint directory, else the newest ``step-*`` of ``path/checkpoints`` or
    ``path``. Incomplete or damaged checkpoints and interrupted ``.tmp-*`` writes are passed over."""
    path = Path(path)
    if _is_checkpoint_dir(path):
        return path if verify_checkpoint(path) is None else None
    return next((p for p in _checkpoint_dirs(path) if verify_checkpoint(p) is None), None)


def _describe_missing_checkpoint(path: Path) -> str:
    if not path.exists():
        return f"resume path {path} does not exist"
    partial = sorted(p.name for folder in (path, path / "checkpoints") if folder.is_dir() for p in folder.iterdir()
                     if p.name.startswith((".tmp-", _CKPT_PREFIX)))
    seen = f" (found only incomplete: {', '.join(partial[:5])})" if partial else ""
    return f"no valid checkpoint in {path}{seen}; a checkpoint is a step-* directory holding {STATE_NAME}"


class _ResumeSearch:
    """The checkpoints a resume may use, newest first, each verified when reached; every one
    passed over is reported through ``say`` on one line with the reason."""

    def __init__(self, dirs: List[Path], base: Path, say, explicit: bool = False):
        self.base, self.say, self.explicit, self.any = base, say, explicit, bool(dirs)
        self.skipped: List[Tuple[Path, str]] = []
        self._dirs = iter(dirs)

    def _name(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.base))
        except ValueError:
            return str(path)

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append((path, reason))
        self.say(f"skipping {self._name(path)}: {reason}")

    def next(self) -> Optional[Path]:
        """The next checkpoint that verifies, or None when none is left."""
        for path in self._dirs:
            reason = verify_checkpoint(path)
            if reason is None:
                return path
            self.skip(path, reason)
        return None

    def failure(self) -> CheckpointError:
        if self.explicit:
            path, reason = self.skipped[0]
            return CheckpointError(f"cannot resume from {path}: {reason}")
        listed = "; ".join(f"{self._name(p)}: {r}" for p, r in self.skipped[:3])
        more = f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
        return CheckpointError(f"no checkpoint in {self.base} can be resumed from ({listed}{more}); "
                               "move the damaged ones away to start afresh")


def _resume_search(resume: Optional[str], out: Path, say) -> Optional[_ResumeSearch]:
    """Where ``resume`` (None, "auto" or a path) looks for checkpoints; refuses to start afresh
    over a run directory that holds checkpoints."""
    if resume is None:
        if _checkpoint_dirs(out):
            raise ConfigError(
                f"{out} already holds checkpoints; pass --resume auto to continue, or use a new output_dir"
            )
        return None
    base = out if resume == "auto" else Path(resume).expanduser()
    if resume != "auto" and _is_checkpoint_dir(base):
        return _ResumeSearch([base], base.parent, say, explicit=True)
    dirs = _checkpoint_dirs(base)
    if not dirs and resume != "auto":
        raise ConfigError(_describe_missing_checkpoint(base))
    return _ResumeSearch(dirs, base, say)


class _WriteRecorder:
    """The file object :func:`_write_torch` hands to ``torch.save``: it keeps the OSError of a
    failed write, which torch itself reports only as a RuntimeError ("unexpected pos")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def _write_torch(obj: Any, path: Path) -> None:
    """``torch.save`` one file of a checkpoint; a full disk raises the OSError (ENOSPC), naming the file."""
    try:
        with open(path, "wb") as f:
            recorder = _WriteRecorder(f)
            try:
                torch.save(obj, recorder)
            except RuntimeError:
                if recorder.error is None:
                    raise
                raise recorder.error from None
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from None


@contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    """Re-raise a write failure that a library reports in its own type (safetensors: "... (os
    error 28)") as the OSError behind it: a full disk then ends with one line, not a traceback."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        match = re.search(r"os error (\d+)", str(exc))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def _remove_dir(path: Path) -> None:
    """Delete a directory so that an interruption leaves a hidden ``.tmp-*`` name, never a part."""
    trash = path.with_name(f".tmp-del-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _check_finite(gen, step: int, last: Optional[Path], what: str) -> None:
    """Raise :class:`TrainingStopped` when a parameter holds NaN or inf (``what`` is not written)."""
    from .weights import first_nonfinite

    found = first_nonfinite((name, p.detach()) for name, p in gen.named_parameters())
    if found is not None:
        name = found[0]
        raise TrainingStopped(
            f"step {step}: parameter {name} is not finite (NaN or inf), so {what} was not written; "
            f"the last good checkpoint is {last if last else 'none (no checkpoint yet)'}; "
            "lower the lr or the weight_decay, or check the data"
        )


class _Checkpointer:
    """Writes, lists and prunes ``OUT/checkpoints/step-*``; every process takes part in a save."""

    def __init__(self, accelerator, root: Path, keep_last: int):
        self.acc, self.root, self.keep_last = accelerator, root, keep_last
        self.last: Optional[Path] = None

    def save(self, step: int, gen, optimizer, scheduler, state: Dict[str, Any]) -> Path:
        """Write checkpoint ``step`` into ``.tmp-step-*`` and rename it; on any error the temporary
        directory is removed and the older checkpoints stay as they were."""
        from .weights import save_safetensors_atomic

        _check_finite(gen, step, self.last, "the checkpoint")
        acc, main = self.acc, self.acc.is_main_process
        final = self.root / f"{_CKPT_PREFIX}{step:08d}"
        tmp = self.root / f".tmp-{_CKPT_PREFIX}{step:08d}"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            _write_torch(_rng_state(), tmp / f"rng-{acc.process_index:05d}.pt")
            if main:
                weights = tmp / "model.safetensors"
                with _disk_errors(weights):
                    save_safetensors_atomic(gen.generator_state_dict(), weights, metadata={"step": step})
                _write_torch(optimizer.state_dict(), tmp / "optimizer.pt")
                _write_torch(scheduler.state_dict(), tmp / "scheduler.pt")
                if acc.scaler is not None:
                    _write_torch(acc.scaler.state_dict(), tmp / "scaler.pt")
            acc.wait_for_everyone()
            if main:
                self._publish(tmp, final, state)
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        acc.wait_for_everyone()
        self.last = final
        return final

    def _publish(self, tmp: Path, final: Path, state: Dict[str, Any]) -> None:
        """Record every file's size and checksum (trainer_state.json last), flush, rename."""
        write_text_atomic(tmp / STATE_NAME, json.dumps(dict(state, files=_file_records(tmp)), indent=1) + "\n")
        fsync_tree(tmp)
        if final.exists():  # the same step again, after a resume from an older checkpoint
            _remove_dir(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        write_text_atomic(self.root / "latest", final.name + "\n")
        self._prune(final)

    def _prune(self, newest: Path) -> None:
        """Keep the ``keep_last`` newest complete checkpoints up to ``newest`` (later-numbered ones,
        left by a run that resumed from an older checkpoint, stay until overwritten)."""
        limit = _checkpoint_number(newest)
        done = [p for p in reversed(_step_dirs(self.root))
                if _checkpoint_number(p) <= limit and _is_valid_checkpoint(p)]
        for old in done[: max(0, len(done) - self.keep_last)] if self.keep_last else []:
            _remove_dir(old)
        for stale in self.root.glob(".tmp-*"):  # left behind by an interrupted save or removal
            shutil.rmtree(stale, ignore_errors=True)


def _load_checkpoint(path: Path, accelerator, gen, optimizer, scheduler) -> Dict[str, Any]:
    from .weights import read_state_dict

    state = json.loads((path / STATE_NAME).read_text())
    gen.load_aimkit_state_dict(read_state_dict(path / "model.safetensors"), source=str(path))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng = path / f"rng-{accelerator.process_index:05d}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    else:
        print(f"warning: {rng.name} missing in {path} (different number of processes?); RNG reseeded")
        torch.manual_seed(state["step"] * 7919 + accelerator.process_index)
    return state


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _all_ok(accelerator, ok: bool) -> bool:
    """``ok`` on every process (a collective when there are several)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int64, device=accelerator.device)
    return bool(accelerator.gather(flag).min().item())


def _resume_from(search: _ResumeSearch, path: Path, accelerator, gen, optimizer, scheduler):
    """Load ``path``; when it (or a process's part) does not load, fall back to the next older
    checkpoint that verifies. Returns ``(checkpoint, trainer_state)``."""
    while path is not None:
        try:
            state, problem = _load_checkpoint(path, accelerator, gen, optimizer, scheduler), None
        except Exception as exc:  # an old checkpoint without checksums can be damaged in many ways
            state, problem = None, _one_line(exc)
        if _all_ok(accelerator, problem is None):
            return path, state
        search.skip(path, f"it does not load ({problem})" if problem else "another process could not load it")
        path = search.next()
    raise search.failure()


# ============================================================================================
# helpers
# ============================================================================================


def param_fingerprint(module: torch.nn.Module) -> int:
    """A 56-bit hash of every tensor of ``module``'s state dict (equal iff bitwise equal, w.h.p.):
    the head of :func:`aimkit.weights.state_dict_fingerprint`, small enough for an int64 gather."""
    from .weights import state_dict_fingerprint

    return int(state_dict_fingerprint(module)[:14], 16)


class _StopSignal:
    """Remember SIGTERM / SIGINT so the loop can checkpoint and exit; a second SIGINT aborts."""

    def __init__(self):
        self.received: Optional[int] = None
        self._old = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and _in_main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _batch_layout(cfg: TrainConfig, world: int) -> Tuple[int, int]:
    """``(micro_batch, grad_accum)`` with ``micro_batch * world * grad_accum == global_batch_size``."""
    g = cfg.global_batch_size
    if cfg.batch_size is not None:
        per_step = cfg.batch_size * world
        if g % per_step:
            raise ConfigError(
                f"global_batch_size {g} is not a multiple of batch_size {cfg.batch_size} x {world} process(es)"
            )
        accum = g // per_step
        if cfg.grad_accum is not None and cfg.grad_accum != accum:
            raise ConfigError(
                f"global_batch_size {g} != batch_size {cfg.batch_size} x {world} process(es) "
                f"x grad_accum {cfg.grad_accum}"
            )
        return cfg.batch_size, accum
    accum = cfg.grad_accum or 1
    if g % (world * accum):
        raise ConfigError(f"global_batch_size {g} is not divisible by {world} process(es) x grad_accum {accum}")
    return g // (world * accum), accum


@dataclass
class TrainResult:
    """What :func:`train` did."""

    step: int  # optimizer steps done (including skipped ones)
    final_dir: Optional[Path]  # the save_pretrained export (None when stopped early)
    last_checkpoint: Optional[Path]
    skipped_steps: int  # non-finite steps skipped in this run
    stopped_by: Optional[str] = None  # "SIGTERM", "SIGINT", "stop_after" or None
    losses: List[float] = field(default_factory=list)  # per-step mean loss of this run (main process)

    @property
    def exit_code(self) -> int:
        return {"SIGTERM": 143, "SIGINT": 130}.get(self.stopped_by or "", 0)


# ============================================================================================
# the loop
# ============================================================================================


def _check_graphable(cfg: TrainConfig, device: torch.device, world: int, accum: int) -> None:
    """Raise a ConfigError naming what rules out ``cuda_graph: true`` for this run."""
    problems = []
    if device.type != "cuda":
        problems.append(f"a CUDA device (this run is on {device.type})")
    if world > 1:
        problems.append(f"a single process (this run has {world})")
    if accum > 1:
        problems.append(f"grad_accum 1 (this run accumulates {accum} micro-batches)")
    if cfg.mixed_precision == "fp16":
        problems.append("mixed_precision bf16 or no (fp16's loss scaler decides on the host)")
    if cfg.compile:
        problems.append("compile: false")
    if problems:
        raise ConfigError("cuda_graph: true needs " + ", ".join(problems))


def _capture_step(gen, optimizer, inputs: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, max_norm: float):
    """Capture the training step of ``gen`` (:class:`aimkit.train_graph.GraphedTrainStep`) without
    changing the run: the warm-up step that capture needs is undone (weights, optimizer state and
    RNG restored in place), so a run with ``cuda_graph`` starts, and resumes, where it stands."""
    from .train_graph import GraphedTrainStep

    device = inputs.device
    optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside accelerate's wrapper
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_params = [p.detach().clone() for p in params]
    saved_state = {p: {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
                   for p in params if p in optimizer.state}
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device))

    amp = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
    step = GraphedTrainStep(gen, optimizer, lambda m, c, y: m.loss(c, y), (inputs, labels), max_grad_norm=max_norm,
                            amp_dtype=amp, warmup=1)
    with torch.no_grad():
        for p, saved in zip(params, saved_params):
            p.copy_(saved)
        for p in params:  # back to the state before the warm-up (zeros = not started yet)
            old = saved_state.get(p, {})
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v):
                    v.copy_(old[k]) if k in old else v.zero_()
    torch.set_rng_state(rng[0])
    torch.cuda.set_rng_state(rng[1], device)
    return step


def train(cfg: TrainConfig, resume: Optional[str] = None) -> TrainResult:
    """Run (or continue) training as ``cfg`` says.

    The main process holds :class:`aimkit._lock.FolderLock` on ``output_dir`` for the whole run,
    so a second run on the same directory stops at once with one line and changes nothing.

    Args:
        cfg: the run's configuration.
        resume: None (start fresh; an output directory that already holds checkpoints is an
            error), ``"auto"`` (continue from the newest checkpoint in ``output_dir`` that
            verifies, if there is one) or a path (a checkpoint, or a directory holding
            checkpoints). Newer checkpoints that fail verification are named and passed over.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: a bad setting, or an output_dir that cannot be written.
        CheckpointError: no checkpoint to resume from verifies and loads.
        TrainingStopped: the run diverged (nothing non-finite is ever saved).
        FolderBusyError: another run holds output_dir.
    """
    out = Path(cfg.output_dir)
    pretrained = _init_weights(cfg.init_from)  # checked before anything is written
    main_env = _launched_as_main()
    lock = None
    if main_env:
        check_writable_dir(out, "output_dir", error=ConfigError)
        lock = FolderLock(out, command="aimkit train").acquire()
    try:
        # ---- where to resume from (checked before anything is allocated)
        search = _resume_search(resume, out, print if main_env else (lambda *a, **k: None))
        resume_from = search.next() if search is not None else None
        if search is not None and resume_from is None and search.any:
            raise search.failure()
        return _run(cfg, out, pretrained, search, resume_from)
    finally:
        if lock is not None:
            lock.release()


def _launched_as_main() -> bool:
    """False on the non-zero ranks of a multi-process launch (torchrun / accelerate set RANK)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def _init_weights(init_from: Optional[str]) -> Any:
    """What ``build(pretrained=...)`` gets for ``init_from``: False (from scratch), a path, an
    ``hf-hub:`` reference, or, for a preset name, the weights that preset ships or publishes."""
    if init_from is None:
        return False  # from scratch, even for presets that ship weights (aim-tiny-shapes)
    if init_from.startswith("hf-hub:") or Path(init_from).expanduser().exists():
        return init_from
    from .assets import embedded_weights
    from .presets import PUBLISHED_WEIGHTS
    from .registry import list_models

    presets = list_models()
    if init_from in presets:
        shipped = embedded_weights(init_from)
        if shipped is not None:
            return shipped
        if init_from in PUBLISHED_WEIGHTS:
            record = PUBLISHED_WEIGHTS[init_from]
            return f"hf-hub:{record.repo_id}@{record.filename}"
        raise ConfigError(f"init_from: preset {init_from!r} ships no weights and none are published; "
                          "pass a weight file or a save_pretrained directory")
    close = difflib.get_close_matches(init_from, presets, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"init_from {init_from!r} is neither an existing file or directory nor a preset name{hint} "
                      f"(presets: {', '.join(presets)}; or hf-hub:ORG/NAME)")


def _run(cfg: TrainConfig, out: Path, pretrained: Any, search: Optional[_ResumeSearch],
         resume_from: Optional[Path]) -> TrainResult:
    """The run itself (:func:`train` holds the folder lock and has picked the checkpoint)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .build import build

    ckpt_root = out / "checkpoints"

    # ---- accelerator (devices, processes, mixed precision, trackers)
    if cfg.log_with == "tensorboard":
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            raise ConfigError("log_with: tensorboard needs `pip install tensorboard`")
    if cfg.log_with == "wandb":
        from accelerate.utils import is_wandb_available

        if not is_wandb_available():
            raise ConfigError("log_with: wandb needs `pip install wandb`")
    accelerator = Accelerator(
        cpu=_distributed_cpu(),
        mixed_precision=cfg.mixed_precision,
        log_with=cfg.log_with,
        project_dir=str(out),
        dynamo_backend="inductor" if cfg.compile else None,
    )
    rank, world, main_proc = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    micro, accum = _batch_layout(cfg, world)
    say = accelerator.print

    # ---- model: identical initialisation on every process
    set_seed(cfg.seed)
    gen = build(cfg.model, pretrained=pretrained, device=accelerator.device, **cfg.model_args).train()
    if gen.tokenizer is not None:
        gen.tokenizer.requires_grad_(False).eval()  # frozen: it only encodes shapes images

    # ---- data
    dataset = _make_dataset(cfg, gen)
    steps_per_epoch = len(dataset) // cfg.global_batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"the dataset has {len(dataset)} items, fewer than global_batch_size {cfg.global_batch_size}")
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    if not total_steps < _INT_LIMIT:
        raise ConfigError(f"epochs {cfg.epochs} x {steps_per_epoch} steps per epoch is too many steps; lower epochs")
    total_steps = math.ceil(total_steps)
    stop_at = min(total_steps, cfg.stop_after) if cfg.stop_after is not None else total_steps

    # ---- optimizer and schedule
    peak_lr = cfg.lr if cfg.lr is not None else cfg.lr_per_256 * cfg.global_batch_size / 256
    if not math.isfinite(peak_lr):
        raise ConfigError(f"lr_per_256 {cfg.lr_per_256} x global_batch_size {cfg.global_batch_size} / 256 "
                          "is not a finite learning rate")
    fused = cfg.fused_adamw if cfg.fused_adamw is not None else accelerator.device.type == "cuda"
    if cfg.cuda_graph:
        _check_graphable(cfg, accelerator.device, world, accum)
    optimizer = torch.optim.AdamW(
        param_groups(gen, cfg.weight_decay),
        # a captured update reads the lr from a tensor, which the schedule then changes in place
        lr=torch.tensor(peak_lr, device=accelerator.device) if cfg.cuda_graph else peak_lr,
        betas=cfg.betas, eps=cfg.adam_eps, fused=fused or None, capturable=cfg.cuda_graph,
    )
    schedule = dict(total=total_steps, warmup=cfg.warmup_steps, schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, **schedule))
    model, optimizer = accelerator.prepare(gen, optimizer)

    # ---- resume: weights, optimizer, schedule, RNG, data position
    step, run_state = 0, {"total_skipped": 0}
    if resume_from is not None:
        resume_from, run_state = _resume_from(search, resume_from, accelerator, gen, optimizer, scheduler)
        step = run_state["step"]
        if cfg.cuda_graph:  # a loaded lr may sit on the CPU; the captured update needs it on the GPU
            for group in optimizer.param_groups:
                group["lr"] = torch.as_tensor(group["lr"], device=accelerator.device)
        old_batch = run_state.get("global_batch_size")
        if old_batch != cfg.global_batch_size:
            say(f"warning: global_batch_size changed ({old_batch} -> {cfg.global_batch_size}); "
                "the data order differs from an uninterrupted run")
        say(f"resumed from {resume_from} at step {step}")
    else:
        set_seed((cfg.seed + rank) % _SEED_LIMIT)  # label dropout differs per process; init is done
    accelerator.wait_for_everyone()

    checkpointer = _Checkpointer(accelerator, ckpt_root, cfg.keep_last)
    checkpointer.last = resume_from
    metrics_path = out / "metrics.jsonl"
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", config_to_yaml(cfg))
        _truncate_metrics(metrics_path, step)
    if cfg.log_with:
        accelerator.init_trackers(cfg.project_name, config=json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))

    n_params = gen.num_params()
    tokens_per_step = cfg.global_batch_size * gen.num_tokens
    say(
        f"{cfg.model}: {n_params:,} params | {world} process(es) x batch {micro} x accum {accum} "
        f"= {cfg.global_batch_size} | peak lr {peak_lr:.3g} | {total_steps} steps ({steps_per_epoch}/epoch) | "
        f"{cfg.mixed_precision} | {accelerator.device}"
    )

    # ---- the loop
    encode = gen.tokenizer.encode if isinstance(dataset, ShapesImages) else None
    result = TrainResult(step=step, final_dir=None, last_checkpoint=resume_from, skipped_steps=0)
    consecutive_bad = run_state.get("consecutive_nonfinite", 0)
    graph_step = None  # the captured step (cuda_graph), made from the first batch
    window: Dict[str, float] = {"loss": 0.0, "n": 0, "time": 0.0, "steps": 0}
    bar = tqdm(total=stop_at, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (main_proc and cfg.progress_bar))

    def trainer_state() -> Dict[str, Any]:
        return {
            "step": step,
            "epoch": step // steps_per_epoch,
            "step_in_epoch": step % steps_per_epoch,
            "samples_seen": step * cfg.global_batch_size,
            "global_batch_size": cfg.global_batch_size,
            "num_processes": world,
            "consecutive_nonfinite": consecutive_bad,
            "total_skipped": run_state.get("total_skipped", 0) + result.skipped_steps,
            "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        }

    with _StopSignal() as stop:
        while step < stop_at:
            epoch, start = divmod(step, steps_per_epoch)
            dataset.set_epoch(epoch)
            sampler = StepBatches(len(dataset), seed=cfg.seed, epoch=epoch, start_step=start,
                                  micro=micro, accum=accum, rank=rank, world=world)
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                pin_memory=accelerator.device.type == "cuda",
                generator=torch.Generator(),  # keeps the global torch RNG untouched (exact resume)
            )
            batches = iter(loader)
            for _ in range(start, steps_per_epoch):
                t0 = time.perf_counter()
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")  # inf: measure only
                # -- forward / backward over grad_accum micro-batches
                loss_sum = torch.zeros((), device=accelerator.device)
                for a in range(accum):
                    inputs, labels = next(batches)
                    inputs = inputs.to(accelerator.device, non_blocking=True)
                    labels = labels.to(accelerator.device, non_blocking=True)
                    if encode is not None:
                        with torch.no_grad():
                            inputs = encode(inputs)
                    if cfg.cuda_graph:  # (accum is 1) forward, backward and clipping in one replay
                        if graph_step is None:
                            graph_step = _capture_step(gen, optimizer, inputs, labels, cfg, max_norm)
                        loss, grad_norm = graph_step.forward_backward(inputs, labels)
                    else:
                        with accelerator.no_sync(model) if a < accum - 1 else nullcontext():
                            logits = model(inputs, labels)  # (B, N, V)
                            loss = token_cross_entropy(logits, inputs)
                            accelerator.backward(loss / accum)
                    loss_sum += loss.detach()
                if not cfg.cuda_graph:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                step_loss = accelerator.reduce(loss_sum / accum, reduction="mean").item()
                grad_norm = float(grad_norm)
                # -- the update, unless the loss or the gradient is not finite
                bad = not (math.isfinite(step_loss) and math.isfinite(grad_norm))
                # fp16: gradient overflows are routine; the loss scaler skips those updates itself
                scaler_decides = cfg.mixed_precision == "fp16" and math.isfinite(step_loss)
                if not bad or scaler_decides:
                    graph_step.optimizer_step() if cfg.cuda_graph else optimizer.step()
                if not cfg.cuda_graph:  # a replay overwrites the gradients the graph owns
                    optimizer.zero_grad(set_to_none=True)
                lr = float(scheduler.get_last_lr()[0])
                scheduler.step()
                step += 1
                bar.update(1)
                if bad and not scaler_decides:
                    consecutive_bad += 1
                    result.skipped_steps += 1
                    if main_proc:
                        bar.write(f"step {step}: non-finite loss {step_loss} / grad norm {grad_norm}; update skipped "
                                  f"({consecutive_bad} in a row)", file=sys.stdout)
                    if consecutive_bad >= cfg.max_nonfinite:
                        bar.close()
                        last = checkpointer.last
                        raise TrainingStopped(
                            f"stopped at step {step}: {consecutive_bad} consecutive steps with a non-finite loss or "
                            f"gradient; the last good checkpoint is {last if last else 'none (no checkpoint yet)'}; "
                            "lower the lr, check the data, or raise max_nonfinite"
                        )
                else:
                    consecutive_bad = 0
                    window["loss"] += step_loss
                    window["n"] += 1
                result.losses.append(step_loss)
                window["time"] += time.perf_counter() - t0
                window["steps"] += 1

                # -- logging
                if step % cfg.log_every == 0 or step == 1 or step == stop_at:
                    record = {
                        "step": step,
                        "epoch": round(step / steps_per_epoch, 4),
                        "loss": window["loss"] / max(1, window["n"]) if window["n"] else float("nan"),
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens_per_step * window["steps"] / max(window["time"], 1e-9),
                        "step_time_s": window["time"] / max(1, window["steps"]),
                        "skipped_steps": run_state.get("total_skipped", 0) + result.skipped_steps,
                    }
                    if cfg.check_replicas_every and step % cfg.check_replicas_every == 0:
                        record["replica_fingerprints"] = _check_replicas(accelerator, gen, step)
                    if main_proc:
                        _append_metrics(metrics_path, record)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
                        bar.write(
                            f"step {step:>7d} | loss {record['loss']:.4f} | lr {lr:.3e} | grad {grad_norm:.3f} | "
                            f"{record['tokens_per_s']:,.0f} tok/s | {record['step_time_s'] * 1e3:.1f} ms/step",
                            file=sys.stdout,
                        )
                    if cfg.log_with:
                        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
                    window = {"loss": 0.0, "n": 0, "time": 0.0, "steps": 0}
                elif cfg.check_replicas_every and step % cfg.check_replicas_every == 0:
                    _check_replicas(accelerator, gen, step)

                # -- checkpoints and stopping
                signalled = _signal_on_any_process(accelerator, stop.received)
                periodic = (step % cfg.checkpoint_every == 0 or step == stop_at) and consecutive_bad == 0
                if periodic or signalled:  # no periodic checkpoint inside a non-finite streak
                    result.last_checkpoint = checkpointer.save(step, gen, optimizer, scheduler, trainer_state())
                if signalled:
                    name = signal.Signals(signalled).name
                    bar.close()
                    say(f"received {name}: saved {result.last_checkpoint}; continue with --resume auto")
                    result.step, result.stopped_by = step, name
                    return _finish(accelerator, result, cfg)
                if step >= stop_at:
                    break

    bar.close()
    result.step = step
    if step < total_steps:
        result.stopped_by = "stop_after"
        say(f"stopped after step {step} of {total_steps} (stop_after); continue with --resume auto")
    else:
        final = out / "final"
        _check_finite(gen, step, checkpointer.last, str(final))  # never export a diverged model
        if main_proc:
            with _disk_errors(final):
                gen.save_pretrained(final)
        result.final_dir = final
        say(f"done: {step} steps; model saved to {final} (load with aimkit.build({str(final)!r}))")
    return _finish(accelerator, result, cfg)


def _finish(accelerator, result: TrainResult, cfg: TrainConfig) -> TrainResult:
    accelerator.wait_for_everyone()
    if cfg.log_with:
        accelerator.end_training()
    return result


def _distributed_cpu() -> bool:
    """True for a multi-process launch on a machine without CUDA: accelerate then needs
    ``cpu=True`` to pick gloo (``accelerate launch --cpu`` alone starts only one process)."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _signal_on_any_process(accelerator, received: Optional[int]) -> int:
    """The signal any process received (0: none), on every process, so that all join one save."""
    if accelerator.num_processes == 1:
        return received or 0
    t = torch.tensor([received or 0], dtype=torch.int64, device=accelerator.device)
    return int(accelerator.gather(t).max().item())


def _check_replicas(accelerator, gen, step: int) -> List[int]:
    fp = torch.tensor([param_fingerprint(gen)], dtype=torch.int64, device=accelerator.device)
    prints = [int(x) for x in accelerator.gather(fp).tolist()]
    if len(set(prints)) > 1:
        raise TrainingStopped(f"step {step}: parameters differ across processes (fingerprints {prints})")
    return prints


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines after ``step`` (written by a run that was killed after its last
    checkpoint) and cut lines; the file is replaced atomically, so a kill keeps the old one."""
    if not path.is_file():
        return
    text = path.read_text(errors="replace")
    keep = []
    for line in text.splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    new = "".join(line + "\n" for line in keep)
    if new != text:
        write_text_atomic(path, new)


def _append_metrics(path: Path, record: Dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk (a crash loses at most the line being written)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ============================================================================================
# command line
# ============================================================================================


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``aimkit train`` and ``python -m aimkit.train``."""
    parser.add_argument("--config", required=True, help="YAML file, or a shipped config name (aim_b, tiny_test, ...)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the newest checkpoint in output_dir (auto) or from PATH")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. lr=3e-4 model_args.d_model=64")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    result = train(cfg, resume=args.resume)
    return result.exit_code


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aimkit.train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except AimkitError as exc:
        print(f"aimkit train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aimkit train: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # full disk, read-only or missing folder, permissions: one line
        message = environment_error_message(exc)
        if message is None:
            raise
        print(f"aimkit train: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
