"""The execution policy: decided once when a model is built, stored on it, visible, injectable."""

import json

import pytest
import torch

import aimkit
from aimkit.cli import main
from aimkit.errors import ConfigError
from aimkit.policy import OPERATIONS, ExecutionPolicy, default_policy

TEST_PRESET = "aim-test-mamba2"


def test_defaults_and_environment_defaults():
    assert default_policy({}) == ExecutionPolicy()
    p = default_policy({"AIMKIT_DECODE_KERNELS": "ssm,norm", "AIMKIT_TRAIN_COMPILE": "loss"})
    assert (p.state_update, p.conv_step, p.decode_glue) == ("auto", "reference", "auto")
    assert not p.fold_gated_norm and not p.compile_glue and p.compile_loss
    none = default_policy({"AIMKIT_DECODE_KERNELS": "none", "AIMKIT_TRAIN_COMPILE": "never"})
    assert (none.state_update, none.conv_step, none.decode_glue) == ("reference",) * 3
    assert not (none.compile_glue or none.compile_loss or none.fold_gated_norm)
    with pytest.raises(ConfigError, match="unknown kernel kinds"):
        default_policy({"AIMKIT_DECODE_KERNELS": "ssm,pdl"})
    with pytest.raises(ConfigError, match="AIMKIT_TRAIN_COMPILE"):
        default_policy({"AIMKIT_TRAIN_COMPILE": "everything"})


@pytest.mark.parametrize("changes, message", [
    ({"scan": "fast"}, "policy scan must be one of"),
    ({"chunk_size": 0}, "chunk_size must be >= 1"),
    ({"chunk_size": True}, "chunk_size must be int"),
    ({"state_dtype": "bf16"}, "state_dtype must be one of"),
    ({"train_step": "graphed"}, "train_step must be one of"),
    ({"decode_graph": "yes"}, "decode_graph must be bool"),
    ({"stat_dtype": "model"}, "did you mean 'state_dtype'"),
])
def test_bad_fields_get_one_clear_message(changes, message):
    with pytest.raises(ConfigError, match=message):
        ExecutionPolicy().replace(**changes)


def test_reference_policy_and_cpu_resolution():
    ref = ExecutionPolicy.reference()
    assert all(getattr(ref, op) == "reference" for op in OPERATIONS)
    assert ExecutionPolicy().resolved("cpu") == {op: "reference" for op in OPERATIONS}  # auto on CPU
    with pytest.raises(ConfigError, match="state_update='kernel' needs CUDA"):
        ExecutionPolicy(state_update="kernel").use_kernel("state_update", torch.zeros(1))
    assert ExecutionPolicy().describe() == "defaults"
    assert "state_dtype='float32'" in repr(ExecutionPolicy(state_dtype="float32"))
    assert ExecutionPolicy.from_dict(ref.to_dict()) == ref  # round trip through plain JSON values
    json.dumps(ref.to_dict())


def test_build_stores_the_policy_and_repr_shows_it(monkeypatch):
    monkeypatch.setenv("AIMKIT_DECODE_KERNELS", "none")
    gen = aimkit.build(TEST_PRESET, policy={"state_dtype": "float32"})
    assert gen.policy == ExecutionPolicy(state_dtype="float32")  # explicit: the environment is not read
    assert "state_dtype='float32'" in repr(gen)
    assert gen.backbone.policy is gen.policy
    env_built = aimkit.build(TEST_PRESET)
    assert env_built.policy.state_update == "reference"  # the environment gave the default, once
    monkeypatch.setenv("AIMKIT_DECODE_KERNELS", "all")
    assert env_built.policy.state_update == "reference"  # and is not read again


def test_set_policy_reaches_every_holder_and_keeps_outputs():
    gen = aimkit.build(TEST_PRESET, dtype=torch.float64)
    codes = torch.randint(0, gen.vocab_size, (2, gen.num_tokens))
    labels = torch.tensor([0, 1])
    before = gen(codes, labels)
    new = ExecutionPolicy.reference(chunk_size=4, state_dtype="model")
    assert gen.set_policy(new) is gen
    holders = [m for m in gen.modules() if isinstance(getattr(m, "policy", None), ExecutionPolicy)]
    assert len(holders) > 2 and all(m.policy is new for m in holders)
    torch.testing.assert_close(gen(codes, labels), before, rtol=1e-10, atol=1e-10)  # same maths
    with pytest.raises(ConfigError, match="policy must be an ExecutionPolicy"):
        gen.set_policy("fast")


@pytest.mark.parametrize("key, field", [("state_dtype", "state_dtype"), ("use_kernels", "scan"),
                                        ("fused_split_scan", "split_scan"), ("chunk_size", "chunk_size")])
def test_execution_settings_are_not_architecture_overrides(key, field):
    with pytest.raises(ConfigError, match=f"pass policy=\\{{'{field}'"):
        aimkit.resolve_config(TEST_PRESET, **{key: 1})


def test_saved_config_with_old_runtime_keys_loads(tmp_path):
    gen = aimkit.build(TEST_PRESET)
    gen.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    data = json.loads(path.read_text())
    data["generator"]["backbone"]["config"].update(use_kernels="auto", chunk_size=128, fused_split_scan=True)
    path.write_text(json.dumps(data))
    torch.testing.assert_close(aimkit.build(tmp_path / "m").tok_embed.weight, gen.tok_embed.weight)  # silent: defaults
    data["generator"]["backbone"]["config"]["state_dtype"] = "model"
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="ignoring backbone.config.state_dtype='model'.*policy=\\{'state_dtype'"):
        aimkit.build(tmp_path / "m")


def test_saved_config_holds_no_execution_settings(tmp_path):
    aimkit.build(TEST_PRESET).save_pretrained(tmp_path / "m")
    text = (tmp_path / "m" / "config.json").read_text()
    for key in ("use_kernels", "state_dtype", "fused_split_scan", "chunk_size", "use_cuda_graph", "fused_sampling"):
        assert key not in text


def test_info_command_shows_the_resolved_policy(capsys):
    assert main(["info", TEST_PRESET, "--device", "cpu", "--policy", "state_dtype=float32,decode_graph=false"]) == 0
    out = capsys.readouterr().out
    assert "policy: decode_graph=False, state_dtype='float32'" in out
    assert "on cpu: scan reference, state_update reference" in out
    assert "generator parameters" in out


def test_info_command_rejects_a_bad_policy_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["info", TEST_PRESET, "--policy", "state_dtype=bf16"])
    assert exc.value.code == 2
    assert "state_dtype must be one of" in capsys.readouterr().err
