"""One training step for every caller: the trainer, the benchmarks and the tests run this code.

A step is teacher-forced forward -> float32 cross-entropy -> backward (averaged over the
micro-batches) -> global grad-norm clip -> optimizer update. It comes in two halves because a
training loop looks between them: :meth:`TrainStep.forward_backward` returns the loss and the
gradient norm (device tensors), the loop decides whether the update is applied (a non-finite
loss or norm is skipped), :meth:`TrainStep.finish` applies it or not. ``step(inputs, labels)``
runs both halves, for benchmarks.

Three strategies, picked by the execution policy's ``train_step`` (:func:`make_train_step`):

* :class:`EagerStep`: plain PyTorch (through HF accelerate when the trainer passes its
  accelerator: DDP gradient sync, loss scaling, several micro-batches);
* :class:`LayerGraphedStep`: the eager step with each sublayer (Mamba2 mixer, attention, MLP)
  replayed from a forward and a backward CUDA graph (:mod:`aimkit.training.layer_graphs`): what
  ``train_step: auto`` runs where the whole step cannot be captured (several processes, fp16);
* :class:`GraphedStep`: forward + backward + clip and the optimizer update, each replayed from
  one CUDA graph (two graphs, one memory pool): the host launches a step with two calls instead
  of thousands of small kernels (with ``grad_accum`` N: three graphs, N + 2 calls). One CUDA
  process, micro-batches of fixed shape, a capturable optimizer
  (:func:`aimkit.training.optim.make_optimizer` with ``capturable=True``), no host sync inside
  the model. With ``grad_accum`` N > 1 the forward + backward graph of one
  micro-batch adds its gradients into static buffers and is replayed N times, then one graph
  clips (and averages the loss) before the optimizer graph. The graphs are captured on the first
  call; the warm-up step capture needs is undone (weights, optimizer state and RNG restored), so
  a graphed run starts, and resumes, exactly where an eager one would.

Either strategy takes an optional :class:`~aimkit.training.ema.EMA`: its fused update runs right
after every applied optimizer update (eagerly, or captured in the optimizer graph and replayed
with it), never after a skipped one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..generator import token_cross_entropy
from ..policy import ExecutionPolicy
from .ema import EMA

__all__ = ["EagerStep", "GraphedStep", "LayerGraphedStep", "TrainStep", "check_graph_step", "check_layer_graphs",
           "make_train_step", "resolve_train_step", "resolved_policy", "step_policy"]

Batch = tuple[Tensor, Tensor]  # (codes (B, N) int64, labels (B,) int64)
STEP_KINDS = ("graph", "layer_graphs", "eager")  # what train_step resolves to (policy's "auto" is not one)


class TrainStep:
    """The interface of a training step (see the module docstring).

    Args of every strategy: the model (``model(codes, labels) -> (B, N, V) logits``), its
    optimizer, ``max_grad_norm`` (None or inf: measure the norm, never scale), ``amp_dtype``
    (autocast dtype or None), ``compile_loss`` (the policy's choice for the cross-entropy) and
    ``ema`` (an :class:`~aimkit.training.ema.EMA` updated after every applied update, or None).
    """

    def forward_backward(self, batches: Sequence[Batch]) -> tuple[Tensor, Tensor]:
        """Gradients of the mean loss over ``batches`` (the micro-batches of one step), clipped.

        Returns:
            ``(loss, grad_norm)``: () float32 device tensors, the mean loss and the global
            gradient norm before clipping.
        """
        raise NotImplementedError

    def finish(self, update: bool = True) -> None:
        """Apply the optimizer update to the gradients of the last :meth:`forward_backward`
        (``update=False``: skip it) and get ready for the next step."""
        raise NotImplementedError

    def __call__(self, inputs: Tensor, labels: Tensor) -> Tensor:
        """One whole step on one batch (codes (B, N), labels (B,)); returns the () loss tensor."""
        loss, _ = self.forward_backward([(inputs, labels)])
        self.finish(update=True)
        return loss


def _limit(max_grad_norm: float | None) -> float:
    return math.inf if max_grad_norm is None else float(max_grad_norm)  # inf: measure only


def _batch_loss(model: nn.Module, inputs: Tensor, labels: Tensor, amp_dtype, compile_loss: bool) -> Tensor:
    """The () float32 loss of one micro-batch. The cross-entropy runs inside the autocast region
    too (it computes in float32 either way), as the step measured fastest did (docs/benchmarks.md)."""
    with torch.autocast(inputs.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(inputs, labels)  # (B, N, V)
        return token_cross_entropy(logits, inputs, compiled=compile_loss)


class _NoAccelerator:
    """What :class:`EagerStep` needs of an HF accelerator, for callers without one."""

    @staticmethod
    def no_sync(model):
        return nullcontext()

    @staticmethod
    def backward(loss: Tensor) -> None:
        loss.backward()

    @staticmethod
    def clip_grad_norm_(parameters, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


class EagerStep(TrainStep):
    """The step in plain PyTorch; any number of micro-batches.

    Args:
        accelerator: the trainer's ``accelerate.Accelerator`` (the model and optimizer prepared
            by it: it syncs DDP gradients on the last micro-batch only, scales fp16 losses and
            autocasts, so ``amp_dtype`` is then None); None for a plain model.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, max_grad_norm: float | None = 1.0,
                 amp_dtype: torch.dtype | None = None, compile_loss: bool = True, accelerator=None,
                 ema: EMA | None = None):
        self.model, self.optimizer, self.ema = model, optimizer, ema
        self.max_norm, self.amp_dtype, self.compile_loss = _limit(max_grad_norm), amp_dtype, compile_loss
        self.acc = accelerator if accelerator is not None else _NoAccelerator()

    def forward_backward(self, batches: Sequence[Batch]) -> tuple[Tensor, Tensor]:
        n = len(batches)
        loss_sum = torch.zeros((), device=batches[0][0].device)
        for i, (inputs, labels) in enumerate(batches):
            with self.acc.no_sync(self.model) if i < n - 1 else nullcontext():
                loss = _batch_loss(self.model, inputs, labels, self.amp_dtype, self.compile_loss)
                self.acc.backward(loss / n)
            loss_sum += loss.detach()
        grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), self.max_norm)
        return loss_sum / n, grad_norm

    def finish(self, update: bool = True) -> None:
        if update:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
        else:
            scaler = getattr(self.acc, "scaler", None)  # fp16: the loss scaler unscaled this step's gradients
            if scaler is not None and scaler.is_enabled():
                scaler.update()  # close the step (the next unscale_ would refuse) and back the scale off
        self._clear_grads()

    def _clear_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class LayerGraphedStep(EagerStep):
    """:class:`EagerStep` with each sublayer module's forward and backward replayed from CUDA graphs.

    The first step runs eagerly and records each sublayer's input; the second captures the
    sublayers for it (:class:`~aimkit.training.layer_graphs.GraphedSublayers`) and from then on a
    sublayer costs two launches per micro-batch instead of hundreds. A micro-batch of another
    shape runs those sublayers eagerly. The same kernels run as in the eager step, so the
    numbers are the eager step's. From the capture on, the ``.grad`` of every parameter the
    eager step trained stays allocated and is zeroed in place after each step (the contract of
    :mod:`~aimkit.training.layer_graphs`), so ``optimizer.zero_grad`` is not what clears them;
    parameters without a gradient keep none (AdamW then leaves them alone, as in the eager step).

    Args (besides :class:`EagerStep`'s):
        sublayers: the modules to graph, in forward order
            (:meth:`~aimkit.backbones.base.Backbone.sublayer_modules`); CUDA, not compiled.
        warmup: forward + backward passes per module on random inputs before its capture.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, sublayers: Sequence[nn.Module],
                 warmup: int = 3, **eager):
        from .layer_graphs import GraphedSublayers

        super().__init__(model, optimizer, **eager)
        GraphedSublayers.check_modules(sublayers)
        self.graphs = GraphedSublayers(sublayers, warmup=warmup)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.trained: set[int] = set()  # ids of the parameters the recorded eager step gave a gradient

    def __repr__(self) -> str:
        return f"LayerGraphedStep({self.graphs!r})"

    def forward_backward(self, batches: Sequence[Batch]) -> tuple[Tensor, Tensor]:
        if self.graphs.captured:
            self.graphs.reset()  # no replay of an earlier step still waits for its backward
            return super().forward_backward(batches)
        if self.graphs.recorded:  # the second step: capture, then run it through the graphs
            self._capture()
            return super().forward_backward(batches)
        with self.graphs.record():  # the first step: eager, noting each sublayer's input
            result = super().forward_backward(batches)
        self.trained = {id(p) for p in self.params if p.grad is not None}  # what the eager step gave gradients
        return result

    def _capture(self) -> None:
        """Capture the sublayers; from now on autograd adds into the ``.grad`` of every parameter
        the eager step gave a gradient (allocated here, never a graph's buffer), and the others
        keep none, as in the eager step."""
        self.graphs.capture()
        lost = [p for p in self.graphs.missing_grads() if id(p) in self.trained]
        if lost:
            names = [name for name, p in self.model.named_parameters() if any(p is q for q in lost)]
            self.graphs.remove()
            raise RuntimeError(f"the captured sublayers give no gradient to {names}, which the eager step trains "
                               "(a parameter read other than as a module attribute?); use policy train_step: eager")
        for p in self.params:
            if p.grad is None and id(p) in self.trained:
                p.grad = torch.zeros_like(p)

    def _clear_grads(self) -> None:
        if self.graphs.captured:
            torch._foreach_zero_([p.grad for p in self.params if p.grad is not None])
        else:
            super()._clear_grads()


class GraphedStep(TrainStep):
    """The step replayed from CUDA graphs (see the module docstring); ``grad_accum`` micro-batches per step.

    Args:
        warmup: eager steps run before capture (on a side stream: autotuning, the optimizer's
            state allocated outside the graphs), then undone. At least 1.
        grad_accum: micro-batches per step (each of the captured shape).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, max_grad_norm: float | None = 1.0,
                 amp_dtype: torch.dtype | None = torch.bfloat16, compile_loss: bool = True, warmup: int = 1,
                 ema: EMA | None = None, grad_accum: int = 1):
        optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside accelerate's wrapper
        if not _capturable(optimizer):
            raise ValueError("GraphedStep needs a capturable optimizer (make_optimizer(..., capturable=True))")
        if warmup < 1:
            raise ValueError(f"GraphedStep needs at least one warm-up step, got warmup={warmup}")
        if grad_accum < 1:
            raise ValueError(f"GraphedStep needs grad_accum >= 1, got {grad_accum}")
        self.model, self.optimizer, self.warmup, self.ema = model, optimizer, warmup, ema
        self.accum = grad_accum
        self.max_norm, self.amp_dtype, self.compile_loss = _limit(max_grad_norm), amp_dtype, compile_loss
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.inputs: list[Tensor] | None = None  # the static input buffers, set by the capture
        self.loss = self.grad_norm = None  # the static outputs of the forward-backward graph

    def forward_backward(self, batches: Sequence[Batch]) -> tuple[Tensor, Tensor]:
        if len(batches) != self.accum:
            raise ValueError(f"this captured step takes {self.accum} micro-batch(es) per step (grad_accum), "
                             f"got {len(batches)}")
        if self.inputs is None:
            self._capture(batches[0])
        for batch in batches:  # every shape first: a bad micro-batch must not leave half-summed gradients
            for buf, t in zip(self.inputs, batch):
                if t.shape != buf.shape:
                    raise ValueError(f"a captured step has fixed input shapes: got {tuple(t.shape)}, "
                                     f"captured {tuple(buf.shape)}")
        for batch in batches:
            for buf, t in zip(self.inputs, batch):
                buf.copy_(t, non_blocking=True)
            self._fwd_bwd.replay()  # with grad_accum > 1: adds into the gradient buffers
        if self.accum > 1:
            self._reduce.replay()  # the global norm, the clip and the mean loss
        # loss and grad_norm are static outputs: the next step's replay overwrites them, so a caller
        # reads them (the trainer: .item()) before it calls forward_backward again
        return self.loss, self.grad_norm

    def finish(self, update: bool = True) -> None:
        if update:  # with one micro-batch the next replay overwrites the gradients the graph wrote
            self._opt.replay()  # the optimizer update, then the EMA's (captured with it)
        if self.accum > 1:  # the accumulators start the next step at zero
            torch._foreach_zero_([p.grad for p in self.params])
            self._loss_sum.zero_()

    # ------------------------------------------------------------------------- capture

    def _forward_backward(self) -> tuple[Tensor, Tensor]:
        loss = _batch_loss(self.model, *self.inputs, self.amp_dtype, self.compile_loss)
        loss.backward()
        return loss.detach(), self._clip()

    def _clip(self) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)

    def _accumulate(self) -> None:
        """One micro-batch's share: gradients of ``loss / grad_accum`` added into the existing
        ``.grad`` buffers (backward runs without grad mode, so autograd adds into a defined
        gradient in place: the buffers' addresses stay those the other graphs read)."""
        loss = _batch_loss(self.model, *self.inputs, self.amp_dtype, self.compile_loss)
        (loss / self.accum).backward()
        self._loss_sum.add_(loss.detach())

    def _capture_accumulating(self, device: torch.device) -> None:
        """The graphs of ``grad_accum > 1``: accumulate (per micro-batch), reduce, update."""
        for p in self.params:  # static accumulators, allocated outside the graphs' pool
            p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        self._loss_sum = torch.zeros((), device=device)
        self._fwd_bwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._fwd_bwd):
            self._accumulate()
        if any(p.grad is not buf for p, buf in zip(self.params, grads)):
            raise RuntimeError("the captured backward replaced a gradient buffer instead of adding into it")
        self._reduce = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._reduce, pool=self._fwd_bwd.pool()):
            self.grad_norm = self._clip()
            self.loss = self._loss_sum / self.accum

    def _capture(self, batch: Batch) -> None:
        if not all(isinstance(t, Tensor) and t.is_cuda for t in batch):
            raise ValueError("GraphedStep needs CUDA tensors")
        device = batch[0].device
        for group in self.optimizer.param_groups:  # a captured update reads the lr from a device tensor
            group["lr"] = torch.as_tensor(group["lr"], device=device)
        saved = _Snapshot(self.optimizer, device)
        self.inputs = [t.clone() for t in batch]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.optimizer.zero_grad(set_to_none=True)
                self._forward_backward()
                self.optimizer.step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)  # grads are then allocated inside the graph's pool
        for p in self.params:  # also those outside the optimizer: no warm-up gradient may linger
            p.grad = None
        if self.accum > 1:
            self._capture_accumulating(device)
        else:
            self._fwd_bwd = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._fwd_bwd):
                self.loss, self.grad_norm = self._forward_backward()
        self._opt = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._opt, pool=self._fwd_bwd.pool()):
            self.optimizer.step()
            if self.ema is not None:  # the warm-up never touched the average: nothing to undo
                self.ema.update()
        torch.cuda.synchronize(device)
        saved.restore()
        if self.accum > 1:  # capture ran no kernel, but be explicit: every step starts from zero
            torch._foreach_zero_([p.grad for p in self.params])
            self._loss_sum.zero_()


class _Snapshot:
    """Weights, optimizer state and RNG before capture, put back in place afterwards (the
    warm-up steps become as if they never ran; state that did not exist yet becomes zeros)."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.optimizer, self.device = optimizer, device
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        # Held in host memory: a device copy would add the weights' size to the capture's peak
        # (0.6 GB for AiM-B, measured against the step before the snapshot existed).
        self.values = [p.detach().to("cpu", copy=True) for p in self.params]
        self.state: dict[Tensor, dict[str, Tensor]] = {
            p: {k: v.to("cpu", copy=True) for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
            for p in self.params if p in optimizer.state}
        self.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device))

    @torch.no_grad()
    def restore(self) -> None:
        for p, value in zip(self.params, self.values):
            p.copy_(value)
        for p in self.params:
            old = self.state.get(p, {})
            for k, v in self.optimizer.state.get(p, {}).items():
                if torch.is_tensor(v):
                    v.copy_(old[k]) if k in old else v.zero_()
        torch.set_rng_state(self.rng[0])
        torch.cuda.set_rng_state(self.rng[1], self.device)


def _sharded(distributed: str) -> str | None:
    """The problem with accelerate's ``distributed_type`` for a graphed step, or None: FSDP and
    DeepSpeed gather and free parameters around each use, which a graph cannot follow."""
    kind = str(getattr(distributed, "value", distributed)).lower()
    return None if kind in ("no", "multi_gpu") else f"plain DDP or one process (this run uses {kind})"


def check_graph_step(device: torch.device, *, processes: int = 1, mixed_precision: str = "no",
                     compiled: bool = False, distributed: str = "no") -> None:
    """Raise a ConfigError naming everything that rules out ``policy.train_step: graph`` for a run
    (gradient accumulation does not: the captured step replays one micro-batch's graph N times)."""
    problems = _common_problems(device, compiled, distributed)
    if processes > 1:
        problems.append(f"a single process (this run has {processes})")
    if mixed_precision == "fp16":
        problems.append("mixed_precision bf16 or no (fp16's loss scaler decides on the host)")
    _refuse("graph", problems)


def check_layer_graphs(device: torch.device, *, compiled: bool = False, distributed: str = "no",
                       **_run: object) -> None:
    """Raise a ConfigError naming everything that rules out ``policy.train_step: layer_graphs``
    for a run (several processes under DDP, fp16 and gradient accumulation do not)."""
    _refuse("layer_graphs", _common_problems(device, compiled, distributed))


def _common_problems(device: torch.device, compiled: bool, distributed: str) -> list[str]:
    """What rules out either graphed step: no CUDA device, a compiled model, sharded parameters."""
    problems = [] if device.type == "cuda" else [f"a CUDA device (this run is on {device.type})"]
    if compiled:
        problems.append("compile: false")
    if _sharded(distributed):
        problems.append(_sharded(distributed))
    return problems


def _refuse(kind: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"policy train_step: {kind} needs " + ", ".join(problems))


def _needs(exc: ConfigError) -> str:
    return str(exc).split(" needs ", 1)[1]


def resolve_train_step(policy: ExecutionPolicy, device: torch.device, **run: object) -> tuple[str, str]:
    """The step a run with ``policy`` takes: ``("graph" | "layer_graphs" | "eager", why)``.

    ``train_step: auto`` is ``graph`` wherever :func:`check_graph_step` allows it (``run``: its
    ``processes``, ``mixed_precision``, ``compiled``), else ``layer_graphs`` wherever
    :func:`check_layer_graphs` does, else ``eager``, each with the reason; an explicit ``graph``
    or ``layer_graphs`` that the run rules out raises its ConfigError."""
    if policy.train_step == "eager":
        return "eager", "policy train_step: eager"
    if policy.train_step == "layer_graphs":
        check_layer_graphs(device, **run)
        return "layer_graphs", "policy train_step: layer_graphs"
    try:
        check_graph_step(device, **run)
    except ConfigError as exc:
        if policy.train_step == "graph":
            raise
        whole = _needs(exc)
        try:
            check_layer_graphs(device, **run)
        except ConfigError as layer_exc:
            return "eager", (f"train_step auto: eager, since the captured step needs {whole} and the "
                             f"layer-graphed step needs {_needs(layer_exc)}")
        return "layer_graphs", f"train_step auto: layer_graphs, since the captured step needs {whole}"
    return "graph", f"policy train_step: {policy.train_step} (one CUDA process: captured step)"


def step_policy(policy: ExecutionPolicy, kind: str) -> ExecutionPolicy:
    """The policy a run whose step resolved to ``kind`` (``"graph"`` / ``"layer_graphs"`` /
    ``"eager"``) runs and records.

    ``train_step`` becomes ``kind``. Where ``train_step: auto`` falls back to the eager step (a
    compiled model, a CPU), the glue between sublayers also runs uncompiled
    (``compile_glue`` false): the eager step waits on the host, and the compiled glue's guards and
    autograd wrappers cost more host time than its kernels save GPU time (one H200, 64 x 256 per
    step, same lease: AiM-B 182.8 -> 174.7 ms, AiM-L 379.0 -> 320.8 ms; benchmarks/notes.md,
    2026-12-03). The captured step keeps the compiled glue: no host time is spent inside a graph.
    An explicit ``train_step: eager`` keeps ``compile_glue`` as given."""
    if kind not in STEP_KINDS:
        raise ValueError(f"step kind must be one of {', '.join(map(repr, STEP_KINDS))}, got {kind!r}")
    changes: dict = {"train_step": kind}
    if policy.train_step == "auto" and kind == "eager":
        changes["compile_glue"] = False
    return policy.replace(**changes)


def resolved_policy(policy: ExecutionPolicy, device: torch.device, **run: object) -> tuple[ExecutionPolicy, str]:
    """``(the policy a run takes, why)``: :func:`resolve_train_step`'s step kind applied by
    :func:`step_policy`. What the trainer runs and records; a caller timing or reproducing the
    trainer's step resolves its policy here too."""
    kind, why = resolve_train_step(policy, device, **run)
    return step_policy(policy, kind), why


def _capturable(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter group of ``optimizer`` (or of the torch optimizer inside accelerate's
    wrapper) can be captured in a CUDA graph: what :class:`GraphedStep` requires."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return all(group.get("capturable", False) for group in optimizer.param_groups)


def _auto_step(model: nn.Module, optimizer: torch.optim.Optimizer, amp_dtype: torch.dtype | None,
               accelerator) -> str:
    """What ``train_step: auto`` runs for a step built by :func:`make_train_step`: the precision is
    ``amp_dtype``'s (what the captured step would autocast with), fp16 when the accelerator's is
    (its loss scaler rules the captured step out); a ``torch.compile``d model counts as compiled;
    the captured step also needs every parameter group of ``optimizer`` capturable (what
    :class:`GraphedStep` requires), else the layer-graphed step runs (it allows whatever the
    captured step does)."""
    device = next(model.parameters()).device
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "no"}.get(amp_dtype, "no")
    if accelerator is not None:
        accelerator_precision = getattr(accelerator, "mixed_precision", "no")
        if str(getattr(accelerator_precision, "value", accelerator_precision)) == "fp16":  # str or PrecisionType
            precision = "fp16"
    processes = accelerator.num_processes if accelerator is not None else 1
    distributed = getattr(accelerator, "distributed_type", "no") if accelerator is not None else "no"
    compiled = hasattr(model, "_orig_mod") or hasattr(getattr(model, "module", None), "_orig_mod")
    kind, _ = resolve_train_step(ExecutionPolicy(train_step="auto"), device, processes=processes,
                                 mixed_precision=precision, compiled=compiled, distributed=distributed)
    if kind == "graph" and not _capturable(optimizer):
        kind = "layer_graphs"
    if kind == "layer_graphs" and not _has_sublayers(model):
        kind = "eager"
    return kind


def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, policy: ExecutionPolicy, *,
                    max_grad_norm: float | None = 1.0, amp_dtype: torch.dtype | None = torch.bfloat16,
                    accelerator=None, graph_warmup: int = 1, ema: EMA | None = None,
                    grad_accum: int = 1) -> TrainStep:
    """The step ``policy.train_step`` names: :class:`GraphedStep` for ``"graph"``,
    :class:`LayerGraphedStep` for ``"layer_graphs"`` (the sublayers of ``model``'s backbone, found
    through DDP's ``module``), :class:`EagerStep` for ``"eager"``; ``"auto"`` resolves here
    (:func:`_auto_step`: the model's device, the accelerator's process count and fp16,
    ``amp_dtype``, a compiled model, a capturable optimizer).
    The model's own policy (``compile_glue`` included) is left as the caller built it; the trainer
    applies :func:`step_policy` to the model before calling this.

    Args:
        model: the generator (prepared by ``accelerator`` when one is given).
        optimizer: its optimizer; capturable for ``"graph"`` (:func:`~aimkit.training.optim.make_optimizer`).
        policy: the execution policy (``train_step``, ``compile_loss``).
        max_grad_norm: global grad-norm clip; None measures only.
        amp_dtype: autocast dtype, or None. With an accelerator the eager step leaves autocast to it.
        accelerator: the trainer's ``accelerate.Accelerator``, or None.
        graph_warmup: ``"graph"``: warm-up steps before capture (undone); ``"layer_graphs"``:
            forward + backward passes per sublayer on random inputs before its capture.
        ema: a moving average of the weights updated after every applied update, or None.
        grad_accum: micro-batches per step, for ``"graph"`` (the eager step takes any number).
    """
    if policy.train_step == "auto":
        policy = policy.replace(train_step=_auto_step(model, optimizer, amp_dtype, accelerator))
    common = dict(max_grad_norm=max_grad_norm, compile_loss=policy.compile_loss, ema=ema)
    if policy.train_step == "graph":
        return GraphedStep(model, optimizer, amp_dtype=amp_dtype, warmup=graph_warmup, grad_accum=grad_accum,
                           **common)
    eager_amp = None if accelerator is not None else amp_dtype
    if policy.train_step == "layer_graphs":
        return LayerGraphedStep(model, optimizer, sublayers=_sublayer_modules(model), warmup=graph_warmup,
                                amp_dtype=eager_amp, accelerator=accelerator, **common)
    return EagerStep(model, optimizer, amp_dtype=eager_amp, accelerator=accelerator, **common)


def _has_sublayers(model: nn.Module) -> bool:
    return hasattr(getattr(getattr(model, "module", model), "backbone", None), "sublayer_modules")


def _sublayer_modules(model: nn.Module) -> list[nn.Module]:
    """The sublayer modules of a generator's backbone (the generator itself or inside DDP's ``module``)."""
    inner = getattr(model, "module", model)
    if not _has_sublayers(model):
        raise ConfigError(f"policy train_step: layer_graphs needs a generator whose backbone lists its sublayer "
                          f"modules; got {type(inner).__name__}")
    return inner.backbone.sublayer_modules()
