"""Logit processing for token sampling: guidance, temperature, top-k, top-p, drawing a token.

Every function takes ``(B, V)`` logits and returns new tensors; the caller's tensor is never
modified. Removed tokens get ``-inf``. Processing happens in float32 whatever the model's dtype.

The order used by :func:`sample` is temperature, then top-k, then top-p (the nucleus is measured
on the tempered distribution, as in LlamaGen).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..errors import AimkitError, ConfigError

__all__ = [
    "MAX_CFG_SCALE",
    "GREEDY_TEMPERATURE",
    "NonFiniteLogitsError",
    "check_sampling_args",
    "apply_guidance", "apply_temperature", "top_k_filter", "top_p_filter",
    "sample",
]


# |guidance scale| above this is refused: 1e4 is far beyond any useful guidance (published
# settings are 1-10), and keeps ``scale * (cond - uncond)`` finite in float32 for any logits
# below ~1e34, so a typo such as 1e300 is an error instead of inf/NaN logits.
MAX_CFG_SCALE = 1e4
# Temperatures below float32's machine epsilon sample greedily (the argmax). Logits are processed in
# float32; dividing by such a temperature stretches every logit gap by more than 1/eps = 8.4e6, so the
# tempered distribution is already the argmax to float32 precision, and a still smaller temperature
# (1e-300 is 0 in float32) would turn the logits into inf / NaN.
GREEDY_TEMPERATURE = float(torch.finfo(torch.float32).eps)


class NonFiniteLogitsError(AimkitError):
    """The model produced NaN or infinite logits, so no token can be drawn from them."""


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_sampling_args(cfg_scale, temperature, top_k, top_p) -> tuple[float, float, int, float]:
    """Validate sampling settings; each bad value raises one :class:`ConfigError` naming it.

    Args:
        cfg_scale: guidance scale, finite with ``|cfg_scale| <= MAX_CFG_SCALE`` (1e4; 1 = no guidance).
        temperature: finite, >= 0 (0 = greedy; below ``GREEDY_TEMPERATURE`` it also samples greedily).
        top_k: integer >= 0 (0 = no top-k filtering).
        top_p: in (0, 1] (1 = no nucleus filtering).

    Returns:
        ``(cfg_scale, temperature, top_k, top_p)`` as ``(float, float, int, float)``.
    """
    if not _is_real(cfg_scale) or abs(cfg_scale) > MAX_CFG_SCALE:
        raise ConfigError(
            f"cfg_scale must be a finite number with |cfg_scale| <= {MAX_CFG_SCALE:g} (1 = no guidance), "
            f"got {cfg_scale!r}"
        )
    if not _is_real(temperature) or temperature < 0:
        raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 0:
        raise ConfigError(f"top_k must be an integer >= 0 (0 = keep all tokens), got {top_k!r}")
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1] (1 = keep all tokens), got {top_p!r}")
    return float(cfg_scale), float(temperature), int(top_k), float(top_p)


def apply_guidance(logits: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance over a doubled batch.

    Args:
        logits: (2B, V); rows ``[0, B)`` are conditional, rows ``[B, 2B)`` unconditional.
        scale: guidance scale ``s``; the result is ``uncond + s * (cond - uncond)``.

    Returns:
        (B, V) float32. With ``scale == 1`` it is exactly the conditional rows.
    """
    if logits.shape[0] % 2:
        raise ValueError(f"guidance needs an even number of rows, got {logits.shape[0]}")
    cond, uncond = logits.float().chunk(2, dim=0)
    if scale == 1.0:
        return cond.clone()
    return torch.lerp(uncond, cond, scale)  # uncond + scale * (cond - uncond), one kernel


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide logits by a positive temperature.

    Args:
        logits: (B, V).
        temperature: > 0; below 1 sharpens, above 1 flattens. 0 (greedy) is handled by
            :func:`sample`, not here.

    Returns:
        (B, V) float32.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 here (0 means greedy, see sample()), got {temperature}")
    logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits.clone()


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row, set the rest to ``-inf``.

    Exactly ``k`` tokens survive even when values tie at the boundary.

    Args:
        logits: (B, V).
        k: tokens to keep; 0 (or ``k >= V``) keeps all.

    Returns:
        (B, V), a new tensor in the input's dtype.
    """
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 0:
        raise ConfigError(f"top_k must be an integer >= 0 (0 = keep all tokens), got {k!r}")
    if k == 0 or k >= logits.shape[-1]:
        return logits.clone()
    keep_idx = torch.topk(logits, k, dim=-1).indices  # (B, k)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, keep_idx, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most probable tokens whose mass reaches ``p``.

    Tokens are ranked by probability; token ``i`` of the ranking is kept when the mass of the
    tokens ranked before it is below ``p``. So the most probable token is always kept (also for
    a ``p`` below float32's smallest number, such as 1e-300, which then keeps just that token), and
    the kept set is the shortest prefix of the ranking whose total probability is ``>= p``.

    Args:
        logits: (B, V); ``-inf`` entries (already removed tokens) have zero mass.
        p: in (0, 1]; 1 keeps all.

    Returns:
        (B, V), a new tensor in the input's dtype.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p >= 1.0:
        return logits.clone()
    sorted_logits, order = torch.sort(logits.float(), dim=-1, descending=True)  # (B, V)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V) mass up to and including i
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)  # mass before i
    drop_sorted = before >= p
    drop_sorted[:, 0] = False  # the top token stays whatever p rounds to in float32 (1e-300 -> 0)
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row.

    Args:
        logits: (B, V) float logits (not modified).
        temperature: 0 picks the argmax (greedy, no randomness), and so does any temperature
            below ``GREEDY_TEMPERATURE`` (float32 eps); larger values divide the logits.
        top_k: keep the k most likely tokens (0 = all).
        top_p: nucleus mass in (0, 1] (1 = all).
        generator: random source on the logits' device; a seeded generator makes the draw
            reproducible on CPU and CUDA alike. The draw is an exponential race (equivalent to
            Gumbel-max), which, unlike ``torch.multinomial``, needs no host synchronisation.

    Returns:
        (B,) int64 token ids. NaN or infinite logits give meaningless tokens; the sampler checks
        the model's logits (see :class:`NonFiniteLogitsError`).

    Raises:
        ConfigError: a setting out of range (:func:`check_sampling_args`), also when greedy.
    """
    _, temperature, top_k, top_p = check_sampling_args(1.0, temperature, top_k, top_p)
    if temperature < GREEDY_TEMPERATURE:  # filtering never removes the top token: same argmax
        return logits.argmax(dim=-1)
    x = logits.float()  # the filters below return new tensors; skip the ones that are no-ops
    if temperature != 1.0:
        x = apply_temperature(x, temperature)
    if 0 < top_k < x.shape[-1]:
        x = top_k_filter(x, top_k)
    if top_p < 1.0:
        x = top_p_filter(x, top_p)
    probs = x.softmax(dim=-1)  # (B, V), a new tensor: the race below may work in place
    # Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i (the
    # Gumbel-max trick in another form). Unlike torch.multinomial it never waits for the device.
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return probs.div_(race).argmax(dim=-1)
