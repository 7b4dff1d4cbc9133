"""The VQ-f16 image tokenizer of LlamaGen, used by AiM (registry name ``vq-f16``).

A convolutional encoder reduces a 256x256 image 16 times per side, a 1x1 conv projects each of
the 16x16 feature vectors to 8 dimensions, and the nearest of 16384 codebook rows by cosine
similarity (both sides L2-normalised) gives its code. Decoding looks the normalised rows up,
projects them back with a 1x1 conv and runs the mirror-image decoder.

Parameter names and shapes are those of LlamaGen's ``vq_ds16_c2i.pt`` (its ``model`` entry)
and of the ``vqvae.`` part of the official AiM checkpoints, so both load strictly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check_fields
from ..errors import ConfigError
from ..policy import ExecutionPolicy
from ..registry import TOKENIZERS
from .base import Tokenizer

__all__ = ["VQConfig", "VQModel"]

# Length of LlamaGen's ``codebook_used`` buffer (a fixed constant there, not a hyperparameter).
_USAGE_HISTORY = 65536
# Rows of the (tokens, codebook) distance matrix computed at once: bounds memory to ~256 MiB.
_DISTANCE_CHUNK = 4096


@dataclass(frozen=True)
class VQConfig:
    """Hyperparameters of the VQ tokenizer; the defaults are LlamaGen's VQ-16 (71.9M params)."""

    codebook_size: int = 16384  # number of codes
    codebook_embed_dim: int = 8  # dimension of a codebook row (the quantised latent)
    z_channels: int = 256  # channels of the encoder output / decoder input
    ch: int = 128  # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # width per level; len - 1 halvings -> f16
    encoder_res_blocks: int = 2  # residual blocks per encoder level
    decoder_res_blocks: int = 3  # residual blocks per decoder level (LlamaGen: num_res_blocks + 1)
    dropout: float = 0.0  # dropout inside residual blocks
    in_channels: int = 3  # image channels (decoder output channels too)
    image_size: int = 256  # training resolution; attention sits at the lowest level (16x16)

    def __post_init__(self) -> None:
        check_fields(self, "VQConfig")  # types: ints are ints, ch_mult a list of ints, dropout finite
        positive = (
            "codebook_size",
            "codebook_embed_dim",
            "z_channels",
            "ch",
            "encoder_res_blocks",
            "decoder_res_blocks",
            "in_channels",
            "image_size",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"VQConfig.{name} must be a positive int, got {value!r}")
        if not self.ch_mult or any(not isinstance(m, int) or m <= 0 for m in self.ch_mult):
            raise ConfigError(f"VQConfig.ch_mult must be positive ints, got {self.ch_mult!r}")
        if any((self.ch * m) % 32 for m in self.ch_mult):
            raise ConfigError(
                f"VQConfig: every level width ch * ch_mult ({self.ch} * {self.ch_mult}) must be a "
                "multiple of 32 (GroupNorm with 32 groups)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"VQConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.image_size % (2 ** (len(self.ch_mult) - 1)):
            raise ConfigError(
                f"VQConfig.image_size {self.image_size} is not a multiple of the downsampling "
                f"factor {2 ** (len(self.ch_mult) - 1)}"
            )


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------


def _swish(x: Tensor) -> Tensor:
    """``x * sigmoid(x)``, written out as LlamaGen does (``F.silu`` rounds differently)."""
    return x * torch.sigmoid(x)


class _GroupNormSwish(nn.GroupNorm):
    """GroupNorm (32 groups, eps 1e-6), then swish when ``swish``: (B, C, H, W) -> (B, C, H, W).

    A GroupNorm's tensors and names (``weight``, ``bias``), so checkpoints load unchanged. Where
    the policy's ``vq_norm`` picks the kernel (CUDA, Triton), the input is contiguous (a
    channels_last tokenizer always takes the reference), no gradient is recorded and autocast is
    off (under autocast ``F.group_norm`` returns float32, the kernel x's dtype), both run as one
    fused kernel (:mod:`aimkit.kernels.group_norm`); elsewhere as ``F.group_norm`` then
    :func:`_swish`, the reference."""

    def __init__(self, channels: int, swish: bool):
        super().__init__(32, channels, eps=1e-6, affine=True)
        self.swish = swish
        self.policy = ExecutionPolicy()  # a generator passes its own down (Generator.set_policy)

    def forward(self, x: Tensor) -> Tensor:
        recording = torch.is_grad_enabled() and any(t.requires_grad for t in (x, self.weight, self.bias))
        if (not recording and x.is_contiguous() and not torch.is_autocast_enabled(x.device.type)
                and self.policy.use_kernel("vq_norm", x)):
            from ..kernels.group_norm import group_norm_swish

            return group_norm_swish(x, self.weight, self.bias, self.num_groups, self.eps, swish=self.swish)
        y = super().forward(x)
        return _swish(y) if self.swish else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, swish={self.swish}"


def _norm(channels: int, swish: bool = True) -> _GroupNormSwish:
    return _GroupNormSwish(channels, swish)


def _conv3(c_in: int, c_out: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=padding)


class _ResBlock(nn.Module):
    """``x + conv2(drop(swish(norm2(conv1(swish(norm1(x)))))))``, a 1x1 shortcut if widths differ."""

    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = _conv3(c_in, c_out)
        self.norm2 = _norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3(c_out, c_out)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(self.norm1(x))  # norm1, norm2: GroupNorm then swish
        h = self.conv2(self.dropout(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class _AttnBlock(nn.Module):
    """Single-head self-attention over the ``H * W`` positions, 1x1 convs for q, k, v, out."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels, swish=False)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        b, c, h, w = x.shape
        y = self.norm(x)
        # Same products, in the same order, as LlamaGen (so float32 results agree to the bit
        # on one machine); the (B, HW, HW) weights are small at the 16x16 level.
        q = self.q(y).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        k = self.k(y).reshape(b, c, h * w)  # (B, C, HW)
        v = self.v(y).reshape(b, c, h * w)  # (B, C, HW)
        scores = torch.bmm(q, k) * c**-0.5  # (B, HW_q, HW_k)
        weights = torch.softmax(scores, dim=2, dtype=torch.float32).to(v.dtype)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj_out(out)


class _Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 conv: (H, W) -> (H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv: (H, W) -> (2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: residual blocks, each followed by attention where there is any."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, attn: bool, dropout: float):
        super().__init__()
        self.res = nn.ModuleList([_ResBlock(c_in if i == 0 else c_out, c_out, dropout) for i in range(n_blocks)])
        self.attn = nn.ModuleList([_AttnBlock(c_out) for _ in range(n_blocks)] if attn else [])

    def blocks(self, x: Tensor) -> Tensor:
        for i, res in enumerate(self.res):
            x = res(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


def _mid(channels: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(
        [_ResBlock(channels, channels, dropout), _AttnBlock(channels), _ResBlock(channels, channels, dropout)]
    )


class _Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H / f, W / f); attention at the lowest level."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = _conv3(cfg.in_channels, cfg.ch)
        self.conv_blocks = nn.ModuleList()
        c_in = cfg.ch
        for i, c_out in enumerate(widths):
            level = _Level(c_in, c_out, cfg.encoder_res_blocks, attn=i == last, dropout=cfg.dropout)
            if i != last:
                level.downsample = _Downsample(c_out)
            self.conv_blocks.append(level)
            c_in = c_out
        self.mid = _mid(c_in, cfg.dropout)
        self.norm_out = _norm(c_in)
        self.conv_out = _conv3(c_in, cfg.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.conv_blocks:
            h = level.blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)  # halves H, W
        for block in self.mid:
            h = block(h)
        return self.conv_out(self.norm_out(h))  # norm_out: GroupNorm then swish; (B, z_channels, h, w)


class _Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, in_channels, h * f, w * f); levels in reverse width order,
    attention at the first (lowest-resolution) level."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.ch * m for m in reversed(cfg.ch_mult)]
        last = len(widths) - 1
        c_in = widths[0]
        self.conv_in = _conv3(cfg.z_channels, c_in)
        self.mid = _mid(c_in, cfg.dropout)
        self.conv_blocks = nn.ModuleList()
        for i, c_out in enumerate(widths):
            level = _Level(c_in, c_out, cfg.decoder_res_blocks, attn=i == 0, dropout=cfg.dropout)
            if i != last:
                level.upsample = _Upsample(c_out)
            self.conv_blocks.append(level)
            c_in = c_out
        self.norm_out = _norm(c_in)
        self.conv_out = _conv3(c_in, cfg.in_channels)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)  # (B, ch * ch_mult[-1], h, w)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level.blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # doubles H, W
        return self.conv_out(self.norm_out(h))  # norm_out with swish; (B, in_channels, H, W); no tanh/clamp


class _Quantizer(nn.Module):
    """Cosine nearest-neighbour lookup in an L2-normalised codebook.

    ``codebook_used`` is LlamaGen's training-time record of the last 65536 chosen codes (stored
    as floats, for its codebook-usage statistic). It is kept, as a persistent buffer, only so
    that checkpoints load strictly; aimkit never reads or updates it.
    """

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.register_buffer("codebook_used", torch.zeros(_USAGE_HISTORY))
        self.embedding = nn.Embedding(codebook_size, dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    def codebook(self) -> Tensor:
        """The L2-normalised codebook, float32 ``(codebook_size, dim)``."""
        return F.normalize(self.embedding.weight.float(), dim=-1)

    def nearest(self, z: Tensor) -> Tensor:
        """Codes of latents ``z`` (B, dim, h, w) -> int64 (B, h * w), raster order.

        Computed in float32 as LlamaGen does: with ``z`` and the rows L2-normalised,
        ``argmin_j |z|^2 + |e_j|^2 - 2 z . e_j``.
        """
        b, d, h, w = z.shape
        zf = F.normalize(z.float().permute(0, 2, 3, 1).reshape(-1, d), dim=-1)  # (B*h*w, dim)
        emb = self.codebook()  # (K, dim)
        emb_sq = emb.pow(2).sum(1)  # (K,)
        codes = []
        for chunk in zf.split(_DISTANCE_CHUNK):
            dist = chunk.pow(2).sum(1, keepdim=True) + emb_sq - 2 * (chunk @ emb.t())  # (n, K)
            codes.append(dist.argmin(dim=1))
        return torch.cat(codes).view(b, h * w)

    def lookup(self, codes: Tensor, grid: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """Normalised rows of ``codes`` (B, h * w) as latents (B, dim, h, w) in ``dtype``."""
        b = codes.shape[0]
        z = F.embedding(codes.long(), self.codebook())  # (B, h*w, dim)
        return z.view(b, grid[0], grid[1], -1).permute(0, 3, 1, 2).to(dtype)


# --------------------------------------------------------------------------------------------
# the tokenizer
# --------------------------------------------------------------------------------------------


@TOKENIZERS.register("vq-f16")
class VQModel(Tokenizer):
    """LlamaGen's VQ-16 tokenizer: 256x256 images <-> 16x16 grids of 16384 codes.

    Args:
        config: the hyperparameters; the default is the published model (71,883,403
            parameters, plus the 65,536-entry ``quantize.codebook_used`` buffer).

    Example::

        tok = VQModel().load_weights("vq_ds16_c2i.pt").eval()
        codes = tok.encode(images)       # (B, 3, 256, 256) in [-1, 1] -> (B, 256) int64
        recon = tok.decode(codes)        # (B, 256) -> (B, 3, 256, 256)

    The module may be cast (``tok.to(torch.bfloat16)``): inputs are cast to its dtype, while
    codebook distances are always computed in float32. ``tok.channels_last()`` switches the
    convolutions to NHWC memory layout.
    """

    config_cls = VQConfig
    name = "vq-f16"
    checkpoint_prefixes = ("vqvae.", "tokenizer.")  # an official AiM file; a save_pretrained one

    def __init__(self, config: VQConfig = VQConfig()):
        super().__init__()
        if not isinstance(config, VQConfig):
            raise ConfigError(f"VQModel expects a VQConfig, got {type(config).__name__}")
        self.config = config
        # Registration order follows LlamaGen's, so state_dict() lists keys in file order.
        self.encoder = _Encoder(config)
        self.decoder = _Decoder(config)
        self.quantize = _Quantizer(config.codebook_size, config.codebook_embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, kernel_size=1)
        self._memory_format = torch.contiguous_format

    # ---- sizes -----------------------------------------------------------------------------

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def embed_dim(self) -> int:
        return self.config.codebook_embed_dim

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    def channels_last(self, enabled: bool = True) -> VQModel:
        """Store conv weights, and run on inputs, in ``torch.channels_last`` layout (or undo it)."""
        self._memory_format = torch.channels_last if enabled else torch.contiguous_format
        return self.to(memory_format=self._memory_format)

    # ---- encode / decode -------------------------------------------------------------------

    def encode_latents(self, images: Tensor) -> Tensor:
        """Pre-quantisation latents: images (B, C, H, W) -> (B, embed_dim, H/f, W/f)."""
        self.check_images(images)
        x = images.to(dtype=self.dtype, memory_format=self._memory_format)
        return self.quant_conv(self.encoder(x))

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> int64 codes (B, (H/16) * (W/16)), raster order."""
        return self.quantize.nearest(self.encode_latents(images))

    def decode(self, codes: Tensor, *, grid: tuple[int, int] | None = None, clamp: bool = False) -> Tensor:
        """Codes (B, N) -> images (B, C, h * 16, w * 16) in the module's dtype.

        Args:
            codes: integer codes in raster order.
            grid: ``(h, w)``; by default ``h = w = sqrt(N)``.
            clamp: clamp to ``[-1, 1]``. The decoder itself applies no tanh or clamp (as in
                LlamaGen), so raw outputs may leave that range slightly.
        """
        return self.decode_checked(codes, self.check_codes(codes, grid), clamp=clamp)

    def decode_checked(self, codes: Tensor, grid: tuple[int, int], *, clamp: bool = False) -> Tensor:
        """:meth:`decode` of codes that :meth:`check_codes` accepted with this ``grid``: no
        check, so no host synchronisation (the range check reads the codes' min and max)."""
        z = self.quantize.lookup(codes, grid, self.dtype)  # (B, embed_dim, h, w)
        z = z.contiguous(memory_format=self._memory_format)
        out = self.decoder(self.post_quant_conv(z))
        return out.clamp(-1.0, 1.0) if clamp else out

    def forward(self, images: Tensor) -> Tensor:
        """Reconstruction ``decode(encode(images))``, (B, C, H, W) -> (B, C, H, W)."""
        codes = self.encode(images)  # checks the images; its own codes need no range check (a host sync)
        f = self.downsample
        return self.decode_checked(codes, (images.shape[2] // f, images.shape[3] // f))

    def extra_repr(self) -> str:
        c = self.config
        return f"codebook_size={c.codebook_size}, embed_dim={c.codebook_embed_dim}, downsample={self.downsample}"
