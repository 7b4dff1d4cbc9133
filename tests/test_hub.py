"""The Hub round trip, offline: downloads come from a hub cache laid out in tmp_path as
huggingface_hub lays it out; uploads are checked at the level of the commit operations and the card."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, constants
from huggingface_hub.errors import LocalTokenNotFoundError

import aimkit
from aimkit import hub
from aimkit.errors import AimkitError, CheckpointError, ConfigError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL_FILES = ["model.safetensors", "generation_config.json", "config.json"]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache, offline: huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE from its
    constants module, set here as the environment variables would set them at import."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def publish(cache: Path, repo_id: str, folder: Path, names=None) -> Path:
    """Put ``folder``'s files into ``cache`` as a downloaded snapshot of ``repo_id`` (main branch)."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    for name in names if names is not None else sorted(p.name for p in folder.iterdir()):
        shutil.copyfile(folder / name, snapshot / name)
    return snapshot


@pytest.fixture
def saved(tiny_gen, tmp_path):
    """``tiny_gen`` with FID settings of its own, saved by save_pretrained."""
    gen = aimkit.build("aim-test-mamba2", pretrained=False, decode_position_offset=1)
    gen.load_state_dict(tiny_gen.state_dict())
    return gen, gen.save_pretrained(tmp_path / "tiny")


def assert_same_model(a: aimkit.Generator, b: aimkit.Generator) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """HfApi.create_repo / create_commit replaced by recorders; each committed file is copied to
    ``tmp_path/pushed`` while it exists (push_to_hub writes into a temporary folder)."""
    calls = {"create_repo": [], "create_commit": []}
    pushed = tmp_path / "pushed"
    in_repo: set[str] = set()  # files the repository holds before the push (tests add names)

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append((repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        calls["create_commit"].append((repo_id, operations, kwargs))
        pushed.mkdir(exist_ok=True)
        for op in operations:
            if isinstance(op, CommitOperationDelete):
                assert op.path_in_repo in in_repo
                continue
            assert isinstance(op, CommitOperationAdd)
            shutil.copyfile(op.path_or_fileobj, pushed / op.path_in_repo)
        return "commit-info"

    def file_exists(self, repo_id, filename, **kwargs):
        return filename in in_repo

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "file_exists", file_exists)
    calls["in_repo"] = in_repo
    return calls, pushed


# ------------------------------------------------------------------ downloads


def test_build_hf_hub_name_builds_the_saved_model_exactly(hub_cache, saved):
    """aimkit.build("hf-hub:org/name") was rejected ("does not exist"); now it reads config.json
    and generation_config.json there and builds exactly, weights included."""
    gen, folder = saved
    publish(hub_cache, "me/tiny", folder)
    again = aimkit.build("hf-hub:me/tiny")
    assert again.config.decode_position_offset == 1  # from generation_config.json
    assert_same_model(gen, again)
    assert aimkit.resolve_config("hf-hub:me/tiny") == gen.config


def test_resolve_config_fetches_only_the_configs(hub_cache, saved):
    gen, folder = saved
    publish(hub_cache, "me/tiny", folder, names=["config.json", "generation_config.json"])
    assert aimkit.resolve_config("hf-hub:me/tiny", n_layer=3).n_layer == 3


@pytest.mark.parametrize("name", ["me/tiny", "hf-hub:me/tiny"])
def test_from_pretrained_repo_id(hub_cache, saved, name):
    gen, folder = saved
    publish(hub_cache, "me/tiny", folder)
    again = aimkit.Generator.from_pretrained(name, dtype="bfloat16")
    assert again.dtype == torch.bfloat16 and again.config == gen.config
    assert torch.equal(again.pos_embed.weight, gen.pos_embed.weight.to(torch.bfloat16))


def test_from_pretrained_local_folder(saved):
    gen, folder = saved
    assert_same_model(gen, aimkit.Generator.from_pretrained(folder))
    assert_same_model(gen, aimkit.Generator.from_pretrained(str(folder)))


def test_from_pretrained_honours_the_environment(saved, tmp_path):
    """HF_HOME and HF_HUB_OFFLINE as a user sets them, in a fresh process."""
    gen, folder = saved
    publish(tmp_path / "home" / "hub", "me/tiny", folder)
    code = textwrap.dedent("""
        import aimkit
        gen = aimkit.Generator.from_pretrained("me/tiny")
        print(gen.config.decode_position_offset, float(gen.pos_embed.weight.sum()))
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    offset, total = res.stdout.split()
    assert offset == "1" and abs(float(total) - gen.pos_embed.weight.sum().item()) < 1e-4


def test_offline_and_not_cached_is_one_clear_error(hub_cache):
    with pytest.raises(CheckpointError) as err:
        aimkit.Generator.from_pretrained("me/absent")
    assert "'me/absent'" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        aimkit.build("hf-hub:me/absent")


def test_repo_without_aimkit_config_points_at_pretrained(hub_cache, saved):
    _, folder = saved
    publish(hub_cache, "me/bare", folder, names=["model.safetensors"])
    with pytest.raises(ConfigError, match=r"holds no config\.json.*pretrained='hf-hub:me/bare'"):
        aimkit.build("hf-hub:me/bare")


@pytest.mark.parametrize("name", ["./missing", "/nonexistent/folder", "a/b/c"])
def test_from_pretrained_missing_path_is_not_sent_to_the_hub(hub_cache, name):
    with pytest.raises(ConfigError, match="does not exist"):
        aimkit.Generator.from_pretrained(name)


def test_from_pretrained_of_a_preset_name_points_at_build(hub_cache):
    with pytest.raises(ConfigError, match=r"'aim-b' is a preset.*aimkit.build\('aim-b'\)"):
        aimkit.Generator.from_pretrained("aim-b")


def test_from_pretrained_rejects_a_file(saved):
    _, folder = saved
    with pytest.raises(ConfigError, match="is a file"):
        aimkit.Generator.from_pretrained(folder / "model.safetensors")


def test_pretrained_hub_config_must_match_the_architecture(hub_cache, tiny_gen, tmp_path):
    """pretrained="hf-hub:..." ignored a config.json on the Hub; now it is compared first."""
    other = aimkit.build("aim-test-mamba2", pretrained=False, n_layer=3, d_state=8)
    publish(hub_cache, "me/deeper", other.save_pretrained(tmp_path / "deeper"))
    with pytest.raises(ConfigError) as err:
        aimkit.build("aim-test-mamba2", pretrained="hf-hub:me/deeper")
    text = str(err.value)
    assert "n_layer: 2 vs 3" in text and "backbone.config.d_state: 16 vs 8" in text
    assert "aimkit.build('hf-hub:me/deeper')" in text and "\n" not in text

    publish(hub_cache, "me/same", tiny_gen.save_pretrained(tmp_path / "same"))
    loaded = aimkit.build("aim-test-mamba2", pretrained="hf-hub:me/same")
    assert torch.equal(loaded.pos_embed.weight, tiny_gen.pos_embed.weight)


def test_pretrained_hub_config_with_other_sampling_settings_loads(hub_cache, saved):
    gen, folder = saved  # decode_position_offset=1: a sampling setting, not the architecture
    publish(hub_cache, "me/tiny", folder)
    loaded = aimkit.build("aim-test-mamba2", pretrained="hf-hub:me/tiny")
    assert loaded.config.decode_position_offset == 0
    assert torch.equal(loaded.pos_embed.weight, gen.pos_embed.weight)


def test_pretrained_hub_config_of_another_library_is_not_compared(hub_cache, tiny_gen, tmp_path):
    folder = tiny_gen.save_pretrained(tmp_path / "other")
    (folder / "config.json").write_text(json.dumps({"d_model": 999, "n_layer": 1}))
    publish(hub_cache, "me/other", folder, names=["config.json", "model.safetensors"])
    loaded = aimkit.build("aim-test-mamba2", pretrained="hf-hub:me/other")
    assert torch.equal(loaded.pos_embed.weight, tiny_gen.pos_embed.weight)


# ------------------------------------------------------------------ the model card


def test_save_pretrained_writes_a_model_card(saved):
    gen, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == sorted([*MODEL_FILES, "README.md"])
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "aimkit" and "aimkit" in card.data.tags
    assert f"{gen.num_params():,}" in card.text
    assert "| width × depth | 32 × 2 |" in card.text and "`mamba2`" in card.text
    assert "No published FID" in card.text and "No training record" in card.text
    assert "Generator.from_pretrained" in card.text


def test_card_summarises_a_training_record(tiny_gen, tmp_path):
    folder = tmp_path / "trained"
    folder.mkdir()
    record = {"model": "aim-test-mamba2", "generator": {"steps": 1900, "final_loss": 1.5086085, "command": ["x"]},
              "evaluation": {"fid_defaults": {"frechet_distance": 1.2564, "conditional_accuracy": 0.987}}}
    (folder / "training_record.json").write_text(json.dumps(record))
    tiny_gen.save_pretrained(folder)
    text = (folder / "README.md").read_text()
    assert "`generator.steps`: 1900" in text and "`generator.final_loss`: 1.509" in text
    assert "`evaluation.fid_defaults.frechet_distance`: 1.256" in text
    assert "command" not in text.split("## Training record")[1]


def test_card_gives_the_known_fid_of_a_published_preset():
    # the architecture only, nothing allocated; other sampling settings are still the same architecture
    gen = aimkit.build("aim-xl", device="meta", decode_position_offset=1)
    text = str(hub.model_card(gen, repo_id="me/aim-xl"))
    assert "`aim-xl` preset" in text and "FID 2.56" in text and "guidance 1.75" in text
    assert "763,291,392" in text and 'aimkit.build("hf-hub:me/aim-xl")' in text
    assert "256 × 256 pixels" in text


def test_a_hand_written_readme_is_kept_and_a_generated_one_rewritten(tiny_gen, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "README.md").write_text("# my own card\n")
    tiny_gen.save_pretrained(folder)
    assert (folder / "README.md").read_text() == "# my own card\n"
    (folder / "README.md").unlink()
    tiny_gen.save_pretrained(folder, repo_id="me/first")
    assert "me/first" in (folder / "README.md").read_text()
    tiny_gen.save_pretrained(folder, repo_id="me/second")
    assert "me/second" in (folder / "README.md").read_text()
    shutil.rmtree(folder)
    tiny_gen.save_pretrained(folder, model_card=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted(MODEL_FILES)


# ------------------------------------------------------------------ uploads


def test_push_to_hub_commits_the_model_and_its_card(recorded, tiny_gen):
    calls, pushed = recorded
    assert tiny_gen.push_to_hub("me/tiny", private=True, commit_message="first") == "commit-info"
    assert calls["create_repo"] == [("me/tiny", {"exist_ok": True, "private": True})]
    [(repo_id, operations, kwargs)] = calls["create_commit"]
    assert repo_id == "me/tiny" and kwargs["commit_message"] == "first" and kwargs["create_pr"] is False
    assert [op.path_in_repo for op in operations] == [*MODEL_FILES, "README.md"]
    card = (pushed / "README.md").read_text()
    assert f"{tiny_gen.num_params():,}" in card and 'from_pretrained("me/tiny")' in card
    assert_same_model(tiny_gen, aimkit.build(pushed))  # what was uploaded builds the same model


def test_save_pretrained_push_to_hub_uploads_the_folder_with_its_record(recorded, tiny_gen, tmp_path):
    calls, pushed = recorded
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "training_record.json").write_text(json.dumps({"generator": {"steps": 7}}))
    tiny_gen.save_pretrained(folder, push_to_hub=True, repo_id="me/run", revision="dev", create_pr=True)
    [(repo_id, operations, kwargs)] = calls["create_commit"]
    assert repo_id == "me/run" and kwargs["revision"] == "dev" and kwargs["create_pr"] is True
    assert [op.path_in_repo for op in operations] == [*MODEL_FILES, "README.md", "training_record.json"]
    assert "`generator.steps`: 7" in (pushed / "README.md").read_text()
    assert calls["create_repo"] == [("me/run", {"exist_ok": True})]


def test_a_push_without_a_record_deletes_the_one_an_earlier_push_left(recorded, tiny_gen):
    calls, _ = recorded
    calls["in_repo"].add("training_record.json")
    tiny_gen.push_to_hub("me/tiny")
    [(_, operations, _)] = calls["create_commit"]
    deleted = [op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)]
    assert deleted == ["training_record.json"]
    calls["in_repo"].clear()
    tiny_gen.push_to_hub("me/tiny")
    assert not any(isinstance(op, CommitOperationDelete) for op in calls["create_commit"][1][1])


def test_save_pretrained_push_defaults_the_repo_to_the_folder_name(recorded, tiny_gen, tmp_path):
    calls, _ = recorded
    tiny_gen.save_pretrained(tmp_path / "my-model", push_to_hub=True)
    assert calls["create_commit"][0][0] == "my-model"


def test_push_options_are_checked(tiny_gen, tmp_path):
    with pytest.raises(ConfigError, match="only apply with push_to_hub=True"):
        tiny_gen.save_pretrained(tmp_path / "a", token="hf_x")
    with pytest.raises(ConfigError, match="did you mean 'private'"):
        tiny_gen.push_to_hub("me/tiny", privat=True)
    with pytest.raises(ConfigError, match="not a valid Hub repository id"):
        tiny_gen.push_to_hub("me/bad name")
    assert not (tmp_path / "a").exists()


def test_push_failure_is_one_line(monkeypatch, tiny_gen):
    def not_logged_in(self, repo_id, **kwargs):
        raise LocalTokenNotFoundError("Token is required (`token=True`), but no token found.\nYou need to log in.")

    def server_error(self, repo_id, **kwargs):
        raise OSError("500 Server Error: Internal Server Error for url: https://huggingface.co/api/repos/create\nx")

    monkeypatch.setattr(HfApi, "create_repo", not_logged_in)
    with pytest.raises(AimkitError) as err:
        tiny_gen.push_to_hub("me/tiny")
    assert str(err.value) == "could not push to hub repo 'me/tiny': not logged in to the Hub (run `hf auth login` " \
                             "or pass token=)"
    monkeypatch.setattr(HfApi, "create_repo", server_error)
    with pytest.raises(AimkitError) as err:
        tiny_gen.push_to_hub("me/tiny")
    assert str(err.value).startswith("could not push to hub repo 'me/tiny': OSError: 500 Server Error")
    assert "\n" not in str(err.value)


def test_upload_saved_refuses_an_incomplete_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="missing model.safetensors, generation_config.json"):
        hub.upload_saved(tmp_path, "me/x")


def test_without_a_network_the_cache_answers_at_once(tmp_path, monkeypatch, saved):
    """HF_HUB_OFFLINE unset and the Hub's host name not resolving (no network): the cached repo
    builds, and an uncached one fails at once (huggingface_hub alone retried for ~25 s)."""
    import socket
    import time

    cache = tmp_path / "hf-cache-online"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    gen, folder = saved
    publish(cache, "me/tiny", folder)
    assert_same_model(gen, aimkit.build("hf-hub:me/tiny"))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="could not be reached"):
        aimkit.build("aim-test-mamba2", pretrained="hf-hub:me/absent")
    assert time.perf_counter() - start < 5
