"""Each sublayer of a training forward replayed from a pair of CUDA graphs (forward, backward).

The eager training step is bound by its host: mamba-ssm's split scan alone dispatches ~500
Triton launches per AiM-B step through its autotuner (benchmarks/notes.md, 2026-12-03). Where
the whole step cannot be captured (several processes: DDP's all-reduce; fp16's loss scaler),
:class:`GraphedSublayers` captures each sublayer module (a Mamba2 mixer, an attention, an MLP:
:meth:`aimkit.backbones.base.Backbone.sublayer_modules`): its forward becomes one graph launch
and its backward another, inside one autograd node. Everything else stays eager: the glue
between sublayers, the embedding and conditioning, the head and the loss, DDP's gradient
all-reduce (hooks that fire as autograd accumulates each parameter's gradient, after the node
that produced it), clipping, the optimizer.

Life cycle: :meth:`GraphedSublayers.record` watches one eager forward and notes each module's
input (shape, dtype, device, ``requires_grad``, the CUDA autocast dtype); :meth:`capture` then
captures every module for that input and installs a forward (:class:`GraphedForward`) that
replays the graphs for a call like the recorded one and runs the module's own forward for any
other (a cache, no grad, eval mode, another shape or autocast): no input is copied into a buffer
of another shape.

Why not ``torch.cuda.make_graphed_callables``: it differentiates the captured backward with
respect to the parameters themselves, so their gradient-accumulator nodes take part in the
capture; a node created on another stream (DDP creates one per parameter when it wraps the
model, and keeps it) makes autograd order the capturing stream against that stream, which
invalidates the capture (measured: the DDP test and AiM-L failed with
``cudaErrorStreamCaptureInvalidated``). Here the captured passes see each parameter through a
detached alias (same storage, so optimizer updates are seen), and the real parameters meet
autograd only when a replay hands back their gradients, on the training stream. The sample input
is random and the capture touches no weight and no ``.grad``; the CUDA RNG state is put back.

Two contracts the caller keeps (:class:`aimkit.training.step.LayerGraphedStep` does):

* a micro-batch's backward runs before the next forward replays the same graphs (the saved
  activations, the outputs and the input gradients live in the graphs' static buffers);
* every trainable parameter keeps an allocated ``.grad``, zeroed in place between steps: autograd
  then adds a replay's gradients into it. (Into an undefined ``.grad`` autograd would install the
  handed-back buffer itself, which the next replay overwrites: pytorch/pytorch#181723. A replay
  therefore hands back a copy for a parameter whose ``.grad`` is None.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

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
                 spec: CallSpec, busy: Callable[[], bool] = lambda: False):
        self.module, self.graphed, self.eager, self.spec, self.busy = module, graphed, eager, spec, busy
        self.replays = 0  # calls served by the graph (tests and benchmarks read it)

    def matches(self, x: Tensor, args: tuple, kwargs: dict) -> bool:
        """Whether this call replays the graph. ``busy()``: the previous replay's backward has not
        run yet (a second forward before it would overwrite the buffers that backward reads)."""
        plain = not args and all(v is None for v in kwargs.values())  # inference_params=None and the like
        return (plain and isinstance(x, Tensor) and self.module.training and torch.is_grad_enabled()
                and CallSpec.of(x) == self.spec and not self.busy())

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.matches(x, args, kwargs):
            self.replays += 1
            return self.graphed(x)
        return self.eager(x, *args, **kwargs)


class ModuleGraphs:
    """The forward and backward CUDA graphs of one module for one input :class:`CallSpec`.

    The captured passes run the module on detached aliases of its parameters (same storage), so
    the parameters' own autograd nodes stay out of the capture (module docstring)."""

    def __init__(self, module: nn.Module, spec: CallSpec):
        self.module, self.spec = module, spec
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.aliases = {name: p.detach().requires_grad_(p.requires_grad) for name, p in module.named_parameters()}
        self.alias_list = [a for a in self.aliases.values() if a.requires_grad]
        self.storage = [p.data_ptr() for p in module.parameters()]  # what the graphs read
        self.x = torch.randn(spec.shape, dtype=spec.dtype, device=spec.device).requires_grad_(spec.requires_grad)
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        self.out = self.grad_out = None
        self.grads: list[Tensor | None] = []
        self.pending = False  # a replayed forward whose backward has not run yet (its buffers are in use)

    def run(self) -> Tensor:
        return functional_call(self.module, self.aliases, (self.x,))

    def wrt(self) -> list[Tensor]:
        """What the backward differentiates: the input (if it requires grad), then the aliases."""
        return ([self.x] if self.spec.requires_grad else []) + self.alias_list

    def warm_up(self, autocast) -> None:
        """One forward and backward outside any capture. Nothing of it may outlive the call: a
        gradient node created here, on the warm-up stream, and reused by the capture would make
        autograd order the capturing stream against the warm-up stream."""
        with autocast:
            out = self.run()
        torch.autograd.grad(out, self.wrt(), torch.ones_like(out), allow_unused=True)

    def capture_forward(self, pool) -> None:
        with torch.cuda.graph(self.fwd, pool=pool):
            self.out = self.run()
        if not isinstance(self.out, Tensor) or not self.out.requires_grad:
            raise RuntimeError(f"{type(self.module).__name__} must return one tensor that requires grad to be graphed")
        self.grad_out = torch.empty_like(self.out)

    def capture_backward(self, pool) -> None:
        with torch.cuda.graph(self.bwd, pool=pool):
            self.grads = list(torch.autograd.grad(self.out, self.wrt(), self.grad_out, allow_unused=True))

    def replay(self, x: Tensor) -> Tensor:
        """The module's output for ``x`` (of the captured spec), differentiable in ``x`` and the parameters."""
        if [p.data_ptr() for p in self.module.parameters()] != self.storage:
            raise RuntimeError(f"a parameter of {type(self.module).__name__} was replaced after its CUDA graphs were "
                               "captured (the graphs read the old storage); update parameters in place")
        return _Replay.apply(self, x, *self.params)


class _Replay(torch.autograd.Function):
    """One autograd node around a :class:`ModuleGraphs`: forward and backward are graph replays."""

    @staticmethod
    def forward(ctx, graphs: ModuleGraphs, x: Tensor, *params: Tensor) -> Tensor:
        ctx.graphs = graphs
        if graphs.x.data_ptr() != x.data_ptr():
            graphs.x.copy_(x)
        graphs.fwd.replay()
        graphs.pending = True
        return graphs.out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        graphs = ctx.graphs
        graphs.grad_out.copy_(grad_out)
        graphs.bwd.replay()
        graphs.pending = False
        grads = graphs.grads
        grad_x = None
        if graphs.spec.requires_grad:
            grad_x, grads = grads[0], grads[1:]
            grad_x = None if grad_x is None else grad_x.detach()
        # a parameter without a .grad would adopt the static buffer itself (module docstring): copy for it
        param_grads = [None if g is None else g.detach() if p.grad is not None else g.clone()
                       for p, g in zip(graphs.params, grads)]
        return (None, grad_x, *param_grads)


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
        self.graphs: list[ModuleGraphs] = []

    @staticmethod
    def check_modules(modules: Sequence[nn.Module]) -> None:
        """Raise a ValueError unless every parameter of ``modules`` is on a CUDA device."""
        if not all(p.is_cuda for m in modules for p in m.parameters()):
            raise ValueError("layer graphs need the sublayers' parameters on a CUDA device")

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
        """Capture every module for its recorded input and install :class:`GraphedForward`.

        All forward graphs first in forward order, then the backward graphs in reverse, into one
        memory pool: the order the replays run in, so no replay overwrites memory another still needs."""
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
        with torch.cuda.device(device):
            rng = torch.cuda.get_rng_state(device)
            try:
                graphs = self._capture(specs, device, amp)
            finally:  # the sample inputs drew from it
                torch.cuda.set_rng_state(rng, device)
        for g in graphs:
            forward = GraphedForward(g.module, g.replay, g.module.forward, g.spec, busy=lambda g=g: g.pending)
            g.module.forward = forward
            self.forwards.append(forward)
        self.graphs = graphs

    def _capture(self, specs: list[CallSpec], device: torch.device, amp: torch.dtype | None) -> list[ModuleGraphs]:
        graphs = [ModuleGraphs(m, spec) for m, spec in zip(self.modules, specs)]
        autocast = torch.autocast("cuda", dtype=amp or torch.bfloat16, enabled=amp is not None, cache_enabled=False)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # lazy initialisation and allocator warm-up outside the capture
            for g in graphs:
                for _ in range(self.warmup):
                    g.warm_up(autocast)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        pool = torch.cuda.graph_pool_handle()
        for g in graphs:
            with autocast:
                g.capture_forward(pool)
        for g in reversed(graphs):
            g.capture_backward(pool)  # outside autocast, as the eager step's backward runs
        torch.cuda.synchronize(device)
        return graphs

    def remove(self) -> None:
        """Put every module's own forward back (the graphs are dropped with this object)."""
        for module in self.modules:
            module.__dict__.pop("forward", None)
        self.forwards, self.graphs = [], []

    def reset(self) -> None:
        """Forget replays whose backward never ran (their output was dropped): the next forward
        may replay again. For the start of a training step, when no such output is alive."""
        for g in self.graphs:
            g.pending = False

    def missing_grads(self) -> list[Tensor]:
        """Every trainable parameter of a graphed module that the captured backward gives no
        gradient: unused by the module, or read other than through its attributes."""
        return [p for g in self.graphs
                for p, grad in zip(g.params, g.grads[1 if g.spec.requires_grad else 0:]) if grad is None]
