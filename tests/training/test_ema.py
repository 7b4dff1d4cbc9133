"""aimkit.training.ema: the moving average of the weights, inside the eager and the captured step."""

import pytest
import torch
from conftest import randomize_

import aimkit
from aimkit.errors import CheckpointError, ConfigError
from aimkit.policy import ExecutionPolicy
from aimkit.training import make_optimizer, make_train_step
from aimkit.training.ema import EMA


def _model(device="cpu", policy=None):
    torch.manual_seed(0)
    return randomize_(aimkit.build("aim-test-mamba2", policy=policy, class_dropout=0.0), seed=0).to(device).train()


def _batches(device="cpu", n=3):
    g = torch.Generator(device).manual_seed(1)
    return [(torch.randint(0, 64, (4, 16), device=device, generator=g),
             torch.randint(0, 10, (4,), device=device, generator=g)) for _ in range(n)]


def _expected(start, history, decay):
    """The average by hand, one lerp per applied update, in float32."""
    avg = [s.clone() for s in start]
    for params in history:
        avg = [a + (1 - decay) * (p.float() - a) for a, p in zip(avg, params)]
    return avg


def test_update_is_a_lerp_toward_the_parameters():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.75)
    start = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update()
    for s, s0, p in zip(ema.shadow, start, net.parameters()):
        torch.testing.assert_close(s, 0.75 * s0 + 0.25 * p)
        assert s.dtype == torch.float32


def test_bfloat16_parameters_are_averaged_in_float32():
    net = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(net, decay=0.9999)
    before = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update()
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    assert all(not torch.equal(s, b) for s, b in zip(ema.shadow, before))  # 1e-4 steps are not rounded away


def test_frozen_parameters_are_left_out_and_bad_decays_refused():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    net[0].requires_grad_(False)
    assert EMA(net, 0.5).names == ["1.weight", "1.bias"]
    for decay in (1.0, -0.1, 2):
        with pytest.raises(ConfigError, match="ema_decay"):
            EMA(net, decay)


def test_eager_step_updates_the_average_only_after_applied_updates():
    policy = ExecutionPolicy.reference()
    gen = _model(policy=policy)
    ema = EMA(gen, decay=0.5)
    start = [s.clone() for s in ema.shadow]
    step = make_train_step(gen, make_optimizer(gen, lr=1e-2), policy, amp_dtype=None, ema=ema)
    history = []
    for i, batch in enumerate(_batches()):
        step.forward_backward([batch])
        step.finish(update=i != 1)  # the second update is skipped (a non-finite step)
        if i != 1:
            history.append([p.detach().clone() for p in ema.params])
    want = _expected(start, history, 0.5)
    for name, got, w in zip(ema.names, ema.shadow, want):
        torch.testing.assert_close(got, w, msg=name)
    assert not torch.equal(ema.shadow[0], ema.params[0].float())  # an average, not a copy


def test_swapped_in_and_back_bit_for_bit():
    gen = _model()
    ema = EMA(gen, decay=0.9)
    with torch.no_grad():
        for p in gen.parameters():
            p.mul_(1.5)
    ema.update()
    raw = {k: v.clone() for k, v in gen.state_dict().items()}
    with ema.swapped_in():
        for name, p in gen.named_parameters():
            if name in ema.names:
                assert torch.equal(p, ema.state_dict()[name]), name
    for k, v in gen.state_dict().items():
        assert torch.equal(v, raw[k]), k


def test_state_dict_round_trip_is_strict():
    gen = _model()
    ema = EMA(gen, decay=0.9)
    saved = {k: v.clone() + 1 for k, v in ema.state_dict().items()}
    other = EMA(_model(), decay=0.9)
    other.load_state_dict(saved)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in saved.items())
    extra = dict(saved, nonsense=torch.zeros(1))
    with pytest.raises(CheckpointError, match="1 unexpected"):
        other.load_state_dict(extra)
    missing = dict(saved)
    missing.pop(ema.names[0])
    with pytest.raises(CheckpointError, match="1 missing"):
        other.load_state_dict(missing)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_step_replays_the_average_update():
    """The EMA update is part of the optimizer graph: replays move it exactly as eager steps do."""
    policy = aimkit.default_policy()
    batches = _batches("cuda", n=4)

    eager = _model("cuda", policy)
    eager_ema = EMA(eager, decay=0.8)
    step = make_train_step(eager, make_optimizer(eager, lr=1e-3, weight_decay=0.0, capturable=True), policy,
                           ema=eager_ema)
    for c, y in batches:
        step(c, y)

    graph_policy = policy.replace(train_step="graph")
    graphed = _model("cuda", graph_policy)
    graphed_ema = EMA(graphed, decay=0.8)
    start = [s.clone() for s in graphed_ema.shadow]
    gstep = make_train_step(graphed, make_optimizer(graphed, lr=1e-3, weight_decay=0.0, capturable=True),
                            graph_policy, ema=graphed_ema)
    history = []
    for i, (c, y) in enumerate(batches):
        gstep.forward_backward([(c, y)])
        gstep.finish(update=i != 2)  # a skipped replay leaves the average alone
        if i != 2:
            history.append([p.detach().clone() for p in graphed_ema.params])
    for name, got, want in zip(graphed_ema.names, graphed_ema.shadow, _expected(start, history, 0.8)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)
    assert not any(torch.equal(a, b) for a, b in zip(graphed_ema.shadow, start))  # the warm-up was undone, then
    assert eager_ema.names == graphed_ema.names                                    # replays updated it
