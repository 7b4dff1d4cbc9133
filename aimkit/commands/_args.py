"""Argument types shared by the subcommands (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse

__all__ = ["policy", "positive_int", "seed", "resolve_device"]


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


def seed(text: str) -> int:
    """A seed in [0, 2**63) (what ``torch.Generator.manual_seed`` takes), or an argparse error."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer seed in [0, 2**63), got {text!r}")
    return value


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
