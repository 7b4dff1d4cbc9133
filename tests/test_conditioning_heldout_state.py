"""What a conditioning conversion carries over besides the conditioning itself: train/eval mode,
frozen parameters, the tokenizer, the config's other fields, dtype, device, the policy, tied
weights, and a save_pretrained / build round trip of the converted model.

Before the fix the new conditioning module of a model in eval mode was in training mode (the
copy reported ``training`` inconsistently), and a frozen conditioning came back trainable."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_float_close, randomize_

import aimkit
from aimkit.config import ComponentSpec


def _group(**overrides):
    gen = aimkit.build("aim-test-vq", n_layer=3, conditioning="adaln-group", num_groups=3, **overrides)
    return randomize_(gen, seed=3)


def test_eval_mode_is_kept():
    gen = _group().eval()
    conv = gen.convert_conditioning("adaln")
    assert [n for n, m in conv.named_modules() if m.training] == []
    train = _group().train().convert_conditioning("adaln")
    assert all(m.training for m in train.modules())


def test_frozen_conditioning_stays_frozen():
    gen = _group()
    gen.requires_grad_(False)
    conv = gen.convert_conditioning("adaln")
    assert not any(p.requires_grad for p in conv.parameters())
    trainable = _group().convert_conditioning("adaln")
    assert all(p.requires_grad for p in trainable.conditioning.parameters())


def test_everything_else_is_carried_over():
    names = tuple(f"class {i}" for i in range(10))
    gen = _group(class_names=names, decode_position_offset=1).eval()
    gen.set_policy(gen.policy.replace(state_dtype="model"))
    conv = gen.convert_conditioning("adaln")
    spec = ComponentSpec("adaln", conv.config.conditioning.config)
    assert conv.config == dataclasses.replace(gen.config, conditioning=spec)
    assert conv.config.class_names == names and conv.config.fid_sampling == gen.config.fid_sampling
    assert conv.policy == gen.policy and all(m.policy == gen.policy for m in conv.modules() if hasattr(m, "policy"))
    assert conv.lm_head.weight is conv.tok_embed.weight  # still tied
    assert conv.lm_head.weight is not gen.tok_embed.weight  # a copy, not shared with the source
    own = dict(gen.named_parameters())
    for name, p in conv.named_parameters():
        if not name.startswith("conditioning."):
            assert torch.equal(p, own[name]) and p.dtype == own[name].dtype and p.device == own[name].device, name
    assert conv.tokenizer is not None and type(conv.tokenizer) is type(gen.tokenizer)


@pytest.mark.filterwarnings("ignore:conversion to adaln is exact in float32")  # bfloat16 rounds the folded bias
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("overrides", [{"num_classes": 1}, {"class_dropout": 0.0}, {"tie_head": False}],
                         ids=["one-class", "no-dropout", "untied"])
def test_edge_configs_convert_save_and_load(tmp_path, overrides, dtype):
    gen = _group(dtype=dtype, **overrides).eval()
    conv = gen.convert_conditioning("adaln")
    assert conv.dtype == dtype and conv.conditioning.layers[0].weight.dtype == dtype
    codes = torch.randint(0, gen.vocab_size, (2, gen.num_tokens), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, gen.num_classes - 1])
    again = aimkit.build(conv.save_pretrained(tmp_path / "m"))
    assert again.config == conv.config and again.dtype == dtype
    with torch.no_grad():
        assert torch.equal(again(codes, labels), conv(codes, labels))
        if dtype == torch.float64:
            assert_float_close(conv(codes, labels), gen(codes, labels))
    back = again.convert_conditioning("adaln-group", num_groups=3)
    assert back.config == gen.config
