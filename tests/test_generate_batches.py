"""``generate_batches`` and the decoding of one batch behind the sampling of the next."""

import numpy as np
import pytest
import torch
from conftest import tiny_generator

from aimkit.errors import ConfigError
from aimkit.samplers import generate, generate_batches, to_uint8
from aimkit.samplers._decode_behind import decode_pixels, outputs_in_order

SETTINGS = dict(cfg_scale=1.5, temperature=1.0, top_k=0, top_p=1.0)


@pytest.fixture(scope="module")
def gen():
    return tiny_generator(tokenizer="vq-f4-tiny").eval()


@pytest.mark.parametrize("output", ["tokens", "tensor", "uint8", "pil"])
def test_each_batch_equals_its_own_generate_call(gen, output):
    batches = [([1, 2, 3], 7), ([4], 8), ([5, 0], None)]
    got = list(generate_batches(gen, batches[:2], output=output, progress=False, **SETTINGS))
    assert len(got) == 2
    for (labels, seed), part in zip(batches[:2], got):
        want = generate(gen, labels, seed=seed, output=output, batch_size=len(labels), progress=False, **SETTINGS)
        if output == "pil":
            assert [np.asarray(a).tolist() for a in part] == [np.asarray(b).tolist() for b in want]
        elif output == "uint8":
            assert part.dtype == np.uint8 and np.array_equal(part, want)
        else:
            assert torch.equal(part, want)


def test_generate_over_several_batches_is_one_random_stream(gen):
    """Batching changes nothing but the batch size's effect on the random stream: the second
    batch continues the first one's generator (two calls with the same seed would repeat it)."""
    labels = [1, 2, 1, 2]
    whole = generate(gen, labels, seed=3, output="tokens", batch_size=2, progress=False, **SETTINGS)
    first = generate(gen, labels[:2], seed=3, output="tokens", batch_size=2, progress=False, **SETTINGS)
    assert torch.equal(whole[:2], first)
    assert not torch.equal(whole[2:], first)


def test_pixels_of_a_tensor_equal_to_uint8(gen):
    codes = generate(gen, [1, 2], seed=0, output="tokens", progress=False, **SETTINGS)
    pixels = decode_pixels(gen, codes, "tensor")
    assert pixels.dtype == torch.float32 and pixels.min() >= -1 and pixels.max() <= 1
    assert np.array_equal(decode_pixels(gen, codes, "uint8").numpy(), to_uint8(pixels))
    pixels.mul_(2)  # a normal tensor: callers may change it in place


def test_outputs_come_in_order_and_one_behind(gen):
    """The output of batch k is taken only once batch k + 1's codes exist."""
    codes = [torch.randint(0, gen.vocab_size, (n, gen.num_tokens)) for n in (1, 2, 3)]
    asked = []

    def batches():
        for i, c in enumerate(codes):
            asked.append(i)
            yield c

    outputs = outputs_in_order(gen, batches(), "tokens")
    assert torch.equal(next(outputs), codes[0]) and asked == [0, 1]
    assert [o.shape[0] for o in outputs] == [2, 3]


def test_codes_are_checked_once_per_batch_and_decoded_per_chunk_without_a_check(gen, monkeypatch):
    """The range check reads the codes back to the host: once per batch (on the sampling stream
    on CUDA), never per chunk, where it would stall the decoding queued on the side stream."""
    import aimkit.samplers._decode_behind as behind

    monkeypatch.setattr(behind, "DECODE_CHUNK", 2)
    tok = gen.tokenizer
    calls = {"check": 0, "checked": 0, "decode": 0}
    for name, key in (("check_codes", "check"), ("decode_checked", "checked"), ("decode", "decode")):
        original = getattr(tok, name)
        monkeypatch.setattr(tok, name, lambda *a, _f=original, _k=key, **k: calls.__setitem__(_k, calls[_k] + 1)
                            or _f(*a, **k))
    codes = [torch.randint(0, gen.vocab_size, (n, gen.num_tokens)) for n in (5, 1)]
    outs = list(outputs_in_order(gen, iter(codes), "uint8"))
    assert [o.shape[0] for o in outs] == [5, 1]
    assert calls == {"check": 2, "checked": 4, "decode": 0}  # 3 chunks of batch 0, 1 of batch 1
    bad = torch.full((1, gen.num_tokens), gen.vocab_size)
    with pytest.raises(ConfigError, match="out of range"):
        list(outputs_in_order(gen, iter([bad]), "uint8"))


class _SamplingFailed(Exception):
    pass


@pytest.mark.parametrize("error", [_SamplingFailed, KeyboardInterrupt])
def test_a_failure_while_sampling_still_yields_the_batch_already_decoded(gen, error):
    """Batch k is yielded before the error of batch k + 1 propagates: a shard writer keeps it."""
    codes = [torch.randint(0, gen.vocab_size, (n, gen.num_tokens)) for n in (1, 2)]

    def batches():
        yield from codes
        raise error("batch 2 failed")

    got = []
    with pytest.raises(error, match="batch 2 failed"):
        for out in outputs_in_order(gen, batches(), "tokens"):
            got.append(out)
    assert [g.shape[0] for g in got] == [1, 2]
    assert all(torch.equal(g, c) for g, c in zip(got, codes))


def test_a_consumer_that_stops_early_closes_the_stream_cleanly(gen):
    sampled = []

    def batches():
        for n in (1, 2, 3):
            sampled.append(n)
            yield torch.randint(0, gen.vocab_size, (n, gen.num_tokens))

    outputs = outputs_in_order(gen, batches(), "uint8")
    assert next(outputs).shape[0] == 1
    outputs.close()  # no error, and nothing more is sampled (on CUDA it also waits for the copy in flight)
    assert sampled == [1, 2]


def test_arguments_and_every_batch_are_checked_before_sampling(gen):
    with pytest.raises(ConfigError, match="label 99 is outside"):
        generate_batches(gen, [([1], 0), ([99], 1)], output="tokens")
    with pytest.raises(ConfigError, match=r"\(labels, seed\) pairs"):
        generate_batches(gen, [[1, 2]], output="tokens")
    with pytest.raises(ConfigError, match="seed must be"):
        generate_batches(gen, [([1], -1)], output="tokens")
    with pytest.raises(ConfigError, match="needs its labels"):
        generate_batches(gen, [(None, 0)], output="tokens")
    with pytest.raises(ConfigError, match="unknown output"):
        generate_batches(gen, [([1], 0)], output="png")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decoding_on_a_side_stream_gives_the_same_pixels():
    """On CUDA batch k decodes on a side stream while batch k + 1 samples: the same images as
    decoding each batch's codes afterwards on the default stream."""
    gen = tiny_generator(tokenizer="vq-f4-tiny", device="cuda").eval()
    batches = [([i % gen.num_classes] * 8, i) for i in range(4)]
    got = list(gen.generate_batches(batches, output="uint8", progress=False, **SETTINGS))
    for (labels, seed), part in zip(batches, got):
        codes = gen.generate(labels, seed=seed, output="tokens", batch_size=8, progress=False, **SETTINGS)
        torch.cuda.synchronize()
        assert np.array_equal(part, decode_pixels(gen, codes.cuda(), "uint8").cpu().numpy())
    tensors = list(gen.generate_batches(batches[:2], output="tensor", progress=False, **SETTINGS))
    assert not any(t.is_pinned() for t in tensors)  # pageable copies: pinned staging is reused, not handed out


def test_a_ctrl_c_while_waiting_for_pixels_is_raised_after_that_batch_is_handed_over(gen, monkeypatch):
    import aimkit.samplers._decode_behind as behind

    original, interrupted = behind._Pending.result, []

    def result_interrupted_once(self):
        if not interrupted:
            interrupted.append(1)
            raise KeyboardInterrupt  # arrives during the wait for batch 0's copy
        return original(self)

    monkeypatch.setattr(behind._Pending, "result", result_interrupted_once)
    codes = [torch.randint(0, gen.vocab_size, (n, gen.num_tokens)) for n in (1, 2, 3)]
    got = []
    with pytest.raises(KeyboardInterrupt):
        for out in outputs_in_order(gen, iter(codes), "tokens"):
            got.append(out)
    assert [g.shape[0] for g in got] == [1]  # batch 0 reached the consumer before the interrupt
