"""Guidance-scale schedules: how the classifier-free guidance scale varies over the tokens.

A schedule is any callable ``schedule(step, num_steps, base_scale) -> float`` where ``step`` is the
index of the token being sampled (``0 <= step < num_steps``), ``num_steps`` the number of image
tokens and ``base_scale`` the ``cfg_scale`` the caller asked for. Pass a callable or a built-in
name (``"constant"``, ``"linear"``) wherever a ``schedule`` argument is accepted.

The sampler consults the schedule only when guidance is on (``cfg_scale != 1``); with
``cfg_scale == 1`` no unconditional branch is run at all. It reads every value through
:func:`scale_at`, which refuses a value that is not a finite number within
``±MAX_CFG_SCALE`` (1e4): a NaN scale would otherwise turn every logit into NaN.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Protocol

from ..errors import ConfigError
from .logits import MAX_CFG_SCALE

__all__ = ["GuidanceSchedule", "constant", "linear", "SCHEDULES", "get_schedule", "scale_at"]


class GuidanceSchedule(Protocol):
    """``(step, num_steps, base_scale) -> scale`` for the token at index ``step``."""

    def __call__(self, step: int, num_steps: int, base_scale: float) -> float: ...


def constant(step: int, num_steps: int, base_scale: float) -> float:
    """The same scale for every token: ``base_scale``."""
    return float(base_scale)


def linear(step: int, num_steps: int, base_scale: float) -> float:
    """A linear ramp from no guidance to ``base_scale``.

    ``scale(step) = 1 + (base_scale - 1) * step / (num_steps - 1)``: exactly 1.0 for the first
    token (step 0) and exactly ``base_scale`` for the last (step ``num_steps - 1``). With a single
    token it returns ``base_scale``.
    """
    if num_steps <= 1 or step == num_steps - 1:  # 1 + (s - 1) is not always s in floating point (0.1)
        return float(base_scale)
    return 1.0 + (float(base_scale) - 1.0) * step / (num_steps - 1)


SCHEDULES: dict[str, GuidanceSchedule] = {"constant": constant, "linear": linear}


def get_schedule(schedule: str | Callable[[int, int, float], float]) -> GuidanceSchedule:
    """Resolve a schedule name (``"constant"``, ``"linear"``) or return a callable unchanged.

    Raises:
        ConfigError: unknown name, or neither a string nor a callable.
    """
    if callable(schedule):
        return schedule
    if isinstance(schedule, str):
        try:
            return SCHEDULES[schedule]
        except KeyError:
            raise ConfigError(
                f"unknown guidance schedule {schedule!r}; known schedules: {', '.join(SCHEDULES)} "
                "(or pass a callable (step, num_steps, base_scale) -> float)"
            ) from None
    raise ConfigError(f"schedule must be a name or a callable, got {type(schedule).__name__}")


def scale_at(schedule: GuidanceSchedule, step: int, num_steps: int, base_scale: float) -> float:
    """``schedule(step, num_steps, base_scale)`` as a float, checked.

    Raises:
        ConfigError: the schedule returned something other than a finite real number with
            ``|scale| <= MAX_CFG_SCALE``; the message names the schedule, the token and the value.
    """
    value = schedule(step, num_steps, base_scale)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        scale = float(value)
        if math.isfinite(scale) and abs(scale) <= MAX_CFG_SCALE:
            return scale
    name = getattr(schedule, "__name__", type(schedule).__name__)
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    raise ConfigError(
        f"guidance schedule {name} returned {text} for token {step} of {num_steps}; a schedule must return "
        f"a finite number with |scale| <= {MAX_CFG_SCALE:g}"
    )
