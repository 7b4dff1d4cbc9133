"""Guidance-scale schedules: how the classifier-free guidance scale varies over the tokens.

A schedule is any callable ``schedule(step, num_steps, base_scale) -> float`` where ``step`` is the
index of the token being sampled (``0 <= step < num_steps``), ``num_steps`` the number of image
tokens and ``base_scale`` the ``cfg_scale`` the caller asked for. Pass a callable or a built-in
name (``"constant"``, ``"linear"``) wherever a ``schedule`` argument is accepted.

The sampler consults the schedule only when guidance is on (``cfg_scale != 1``); with
``cfg_scale == 1`` no unconditional branch is run at all.
"""

from __future__ import annotations

from typing import Callable, Dict, Protocol, Union

from ..errors import ConfigError

__all__ = ["GuidanceSchedule", "constant", "linear", "SCHEDULES", "get_schedule"]


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
    if num_steps <= 1:
        return float(base_scale)
    return 1.0 + (float(base_scale) - 1.0) * step / (num_steps - 1)


SCHEDULES: Dict[str, GuidanceSchedule] = {"constant": constant, "linear": linear}


def get_schedule(schedule: Union[str, Callable[[int, int, float], float]]) -> GuidanceSchedule:
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
