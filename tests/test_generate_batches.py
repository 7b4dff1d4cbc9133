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
