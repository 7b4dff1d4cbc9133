"""The convolution-step kernel (aimkit.kernels.conv_step, op ``conv_step``) against the ring
convolution written out in PyTorch.

On a CPU machine the kernel runs in Triton's interpreter; on a GPU machine compiled on CUDA tensors.
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run in Triton's interpreter on CPU
pytest.importorskip("triton")

from aimkit.kernels.conv_step import conv_step_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _ring_of(history, width, channels_last=True):
    """The conv ring buffer (R, C, W) after inputs ``history`` (R, C, L) at positions 0..L-1: slot
    q % W holds input q for the last W positions, zeros where no position has been (module
    docstring of aimkit.kernels.conv_step); stored channels-contiguous as aimkit's cache when ``channels_last``."""
    rows, channels, length = history.shape
    ring = torch.zeros(rows, width, channels, dtype=history.dtype).transpose(1, 2)
    if not channels_last:
        ring = ring.contiguous()
    for q in range(max(0, length - width), length):
        ring[..., q % width] = history[..., q]
    return ring.to(DEVICE)


def _conv_reference(history, weight, bias):
    """silu(causal depthwise conv) at the last position of ``history`` (R, C, L), float32: the
    window of the last W inputs, zeros before position 0. -> (R, C)."""
    width = weight.shape[-1]
    window = F.pad(history.float(), (width, 0))[..., -width:]  # (R, C, W), oldest first
    out = (window * weight.float()).sum(-1)
    return F.silu(out + bias.float().cpu() if bias is not None else out)


@pytest.mark.parametrize("channels_last,with_bias,width,start,dtype", [
    (True, True, 4, 0, torch.float32),  # from the empty history
    (True, True, 4, 6, torch.float32),  # the ring wrapped already
    (False, True, 4, 2, torch.float32),  # any strides
    (True, False, 3, 1, torch.float32),
    (True, True, 4, 3, torch.bfloat16),  # a bf16 ring keeps the inputs rounded to bf16
])
def test_conv_step_matches_ring_reference(channels_last, with_bias, width, start, dtype):
    """Several positions in a row from a filled ring: output = silu(conv of the last W inputs), and
    the ring holds exactly the last W inputs by position (the kernel reads the position tensor)."""
    g = torch.Generator().manual_seed(4)
    rows, channels = 3, 40
    history = torch.randn(rows, channels, start, generator=g).to(dtype)  # positions 0..start-1
    state = _ring_of(history, width, channels_last)
    weight = torch.randn(channels, width, generator=g).to(DEVICE)
    bias = torch.randn(channels, generator=g).to(DEVICE) if with_bias else None
    position = torch.tensor(start, device=DEVICE)
    for _ in range(width + 1):  # round the ring once
        # float32 inputs exactly representable in the ring's dtype: Triton's interpreter truncates
        # float32 -> bf16 casts where the GPU (and torch) round to nearest
        proj = torch.randn(rows, channels + 7, generator=g).to(dtype).float().to(DEVICE)
        x = proj[:, 5:5 + channels]  # a strided view, as the split of in_proj's output
        history = torch.cat([history, x.cpu().to(dtype).unsqueeze(-1)], dim=-1)
        out = conv_step_(x, state, weight, bias, position)
        torch.testing.assert_close(out, _conv_reference(history, weight.cpu(), bias).to(DEVICE), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state, _ring_of(history, width), atol=0, rtol=0)  # one slot written, exactly
        position.add_(1)
    with pytest.raises(ValueError, match="do not fit"):
        conv_step_(x[:, :8], state, weight, bias, position)
    with pytest.raises(ValueError, match="position must be a one-element int64 tensor"):
        conv_step_(x, state, weight, bias, position.float())
