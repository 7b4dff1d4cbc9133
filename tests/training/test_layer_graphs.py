"""The layer-graphed training step: each sublayer's forward and backward replayed from CUDA graphs.

CPU: which modules are graphed, in which order, and which calls the installed forward sends to
the graph; the step's bookkeeping (record, capture, the kept-allocated gradients, a parameter
without one, a capture that would lose one) with a stand-in that replays nothing. GPU (marked):
the step trains exactly like the eager step, with gradient accumulation (where returning the
graphs' static gradient buffers goes wrong: pytorch/pytorch#181723), with a transformer backbone,
inside DDP, under fp16 loss scaling, with a micro-batch of another shape, with an unused
parameter and with a second forward before the backward; a replaced parameter is refused.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
from conftest import ScalingAccelerator, randomize_

import aimkit
from aimkit.errors import ConfigError
from aimkit.policy import ExecutionPolicy
from aimkit.training import EagerStep, LayerGraphedStep, make_optimizer, make_train_step
from aimkit.training.layer_graphs import CallSpec, GraphedForward, GraphedSublayers

TINY = dict(d_model=64, n_layer=2, num_classes=10, vocab_size=64, num_tokens=16, tokenizer=None, class_dropout=0.0)
BACKBONES = {"mamba2": dict(backbone__d_state=16, backbone__headdim=16),
             "transformer": dict(backbone="transformer", backbone__n_head=4)}


def _model(device, policy=None, backbone="mamba2"):
    torch.manual_seed(0)
    gen = aimkit.build("aim-b", policy=policy, **TINY, **BACKBONES[backbone])
    return randomize_(gen, seed=0).to(device).train()


def _micro_batches(device, steps, per_step, rows=4):
    g = torch.Generator(device).manual_seed(1)
    return [[(torch.randint(0, 64, (rows, 16), device=device, generator=g),
              torch.randint(0, 10, (rows,), device=device, generator=g)) for _ in range(per_step)]
            for _ in range(steps)]


@pytest.mark.parametrize("backbone, kinds", [("mamba2", ["Mamba2", "Mamba2"]),
                                             ("transformer", ["Attention", "SwiGLU", "Attention", "SwiGLU"])])
def test_sublayer_modules_are_listed_in_the_order_a_forward_runs_them(backbone, kinds):
    gen = _model("cpu", ExecutionPolicy.reference(), backbone)
    modules = gen.backbone.sublayer_modules()
    assert [type(m).__name__ for m in modules] == kinds
    ran = []
    handles = [m.register_forward_pre_hook(lambda mod, args: ran.append(mod)) for m in modules]
    codes, labels = _micro_batches("cpu", 1, 1)[0][0]
    gen(codes, labels)
    for h in handles:
        h.remove()
    assert [id(m) for m in ran] == [id(m) for m in modules]


def test_graphed_forward_replays_only_the_call_it_was_captured_for():
    """Another shape, dtype or requires_grad, a cache, no grad or eval mode: the module's own forward."""
    lin = torch.nn.Linear(8, 8).train()
    x = torch.randn(2, 3, 8, requires_grad=True)
    forward = GraphedForward(lin, lambda t: "graph", lambda t, *a, **k: "eager", CallSpec.of(x))
    assert forward(x) == "graph" and forward(x.detach().clone().requires_grad_(), inference_params=None) == "graph"
    assert forward(torch.randn(2, 4, 8, requires_grad=True)) == "eager"
    assert forward(x.detach()) == "eager"  # requires_grad differs
    assert forward(x.double()) == "eager"
    assert forward(x, inference_params=object()) == "eager"
    assert forward(x, object()) == "eager"
    with torch.no_grad():
        assert forward(x) == "eager"
    lin.eval()
    assert forward(x) == "eager"
    assert forward.replays == 2
    lin.train()
    busy = GraphedForward(lin, lambda t: "graph", lambda t, *a, **k: "eager", CallSpec.of(x), busy=lambda: True)
    assert busy(x) == "eager"  # the previous replay's backward has not run: its buffers are in use


def test_graphed_sublayers_record_first_inputs_and_refuse_what_they_cannot_capture():
    gen = _model("cpu", ExecutionPolicy.reference())
    graphs = GraphedSublayers(gen.backbone.sublayer_modules())
    with pytest.raises(RuntimeError, match="did not run"):
        graphs.capture()
    codes, labels = _micro_batches("cpu", 1, 1)[0][0]
    with graphs.record():
        gen(codes, labels)
    assert graphs.recorded and not graphs.captured and "recorded" in repr(graphs)
    spec = graphs.specs[0]
    assert spec.shape == (4, 16, 64) and spec.dtype == torch.float32 and spec.requires_grad  # (B, N, D)
    assert spec.autocast is None and graphs.specs[1] == spec
    assert all(not m._forward_pre_hooks for m in graphs.modules)  # the recording hooks are gone
    with pytest.raises(ValueError, match="needs CUDA"):
        graphs.capture()
    with pytest.raises(ValueError, match="at least one module"):
        GraphedSublayers([])


def test_layer_graphs_need_cuda_and_a_generator():
    gen = _model("cpu")
    with pytest.raises(ValueError, match="CUDA"):
        make_train_step(gen, make_optimizer(gen, lr=1e-3), ExecutionPolicy(train_step="layer_graphs"))
    with pytest.raises(ConfigError, match="lists its sublayer modules"):
        make_train_step(torch.nn.Linear(2, 2), None, ExecutionPolicy(train_step="layer_graphs"))


class EagerStandIn(GraphedSublayers):
    """The layer graphs' bookkeeping on a CPU: "replays" run the module's own forward and backward,
    and the captured backward gives every trainable parameter a gradient unless its name is in
    ``lost`` (what a parameter read other than as a module attribute would do)."""

    lost: tuple[str, ...] = ()

    @staticmethod
    def check_modules(modules):
        pass

    def capture(self):
        for module, spec in zip(self.modules, self.specs):
            forward = GraphedForward(module, module.forward, module.forward, spec)
            module.forward = forward
            self.forwards.append(forward)
            named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            self.graphs.append(SimpleNamespace(
                module=module, spec=spec, pending=False, params=[p for _, p in named],
                grads=[None] * spec.requires_grad + [None if n in self.lost else torch.zeros(1) for n, _ in named]))


def _cpu_model(policy):
    gen = _model("cpu", policy)
    gen.register_parameter("unused", torch.nn.Parameter(torch.ones(3, 3)))
    return gen


def _cpu_train(kind, micro, monkeypatch, lost=(), gen=None):
    """``_train`` on the CPU with the stand-in graphs (weight decay on, an unused decayed parameter)."""
    import aimkit.training.layer_graphs as layer_graphs

    monkeypatch.setattr(layer_graphs, "GraphedSublayers", type("Lost", (EagerStandIn,), {"lost": lost}))
    policy = ExecutionPolicy.reference(train_step=kind)
    gen = gen if gen is not None else _cpu_model(policy)
    step = make_train_step(gen, make_optimizer(gen, lr=1e-3, weight_decay=0.1), policy, amp_dtype=None)
    losses, grads_after = [], []
    for batches in micro:
        loss, _ = step.forward_backward(batches)
        losses.append(loss.item())
        step.finish()
        grads_after.append([p.grad for p in gen.parameters()])
    return gen, losses, grads_after, step


def test_layer_graphed_step_keeps_trained_grads_allocated_and_leaves_the_others_alone(monkeypatch):
    """Step 1 records (eager), step 2 captures: from then on every parameter the eager step trained
    keeps a zeroed .grad between steps (autograd adds into it), the unused one keeps none and AdamW
    leaves it; the numbers stay the eager step's."""
    micro = _micro_batches("cpu", 3, 2)
    eager, eager_losses, _, _ = _cpu_train("eager", micro, monkeypatch)
    gen, losses, grads_after, step = _cpu_train("layer_graphs", micro, monkeypatch)
    assert isinstance(step, LayerGraphedStep) and step.graphs.captured
    assert all(f.replays == 2 * 2 for f in step.graphs.forwards)  # steps 2 and 3, two micro-batches each
    assert all(g is None for g in grads_after[0])  # before the capture: set to None, as the eager step does
    for name, grad in zip([n for n, _ in gen.named_parameters()], grads_after[-1]):
        if name == "unused":
            assert grad is None
        else:
            assert grad is not None and not grad.any(), name
    assert torch.equal(gen.unused, torch.ones(3, 3))
    assert losses == eager_losses
    for (name, p), q in zip(eager.named_parameters(), gen.parameters()):
        torch.testing.assert_close(q, p, atol=0, rtol=0, msg=name)


def test_a_capture_that_loses_a_trained_gradient_is_refused(monkeypatch):
    """The captured backward would not train what the eager step trains: refused, naming the
    parameters, and the modules' own forwards are back."""
    micro = _micro_batches("cpu", 2, 1)
    gen = _cpu_model(ExecutionPolicy.reference(train_step="layer_graphs"))
    lost = r"give no gradient to \['backbone.layers.0.mixer.in_proj.weight', 'backbone.layers.1.mixer.in_proj.weight'\]"
    with pytest.raises(RuntimeError, match=lost):
        _cpu_train("layer_graphs", micro, monkeypatch, lost=("in_proj.weight",), gen=gen)
    assert all("forward" not in m.__dict__ for m in gen.backbone.sublayer_modules())


def _train(kind, micro, backbone="mamba2", skip=(), wrap=None, unused=False):
    """Train ``_model`` over ``micro`` (a list of steps, each a list of micro-batches) with
    ``train_step=kind`` and AdamW with weight decay; the update of the steps in ``skip`` is
    skipped; ``unused``: the model has a trainable matrix its forward never reads. Returns
    (model, losses, norms, step)."""
    policy = ExecutionPolicy(train_step=kind)
    gen = _model("cuda", policy, backbone)
    if unused:
        gen.register_parameter("unused", torch.nn.Parameter(torch.ones(3, 3, device="cuda")))
    model = wrap(gen) if wrap else gen
    step = make_train_step(model, make_optimizer(gen, lr=1e-3, weight_decay=0.1), policy)
    losses, norms = [], []
    for i, batches in enumerate(micro):
        loss, norm = step.forward_backward(batches)
        losses.append(loss.item())
        norms.append(norm.item())
        step.finish(update=i not in skip)
    return gen, losses, norms, step


def _assert_same_training(a, b, tol=1e-5):
    (gen_a, losses_a, norms_a, _), (gen_b, losses_b, norms_b, _) = a, b
    assert losses_b == pytest.approx(losses_a, rel=tol, abs=tol)
    assert norms_b == pytest.approx(norms_a, rel=tol, abs=tol)
    for (name, p), q in zip(gen_a.named_parameters(), gen_b.parameters()):
        torch.testing.assert_close(q, p, atol=tol, rtol=tol, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("per_step", [1, 3])
@pytest.mark.parametrize("backbone", ["mamba2", "transformer"])
def test_layer_graphed_steps_train_like_eager_steps(per_step, backbone):
    """Steps 2-4 replay every sublayer's graphs; losses, norms and weights stay the eager step's,
    with one micro-batch per step and with three (gradient accumulation), a skipped update included."""
    micro = _micro_batches("cuda", 4, per_step)
    eager = _train("eager", micro, backbone, skip={2})
    graphed = _train("layer_graphs", micro, backbone, skip={2})
    assert isinstance(graphed[3], LayerGraphedStep) and not isinstance(eager[3], LayerGraphedStep)
    forwards = graphed[3].graphs.forwards
    assert forwards and all(f.replays == 3 * per_step for f in forwards)
    _assert_same_training(eager, graphed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_micro_batch_of_another_shape_runs_eagerly_inside_the_layer_graphed_step():
    micro = _micro_batches("cuda", 3, 1)
    small = _micro_batches("cuda", 1, 1, rows=2)[0]
    plan = [micro[0], micro[1], small, micro[2]]
    eager = _train("eager", plan)
    graphed = _train("layer_graphs", plan)
    assert all(f.replays == 2 for f in graphed[3].graphs.forwards)  # not the 2-row step
    _assert_same_training(eager, graphed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layer_graphed_step_inside_ddp_trains_like_eager(monkeypatch):
    """DDP's all-reduce hooks fire on the gradients the graphed backward hands autograd (one rank, NCCL)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        micro = _micro_batches("cuda", 3, 2)
        eager = _train("eager", micro)
        graphed = _train("layer_graphs", micro, wrap=lambda gen: DistributedDataParallel(gen, device_ids=[0]))
        assert all(f.replays == 4 for f in graphed[3].graphs.forwards)
        _assert_same_training(eager, graphed)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_parameter_without_gradient_stays_untouched_as_in_the_eager_step():
    """A decayed parameter the forward never reads: no gradient, so AdamW leaves it (a zero
    gradient allocated for it would decay it)."""
    micro = _micro_batches("cuda", 3, 1)
    eager = _train("eager", micro, unused=True)
    graphed = _train("layer_graphs", micro, unused=True)
    assert graphed[0].unused.grad is None and torch.equal(graphed[0].unused, torch.ones(3, 3, device="cuda"))
    _assert_same_training(eager, graphed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_parameter_replaced_after_capture_is_refused():
    micro = _micro_batches("cuda", 2, 1)
    gen, _, _, step = _train("layer_graphs", micro)
    weight = gen.backbone.layers[0].mixer.in_proj.weight
    weight.data = weight.data.clone()  # new storage: the graphs would read the old one
    with pytest.raises(RuntimeError, match="replaced after its CUDA graphs were captured"):
        step.forward_backward(micro[0])


class _ScaledOptimizer:
    """accelerate's optimizer wrapper under fp16: the update goes through the loss scaler."""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler
        self.param_groups = optimizer.param_groups

    def step(self):
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layer_graphed_step_with_fp16_loss_scaling_trains_like_eager():
    """fp16 (what auto sends to the layer graphs on one GPU): forward under fp16 autocast, the
    scaled loss's gradients through the replays, unscaled for the clip, the update through the scaler."""
    micro = _micro_batches("cuda", 4, 2)

    def run(kind):
        policy = ExecutionPolicy(train_step=kind)
        gen = _model("cuda", policy)
        gen.forward = torch.autocast("cuda", dtype=torch.float16)(gen.forward)  # as accelerate wraps it
        opt = make_optimizer(gen, lr=1e-3, weight_decay=0.1)
        acc = ScalingAccelerator(opt, "cuda", init_scale=2.0 ** 12)
        step = make_train_step(gen, _ScaledOptimizer(opt, acc.scaler), policy, accelerator=acc)
        losses, norms = [], []
        for batches in micro:
            loss, norm = step.forward_backward(batches)
            losses.append(loss.item())
            norms.append(norm.item())
            step.finish()
        return gen, losses, norms, step

    eager, graphed = run("eager"), run("layer_graphs")
    assert all(f.replays == 3 * 2 for f in graphed[3].graphs.forwards)
    assert all(f.spec.autocast == torch.float16 for f in graphed[3].graphs.forwards)
    _assert_same_training(eager, graphed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_second_forward_before_the_backward_runs_eagerly():
    """Two forwards, then one backward of both losses: the second cannot replay (the first replay's
    buffers still wait for the backward), so it runs eagerly; the gradients are the eager model's."""
    from aimkit.training.step import _batch_loss

    micro = _micro_batches("cuda", 2, 1)
    graphed, _, _, step = _train("layer_graphs", micro)
    eager = _train("eager", micro)[0]
    (c1, l1), (c2, l2) = _micro_batches("cuda", 1, 2, rows=4)[0]
    for gen in (graphed, eager):
        for p in gen.parameters():
            p.grad = None
        (_batch_loss(gen, c1, l1, torch.bfloat16, True) + _batch_loss(gen, c2, l2, torch.bfloat16, True)).backward()
    assert all(f.replays == 2 for f in step.graphs.forwards)  # step 2, then only the first forward here
    for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_eager_step_is_not_a_layer_graphed_step():
    gen = _model("cpu")
    step = make_train_step(gen, make_optimizer(gen, lr=1e-3), ExecutionPolicy(train_step="eager"))
    assert type(step) is EagerStep
