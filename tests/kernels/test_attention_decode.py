"""The decode-attention kernels (aimkit.kernels.attention_decode, op ``decode_attention``) against
their PyTorch reference, and the reference against ``F.scaled_dot_product_attention``.

On a CPU machine the kernels run in Triton's interpreter; on a GPU machine compiled on CUDA tensors.
Cache positions past the current one hold NaN and huge values: a kernel that read them would
return NaN or inf.
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run in Triton's interpreter on CPU
pytest.importorskip("triton")

from aimkit.kernels.attention_decode import decode_attention, decode_attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tolerance(dtype):
    """(atol, rtol) against the float32 reference on the same inputs: 1e-5 for float32; two units in
    the last place for 16-bit outputs (the interpreter truncates float32 -> bfloat16 casts where
    the GPU rounds, and the 16-bit path rounds the probabilities to the cache dtype)."""
    if dtype == torch.float32:
        return 1e-5, 1e-5
    eps = torch.finfo(dtype).eps
    return 2 * eps, 2 * eps


def _inputs(batch, heads, group, head_dim, seqlen, dtype, seed=0):
    """q (B, Hkv, G, D) and clean k, v caches (B, Hkv, S, D), float32 values exact in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g).to(dtype)
               for n in (group, seqlen, seqlen))
    return q, k, v


def _poisoned(cache, position):
    """A device copy of ``cache`` whose positions past ``position`` hold NaN, inf and huge values."""
    cache = cache.clone()
    garbage = torch.tensor([float("nan"), float("inf"), -6e4])  # -6e4: huge, finite in float16
    tail = cache[:, :, position + 1:]
    tail.copy_(garbage.to(cache.dtype)[torch.arange(tail.numel()) % 3].view(tail.shape))
    return cache.to(DEVICE)


@pytest.mark.parametrize("batch,heads,group,head_dim,seqlen,dtype,block_n,num_splits", [
    (1, 1, 1, 16, 17, torch.float32, 16, None),  # 2 splits of 1 block, the last one partly valid
    (3, 2, 4, 100, 64, torch.float32, 16, None),  # 4 splits; D padded to 128
    (1, 2, 4, 64, 64, torch.float32, 16, 1),  # one split of 4 blocks: the output written directly
    (3, 1, 1, 100, 17, torch.float32, 64, None),  # block_n capped at 32: one block, one split
    (1, 1, 8, 128, 64, torch.float32, 16, 2),  # 2 splits of 2 blocks; G = 8, D = 128
    (1, 1, 1, 64, 17, torch.bfloat16, 16, None),
    (3, 2, 4, 100, 64, torch.bfloat16, 16, 2),
    (1, 2, 1, 16, 64, torch.bfloat16, 64, None),
    (3, 2, 4, 64, 64, torch.float16, 16, None),  # 16-bit tiles on tl.dot (also in the interpreter)
    (1, 1, 4, 100, 64, torch.float16, 16, 1),
])
def test_decode_attention_matches_reference(batch, heads, group, head_dim, seqlen, dtype, block_n, num_splits):
    """Positions 0, 5 and S-1 through one position tensor (the kernels read it on the device, as a
    replayed CUDA graph would): equal to the float32 reference on the valid prefix."""
    q, k, v = _inputs(batch, heads, group, head_dim, seqlen, dtype)
    position = torch.zeros((), dtype=torch.int64, device=DEVICE)
    atol, rtol = _tolerance(dtype)
    for p in (0, 5, seqlen - 1):
        position.fill_(p)
        out = decode_attention(q.to(DEVICE), _poisoned(k, p), _poisoned(v, p), position,
                               block_n=block_n, num_splits=num_splits)
        assert out.shape == q.shape and out.dtype == dtype
        expected = decode_attention_reference(q.float(), k.float(), v.float(), torch.tensor(p))
        torch.testing.assert_close(out.float().cpu(), expected, atol=atol, rtol=rtol)


def test_decode_attention_views_scale_and_mixed_dtypes():
    """Row views ``cache[:B]`` of a larger, position-major cache, a strided query (the transformer's head split), an
    explicit scale and a float32 query over bfloat16 caches."""
    batch, heads, group, head_dim, seqlen, p = 2, 2, 4, 100, 64, 37
    _, k, v = _inputs(5, heads, group, head_dim, seqlen, torch.bfloat16, seed=1)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(batch, heads * group + 3, head_dim, generator=g)[:, 3:].view(batch, heads, group, head_dim)
    # rows 0..B-1 of a 5-row cache stored position-major (strides of a (5, S, Hkv, D) buffer)
    k_dev, v_dev = (_poisoned(t, p).transpose(1, 2).contiguous().transpose(1, 2)[:batch] for t in (k, v))
    assert not k_dev.is_contiguous() and not q.is_contiguous()
    position = torch.tensor(p, device=DEVICE)
    out = decode_attention(q.to(DEVICE), k_dev, v_dev, position, scale=0.3, block_n=16)
    expected = decode_attention_reference(q, k[:batch].float(), v[:batch].float(), position.cpu(), scale=0.3)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


def test_decode_attention_position_past_the_cache_reads_the_last_key():
    q, k, v = _inputs(1, 1, 4, 16, 17, torch.float32)
    args = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    out = decode_attention(*args, torch.tensor(40, device=DEVICE), block_n=16)
    torch.testing.assert_close(out, decode_attention(*args, torch.tensor(16, device=DEVICE), block_n=16))


def test_decode_attention_rejects_bad_arguments():
    q, k, v = (t.to(DEVICE) for t in _inputs(1, 2, 4, 16, 17, torch.float32))
    position = torch.tensor(3, device=DEVICE)
    k_strided = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, last dim strided
    with pytest.raises(ValueError, match="contiguous last dimension"):
        decode_attention(q, k_strided, v, position)
    with pytest.raises(ValueError, match="do not fit together"):
        decode_attention(q, k[:, :1], v[:, :1], position)
    with pytest.raises(ValueError, match="position must be a one-element int64 tensor"):
        decode_attention(q, k, v, position.float())
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        decode_attention(q, k, v.half(), position)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        decode_attention(q, k, v, position, block_n=24)


@pytest.mark.parametrize("group,head_dim,p,scale", [(1, 16, 0, None), (4, 100, 5, None), (4, 64, 63, 0.2)])
def test_reference_matches_sdpa_with_a_boolean_mask(group, head_dim, p, scale):
    """The reference against PyTorch's attention masked as ``Attention.step`` masks it (finite
    garbage past the position: SDPA would spread NaN)."""
    q, k, v = _inputs(3, 2, group, head_dim, 64, torch.float32, seed=3)
    k[:, :, p + 1:] *= 1e3
    v[:, :, p + 1:] = 1e6
    position = torch.tensor(p)
    visible = (torch.arange(64) <= position)[None, :]  # (1, S): one mask for the G query rows
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    torch.testing.assert_close(decode_attention_reference(q, k, v, position, scale), expected,
                               atol=1e-6, rtol=1e-5)


def test_no_rows_return_an_empty_output():
    q = torch.empty(0, 2, 1, 16, device=DEVICE)
    cache = torch.zeros(0, 2, 8, 16, device=DEVICE)
    out = decode_attention(q, cache, cache, torch.tensor(3, device=DEVICE))
    assert out.shape == (0, 2, 1, 16)
