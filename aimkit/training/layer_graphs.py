"""Each sublayer of a training forward replayed from a pair of CUDA graphs (forward, backward).

The eager training step is bound by its host: mamba-ssm's split scan alone dispatches ~500
Triton launches per AiM-B step through its autotuner (benchmarks/notes.md, 2026-12-03). Where
the whole step cannot be captured (several processes: DDP's all-reduce; fp16's loss scaler),
:class:`GraphedSublayers` captures each sublayer module (a Mamba2 mixer, an attention, an MLP:
:meth:`aimkit.backbones.base.Backbone.sublayer_modules`) with
``torch.cuda.make_graphed_callables``: its forward becomes one graph launch and its backward
another, inside one autograd node. Everything else stays eager: the glue between sublayers, the
embedding and conditioning, the head and the loss, DDP's gradient all-reduce (hooks that fire as
autograd accumulates each parameter's gradient, after the graph that produced it), clipping, the
optimizer.

Life cycle: :meth:`GraphedSublayers.record` watches one eager forward and notes each module's
input (shape, dtype, device, ``requires_grad``, the CUDA autocast dtype); :meth:`capture` then
captures every module for that input (warm-up on random inputs of a side stream, which touches
no weight and no ``.grad``; the CUDA RNG state is put back) and installs a forward that replays
the graph for a call like the recorded one and runs the module's own forward for any other (a
cache, no grad, eval mode, another shape or autocast): no input is copied into a buffer of
another shape.

Two contracts the caller keeps (:class:`aimkit.training.step.LayerGraphedStep` does):

* the micro-batch's backward runs before the next forward replays the same graphs (the saved
  activations and the returned outputs live in the graphs' static buffers);
* every trainable parameter keeps an allocated ``.grad``, zeroed in place between steps, never
  set to None: the graphed backward hands autograd its static gradient buffers, and into an
  undefined ``.grad`` autograd would install that buffer itself, which the next micro-batch's
  replay overwrites, silently doubling it under gradient accumulation (pytorch/pytorch#181723).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["GraphedSublayers"]


@dataclass(frozen=True)
class CallSpec:
    """What a graph was captured for: one input tensor's metadata and the CUDA autocast dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool
    autocast: torch.dtype | None  # None: autocast off

    @classmethod
    def of(cls, x: Tensor) -> CallSpec:
        amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        return cls(tuple(x.shape), x.dtype, x.device, x.requires_grad, amp)


class GraphedForward:
    """The forward installed on a captured module: the graph for a call like the captured one
    (one tensor, no cache, training mode, grad enabled, same :class:`CallSpec`), else the
    module's own forward."""

    def __init__(self, module: nn.Module, graphed: Callable[[Tensor], Tensor], eager: Callable[..., Tensor],
                 spec: CallSpec):
        self.module, self.graphed, self.eager, self.spec = module, graphed, eager, spec
        self.replays = 0  # calls served by the graph (tests and benchmarks read it)

    def matches(self, x: Tensor, args: tuple, kwargs: dict) -> bool:
        plain = not args and all(v is None for v in kwargs.values())  # inference_params=None and the like
        return (plain and isinstance(x, Tensor) and self.module.training and torch.is_grad_enabled()
                and CallSpec.of(x) == self.spec)

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.matches(x, args, kwargs):
            self.replays += 1
            return self.graphed(x)
        return self.eager(x, *args, **kwargs)


class GraphedSublayers:
    """CUDA graphs for the forward and backward of each module in ``modules`` (see the module
    docstring).

    Args:
        modules: the sublayer modules in the order a forward runs them, each ``(B, L, D) -> (B, L, D)``.
        warmup: forward + backward passes on random inputs before capture (lazy initialisation,
            autotuning); ``make_graphed_callables``'s ``num_warmup_iters``.
    """

    def __init__(self, modules: Sequence[nn.Module], warmup: int = 3):
        if not modules:
            raise ValueError("GraphedSublayers needs at least one module")
        if warmup < 1:
            raise ValueError(f"GraphedSublayers needs warmup >= 1, got {warmup}")
        self.modules, self.warmup = list(modules), warmup
        self.specs: list[CallSpec | None] = [None] * len(self.modules)
        self.forwards: list[GraphedForward] = []

    @property
    def recorded(self) -> bool:
        return all(spec is not None for spec in self.specs)

    @property
    def captured(self) -> bool:
        return bool(self.forwards)

    def __repr__(self) -> str:
        state = "captured" if self.captured else "recorded" if self.recorded else "not recorded"
        return f"GraphedSublayers({len(self.modules)} modules, {state})"

    @contextmanager
    def record(self) -> Iterator[None]:
        """Note each module's first input while the block runs (forward pre-hooks, removed after)."""

        def hook(i: int):
            def note(_module, args):
                if self.specs[i] is None and args and isinstance(args[0], Tensor):
                    self.specs[i] = CallSpec.of(args[0])
            return note

        handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(self.modules)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def capture(self) -> None:
        """Capture every module for its recorded input and install :class:`GraphedForward`."""
        if self.captured:
            raise RuntimeError("GraphedSublayers are captured already")
        missing = [i for i, spec in enumerate(self.specs) if spec is None]
        if missing:
            raise RuntimeError(f"sublayer module(s) {missing} did not run in the recorded forward: nothing to capture")
        specs = [spec for spec in self.specs if spec is not None]
        if len({(s.device, s.autocast) for s in specs}) != 1:
            raise RuntimeError("the recorded sublayers ran on several devices or under several autocast dtypes")
        device, amp = specs[0].device, specs[0].autocast
        if device.type != "cuda":
            raise ValueError(f"GraphedSublayers needs CUDA modules, the recorded inputs are on {device}")
        rng = torch.cuda.get_rng_state(device)
        samples = tuple((torch.randn(s.shape, dtype=s.dtype, device=device).requires_grad_(s.requires_grad),)
                        for s in specs)
        with torch.autocast("cuda", dtype=amp or torch.bfloat16, enabled=amp is not None, cache_enabled=False):
            torch.cuda.make_graphed_callables(tuple(self.modules), samples, num_warmup_iters=self.warmup)
        torch.cuda.set_rng_state(rng, device)
        for module, spec in zip(self.modules, specs):
            graphed = module.__dict__.pop("forward")  # make_graphed_callables' replacement
            forward = GraphedForward(module, graphed, module.forward, spec)  # module.forward: the class's again
            module.forward = forward
            self.forwards.append(forward)

    def remove(self) -> None:
        """Put every module's own forward back (the graphs are dropped with this object)."""
        for module in self.modules:
            module.__dict__.pop("forward", None)
        self.forwards = []
