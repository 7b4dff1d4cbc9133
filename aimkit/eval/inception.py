"""The Inception-v3 network of FID, in plain torch: TensorFlow's 2015-12-05 graph as ported by pytorch-fid.

FID and the Inception Score are defined on one particular network: the Inception-v3 graph that
TensorFlow published on 2015-12-05. ``mseitzer/pytorch-fid`` ported its weights to a PyTorch
state dict, ``pt_inception-2015-12-05-6726825d.pth``, laid out as torchvision's ``Inception3``
with 1008 output classes and no auxiliary head. :class:`FIDInceptionV3` reproduces that layout
name for name (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ...,
``fc.weight`` (1008, 2048)), so the file loads strictly, and the graph's quirks that differ
from torchvision's Inception:

* every average pool inside a mixed block ignores the zero padding (TensorFlow's
  ``count_include_pad=False`` behaviour);
* the last mixed block (``Mixed_7c``) pools its fourth branch with a max pool, not an average.

Inputs are (B, 3, H, W) RGB in [0, 1]; they are resized to 299 x 299 (bilinear,
``align_corners=False``) and scaled to [-1, 1], as pytorch-fid does. Outputs are the 2048-d
final average-pool features (what FID compares) and the 1008 logits (for the Inception Score).

Shapes through the network (299 px input)::

    (B, 3, 299, 299) -> Conv2d_1a..2b -> (B, 64, 147, 147) -> maxpool -> (B, 64, 73, 73)
    -> Conv2d_3b, 4a -> (B, 192, 71, 71) -> maxpool -> (B, 192, 35, 35)
    -> Mixed_5b..5d -> (B, 288, 35, 35) -> Mixed_6a..6e -> (B, 768, 17, 17)
    -> Mixed_7a..7c -> (B, 2048, 8, 8) -> average -> (B, 2048) -> fc -> (B, 1008)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AimkitError, ConfigError

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "INCEPTION_WEIGHTS_ENV",
    "FEATURE_DIMS",
    "InceptionOutput",
    "FIDInceptionV3",
    "default_inception_path",
    "find_inception_weights",
    "inception_key_map",
    "load_inception",
    "check_responds",
]

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS_FILE
)
INCEPTION_WEIGHTS_ENV = "AIMKIT_INCEPTION_WEIGHTS"
FEATURE_DIMS = (64, 192, 768, 2048)  # features after stage 0..3 (spatially averaged), as pytorch-fid's --dims
NUM_LOGITS = 1008  # the 2015 graph's classifier: 1000 ImageNet classes + 8 unused outputs
_BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon in this graph
_IMAGE_SIZE = 299


class InceptionOutput(NamedTuple):
    """Result of :meth:`FIDInceptionV3.forward`.

    Attributes:
        features: (B, dims) features: the 2048-d final pool by default.
        logits: (B, 1008) classifier logits, or None when ``dims`` < 2048 stops the network early.
    """

    features: Tensor
    logits: Tensor | None


class _BatchNorm(nn.Module):
    """Inference-only batch norm holding exactly ``weight``, ``bias``, ``running_mean``, ``running_var``.

    The FID network is never trained, so there is no ``num_batches_tracked`` counter.
    """

    def __init__(self, channels: int, eps: float = _BN_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ConvBN(nn.Module):
    """Convolution without bias, batch norm, ReLU (``conv`` and ``bn`` name the state-dict entries)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = _BatchNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: Tensor) -> Tensor:
    """3x3 stride-1 average pool that divides by the number of real (unpadded) pixels."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35 x 35 block (``Mixed_5b..5d``): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool_same(x))
        return torch.cat([a, b, c, d], dim=1)  # (B, 224 + pool_features, H, W)


class ReductionB(nn.Module):
    """35 -> 17 reduction (``Mixed_6a``): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], dim=1)  # (B, 480 + in_channels, H', W')


class MixedC(nn.Module):
    """17 x 17 block (``Mixed_6b..6e``) with factorised 7x7 convolutions."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_avg_pool_same(x))
        return torch.cat([a, b, c, d], dim=1)  # (B, 768, H, W)


class ReductionD(nn.Module):
    """17 -> 8 reduction (``Mixed_7a``): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], dim=1)  # (B, 512 + in_channels, H', W')


class MixedE(nn.Module):
    """8 x 8 block (``Mixed_7b``, ``Mixed_7c``) with split 1x3 / 3x1 branches.

    Args:
        in_channels: input channels (1280 for ``Mixed_7b``, 2048 for ``Mixed_7c``).
        max_pool: pool the fourth branch with a max pool (``Mixed_7c`` of the TF graph) instead
            of a padding-excluding average pool (``Mixed_7b``).
    """

    def __init__(self, in_channels: int, max_pool: bool = False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], dim=1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], dim=1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_same(x)
        d = self.branch_pool(pooled)
        return torch.cat([a, b, c, d], dim=1)  # (B, 2048, H, W)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of TensorFlow's FID (pytorch-fid's port), features and logits.

    Args:
        resize_input: resize inputs to 299 x 299 (bilinear) first, as pytorch-fid does.
        normalize_input: inputs are in [0, 1] and are scaled to [-1, 1] here; with False they
            must already be in [-1, 1].

    Build it with random weights for tests; use :func:`load_inception` for the real ones.
    """

    def __init__(self, resize_input: bool = True, normalize_input: bool = True):
        super().__init__()
        self.resize_input = resize_input
        self.normalize_input = normalize_input
        # stage 0: 299 -> 73
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        # stage 1: 73 -> 35
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        # stage 2: 35 -> 17
        self.Mixed_5b = MixedA(192, pool_features=32)
        self.Mixed_5c = MixedA(256, pool_features=64)
        self.Mixed_5d = MixedA(288, pool_features=64)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = MixedC(768, channels_7x7=128)
        self.Mixed_6c = MixedC(768, channels_7x7=160)
        self.Mixed_6d = MixedC(768, channels_7x7=160)
        self.Mixed_6e = MixedC(768, channels_7x7=192)
        # stage 3: 17 -> 8 -> pooled
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = MixedE(1280)
        self.Mixed_7c = MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_LOGITS)

    def _stages(self) -> list[list[nn.Module]]:
        return [
            [self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3],
            [self.Conv2d_3b_1x1, self.Conv2d_4a_3x3],
            [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
             self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e],
            [self.Mixed_7a, self.Mixed_7b, self.Mixed_7c],
        ]

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, 299, 299) in [-1, 1] (per the constructor flags)."""
        x = images.to(self.fc.weight.dtype)
        if self.resize_input:
            x = F.interpolate(x, size=(_IMAGE_SIZE, _IMAGE_SIZE), mode="bilinear", align_corners=False)
        if self.normalize_input:
            x = 2 * x - 1
        return x

    def forward(self, images: Tensor, dims: int = 2048) -> InceptionOutput:
        """Features (and logits) of a batch.

        Args:
            images: (B, 3, H, W) RGB in [0, 1] (float; see ``normalize_input``).
            dims: which features: 2048 (final pool, FID's standard; logits too), or 768, 192, 64
                (earlier stages, spatially averaged, as pytorch-fid's ``--dims``; no logits).

        Returns:
            :class:`InceptionOutput` with features (B, dims) and logits (B, 1008) or None.
        """
        if dims not in FEATURE_DIMS:
            raise ConfigError(f"dims must be one of {FEATURE_DIMS}, got {dims!r}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ConfigError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        x = self.preprocess(images)
        last = FEATURE_DIMS.index(dims)
        for index, stage in enumerate(self._stages()[: last + 1]):
            for layer in stage:
                x = layer(x)
            if index < 2:
                x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73) / (B, 192, 35, 35)
        features = x.mean(dim=(2, 3))  # (B, dims)
        logits = self.fc(features) if dims == 2048 else None  # (B, 1008)
        return InceptionOutput(features, logits)


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


def default_inception_path() -> Path:
    """``~/.cache/aimkit/pt_inception-2015-12-05-6726825d.pth``."""
    return Path("~/.cache/aimkit").expanduser() / INCEPTION_WEIGHTS_FILE


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The FID Inception weight file: ``path``, else ``$AIMKIT_INCEPTION_WEIGHTS``, else the cache.

    Raises:
        AimkitError: the file is not there, with where to get it and where to put it.
    """
    how = (
        f"this is pytorch-fid's port of TensorFlow's FID Inception-v3 ({INCEPTION_WEIGHTS_FILE}, ~92 MB); "
        f"download it from {INCEPTION_WEIGHTS_URL} and put it at {default_inception_path()}, "
        f"or point ${INCEPTION_WEIGHTS_ENV} or --inception-weights at it"
    )
    if path is not None:
        chosen, origin = Path(path).expanduser(), "the given path"
    elif os.environ.get(INCEPTION_WEIGHTS_ENV):
        chosen, origin = Path(os.environ[INCEPTION_WEIGHTS_ENV]).expanduser(), f"${INCEPTION_WEIGHTS_ENV}"
    else:
        chosen, origin = default_inception_path(), "the default location"
    if not chosen.is_file():
        raise AimkitError(f"FID Inception weights not found at {chosen} ({origin}): {how}")
    return chosen


def inception_key_map(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """pytorch-fid's file -> :class:`FIDInceptionV3` names: identical, minus batch-norm step counters.

    Files saved from torchvision modules carry ``*.bn.num_batches_tracked`` (training-only);
    those are dropped. Every other name is kept as is, so unknown names still fail the strict load.
    """
    return {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}


def load_inception(
    path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> FIDInceptionV3:
    """The FID Inception network with its pretrained weights, in eval mode.

    Args:
        path: the weight file; default ``$AIMKIT_INCEPTION_WEIGHTS`` or
            ``~/.cache/aimkit/pt_inception-2015-12-05-6726825d.pth`` (see :func:`find_inception_weights`).
        device: where to put it (default CPU).

    Raises:
        AimkitError: no weight file (the message says where to get it).
        CheckpointError: the file does not fit the network exactly.
    """
    from ..weights import load_strict, read_state_dict

    weights = find_inception_weights(path)
    state = inception_key_map(read_state_dict(weights))  # NaN / infinite tensors are refused there
    net = FIDInceptionV3()
    load_strict(net, state, "FID Inception-v3", source=weights)
    for p in net.parameters():
        p.requires_grad_(False)
    check_responds(net.eval(), weights)
    return net.to(device).eval()


def check_responds(net: FIDInceptionV3, source: str | os.PathLike = "the weights") -> None:
    """Refuse a network whose features do not depend on the image.

    A file of the right names and shapes but wrong values (all zeros, one constant) gives the
    same features for every image, so every FID would be a silent 0.0000. Two random 80 x 80
    images go through the network unresized (the smallest size it takes; a few tens of ms on a
    CPU core) and must give finite, different features.

    Raises:
        CheckpointError: naming ``source``.
    """
    from ..errors import CheckpointError

    images = torch.rand(2, 3, 80, 80, generator=torch.Generator().manual_seed(0))
    resize, net.resize_input = net.resize_input, False
    try:
        with torch.no_grad():
            out = net(images.to(net.fc.weight.device))
    finally:
        net.resize_input = resize
    if not bool(torch.isfinite(out.features).all() and torch.isfinite(out.logits).all()):
        raise CheckpointError(f"the FID Inception network from {source} gives NaN or infinite features")
    if bool((out.features[0] - out.features[1]).abs().max() == 0):
        raise CheckpointError(
            f"the FID Inception network from {source} gives the same features for different images, so every "
            f"FID would be 0; the file does not hold the FID Inception-v3 weights ({INCEPTION_WEIGHTS_FILE})"
        )
