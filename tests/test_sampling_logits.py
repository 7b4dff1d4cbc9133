"""Tests of logit processing and guidance schedules on hand-made logits."""

import math

import pytest
import torch

from aimkit.errors import ConfigError
from aimkit.samplers.logits import (
    apply_guidance,
    apply_temperature,
    check_sampling_args,
    sample,
    top_k_filter,
    top_p_filter,
)
from aimkit.samplers.schedules import constant, get_schedule, linear


def _logits_of(probs):
    return torch.tensor(probs, dtype=torch.float32).log().unsqueeze(0)  # (1, V)


def _kept(logits):
    return torch.isfinite(logits)[0].nonzero().flatten().tolist()


# ---------------------------------------------------------------- top-p
@pytest.mark.parametrize(
    "p, kept",
    [
        (0.05, [2]),  # the top token always survives
        (0.49, [2]),  # 0.5 >= 0.49 already
        (0.51, [2, 0]),  # 0.5 < 0.51, 0.5 + 0.3 reaches it
        (0.79, [2, 0]),
        (0.81, [2, 0, 3]),
        (0.94, [2, 0, 3]),
        (0.96, [2, 0, 3, 1]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_smallest_set_reaching_p(p, kept):
    logits = _logits_of([0.3, 0.05, 0.5, 0.15])  # ranking: 2 (.5), 0 (.3), 3 (.15), 1 (.05)
    out = top_p_filter(logits, p)
    assert sorted(_kept(out)) == sorted(kept)
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])  # survivors unchanged


def test_top_p_ignores_removed_tokens_and_rows_are_independent():
    logits = torch.stack([_logits_of([0.7, 0.2, 0.1])[0], _logits_of([0.1, 0.2, 0.7])[0]])
    out = top_p_filter(logits, 0.6)
    assert torch.isfinite(out).tolist() == [[True, False, False], [False, False, True]]
    masked = torch.tensor([[float("-inf"), 1.0, 0.0]])  # renormalised over the finite two
    assert torch.isfinite(top_p_filter(masked, 0.6)).tolist() == [[False, True, False]]


def test_filters_do_not_modify_input():
    logits = torch.randn(3, 50)
    before = logits.clone()
    top_p_filter(logits, 0.5)
    top_k_filter(logits, 5)
    apply_temperature(logits, 0.7)
    apply_guidance(torch.cat([logits, logits]), 3.0)
    sample(logits, 1.0, 5, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits, before)


# ---------------------------------------------------------------- top-k
def test_top_k_one_is_argmax():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    out = top_k_filter(logits, 1)
    assert torch.isfinite(out).sum(-1).tolist() == [1] * 8
    assert torch.equal(out.argmax(-1), logits.argmax(-1))
    tokens = sample(logits, 1.0, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tokens, logits.argmax(-1))


def test_top_k_keeps_exactly_k_largest():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, 2.0]])
    assert _kept(top_k_filter(logits, 2)) in ([1, 3], [1, 4])  # exactly k even with a tie
    assert _kept(top_k_filter(logits, 3)) == [1, 3, 4]
    assert torch.equal(top_k_filter(logits, 0), logits)  # 0 = off
    assert torch.equal(top_k_filter(logits, 99), logits)


# ---------------------------------------------------------------- temperature, greedy, draw
def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, 2.0, -4.0]])
    assert torch.allclose(apply_temperature(logits, 0.5), logits * 2)
    assert torch.allclose(apply_temperature(logits, 2.0), logits / 2)
    assert apply_temperature(logits.bfloat16(), 1.0).dtype == torch.float32
    with pytest.raises(ValueError):
        apply_temperature(logits, 0.0)


def test_greedy_and_sampling_distribution():
    logits = _logits_of([0.1, 0.6, 0.3]).expand(4000, 3)
    assert sample(logits, temperature=0.0).tolist() == [1] * 4000
    draws = sample(logits, 1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([0.1, 0.6, 0.3]), atol=0.03)
    cold = sample(logits, 0.25, generator=torch.Generator().manual_seed(0))  # p^4 renormalised
    assert (cold == 1).float().mean() > 0.9
    nucleus = sample(logits, 1.0, top_p=0.85, generator=torch.Generator().manual_seed(0))
    assert set(nucleus.tolist()) == {1, 2}


def test_sample_reproducible_per_generator():
    logits = torch.randn(16, 300)
    a = sample(logits, 1.0, 50, 0.9, generator=torch.Generator().manual_seed(5))
    b = sample(logits, 1.0, 50, 0.9, generator=torch.Generator().manual_seed(5))
    c = sample(logits, 1.0, 50, 0.9, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.int64 and a.shape == (16,)


# ---------------------------------------------------------------- guidance
def test_guidance_mixing():
    cond, uncond = torch.randn(2, 10), torch.randn(2, 10)
    logits = torch.cat([cond, uncond]).bfloat16()
    assert torch.equal(apply_guidance(logits, 1.0), logits[:2].float())
    expected = uncond.bfloat16().float() + 3.0 * (cond.bfloat16().float() - uncond.bfloat16().float())
    assert torch.allclose(apply_guidance(logits, 3.0), expected)
    assert apply_guidance(logits, 3.0).dtype == torch.float32


@pytest.mark.parametrize(
    "args, word",
    [
        ((float("nan"), 1.0, 0, 1.0), "cfg_scale"),
        (("2", 1.0, 0, 1.0), "cfg_scale"),
        ((2.0, -0.1, 0, 1.0), "temperature"),
        ((2.0, 1.0, -1, 1.0), "top_k"),
        ((2.0, 1.0, 1.5, 1.0), "top_k"),
        ((2.0, 1.0, 0, 0.0), "top_p"),
        ((2.0, 1.0, 0, 1.01), "top_p"),
    ],
)
def test_check_sampling_args(args, word):
    with pytest.raises(ConfigError, match=word):
        check_sampling_args(*args)


def test_check_sampling_args_normalises():
    assert check_sampling_args(2, 0, 5, 1) == (2.0, 0.0, 5, 1.0)


# ---------------------------------------------------------------- schedules
def test_schedules():
    assert [constant(k, 4, 3.0) for k in range(4)] == [3.0] * 4
    ramp = [linear(k, 5, 3.0) for k in range(5)]
    assert ramp[0] == 1.0 and ramp[-1] == 3.0
    assert all(math.isclose(a, b) for a, b in zip(ramp, [1.0, 1.5, 2.0, 2.5, 3.0]))
    assert linear(0, 1, 4.0) == 4.0
    assert get_schedule("linear") is linear and get_schedule("constant") is constant
    def custom(step, num_steps, base_scale):
        return base_scale

    assert get_schedule(custom) is custom
    with pytest.raises(ConfigError, match="unknown guidance schedule 'cosine'.*constant, linear"):
        get_schedule("cosine")
    with pytest.raises(ConfigError, match="name or a callable"):
        get_schedule(3)
