"""Registry behaviour, aimkit.build overrides, save/load round trips and plugins."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
import torch
from conftest import TINY_MAMBA

import aimkit
from aimkit.errors import ConfigError, DuplicateNameError, UnknownNameError
from aimkit.registry import Registry

REPO = Path(__file__).resolve().parents[1]


def test_list_models_has_official_presets():
    names = aimkit.list_models()
    for name in ("aim-b", "aim-l", "aim-xl", "aim-1b"):
        assert name in names
    assert aimkit.list_models("aim-x*") == ["aim-xl"]


def test_every_kind_lists_its_components():
    assert "vq-f16" in aimkit.TOKENIZERS.names()
    assert {"mamba2", "transformer"} <= set(aimkit.BACKBONES.names())
    assert {"adaln", "adaln-group", "adaln-single"} <= set(aimkit.CONDITIONING.names())
    assert "autoregressive" in aimkit.SAMPLERS.names()


def test_unknown_name_lists_closest():
    with pytest.raises(UnknownNameError) as info:
        aimkit.build("aim-xxl")
    msg = str(info.value)
    assert "unknown generator 'aim-xxl'" in msg and "'aim-xl'" in msg


def test_unknown_component_name_suggests():
    with pytest.raises(UnknownNameError, match="did you mean 'mamba2'"):
        aimkit.build("aim-b", backbone="mamba3")


def test_duplicate_registration_raises():
    reg = Registry("widget")
    reg.register("a-b", object())
    with pytest.raises(DuplicateNameError, match="widget 'a-b' is already registered"):
        reg.register("a-b", object())


def test_bad_names_rejected():
    with pytest.raises(ValueError, match="not valid"):
        Registry("widget").register("Bad_Name", object())


def test_bad_override_name_is_named():
    with pytest.raises(ConfigError) as info:
        aimkit.build("aim-b", d_modle=64)
    msg = str(info.value)
    assert "unknown option 'd_modle' for aim-b" in msg and "'d_model'" in msg


def test_overrides_reach_components():
    cfg = aimkit.resolve_config("aim-l", d_model=64, n_layer=4, num_groups=2)
    assert (cfg.d_model, cfg.n_layer) == (64, 4)
    assert cfg.conditioning.name == "adaln-group" and cfg.conditioning.config.num_groups == 2
    cfg = aimkit.resolve_config("aim-b", d_state=32, backbone__headdim=16)
    assert cfg.backbone.config.d_state == 32 and cfg.backbone.config.headdim == 16


def test_override_for_absent_component_option():
    with pytest.raises(ConfigError, match="num_groups"):
        aimkit.build("aim-b", d_model=32, n_layer=2, tokenizer=None, num_groups=2)


def test_swap_backbone_resets_its_config():
    cfg = aimkit.resolve_config("aim-b", backbone="transformer", n_head=4)
    assert cfg.backbone.name == "transformer" and cfg.backbone.config.n_head == 4


def test_build_small_preset():
    gen = aimkit.build("aim-test-mamba2")
    assert isinstance(gen, aimkit.Generator) and not gen.training
    logits = gen(torch.randint(0, 64, (2, 16)), torch.tensor([1, 2]))
    assert logits.shape == (2, 16, 64)


def test_save_pretrained_round_trip(tmp_path, tiny_gen):
    out = tiny_gen.save_pretrained(tmp_path / "saved")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    data = json.loads((out / "config.json").read_text())
    assert data["generator"]["backbone"]["name"] == "mamba2"
    assert data["generator"]["conditioning"]["name"] == "adaln"
    again = aimkit.build(out)
    assert again.config == tiny_gen.config
    sd1, sd2 = tiny_gen.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    codes, labels = torch.randint(0, 64, (2, 16)), torch.tensor([3, 4])
    assert torch.equal(tiny_gen(codes, labels), again(codes, labels))


def test_saved_dir_with_wrong_shapes_fails_cleanly(tmp_path, tiny_gen):
    from aimkit.errors import CheckpointError

    tiny_gen.save_pretrained(tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    cfg["generator"]["d_model"] = 48
    (tmp_path / "saved" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mis-shaped"):
        aimkit.build(tmp_path / "saved")


def test_dtype_and_device_arguments():
    gen = aimkit.build("aim-test-mamba2", dtype="bfloat16", device="cpu")
    assert gen.dtype == torch.bfloat16
    for bad in ("float13", "int32", 123):
        with pytest.raises(ConfigError, match="dtype must be a floating-point torch dtype"):
            aimkit.build("aim-test-mamba2", dtype=bad)
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        aimkit.build("aim-test-mamba2", device="gpu")
    with pytest.raises(ConfigError, match="expected a preset name"):
        aimkit.build(123)


def test_runtime_overrides_keep_shipped_weights_and_architecture_overrides_warn():
    shipped = aimkit.build("aim-tiny-shapes")
    same = aimkit.build("aim-tiny-shapes", policy={"scan": "reference", "chunk_size": 64}, decode_position_offset=1)
    assert torch.equal(shipped.tok_embed.weight, same.tok_embed.weight)
    with pytest.warns(UserWarning, match="shipped weights are not loaded"):
        other = aimkit.build("aim-tiny-shapes", n_layer=2)
    assert len(other.backbone.layers) == 2


def test_pretrained_true_takes_the_weights_a_preset_ships():
    shipped = aimkit.build("aim-tiny-shapes")
    asked = aimkit.build("aim-tiny-shapes", pretrained=True)
    assert torch.equal(shipped.tok_embed.weight, asked.tok_embed.weight)
    with pytest.raises(aimkit.CheckpointError):  # asked for explicitly, weights that do not fit are an error
        aimkit.build("aim-tiny-shapes", pretrained=True, n_layer=2)


def test_config_values_are_checked():
    for bad in (dict(decode_position_offset=True), dict(class_dropout="0.1"), dict(norm_eps=-1.0),
                dict(n_layer=True)):
        with pytest.raises(ConfigError):
            aimkit.resolve_config("aim-b", **bad)


def test_plugin_entry_point_is_found(tmp_path):
    """A separate distribution registering a backbone through the aimkit.plugins entry point."""
    site = tmp_path / "site"
    pkg = site / "aimkit_demo_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from aimkit.registry import BACKBONES, GENERATORS
        from aimkit.backbones.mamba2 import Mamba2Backbone
        from aimkit.config import GeneratorConfig, ComponentSpec

        @BACKBONES.register("demo-mamba")
        class DemoMamba(Mamba2Backbone):
            pass

        @GENERATORS.register("demo-tiny")
        def demo_tiny():
            return GeneratorConfig(d_model=32, n_layer=1, vocab_size=32, num_classes=4, num_tokens=4,
                                   backbone=ComponentSpec("demo-mamba"), tokenizer=None)
    '''))
    dist = site / "aimkit_demo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: aimkit-demo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[aimkit.plugins]\ndemo = aimkit_demo_plugin\n")
    code = textwrap.dedent('''
        import aimkit, torch
        gen = aimkit.build("demo-tiny", headdim=8, d_state=8)
        print(type(gen.backbone).__name__, "demo-mamba" in aimkit.BACKBONES.names())
    ''')
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["DemoMamba", "True"]


def test_import_does_not_pull_cuda_packages():
    code = ("import sys, aimkit; "
            "bad=[m for m in ('mamba_ssm','causal_conv1d','triton','timm') if m in sys.modules]; print(bad)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_saved_bfloat16_generator_comes_back_in_bfloat16(tmp_path):
    gen = aimkit.build("aim-test-mamba2", dtype="bfloat16")
    gen.save_pretrained(tmp_path / "bf16")
    again = aimkit.build(tmp_path / "bf16")
    assert again.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(gen.state_dict().values(), again.state_dict().values()))
    assert aimkit.build(tmp_path / "bf16", dtype="float32").dtype == torch.float32


def test_plugin_may_look_names_up_while_loading(tmp_path):
    site = tmp_path / "site"
    pkg = site / "aimkit_lookup_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from aimkit.registry import BACKBONES\nassert 'nope' not in BACKBONES\n")
    dist = site / "aimkit_lookup_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: aimkit-lookup-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[aimkit.plugins]\nlookup = aimkit_lookup_plugin\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    res = subprocess.run([sys.executable, "-c", "import aimkit; print(len(aimkit.list_models()) > 3)"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stderr


@pytest.mark.parametrize("name,count", [("aim-test-mamba2", 27_504), ("aim-test-transformer", 38_400),
                                        ("aim-test-vq", 41_840)])
def test_test_presets_are_tiny(name, count):
    gen = aimkit.build(name)
    assert gen.num_params() == count  # the count in the preset's docstring
    logits = gen(torch.zeros(2, gen.num_tokens, dtype=torch.long), torch.tensor([0, 9]))
    assert logits.shape == (2, 16, gen.vocab_size)


def test_test_preset_is_aim_b_at_tiny_sizes():
    assert aimkit.resolve_config("aim-test-mamba2") == aimkit.resolve_config("aim-b", **TINY_MAMBA)


def test_every_package_ships():
    """pyproject.toml lists packages (recipes/ ships as aimkit.recipes): every package under aimkit/ is listed."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "aimkit").rglob("__init__.py")}
    found |= {"aimkit." + ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "recipes").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    assert not (REPO / "aimkit" / "recipes").exists(), "recipes/ ships through package-dir, not a link"
