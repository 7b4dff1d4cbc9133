"""A training run's settings: :class:`TrainConfig`, read from a YAML recipe plus ``key=value`` overrides.

A recipe (``recipes/configs/*.yaml``, or any YAML file) holds the fields of :class:`TrainConfig`;
``key=value`` arguments override it (``model_args.d_model=64`` sets one entry of a mapping,
``policy.train_step=graph`` one field of the execution policy). Values are parsed as YAML
(``lr=3e-4``, ``betas=[0.9,0.95]``). Every value is checked before anything is built: types
by :func:`aimkit.config.check_value`, numbers against :data:`RANGES`, unknown keys name the
closest valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from ..config import check_value, describe
from ..errors import ConfigError, did_you_mean
from ..policy import ExecutionPolicy, default_policy

__all__ = [
    "RANGES",
    "TrainConfig",
    "config_to_yaml",
    "execution_policy",
    "find_config",
    "load_config",
    "parse_overrides",
    "resolve_mixed_precision",
    "train_config_from_dict",
]

_REQUIRED_KEY = {"required": True}


@dataclass
class TrainConfig:
    """Everything a training run needs; a YAML file holds these keys (see ``recipes/configs``)."""

    # --- what to train
    model: str = field(default=None, metadata=_REQUIRED_KEY)  # preset name ("aim-b") or a save_pretrained directory
    model_args: dict[str, Any] = field(default_factory=dict)  # aimkit.build overrides: {d_model: 64, tokenizer: null}
    init_from: str | None = None  # weights to start from (file, directory or hf-hub:ORG/NAME)
    # --- data
    # a token directory (aimkit tokenize), "random" (random codes) or "shapes" (encoded on the fly)
    data: str = field(default=None, metadata=_REQUIRED_KEY)
    data_size: int = 1_281_167  # items per epoch of "random" / "shapes" (ImageNet-1k train size)
    crop_variant: Literal["random", "epoch", "first"] = "random"  # which stored crop an item uses
    num_workers: int = 2  # data-loader worker processes per process
    # --- batch: global_batch_size = batch_size * num_processes * grad_accum
    global_batch_size: int = 2048  # the paper's batch
    batch_size: int | None = None  # per-process micro-batch; default global / (processes * grad_accum)
    grad_accum: int | None = None  # micro-batches per step; default from batch_size, else 1
    # --- optimizer (AdamW, decay on matrices only)
    lr: float | None = None  # absolute peak learning rate; overrides lr_per_256
    lr_per_256: float | None = 1e-4  # peak lr = lr_per_256 * global_batch_size / 256 (8e-4 at 2048)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05  # on parameters with >= 2 dims, never on those marked _no_weight_decay
    adam_eps: float = 1e-8
    fused_adamw: bool | None = None  # None: fused on CUDA
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    # --- schedule
    warmup_steps: int = 0  # linear warmup from 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # decay after warmup
    min_lr_ratio: float = 0.0  # floor of cosine / linear decay, as a fraction of the peak lr
    # --- length: max_steps wins over epochs; stop_after ends early without changing the schedule
    epochs: float | None = None
    max_steps: int | None = None
    stop_after: int | None = None  # stop (with a checkpoint) after this step, e.g. for job slices
    # --- numerics
    # an `accelerate launch --mixed_precision bf16|fp16` flag (or accelerate's config file) wins over this
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    compile: bool = False  # torch.compile the model (inductor)
    # ExecutionPolicy fields over default_policy(): train_step auto (default) replays the step from
    # CUDA graphs where the run allows it (one GPU, bf16 or no), else each sublayer from its own graphs
    # (layer_graphs: several GPUs, fp16), else (CPU, compile) runs the eager step with the glue
    # uncompiled; {train_step: eager} opts out of the graphs (compile_glue as given); see aimkit/policy.py
    policy: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    max_nonfinite: int = 20  # consecutive skipped steps before the run stops
    # exponential moving average of the weights, updated after every applied step (null: off);
    # OUT/final then holds the averaged weights and OUT/final/raw the trained ones
    ema_decay: float | None = None
    # --- output
    output_dir: str = field(default=None, metadata=_REQUIRED_KEY)  # where checkpoints, metrics and final/ go
    checkpoint_every: int = 1000  # steps; a checkpoint is also written at the end and on SIGTERM
    keep_last: int = 3  # checkpoints kept (older ones are deleted); 0 keeps all
    log_every: int = 10  # steps between metric lines
    log_with: Literal["tensorboard", "wandb"] | None = None  # metrics.jsonl is always written
    project_name: str = "aimkit"  # tracker project name
    sample_every: int = 0  # write a grid of sample_num images to OUT/samples every N steps (0: off)
    sample_num: int = 16  # images per sample grid (labels 0, 1, 2, ... cycling through the classes)
    check_replicas_every: int = 0  # compare parameter fingerprints across processes every N steps (0: off)
    progress_bar: bool = True


_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
_REQUIRED = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("required")]
_PATH_KEYS = ("output_dir", "data", "init_from", "model")  # values that may name a file or folder
_RETIRED = {  # key -> what to write instead
    "cuda_graph": "config key 'cuda_graph' is gone: the execution policy chooses the step; write "
                  "`policy: {train_step: graph}` (command line: policy.train_step=graph) instead of "
                  "cuda_graph: true, and delete cuda_graph: false",
}

# ------------------------------------------------------------------------------------- ranges

INT_LIMIT = 2**63  # every integer option must fit an int64 (torch generators, tensors)
SEED_LIMIT = 2**32  # numpy's legacy seeding (accelerate.set_seed) takes seeds below 2**32
_INF = math.inf
# sizes that allocate per item (a permutation of data_size int64s, batches, worker processes):
# far above any real run, far below what exhausts memory with an allocator traceback
_MAX_ITEMS, _MAX_BATCH, _MAX_WORKERS = 2**31, 2**24, 256
_BOUND_TEXT = {_INF: "inf", INT_LIMIT: "2**63", SEED_LIMIT: "2**32", _MAX_ITEMS: "2**31", _MAX_BATCH: "2**24"}


class Range(NamedTuple):
    """The interval a numeric option's values must lie in."""

    low: float
    low_in: bool
    high: float
    high_in: bool

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):  # nan passes no comparison; inf is no setting
            return False
        above = self.low <= value if self.low_in else self.low < value
        return above and (value <= self.high if self.high_in else value < self.high)

    def __str__(self) -> str:
        low, high = _BOUND_TEXT.get(self.low, repr(self.low)), _BOUND_TEXT.get(self.high, repr(self.high))
        return f"{'[' if self.low_in else '('}{low}, {high}{']' if self.high_in else ')'}"


_POSITIVE, _NON_NEGATIVE = Range(0, False, _INF, False), Range(0, True, _INF, False)
# every int / float option of TrainConfig and the range its values must lie in
RANGES: dict[str, Range] = {
    "data_size": Range(0, False, _MAX_ITEMS, True), "num_workers": Range(0, True, _MAX_WORKERS, True),
    "global_batch_size": Range(0, False, _MAX_BATCH, True), "batch_size": Range(0, False, _MAX_BATCH, True),
    "grad_accum": _POSITIVE, "lr": _POSITIVE, "lr_per_256": _POSITIVE, "betas": Range(0, True, 1, False),
    "weight_decay": _NON_NEGATIVE, "adam_eps": _POSITIVE, "grad_clip": _NON_NEGATIVE,
    "warmup_steps": _NON_NEGATIVE, "min_lr_ratio": Range(0, True, 1, True), "epochs": _POSITIVE,
    "max_steps": _POSITIVE, "stop_after": _POSITIVE, "seed": Range(0, True, SEED_LIMIT, False),
    "max_nonfinite": _POSITIVE, "checkpoint_every": _POSITIVE, "keep_last": _NON_NEGATIVE,
    "log_every": _POSITIVE, "check_replicas_every": _NON_NEGATIVE, "ema_decay": Range(0, True, 1, False),
    "sample_every": _NON_NEGATIVE, "sample_num": Range(0, False, 1024, True),
}


def _number_kind(annotation: Any) -> type | None:
    """``int`` or ``float`` for a numeric option (also inside Optional / Tuple), else None."""
    inner = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return inner[0] if inner[0] in (int, float) else None


def _check_numbers(cfg: TrainConfig, where: str) -> None:
    """Every numeric option finite and in its range (:data:`RANGES`), else one ConfigError."""
    hints = typing.get_type_hints(TrainConfig)
    for key, bounds in RANGES.items():
        value = getattr(cfg, key)
        if value is None:
            continue
        kind = _number_kind(hints[key])
        if kind is int and bounds.high == _INF:  # integers must also fit an int64
            bounds = bounds._replace(high=INT_LIMIT, high_in=False)
        values = value if isinstance(value, tuple) else (value,)
        if all(bounds.contains(v) for v in values):
            continue
        what = f"config key {key!r}" + (" entries" if isinstance(value, tuple) else "")
        kind_text = "an integer" if kind is int else "a finite number"
        shown = list(value) if isinstance(value, tuple) else value
        raise ConfigError(f"{what} must be {kind_text} in {bounds}, got {shown!r} ({where})")


def _check_combinations(cfg: TrainConfig, where: str) -> None:
    if cfg.lr is None and cfg.lr_per_256 is None:
        raise ConfigError(f"set either lr or lr_per_256 ({where})")
    if cfg.lr is not None and cfg.lr_per_256 is not None:
        raise ConfigError(
            f"set only one of lr ({cfg.lr}) and lr_per_256 ({cfg.lr_per_256}); use lr_per_256=null ({where})"
        )
    if cfg.max_steps is None and cfg.epochs is None:
        raise ConfigError(f"set max_steps or epochs ({where})")


# ------------------------------------------------------------------------------------- values


def _as_float(value: Any) -> Any:
    """A float for what YAML leaves as an int or a string (YAML 1.1 reads ``3e-4`` as a string);
    anything else unchanged, for :func:`check_value` to name."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return value
    try:
        return float(value)
    except (ValueError, OverflowError):
        return value


def _check_mapping(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must be a mapping, got {describe(value)}")
    return dict(value)


def _check_field(key: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against the annotation of option ``key``; floats where floats are meant."""
    path = f"config key {key!r}"
    if typing.get_origin(annotation) is dict:
        return _check_mapping(value, path)
    if key == "mixed_precision" and value is False:  # YAML reads an unquoted `no` (and `off`) as False
        value = "no"
    if _number_kind(annotation) is float:
        value = tuple(map(_as_float, value)) if isinstance(value, (list, tuple)) else _as_float(value)
    return check_value(value, annotation, path)


def _check_keys(keys, where: str) -> None:
    for key in keys:
        if key in _RETIRED:
            raise ConfigError(f"{_RETIRED[key]} ({where})")
        if key not in _FIELDS:
            raise ConfigError(f"unknown config key {key!r} in {where}{did_you_mean(key, _FIELDS)}")


def execution_policy(cfg: TrainConfig) -> ExecutionPolicy:
    """The run's :class:`~aimkit.policy.ExecutionPolicy`: ``cfg.policy`` over :func:`default_policy`
    (the environment's defaults, read now)."""
    return default_policy().replace(**cfg.policy) if cfg.policy else default_policy()


def resolve_mixed_precision(recipe: str, environ: typing.Mapping[str, str] | None = None) -> tuple[str, str]:
    """The mixed precision a run uses and where it comes from, ``(precision, source)``.

    ``accelerate launch --mixed_precision bf16|fp16`` (or the ``mixed_precision`` of accelerate's
    config file) reaches the process as ``ACCELERATE_MIXED_PRECISION``; it wins over the recipe.
    The launcher also sets ``no`` when nothing was asked for, which cannot be told from an
    explicit ``--mixed_precision no``, so ``no`` leaves the recipe's value: turn a bf16 recipe off
    with the override ``mixed_precision=no``.
    """
    environ = os.environ if environ is None else environ
    launched = str(environ.get("ACCELERATE_MIXED_PRECISION", "no")).strip().lower()
    if launched in ("", "no") or launched == recipe:
        return recipe, "recipe"
    if launched not in ("bf16", "fp16"):
        raise ConfigError(f"accelerate launch asked for mixed precision {launched!r}; aimkit trains in no, bf16 "
                          "or fp16 (drop --mixed_precision from the launch line or change accelerate's config)")
    return launched, f"accelerate launch; the recipe says {recipe}"


def train_config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    """Validate a plain mapping (from YAML) into a :class:`TrainConfig`.

    Raises:
        ConfigError: a required key is missing, a key is unknown (the closest keys are
            suggested) or retired, a value has the wrong type, is not one of the allowed
            choices or out of range, or the ``policy`` section names no valid policy.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    _check_keys(data, where)
    for key in _REQUIRED:
        if data.get(key) is None:
            raise ConfigError(f"missing required config key {key!r} in {where} (set it there or pass {key}=...)")
    hints = typing.get_type_hints(TrainConfig)
    cfg = TrainConfig(**{key: _check_field(key, value, hints[key]) for key, value in data.items()})
    for key in _PATH_KEYS:  # `output_dir: ~/runs/b` in a YAML file means the home folder, not ./~
        value = getattr(cfg, key)
        if isinstance(value, str) and value.startswith("~"):
            setattr(cfg, key, os.path.expanduser(value))
    _check_numbers(cfg, where)
    _check_combinations(cfg, where)
    ExecutionPolicy.from_dict(cfg.policy)  # names a bad policy field now, not after the model is built
    return cfg


# ------------------------------------------------------------------------------------- files


def _config_folders() -> list[Path]:
    """Where shipped configs live: the installed ``aimkit.recipes.configs`` package, and
    ``recipes/configs`` of a source checkout (run without an install)."""
    folders = []
    try:
        from importlib.resources import files

        folders.append(Path(str(files("aimkit.recipes.configs"))))
    except (ModuleNotFoundError, TypeError):  # not installed: a source checkout on sys.path
        pass
    folders.append(Path(__file__).resolve().parents[2] / "recipes" / "configs")
    return folders


TOKENIZER_CONFIGS = "tokenizers"  # recipes/configs/tokenizers: read by recipes/train_tokenizer.py


def _tokenizer_recipe_error(name: str) -> ConfigError:
    return ConfigError(
        f"{name!r} is a tokenizer recipe (recipes/configs/{TOKENIZER_CONFIGS}/), not an `aimkit train` config; "
        f"run it with: python recipes/train_tokenizer.py --config {Path(name).stem} --out DIR"
    )


def find_config(name_or_path: str, kind: Literal["generator", "tokenizer"] = "generator") -> Path:
    """A config file: a path, or a name shipped in ``aimkit/recipes/configs`` (``aim_b``);
    ``kind="tokenizer"``: a name shipped in ``aimkit/recipes/configs/tokenizers`` (``vq_f4_tiny``).
    Asking for a config of the other kind by name says where it belongs."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    available: list[str] = []
    for base in _config_folders():
        folder = base / TOKENIZER_CONFIGS if kind == "tokenizer" else base
        if (folder / f"{stem}.yaml").is_file() and os.sep not in name_or_path:
            return folder / f"{stem}.yaml"
        if kind == "generator" and (base / TOKENIZER_CONFIGS / f"{stem}.yaml").is_file():
            raise _tokenizer_recipe_error(stem)
        if folder.is_dir():
            available += [p.stem for p in folder.glob("*.yaml")]
    available = sorted(set(available))
    raise ConfigError(
        f"config {name_or_path!r} is neither a file nor a shipped config{did_you_mean(stem, available, quote=False)} "
        f"(shipped: {', '.join(available) or 'none'})"
    )


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["lr=3e-4", "model_args.d_model=64"]`` -> ``{"lr": 3e-4, "model_args": {"d_model": 64}}``."""
    import yaml

    out: dict[str, Any] = {}
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


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values")
    return data


def load_config(name_or_path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (by path or shipped name) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    where = "the overrides"
    if name_or_path:
        path = find_config(name_or_path)
        if path.parent.name == TOKENIZER_CONFIGS:
            raise _tokenizer_recipe_error(path.stem)
        where, data = str(path), _read_yaml(path)
    extra = parse_overrides(overrides)
    _check_keys(extra, "the command-line overrides")
    return train_config_from_dict(_merge(data, extra), where=where)


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (``OUT/config.yaml``, ``--print-config``)."""
    import yaml

    data = dataclasses.asdict(cfg)
    data["betas"] = list(cfg.betas)
    return yaml.safe_dump(data, sort_keys=False)
