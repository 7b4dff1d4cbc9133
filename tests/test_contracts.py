"""Contract tests over every registered component (after timm's ``tests/test_models.py``).

The names come from the registries when this module is collected, so a plugin that registers a
component gets every test here: ``tests/plugins/example_backbone.py`` is imported below and runs
through all of them. Each component is built tiny (:func:`conftest.tiny_config`: its config
class's ``tiny()`` hook, else a registered ``aim-test-*`` preset's config for it, else its
defaults) inside a generator of width 32, 4 layers and 16 tokens, with seeded random weights.

* backbone x conditioning: forward/backward (a finite, non-zero gradient on every generator
  parameter), prefill + cached decoding against teacher forcing (float32 and float64),
  ``save_pretrained`` -> ``aimkit.build`` (bit-exact);
* conditioning x conditioning: ``Generator.convert_conditioning`` is exact or refuses;
* tokenizers: encode/decode shapes, ``load_weights`` strictness;
* samplers: the same tokens from the same seed;
* on a GPU: a captured decode graph is reused, and captured anew after ``set_policy``.
"""

from __future__ import annotations

import dataclasses
import itertools

import plugins.example_backbone  # noqa: F401  (registers the "example-conv" backbone)
import pytest
import torch
from conftest import assert_float_close, decode_all, randomize_, tiny_config, tiny_generator

import aimkit
from aimkit.conditioning.adaln import InexactConversionError
from aimkit.errors import CheckpointError
from aimkit.registry import BACKBONES, CONDITIONING, SAMPLERS, TOKENIZERS
from aimkit.weights import save_safetensors_atomic

N_LAYER = 4  # a grouped conditioning kind with its default groups (4) fits
BACKBONE_NAMES = BACKBONES.names()
CONDITIONING_NAMES = CONDITIONING.names()
PAIRS = [pytest.param(b, c, id=f"{b}-{c}") for b, c in itertools.product(BACKBONE_NAMES, CONDITIONING_NAMES)]
CONVERTIBLE = [n for n in CONDITIONING_NAMES if hasattr(CONDITIONING.get(n), "from_per_layer_affine")]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _generator(backbone="mamba2", conditioning="adaln", **overrides):
    return tiny_generator(backbone, conditioning, n_layer=N_LAYER, **overrides)


def _batch(gen, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, gen.vocab_size, (batch, gen.num_tokens), generator=g)
    labels = torch.tensor([0, gen.num_classes - 1, gen.null_class])[:batch]
    return codes, labels


def _kwargs(kind, name):
    """A component's tiny config as keyword arguments (for ``convert_conditioning``)."""
    config = tiny_config(kind, name)
    return {} if config is None else {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _build(registry, kind, name):
    config = tiny_config(kind, name)
    return registry.get(name)() if config is None else registry.get(name)(config=config)


# --------------------------------------------------------------------------------------------
# backbone x conditioning
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone,conditioning", PAIRS)
def test_forward_backward_reaches_every_parameter(backbone, conditioning):
    gen = _generator(backbone, conditioning).train()
    codes, labels = _batch(gen)
    logits = gen(codes, labels)
    assert logits.shape == (3, gen.num_tokens, gen.vocab_size) and logits.dtype == torch.float32
    gen.loss(codes, labels).backward()
    for name, p in gen.named_parameters():
        if name.startswith("tokenizer."):
            continue  # the tokenizer is not part of the generator's forward
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} gets an all-zero gradient"




@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("backbone,conditioning", PAIRS)
def test_cached_decoding_matches_teacher_forcing(backbone, conditioning, dtype):
    gen = _generator(backbone, conditioning).to(dtype)
    codes, labels = _batch(gen)
    with torch.no_grad():
        forced = gen(codes, labels)
        decoded = decode_all(gen, codes, labels)
    assert decoded.dtype == dtype
    assert_float_close(decoded, forced)  # 64 machine epsilons of the dtype


@pytest.mark.parametrize("backbone,conditioning", PAIRS)
def test_save_pretrained_then_build_is_bit_exact(tmp_path, backbone, conditioning):
    gen = _generator(backbone, conditioning)
    again = aimkit.build(gen.save_pretrained(tmp_path / "saved"))
    assert again.config == gen.config
    assert type(again.backbone) is type(gen.backbone) and type(again.conditioning) is type(gen.conditioning)
    codes, labels = _batch(gen)
    assert torch.equal(again(codes, labels), gen(codes, labels))


# --------------------------------------------------------------------------------------------
# conditioning conversions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source,target", [pytest.param(s, t, id=f"{s}-to-{t}")
                                           for s, t in itertools.product(CONVERTIBLE, CONVERTIBLE)])
def test_conditioning_conversion_is_exact_or_refused(source, target):
    """Exact (same logits; converting back is exact too), or InexactConversionError; never silent.

    A refused conversion within one family (both kinds with or both without a final adaLN layer)
    has an approximate version that warns; across the families none exists, and ``approximate``
    is refused too."""
    gen = _generator(conditioning=source)
    codes, labels = _batch(gen)
    with torch.no_grad():
        want = gen(codes, labels)
        try:
            converted = gen.convert_conditioning(target, **_kwargs("conditioning", target))
        except InexactConversionError:
            assert source != target, "converting to the same kind must be exact"
            if CONDITIONING.get(source).final_modulation != CONDITIONING.get(target).final_modulation:
                with pytest.raises(InexactConversionError, match="final adaLN"):
                    gen.convert_conditioning(target, approximate=True, **_kwargs("conditioning", target))
                return
            with pytest.warns(UserWarning, match="approximate"):
                approx = gen.convert_conditioning(target, approximate=True, **_kwargs("conditioning", target))
            assert approx.conversion_error > 0
            return
        assert converted.config.conditioning.name == target
        assert_float_close(converted(codes, labels), want)
        back = converted.convert_conditioning(source, **_kwargs("conditioning", source))
        assert_float_close(back(codes, labels), want)


# --------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=TOKENIZERS.names())
def tokenizer(request):
    torch.manual_seed(0)
    return randomize_(_build(TOKENIZERS, "tokenizer", request.param), seed=2).eval()


def test_tokenizer_encode_decode_shapes(tokenizer):
    d, c = tokenizer.downsample, tokenizer.in_channels
    images = torch.rand(2, c, 2 * d, 3 * d, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        codes = tokenizer.encode(images)
        assert codes.dtype == torch.int64 and codes.shape == (2, 6)
        assert 0 <= int(codes.min()) and int(codes.max()) < tokenizer.codebook_size
        assert tokenizer.decode(codes, grid=(2, 3)).shape == images.shape
        assert tokenizer.decode(codes[:, :4]).shape == (2, c, 2 * d, 2 * d)  # square by default
    assert tokenizer.grid_size(4 * d) == 4


def _save(state, path):
    save_safetensors_atomic({k: v.contiguous() for k, v in state.items()}, path)
    return path


def test_tokenizer_load_weights_is_strict(tokenizer, tmp_path):
    state = tokenizer.state_dict()
    fresh = _build(TOKENIZERS, "tokenizer", tokenizer.name)  # its own init differs from the randomised source
    fresh.load_weights(_save(state, tmp_path / "good.safetensors"))
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())

    first, second = list(state)[:2]
    bad = {k: v for k, v in state.items() if k != first}  # one missing
    bad.update({"extra.weight": torch.zeros(2), second: torch.zeros(*state[second].shape, 2)})
    other = _build(TOKENIZERS, "tokenizer", tokenizer.name)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        other.load_weights(_save(bad, tmp_path / "bad.safetensors"))
    assert all(f"1 {what} (" in str(info.value) for what in ("missing", "unexpected", "mis-shaped")), info.value
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items()), "half-loaded"


# --------------------------------------------------------------------------------------------
# samplers
# --------------------------------------------------------------------------------------------

SAMPLING = dict(cfg_scale=2.0, temperature=1.0, top_k=8, top_p=0.9)


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
@pytest.mark.parametrize("sampler_name", SAMPLERS.names())
def test_sampler_is_deterministic_given_a_seeded_generator(sampler_name, backbone):
    gen = tiny_generator(backbone)
    sampler = _build(SAMPLERS, "sampler", sampler_name)
    labels = torch.tensor([1, 4, 9])

    def draw(seed):
        return sampler.sample_tokens(gen, labels, generator=torch.Generator().manual_seed(seed), **SAMPLING)

    tokens = draw(0)
    assert tokens.shape == (3, gen.num_tokens) and tokens.dtype == torch.int64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < gen.vocab_size
    assert torch.equal(draw(0), tokens)
    assert not torch.equal(draw(1), tokens)


# --------------------------------------------------------------------------------------------
# GPU: captured decode graphs follow the model's policy
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_decode_graph_is_reused_and_recaptured_after_a_policy_change(backbone):
    from aimkit.policy import ExecutionPolicy
    from aimkit.samplers import AutoregressiveSampler, clear_decode_graphs

    gen = tiny_generator(backbone).cuda()
    gen.set_policy(ExecutionPolicy(decode_graph=True))
    sampler = AutoregressiveSampler()
    labels = torch.tensor([1, 4, 9], device="cuda")

    def draw():
        generator = torch.Generator(device="cuda").manual_seed(0)
        return sampler.sample_tokens(gen, labels, generator=generator, **SAMPLING)

    first = draw()
    assert sampler.last_capture_seconds > 0, "the first call captures a graph"
    assert torch.equal(draw(), first) and sampler.last_capture_seconds == 0.0, "the second call reuses it"
    gen.set_policy(ExecutionPolicy(decode_graph=True, decode_glue="reference", sampling="reference"))
    draw()
    assert sampler.last_capture_seconds > 0, "a policy change captures anew"
    clear_decode_graphs(gen)
