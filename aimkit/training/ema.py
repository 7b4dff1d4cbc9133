"""An exponential moving average (EMA) of a model's weights, updated inside the training step.

After every applied optimizer update (never after a skipped one)::

    shadow <- shadow + (1 - decay) * (param - shadow)        # = lerp(shadow, param, 1 - decay)

over the trainable parameters, as one fused ``torch._foreach_lerp_`` on float32 copies. The
update reads and writes device tensors only, so a captured step
(:class:`~aimkit.training.step.GraphedStep`) replays it as part of its optimizer graph. The
average starts from the weights the run starts from (LlamaGen, MAR and VAR report their best
FIDs with ``decay = 0.9999``, no warm-up of the decay).

In a run (``ema_decay:`` in the recipe): checkpoints hold ``ema.safetensors`` (float32, the
parameter names of :meth:`torch.nn.Module.named_parameters`) and a resume restores it exactly;
``OUT/final`` holds the averaged weights (what ``aimkit.build("OUT/final")`` and ``aimkit
generate --model OUT/final`` load) and ``OUT/final/raw`` the trained ones; sample grids
during training are drawn with the averaged weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError

__all__ = ["EMA", "EMA_FILE"]

EMA_FILE = "ema.safetensors"  # inside a checkpoint directory


class EMA:
    """The moving average of ``model``'s trainable parameters.

    Args:
        model: the module whose parameters are averaged (the unwrapped generator; parameters
            that do not require gradients, such as a frozen tokenizer's, are left out).
        decay: the weight of the old average per update, in ``[0, 1)``.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= float(decay) < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # tied weights once
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in self.params]  # float32 whatever the model
        self._float32 = all(p.dtype == torch.float32 for p in self.params)

    def __repr__(self) -> str:
        return f"EMA(decay={self.decay}, tensors={len(self.shadow)})"

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average toward the current parameters (capturable: no host sync)."""
        params = self.params if self._float32 else [p.float() for p in self.params]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average again from the current parameters."""
        for s, p in zip(self.shadow, self.params):
            s.copy_(p)

    def state_dict(self) -> dict[str, Tensor]:
        """``{parameter name: float32 average}`` (the tensors themselves, not copies)."""
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor], source: str = "checkpoint") -> None:
        """Copy a saved average in, strictly: the same names and shapes, nothing left out."""
        missing = [n for n in self.names if n not in state]
        unexpected = sorted(set(state) - set(self.names))
        bad = [n for n, s in zip(self.names, self.shadow) if n in state and tuple(state[n].shape) != tuple(s.shape)]
        if missing or unexpected or bad:
            parts = [f"{len(v)} {what} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                     for what, v in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)) if v]
            raise CheckpointError(f"the moving average in {source} does not fit this model: {'; '.join(parts)}")
        for name, s in zip(self.names, self.shadow):
            s.copy_(state[name])

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the model's parameters hold the average; afterwards the trained
        weights are back, bit for bit (in place: captured graphs keep their addresses)."""
        raw = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, s in zip(self.params, self.shadow):
                    p.copy_(s)
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw):
                    p.copy_(r)
