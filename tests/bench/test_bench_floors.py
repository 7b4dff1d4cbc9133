"""aimkit.bench.floors: bytes and FLOPs of decoding and training, checked by hand on small cases."""

import pytest
import torch
from torch import nn

import aimkit
from aimkit.bench import (
    CacheProfile,
    cache_profile,
    decode_floor,
    kv_cache_bytes_per_image,
    mamba_state_bytes_per_step,
    step_params,
    train_flops_per_token,
    utilization,
)
from aimkit.policy import ExecutionPolicy


def test_state_bytes_hand_example():
    # 1 layer, d_model 4, expand 2 -> d_inner 8, headdim 2 -> 4 heads; d_state 3; float32; 1 sequence
    # state 4 x 2 x 3 = 24 values x 4 bytes = 96 bytes, read + write = 192
    assert mamba_state_bytes_per_step(1, 4, expand=2, headdim=2, d_state=3, itemsize=4, sequences=1) == 192
    assert mamba_state_bytes_per_step(1, 4, expand=2, headdim=2, d_state=3, itemsize=4, sequences=2) == 384


def test_kv_bytes_hand_example():
    # 3 tokens read 1 + 2 + 3 = 6 positions; K and V of 2 values, 1 byte each, one layer, one sequence
    assert kv_cache_bytes_per_image(1, 2, 3, itemsize=1, sequences=1) == 2 * 2 * 6 == 24


def test_state_bytes_match_performance_reference():
    # performance.md: AiM-B 37.7 MB, AiM-L 100.7 MB, AiM-XL 151 MB per image and step (bf16, guidance)
    assert mamba_state_bytes_per_step(24, 768) == 2 * 24 * (24 * 64 * 128) * 2 * 2 == 37_748_736
    assert round(mamba_state_bytes_per_step(48, 1024) / 1e6, 1) == 100.7
    assert round(mamba_state_bytes_per_step(48, 1536) / 1e6) == 151
    # a 36 x 1280 transformer at 256 tokens reads about 12 GB of KV cache per image with guidance
    assert round(kv_cache_bytes_per_image(36, 1280, 256) / 1e9, 1) == 12.1


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


def test_decode_floor_mid_sequence_compute_bound():
    profile = CacheProfile(fixed_bytes=0, per_position_bytes=4, per_position_elements=2, dtypes=("x",))
    floor = decode_floor(profile, rows=1, steps=1, weight_bytes=8, matmul_params=10, bandwidth=100.0,
                         flop_rate=10.0, first_step=4)
    # one step at position 4 reads 5 positions and writes 1: 4 x 6 = 24 bytes; weights 8 bytes
    assert floor.cache_bytes == 24 and floor.weight_bytes == 8
    assert floor.flops == 2 * 10 + 2 * 2 * 5 == 40
    assert floor.memory_s == pytest.approx(0.32) and floor.compute_s == pytest.approx(4.0)
    assert floor.bound == "compute" and floor.seconds == floor.compute_s
    assert floor.to_dict()["bound"] == "compute"


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embed = nn.Embedding(5, 3)  # tied to the head below: counted once
        self.pos_embed = nn.Embedding(7, 3)  # one row per step: excluded
        self.class_embed = nn.Embedding(2, 3)  # once per image: excluded
        self.proj = nn.Linear(3, 4)  # 12 weights (2-D) + 4 bias
        self.norm = nn.LayerNorm(4)  # 4 + 4, not matmul
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.tok_embed.weight


def test_step_params_hand_example():
    nbytes, matmul = step_params(_Toy())
    assert matmul == 15 + 12
    assert nbytes == 4 * (15 + 12 + 4 + 8)


def test_train_flops_and_utilization():
    assert train_flops_per_token(10) == 60
    assert utilization(50.0, 100.0) == (0.5, False)
    assert utilization(100.0, 100.0) == (1.0, False)
    assert utilization(150.0, 100.0) == (1.0, True)  # clamped and flagged, never over 100%


def test_cache_profile_of_aim_b_bf16_state():
    model = aimkit.build("aim-b", device="meta", dtype=torch.bfloat16, pretrained=False, tokenizer=None)
    model.set_policy(ExecutionPolicy(state_dtype="model"))
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
