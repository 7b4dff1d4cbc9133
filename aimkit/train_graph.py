"""A training step captured in CUDA graphs: the host launches it with two calls.

An AiM-B step at batch 64 x 256 is ~74 ms of GPU kernels, but the eager step takes ~118 ms on
an H200 (benchmarks/notes.md): the host cannot launch the ~3,000 small kernels of forward,
backward (mamba-ssm's Triton scan kernels among them), clipping and AdamW fast enough. Captured
once, the step replays without Python in the loop.

Two graphs share one memory pool:

* ``forward_backward``: autocast forward, cross-entropy, backward, global grad-norm clip. Its
  outputs are the device tensors :attr:`GraphedTrainStep.loss` and :attr:`GraphedTrainStep.grad_norm`.
* ``optimizer``: ``optimizer.step()`` (AdamW with ``capturable=True``).

Keeping them apart lets a caller look at the loss and norm (one sync) and skip the update of a
non-finite step, as :mod:`aimkit.train` does. Constraints of capture: fixed batch shape (inputs
are copied into static buffers), no host syncs inside the model, a capturable optimizer whose
learning rate is a tensor if it must change (``lr=torch.tensor(...)``), and the warm-up steps run
before capture are real optimizer steps (pass ``warmup=0`` after an eager warm-up of your own).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["GraphedTrainStep"]


class GraphedTrainStep:
    """Forward + backward + clip and the optimizer step of ``model``, each as one CUDA graph.

    Args:
        model: the module to train (on CUDA, in train mode).
        optimizer: a capturable optimizer over its parameters (``capturable=True``).
        loss_fn: ``(model, *inputs) -> scalar loss``; runs under autocast when ``amp_dtype`` is set.
        example_inputs: CUDA tensors with the fixed shapes and dtypes of every step's inputs.
        max_grad_norm: global grad-norm clip (None: no clipping; ``grad_norm`` is still measured).
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16``) or None for none.
        warmup: eager steps (real optimizer steps) before capture, on a side stream: they run
            autotuning and allocate the optimizer state outside the graphs. 0 is allowed only when
            the optimizer already holds state for every parameter (else its lazy set-up, which
            zeroes the moments, would be captured and replayed every step).

    Example::

        step = GraphedTrainStep(gen, opt, lambda m, c, y: m.loss(c, y), (codes, labels),
                                max_grad_norm=1.0, amp_dtype=torch.bfloat16)
        loss, norm = step.forward_backward(codes, labels)   # device tensors
        step.optimizer_step()
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[..., Tensor],
        example_inputs: tuple,
        *,
        max_grad_norm: Optional[float] = 1.0,
        amp_dtype: Optional[torch.dtype] = torch.bfloat16,
        warmup: int = 3,
    ):
        if not example_inputs or not all(isinstance(t, Tensor) and t.is_cuda for t in example_inputs):
            raise ValueError("GraphedTrainStep needs CUDA tensors as example_inputs")
        for group in optimizer.param_groups:
            if not group.get("capturable", False):
                raise ValueError("GraphedTrainStep needs a capturable optimizer (e.g. AdamW(..., capturable=True))")
        if warmup == 0 and any(not optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("GraphedTrainStep(warmup=0) needs an optimizer that has already stepped: its first "
                             "step's state set-up must not be captured")
        self.model, self.optimizer = model, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.inputs = tuple(t.clone() for t in example_inputs)
        device = self.inputs[0].device

        def forward_backward():
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = loss_fn(model, *self.inputs)
            loss.backward()
            limit = float("inf") if max_grad_norm is None else max_grad_norm  # inf: measure, never scale
            return loss.detach(), torch.nn.utils.clip_grad_norm_(self.params, limit, foreach=True)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                optimizer.zero_grad(set_to_none=True)
                forward_backward()
                optimizer.step()
        torch.cuda.current_stream(device).wait_stream(side)
        optimizer.zero_grad(set_to_none=True)  # grads are then allocated inside the graph's pool
        for p in self.params:  # also those outside the optimizer: no warm-up gradient may linger
            p.grad = None
        self._fwd_bwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._fwd_bwd):
            self.loss, self.grad_norm = forward_backward()
        self._opt = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._opt, pool=self._fwd_bwd.pool()):
            optimizer.step()
        torch.cuda.synchronize(device)

    def forward_backward(self, *inputs: Tensor):
        """Copy ``inputs`` into the static buffers and replay forward, backward and clipping.

        Returns:
            ``(loss, grad_norm)``: static () device tensors, overwritten by the next call.
        """
        if len(inputs) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} inputs, got {len(inputs)}")
        for buf, t in zip(self.inputs, inputs):
            if t.shape != buf.shape:
                raise ValueError(f"a captured step has fixed input shapes: got {tuple(t.shape)}, "
                                 f"captured {tuple(buf.shape)}")
            buf.copy_(t, non_blocking=True)
        self._fwd_bwd.replay()
        return self.loss, self.grad_norm

    def optimizer_step(self) -> None:
        """Replay the optimizer update (reads the gradients the last forward_backward wrote)."""
        self._opt.replay()

    def __call__(self, *inputs: Tensor) -> Tensor:
        """One whole training step; returns the loss (device tensor)."""
        loss, _ = self.forward_backward(*inputs)
        self.optimizer_step()
        return loss
