"""aimkit.bench.models and options: derived field lists, matched transformer, per-device defaults."""

import dataclasses

import torch

from aimkit.backbones.mamba2 import Mamba2Config
from aimkit.backbones.transformer import TransformerConfig
from aimkit.bench import CPU_DEFAULTS, MAMBA2_ONLY_FIELDS, BenchOptions, build_bench_model, matched_transformer_layers
from aimkit.bench.models import transformer_overrides
from aimkit.bench.run import plan
from aimkit.policy import ExecutionPolicy


def test_mamba2_only_fields_follow_the_configs():
    mamba = {f.name for f in dataclasses.fields(Mamba2Config)}
    transformer = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert MAMBA2_ONLY_FIELDS == mamba - transformer
    assert {"d_state", "headdim", "d_conv", "expand"} <= MAMBA2_ONLY_FIELDS
    assert "norm_eps" not in MAMBA2_ONLY_FIELDS  # both backbones have it
    kept = transformer_overrides({"d_state": 16, "headdim": 8, "backbone__ngroups": 1, "d_model": 32, "n_layer": 2})
    assert kept == {"d_model": 32, "n_layer": 2}


def test_matched_transformer_and_policy_on_the_model():
    overrides = dict(d_model=64, n_layer=4, num_classes=10, vocab_size=64, d_state=16, headdim=16)
    n_layer, n_head = matched_transformer_layers("aim-b", overrides)
    assert n_head == 1 and n_layer >= 1
    policy = ExecutionPolicy(state_dtype="model", decode_graph=False)
    model = build_bench_model("aim-b", device=torch.device("cpu"), dtype=torch.float32, num_tokens=8,
                              policy=policy, backbone="transformer", overrides=overrides)
    assert model.config.backbone.name == "transformer" and model.config.n_layer == n_layer
    assert model.policy == policy
    assert all(p.any() for p in model.parameters() if p.is_floating_point())  # no zero gates left


def test_options_take_the_device_defaults():
    cpu = BenchOptions(device="cpu").resolved()
    assert cpu.models == CPU_DEFAULTS["models"] == ("aim-tiny-shapes",)
    assert cpu.check_model == "aim-tiny-shapes" and cpu.train_models == ("aim-tiny-shapes",)
    cuda = BenchOptions(device="cuda").resolved()
    assert cuda.models == ("aim-b", "aim-l", "aim-xl") and cuda.train_batch == 64
    assert BenchOptions(device="cpu", models=("aim-b",)).resolved().models == ("aim-b",)
    assert BenchOptions(device="cpu").to_dict()["policy"] == BenchOptions(device="cpu").policy.to_dict()


def test_plan_orders_rows_and_skips_compared_duplicates():
    opts = BenchOptions(device="cpu", suite="all", models=("m",), batches=(1, 2), tokens=(8,), compare_models=("m",),
                        compare_batches=(2,), compare_tokens=(8, 16), decode_models=("d",), decode_batches=(4,),
                        train_models=("t",)).resolved()
    assert plan(opts) == [
        ("sampling", ("m", "mamba2", (1, 2), 8)),
        ("sampling", ("m", "mamba2", (2,), 16)),
        ("sampling", ("m", "transformer", (2,), 8)),
        ("sampling", ("m", "transformer", (2,), 16)),
        ("decode", ("d", 4)),
        ("train", ("t", "eager")),
    ]


def test_comparison_covers_every_batch_and_skips_rows_the_grid_has():
    """--compare-batches 16,256: one job per backbone and token count with the batches the grid
    did not already time (the grid's Mamba2 rows at 256 tokens are not timed twice)."""
    opts = BenchOptions(device="cpu", suite="sampling", models=("m",), batches=(16,), tokens=(256,),
                        compare_models=("m",), compare_batches=(16, 256), compare_tokens=(256, 1024)).resolved()
    assert plan(opts) == [
        ("sampling", ("m", "mamba2", (16,), 256)),
        ("sampling", ("m", "mamba2", (256,), 256)),
        ("sampling", ("m", "mamba2", (16, 256), 1024)),
        ("sampling", ("m", "transformer", (16, 256), 256)),
        ("sampling", ("m", "transformer", (16, 256), 1024)),
    ]
