"""Tests of the embedded default model: the ``vq-f4-tiny`` tokenizer, the ``aim-tiny-shapes``
preset, the tokenizer recipe, and (when they are shipped) the trained weights in
``aimkit/assets/aim_tiny_shapes``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_

import aimkit
from aimkit._saved import read_saved_config
from aimkit.assets import embedded_weights
from aimkit.config import GeneratorConfig
from aimkit.registry import TOKENIZERS
from aimkit.tokenizers.vq_tiny import VQTiny, VQTinyConfig
from aimkit.weights import read_state_dict, save_safetensors_atomic

GENERATOR_PARAMS = 4_195_520
TOKENIZER_PARAMS = 1_076_843
SHIPPED = embedded_weights("aim-tiny-shapes")
needs_weights = pytest.mark.skipif(
    SHIPPED is None,
    reason="aimkit/assets/aim_tiny_shapes/model.safetensors is not there yet (made by recipes/build_tiny_shapes.py)",
)


# ---- (a) the tokenizer ------------------------------------------------------------------------


def test_vq_f4_tiny_encodes_64px_to_256_codes():
    tok = TOKENIZERS.get("vq-f4-tiny")()
    assert isinstance(tok, VQTiny) and isinstance(tok.config, VQTinyConfig)
    assert sum(p.numel() for p in tok.parameters()) == TOKENIZER_PARAMS
    assert (tok.downsample, tok.codebook_size, tok.embed_dim, tok.grid_size(64)) == (4, 512, 8, 16)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    codes = tok.encode(images)
    assert codes.shape == (2, 256) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 512
    recon = tok.decode(codes, clamp=True)
    assert recon.shape == (2, 3, 64, 64) and recon.abs().max() <= 1.0
    assert torch.equal(tok(images), tok.decode(codes))


def test_vq_f4_tiny_weights_round_trip_under_generator_prefix(tmp_path):
    tok = randomize_(VQTiny().eval(), seed=1)
    state = {f"tokenizer.{k}": v for k, v in tok.state_dict().items()}
    path = save_safetensors_atomic(state, tmp_path / "t.safetensors")
    again = VQTiny().load_weights(path).eval()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(tok.encode(images), again.encode(images))


def test_tokenizer_recipe_writes_loadable_weights(tmp_path):
    from aimkit.recipes.train_tokenizer import load_recipe, train

    recipe = load_recipe("vq_f4_tiny", {"steps": 2, "batch_size": 4, "num_workers": 0, "mixed_precision": "no",
                                        "eval_images": 8, "log_every": 1, "restart_every": 1})
    record = train(recipe, tmp_path, cpu=True)
    assert record["steps"] == 2 and record["heldout"]["images"] == 8
    assert json.loads((tmp_path / "tokenizer.json").read_text())["num_parameters"] == TOKENIZER_PARAMS
    VQTiny().load_weights(tmp_path / "tokenizer.safetensors")  # strict
    # the same file initialises a generator's tokenizer (the generator part stays random)
    with pytest.warns(UserWarning, match="no generator weights"):
        gen = aimkit.build("aim-tiny-shapes", pretrained=tmp_path / "tokenizer.safetensors")
    sd = read_state_dict(tmp_path / "tokenizer.safetensors")
    assert torch.equal(gen.tokenizer.quantize.embedding.weight, sd["tokenizer.quantize.embedding.weight"])


# ---- (b) the preset ---------------------------------------------------------------------------


def test_aim_tiny_shapes_preset_random_weights():
    assert "aim-tiny-shapes" in aimkit.list_models()
    torch.manual_seed(0)
    gen = aimkit.build("aim-tiny-shapes", pretrained=False)
    assert gen.num_params() == GENERATOR_PARAMS
    assert gen.num_params(include_tokenizer=True) == GENERATOR_PARAMS + TOKENIZER_PARAMS
    cfg = gen.config
    assert (cfg.d_model, cfg.n_layer, cfg.num_classes, cfg.num_tokens) == (256, 8, 36, 256)
    assert cfg.vocab_size == gen.tokenizer.codebook_size == 512
    assert (cfg.backbone.name, cfg.conditioning.name, cfg.tokenizer.name) == ("mamba2", "adaln-group", "vq-f4-tiny")
    assert GeneratorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    codes = torch.randint(0, 512, (2, 256))
    assert gen(codes, torch.tensor([0, 35])).shape == (2, 256, 512)


def test_float16_storage_loads_into_float32(tmp_path):
    torch.manual_seed(0)
    gen = randomize_(aimkit.build("aim-tiny-shapes", pretrained=False), seed=2)
    half = {k: v.half() for k, v in gen.state_dict().items()}
    gen.save_pretrained(tmp_path / "saved", storage_dtype=torch.float16)
    again = aimkit.build(tmp_path / "saved")
    assert again.dtype == torch.float32
    for k, v in again.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, half[k].float()), k


# ---- (c) the shipped weights ------------------------------------------------------------------


@needs_weights
def test_shipped_config_is_the_preset():
    assert read_saved_config(SHIPPED) == aimkit.resolve_config("aim-tiny-shapes")
    saved = json.loads((SHIPPED / "config.json").read_text())["generator"]  # the architecture only
    assert saved == json.loads(json.dumps(aimkit.resolve_config("aim-tiny-shapes").architecture_dict()))
    total = sum(p.stat().st_size for p in SHIPPED.iterdir() if p.is_file())
    assert total <= 12.5e6, f"the shipped folder is {total / 1e6:.2f} MB"


@needs_weights
def test_shipped_weights_generate_recognisable_shapes():
    from aimkit.eval.quality import evaluate_generated, load_default_classifier

    gen = aimkit.build("aim-tiny-shapes")  # no network: embedded weights
    labels = torch.arange(36)
    images = gen.generate(labels, seed=0, progress=False)
    assert images.shape == (36, 3, 64, 64)
    report = evaluate_generated(images, labels, classifier=load_default_classifier())
    assert report.conditional_accuracy >= 0.5, report  # chance is 1/36
