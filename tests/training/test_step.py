"""aimkit.training.step and .optim: the one training step (eager or CUDA graphs) and the one
rule for weight decay, on CPU; on a GPU, replayed steps equal eager steps."""

import pytest
import torch
from conftest import ScalingAccelerator, randomize_

import aimkit
from aimkit.errors import ConfigError
from aimkit.generator import token_cross_entropy
from aimkit.policy import ExecutionPolicy
from aimkit.training import EagerStep, GraphedStep, LayerGraphedStep, make_optimizer, make_train_step, param_groups

TINY = dict(d_model=64, n_layer=2, num_classes=10, vocab_size=64, num_tokens=16, tokenizer=None,
            class_dropout=0.0, backbone__d_state=16, backbone__headdim=16)


def _model(device, policy=None):
    torch.manual_seed(0)
    return randomize_(aimkit.build("aim-b", policy=policy, **TINY), seed=0).to(device).train()


def _batch(device="cpu", rows=4, seed=1):
    g = torch.Generator(device).manual_seed(seed)
    return (torch.randint(0, 64, (rows, 16), device=device, generator=g),
            torch.randint(0, 10, (rows,), device=device, generator=g))


def test_param_groups_decay_matrices_only():
    gen = _model("cpu")
    decay, no_decay = param_groups(gen, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in gen.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert not decayed & kept and decayed | kept == set(names.values())  # every parameter once
    assert all(p.dim() >= 2 for p in decay["params"])
    for suffix in ("A_log", ".D", "dt_bias", ".bias", "norm.weight"):
        assert any(n.endswith(suffix) for n in kept), suffix
        assert not any(n.endswith(suffix) for n in decayed), suffix
    assert "tok_embed.weight" in decayed


def test_eager_step_is_forward_backward_clip_update():
    policy = ExecutionPolicy.reference()
    codes, labels = _batch()
    manual, stepped = _model("cpu", policy), _model("cpu", policy)
    opt_m = make_optimizer(manual, lr=1e-3)
    loss = token_cross_entropy(manual(codes, labels), codes)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(manual.parameters(), 0.5)
    opt_m.step()

    step = make_train_step(stepped, make_optimizer(stepped, lr=1e-3), policy, max_grad_norm=0.5, amp_dtype=None)
    assert isinstance(step, EagerStep)
    got_loss, got_norm = step.forward_backward([(codes, labels)])
    step.finish(update=True)
    assert torch.equal(got_loss, loss.detach()) and torch.equal(got_norm, norm)
    for (name, a), b in zip(manual.named_parameters(), stepped.parameters()):
        assert torch.equal(a, b), name
    assert all(p.grad is None for p in stepped.parameters())  # ready for the next step


def test_micro_batches_average_and_skipped_updates_change_nothing():
    policy = ExecutionPolicy.reference()
    codes, labels = _batch(rows=4)
    whole, split = _model("cpu", policy), _model("cpu", policy)
    step_whole = EagerStep(whole, make_optimizer(whole, lr=1e-3), compile_loss=False)
    step_split = EagerStep(split, make_optimizer(split, lr=1e-3), compile_loss=False)
    loss_w, norm_w = step_whole.forward_backward([(codes, labels)])
    loss_s, norm_s = step_split.forward_backward([(codes[:2], labels[:2]), (codes[2:], labels[2:])])
    torch.testing.assert_close(loss_s, loss_w)
    torch.testing.assert_close(norm_s, norm_w)
    before = [p.detach().clone() for p in split.parameters()]
    step_split.finish(update=False)
    assert all(torch.equal(a, b) for a, b in zip(before, split.parameters()))


def test_a_skipped_fp16_update_closes_the_loss_scalers_step():
    """fp16 with a non-finite loss: the trainer skips the update; the loss scaler, which unscaled
    the gradients for the clip, must still be updated, or the next step's unscale_ refuses."""
    gen = _model("cpu")
    opt = make_optimizer(gen, lr=1e-3)
    acc = ScalingAccelerator(opt, "cpu", init_scale=2.0 ** 10)
    step = EagerStep(gen, opt, accelerator=acc)
    with torch.no_grad():
        gen.backbone.norm_f.weight.fill_(float("nan"))  # every loss from here on is NaN
    for _ in range(2):
        loss, _ = step.forward_backward([_batch()])
        assert not torch.isfinite(loss)
        step.finish(update=False)
    assert acc.scaler.get_scale() == 2.0 ** 8  # backed off once per skipped step


def test_graphed_step_rejects_cpu_inputs_and_non_capturable_optimizers():
    gen = _model("cpu")
    codes, labels = _batch()
    with pytest.raises(ValueError, match="capturable"):
        GraphedStep(gen, torch.optim.AdamW(gen.parameters()))
    step = make_train_step(gen, make_optimizer(gen, lr=1e-3, capturable=True),
                           ExecutionPolicy(train_step="graph"))
    assert isinstance(step, GraphedStep)
    with pytest.raises(ValueError, match="CUDA tensors"):
        step(codes, labels)
    with pytest.raises(ValueError, match="takes 1 micro-batch"):
        step.forward_backward([(codes, labels), (codes, labels)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_steps_equal_eager_steps():
    codes, labels = _batch("cuda")
    batches = [(codes.roll(i, dims=1), labels.roll(i)) for i in range(4)]
    policy = aimkit.default_policy()

    eager = _model("cuda", policy)
    eager_step = make_train_step(eager, make_optimizer(eager, lr=1e-3, weight_decay=0.0, capturable=True), policy)
    eager_losses = [eager_step(c, y).item() for c, y in batches]

    graph_policy = policy.replace(train_step="graph")
    graphed = _model("cuda", graph_policy)
    step = make_train_step(graphed, make_optimizer(graphed, lr=1e-3, weight_decay=0.0, capturable=True), graph_policy)
    graph_losses = [step(c, y).item() for c, y in batches]  # capture on the first call, undone
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-4)
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="fixed input shapes"):
        step(codes[:2], labels[:2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_accumulating_steps_equal_eager_steps():
    """grad_accum 3: the captured micro-batch graph, replayed 3 times into the gradient buffers,
    then clip and update, trains like the eager step over the same micro-batches; a skipped update
    leaves the weights and starts the next step from zero gradients."""
    codes, labels = _batch("cuda")
    steps = [[(codes.roll(3 * s + i, dims=1), labels.roll(3 * s + i)) for i in range(3)] for s in range(3)]
    policy = aimkit.default_policy()

    def run(kind):
        gen = _model("cuda", policy.replace(train_step=kind))
        step = make_train_step(gen, make_optimizer(gen, lr=1e-3, weight_decay=0.0, capturable=True),
                               policy.replace(train_step=kind), grad_accum=3)
        losses, norms = [], []
        for i, micro in enumerate(steps):
            loss, norm = step.forward_backward(micro)
            losses.append(loss.item())
            norms.append(norm.item())
            step.finish(update=i != 1)  # the second update skipped
        return gen, losses, norms

    eager, eager_losses, eager_norms = run("eager")
    graphed, graph_losses, graph_norms = run("graph")
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-4)
    assert graph_norms == pytest.approx(eager_norms, rel=1e-3, abs=1e-4)
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("run, want", [
    (dict(device="cpu"), ("eager", "a CUDA device (this run is on cpu)")),
    (dict(device="cuda", processes=2), ("layer_graphs", "a single process (this run has 2)")),
    (dict(device="cuda", processes=4, mixed_precision="fp16"), ("layer_graphs", "mixed_precision bf16 or no")),
    (dict(device="cuda", processes=2, compiled=True), ("eager", "layer-graphed step needs compile: false")),
    (dict(device="cpu", processes=2, distributed="MULTI_CPU"), ("eager", "layer-graphed step needs a CUDA device")),
    (dict(device="cuda", processes=8, distributed="FSDP"), ("eager", "plain DDP or one process (this run uses fsdp)")),
    (dict(device="cuda", processes=2, distributed="MULTI_GPU"), ("layer_graphs", "a single process")),
    (dict(device="cuda", mixed_precision="bf16"), ("graph", "captured step")),
])
def test_train_step_auto_is_graph_wherever_a_run_allows_it(run, want):
    """Policy train_step auto resolves once per run to the captured step or, naming why, to the
    layer-graphed step, or to eager; an explicit choice the run rules out is refused."""
    from aimkit.training.step import resolve_train_step

    run = dict(run)  # the parametrized dict is shared between reruns
    device = torch.device(run.pop("device"))
    kind, why = resolve_train_step(ExecutionPolicy(train_step="auto"), device, **run)
    assert kind == want[0] and want[1] in why
    assert resolve_train_step(ExecutionPolicy(train_step="eager"), device, **run)[0] == "eager"
    if kind != "graph":
        with pytest.raises(ConfigError, match="policy train_step: graph needs"):
            resolve_train_step(ExecutionPolicy(train_step="graph"), device, **run)
    if kind == "eager":
        with pytest.raises(ConfigError, match="policy train_step: layer_graphs needs"):
            resolve_train_step(ExecutionPolicy(train_step="layer_graphs"), device, **run)
    else:
        assert resolve_train_step(ExecutionPolicy(train_step="layer_graphs"), device, **run)[0] == "layer_graphs"


@pytest.mark.parametrize("asked, kind, glue, want_glue", [
    ("auto", "eager", True, False),  # the fallback: host-bound, the glue uncompiled
    ("auto", "graph", True, True),  # captured: the compiled glue kept
    ("eager", "eager", True, True),  # asked for explicitly: compile_glue as given
    ("auto", "eager", False, False),
    ("graph", "graph", False, False),
    ("auto", "layer_graphs", True, True),  # host time is spent in the glue only: kept as given
])
def test_step_policy_drops_the_compiled_glue_only_where_auto_falls_back_to_eager(asked, kind, glue, want_glue):
    from aimkit.training.step import step_policy

    policy = ExecutionPolicy(train_step=asked, compile_glue=glue, chunk_size=64)
    got = step_policy(policy, kind)
    assert (got.train_step, got.compile_glue) == (kind, want_glue)
    assert got.replace(train_step=asked, compile_glue=glue) == policy  # nothing else changed
    with pytest.raises(ValueError, match="'graph', 'layer_graphs', 'eager'"):
        step_policy(policy, "auto")


def test_make_train_step_resolves_auto_for_its_model_and_optimizer():
    """The default policy (train_step auto) builds the eager step on the CPU; on CUDA the captured
    step, unless the optimizer cannot be captured (then the layer-graphed step)."""
    assert ExecutionPolicy().train_step == "auto"
    gen = _model("cpu")
    assert isinstance(make_train_step(gen, make_optimizer(gen, lr=1e-3), ExecutionPolicy()), EagerStep)
    if torch.cuda.is_available():
        gen = _model("cuda")
        plain = make_train_step(gen, make_optimizer(gen, lr=1e-3, capturable=False), ExecutionPolicy())
        assert isinstance(plain, LayerGraphedStep)
        graphed = make_train_step(gen, make_optimizer(gen, lr=1e-3, capturable=True), ExecutionPolicy())
        assert isinstance(graphed, GraphedStep)


def test_auto_step_reads_the_accelerators_precision_a_compiled_model_and_every_param_group(monkeypatch):
    """What auto hands to the run check: the accelerator's mixed precision (fp16 rules the captured
    step out even when amp_dtype says bf16), a torch.compile'd model, and capturable only when
    every parameter group is."""
    import aimkit.training.step as step

    seen = []

    def fake_resolve(policy, device, **run):
        seen.append(run)
        return "graph", "test"

    monkeypatch.setattr(step, "resolve_train_step", fake_resolve)
    gen = _model("cpu")
    opt = make_optimizer(gen, lr=1e-3, capturable=True)

    class Accel:
        num_processes, mixed_precision = 1, "fp16"

    assert step._auto_step(gen, opt, torch.bfloat16, Accel()) == "graph"
    assert seen[-1] == {"processes": 1, "mixed_precision": "fp16", "compiled": False, "distributed": "no"}
    assert step._auto_step(gen, opt, torch.float16, None) == "graph"
    assert seen[-1]["mixed_precision"] == "fp16"
    Accel.mixed_precision = "no"  # the captured step would autocast with amp_dtype: its precision counts
    step._auto_step(gen, opt, torch.bfloat16, Accel())
    assert seen[-1]["mixed_precision"] == "bf16"
    wrapped = torch.nn.Module()
    wrapped._orig_mod = gen  # what torch.compile returns
    step._auto_step(wrapped, opt, torch.bfloat16, None)
    assert seen[-1]["compiled"] is True
    opt.param_groups[-1]["capturable"] = False  # one group overriding the default
    assert step._auto_step(gen, opt, torch.bfloat16, None) == "layer_graphs"
    assert step._auto_step(torch.nn.Linear(2, 2), opt, torch.bfloat16, None) == "eager"  # no sublayers to graph
