"""CPU smoke test of the benchmark harness (``aimkit bench``) and its floor arithmetic."""

import json

import pytest
import torch

import aimkit
from aimkit.bench import (
    CacheProfile,
    cache_profile,
    decode_floor,
    kv_cache_bytes_per_image,
    mamba_state_bytes_per_step,
    step_params,
)
from aimkit.cli import main

TINY = ["d_model=32", "n_layer=2", "num_classes=10", "vocab_size=64", "d_state=16", "headdim=8", "chunk_size=8"]


def test_state_bytes_match_performance_reference():
    # performance.md: AiM-B 37.7 MB, AiM-L 100.7 MB, AiM-XL 151 MB per image and step (bf16, guidance)
    assert mamba_state_bytes_per_step(24, 768) == 2 * 24 * (24 * 64 * 128) * 2 * 2 == 37_748_736
    assert round(mamba_state_bytes_per_step(48, 1024) / 1e6, 1) == 100.7
    assert round(mamba_state_bytes_per_step(48, 1536) / 1e6) == 151
    # a 36 x 1280 transformer at 256 tokens reads about 12 GB of KV cache per image with guidance
    assert round(kv_cache_bytes_per_image(36, 1280, 256) / 1e9, 1) == 12.1


def test_cache_profile_of_aim_b_bf16_state():
    model = aimkit.build("aim-b", device="meta", dtype=torch.bfloat16, pretrained=False, tokenizer=None,
                         state_dtype="model")
    profile = cache_profile(model)
    ssm = 24 * (24 * 64 * 128) * 2  # n_layer x nheads*headdim*d_state x bf16
    conv = 24 * (1536 + 2 * 128) * 4 * 2  # n_layer x conv_dim x d_conv x bf16
    assert profile == CacheProfile(ssm + conv, 0, 0, ("bfloat16",))
    # guidance (2 sequences), read + write: the 37.7 MB of performance.md plus the conv window
    assert 2 * 2 * ssm == mamba_state_bytes_per_step(24, 768)
    weight_bytes, matmul = step_params(model)
    assert weight_bytes > 2 * matmul > 2 * 16384 * 768  # blocks + tied LM head, bf16


def test_cache_profile_of_a_transformer():
    model = aimkit.build("aim-b", device="meta", dtype=torch.bfloat16, pretrained=False, tokenizer=None,
                         backbone="transformer", n_layer=3, n_head=12)
    profile = cache_profile(model)
    assert profile.fixed_bytes == 0
    assert profile.per_position_elements == 2 * 3 * 768  # K and V, every layer
    assert profile.per_position_bytes == 2 * profile.per_position_elements


def test_decode_floor_hand_example():
    profile = CacheProfile(fixed_bytes=100, per_position_bytes=10, per_position_elements=5, dtypes=("x",))
    floor = decode_floor(profile, rows=2, steps=3, weight_bytes=1000, matmul_params=50, bandwidth=1e3, flop_rate=1e3)
    # keys read: 1 + 2 + 3 = 6; state: 2 rows x (2 x 100 x 3) ; KV: 2 rows x 10 x (6 read + 3 written)
    assert floor.cache_bytes == 2 * (600 + 90)
    assert floor.weight_bytes == 3000
    assert floor.flops == 2 * (2 * 50 * 3 + 2 * 5 * 6)
    assert floor.memory_s == pytest.approx(4.38)
    assert floor.compute_s == pytest.approx(0.72)
    assert floor.seconds == floor.memory_s and floor.bound == "memory"


def test_bench_cli_end_to_end_on_cpu(tmp_path, capsys):
    argv = ["bench", "--device", "cpu", "--suite", "sampling", "--models", "aim-b,aim-nonexistent",
            "--batches", "2", "--tokens", "16", "--repeats", "1", "--transformer", "--out", str(tmp_path)]
    for item in TINY:
        argv += ["--override", item]
    assert main(argv) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {"options", "device", "correctness", "rows", "elapsed_s", "plots"} <= set(data)
    assert {"copy_bandwidth", "matmul_flops", "date", "torch", "triton", "mamba-ssm"} <= set(data["device"])
    assert data["correctness"]["passed"] is True
    assert data["correctness"]["forward_rel_err"] < 2e-2 and data["correctness"]["decode_rel_err"] < 2e-2
    rows = {(r["model"], r["backbone"]): r for r in data["rows"]}
    assert rows[("aim-nonexistent", "mamba2")]["status"] == "error"  # a failing row keeps the table
    for backbone in ("mamba2", "transformer"):
        row = rows[("aim-b", backbone)]
        assert row["status"] == "ok", row.get("error")
        for key in ("seconds_per_batch", "images_per_s", "first_call_s", "fraction_of_floor", "floor", "params"):
            assert row[key] is not None
        assert row["images_per_s"] == pytest.approx(2 / row["seconds_per_batch"])
        assert 0 < row["fraction_of_floor"] < 1
    assert rows[("aim-b", "mamba2")]["state_bytes_per_seq"] > 0
    assert rows[("aim-b", "transformer")]["kv_bytes_per_seq_position"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "| aim-b | mamba2 |" in md and "| aim-b | transformer |" in md
    printed = capsys.readouterr().out.splitlines()  # the compact table is printed last
    assert printed[-1].startswith("device:") and printed[-2].startswith("correctness:")
    assert printed[-4 - len(data["rows"])].startswith("suite")
    assert len(list(tmp_path.iterdir())) <= 8
