"""LlamaGen state that is not weights: the ``freqs_cis`` rotary table and KV-cache buffers.

Versions of LlamaGen kept ``freqs_cis`` as a buffer, so their state dicts hold it (LlamaGen's own
samplers and its vLLM loader pop it before loading); a state dict taken after ``setup_caches``
holds each layer's ``attention.kv_cache.k_cache`` / ``v_cache``. Both load without them being
weights, a table of other positions is refused, and one of other heads is reported.
"""

from __future__ import annotations

import pytest
import torch
from conftest import llamagen_reference

import aimkit
from aimkit.errors import CheckpointError
from aimkit.llamagen import to_llamagen

HEAD_DIM = 16  # llamagen-test: d_model 64, 4 heads, a 4 x 4 grid


def llamagen_freqs_cis(grid: int, head_dim: int = HEAD_DIM, base: float = 10000.0) -> torch.Tensor:
    """LlamaGen's 2-D table (1 + grid^2, head_dim / 2, 2), written here from its definition: the
    class token's row is zeros; grid cell (r, c) has angles r * f then c * f, f_j = base^(-2j / (head_dim / 2))."""
    half = head_dim // 2
    freqs = base ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # (head_dim / 4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles = torch.cat((rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs), dim=-1)  # (G^2, half)
    table = torch.stack((angles.cos(), angles.sin()), dim=-1)
    return torch.cat((torch.zeros(1, half, 2, dtype=torch.float64), table)).float()


@pytest.fixture
def reference():
    return llamagen_reference()


def _load(tmp_path, obj, name="c2i.pt", **overrides):
    torch.save(obj, tmp_path / name)
    return aimkit.build("llamagen-test", pretrained=tmp_path / name, **overrides).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_a_checkpoint_holding_freqs_cis_loads_exactly(tmp_path, reference, dtype, prefix):
    gen, codes, labels, logits = reference
    state = {prefix + k: v for k, v in to_llamagen(gen).items()}
    state[prefix + "freqs_cis"] = llamagen_freqs_cis(4).to(dtype)
    loaded = _load(tmp_path, {"model": state, "steps": 10})
    with torch.no_grad():
        assert torch.equal(loaded(codes, labels), logits)


def test_freqs_cis_of_another_grid_loads_and_says_how_to_sample_as_trained(tmp_path, reference):
    """Published XL / XXL / 3B weights were trained at 384 px: a 24 x 24 table."""
    gen, codes, labels, logits = reference
    with pytest.warns(UserWarning, match="24 x 24 token grid.*num_tokens=576, grid_size=24"):
        loaded = _load(tmp_path, {"model": {**to_llamagen(gen), "freqs_cis": llamagen_freqs_cis(24)}})
    with torch.no_grad():
        assert torch.equal(loaded(codes, labels), logits)


@pytest.mark.parametrize(
    "table, overrides",
    [
        (llamagen_freqs_cis(4, base=500.0), {}),  # the file's positions turn at another base
        (llamagen_freqs_cis(4), dict(rope_base=500.0)),  # the model's do
        (llamagen_freqs_cis(4).flip(-1), {}),  # sin and cos exchanged
        (torch.cat((torch.tensor([[1.0, 0.0]]).expand(1, 8, 2), llamagen_freqs_cis(4)[1:])), {}),  # class token rotated
    ],
    ids=["file-base", "model-base", "sin-cos", "class-row"],
)
def test_freqs_cis_of_other_positions_is_refused(tmp_path, reference, table, overrides):
    gen = reference[0]
    with pytest.raises(CheckpointError, match="freqs_cis is not this model's 2-D rotary table"):
        _load(tmp_path, {"model": {**to_llamagen(gen), "freqs_cis": table}}, **overrides)


def test_freqs_cis_of_other_heads_is_reported_with_the_other_misfits(tmp_path, reference):
    """A 16-channel table cannot be the table of a model with 2 heads of 32: reported unexpected,
    with the reason, in the one message of the strict check."""
    gen = reference[0]
    with pytest.raises(CheckpointError, match=r"1 unexpected \(freqs_cis\).*heads of 16 channels"):
        _load(tmp_path, {"model": {**to_llamagen(gen), "freqs_cis": llamagen_freqs_cis(4)}}, n_head=2)


def test_kv_cache_buffers_of_llamagens_setup_caches_are_not_weights(tmp_path, reference):
    gen, codes, labels, logits = reference
    state = to_llamagen(gen)
    for i in range(2):  # (max_batch_size, n_head, find_multiple(17, 8), head_dim)
        state[f"layers.{i}.attention.kv_cache.k_cache"] = torch.zeros(8, 4, 24, HEAD_DIM)
        state[f"layers.{i}.attention.kv_cache.v_cache"] = torch.zeros(8, 4, 24, HEAD_DIM)
    loaded = _load(tmp_path, {"model": state})
    with torch.no_grad():
        assert torch.equal(loaded(codes, labels), logits)
    state["layers.2.attention.kv_cache.k_cache"] = torch.zeros(8, 4, 24, HEAD_DIM)  # a layer this model lacks
    with pytest.raises(CheckpointError, match=r"1 unexpected \(layers\.2\.attention\.kv_cache\.k_cache\)"):
        _load(tmp_path, {"model": state}, name="deeper.pt")


def test_freqs_cis_in_complex_form_loads_and_a_real_half_table_is_refused(tmp_path, reference):
    """``cos + i sin`` (torch.polar's form, (1 + G^2, head_dim / 2) complex) is the same table; a real
    tensor of that shape is not a rotary table."""
    gen, codes, labels, logits = reference
    table = torch.view_as_complex(llamagen_freqs_cis(4).contiguous())
    loaded = _load(tmp_path, {"model": {**to_llamagen(gen), "freqs_cis": table}})
    with torch.no_grad():
        assert torch.equal(loaded(codes, labels), logits)
    with pytest.raises(CheckpointError, match=r"1 unexpected \(freqs_cis\)"):
        _load(tmp_path, {"model": {**to_llamagen(gen), "freqs_cis": table.real.clone()}}, name="real.pt")
