"""The ``mamba2`` backbone: Mamba2 mixers (state-space duality) behind the backbone contract.

:class:`Mamba2` reproduces mamba-ssm's ``Mamba2`` layer with its defaults (no ``d_mlp`` part,
scalar ``D`` per head, gated RMSNorm with ``norm_before_gate=False``); parameter names and shapes
match, so official AiM checkpoints load without renaming. Data flow for input ``u`` (B, L, D)::

    z, xBC, dt = split(in_proj(u))            # d_inner, conv_dim, nheads
    xBC = silu(causal depthwise conv(xBC))    # kernel d_conv
    x, B, C = split(xBC)                      # d_inner, ngroups*d_state, ngroups*d_state
    y = SSD(x, softplus(dt + dt_bias), A=-exp(A_log), B, C, D)
    out = out_proj(rmsnorm(y * silu(z)) * norm.weight)

Two implementations of every operation, chosen by the mixer's
:class:`~aimkit.policy.ExecutionPolicy` (``self.policy``, read at every call):

* the PyTorch reference (:mod:`aimkit.kernels.ssd`, the ring convolution step below,
  :class:`GatedRMSNorm`): runs on any device; never imports mamba-ssm or Triton.
* the kernels: for whole sequences (op ``scan``) mamba-ssm's Triton ``mamba_chunk_scan_combined``
  (forward and backward), its Triton gated RMSNorm and causal-conv1d's convolution when installed
  (:mod:`aimkit.kernels.mamba_ssm`), or with ``split_scan`` the whole mixer after ``in_proj`` as
  one mamba-ssm function; for a decode step aimkit's own Triton kernels, the convolution step
  (op ``conv_step``, :mod:`aimkit.kernels.conv_step`) and the one-pass state update (op
  ``state_update``, :mod:`aimkit.kernels.ssm_step`), into which the gated norm folds
  (``fold_gated_norm``: its row factor deferred to the backbone's next glue kernel).

Inference cache per layer: ``(conv_state, ssm_state)`` with conv_state (B, conv_dim, d_conv) and
ssm_state (B, nheads, headdim, d_state). conv_state is a ring buffer of the last ``d_conv``
convolution inputs (raw ``xBC``, before the convolution), indexed by absolute position: slot ``k``
holds the input of the latest position ``q`` with ``q % d_conv == k``, zeros for positions before
the sequence; channels are contiguous in memory, as the kernels expect. Every path keeps it so:

* a prefill of positions ``[offset, end)`` reads its context in order as
  ``conv_state.roll(-(offset % d_conv), -1)`` (oldest first) and stores the ordered window of
  positions ``end - d_conv .. end - 1`` rolled by ``end % d_conv``;
* a step at position ``p`` (the device tensor ``InferenceParams.position``) reads slots
  ``(p + 1 + j) % d_conv``, j < d_conv - 1, as the window before the new input and writes the new
  input into slot ``p % d_conv``: nothing is shifted, and no slot is both read and written.

``step`` updates both states in place (index ops or in-place kernels): no cache allocation, no
host sync, no branching on tensor values, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check_fields
from ..errors import ConfigError
from ..kernels import mamba_ssm
from ..kernels.glue import DeferredRowNorm
from ..kernels.mamba_ssm import MambaKernels
from ..kernels.ssd import ssd_chunked, ssd_recurrent_step_
from ..policy import ExecutionPolicy
from ..registry import BACKBONES
from .base import Backbone, InferenceParams, resolve_policy, rms_norm_factory

__all__ = ["GatedRMSNorm", "Mamba2", "Mamba2Backbone", "Mamba2Config"]


@dataclass(frozen=True)
class Mamba2Config:
    """Hyperparameters of one Mamba2 mixer (the width comes from the backbone).

    Attributes:
        d_state: SSM state size N per head channel.
        d_conv: kernel width of the depthwise causal convolution.
        expand: inner width ``d_inner = expand * d_model``.
        headdim: channels P per head; ``nheads = d_inner // headdim``.
        ngroups: groups G of heads sharing B and C; also the gated-norm groups.
        A_init_range: ``A = -uniform(A_init_range)`` at initialisation.
        dt_min, dt_max: range of the log-uniform initial step size.
        dt_init_floor: lower clamp of the initial step size.
        norm_eps: epsilon of the gated RMSNorm inside the mixer.
        conv_bias: bias on the convolution.
        bias: bias on ``in_proj`` and ``out_proj``.

    How the mixer computes (kernels, scan chunk length, decoding state dtype) is not part of the
    architecture: see :class:`~aimkit.policy.ExecutionPolicy`.
    """

    d_state: int = 128  # N, state per channel (AiM and mamba-ssm default)
    d_conv: int = 4  # causal conv width
    expand: int = 2  # d_inner = 2 * d_model
    headdim: int = 64  # P; d_model 768 -> 24 heads
    ngroups: int = 1  # one B/C shared by all heads
    A_init_range: tuple[float, float] = (1, 16)  # A in -[1, 16] at init
    dt_min: float = 0.001  # smallest initial dt
    dt_max: float = 0.1  # largest initial dt
    dt_init_floor: float = 1e-4  # clamp of the initial dt
    norm_eps: float = 1e-5  # gated RMSNorm epsilon, as mamba-ssm's RMSNormGated
    conv_bias: bool = True  # conv1d.bias present (official checkpoints have it)
    bias: bool = False  # no bias on in_proj / out_proj

    def __post_init__(self):
        check_fields(self, "mamba2")  # types: ints are ints, floats finite, A_init_range two numbers
        for name in ("d_state", "d_conv", "expand", "headdim", "ngroups"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"mamba2 {name} must be a positive integer, got {value!r}")
        low, high = self.A_init_range
        if not 0 < low <= high:
            raise ConfigError(f"mamba2 A_init_range must satisfy 0 < low <= high, got {self.A_init_range}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"mamba2 needs 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if self.dt_init_floor < 0:
            raise ConfigError(f"mamba2 dt_init_floor must be >= 0, got {self.dt_init_floor!r}")
        if not self.norm_eps > 0:
            raise ConfigError(f"mamba2 norm_eps must be positive, got {self.norm_eps!r}")
        for name in ("conv_bias", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"mamba2 {name} must be true or false, got {getattr(self, name)!r}")


def _upcast(t: Tensor) -> Tensor:
    """t in float32, or unchanged if already float32/float64."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class GatedRMSNorm(nn.Module):
    """``rmsnorm(x * silu(z)) * weight``, normalised over groups of ``group_size`` channels.

    The PyTorch version of mamba-ssm's ``RMSNormGated`` with ``norm_before_gate=False``; computed
    in float32 (float64 for float64 inputs), returned in ``x.dtype``.

    Args:
        dim: channels.
        group_size: channels per normalisation group (``dim`` for one group).
        eps: added to the mean square.
    """

    def __init__(self, dim: int, group_size: int | None = None, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.group_size = dim if group_size is None else group_size
        if dim % self.group_size:
            raise ConfigError(f"gated norm width {dim} is not a multiple of its group size {self.group_size}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}"

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """x, z (..., dim) -> (..., dim)."""
        h = _upcast(x) * F.silu(_upcast(z))  # (..., dim)
        h = h.unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        h = h * torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + self.eps)
        return (h.flatten(-2) * self.weight.to(h.dtype)).to(x.dtype)


class Mamba2(nn.Module):
    """The Mamba2 mixer, parameter-compatible with mamba-ssm's ``Mamba2``.

    Parameters (d_model 768, defaults): ``in_proj.weight`` (3352, 768), ``conv1d.weight``
    (1792, 1, 4), ``conv1d.bias`` (1792), ``dt_bias``/``A_log``/``D`` (24), ``norm.weight`` (1536),
    ``out_proj.weight`` (768, 1536).

    Args:
        d_model: width D of the input and output.
        layer_idx: index of this layer's entry in ``InferenceParams.key_value_memory_dict``.
        config: :class:`Mamba2Config`.
        device: parameter device.
        dtype: parameter dtype (``D`` is kept at least float32, as in mamba-ssm).
        policy: which implementation each operation runs (None:
            :func:`~aimkit.policy.default_policy`, read once); stored as ``self.policy`` and read
            at every call.
    """

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int,
        config: Mamba2Config = Mamba2Config(),
        device=None,
        dtype=None,
        policy: ExecutionPolicy | None = None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.config = config
        self.policy = resolve_policy(policy)
        self.d_model = d_model
        self.layer_idx = layer_idx
        self.d_inner = config.expand * d_model
        self.d_state = config.d_state
        self.d_conv = config.d_conv
        self.headdim = config.headdim
        self.ngroups = config.ngroups
        if self.d_inner % self.headdim:
            raise ConfigError(f"mamba2 d_inner {self.d_inner} is not a multiple of headdim {self.headdim}")
        self.nheads = self.d_inner // self.headdim
        if self.nheads % self.ngroups:
            raise ConfigError(f"mamba2 nheads {self.nheads} is not a multiple of ngroups {self.ngroups}")
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.d_state

        d_in_proj = 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads  # z, xBC, dt
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=config.bias, **factory)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=self.d_conv,
            groups=self.conv_dim,
            padding=self.d_conv - 1,
            bias=config.conv_bias,
            **factory,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, **factory))
        self.A_log = nn.Parameter(torch.empty(self.nheads, **factory))
        d_dtype = torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)
        self.D = nn.Parameter(torch.empty(self.nheads, device=device, dtype=d_dtype))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(
            self.d_inner, group_size=self.d_inner // self.ngroups, eps=config.norm_eps, **factory
        )
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=config.bias, **factory)
        self.reset_ssm_parameters()

    def reset_ssm_parameters(self) -> None:
        """Initialise ``dt_bias``, ``A_log`` and ``D`` as mamba-ssm does.

        ``dt`` is log-uniform in ``[dt_min, dt_max]``, clamped below at ``dt_init_floor``, and
        stored as its inverse softplus; ``A_log = log(uniform(A_init_range))``; ``D = 1``.
        """
        cfg = self.config
        device = self.dt_bias.device
        with torch.no_grad():
            u = torch.rand(self.nheads, device=device, dtype=torch.float32)
            dt = torch.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
            dt = dt.clamp(min=cfg.dt_init_floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) == dt
            A = torch.empty(self.nheads, device=device, dtype=torch.float32).uniform_(*cfg.A_init_range)
            self.A_log.copy_(torch.log(A))
            self.D.fill_(1.0)

    def reset_parameters(self) -> None:
        """Re-initialise every parameter as at construction (PyTorch default linear/conv init)."""
        self.in_proj.reset_parameters()
        self.conv1d.reset_parameters()
        self.out_proj.reset_parameters()
        self.norm.reset_parameters()
        self.reset_ssm_parameters()

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, layer_idx={self.layer_idx}, nheads={self.nheads}, "
                f"headdim={self.headdim}, d_state={self.d_state}, ngroups={self.ngroups}")

    # ----------------------------------------------------------------------------- helpers

    def _scan_kernels(self, x: Tensor) -> MambaKernels | None:
        """mamba-ssm's kernels when the policy's ``scan`` picks them for ``x``, else None (the
        PyTorch reference; also under ``"auto"`` when the installed package cannot be imported)."""
        if not self.policy.use_kernel("scan", x):
            return None
        kernels = mamba_ssm.load_kernels()
        if kernels is None and self.policy.scan == "kernel":
            raise ConfigError(
                f"policy scan='kernel' but mamba-ssm's Triton kernels cannot be imported "
                f"({mamba_ssm.kernel_info().get('error')}); install mamba-ssm (a Triton-only build is "
                "enough) or use scan='auto'"
            )
        return kernels

    def _cache(self, inference_params: InferenceParams, batch: int) -> tuple[Tensor, Tensor]:
        """This layer's ``(conv_state, ssm_state)`` views for the first ``batch`` rows."""
        return inference_params.layer_cache(self.layer_idx, batch)

    def _conv(self, xBC: Tensor, context: Tensor | None, kernels: MambaKernels | None) -> Tensor:
        """silu(causal depthwise conv): xBC (B, L, conv_dim) -> (B, L, conv_dim).

        ``context`` (B, conv_dim, d_conv) holds the inputs before this chunk in order, oldest first
        (a prefill that continues a cached sequence); None means zeros (the sequence starts here).
        """
        seqlen = xBC.shape[1]
        xt = xBC.transpose(1, 2)  # (B, conv_dim, L)
        if context is None and kernels is not None and kernels.causal_conv1d_fn is not None:
            # Channel-last input needs 8-aligned strides in causal-conv1d; else use plain layout.
            if xt.stride(1) == 1 and (xt.stride(2) % 8 or self.conv_dim % 8):
                xt = xt.contiguous()
            weight = self.conv1d.weight.squeeze(1)  # (conv_dim, d_conv)
            out = kernels.causal_conv1d_fn(xt, weight, bias=self.conv1d.bias, activation="silu")
            return out.transpose(1, 2)
        if context is None:
            out = self.conv1d(xt)[..., :seqlen]  # (B, conv_dim, L), padding d_conv-1 on both sides
        else:
            xt = torch.cat([context[..., 1:].to(xt.dtype), xt], dim=-1)  # (B, conv_dim, d_conv-1+L)
            out = F.conv1d(xt, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)
        return F.silu(out).transpose(1, 2)

    def _position(self, inference_params: InferenceParams, device: torch.device) -> Tensor:
        """The decode position as a () int64 tensor on ``device``: ``inference_params.position``
        (what a CUDA graph captures), else a tensor made from ``seqlen_offset`` outside capture."""
        position = inference_params.position
        if position is not None:
            return position
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError("Mamba2.step inside a CUDA graph needs inference_params.position (a () int64 "
                             "device tensor): a host offset would be frozen into the graph")
        return torch.tensor(inference_params.seqlen_offset, device=device)

    def _conv_step(self, xBC: Tensor, conv_state: Tensor, inference_params: InferenceParams) -> Tensor:
        """One conv position p: xBC (B, conv_dim) -> silu(conv) (B, conv_dim); writes xBC into ring
        slot ``p % d_conv`` of conv_state (B, conv_dim, d_conv) in place (module docstring)."""
        position = self._position(inference_params, xBC.device)
        weight = self.conv1d.weight.squeeze(1)  # (conv_dim, d_conv)
        if self.policy.use_kernel("conv_step", xBC):  # aimkit's kernel for the channels-contiguous ring
            from ..kernels.conv_step import conv_step_  # Triton: imported only when the kernel runs

            return conv_step_(xBC, conv_state, weight, self.conv1d.bias, position)
        new = xBC.to(conv_state.dtype).unsqueeze(-1)  # (B, conv_dim, 1)
        slots = (position + torch.arange(1, self.d_conv, device=position.device)) % self.d_conv  # (d_conv-1,)
        window = torch.cat([conv_state.index_select(-1, slots), new], dim=-1)  # (B, conv_dim, d_conv), oldest first
        conv_state.index_copy_(-1, (position % self.d_conv).view(1), new)  # the one slot not read above
        out = (window.to(weight.dtype) * weight).sum(dim=-1)  # (B, conv_dim)
        if self.conv1d.bias is not None:
            out = out + self.conv1d.bias
        return F.silu(out).to(xBC.dtype)

    def _gated_norm(self, y: Tensor, z: Tensor, kernels: MambaKernels | None) -> Tensor:
        """rmsnorm(y * silu(z)) * weight; y, z (..., d_inner)."""
        if kernels is None:
            return self.norm(y, z)
        return kernels.rmsnorm_fn(
            y, self.norm.weight, None, z=z, eps=self.norm.eps,
            group_size=self.norm.group_size, norm_before_gate=False,
        )

    def _split_scan_usable(self, kernels: MambaKernels | None) -> bool:
        """Whether :meth:`_split_scan` may run: policy ``split_scan``, its kernels present, and the
        channel-last convolution input causal-conv1d accepts there (channels and the in_proj row
        stride multiples of 8; other widths take the split path, which copies when needed)."""
        return (self.policy.split_scan and kernels is not None and kernels.causal_conv1d_fn is not None
                and kernels.mamba_split_conv1d_scan_combined is not None
                and self.conv_dim % 8 == 0 and self.in_proj.out_features % 8 == 0)

    def _split_scan(self, zxbcdt: Tensor, kernels: MambaKernels) -> Tensor:
        """The mixer after ``in_proj`` in one mamba-ssm autograd function: zxbcdt (B, L, d_in_proj)
        -> (B, L, D). Used for a forward without a cache (training) with policy ``split_scan``."""
        return kernels.mamba_split_conv1d_scan_combined(
            zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias, -torch.exp(_upcast(self.A_log)),
            self.D, self.policy.chunk_size, activation="silu", rmsnorm_weight=self.norm.weight,
            rmsnorm_eps=self.norm.eps, outproj_weight=self.out_proj.weight, outproj_bias=self.out_proj.bias,
            headdim=self.headdim, ngroups=self.ngroups, norm_before_gate=False,
        )

    def _split_xbc(self, xBC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., conv_dim) -> x (..., H, P), B (..., G, N), C (..., G, N) (views)."""
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xBC, [self.d_inner, gn, gn], dim=-1)
        return (x.unflatten(-1, (self.nheads, self.headdim)),
                B.unflatten(-1, (self.ngroups, self.d_state)),
                C.unflatten(-1, (self.ngroups, self.d_state)))

    # ----------------------------------------------------------------------------- contract

    def forward(self, x: Tensor, inference_params: InferenceParams | None = None) -> Tensor:
        """Mix a whole sequence: x (B, L, D) -> (B, L, D).

        With ``inference_params`` this is a prefill of positions ``[seqlen_offset,
        seqlen_offset + L)``: the layer's conv_state (ring buffer of the last ``d_conv`` conv
        inputs, zeros for positions before 0; module docstring) and ssm_state (state after the
        last position) are overwritten. ``seqlen_offset == 0`` starts a new sequence; a positive
        offset continues the cached one.
        """
        batch, seqlen, _ = x.shape
        kernels = self._scan_kernels(x)
        zxbcdt = self.in_proj(x)  # (B, L, 2*d_inner + 2*G*N + H)
        if inference_params is None and self._split_scan_usable(kernels):
            return self._split_scan(zxbcdt, kernels)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        # z (B, L, d_inner), xBC (B, L, conv_dim), dt (B, L, H)

        conv_state = ssm_state = context = None
        offset, continuing = 0, False
        if inference_params is not None:
            conv_state, ssm_state = self._cache(inference_params, batch)
            offset = inference_params.seqlen_offset
            continuing = offset > 0
            if continuing:  # the ring in order: positions offset - d_conv .. offset - 1
                context = conv_state.roll(-(offset % self.d_conv), dims=-1)  # (B, conv_dim, d_conv)
        xBC_in = xBC
        xBC = self._conv(xBC, context, kernels)  # (B, L, conv_dim)
        if conv_state is not None:
            inputs = xBC_in.detach().transpose(1, 2)  # (B, conv_dim, L)
            if continuing:
                window = torch.cat([context.to(inputs.dtype), inputs], dim=-1)[..., -self.d_conv:]
            else:  # left-pad short prompts with zeros, keep the last d_conv inputs of long ones
                window = F.pad(inputs, (self.d_conv - seqlen, 0))
            # window: positions end - d_conv .. end - 1; position q belongs in slot q % d_conv
            end = offset + seqlen
            conv_state.copy_(window.roll(end % self.d_conv, dims=-1))  # (B, conv_dim, d_conv)

        xs, B, C = self._split_xbc(xBC)  # (B, L, H, P), (B, L, G, N), (B, L, G, N)
        A = -torch.exp(_upcast(self.A_log))  # (H,)
        # A copy, so that overwriting the cache below cannot corrupt what autograd saved.
        initial_state = ssm_state.clone() if continuing else None
        want_state = ssm_state is not None
        if kernels is not None:
            out = kernels.mamba_chunk_scan_combined(
                xs, dt, A, B, C, chunk_size=self.policy.chunk_size, D=self.D,
                dt_bias=self.dt_bias, dt_softplus=True, initial_states=initial_state,
                return_final_states=want_state,
            )
        else:
            dt = F.softplus(_upcast(dt) + _upcast(self.dt_bias))  # (B, L, H)
            out = ssd_chunked(
                xs, dt, A, B, C, self.policy.chunk_size, D=self.D,
                initial_state=initial_state, return_final_state=want_state,
            )
        if want_state:
            y, final_state = out
            ssm_state.copy_(final_state.detach())  # (B, H, P, N)
        else:
            y = out
        y = y.flatten(-2)  # (B, L, d_inner)
        y = self._gated_norm(y, z, kernels)  # (B, L, d_inner)
        return self.out_proj(y)  # (B, L, D)

    def step(self, x: Tensor, inference_params: InferenceParams) -> Tensor:
        """Decode one position: x (B, 1, D) -> (B, 1, D), updating the cache in place."""
        out, deferred = self.step_with_deferred_norm(x, inference_params)
        return out if deferred is None else deferred.apply(out)  # a folded gated norm: its row factor here

    def step_with_deferred_norm(
        self, x: Tensor, inference_params: InferenceParams
    ) -> tuple[Tensor, DeferredRowNorm | None]:
        """Decode one position, leaving the gated norm's per-row factor to the caller where it folds.

        With the state-update kernel and a folded gated norm (:meth:`_folds_gated_norm`), the
        kernel writes ``g * norm.weight`` with ``g = y * silu(z)`` and partial sums of ``g^2``;
        since ``out_proj`` is linear without bias, ``out_proj(rmsnorm(g) * w) == r * out_proj(g * w)``
        with ``r = rsqrt(mean(g^2) + eps)`` per row, and ``r`` is left to the caller
        (:meth:`Backbone.step` folds it into its next glue kernel). Otherwise the output is final.

        Args:
            x: (B, 1, D) one position.
            inference_params: the cache, updated in place; the position is read from its device
                tensor ``position``.

        Returns:
            ``(out, deferred)``: out (B, 1, D); deferred None when out is final, else a
            :class:`~aimkit.kernels.glue.DeferredRowNorm` (partials (B, T) float32, dim
            ``d_inner``, eps ``norm.eps``) with ``deferred.apply(out)`` the output of :meth:`step`.
        """
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"Mamba2.step takes one position (B, 1, D), got shape {tuple(x.shape)}")
        conv_state, ssm_state = self._cache(inference_params, x.shape[0])
        z, xBC, dt = torch.split(self.in_proj(x[:, 0]), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        # z (B, d_inner), xBC (B, conv_dim), dt (B, H)
        xBC = self._conv_step(xBC, conv_state, inference_params)  # silu(conv) at this position
        xs, B, C = self._split_xbc(xBC)  # (B, H, P), (B, G, N), (B, G, N)
        if not self.policy.use_kernel("state_update", x):
            A = -torch.exp(_upcast(self.A_log))  # (H,)
            dt = F.softplus(_upcast(dt) + _upcast(self.dt_bias))  # (B, H)
            y = ssd_recurrent_step_(ssm_state, xs, dt, A, B, C, self.D)  # updates (B, H, P, N) in place
        else:
            from ..kernels.ssm_step import ssm_step_  # Triton: imported only when the kernel runs

            if self._folds_gated_norm(x):  # (B, H, P) = y * silu(z) * norm.weight, (B, T) sums of squares
                y, partials = ssm_step_(ssm_state, xs, dt, self.dt_bias, self.A_log, B, C, self.D,
                                        z=z.unflatten(-1, (self.nheads, self.headdim)), norm_weight=self.norm.weight)
                out = self.out_proj(y.flatten(-2)).unsqueeze(1)  # (B, 1, D), before the row factor
                return out, DeferredRowNorm(partials, self.d_inner, self.norm.eps)
            y = ssm_step_(ssm_state, xs, dt, self.dt_bias, self.A_log, B, C, self.D)  # softplus, -exp(A_log), D
        y = self._gated_norm(y.flatten(-2), z, self._scan_kernels(x))  # (B, d_inner)
        return self.out_proj(y).unsqueeze(1), None  # (B, 1, D)

    def _folds_gated_norm(self, x: Tensor) -> bool:
        """Whether the state-update kernel folds the gated norm in (its row factor deferred).

        Needs policy ``fold_gated_norm`` with ``decode_glue`` on the kernel (the caller checked
        ``state_update``), one norm group over all ``d_inner`` channels and no ``out_proj`` bias
        (the row factor must commute with it). Not for float16 models: the unnormalised ``g * w``
        and its projection could overflow there.
        """
        device = x.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        if (not self.policy.fold_gated_norm or self.norm.group_size != self.d_inner
                or self.out_proj.bias is not None or torch.float16 in (x.dtype, compute)):
            return False
        return self.policy.use_kernel("decode_glue", x)

    def reset_inference_cache(self, inference_params: InferenceParams, batch: int) -> None:
        """Zero this layer's states for the first ``batch`` rows: the empty history a sequence
        starts from, so that a decode step from here equals a prefill of one position."""
        for state in self._cache(inference_params, batch):
            state.zero_()

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """Zeroed ``(conv_state, ssm_state)`` on the module's device.

        Args:
            batch_size: sequences decoded together.
            max_seqlen: unused (the state does not grow with length); part of the contract.
            dtype: conv_state dtype (default: the conv weight's) and, with policy
                ``state_dtype="model"``, the ssm_state dtype (default: the parameters').

        Returns:
            conv_state (B, conv_dim, d_conv), stored channels-contiguous (strides
            (d_conv*conv_dim, 1, conv_dim)): the ring buffer of the last ``d_conv`` raw conv
            inputs, slot ``q % d_conv`` holding position ``q`` (module docstring; all zeros: the
            empty history); ssm_state (B, nheads, headdim, d_state) in float32 (float64 for a
            float64 model) or, with policy ``state_dtype="model"``, in the model dtype.
        """
        del max_seqlen
        device = self.conv1d.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(
            batch_size, self.d_conv, self.conv_dim, device=device, dtype=conv_dtype
        ).transpose(1, 2)  # (B, conv_dim, d_conv) with stride 1 over channels
        model_dtype = self.in_proj.weight.dtype if dtype is None else dtype
        if self.policy.state_dtype == "model":
            ssm_dtype = model_dtype
        else:
            ssm_dtype = torch.promote_types(model_dtype, torch.float32)
        ssm_state = torch.zeros(
            batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=ssm_dtype
        )
        return conv_state, ssm_state


@BACKBONES.register("mamba2")
class Mamba2Backbone(Backbone):
    """AiM's backbone: ``n_layer`` adaLN-modulated blocks of one Mamba2 mixer each, no MLP.

    Every block consumes 3 modulation rows (shift, scale, gate). Residuals stay in float32.

    Args:
        d_model: width D.
        n_layer: number of blocks.
        config: :class:`Mamba2Config` shared by every mixer.
        norm_eps: epsilon of the block RMSNorms and the final norm.
        device: parameter device.
        dtype: parameter dtype.
        policy: which implementation each operation runs (None:
            :func:`~aimkit.policy.default_policy`, read once), shared with every mixer.
    """

    config_cls = Mamba2Config

    def __init__(
        self,
        d_model: int,
        n_layer: int,
        config: Mamba2Config = Mamba2Config(),
        norm_eps: float = 1e-5,
        device=None,
        dtype=None,
        *,
        policy: ExecutionPolicy | None = None,
    ):
        factory = {"device": device, "dtype": dtype}
        policy = resolve_policy(policy)
        super().__init__(
            d_model,
            n_layer,
            mixer_cls=partial(Mamba2, config=config, policy=policy, **factory),
            norm_cls=rms_norm_factory(norm_eps, **factory),
            mlp_cls=None,
            residual_in_fp32=True,
            policy=policy,
        )
        self.config = config
