"""The ``autoregressive`` sampler: raster-order token-by-token decoding with guidance.

The sampler drives any model exposing the decoding protocol of
:class:`~aimkit.generator.Generator`::

    cond = model.condition(labels)                     # labels (R,) incl. the null class
    params = model.allocate_inference_cache(R)
    logits = model.prefill(cond, params)               # (R, V) for token 0
    params.advance(1)
    logits = model.decode_step(tokens, cond, params)   # tokens (R,) -> (R, V) for the next token
    params.advance(1)

plus ``model.num_tokens``, ``model.null_class`` and ``model.policy`` (its
:class:`~aimkit.policy.ExecutionPolicy`; a model without one gets the defaults). Under
classifier-free guidance the batch is doubled: rows ``[0, B)`` carry the labels, rows ``[B, 2B)``
the null class, and both halves are fed the same sampled token. It sees logits, the cache and the
policy only and never asks what the model is.

The model's policy decides, at every call: on CUDA with ``decode_graph`` the decode step is
replayed from a captured CUDA graph keyed on the policy (see :mod:`aimkit.samplers._cuda_graph`),
elsewhere it runs eagerly; with ``sampling`` on the kernel, plain temperature sampling (no top-k /
top-p) runs as two Triton kernels per step (:mod:`aimkit.kernels.sampling`: same distribution,
different random draws than the PyTorch path, still reproducible from the seed).

The model's logits are checked for NaN / inf at every step (:class:`_FiniteCheck`): on the CPU the
first bad step raises :class:`~aimkit.samplers.logits.NonFiniteLogitsError` at once; on CUDA the
per-step result stays on the device (no host synchronisation in the decode loop) and is read once
when the batch is done, which then raises the same error instead of returning tokens drawn from
NaN. Temperatures below :data:`~aimkit.samplers.logits.GREEDY_TEMPERATURE` sample greedily on both
the PyTorch and the fused path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..policy import ExecutionPolicy
from ..registry import SAMPLERS
from ._cuda_graph import get_decode_graph
from .logits import GREEDY_TEMPERATURE, NonFiniteLogitsError, apply_guidance, check_sampling_args, sample
from .schedules import get_schedule, scale_at

__all__ = ["AutoregressiveConfig", "AutoregressiveSampler"]


@dataclass(frozen=True)
class AutoregressiveConfig:
    """Options of the autoregressive sampler: none yet.

    How the decode step and the sampling run (CUDA graphs, fused sampling kernels) is the
    model's :class:`~aimkit.policy.ExecutionPolicy` (``decode_graph``, ``sampling``), not a
    sampler option.
    """


_DEFAULT_POLICY = ExecutionPolicy()


def _policy_of(model) -> ExecutionPolicy:
    """The model's execution policy (``model.policy``); the defaults for a model without one."""
    policy = getattr(model, "policy", None)
    return policy if isinstance(policy, ExecutionPolicy) else _DEFAULT_POLICY


def _device_of(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


class _FiniteCheck:
    """Whether every logits tensor of a decoding run was finite (NaN / inf would draw garbage tokens).

    On the CPU each step is checked at once (one cheap reduction and a read). On CUDA the per-step
    flags are combined on the device and read once by :meth:`finish`, so the decode loop (and the
    CUDA-graph replays) never waits for the host.
    """

    def __init__(self, device: torch.device):
        self._eager = device.type != "cuda"
        self._all_finite: Tensor | None = None

    def update(self, logits: Tensor, step: int) -> None:
        finite = torch.isfinite(logits).all()
        if self._eager:
            if not bool(finite):
                raise NonFiniteLogitsError(_non_finite_message(f"at token {step}"))
        elif self._all_finite is None:
            self._all_finite = finite
        else:
            self._all_finite.logical_and_(finite)

    def finish(self) -> None:
        if self._all_finite is not None and not bool(self._all_finite):
            raise NonFiniteLogitsError(_non_finite_message("during this batch"))


def _non_finite_message(where: str) -> str:
    return (f"the model produced NaN or infinite logits {where}; no token can be sampled from them "
            "(check the weights, the dtype, and the guidance scale)")


def _checked_labels(labels: Any, null_class: int) -> Tensor:
    """``labels`` if it is a (B,) integer tensor (not bool) without the null class, else a ConfigError.

    The null class is the unconditional branch: a label equal to it (an off-by-one such as class
    1000 of ImageNet's 0..999) would silently sample unconditional images. Larger or negative
    labels are refused by ``model.condition``. The check reads the labels on the host (one
    synchronisation per batch on CUDA, before any decoding)."""
    if (not torch.is_tensor(labels) or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex()
            or labels.dtype == torch.bool):
        raise ConfigError("labels must be an integer tensor of shape (B,)")
    if bool((labels == null_class).any()):
        raise ConfigError(f"labels must be in [0, {null_class}): label {null_class} is the null class of "
                          "classifier-free guidance, not a class")
    return labels


class _EagerDecoder:
    """Plain decode steps on a freshly allocated cache (CPU, or CUDA without graphs)."""

    def __init__(self, model, cond: Any, rows: int):
        self._model = model
        self.cond = cond
        self.inference_params = model.allocate_inference_cache(rows)

    def step(self, tokens: Tensor) -> Tensor:
        return self._model.decode_step(tokens, self.cond, self.inference_params)


@SAMPLERS.register("autoregressive")
class AutoregressiveSampler:
    """Token-by-token sampler with classifier-free guidance, temperature, top-k and top-p.

    Args:
        config: :class:`AutoregressiveConfig`.

    Attributes:
        last_capture_seconds: seconds spent capturing CUDA graphs during the latest
            :meth:`sample_tokens` call (0.0 when cached graphs were reused or decoding was eager;
            None before the first call).
        total_capture_seconds: the same summed over every call of this sampler.
    """

    config_cls = AutoregressiveConfig

    def __init__(self, config: AutoregressiveConfig | None = None):
        self.config = AutoregressiveConfig() if config is None else config
        self.last_capture_seconds: float | None = None
        self.total_capture_seconds = 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def _decoder(self, model, cond: Any, rows: int, device: torch.device, policy: ExecutionPolicy):
        if device.type == "cuda" and policy.decode_graph:
            graph, seconds = get_decode_graph(model, cond, rows, policy)
            graph.start(cond)
            self.last_capture_seconds = seconds
            self.total_capture_seconds += seconds
            return graph
        self.last_capture_seconds = 0.0
        return _EagerDecoder(model, cond, rows)

    def sample_tokens(
        self,
        model,
        labels: Tensor,
        *,
        cfg_scale: float,
        temperature: float,
        top_k: int,
        top_p: float,
        generator: torch.Generator | None = None,
        schedule: str | Callable[[int, int, float], float] = "constant",
        on_step: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """Sample ``model.num_tokens`` image tokens per label.

        Args:
            model: a generator implementing the decoding protocol (see the module docstring).
            labels: (B,) integer class labels in ``[0, num_classes)`` (``model.null_class`` is refused).
            cfg_scale: guidance scale; exactly 1 disables guidance (no unconditional rows are
                computed and ``schedule`` is not consulted).
            temperature: softmax temperature; 0 (or below ``GREEDY_TEMPERATURE``) is greedy.
            top_k: keep the k most likely tokens (0 = all).
            top_p: nucleus mass in (0, 1] (1 = all).
            generator: random source on the model's device; seed it for reproducible tokens.
            schedule: guidance schedule name or callable ``(step, num_steps, base_scale)``.
            on_step: called as ``on_step(k, N)`` on the host once token ``k`` of ``N`` has been
                issued (k = 0 .. N-1, in order); for progress bars. It gets Python ints only, so it
                adds no device synchronisation; on CUDA the host runs ahead of the device by the
                launch queue, so the last calls come slightly before the tokens are computed.

        Returns:
            (B, N) int64 codes on the model's device, N = ``model.num_tokens``.

        Raises:
            ConfigError: bad settings or labels, or the schedule returns a non-finite / out-of-range scale.
            NonFiniteLogitsError: the model's logits held NaN or inf (see the module docstring).
        """
        cfg_scale, temperature, top_k, top_p = check_sampling_args(cfg_scale, temperature, top_k, top_p)
        if temperature < GREEDY_TEMPERATURE:
            temperature = 0.0  # greedy on every path; 1 / temperature would overflow in the fused kernel
        schedule_fn = get_schedule(schedule)
        device = _device_of(model)
        policy = _policy_of(model)
        labels = _checked_labels(labels, model.null_class).to(device=device, dtype=torch.long)
        batch, num_tokens = labels.shape[0], model.num_tokens
        guided = cfg_scale != 1.0
        with torch.inference_mode():
            rows = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
            decoder = self._decoder(model, model.condition(rows), rows.shape[0], device, policy)
            params = decoder.inference_params
            logits = model.prefill(decoder.cond, params)  # (R, V) for token 0
            params.advance(1)
            codes = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
            check = _FiniteCheck(device)
            fused = self._fused_sampler(policy, logits, temperature, top_k, top_p)
            if fused is not None:
                seed = fused.draw_seed(generator, device)
                next_tokens = torch.empty(rows.shape[0], dtype=torch.long, device=device)
            for k in range(num_tokens):
                check.update(logits, k)
                scale = scale_at(schedule_fn, k, num_tokens, cfg_scale) if guided else None
                if fused is not None:  # writes codes[:, k] and the (doubled) next input
                    fused.sample_guided_(logits, scale, temperature, seed, k, next_tokens, codes)
                else:
                    token = sample(apply_guidance(logits, scale) if guided else logits,
                                   temperature, top_k, top_p, generator=generator)  # (B,)
                    codes[:, k] = token
                    next_tokens = torch.cat([token, token]) if guided else token
                if k + 1 < num_tokens:
                    logits = decoder.step(next_tokens)
                    params.advance(1)
                if on_step is not None:
                    on_step(k, num_tokens)
            check.finish()
        return codes.clone()  # a normal tensor, usable outside inference mode

    def _fused_sampler(self, policy: ExecutionPolicy, logits: Tensor, temperature: float, top_k: int, top_p: float):
        """The sampling kernel module when it applies (policy ``sampling`` picks the kernel for
        these logits, positive temperature, no filtering), else None (the PyTorch reference)."""
        if not (temperature > 0 and (top_k == 0 or top_k >= logits.shape[-1]) and top_p >= 1.0):
            return None
        if not policy.use_kernel("sampling", logits):
            return None
        from ..kernels import sampling  # Triton: imported only when the kernel runs

        return sampling
