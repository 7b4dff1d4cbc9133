"""Exact conversion between conditioning kinds, and the class embedder's dropout rules."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_float_close, randomize_

import aimkit
from aimkit.conditioning import ClassEmbedder, InexactConversionError


def _tiny(conditioning="adaln", **options):
    """``aim-test-mamba2`` with 4 layers (two groups of two) and the given conditioning kind."""
    return aimkit.build("aim-test-mamba2", n_layer=4, conditioning=conditioning, **options)


def _logits(gen):
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 64, (3, 16), generator=g)
    return gen(codes, torch.tensor([0, 5, 10]))


def test_group_to_per_layer_is_exact():
    gen = randomize_(_tiny("adaln-group", num_groups=2))
    conv = gen.convert_conditioning("adaln")
    assert conv.config.conditioning.name == "adaln" and type(conv.conditioning).__name__ == "AdaLN"
    assert_float_close(_logits(conv), _logits(gen))


def test_single_to_group_to_per_layer_is_exact():
    gen = randomize_(_tiny("adaln-single"))
    group = gen.convert_conditioning("adaln-group", num_groups=2)
    assert group.conditioning.num_groups == 2
    per_layer = group.convert_conditioning("adaln")
    ref = _logits(gen)
    assert_float_close(_logits(group), ref)
    assert_float_close(_logits(per_layer), ref)


def test_reverse_direction_exact_when_projections_equal():
    gen = randomize_(_tiny("adaln-group", num_groups=2))
    back = gen.convert_conditioning("adaln").convert_conditioning("adaln-group", num_groups=2)
    assert_float_close(_logits(back), _logits(gen))
    # G=2 -> G=1 would merge different projections
    with pytest.raises(InexactConversionError, match="approximate=True"):
        gen.convert_conditioning("adaln-single")


def test_inexact_request_raises_and_approximate_reports():
    gen = randomize_(_tiny())  # per-layer, all projections differ
    with pytest.raises(InexactConversionError, match="layers \\[0, 2\\]"):
        gen.convert_conditioning("adaln-group", num_groups=2)
    with pytest.warns(UserWarning, match="approximate conversion"):
        approx = gen.convert_conditioning("adaln-group", num_groups=2, approximate=True)
    assert approx.conversion_error > 0
    assert approx.config.conditioning.config.num_groups == 2


def test_unknown_conversion_option():
    gen = _tiny()
    with pytest.raises(aimkit.ConfigError, match="num_group"):
        gen.convert_conditioning("adaln-group", num_group=2)


def test_converted_generator_saves_and_reloads(tmp_path):
    gen = randomize_(_tiny("adaln-group", num_groups=2)).convert_conditioning("adaln")
    gen.save_pretrained(tmp_path / "m")
    again = aimkit.build(tmp_path / "m")
    assert torch.equal(_logits(gen), _logits(again))


def test_label_dropout_only_in_training():
    emb = ClassEmbedder(10, 8, dropout_prob=0.5)
    labels = torch.arange(10).repeat(20)
    emb.eval()
    assert torch.equal(emb(labels), emb.embedding_table(labels))
    emb.train()
    torch.manual_seed(0)
    out = emb(labels)
    dropped = (out == emb.embedding_table.weight[10]).all(-1)
    assert 0.3 < dropped.float().mean() < 0.7


def test_adaln_zero_init_makes_blocks_identity():
    gen = _tiny()
    mods = gen.conditioning(torch.randn(2, 32))
    assert all(m.abs().max() == 0 for m in mods)


def test_bfloat16_conversion_reports_rounding():
    gen = randomize_(_tiny("adaln-group", num_groups=2)).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="exact in float32"):
        conv = gen.convert_conditioning("adaln")
    assert conv.conversion_error > 0 and conv.dtype == torch.bfloat16
    exact = randomize_(_tiny("adaln-group", num_groups=2)).convert_conditioning("adaln")
    assert exact.conversion_error == 0.0
