"""Checkpoints that hold only one part (generator or tokenizer), and tokenizer_weights=PATH."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_

import aimkit
from aimkit.official import to_official
from aimkit.weights import save_safetensors_atomic

MODEL = "aim-test-vq"  # a tiny Mamba2 generator with the vq-f4-tiny tokenizer


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return randomize_(aimkit.build(MODEL, pretrained=False), seed=5)


def _equal_part(a, b, prefix, negate=False):
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith(prefix) != negate]
    return all(torch.equal(sa[k], sb[k]) for k in keys)


def test_generator_only_official_checkpoint_names_the_missing_tokenizer(tmp_path, source):
    sd = {k: v for k, v in to_official(source).items() if k.startswith("mamba.")}
    save_safetensors_atomic(sd, tmp_path / "gen_only.safetensors")
    with pytest.warns(UserWarning, match="holds no tokenizer weights"):
        gen = aimkit.build(MODEL, pretrained=tmp_path / "gen_only.safetensors")
    assert _equal_part(gen, source, "tokenizer.", negate=True)
    assert not _equal_part(gen, source, "tokenizer.")


def test_tokens_only_generator_loads_a_full_checkpoint_without_its_tokenizer(tmp_path, source):
    torch.save(to_official(source), tmp_path / "full.pt")
    with pytest.warns(UserWarning, match="built without a tokenizer"):
        gen = aimkit.build(MODEL, pretrained=tmp_path / "full.pt", tokenizer=None)
    assert gen.tokenizer is None
    assert gen.state_dict().keys() == {k for k in source.state_dict() if not k.startswith("tokenizer.")}
    assert _equal_part(gen, source, "tokenizer.", negate=True)


def test_tokens_only_generator_still_refuses_tensors_it_cannot_place(tmp_path, source):
    sd = to_official(source)
    sd["mamba.backbone.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(aimkit.CheckpointError, match="mamba.backbone.extra.weight"):
        aimkit.build(MODEL, pretrained=tmp_path / "extra.pt", tokenizer=None)


def test_convert_no_tokenizer_saves_the_generator_of_a_full_official_checkpoint(tmp_path, source):
    from aimkit.cli import main

    torch.save(to_official(source), tmp_path / "full.pt")
    argv = ["convert", str(tmp_path / "full.pt"), str(tmp_path / "out"), "--model", MODEL, "--no-tokenizer"]
    with pytest.warns(UserWarning, match="built without a tokenizer"):
        assert main(argv) == 0
    saved = aimkit.build(tmp_path / "out")
    assert saved.tokenizer is None and _equal_part(saved, source, "tokenizer.", negate=True)


def test_tokens_only_build_of_a_preset_with_shipped_weights_takes_its_generator():
    full = aimkit.build("aim-tiny-shapes")
    with pytest.warns(UserWarning, match="built without a tokenizer"):
        tokens_only = aimkit.build("aim-tiny-shapes", tokenizer=None)
    assert _equal_part(tokens_only, full, "tokenizer.", negate=True)


def test_tokenizer_only_checkpoint_names_the_missing_generator(tmp_path, source):
    sd = {k: v for k, v in to_official(source).items() if k.startswith("vqvae.")}
    torch.save(sd, tmp_path / "tok_only.pt")
    with pytest.warns(UserWarning, match="holds no generator weights"):
        gen = aimkit.build(MODEL, pretrained=tmp_path / "tok_only.pt")
    assert _equal_part(gen, source, "tokenizer.")


def test_tokenizer_weights_in_llamagen_layout(tmp_path, source):
    torch.save({"model": source.tokenizer.state_dict()}, tmp_path / "vq.pt")
    gen = aimkit.build(MODEL, pretrained=False, tokenizer_weights=tmp_path / "vq.pt")
    assert _equal_part(gen, source, "tokenizer.")


def test_tokenizer_weights_without_tokenizer_is_an_error(tmp_path, source):
    torch.save({"model": source.tokenizer.state_dict()}, tmp_path / "vq.pt")
    with pytest.raises(aimkit.ConfigError, match="no tokenizer"):
        aimkit.build(MODEL, pretrained=False, tokenizer=None, tokenizer_weights=tmp_path / "vq.pt")


def test_sample_command_random_weights_are_seeded():
    """Reruns of `aimkit sample` without weights must rebuild the same random model (resume checks it)."""
    from types import SimpleNamespace

    from aimkit.commands.sample import build_model

    args = SimpleNamespace(model="aim-tiny-shapes", pretrained=False, dtype="float32", seed=3,
                           decode_position_offset=None)
    a = build_model(args, torch.device("cpu"))
    b = build_model(args, torch.device("cpu"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
