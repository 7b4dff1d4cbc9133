"""aimkit.training.config: the recipe's policy section, retired keys, every shipped recipe."""

from pathlib import Path

import pytest

from aimkit.cli import main as cli_main
from aimkit.errors import ConfigError
from aimkit.training import execution_policy, find_config, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"


def test_policy_section_and_overrides_merge_over_the_defaults(monkeypatch):
    monkeypatch.delenv("AIMKIT_TRAIN_COMPILE", raising=False)
    cfg = load_config("tiny_test", ["output_dir=x", "policy.train_step=graph"])
    assert cfg.policy == {"chunk_size": 8, "train_step": "graph"}  # the recipe's entry kept
    policy = execution_policy(cfg)
    assert policy.train_step == "graph" and policy.chunk_size == 8 and policy.compile_glue is True
    monkeypatch.setenv("AIMKIT_TRAIN_COMPILE", "never")  # the environment gives the defaults only
    assert execution_policy(cfg).compile_glue is False
    assert execution_policy(load_config("tiny_test", ["output_dir=x", "policy.compile_glue=true"])).compile_glue


@pytest.mark.parametrize("override,message", [
    ("policy.trainstep=graph", "did you mean 'train_step'"),
    ("policy.train_step=graphs", "train_step must be one of"),
    ("policy=graph", "config key 'policy' must be a mapping"),
])
def test_bad_policy_sections_are_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_test", ["output_dir=x", override])


def test_cuda_graph_key_says_what_to_write_instead(tmp_path):
    for value in ("true", "false"):
        with pytest.raises(ConfigError, match=r"'cuda_graph' is gone.*policy: \{train_step: graph\}"):
            load_config("tiny_test", ["output_dir=x", f"cuda_graph={value}"])
    old = tmp_path / "old.yaml"
    old.write_text(find_config("tiny_test").read_text() + "cuda_graph: true\n")
    with pytest.raises(ConfigError, match="policy.train_step=graph") as info:
        load_config(str(old), ["output_dir=x"])
    assert str(old) in str(info.value)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_recipe_loads(name):
    cfg = load_config(name, ["output_dir=x", "data=random"])
    assert execution_policy(cfg).train_step in ("auto", "eager", "graph")


def test_tokenizer_recipes_are_not_listed_and_refused_with_the_command_to_run(capsys):
    """vq_f4_tiny (for recipes/train_tokenizer.py) was listed by `aimkit train` and then failed."""
    assert not (CONFIGS / "vq_f4_tiny.yaml").exists() and (CONFIGS / "tokenizers" / "vq_f4_tiny.yaml").is_file()
    assert find_config("vq_f4_tiny", kind="tokenizer") == CONFIGS / "tokenizers" / "vq_f4_tiny.yaml"
    for config in ("vq_f4_tiny", str(CONFIGS / "tokenizers" / "vq_f4_tiny.yaml")):
        assert cli_main(["train", "--config", config, "output_dir=x"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "'vq_f4_tiny' is a tokenizer recipe" in err
        assert "python recipes/train_tokenizer.py --config vq_f4_tiny --out DIR" in err
    assert cli_main(["train", "--config", "no_such_recipe"]) == 2
    listed = capsys.readouterr().err.split("(shipped: ")[1]
    assert "tiny_test" in listed and "vq_f4_tiny" not in listed
    with pytest.raises(ConfigError, match="neither a file nor a shipped config"):
        find_config("tiny_test", kind="tokenizer")


def test_yaml_no_for_mixed_precision_in_a_file(tmp_path):
    """YAML 1.1 reads an unquoted `no` as False: a recipe file that says `mixed_precision: no` loads."""
    recipe = tmp_path / "r.yaml"
    text = find_config("tiny_test").read_text().replace('mixed_precision: "no"', "mixed_precision: no")
    assert "mixed_precision: no\n" in text
    recipe.write_text(text)
    assert load_config(str(recipe), ["output_dir=x"]).mixed_precision == "no"
    recipe.write_text(text.replace("mixed_precision: no", "mixed_precision: off"))
    assert load_config(str(recipe), ["output_dir=x"]).mixed_precision == "no"


def test_tiny_test_header_launches_two_processes():
    """`accelerate launch --cpu --num_processes 2` starts one process; the header shows the line that
    starts two (tests/test_train.py::test_two_processes_keep_replicas_equal runs it)."""
    header = [line for line in find_config("tiny_test").read_text().splitlines() if "accelerate launch" in line]
    assert header and all("--multi_gpu --num_processes 2" in line for line in header if "aimkit.training" in line)
    assert not any(line.lstrip("# ").startswith("accelerate launch --cpu") for line in header)
