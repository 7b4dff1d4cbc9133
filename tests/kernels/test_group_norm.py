"""The GroupNorm + swish kernel (aimkit.kernels.group_norm) against its PyTorch reference (what
the VQ decoder computes: ``F.group_norm``, then ``y * torch.sigmoid(y)``) and both against the
same maths in float64.

On a CPU machine the kernels run in Triton's interpreter (small shapes, each call a few hundred
programs); on a GPU machine compiled on CUDA tensors.

Tolerances, per element, around the float64 output ``out`` (y: the float64 norm before swish; u:
the dtype's ``eps``, one unit in the last place at 1):

* float32: ``1e-5 |out| + 1e-6`` for both.
* kernel, 16-bit: ``u |out| + 1e-5 |out| + 1e-6``: one rounding of a float32 result (the
  interpreter truncates float32 -> bfloat16 casts where the GPU rounds, hence a whole ulp), and
  float32 arithmetic (which near ``out = 0`` leaves an absolute error of about 1e-7).
* reference, 16-bit: ``F.group_norm`` on CUDA returns its mean and 1 / std in x's dtype and
  builds y from them, so y is off by up to ``dy = u (|y| + |x_hat w| + |b| + |mean / std w|)``
  (twice what those roundings give; x_hat: the normalised x). Swish moves that by its slope
  ``d(y sigmoid(y)) / dy``, and the sigmoid and the product are each rounded to the dtype:
  ``|slope| dy + u |out|`` with swish (``dy`` without), plus the same 1e-6.
* kernel against reference: the sum of the two.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run in Triton's interpreter on CPU
pytest.importorskip("triton")

from aimkit.kernels.group_norm import group_norm_swish, group_norm_swish_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6  # the decoder's GroupNorm eps
GROUPS = 32
ATOL = 1e-6  # float32 arithmetic near out = 0 (module docstring)
RTOL32 = 1e-5


def _inputs(shape, dtype, seed=0, mean=0.0, std=1.0, param_dtype=None):
    """x (B, C, *spatial) ~ mean + std * N(0, 1) in ``dtype``; weight ~ 1 + 0.5 N, bias ~ 0.5 N in
    ``param_dtype`` (default: ``dtype``, as in a model cast to it); all on DEVICE."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    x = (mean + std * torch.randn(shape, generator=g, device=DEVICE)).to(dtype)
    channels = shape[1]
    weight = (1.0 + 0.5 * torch.randn(channels, generator=g, device=DEVICE)).to(param_dtype or dtype)
    bias = (0.5 * torch.randn(channels, generator=g, device=DEVICE)).to(param_dtype or dtype)
    return x, weight, bias


def _exact(x, weight, bias, groups, swish):
    """In float64: the norm with its affine map y, the output ``y * sigmoid(y)`` (or y), and the
    size of the terms the reference rounds, ``|x_hat w| + |b| + |mean rstd w|``."""
    shape = x.shape
    xg = x.double().reshape(shape[0], groups, -1)
    mean = xg.mean(-1, keepdim=True)
    rstd = 1.0 / torch.sqrt(((xg - mean) ** 2).mean(-1, keepdim=True) + EPS)
    x_hat = ((xg - mean) * rstd).reshape(shape)
    mean_hat = (mean * rstd).expand_as(xg).reshape(shape)
    affine = (1, shape[1]) + (1,) * (len(shape) - 2)
    w = weight.double().reshape(affine) if weight is not None else torch.ones(affine, dtype=torch.float64)
    b = bias.double().reshape(affine) if bias is not None else torch.zeros(affine, dtype=torch.float64)
    w, b = w.to(x.device), b.to(x.device)
    y = x_hat * w + b
    terms = (x_hat * w).abs() + b.abs() + (mean_hat * w).abs()
    return y, (y * torch.sigmoid(y) if swish else y), terms


def _kernel_bound(out, dtype):
    if dtype == torch.float32:
        return RTOL32 * out.abs() + ATOL
    return (torch.finfo(dtype).eps + RTOL32) * out.abs() + ATOL


def _reference_bound(y, out, terms, dtype, swish):
    if dtype == torch.float32:
        return RTOL32 * out.abs() + ATOL
    u = torch.finfo(dtype).eps
    dy = u * (y.abs() + terms)  # error of the reference's norm output
    if not swish:
        return dy + ATOL
    sig = torch.sigmoid(y)
    slope = (sig * (1.0 + y * (1.0 - sig))).abs()  # d(y sigmoid(y)) / dy
    return slope * dy + u * out.abs() + ATOL  # + the roundings of sigmoid and of the product


def _assert_within(actual, expected, bound, what):
    """|actual - expected| <= bound elementwise (expected, bound: float64)."""
    err = (actual.double() - expected).abs()
    excess = err - bound
    worst = int(excess.argmax())
    assert excess.max() <= 0, (f"{what}: error {err.flatten()[worst].item():.3g} above its bound "
                               f"{bound.flatten()[worst].item():.3g} at flat index {worst} "
                               f"(expected {expected.flatten()[worst].item():.6g})")


def _check_all(x, weight, bias, groups, swish, **kwargs):
    """Kernel and reference against float64, and against each other; -> the kernel's output."""
    out = group_norm_swish(x, weight, bias, groups, EPS, swish, **kwargs)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    ref = group_norm_swish_reference(x, weight, bias, groups, EPS, swish)
    y64, out64, terms = _exact(x, weight, bias, groups, swish)
    kernel_bound = _kernel_bound(out64, x.dtype)
    reference_bound = _reference_bound(y64, out64, terms, x.dtype, swish)
    _assert_within(out, out64, kernel_bound, "kernel vs float64")
    _assert_within(ref, out64, reference_bound, "reference vs float64")
    _assert_within(out, ref.double(), kernel_bound + reference_bound, "kernel vs reference")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,groups", [
    ((2, 64, 4, 4), GROUPS),  # groups of 2 x 4 x 4
    ((3, 64, 5, 7), GROUPS),  # odd spatial sizes
    ((1, 128, 3, 3), GROUPS),
    ((1, 256, 2, 3), GROUPS),
    ((1, 512, 1, 3), GROUPS),
    ((2, 96, 6), GROUPS),  # 3 channels a group, one spatial dim
    ((1, 4, 2, 2), 1),  # one group of 16
])
def test_kernel_and_reference_match_float64(shape, groups, dtype):
    x, weight, bias = _inputs(shape, dtype)
    _check_all(x, weight, bias, groups, swish=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_without_swish(dtype):
    x, weight, bias = _inputs((1, 64, 3, 5), dtype, seed=1)
    _check_all(x, weight, bias, GROUPS, swish=False)


@pytest.mark.parametrize("shape,groups,block,tiles", [
    ((2, 8, 5, 7), 4, 16, 2),  # 70 per group: chunks of 32, the last one 6 elements in one tile
    ((1, 6, 5, 7), 2, 8, 1),  # one channel in 5 spatial blocks per apply program
    ((2, 12, 3, 3), 4, 32, 3),  # 2 channels of 16 per apply program: channel blocks of 2 + 1
    ((1, 2, 33, 17), 1, 16, 1),  # 1122 elements: 71 chunks of 16 would be more than 64, so 36 of 32
])
def test_split_statistics_and_small_tiles(shape, groups, block, tiles):
    """Several statistics programs per group, tiles cut by the chunk and group ends, apply tiles of
    part of a channel or of several channels: as precise as a single program."""
    x, weight, bias = _inputs(shape, torch.float32, seed=2)
    _check_all(x, weight, bias, groups, swish=True, block=block, tiles=tiles, num_warps=1)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's masked lanes
@pytest.mark.parametrize("dtype,std", [(torch.float32, 1.0), (torch.bfloat16, 8.0)])
def test_large_mean(dtype, std):
    """x = 1000 + noise: the kernel stays at its usual tolerance against float64, where float32
    E[x^2] - E[x]^2 loses the variance (1e6 + 1 - 1e6 at float32 spacing 0.06)."""
    shape = (1, 64, 6, 5)
    x, weight, bias = _inputs(shape, dtype, seed=3, mean=1000.0, std=std)
    out = group_norm_swish(x, weight, bias, GROUPS, EPS)
    _, out64, _ = _exact(x, weight, bias, GROUPS, swish=True)
    _assert_within(out, out64, _kernel_bound(out64, dtype), "kernel vs float64")

    # the naive float32 variance misses by far more than the tolerance
    xg = x.float().reshape(shape[0], GROUPS, -1)
    mean = xg.mean(-1, keepdim=True)
    var = (xg * xg).mean(-1, keepdim=True) - mean * mean
    y = ((xg - mean) * torch.rsqrt(var.clamp(min=0) + EPS)).reshape(shape)
    y = y * weight.float().reshape(1, -1, 1, 1) + bias.float().reshape(1, -1, 1, 1)
    naive = (y * torch.sigmoid(y)).double()
    assert ((naive - out64).abs() - 100 * _kernel_bound(out64, torch.float32)).max() > 0


def test_float32_parameters_and_none():
    """float32 weight and bias with bfloat16 x (compared with float64 only: ``F.group_norm``
    rejects mixed dtypes on CUDA), and None (ones / zeros), as ``F.group_norm`` takes them."""
    x, weight, bias = _inputs((1, 64, 3, 3), torch.bfloat16, seed=4, param_dtype=torch.float32)
    out = group_norm_swish(x, weight, bias, GROUPS, EPS)
    _, out64, _ = _exact(x, weight, bias, GROUPS, swish=True)
    _assert_within(out, out64, _kernel_bound(out64, torch.bfloat16), "kernel vs float64")
    _check_all(x, None, None, GROUPS, swish=True)
    _check_all(x, None, bias.to(x.dtype), GROUPS, swish=False)


def test_empty_batch():
    x = torch.zeros(0, 64, 4, 4, device=DEVICE)
    out = group_norm_swish(x, torch.ones(64, device=DEVICE), torch.zeros(64, device=DEVICE), GROUPS, EPS)
    assert out.shape == x.shape


@pytest.mark.parametrize("fn", [group_norm_swish, group_norm_swish_reference])
def test_rejects_bad_arguments(fn):
    x, weight, bias = _inputs((2, 64, 4, 4), torch.float32)
    bad = [
        ({"x": x[0, 0, 0]}, r"x must be \(B, C, \*spatial\)"),
        ({"x": x.double()}, "x must be float16, bfloat16 or float32"),
        ({"groups": 24}, "64 channels of x must be a multiple of groups"),
        ({"groups": 0}, "must be a multiple of groups, a positive integer"),
        ({"eps": -1.0}, "eps must be a finite non-negative float"),
        ({"eps": float("nan")}, "eps must be a finite non-negative float"),
        ({"weight": weight[:32]}, r"weight must be a floating \(64,\) tensor"),
        ({"bias": torch.zeros(64, dtype=torch.long, device=DEVICE)}, r"bias must be a floating \(64,\) tensor"),
    ]
    for overrides, message in bad:
        args = {"x": x, "weight": weight, "bias": bias, "groups": GROUPS, "eps": EPS, **overrides}
        with pytest.raises(ValueError, match=message):
            fn(**args)


def test_kernel_rejects_layouts_it_cannot_address():
    x, weight, bias = _inputs((2, 64, 4, 4), torch.float32)
    with pytest.raises(ValueError, match=r"x must be contiguous \(NCHW\)"):
        group_norm_swish(x.transpose(2, 3), weight, bias, GROUPS, EPS)
    with pytest.raises(ValueError, match=r"x must be contiguous \(NCHW\)"):
        group_norm_swish(x.to(memory_format=torch.channels_last), weight, bias, GROUPS, EPS)
    with pytest.raises(ValueError, match=r"weight must be a contiguous \(64,\) tensor"):
        group_norm_swish(x, torch.ones(128, device=DEVICE)[::2], bias, GROUPS, EPS)
    with pytest.raises(ValueError, match="block must be a power of two"):
        group_norm_swish(x, weight, bias, GROUPS, EPS, block=48)
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="weight must be on x's device"):
            group_norm_swish(x, weight.cpu(), bias, GROUPS, EPS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decoder_size_bfloat16():
    """The decoder's largest norm at batch 64: (64, 128, 256, 256) bfloat16, groups of 4 x 65536
    elements (16 statistics programs each), against the reference and float64 (8 images at a time)."""
    x, weight, bias = _inputs((64, 128, 256, 256), torch.bfloat16, seed=5, mean=0.5)
    out = group_norm_swish(x, weight, bias, GROUPS, EPS)
    ref = group_norm_swish_reference(x, weight, bias, GROUPS, EPS)
    for i in range(0, 64, 8):
        y64, out64, terms = _exact(x[i:i + 8], weight, bias, GROUPS, swish=True)
        kernel_bound = _kernel_bound(out64, torch.bfloat16)
        reference_bound = _reference_bound(y64, out64, terms, torch.bfloat16, swish=True)
        _assert_within(out[i:i + 8], out64, kernel_bound, f"kernel vs float64, images {i}..{i + 7}")
        _assert_within(out[i:i + 8], ref[i:i + 8].double(), kernel_bound + reference_bound,
                       f"kernel vs reference, images {i}..{i + 7}")
