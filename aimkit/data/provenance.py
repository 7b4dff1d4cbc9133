"""Which tokenizer made a token folder, and making a model carry exactly that tokenizer.

``aimkit tokenize`` stores a *tokenizer record* in the folder's ``index.json``::

    "tokenizer_record": {
      "name": "vq-f4-tiny",                  # registry name
      "config": {...},                       # its config dataclass, as JSON
      "fingerprint": "3f1c...",              # tokenizer_fingerprint() of the weights used
      "source": {"model": "aim-tiny-shapes", "pretrained": null, "tokenizer": null,
                 "tokenizer_weights": null, "options": {}, "random": false}
    }

``source`` repeats the ``aimkit tokenize`` arguments that chose the weights (paths made
absolute), enough for :func:`build_tokenizer` to build the same tokenizer again.

Training on such a folder (:func:`adopt_recorded_tokenizer`, called by ``aimkit train``)
makes the model's tokenizer carry exactly the recorded weights, so every checkpoint and the
final ``save_pretrained`` export decode the codes the model learnt. Whatever cannot be made
to match (another tokenizer or config than the model's, weights that moved or changed since)
is a :class:`~aimkit.errors.ConfigError` that says what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import AimkitError, ConfigError
from ..weights import state_dict_fingerprint

__all__ = [
    "tokenizer_fingerprint",
    "tokenizer_source",
    "describe_source",
    "build_tokenizer",
    "make_tokenizer_record",
    "adopt_recorded_tokenizer",
]

_SOURCE_KEYS = ("model", "pretrained", "tokenizer", "tokenizer_weights", "options", "random")


def tokenizer_fingerprint(module: torch.nn.Module) -> str:
    """The weight fingerprint a record holds (:func:`aimkit.weights.state_dict_fingerprint`)."""
    return state_dict_fingerprint(module)


def _json_ready(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def tokenizer_source(
    *,
    model: str | None = None,
    pretrained: str | None = None,
    tokenizer: str | None = None,
    tokenizer_weights: os.PathLike | None = None,
    options: Mapping[str, Any] | None = None,
    random: bool = False,
) -> dict[str, Any]:
    """The ``source`` entry of a record: the tokenize arguments, with local paths made absolute."""
    if (model is None) == (tokenizer is None):
        raise ConfigError("name exactly one of --model and --tokenizer")
    if pretrained is not None and model is None:
        raise ConfigError("--pretrained needs --model (it names that model's weights)")

    def absolute(path):
        return str(Path(path).expanduser().resolve()) if path is not None else None

    if model is not None and (Path(model) / "config.json").is_file():
        model = absolute(model)
    if pretrained is not None and not str(pretrained).startswith("hf-hub:") and pretrained != "published":
        pretrained = absolute(pretrained)
    return {
        "model": model,
        "pretrained": pretrained,
        "tokenizer": tokenizer,
        "tokenizer_weights": absolute(tokenizer_weights),
        "options": _json_ready(dict(options or {})),
        "random": bool(random),
    }


def describe_source(source: Mapping[str, Any]) -> str:
    """The source as tokenize arguments: ``--model aim-tiny-shapes``."""
    parts = []
    for key in ("model", "pretrained", "tokenizer", "tokenizer_weights"):
        if source.get(key):
            parts.append(f"--{key.replace('_', '-')} {source[key]}")
    parts += [f"--tokenizer-option {k}={json.dumps(v)}" for k, v in (source.get("options") or {}).items()]
    if source.get("random"):
        parts.append("--random-tokenizer")
    return " ".join(parts)


def _spec_of(source: Mapping[str, Any]):
    """``(spec, preset_tokenizer or None)``: the tokenizer's spec, and the built tokenizer when
    the named model supplies the weights itself."""
    from ..assets import embedded_weights
    from ..build import build, resolve_config
    from ..config import ComponentSpec

    if not source.get("model"):
        return ComponentSpec(source["tokenizer"]).resolved("tokenizer"), None
    model = source["model"]
    config = resolve_config(model)
    if config.tokenizer is None:
        raise ConfigError(f"--model {model} has no tokenizer; pass --tokenizer NAME")
    spec = config.tokenizer.resolved("tokenizer")
    custom = source.get("options") or source.get("tokenizer_weights")
    pretrained = source.get("pretrained")
    if pretrained is not None:
        if custom:
            raise ConfigError("--pretrained takes the tokenizer from the model's weights; "
                              "drop --tokenizer-weights / --tokenizer-option")
        return spec, build(model, pretrained=True if pretrained == "published" else pretrained).tokenizer
    ships_weights = (Path(model) / "config.json").is_file() or embedded_weights(model) is not None
    if ships_weights and not custom:
        return spec, build(model).tokenizer  # the weights come with the model
    return spec, None


def build_tokenizer(source: Mapping[str, Any]):
    """Build the tokenizer a ``source`` (see :func:`tokenizer_source`) describes, with its weights.

    Returns:
        ``(tokenizer, spec)``: the module (CPU, float32) and its :class:`ComponentSpec`, the
        config options applied.

    Raises:
        ConfigError / CheckpointError: unknown names or options, no weights, unreadable files.
    """
    from ..config import ComponentSpec, replace_checked
    from ..registry import TOKENIZERS

    spec, tok = _spec_of(source)
    if tok is not None:
        return tok, spec
    weights, options = source.get("tokenizer_weights"), dict(source.get("options") or {})
    if not weights and not source.get("random"):
        raise ConfigError(
            "the tokenizer has no trained weights: pass --tokenizer-weights PATH "
            "(or --random-tokenizer for tests and throughput runs)"
        )
    cfg = spec.config
    if options:
        if cfg is None:
            raise ConfigError(f"tokenizer {spec.name!r} has no config options")
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        cfg = replace_checked(cfg, where=f"tokenizer {spec.name!r}", **options)
    cls = TOKENIZERS.get(spec.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights: the same in every process and on every rerun
        tok = cls(config=cfg) if cfg is not None else cls()
    if weights:
        tok.load_weights(weights)
    return tok, ComponentSpec(spec.name, cfg)


def make_tokenizer_record(tokenizer: torch.nn.Module, spec, source: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tokenizer_record`` entry of a token folder's index (see the module docstring)."""
    from ..config import config_to_dict

    return {
        "name": spec.name,
        "config": None if spec.config is None else _json_ready(config_to_dict(spec.config)),
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "source": _json_ready(dict(source)),
    }


def _check_record(record: Any, where: str) -> dict[str, Any]:
    """The record, or ConfigError when an entry is missing or of the wrong type."""
    ok = (
        isinstance(record, dict)
        and isinstance(record.get("name"), str)
        and (record.get("config") is None or isinstance(record.get("config"), dict))
        and isinstance(record.get("fingerprint"), str) and len(record["fingerprint"]) == 64
        and isinstance(record.get("source"), dict)
        and all(k in record["source"] for k in _SOURCE_KEYS)
    )
    if not ok:
        raise ConfigError(f"{where}: the tokenizer_record entry is damaged; re-tokenize the images into a new folder")
    return record


def _config_difference(recorded: dict[str, Any] | None, spec) -> str:
    """``"codebook_size 1024 there, 512 in the model"`` for the fields that differ ('' if none)."""
    from ..config import config_to_dict

    mine = None if spec.config is None else _json_ready(config_to_dict(spec.config))
    if recorded == mine:
        return ""
    recorded, mine = recorded or {}, mine or {}
    keys = sorted(set(recorded) | set(mine))
    diffs = [f"{k} {json.dumps(recorded.get(k))} there, {json.dumps(mine.get(k))} in the model"
             for k in keys if recorded.get(k) != mine.get(k)]
    return "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")


def _copy_weights(target: torch.nn.Module, source: torch.nn.Module, where: str) -> None:
    want, have = target.state_dict(), source.state_dict()
    if set(want) != set(have) or any(want[k].shape != have[k].shape for k in want):
        raise ConfigError(f"{where}: the recorded tokenizer's tensors do not fit the model's tokenizer")
    with torch.no_grad():
        for name, tensor in want.items():
            tensor.copy_(have[name])


def _mismatch_checks(gen, record: dict[str, Any], where: str) -> None:
    spec = gen.config.tokenizer.resolved("tokenizer")
    if record["name"] != spec.name:
        raise ConfigError(
            f"{where} was made by tokenizer {record['name']!r}, but the model's tokenizer is {spec.name!r}; "
            f"train a model with {record['name']!r} (model_args.tokenizer) or re-tokenize with "
            f"`aimkit tokenize --model <this model>`"
        )
    diff = _config_difference(record.get("config"), spec)
    if diff:
        raise ConfigError(
            f"{where} was made by a {spec.name} tokenizer of another config ({diff}); give the model "
            f"that tokenizer config or re-tokenize with `aimkit tokenize --model <this model>`"
        )


def adopt_recorded_tokenizer(gen, dataset) -> str | None:
    """Give ``gen.tokenizer`` exactly the weights that made ``dataset``'s codes.

    Nothing happens for datasets that are not token folders, or models without a tokenizer.
    When ``gen.tokenizer`` already has the recorded fingerprint, nothing changes; otherwise the
    tokenizer is rebuilt from the recorded source, its fingerprint checked, and its weights
    copied into ``gen.tokenizer`` (which keeps its device and dtype).

    Returns:
        A line to show the user (what was loaded, or a warning for a folder without a record),
        or None when there is nothing to say.

    Raises:
        ConfigError: the recorded tokenizer is not the model's (name or config), or its weights
            cannot be rebuilt (a file moved, changed or is unreadable); the message says what to do.
    """
    from .tokens import TokenDataset

    if not isinstance(dataset, TokenDataset) or getattr(gen, "tokenizer", None) is None:
        return None
    where = str(dataset.root)
    record = dataset.tokenizer_record
    model_name = gen.config.tokenizer.name
    if record is None:
        if dataset.tokenizer != model_name:
            return f"warning: {where} was made with tokenizer {dataset.tokenizer!r}, the model has {model_name!r}"
        return (f"warning: {where} does not record which {model_name} weights made its codes (an older aimkit "
                "wrote it); the saved model keeps its own tokenizer weights, which may not match: re-tokenize "
                "to be sure")
    record = _check_record(record, where)
    _mismatch_checks(gen, record, where)
    want = record["fingerprint"]
    if tokenizer_fingerprint(gen.tokenizer) == want:
        return None
    shown = describe_source(record["source"])
    try:
        rebuilt, _ = build_tokenizer(record["source"])
    except AimkitError as exc:
        raise ConfigError(
            f"cannot rebuild the tokenizer that made {where} ({shown}): {exc}; restore those weights, "
            "or re-tokenize with the tokenizer you want the model to have"
        ) from None
    got = tokenizer_fingerprint(rebuilt)
    if got != want:
        raise ConfigError(
            f"the tokenizer weights that made {where} ({shown}) have changed since: fingerprint {got[:12]} now, "
            f"{want[:12]} recorded; restore the original weights, or re-tokenize with these"
        )
    _copy_weights(gen.tokenizer, rebuilt, where)
    same_dtypes = all(a.dtype == b.dtype for a, b in zip(gen.tokenizer.state_dict().values(),
                                                        rebuilt.state_dict().values()))
    if same_dtypes and tokenizer_fingerprint(gen.tokenizer) != want:  # pragma: no cover - a copy bug
        raise ConfigError(f"{where}: copying the recorded tokenizer weights into the model failed")
    return f"{where}: the model's tokenizer now has the weights that made these codes ({shown}, sha256 {want[:12]})"
