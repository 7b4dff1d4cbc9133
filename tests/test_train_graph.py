"""GraphedTrainStep: argument checks on CPU; on a GPU, replayed steps equal eager steps."""

import pytest
import torch
from conftest import randomize_

import aimkit
from aimkit.train_graph import GraphedTrainStep

TINY = dict(d_model=64, n_layer=2, num_classes=10, vocab_size=64, num_tokens=16, tokenizer=None,
            class_dropout=0.0, backbone__d_state=16, backbone__headdim=16)


def _model(device):
    torch.manual_seed(0)
    return randomize_(aimkit.build("aim-b", **TINY), seed=0).to(device).train()


def test_rejects_cpu_inputs_and_non_capturable_optimizers():
    gen = _model("cpu")
    codes = torch.randint(0, 64, (2, 16))
    labels = torch.tensor([1, 2])
    opt = torch.optim.AdamW(gen.parameters())
    with pytest.raises(ValueError, match="CUDA tensors"):
        GraphedTrainStep(gen, opt, lambda m, c, y: m.loss(c, y), (codes, labels))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_steps_equal_eager_steps():
    codes = torch.randint(0, 64, (4, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    labels = torch.tensor([1, 2, 3, 4], device="cuda")
    batches = [(codes.roll(i, dims=1), labels.roll(i)) for i in range(4)]
    loss_fn = lambda m, c, y: m.loss(c, y)  # noqa: E731

    eager = _model("cuda")
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3, fused=True, capturable=True)
    eager_losses = []
    for c, y in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(eager, c, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(eager.parameters(), 1.0)
        opt_e.step()
        opt_e.zero_grad(set_to_none=True)
        eager_losses.append(loss.item())

    graphed = _model("cuda")
    opt_g = torch.optim.AdamW(graphed.parameters(), lr=1e-3, fused=True, capturable=True)
    step = GraphedTrainStep(graphed, opt_g, loss_fn, batches[0], warmup=1)  # warm-up = step 1
    graph_losses = [eager_losses[0]]
    for c, y in batches[1:]:
        graph_losses.append(step(c, y).item())
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-4)
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="fixed input shapes"):
        step(codes[:2], labels[:2])
