"""LlamaGen's architecture in aimkit: tensor names, conditioning in both directions, decoding.

The forward itself is checked against an independent re-derivation in test_llamagen_parity.py;
here: the exact LlamaGen key list, refusals with one clear message, both conditionings with both
backbones, and cached decoding against teacher forcing for each new combination.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_float_close, decode_all, randomize_

import aimkit
from aimkit.backbones.transformer import rotary_angles_2d
from aimkit.conditioning.adaln import InexactConversionError
from aimkit.errors import CheckpointError, ConfigError
from aimkit.llamagen import from_llamagen, is_llamagen, to_llamagen
from aimkit.presets import PUBLISHED_WEIGHTS

TINY_AIM = dict(d_model=64, n_layer=2, num_tokens=16, vocab_size=64, num_classes=10, tokenizer=None)


def _llamagen_names(n_layer: int) -> set[str]:
    """LlamaGen's GPT state-dict names (autoregressive/models/gpt.py), written out independently."""
    names = {"tok_embeddings.weight", "cls_embedding.embedding_table.weight", "norm.weight", "output.weight"}
    for i in range(n_layer):
        names |= {f"layers.{i}.{n}.weight" for n in (
            "attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
            "attention_norm", "ffn_norm")}
    return names




def test_to_llamagen_has_exactly_llamagens_names_and_round_trips():
    gen = randomize_(aimkit.build("llamagen-test"), seed=1)
    state = to_llamagen(gen)
    assert set(state) == _llamagen_names(2)
    assert state["cls_embedding.embedding_table.weight"].shape == (11, 64)  # the null class row
    assert state["layers.0.attention.wqkv.weight"].shape == (192, 64)
    assert is_llamagen(state) and not is_llamagen(gen.state_dict())
    again = aimkit.build("llamagen-test")
    again.load_aimkit_state_dict(from_llamagen(again, state))
    for key, value in gen.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


@pytest.mark.parametrize("overrides, what", [
    (dict(conditioning="adaln"), "conditioning 'adaln'"),
    (dict(pos_embed=True), "position table"),
    (dict(tie_head=True), "tied head"),
])
def test_llamagen_checkpoint_into_another_architecture_is_refused(tmp_path, overrides, what):
    torch.save({"model": to_llamagen(aimkit.build("llamagen-test"))}, tmp_path / "c2i.pt")
    with pytest.raises(CheckpointError, match=what):
        aimkit.build("llamagen-test", pretrained=tmp_path / "c2i.pt", **overrides)


def test_compiled_and_ddp_prefixes_are_removed(tmp_path):
    gen = randomize_(aimkit.build("llamagen-test"), seed=2).eval()
    wrapped = {f"module._orig_mod.{k}": v for k, v in to_llamagen(gen).items()}
    torch.save({"state_dict": wrapped}, tmp_path / "consolidated.pth")
    loaded = aimkit.build("llamagen-test", pretrained=tmp_path / "consolidated.pth").eval()
    codes, labels = torch.randint(64, (2, 16)), torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.equal(loaded(codes, labels), gen(codes, labels))


@pytest.mark.parametrize("name, overrides", [
    ("llamagen-test", {}),  # transformer + class token (LlamaGen)
    ("llamagen-test", dict(conditioning="adaln")),  # transformer with 2-D rotary + adaLN
    ("llamagen-test", dict(conditioning="adaln-group", num_groups=2)),
    ("aim-b", dict(conditioning="class-token", **TINY_AIM)),  # Mamba2 + class token
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_cached_decoding_matches_teacher_forcing(name, overrides, dtype):
    gen = randomize_(aimkit.build(name, **overrides), seed=3).to(dtype).eval()
    codes, labels = torch.randint(64, (3, 16)), torch.tensor([0, 7, 10])
    with torch.no_grad():
        assert_float_close(decode_all(gen, codes, labels), gen(codes, labels))


def test_class_token_model_has_no_modulation_and_the_adaln_one_has():
    plain = aimkit.build("llamagen-test")
    assert plain.final_layer is None and not any(k.startswith("conditioning.") for k in plain.state_dict())
    modulated = aimkit.build("llamagen-test", conditioning="adaln")
    assert modulated.final_layer is not None
    extra = modulated.num_params() - plain.num_params()
    # per-layer adaLN, then the final adaLN's modulation and its norm
    assert extra == 2 * (64 * 6 * 64 + 6 * 64) + (64 * 2 * 64 + 2 * 64) + 64


def test_conversion_across_the_final_layer_is_refused_and_within_class_token_is_exact():
    gen = randomize_(aimkit.build("llamagen-test"), seed=4).eval()
    with pytest.raises(InexactConversionError, match="final adaLN"):
        gen.convert_conditioning("adaln")
    with pytest.raises(InexactConversionError, match="final adaLN"):
        aimkit.build("llamagen-test", conditioning="adaln").convert_conditioning("class-token", approximate=True)
    same = gen.convert_conditioning("class-token")
    codes, labels = torch.randint(64, (2, 16)), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(same(codes, labels), gen(codes, labels))


def test_rotary_2d_tables():
    cos, sin = rotary_angles_2d(torch.arange(18), head_dim=8, base=10000.0, grid_size=4)
    assert torch.equal(cos[0], torch.zeros(4)) and torch.equal(sin[0], torch.zeros(4))  # the class token
    # position 1 + 4r + c is grid cell (r, c): first two pairs turn with r, last two with c
    freqs = torch.tensor([1.0, 0.01])  # 10000 ** (-(0, 2) / 4)
    for r, c in [(0, 0), (1, 2), (3, 3)]:
        want = torch.cat((r * freqs, c * freqs))
        torch.testing.assert_close(cos[1 + 4 * r + c], want.cos())
        torch.testing.assert_close(sin[1 + 4 * r + c], want.sin())


def test_bad_llamagen_configs_give_one_clear_message():
    with pytest.raises(ConfigError, match="grid_size 4 covers 16 tokens, but num_tokens is 25"):
        aimkit.build("llamagen-test", num_tokens=25)
    assert aimkit.build("llamagen-test", num_tokens=25, grid_size=5).num_tokens == 25
    with pytest.raises(ConfigError, match="multiple of 4"):
        aimkit.build("llamagen-test", n_head=32)  # head_dim 2
    with pytest.raises(ConfigError, match="needs a positive grid_size"):
        aimkit.build("llamagen-test", grid_size=None)


def test_presets_are_llamagens_sizes_and_name_their_published_weights():
    assert aimkit.build("llamagen-b", device="meta").num_params() == 110_888_448
    config = aimkit.resolve_config("llamagen-xl")
    assert (config.d_model, config.n_layer, config.backbone.config.n_head) == (1280, 36, 20)
    assert config.class_names is not None and len(config.class_names) == 1000
    assert PUBLISHED_WEIGHTS["llamagen-b"].repo_id == "FoundationVision/LlamaGen"
    assert PUBLISHED_WEIGHTS["llamagen-b"].filename == "c2i_B_256.pt"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_decode_attention_kernel_decodes_like_teacher_forcing_on_gpu(dtype):
    """The policy's decode-attention kernel (keys 0..position only) inside cached decoding, against
    the teacher-forced forward, and against the masked-SDPA reference step."""
    from aimkit.policy import ExecutionPolicy

    gen = randomize_(aimkit.build("llamagen-test", num_tokens=64, grid_size=8, device="cuda",
                                  policy=ExecutionPolicy(decode_attention="kernel")), seed=5).to(dtype).eval()
    codes = torch.randint(64, (5, 64), device="cuda")
    labels = torch.tensor([0, 1, 2, 3, 10], device="cuda")
    with torch.no_grad():
        forced = gen(codes, labels)
        decoded = decode_all(gen, codes, labels)
        gen.set_policy(gen.policy.replace(decode_attention="reference"))
        reference = decode_all(gen, codes, labels)
    # in the model dtype's epsilons: bf16 rounds the cache and the products (16 / 32 of them)
    assert_float_close(decoded, reference, ulps=16 if dtype == torch.bfloat16 else 64)
    assert_float_close(decoded, forced, ulps=32 if dtype == torch.bfloat16 else 256)


def test_a_file_with_model_and_ema_loads_model_as_llamagens_samplers_do(tmp_path):
    """LlamaGen's GPT samplers read the ``model`` entry (never ``ema``); so does ``pretrained=``."""
    model = randomize_(aimkit.build("llamagen-test"), seed=6).eval()
    ema = randomize_(aimkit.build("llamagen-test"), seed=7).eval()
    torch.save({"ema": to_llamagen(ema), "model": to_llamagen(model), "steps": 10}, tmp_path / "c2i.pt")
    loaded = aimkit.build("llamagen-test", pretrained=tmp_path / "c2i.pt").eval()
    codes, labels = torch.randint(64, (2, 16)), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(loaded(codes, labels), model(codes, labels))


@pytest.mark.parametrize("overrides, what", [
    (dict(conditioning="class-token"), "without a final adaLN layer"),
    (dict(pos_embed=False), "no position table"),
    (dict(tie_head=False), "untied head"),
])
def test_official_aim_export_refuses_other_layouts(overrides, what):
    """The official AiM layout has a position table, a tied head and a final adaLN layer; a
    generator without one of them is refused, never written half right."""
    from aimkit.official import to_official

    with pytest.raises(CheckpointError, match=what):
        to_official(aimkit.build("aim-test-mamba2", **overrides))
    assert "mamba.lm_head.weight" in to_official(aimkit.build("aim-test-mamba2"))


def test_aimkit_convert_turns_a_llamagen_checkpoint_into_a_saved_model(tmp_path, capsys):
    from aimkit.cli import main

    gen = randomize_(aimkit.build("llamagen-test"), seed=8).eval()
    torch.save({"model": to_llamagen(gen)}, tmp_path / "c2i.pt")
    assert main(["convert", str(tmp_path / "c2i.pt"), str(tmp_path / "saved"), "--model", "llamagen-test"]) == 0
    again = aimkit.build(tmp_path / "saved").eval()
    assert again.config == gen.config
    codes, labels = torch.randint(64, (2, 16)), torch.tensor([4, 10])
    with torch.no_grad():
        assert torch.equal(again(codes, labels), gen(codes, labels))


def test_convert_refuses_to_save_a_random_tokenizer(tmp_path, capsys):
    """A checkpoint without tokenizer weights into a preset with a tokenizer: one line naming the
    two ways out, instead of a saved model whose pixels come from a random tokenizer."""
    from aimkit.cli import main
    from aimkit.weights import save_safetensors_atomic

    gen = aimkit.build("aim-test-vq")
    save_safetensors_atomic(gen.generator_state_dict(), tmp_path / "generator.safetensors")
    argv = ["convert", str(tmp_path / "generator.safetensors"), str(tmp_path / "out"), "--model", "aim-test-vq"]
    assert main(argv) == 2
    assert "holds no tokenizer weights" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main([*argv, "--no-tokenizer"]) == 0
    assert aimkit.build(tmp_path / "out").tokenizer is None
