"""A recipe that writes ``output_dir: ~/runs/x`` (or ``data``, ``init_from``) means the home folder:
the shell expands ``~`` on a command line, YAML does not, and the run went to ``./~/runs/x``."""

from __future__ import annotations

from pathlib import Path

import aimkit
from aimkit.cli import main as cli_main
from aimkit.training import load_config


def test_tilde_in_a_recipe_is_the_home_folder(tmp_path, monkeypatch, capsys):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    recipe = Path(aimkit.training.config.find_config("tiny_test")).read_text()
    recipe = recipe.replace("output_dir: null", "output_dir: ~/runs/x")
    (work / "mine.yaml").write_text(recipe + "init_from: null\n")
    cfg = load_config(str(work / "mine.yaml"), ["init_from=~/w.safetensors", "data='~/tokens'"])
    assert (cfg.output_dir, cfg.init_from, cfg.data) == (
        str(home / "runs/x"), str(home / "w.safetensors"), str(home / "tokens"))
    code = cli_main(["train", "--config", str(work / "mine.yaml"), "max_steps=1", "progress_bar=false",
                     "model_args.n_layer=1"])
    assert code == 0, capsys.readouterr().err
    assert (home / "runs/x/final/model.safetensors").is_file()
    assert not (work / "~").exists()
