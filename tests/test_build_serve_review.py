"""Review of building, saving and serving: overrides that must not change more than they name,
saved folders that must come back as saved, and one clear error for each bad input."""

from __future__ import annotations

import json

import pytest
import torch

import aimkit
from aimkit import hub
from aimkit.errors import CheckpointError, ConfigError, UnknownNameError
from aimkit.serve import DemoApp
from aimkit.serve._page import render_page


# ------------------------------------------------------------------ build and resolve_config
def test_a_partial_sampling_override_keeps_the_presets_other_settings():
    preset = aimkit.resolve_config("aim-b").pretty_sampling
    config = aimkit.resolve_config("aim-b", pretty_sampling={"cfg_scale": 4.0})
    assert config.pretty_sampling.cfg_scale == 4.0
    assert (config.pretty_sampling.top_k, config.pretty_sampling.top_p) == (preset.top_k, preset.top_p)
    with pytest.raises(ConfigError, match="top_kk"):
        aimkit.resolve_config("aim-b", pretty_sampling={"top_kk": 1})


@pytest.mark.parametrize("value", [3, None, 1.5, ["aim-b"]])
def test_resolve_config_of_a_non_name_is_one_config_error(value):
    with pytest.raises(ConfigError, match="preset name or a saved directory"):
        aimkit.resolve_config(value)


@pytest.mark.parametrize("value", [3, 1.5, ["x"]])
def test_pretrained_of_a_wrong_type_is_one_config_error(value):
    with pytest.raises(ConfigError, match="pretrained"):
        aimkit.build("aim-test-mamba2", pretrained=value)


def test_a_folder_named_like_a_preset_does_not_hide_the_preset(tmp_path, monkeypatch):
    (tmp_path / "aim-test-mamba2").mkdir()  # e.g. a run's output folder, not a saved model
    monkeypatch.chdir(tmp_path)
    assert aimkit.resolve_config("aim-test-mamba2").d_model == 32
    assert aimkit.build("aim-test-mamba2").config.d_model == 32


# ------------------------------------------------------------------ save_pretrained
@pytest.mark.parametrize("storage_dtype", [torch.int8, torch.bool, torch.int64, torch.float8_e4m3fn, "int8", "float99"])
def test_save_pretrained_refuses_a_storage_dtype_that_would_destroy_the_weights(tmp_path, storage_dtype):
    gen = aimkit.build("aim-test-mamba2")
    with pytest.raises(ConfigError, match="storage_dtype"):
        gen.save_pretrained(tmp_path / "out", storage_dtype=storage_dtype)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_save_pretrained_takes_a_storage_dtype_by_name(tmp_path):
    gen = aimkit.build("aim-test-mamba2")
    gen.save_pretrained(tmp_path / "out", storage_dtype="float16")
    back = aimkit.build(tmp_path / "out")
    assert back.dtype == torch.float32
    assert torch.equal(back.tok_embed.weight, gen.tok_embed.weight.half().float())


def test_the_card_of_a_push_without_repo_id_names_the_repo_it_is_pushed_to(tmp_path, monkeypatch):
    pushed = []
    monkeypatch.setattr(hub, "upload_saved", lambda folder, repo_id, **kw: pushed.append(repo_id))
    gen = aimkit.build("aim-test-mamba2")
    gen.save_pretrained(tmp_path / "my-model", push_to_hub=True)
    card = (tmp_path / "my-model" / "README.md").read_text()
    assert pushed == ["my-model"]
    assert 'from_pretrained("my-model")' in card and "path/to/this/folder" not in card


def test_a_deeply_nested_hub_config_is_one_error(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: str(path))
    with pytest.raises(CheckpointError, match="nested too deeply"):
        hub.hub_saved_config("org/name")


def test_a_saved_generation_setting_round_trips(tmp_path):
    gen = aimkit.build("aim-test-mamba2", pretty_sampling={"top_k": 7}, decode_position_offset=1)
    back = aimkit.build(gen.save_pretrained(tmp_path / "out"))
    assert back.config == gen.config and back.config.pretty_sampling.top_k == 7
    saved = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert saved["generation"]["decode_position_offset"] == 1


# ------------------------------------------------------------------ the demo
@pytest.fixture(scope="module")
def vq_model():
    return aimkit.build("aim-test-vq")


def test_a_class_named_random_is_that_class_and_the_page_still_offers_random(vq_model):
    names = [f"c{i}" for i in range(9)] + ["random"]
    app = DemoApp(vq_model, class_names=names)
    assert app.parse({"class": ["random"], "count": ["3"], "seed": ["1"]}).labels == (9, 9, 9)
    page = render_page(app)
    assert '<option value="">random</option>' in page  # blank: a random class per image
    assert len(app.parse({"class": [""], "count": ["3"], "seed": ["1"]}).labels) == 3


def test_class_names_that_differ_only_in_case_are_refused(vq_model):
    with pytest.raises(ConfigError, match="repeats"):
        DemoApp(vq_model, class_names=["a", "A", *map(str, range(2, 10))])


def test_a_model_without_tokenizer_is_refused_when_the_app_is_made():
    with pytest.raises(ConfigError, match="tokenizer"):
        DemoApp(aimkit.build("aim-test-mamba2"))


@pytest.mark.parametrize("kwargs", [{"max_queue": "3"}, {"max_count": 2.5}, {"max_queue": True}])
def test_demo_sizes_of_a_wrong_type_are_one_config_error(vq_model, kwargs):
    with pytest.raises(ConfigError, match="max_"):
        DemoApp(vq_model, **kwargs)


def test_demo_connections_time_out_when_idle():
    from aimkit.serve.server import _Handler

    assert _Handler.timeout is not None and 0 < _Handler.timeout <= 600


def test_the_error_message_of_a_huge_count_stays_short(vq_model):
    app = DemoApp(vq_model)
    with pytest.raises(ConfigError) as err:
        app.parse({"count": ["9" * 2000]})
    assert len(str(err.value)) < 200




# ------------------------------------------------------------------ registry and Hub options
def test_an_upper_case_preset_name_suggests_the_preset():
    with pytest.raises(UnknownNameError, match="did you mean 'aim-b'"):
        aimkit.build("AIM-B")


def test_an_unhashable_name_is_an_unknown_name():
    from aimkit.registry import GENERATORS

    with pytest.raises(UnknownNameError, match="unknown generator"):
        GENERATORS.get(["aim-b"])


def test_a_revision_for_a_local_folder_is_not_silently_ignored(tmp_path):
    folder = aimkit.build("aim-test-mamba2").save_pretrained(tmp_path / "out")
    with pytest.raises(ConfigError, match="revision"):
        aimkit.Generator.from_pretrained(folder, revision="v2")


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64])
def test_weights_that_are_not_real_floats_are_refused_not_cast(tmp_path, dtype):
    from aimkit.weights import save_safetensors_atomic

    gen = aimkit.build("aim-test-mamba2", pretrained=False)
    state = gen.generator_state_dict()
    state["tok_embed.weight"] = state["tok_embed.weight"].to(dtype)
    if dtype == torch.complex64:
        torch.save(state, tmp_path / "w.pt")
        path = tmp_path / "w.pt"
    else:
        save_safetensors_atomic(state, tmp_path / "w.safetensors")
        path = tmp_path / "w.safetensors"
    with pytest.raises(aimkit.CheckpointError, match="not real floating point.*tok_embed.weight"):
        aimkit.build("aim-test-mamba2", pretrained=path)


def test_float8_weights_load_and_are_scanned_for_non_finite_values(tmp_path):
    from aimkit.weights import first_nonfinite, save_safetensors_atomic

    gen = aimkit.build("aim-test-mamba2", pretrained=False)
    state = {k: v.to(torch.float8_e4m3fn) for k, v in gen.generator_state_dict().items()}
    save_safetensors_atomic(state, tmp_path / "w.safetensors")
    back = aimkit.build("aim-test-mamba2", pretrained=tmp_path / "w.safetensors")
    assert torch.equal(back.tok_embed.weight, state["tok_embed.weight"].float())
    bad = torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)
    assert first_nonfinite([("ok", state["tok_embed.weight"]), ("bad", bad)]) == ("bad", 1, 2)


def test_the_backbones_norm_eps_is_the_generators():
    """The transformer's backbone__norm_eps was stored but unused (its norms take the generator's):
    refused, and norm_eps reaches every RMSNorm of the transformer. Mamba2's is its gated norm's."""
    with pytest.raises(ConfigError, match="set norm_eps=0.5 on the generator instead"):
        aimkit.build("llamagen-test", pretrained=False, backbone__norm_eps=0.5)
    mamba = aimkit.build("aim-test-mamba2", pretrained=False, backbone__norm_eps=0.25)  # its gated norm's own
    assert {layer.mixer.norm.eps for layer in mamba.backbone.layers} == {0.25}
    gen = aimkit.build("llamagen-test", pretrained=False, norm_eps=0.5)
    eps = {m.eps for m in gen.modules() if isinstance(m, torch.nn.RMSNorm)}
    assert eps == {0.5}


def test_a_folder_mixing_two_saves_is_refused(tmp_path):
    """A save killed between its files (or two saves into one folder) leaves weights and configs of
    different models: the build says so instead of loading the mix."""
    import shutil

    first, second = tmp_path / "first", tmp_path / "second"
    aimkit.build("aim-test-mamba2", pretrained=False).save_pretrained(first)
    aimkit.build("aim-test-mamba2", pretrained=False, class_dropout=0.0).save_pretrained(second)
    aimkit.build(first)  # one save: fine
    mixed = shutil.copytree(first, tmp_path / "mixed")
    shutil.copy(second / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(CheckpointError, match="files of different saves"):
        aimkit.build(mixed)
    shutil.copy(first / "model.safetensors", mixed / "model.safetensors")
    shutil.copy(second / "generation_config.json", mixed / "generation_config.json")
    with pytest.raises(CheckpointError, match="files of different saves"):
        aimkit.build(mixed)
    old = shutil.copytree(first, tmp_path / "old")  # saved before the id existed: not checked
    config = json.loads((old / "config.json").read_text())
    del config["aimkit_save_id"]
    (old / "config.json").write_text(json.dumps(config))
    aimkit.build(old)


def test_the_same_model_saves_to_the_same_bytes(tmp_path):
    gen = aimkit.build("aim-test-mamba2", pretrained=False)
    gen.save_pretrained(tmp_path / "a")
    gen.save_pretrained(tmp_path / "b")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_the_demo_page_starts_with_a_blank_seed_as_its_label_says(vq_model):
    """'seed (blank = random)' prefilled with 0 gave the same grid at every click."""
    page = render_page(DemoApp(vq_model))
    assert 'name="seed" id="seed" inputmode="numeric" value=""' in page
