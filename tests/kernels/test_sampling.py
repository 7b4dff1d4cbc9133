"""The sampling kernels (aimkit.kernels.sampling, op ``sampling``): distribution, guidance,
bookkeeping, seeding and the split over vocabulary blocks.

Runs in Triton's interpreter on CPU (set before Triton is imported) and compiled on a GPU machine.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from aimkit.kernels import sampling as ts  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(logits, scale, temperature, seed, step, batch, num_tokens=3, **kwargs):
    codes = torch.full((batch, num_tokens), -1, dtype=torch.long, device=DEVICE)
    nxt = torch.full((logits.shape[0],), -1, dtype=torch.long, device=DEVICE)
    ts.sample_guided_(logits, scale, temperature, seed, step, nxt, codes, **kwargs)
    return codes, nxt


def test_draws_follow_softmax_of_tempered_logits():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    # the interpreter runs ~15 ms per program: fewer draws on CPU, with a 4-sigma tolerance that a
    # wrong temperature (p^2 instead of p: off by 0.13) or an off-by-one token still fails
    rows = 600 if DEVICE == "cpu" else 20000
    tol = 0.07 if DEVICE == "cpu" else 0.015
    temperature = 0.5  # sampling softmax(l / T) with l = T * log p gives p back
    logits = (temperature * probs.log()).expand(rows, -1).contiguous().to(DEVICE)
    seed = torch.tensor([7], device=DEVICE)
    codes, nxt = _run(logits, None, temperature, seed, step=1, batch=rows)
    freq = torch.bincount(codes[:, 1].cpu(), minlength=4).float() / rows
    assert (freq - probs).abs().max() < tol, freq
    assert torch.equal(nxt, codes[:, 1]) and (codes[:, [0, 2]] == -1).all()  # only column `step` written


def test_guidance_mix_and_doubled_next_input():
    batch, vocab = 4, 300  # vocab not a power of two: masked lanes never win
    cond = torch.zeros(batch, vocab)
    uncond = torch.zeros(batch, vocab)
    target = torch.tensor([5, 299, 0, 17])
    cond[torch.arange(batch), target] = 30.0  # with scale 2 the guided logit is 60: always chosen
    uncond[torch.arange(batch), (target + 1) % vocab] = 25.0  # guided: -25, never chosen
    logits = torch.cat([cond, uncond]).to(DEVICE)
    codes, nxt = _run(logits, 2.0, 1.0, torch.tensor([3], device=DEVICE), step=0, batch=batch)
    assert codes[:, 0].tolist() == target.tolist()
    assert nxt.tolist() == target.tolist() * 2


def test_seed_and_step_make_draws_reproducible_and_distinct():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g).to(DEVICE)
    s1, s2 = torch.tensor([11], device=DEVICE), torch.tensor([12], device=DEVICE)
    a, _ = _run(logits, None, 1.0, s1, 0, 64)
    b, _ = _run(logits, None, 1.0, s1, 0, 64)
    c, _ = _run(logits, None, 1.0, s2, 0, 64)
    d, _ = _run(logits, None, 1.0, s1, 1, 64)
    assert torch.equal(a[:, 0], b[:, 0])
    assert not torch.equal(a[:, 0], c[:, 0]) and not torch.equal(a[:, 0], d[:, 1])


def test_vocabulary_blocks_do_not_change_the_draws():
    # the noise is keyed by the token, not by the program: any split of the vocabulary over
    # programs picks the same tokens; a wrong pick between blocks (off by a block, last instead of
    # best) changes them. Ties (equal logits and noise) cannot happen: the noise is per token.
    g = torch.Generator().manual_seed(1)
    batch, vocab = 6, 300
    logits = (3 * torch.randn(2 * batch, vocab, generator=g)).to(DEVICE)
    seed = torch.tensor([5], device=DEVICE)
    draws = []
    for block_v in (512, 64, 16):  # 1, 5 and 19 blocks (the last one ragged)
        codes, nxt = _run(logits, 1.5, 0.7, seed, 1, batch, block_v=block_v)
        assert torch.equal(nxt, codes[:, 1].repeat(2))
        draws.append(codes[:, 1])
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2]), draws
    assert len(set(draws[0].tolist())) > 1  # not one constant token
    with pytest.raises(ValueError, match="power of two"):
        _run(logits, 1.5, 0.7, seed, 1, batch, block_v=48)


def test_draw_seed_uses_the_generator():
    g1 = torch.Generator(DEVICE).manual_seed(5)
    g2 = torch.Generator(DEVICE).manual_seed(5)
    assert torch.equal(ts.draw_seed(g1, torch.device(DEVICE)), ts.draw_seed(g2, torch.device(DEVICE)))


def test_bad_arguments_raise():
    logits = torch.zeros(3, 8, device=DEVICE)
    seed = torch.tensor([1], device=DEVICE)
    with pytest.raises(ValueError, match="even number of rows"):
        _run(logits, 2.0, 1.0, seed, 0, 1)
    with pytest.raises(ValueError, match="temperature > 0"):
        _run(logits, None, 0.0, seed, 0, 3)
    with pytest.raises(ValueError, match="do not fit"):
        _run(logits, None, 1.0, seed, 0, 2)


def test_step_and_seed_are_checked():
    logits = torch.zeros(2, 8, device=DEVICE)
    codes = torch.zeros(2, 3, dtype=torch.long, device=DEVICE)
    nxt = torch.zeros(2, dtype=torch.long, device=DEVICE)
    seed = torch.tensor([1], device=DEVICE)
    with pytest.raises(ValueError, match="step 3 is outside the 3 code columns"):
        ts.sample_guided_(logits, None, 1.0, seed, 3, nxt, codes)
    with pytest.raises(ValueError, match="seed must be a"):
        ts.sample_guided_(logits, None, 1.0, torch.tensor([1, 2], device=DEVICE), 0, nxt, codes)
    with pytest.raises(ValueError, match="int64, contiguous"):
        ts.sample_guided_(logits, None, 1.0, seed, 0, nxt.int(), codes)
