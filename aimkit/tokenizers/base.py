"""The image tokenizer contract shared by every tokenizer (``vq-f16``, ...).

A tokenizer maps images to grids of discrete codes and back:

* images are float ``(B, C, H, W)`` tensors in ``[-1, 1]`` with ``H`` and ``W`` multiples of
  :attr:`Tokenizer.downsample`;
* codes are int64 ``(B, h * w)`` tensors in raster order (row by row), with
  ``h = H // downsample`` and ``w = W // downsample``, every value in ``[0, codebook_size)``.

Subclasses implement :meth:`Tokenizer.encode`, :meth:`Tokenizer.decode` and the four size
properties; the input checks and weight loading here are shared.
"""

from __future__ import annotations

import abc
import math
import operator
import os

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..weights import load_strict, read_state_dict, select_prefix

__all__ = ["Tokenizer"]

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# Largest |value| accepted in images: [-1, 1] plus the overshoot of bicubic or antialiased
# resizing, while pixels in [0, 255] or ImageNet-normalised images (up to ~2.6) are refused.
_RANGE_LIMIT = 1.25


def _as_int(value: object) -> int | None:
    """``value`` as an int when it is an integer (Python, NumPy or a 0-d tensor), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_grid(grid: object) -> tuple[int, int]:
    """``grid`` as ``(h, w)`` of positive ints, or :class:`ConfigError` naming it."""
    sides = tuple(grid) if isinstance(grid, (tuple, list)) else ()
    sides = tuple(_as_int(v) for v in sides)
    if len(sides) != 2 or None in sides:
        raise ConfigError(f"grid must be a pair of ints (h, w), got {grid!r}")
    if min(sides) <= 0:
        raise ConfigError(f"grid sides must be positive, got {grid!r}")
    return sides


class Tokenizer(nn.Module, metaclass=abc.ABCMeta):
    """Abstract image tokenizer: ``encode`` images to codes, ``decode`` codes to images.

    Class attributes:
        name: the registry name, used in messages.
        checkpoint_prefixes: key prefixes under which a larger checkpoint (a whole generator)
            stores this tokenizer's weights; :meth:`load_weights` keeps only that part.
    """

    name: str = "tokenizer"
    checkpoint_prefixes: tuple[str, ...] = ()

    # ---- sizes -----------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def codebook_size(self) -> int:
        """Number of distinct codes."""

    @property
    @abc.abstractmethod
    def downsample(self) -> int:
        """Image pixels per code along each side (16 for ``vq-f16``)."""

    @property
    @abc.abstractmethod
    def embed_dim(self) -> int:
        """Dimension of one code's vector."""

    @property
    @abc.abstractmethod
    def in_channels(self) -> int:
        """Image channels (3 for RGB)."""

    def grid_size(self, image_size: int) -> int:
        """Codes per side for a square image of ``image_size`` pixels (256 -> 16 for f16)."""
        size = _as_int(image_size)
        if size is None or size <= 0 or size % self.downsample:
            raise ConfigError(
                f"image size {image_size!r} is not a positive multiple of {self.downsample}, "
                f"the {self.name} tokenizer's downsampling factor"
            )
        return size // self.downsample

    # ---- the contract ----------------------------------------------------------------------

    @abc.abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Images to codes.

        Args:
            images: float ``(B, C, H, W)`` in ``[-1, 1]``.

        Returns:
            int64 ``(B, (H // downsample) * (W // downsample))`` codes in raster order.
        """

    @abc.abstractmethod
    def decode(self, codes: Tensor, *, grid: tuple[int, int] | None = None, clamp: bool = False) -> Tensor:
        """Codes to images.

        Args:
            codes: integer ``(B, N)`` codes in raster order.
            grid: ``(h, w)`` with ``h * w == N``; by default the grid is square.
            clamp: clamp the output to ``[-1, 1]``.

        Returns:
            ``(B, C, h * downsample, w * downsample)`` images in the module's dtype.
        """

    def decode_checked(self, codes: Tensor, grid: tuple[int, int], *, clamp: bool = False) -> Tensor:
        """:meth:`decode` of ``codes`` that :meth:`check_codes` has accepted with this ``grid``.

        A tokenizer may skip its checks here (the range check reads the codes back to the host,
        a synchronisation that would stall decoding queued on a side stream); this default
        simply calls :meth:`decode`, so tokenizers that do not override it stay correct. The
        sampling pipeline decodes through this method: a subclass that overrides :meth:`decode`
        of a class that overrides this one must override both.
        """
        return self.decode(codes, grid=grid, clamp=clamp)

    # ---- input checks ----------------------------------------------------------------------

    def check_images(self, images: Tensor) -> None:
        """Raise :class:`ConfigError` unless ``images`` is float ``(B, C, H, W)`` that fits, with
        finite values in ``[-1, 1]`` (up to resampling overshoot: within ``[-1.25, 1.25]``). The
        value check reads the minimum and maximum back to the host (a sync on CUDA)."""
        if not isinstance(images, Tensor):
            raise ConfigError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise ConfigError(
                f"images must have shape (B, C, H, W), got {images.dim()} dimensions {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ConfigError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype}")
        b, c, h, w = images.shape
        if c != self.in_channels:
            raise ConfigError(
                f"images have {c} channels but the {self.name} tokenizer expects {self.in_channels} "
                f"(shape (B, C, H, W) = {tuple(images.shape)})"
            )
        if b == 0:
            raise ConfigError("images: the batch is empty")
        if h == 0 or w == 0 or h % self.downsample or w % self.downsample:
            raise ConfigError(
                f"image size {h}x{w} is not a multiple of {self.downsample}, the {self.name} "
                "tokenizer's downsampling factor"
            )
        lo, hi = torch.stack(torch.aminmax(images.detach())).tolist()  # one host read; NaN fails both tests
        if not (-_RANGE_LIMIT <= lo and hi <= _RANGE_LIMIT):
            what = "not finite" if not math.isfinite(lo + hi) else f"min {lo:.4g}, max {hi:.4g}"
            raise ConfigError(
                f"images must be in [-1, 1] (got {what}): convert uint8 pixels with x.float() / 127.5 - 1, "
                "[0, 1] floats with x * 2 - 1, and do not apply ImageNet mean/std normalisation"
            )

    def check_codes(self, codes: Tensor, grid: tuple[int, int] | None = None) -> tuple[int, int]:
        """Raise :class:`ConfigError` unless ``codes`` is a valid integer ``(B, N)`` batch.

        Args:
            codes: the codes to check.
            grid: ``(h, w)`` to check ``N`` against; by default ``N`` must be a perfect square.

        Returns:
            The grid ``(h, w)``.
        """
        if not isinstance(codes, Tensor):
            raise ConfigError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
        if codes.dtype not in _INT_DTYPES:
            raise ConfigError(f"codes must be an integer tensor (int64), got dtype {codes.dtype}")
        if codes.dim() != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
            raise ConfigError(f"codes must have shape (B, N) with B, N > 0, got {tuple(codes.shape)}")
        n = codes.shape[1]
        if grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ConfigError(
                    f"{n} codes per image do not form a square grid; pass grid=(h, w) for non-square images"
                )
            grid = (side, side)
        else:
            grid = _check_grid(grid)
            if grid[0] * grid[1] != n:
                raise ConfigError(f"grid {grid} does not hold {n} codes per image")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.codebook_size:
            bad = lo if lo < 0 else hi
            raise ConfigError(
                f"code {bad} is out of range: the {self.name} codebook has codes 0..{self.codebook_size - 1}"
            )
        return grid

    # ---- weights ---------------------------------------------------------------------------

    def select_weights(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """This tokenizer's tensors from ``sd``: the part under one of
        :attr:`checkpoint_prefixes` if ``sd`` has such keys (a whole generator checkpoint),
        else ``sd`` unchanged."""
        for prefix in self.checkpoint_prefixes:
            if any(k.startswith(prefix) for k in sd):
                return select_prefix(sd, prefix)
        return sd

    def load_weights(self, path: str | os.PathLike) -> Tokenizer:
        """Load weights strictly from a file or folder (see :func:`aimkit.weights.read_state_dict`).

        Accepts a bare state dict, one wrapped in a ``model`` / ``state_dict`` / ``ema`` entry
        (LlamaGen's layout), keys under one of :attr:`checkpoint_prefixes`, or a whole
        generator checkpoint of which only that part is used.

        Returns:
            ``self``.

        Raises:
            CheckpointError: the file is unreadable or its tensors do not fit this tokenizer.
        """
        sd = self.select_weights(read_state_dict(path))
        load_strict(self, sd, self.name, source=path)
        return self

    @property
    def device(self) -> torch.device:
        """Device of the first parameter."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the first floating-point parameter."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())
