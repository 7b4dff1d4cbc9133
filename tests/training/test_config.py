"""aimkit.training.config: the recipe's policy section, retired keys, every shipped recipe."""

from pathlib import Path

import pytest

from aimkit.errors import ConfigError
from aimkit.training import execution_policy, find_config, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
NOT_TRAINING = {"vq_f4_tiny"}  # read by recipes/train_tokenizer.py


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


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in NOT_TRAINING))
def test_every_shipped_recipe_loads(name):
    cfg = load_config(name, ["output_dir=x", "data=random"])
    assert execution_policy(cfg).train_step in ("eager", "graph")
