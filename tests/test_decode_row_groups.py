"""The decode step of rows in groups (policy ``decode_streams``): the same tokens' logits and the
same cache as one step of all rows, for both backbones."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_

import aimkit
from aimkit.backbones.base import InferenceParams

ROWS = 5
STEPS = 6


def _decode(gen, labels, codes, groups=None, streams=()):
    """Logits of the prefill and ``codes.shape[1]`` decode steps (ROWS, STEPS + 1, V), and the
    cache afterwards; with ``groups``, every step through ``step_in_row_groups``."""
    if groups is not None:
        gen.backbone.step = lambda x, mods, ip: gen.backbone.step_in_row_groups(x, mods, ip, groups, streams)
    try:
        cond = gen.condition(labels)
        params = gen.allocate_inference_cache(labels.shape[0])
        logits = [gen.prefill(cond, params)]
        params.advance(1)
        for k in range(codes.shape[1]):
            logits.append(gen.decode_step(codes[:, k], cond, params))
            params.advance(1)
    finally:
        if groups is not None:
            del gen.backbone.step  # back to the class's method
    return torch.stack(logits, 1), params.key_value_memory_dict


def _inputs(gen, device="cpu"):
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, gen.num_classes, (ROWS,), generator=g).to(device)
    codes = torch.randint(0, gen.vocab_size, (ROWS, STEPS), generator=g).to(device)
    return labels, codes


@pytest.mark.parametrize("preset", ["aim-test-mamba2", "aim-test-transformer"])
@pytest.mark.parametrize("groups", [2, 3, ROWS])
def test_row_groups_decode_like_one_step_of_all_rows(preset, groups):
    torch.manual_seed(0)
    gen = randomize_(aimkit.build(preset, pretrained=False, dtype=torch.float64))
    labels, codes = _inputs(gen)
    want, want_cache = _decode(gen, labels, codes)
    got, got_cache = _decode(gen, labels, codes, groups=groups)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for layer, tensors in want_cache.items():
        for a, b in zip(got_cache[layer], tensors):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_group_that_decodes_wrong_rows_is_caught():
    """The check above can fail: groups that read each other's cache rows give other logits."""
    torch.manual_seed(0)
    gen = randomize_(aimkit.build("aim-test-mamba2", pretrained=False, dtype=torch.float64))
    labels, codes = _inputs(gen)
    want, _ = _decode(gen, labels, codes)
    rows = InferenceParams.rows
    try:
        InferenceParams.rows = lambda self, start, stop: rows(self, 0, stop - start)  # every group on rows 0..
        got, _ = _decode(gen, labels, codes, groups=2)
    finally:
        InferenceParams.rows = rows
    assert not torch.allclose(got, want)


def test_rows_are_views_that_share_the_position():
    gen = aimkit.build("aim-test-transformer", pretrained=False)
    params = gen.allocate_inference_cache(4)
    part = params.rows(1, 3)
    assert part.max_batch_size == 2 and part.position is params.position
    k_part = part.layer_cache(0, 2)[0]
    k_part.fill_(7.0)
    k_all = params.layer_cache(0, 4)[0]
    assert (k_all[1:3] == 7).all() and (k_all[0] == 0).all() and (k_all[3] == 0).all()
    for bad in ((2, 2), (-1, 2), (0, 5)):
        with pytest.raises(ValueError, match="outside a cache"):
            params.rows(*bad)


def test_decode_streams_is_a_checked_policy_field():
    assert aimkit.ExecutionPolicy().decode_streams == 1
    assert "decode_streams=2" in repr(aimkit.ExecutionPolicy(decode_streams=2))
    for bad in (0, 9, 1.5):
        with pytest.raises(aimkit.ConfigError, match="decode_streams"):
            aimkit.ExecutionPolicy(decode_streams=bad)
    gen = aimkit.build("aim-test-mamba2", pretrained=False)
    with pytest.raises(ValueError, match="cannot split"):
        gen.backbone.step_in_row_groups(torch.zeros(2, 1, gen.backbone.d_model), [], None, 3)


def _graph_logits(gen, labels, codes):
    """:func:`_decode` with every decode step replayed from a captured CUDA graph."""
    from aimkit.samplers._cuda_graph import DecodeGraph

    cond = gen.condition(labels)
    graph = DecodeGraph(gen, cond, labels.shape[0])
    graph.start(cond)
    logits = [gen.prefill(graph.cond, graph.inference_params)]
    graph.inference_params.advance(1)
    for k in range(codes.shape[1]):
        logits.append(graph.step(codes[:, k]).clone())
        graph.inference_params.advance(1)
    return torch.stack(logits, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["aim-test-mamba2", "aim-test-transformer"])
def test_row_groups_on_two_streams_decode_like_one_stream_also_inside_the_graph(preset):
    """``decode_streams=2``: the rows forked onto a side stream, eagerly and inside the captured
    decode step, give one stream's logits (float32, the decode kernels)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    one = randomize_(aimkit.build(preset, pretrained=False, device="cuda"))
    two = aimkit.build(preset, pretrained=False, device="cuda", policy={"decode_streams": 2})
    two.load_state_dict(one.state_dict())
    labels, codes = _inputs(one, "cuda")
    with torch.no_grad():
        want, _ = _decode(one, labels, codes)
        torch.testing.assert_close(_decode(two, labels, codes)[0], want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(_graph_logits(two, labels, codes), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(_graph_logits(one, labels, codes), want, rtol=1e-4, atol=1e-4)
