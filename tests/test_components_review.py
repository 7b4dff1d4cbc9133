"""Review of the model components' public behaviour on CPU: conditioning conversions in float64,
the tokenizer's input checks and weight prefixes, and the official key map's collisions."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_float_close, randomize_

import aimkit
from aimkit.config import ComponentSpec
from aimkit.errors import CheckpointError, ConfigError
from aimkit.tokenizers.vq import VQConfig, VQModel
from aimkit.tokenizers.vq_tiny import VQTiny

# a vq-f16 tokenizer small enough for a test: f2, 64 codes
SMALL_VQ = VQConfig(codebook_size=64, z_channels=32, ch=32, ch_mult=(1, 1), encoder_res_blocks=1,
                    decoder_res_blocks=1, image_size=32)


def _logits(gen):
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, gen.vocab_size, (3, gen.num_tokens), generator=g)
    return gen(codes, torch.tensor([0, 5, 10]))


# --------------------------------------------------------------------------------------------
# conditioning conversions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["aim-test-mamba2", "aim-test-transformer"])
@pytest.mark.parametrize(("source", "options", "target", "target_options"), [
    ("adaln-group", {"num_groups": 2}, "adaln", {}),
    ("adaln-single", {}, "adaln-group", {"num_groups": 2}),
])
def test_conversion_of_a_float64_model_is_exact_in_float64(backbone, source, options, target, target_options):
    """A float64 model's maps were squeezed through float32: logits moved by ~1e-7 (float32
    rounding, 1e9 float64 epsilons) while ``conversion_error`` said 0."""
    gen = randomize_(aimkit.build(backbone, n_layer=4, conditioning=source, dtype=torch.float64, **options))
    conv = gen.convert_conditioning(target, **target_options)
    assert conv.dtype == torch.float64 and conv.conversion_error == 0.0
    assert_float_close(_logits(conv), _logits(gen))
    back = conv.convert_conditioning(source, **options)
    assert_float_close(_logits(back), _logits(gen))


def test_float64_per_layer_affine_keeps_float64():
    gen = randomize_(aimkit.build("aim-test-mamba2", conditioning="adaln", dtype=torch.float64))
    weight, bias = gen.conditioning.per_layer_affine()
    assert weight.dtype == bias.dtype == torch.float64
    assert torch.equal(weight[1], gen.conditioning.layers[1].weight)


# --------------------------------------------------------------------------------------------
# tokenizer inputs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tok():
    torch.manual_seed(0)
    return VQTiny().eval()


@pytest.mark.parametrize(("images", "what"), [
    (torch.rand(1, 3, 16, 16) * 255, "max 2"),  # pixels in [0, 255] as floats
    (torch.randn(1, 3, 16, 16) * 3, "in \\[-1, 1\\]"),  # ImageNet-normalised, roughly
    (torch.full((1, 3, 16, 16), float("nan")), "not finite"),
    (torch.full((1, 3, 16, 16), float("-inf")), "not finite"),
])
def test_encode_refuses_images_outside_the_value_range(tiny_tok, images, what):
    """They were encoded into codes without complaint (garbage, silently)."""
    with pytest.raises(ConfigError, match=what):
        tiny_tok.encode(images)
    with pytest.raises(ConfigError, match="images"):
        tiny_tok(images)


def test_encode_accepts_the_edges_and_resampling_overshoot(tiny_tok):
    x = torch.rand(2, 3, 16, 32) * 2 - 1
    x[0, 0, 0, 0], x[1, 0, 0, 0] = -1.0, 1.0
    assert tiny_tok.encode(x).shape == (2, 32)
    assert tiny_tok.encode(x * 1.05).shape == (2, 32)  # bicubic resizing overshoots a little


@pytest.mark.parametrize(("grid", "what"), [
    (16, "grid must be a pair"),
    ((-4, -4), "positive"),
    ((4.5, 3.5556), "grid must be a pair"),
    ((4, 4, 1), "grid must be a pair"),
])
def test_decode_grid_errors_name_the_argument(tiny_tok, grid, what):
    """``grid=16`` raised TypeError (no len), ``(-4, -4)`` a reshape RuntimeError from deep inside."""
    codes = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(ConfigError, match=what):
        tiny_tok.decode(codes, grid=grid)


def test_decode_grid_as_list_and_numpy_ints(tiny_tok):
    np = pytest.importorskip("numpy")
    codes = torch.zeros(1, 8, dtype=torch.long)
    assert tiny_tok.decode(codes, grid=[2, 4]).shape == (1, 3, 8, 16)
    assert tiny_tok.decode(codes, grid=(np.int64(4), np.int64(2))).shape == (1, 3, 16, 8)
    assert tiny_tok.grid_size(np.int64(64)) == 16


# --------------------------------------------------------------------------------------------
# tokenizer weights
# --------------------------------------------------------------------------------------------


def test_vq_f16_loads_from_a_saved_generator(tmp_path):
    """``VQModel.load_weights(saved_dir)`` (and so ``aimkit.build(..., tokenizer_weights=saved_dir)``)
    refused the ``tokenizer.`` keys of a ``save_pretrained`` file, though the docstring promises
    "a whole generator checkpoint of which only that part is used"."""
    torch.manual_seed(0)
    gen = randomize_(aimkit.build("aim-test-mamba2", tokenizer=ComponentSpec("vq-f16", SMALL_VQ), vocab_size=64))
    gen.save_pretrained(tmp_path / "m")
    tok = VQModel(SMALL_VQ).load_weights(tmp_path / "m")
    own = gen.tokenizer.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in tok.state_dict().items())


# --------------------------------------------------------------------------------------------
# official key map
# --------------------------------------------------------------------------------------------


def test_official_file_with_an_aimkit_named_duplicate_is_refused():
    """An official file that also holds a tensor under the aimkit name it maps to: one of the
    two silently replaced the other (LlamaGen's map refuses this)."""
    from aimkit.official import from_official, to_official

    gen = randomize_(aimkit.build("aim-test-mamba2"))
    state = to_official(gen)
    state["pos_embed.weight"] = torch.zeros_like(gen.pos_embed.weight)
    with pytest.raises(CheckpointError, match="pos_embed.weight"):
        from_official(gen, state)
