"""Held-out conversions between the adaLN kinds: the bias split a target keeps, bit-exact round
trips, ``conversion_error`` of exact conversions, and logits / cached decoding after conversion on
depths that groups do not divide, G = 1 and G = n_layer, several widths and dtypes.

Before the fix every group target re-split its biases around their mean: a conversion that keeps
the source's projections (single -> group, group(G) -> group(k G), a kind to itself) changed the
stored tensors, so round trips did not give the weights back, an exact float64 conversion could
report ``conversion_error`` 1e-17, and a bfloat16 model rounded (and warned) on conversions that
need no arithmetic at all."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_float_close, randomize_

import aimkit
from aimkit.conditioning import InexactConversionError

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _gen(kind, n_layer=5, d_model=48, dtype=torch.float32, backbone="aim-test-mamba2", **options):
    gen = aimkit.build(backbone, n_layer=n_layer, d_model=d_model, conditioning=kind, dtype=dtype, **options)
    return randomize_(gen, seed=n_layer + d_model).eval()


def _batch(gen):
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, gen.vocab_size, (2, gen.num_tokens), generator=g)
    return codes, torch.tensor([1, gen.num_classes - 1])


def _decoded(gen, codes, labels):
    """Logits (B, N, V) of prefill + cached decoding, teacher-forced with ``codes``."""
    cond = gen.condition(labels)
    params = gen.allocate_inference_cache(labels.shape[0])
    out = [gen.prefill(cond, params)]
    params.advance()
    for k in range(codes.shape[1] - 1):
        out.append(gen.decode_step(codes[:, k], cond, params))
        params.advance()
    return torch.stack(out, 1)


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# a target at least as fine as the source: its projections are the source's (n_layer 5)
FINER = [
    pytest.param("adaln-single", {}, "adaln-group", {"num_groups": 2}, id="single-to-group2"),
    pytest.param("adaln-single", {}, "adaln-group", {"num_groups": 3}, id="single-to-group3"),
    pytest.param("adaln-group", {"num_groups": 1}, "adaln-single", {}, id="group1-to-single"),
    pytest.param("adaln-group", {"num_groups": 2}, "adaln-group", {"num_groups": 4}, id="group2-to-group4"),
    pytest.param("adaln-group", {"num_groups": 3}, "adaln-group", {"num_groups": 3}, id="group3-to-itself"),
    pytest.param("adaln-group", {"num_groups": 5}, "adaln-group", {"num_groups": 5}, id="group5-to-itself"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("source", "options", "target", "target_options"), FINER)
def test_finer_target_keeps_the_tensors_and_the_round_trip_is_bit_exact(source, options, target, target_options,
                                                                        dtype):
    gen = _gen(source, dtype=dtype, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rounding to report: nothing is summed
        conv = gen.convert_conditioning(target, **target_options)
        back = conv.convert_conditioning(source, **options)
    assert conv.conversion_error == 0.0 and back.conversion_error == 0.0
    src, new = gen.conditioning, conv.conditioning
    for i in range(gen.config.n_layer):
        assert torch.equal(new.tables[i], src.tables[i])
    d = src.chunks * src.d_model
    for g in range(new.num_groups):
        rows, src_rows = slice(g * d, (g + 1) * d), slice((g % src.num_groups) * d, (g % src.num_groups + 1) * d)
        assert torch.equal(new.proj.weight[rows], src.proj.weight[src_rows])
        assert torch.equal(new.proj.bias[rows], src.proj.bias[src_rows])
    _assert_same_tensors(back.conditioning.state_dict(), gen.conditioning.state_dict())
    codes, labels = _batch(gen)
    with torch.no_grad():
        assert_float_close(conv(codes, labels), gen(codes, labels))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_per_layer_to_group_and_back_is_bit_exact(groups, dtype):
    """Per-layer adaLN whose layers i and i + G share a weight (their biases differ)."""
    gen = _gen("adaln", dtype=dtype)
    with torch.no_grad():
        for i, lin in enumerate(gen.conditioning.layers):
            lin.weight.copy_(gen.conditioning.layers[i % groups].weight)
    kind, options = ("adaln-single", {}) if groups == 1 else ("adaln-group", {"num_groups": groups})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv = gen.convert_conditioning(kind, **options)
        back = conv.convert_conditioning("adaln")
    assert conv.conversion_error == 0.0 and back.conversion_error == 0.0
    _assert_same_tensors(back.conditioning.state_dict(), gen.conditioning.state_dict())
    codes, labels = _batch(gen)
    with torch.no_grad():
        assert_float_close(conv(codes, labels), gen(codes, labels))


def test_per_layer_with_equal_biases_keeps_them_in_the_group_bias():
    gen = _gen("adaln", n_layer=4, dtype=torch.float64)
    with torch.no_grad():
        for lin in gen.conditioning.layers:
            lin.weight.copy_(gen.conditioning.layers[0].weight)
            lin.bias.copy_(gen.conditioning.layers[0].bias)
    single = gen.convert_conditioning("adaln-single")
    assert torch.equal(single.conditioning.proj.bias, gen.conditioning.layers[0].bias)
    assert all(t.count_nonzero() == 0 for t in single.conditioning.tables)


def test_refusal_names_the_requested_kind():
    """A refused conversion to adaln-single was reported as one to 'adaln-group with num_groups=1'."""
    gen = _gen("adaln", n_layer=3)
    with pytest.raises(InexactConversionError, match="to adaln-single exactly.*approximate=True"):
        gen.convert_conditioning("adaln-single")
    with pytest.raises(InexactConversionError, match="to adaln-group with num_groups=2 exactly"):
        gen.convert_conditioning("adaln-group", num_groups=2)


@pytest.mark.parametrize("backbone", ["aim-test-mamba2", "aim-test-transformer"])
@pytest.mark.parametrize("groups", [1, 2, 3, 5])
def test_float64_group_to_per_layer_and_back_same_logits_and_decoding(backbone, groups):
    """n_layer 5 (not divisible by 2 or 3), d_model 40: teacher-forced logits and cached decoding
    after the conversion and after converting back equal the original's in float64."""
    gen = _gen("adaln-group", n_layer=5, d_model=40, dtype=torch.float64, backbone=backbone, num_groups=groups)
    codes, labels = _batch(gen)
    with torch.no_grad():
        want, want_decoded = gen(codes, labels), _decoded(gen, codes, labels)
        for conv in (per_layer := gen.convert_conditioning("adaln"),
                     per_layer.convert_conditioning("adaln-group", num_groups=groups)):
            assert conv.conversion_error == 0.0
            assert_float_close(conv(codes, labels), want)
            assert_float_close(_decoded(conv, codes, labels), want_decoded)


def test_bfloat16_group_to_per_layer_reports_the_rounding_of_the_folded_bias():
    """Folding a group bias into per-layer biases is the one step that rounds in bfloat16."""
    gen = _gen("adaln-group", dtype=torch.bfloat16, num_groups=2)
    with pytest.warns(UserWarning, match="exact in float32"):
        conv = gen.convert_conditioning("adaln")
    assert 0 < conv.conversion_error <= 2 * torch.finfo(torch.bfloat16).eps * 4
    assert conv.conditioning.layers[0].weight.dtype == torch.bfloat16
