"""Argument types shared by the subcommands (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["bounded_int", "policy", "positive_int", "seed", "resolve_device", "add_weight_arguments", "weights_for",
           "class_labels"]

PUBLISHED = "published"  # --pretrained published: the weights a preset ships or publishes


def positive_int(text: str) -> int:
    """An integer > 0, or an argparse error naming the bad value (exit code 2, one line)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value >= 2**63:  # torch sizes and seeds are int64
        raise argparse.ArgumentTypeError(f"expected a positive integer below 2**63, got {text!r}")
    return value


def bounded_int(low: int, high: int, expected: str):
    """An argparse ``type=``: an integer in ``[low, high]``, else one line ``expected <expected>, got '...'``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


# a seed in [0, 2**63) (what ``torch.Generator.manual_seed`` takes)
seed = bounded_int(0, 2**63 - 1, "an integer seed in [0, 2**63)")


def resolve_device(name: str) -> str:
    """``--device auto|cpu|cuda`` to a device name; asking for CUDA without one is a user error."""
    import torch

    from ..errors import ConfigError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available")
    return name


def policy(text: str):
    """``--policy state_dtype=model,decode_graph=false`` to an :class:`~aimkit.policy.ExecutionPolicy`
    (the defaults of :func:`~aimkit.policy.default_policy` with those fields changed), or an
    argparse error naming the bad entry. Values: ``true``/``false``, integers, or words."""
    from ..errors import ConfigError
    from ..policy import default_policy

    changes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected FIELD=VALUE in --policy, got {item!r}")
        raw = raw.strip()
        value = {"true": True, "false": False}.get(raw.lower(), raw)
        if isinstance(value, str) and value.lstrip("-").isdigit():
            value = int(value)
        changes[key.strip()] = value
    try:
        return default_policy().replace(**changes)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def class_labels(text: str) -> list:
    """``--labels 207,golden retriever,tabby cat`` to a list of class ids (ints) and class names
    (strings, looked up in the model's ``class_names`` once it is known), or an argparse error."""
    labels: list[int | str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        labels.append(int(part) if part.lstrip("-").isdigit() else part)
    if not labels:
        raise argparse.ArgumentTypeError("--labels needs at least one class id or name")
    return labels


def check_sampling_options(args, preset) -> None:
    """``--cfg-scale/--temperature/--top-k/--top-p`` as they will run (given, else ``preset``'s, a
    ``SamplingDefaults``), refused in one line before the slow build and before anything is written."""
    from ..samplers.logits import check_sampling_args

    keys = ("cfg_scale", "temperature", "top_k", "top_p")
    check_sampling_args(*(getattr(preset, k) if getattr(args, k) is None else getattr(args, k) for k in keys))


def add_weight_arguments(parser, default: str = "the weights the model ships with") -> None:
    """``--pretrained`` and ``--random-weights``, read by :func:`weights_for`."""
    parser.add_argument(
        "--pretrained", metavar="PATH|published|hf-hub:ORG/NAME",
        help="weights: a file or directory (official AiM or aimkit layout), hf-hub:ORG/NAME, or 'published' "
        f"for the weights the preset ships or publishes (see `aimkit list`); default: {default}",
    )
    parser.add_argument(
        "--random-weights", action="store_true",
        help="run a model that has no weights with random ones (it draws noise); without this flag such a "
        "model is refused",
    )


def weights_for(model: str, pretrained: Any, random_weights: bool = False) -> Any:
    """What ``aimkit.build(model, pretrained=...)`` gets from ``--pretrained`` / ``--random-weights``.

    ``published`` is the shipped weights of a preset that ships some (``aim-tiny-shapes``), else
    its published ones (``True``); nothing given keeps the weights a saved directory or a preset
    ships. A model left with no weights at all is refused unless ``--random-weights`` says so.

    Raises:
        ConfigError: one line saying the model has no weights and how to get them.
    """
    from ..assets import embedded_weights
    from ..build import resolve_config
    from ..errors import ConfigError

    resolve_config(model)  # an unknown preset name: its suggestions come first
    saved = (Path(model) / "config.json").is_file() or model.startswith("hf-hub:")
    if random_weights and pretrained is not None:
        raise ConfigError("--random-weights and --pretrained exclude each other; give one of them")
    if random_weights:
        return False
    if pretrained == PUBLISHED:
        return _published(model, saved)
    if pretrained is not None or saved or embedded_weights(model) is not None:
        return pretrained
    raise ConfigError(f"{model} has no weights loaded and would draw noise: {_how_to_get_weights(model)}, "
                      "or --random-weights to run it with random weights anyway")


def _published(model: str, saved: bool) -> Any:
    """``--pretrained published``: the preset's shipped weights (a folder), else True (the Hub)."""
    from ..assets import embedded_weights
    from ..errors import ConfigError
    from ..presets import PUBLISHED_WEIGHTS

    if saved:
        raise ConfigError(f"--pretrained published names a preset's weights, but {model} is a saved model "
                          "folder: leave --pretrained out to load the weights saved in it")
    shipped = embedded_weights(model)
    if shipped is not None:
        return str(shipped)
    if model in PUBLISHED_WEIGHTS:
        return True
    raise ConfigError(f"{model} ships no weights and none are published for it: pass --pretrained PATH "
                      "or hf-hub:ORG/NAME, or --random-weights")


def _how_to_get_weights(model: str) -> str:
    from ..presets import PUBLISHED_WEIGHTS

    record = PUBLISHED_WEIGHTS.get(model)
    if record is not None:
        return (f"pass --pretrained published (hf-hub:{record.repo_id}, downloaded once into the Hugging Face "
                "cache), --pretrained PATH or hf-hub:ORG/NAME")
    return "pass --pretrained PATH (a checkpoint file or save_pretrained folder) or hf-hub:ORG/NAME"


DEVICE_CHOICES = ("auto", "cpu", "cuda")


def add_device_arguments(parser, dtype: bool = True,
                         device_help: str = "auto (default) uses CUDA when available") -> None:
    """``--device auto|cpu|cuda`` and (with ``dtype``) ``--dtype float32|bfloat16``, as every
    sampling command spells them."""
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=device_help)
    if dtype:
        parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                            help="parameter dtype (default float32)")
