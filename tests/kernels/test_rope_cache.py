"""The rotary + KV-cache-write kernel (aimkit.kernels.rope_cache, the first half of op
``decode_attention``) against its PyTorch reference, and both against the transformer's own maths
(``rotary_angles``, ``rotary_angles_2d``, ``apply_rotary`` of aimkit.backbones.transformer, and the
reference-policy ``Attention.step``).

On a CPU machine the kernel runs in Triton's interpreter; on a GPU machine compiled on CUDA tensors.
Caches start filled with a sentinel: every entry but the current position's must still hold it.

Tolerances. The reference repeats the model's torch ops and must equal the model bit for bit. The
kernel rounds the exponent, the power, the inverse frequency and the angle to float32 where the
model does, but takes the power from float64 ``exp2`` (correctly rounded, where torch's float32
``pow`` is off by a last bit now and then) and its own cos/sin, so its tables may differ from the
model's by a few float32 ulps of the angle: ``ANGLE_ULPS * eps32 * max(1, |angle|)`` radians (the
angle reaches 1024 rad at p = 1024 in "1d"; measured in the interpreter: below one such ulp). A
rotation off by d radians moves a pair ``(x0, x1)`` by at most ``d * |(x0, x1)|``, so outputs are
compared with that absolute tolerance, plus one rounding of the output dtype (two units in the
last place for 16-bit dtypes: the interpreter truncates float32 -> bfloat16 casts where torch and
the GPU round).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run in Triton's interpreter on CPU
pytest.importorskip("triton")

from aimkit.backbones.base import InferenceParams  # noqa: E402
from aimkit.backbones.transformer import (  # noqa: E402
    Attention,
    TransformerConfig,
    apply_rotary,
    rotary_angles,
    rotary_angles_2d,
)
from aimkit.kernels.rope_cache import rope_cache_write_, rope_cache_write_reference  # noqa: E402
from aimkit.policy import ExecutionPolicy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SENTINEL = -7.25  # exact in every float dtype; no written value is ever this
BASE = 10000.0
SEQLEN = 17  # positions 0..16: the class token and a 4 x 4 grid for "2d"
GRID = 4
ANGLE_ULPS = 4  # kernel angle vs the model's, in float32 ulps of the angle (module docstring)
EPS32 = torch.finfo(torch.float32).eps


def _max_angle(p, head_dim, rope, grid_size):
    """Largest rotary angle (rad) at position p: pair 0's, whose inverse frequency is 1."""
    if rope == "1d":
        return float(p)
    cell = max(p - 1, 0)
    return float(max(cell // grid_size, cell % grid_size))


def _tolerance(dtype, values, angle):
    """(atol, rtol): the angle term ``ANGLE_ULPS * eps32 * max(1, angle) * max |pair|`` plus the
    output dtype's rounding (module docstring)."""
    pair_norm = values.float().unflatten(-1, (-1, 2)).norm(dim=-1).max().item()
    atol = ANGLE_ULPS * EPS32 * max(1.0, angle) * pair_norm
    rtol = 1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    return atol + 1e-7, rtol


def _model(qkv, p, n_head, n_kv_head, head_dim, rope, grid_size):
    """q (B, Hkv, G, hd), k and v (B, Hkv, hd) of the current token as ``Attention.step`` builds them
    (``_project``: the transformer's rotary tables and ``apply_rotary``; then the grouped reshape)."""
    batch = qkv.shape[0]
    positions = torch.tensor([p])
    if rope == "2d":
        cos, sin = rotary_angles_2d(positions, head_dim, BASE, grid_size)
    else:
        cos, sin = rotary_angles(positions, head_dim, BASE)
    q, k, v = qkv.split([n_head * head_dim, n_kv_head * head_dim, n_kv_head * head_dim], dim=-1)
    q = apply_rotary(q.reshape(batch, 1, n_head, head_dim), cos, sin)  # (B, 1, H, hd)
    k = apply_rotary(k.reshape(batch, 1, n_kv_head, head_dim), cos, sin)
    q = q.transpose(1, 2).reshape(batch, n_kv_head, n_head // n_kv_head, head_dim)
    return q, k[:, 0], v.reshape(batch, n_kv_head, head_dim)


def _qkv(batch, n_head, n_kv_head, head_dim, dtype, seed=0):
    """(B, (H + 2 Hkv) * hd) in ``dtype`` with strided rows (a column slice of a wider projection)."""
    width = (n_head + 2 * n_kv_head) * head_dim
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, width + 5, generator=g).to(dtype)[:, 3:3 + width]


def _sentinel_cache(batch, n_kv_head, head_dim, dtype, extra_rows=1):
    """A (B + extra_rows, Hkv, S, hd) cache of sentinels; the kernel gets the row view ``[:B]``."""
    return torch.full((batch + extra_rows, n_kv_head, SEQLEN, head_dim), SENTINEL, dtype=dtype)


def _assert_only_position_written(cache, batch, p):
    """Every row >= B and every position != p still holds the sentinel."""
    others = torch.ones(SEQLEN, dtype=torch.bool)
    if 0 <= p < SEQLEN:
        others[p] = False
    assert torch.all(cache[:, :, others] == SENTINEL)
    assert torch.all(cache[batch:] == SENTINEL)


def _run(fn, qkv, n_head, n_kv_head, head_dim, rope, p, cache_dtype, **kwargs):
    """Call ``fn`` (kernel or reference) on sentinel caches; -> q, k_cache, v_cache on the CPU (whole caches)."""
    batch = qkv.shape[0]
    k_cache = _sentinel_cache(batch, n_kv_head, head_dim, cache_dtype).to(DEVICE)
    v_cache = _sentinel_cache(batch, n_kv_head, head_dim, cache_dtype).to(DEVICE)
    position = torch.tensor(p, device=DEVICE)
    q = fn(qkv.to(DEVICE), k_cache[:batch], v_cache[:batch], position, n_head=n_head, n_kv_head=n_kv_head,
           head_dim=head_dim, rope=rope, base=BASE, grid_size=GRID if rope == "2d" else None, **kwargs)
    return q.cpu(), k_cache.cpu(), v_cache.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 100])
@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (4, 2)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("rope", ["1d", "2d"])
def test_kernel_and_reference_match_the_model(rope, batch, n_head, n_kv_head, head_dim, dtype):
    """Positions 0, 1, 5 and S-1: the reference equals the model's functions (computed on the CPU)
    exactly on the CPU and within the angle tolerance on a GPU (CUDA's pow and cos/sin differ from
    the CPU's in the last bit), the kernel within the angle tolerance; only position p of the first
    B cache rows is written."""
    qkv = _qkv(batch, n_head, n_kv_head, head_dim, dtype)
    for p in (0, 1, 5, SEQLEN - 1):
        q_model, k_model, v_model = _model(qkv, p, n_head, n_kv_head, head_dim, rope, GRID)
        atol, rtol = _tolerance(dtype, qkv, _max_angle(p, head_dim, rope, GRID))
        ref_atol, ref_rtol = (0, 0) if DEVICE == "cpu" else (atol, rtol)
        q_ref, k_ref, v_ref = _run(rope_cache_write_reference, qkv, n_head, n_kv_head, head_dim, rope, p, dtype)
        torch.testing.assert_close(q_ref, q_model, atol=ref_atol, rtol=ref_rtol)
        torch.testing.assert_close(k_ref[:batch, :, p], k_model, atol=ref_atol, rtol=ref_rtol)
        torch.testing.assert_close(v_ref[:batch, :, p], v_model, atol=0, rtol=0)

        q, k_cache, v_cache = _run(rope_cache_write_, qkv, n_head, n_kv_head, head_dim, rope, p, dtype)
        assert q.shape == (batch, n_kv_head, n_head // n_kv_head, head_dim) and q.dtype == dtype
        assert q.is_contiguous()
        torch.testing.assert_close(q, q_model, atol=atol, rtol=rtol)
        torch.testing.assert_close(k_cache[:batch, :, p], k_model, atol=atol, rtol=rtol)
        torch.testing.assert_close(v_cache[:batch, :, p], v_model, atol=0, rtol=0)  # a plain copy
        for cache in (k_cache, v_cache, k_ref, v_ref):
            _assert_only_position_written(cache, batch, p)


@pytest.mark.parametrize("rope,head_dim,grid_size,positions", [
    ("1d", 128, None, (1, 7, 100, 1024, 4095)),  # angles up to 4095 rad
    ("1d", 100, None, (3, 1024)),
    ("2d", 100, 64, (0, 1, 65, 1024, 4096)),  # rows and columns up to 63
    ("2d", 16, 3, (2, 9)),
])
def test_kernel_tables_match_the_model_tables(rope, head_dim, grid_size, positions):
    """Queries of unit pairs (1, 0) come out as (cos, sin): the kernel's tables, pair by pair,
    within ANGLE_ULPS float32 ulps of each angle of the model's float32 tables."""
    n_head = 2
    qkv = torch.zeros(1, 4 * head_dim)
    qkv[:, 0:2 * head_dim:2] = 1.0  # q pairs (1, 0) for both query heads
    cache = torch.zeros(1, 1, positions[-1] + 1, head_dim, device=DEVICE)
    for p in positions:
        q = rope_cache_write_(qkv.to(DEVICE), cache, cache.clone(), torch.tensor(p, device=DEVICE),
                              n_head=n_head, n_kv_head=1, head_dim=head_dim, rope=rope, base=BASE,
                              grid_size=grid_size).cpu()
        cos, sin = q[0, 0, :, 0::2], q[0, 0, :, 1::2]  # (2, hd / 2) each, one row per query head
        positions_t = torch.tensor([p])
        if rope == "2d":
            cos_model, sin_model = rotary_angles_2d(positions_t, head_dim, BASE, grid_size)
            quarter = head_dim // 4
            cell = max(p - 1, 0)
            coords = torch.tensor([cell // grid_size] * quarter + [cell % grid_size] * quarter)
            inv_freq = 1.0 / torch.pow(BASE, torch.arange(0, 2 * quarter, 2).float() / (head_dim // 2))
            angles = coords * inv_freq.repeat(2)
        else:
            cos_model, sin_model = rotary_angles(positions_t, head_dim, BASE)
            angles = p / torch.pow(BASE, torch.arange(0, head_dim, 2).float() / head_dim)
        bound = ANGLE_ULPS * EPS32 * angles.abs().clamp(min=1.0)  # (hd / 2,) radians
        assert torch.all((cos - cos_model).abs() <= bound), (p, (cos - cos_model).abs().max())
        assert torch.all((sin - sin_model).abs() <= bound), (p, (sin - sin_model).abs().max())


@pytest.mark.parametrize("block_h", [1, 2, 4, 8])
def test_head_blocks_across_the_q_k_v_boundaries(block_h):
    """Head blocks that straddle q | k | v and a partial last block: same result as the default block."""
    n_head, n_kv_head, head_dim, batch, p = 6, 3, 100, 2, 5  # 12 heads
    qkv = _qkv(batch, n_head, n_kv_head, head_dim, torch.float32, seed=1)
    q_ref, k_ref, v_ref = _run(rope_cache_write_, qkv, n_head, n_kv_head, head_dim, "1d", p, torch.float32)
    q, k_cache, v_cache = _run(rope_cache_write_, qkv, n_head, n_kv_head, head_dim, "1d", p, torch.float32,
                               block_h=block_h, num_warps=1)
    assert torch.equal(q, q_ref) and torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_position_major_caches_mixed_dtypes_and_a_one_element_position():
    """Row views of caches stored position-major (the strides of a (B + 2, S, Hkv, hd) buffer), a
    float32 projection over bfloat16 caches (k and v rounded once, to the cache dtype), and the
    (1,)-shaped position ``Attention.step`` passes."""
    batch, n_head, n_kv_head, head_dim, p = 2, 4, 2, 16, 9
    qkv = _qkv(batch, n_head, n_kv_head, head_dim, torch.float32, seed=2)
    k_cache, v_cache = (torch.full((batch + 2, SEQLEN, n_kv_head, head_dim), SENTINEL, dtype=torch.bfloat16)
                        .transpose(1, 2).to(DEVICE) for _ in range(2))
    assert not k_cache[:batch].is_contiguous()
    q = rope_cache_write_(qkv.to(DEVICE), k_cache[:batch], v_cache[:batch], torch.tensor([p], device=DEVICE),
                          n_head=n_head, n_kv_head=n_kv_head, head_dim=head_dim, rope="1d", base=BASE)
    q_model, k_model, v_model = _model(qkv, p, n_head, n_kv_head, head_dim, "1d", None)
    atol, _ = _tolerance(torch.float32, qkv, p)
    torch.testing.assert_close(q.cpu(), q_model, atol=atol, rtol=1e-6)
    bf16 = 2 * torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(k_cache[:batch, :, p].cpu(), k_model.to(torch.bfloat16), atol=atol, rtol=bf16)
    torch.testing.assert_close(v_cache[:batch, :, p].cpu(), v_model.to(torch.bfloat16), atol=0, rtol=bf16)
    for cache in (k_cache.cpu(), v_cache.cpu()):
        _assert_only_position_written(cache, batch, p)


@pytest.mark.parametrize("p", [SEQLEN, -1])
def test_position_outside_the_cache_writes_nothing(p):
    """A device position cannot raise: outside [0, S) the caches stay as they were, q is still rotated."""
    qkv = _qkv(2, 4, 2, 16, torch.float32, seed=3)
    q, k_cache, v_cache = _run(rope_cache_write_, qkv, 4, 2, 16, "1d", p, torch.float32)
    for cache in (k_cache, v_cache):
        assert torch.all(cache == SENTINEL)
    atol, _ = _tolerance(torch.float32, qkv, abs(p))
    torch.testing.assert_close(q, _model(qkv, p, 4, 2, 16, "1d", None)[0], atol=atol, rtol=1e-6)


@pytest.mark.parametrize("rope", ["1d", "2d"])
def test_kernel_writes_the_cache_attention_step_writes(rope):
    """``Attention.step`` under the reference policy (PyTorch rotary + ``index_copy_``) and the
    kernel on the same projection fill the cache alike, step after step."""
    config = TransformerConfig(n_head=4, n_kv_head=2, rope=rope, grid_size=GRID if rope == "2d" else None)
    torch.manual_seed(4)
    attn = Attention(64, layer_idx=0, config=config, policy=ExecutionPolicy(decode_attention="reference"))
    batch = 3
    params = InferenceParams(SEQLEN, batch, position=torch.zeros((), dtype=torch.long),
                             key_value_memory_dict={0: attn.allocate_inference_cache(batch, SEQLEN)})
    k_cache, v_cache = (torch.zeros(batch, 2, SEQLEN, 16, device=DEVICE) for _ in range(2))
    with torch.no_grad():
        for _ in range(4):  # positions 0..3
            x = torch.randn(batch, 1, 64)
            attn.step(x, params)
            rope_cache_write_(attn.wqkv(x[:, 0]).to(DEVICE), k_cache, v_cache, params.position.to(DEVICE),
                              n_head=4, n_kv_head=2, head_dim=16, rope=rope, base=config.rope_base,
                              grid_size=config.grid_size)
            params.advance()
    k_model, v_model = params.key_value_memory_dict[0]
    torch.testing.assert_close(k_cache.cpu(), k_model, atol=1e-6, rtol=1e-6)
    assert torch.equal(v_cache.cpu(), v_model)


def _call(fn, qkv=None, k=None, v=None, position=None, **overrides):
    kwargs = {"n_head": 4, "n_kv_head": 2, "head_dim": 16, "rope": "1d", "base": BASE, "grid_size": None}
    kwargs.update(overrides)
    qkv = torch.zeros(2, 128, device=DEVICE) if qkv is None else qkv
    k = torch.zeros(2, 2, SEQLEN, 16, device=DEVICE) if k is None else k
    v = torch.zeros(2, 2, SEQLEN, 16, device=DEVICE) if v is None else v
    position = torch.tensor(3, device=DEVICE) if position is None else position
    return fn(qkv, k, v, position, **kwargs)


@pytest.mark.parametrize("fn", [rope_cache_write_, rope_cache_write_reference])
def test_rejects_bad_arguments(fn):
    cache = torch.zeros(2, 2, SEQLEN, 16, device=DEVICE)
    bad = [
        ({"qkv": torch.zeros(2, 96, device=DEVICE)}, r"qkv must be \(B, \(n_head \+ 2 \* n_kv_head\)"),
        ({"qkv": torch.zeros(2, 1, 128, device=DEVICE)}, "qkv must be"),
        ({"k": cache[:, :1], "v": cache[:, :1]}, "k_cache and v_cache must both be"),
        ({"k": cache[:1], "v": cache[:1]}, "k_cache and v_cache must both be"),
        ({"v": cache[..., :8]}, "k_cache and v_cache must both be"),
        ({"v": cache.half()}, "float16, bfloat16 or float32"),
        ({"qkv": torch.zeros(2, 128, device=DEVICE, dtype=torch.float64)}, "float16, bfloat16 or float32"),
        ({"position": torch.tensor(3.0, device=DEVICE)}, "position must be a one-element int64 tensor"),
        ({"position": torch.tensor([3, 4], device=DEVICE)}, "position must be a one-element int64 tensor"),
        ({"head_dim": 15, "qkv": torch.zeros(2, 120, device=DEVICE)}, "head_dim must be a positive multiple of 2"),
        ({"head_dim": 18, "rope": "2d", "grid_size": 4}, "head_dim must be a positive multiple of 4"),
        ({"rope": "2d"}, "rope '2d' needs a positive grid_size"),
        ({"rope": "2d", "grid_size": 0}, "rope '2d' needs a positive grid_size"),
        ({"rope": "3d"}, "rope must be one of"),
        ({"n_head": 3, "n_kv_head": 2}, "must be a positive multiple of n_kv_head"),
        ({"base": 0.0}, "base must be a positive float"),
        ({"base": float("nan")}, "base must be a positive float"),
    ]
    for args, message in bad:
        tensors = {key: args.pop(key) for key in ("qkv", "k", "v", "position") if key in args}
        with pytest.raises(ValueError, match=message):
            _call(fn, **tensors, **args)


def test_kernel_rejects_layouts_it_cannot_address():
    strided = torch.zeros(2, 2, 16, SEQLEN, device=DEVICE).transpose(-1, -2)  # last dim strided
    with pytest.raises(ValueError, match="contiguous last dimension"):
        _call(rope_cache_write_, k=strided)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        _call(rope_cache_write_, qkv=torch.zeros(128, 2, device=DEVICE).t())
    with pytest.raises(ValueError, match="block_h must be a power of two"):
        _call(rope_cache_write_, block_h=3)
