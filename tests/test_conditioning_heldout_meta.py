"""Conditioning conversions of the large presets on the meta device (no memory, no values).

Before the fix every conversion of a meta model failed with ``RuntimeError: Tensor.item() cannot
be called on meta tensors``. Now the conversions that are exact by structure (the target's
projections are the source's) are made, and those whose exactness depends on the values are
refused with a message that says so."""

from __future__ import annotations

import pytest

import aimkit
from aimkit.conditioning import InexactConversionError


@pytest.fixture(scope="module")
def aim_xl():
    return aimkit.build("aim-xl", device="meta", tokenizer=None)  # adaLN-group, G = 4, 48 layers


@pytest.mark.parametrize(("kind", "options"), [("adaln", {}), ("adaln-group", {"num_groups": 8}),
                                               ("adaln-group", {"num_groups": 48}), ("adaln-group", {"num_groups": 4})])
def test_group_to_a_finer_kind_on_meta(aim_xl, kind, options):
    conv = aim_xl.convert_conditioning(kind, **options)
    assert conv.device.type == "meta" and conv.conversion_error == 0.0
    assert all(p.is_meta for p in conv.conditioning.parameters())
    assert conv.config.conditioning.name == kind
    want = aimkit.build("aim-xl", device="meta", tokenizer=None, conditioning=kind, **options)
    assert conv.num_params() == want.num_params()
    assert conv.config == want.config


@pytest.mark.parametrize(("kind", "options"), [("adaln-single", {}), ("adaln-group", {"num_groups": 2}),
                                               ("adaln-group", {"num_groups": 6})])
def test_merging_projections_on_meta_is_refused(aim_xl, kind, options):
    with pytest.raises(InexactConversionError, match="meta device"):
        aim_xl.convert_conditioning(kind, **options)
    with pytest.raises(InexactConversionError, match="meta device"):
        aim_xl.convert_conditioning(kind, approximate=True, **options)


def test_per_layer_preset_on_meta():
    gen = aimkit.build("aim-b", device="meta", tokenizer=None)  # per-layer adaLN, 24 layers
    assert gen.convert_conditioning("adaln").conversion_error == 0.0
    with pytest.raises(InexactConversionError, match="meta device"):
        gen.convert_conditioning("adaln-group", num_groups=4)
