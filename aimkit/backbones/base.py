"""The backbone contract shared by every sequence model (Mamba2, transformer, ...).

A backbone is a stack of :class:`Block` s followed by a final RMSNorm. Each block holds a
*mixer* (the sequence-mixing layer: Mamba2, attention) and optionally an MLP, and is modulated
by per-layer ``(shift, scale, gate)`` tensors that the conditioning module computes.

Inference cache interface (after mamba-ssm's ``utils/generation.py``):

* ``backbone.allocate_inference_cache(batch_size, max_seqlen, dtype)`` returns a dict
  ``layer_idx -> tuple of tensors`` that is stored in :class:`InferenceParams`.
* ``backbone(x, mods, inference_params)`` runs a whole sequence (prefill when a cache is given:
  the mixers fill their cache for positions ``[seqlen_offset, seqlen_offset + L)``).
* ``backbone.step(x, mods, inference_params)`` runs one token at ``inference_params.seqlen_offset``
  and updates the cache in place; it is CUDA-graph capturable (position-dependent mixers read the
  device tensor ``inference_params.position``, never a Python int that changes between steps).

Which implementation each operation runs is the backbone's :class:`~aimkit.policy.ExecutionPolicy`,
given at construction (``policy=``, default :func:`~aimkit.policy.default_policy`) and stored as
``self.policy`` on the backbone and on every sub-module that branches on it; each reads
``self.policy`` at call time, so setting ``module.policy`` on all of them switches the path.

Every mixer implements the same four members::

    mixer = MixerCls(d_model, layer_idx=i, device=None, dtype=None)
    mixer(x, inference_params=None)          # (B, L, D) -> (B, L, D)
    mixer.step(x, inference_params)          # (B, 1, D) -> (B, 1, D)
    mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=None) -> tuple[Tensor, ...]
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..kernels.compiled import TrainCompiled
from ..kernels.glue import DeferredRowNorm, add_norm_modulate
from ..policy import ExecutionPolicy, default_policy

__all__ = ["InferenceParams", "Block", "Backbone", "modulate", "resolve_policy"]


@dataclass
class InferenceParams:
    """State of one incremental decoding run.

    Attributes:
        max_seqlen: longest sequence the cache holds (class token + image tokens).
        max_batch_size: batch size the cache was allocated for.
        seqlen_offset: number of positions already processed (Python int, host side).
        key_value_memory_dict: ``layer_idx -> tuple`` of cache tensors, owned by each mixer.
        position: ``()`` int64 tensor on the cache's device mirroring ``seqlen_offset``; mixers
            that need the position inside a CUDA graph read it from here.
    """

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    key_value_memory_dict: dict[int, tuple[Tensor, ...]] = field(default_factory=dict)
    position: Tensor | None = None

    def advance(self, n: int = 1) -> None:
        """Move the offset forward by ``n`` positions (host int and device tensor alike)."""
        self.seqlen_offset += n
        if self.position is not None:
            self.position.add_(n)

    def reset(self) -> None:
        """Start a new sequence in the same buffers (states are overwritten by the next prefill)."""
        self.seqlen_offset = 0
        if self.position is not None:
            self.position.zero_()

    def rows(self, start: int, stop: int) -> InferenceParams:
        """The same run seen through rows ``[start, stop)`` of every cache tensor (views: writes
        land in this cache), sharing ``position``; for decoding groups of rows apart
        (:meth:`Backbone.step` with policy ``decode_streams``). Advance the whole run, not this."""
        if not 0 <= start < stop <= self.max_batch_size:
            raise ValueError(f"rows [{start}, {stop}) outside a cache of {self.max_batch_size} rows")
        caches = {i: tuple(t[start:stop] for t in cache) for i, cache in self.key_value_memory_dict.items()}
        return InferenceParams(max_seqlen=self.max_seqlen, max_batch_size=stop - start,
                               seqlen_offset=self.seqlen_offset, key_value_memory_dict=caches,
                               position=self.position)

    def layer_cache(self, layer_idx: int, batch: int) -> tuple[Tensor, ...]:
        """Layer ``layer_idx``'s cache tensors, each viewed at its first ``batch`` rows."""
        try:
            cache = self.key_value_memory_dict[layer_idx]
        except KeyError:
            raise ValueError(
                f"no inference cache for layer {layer_idx}: fill "
                "inference_params.key_value_memory_dict with backbone.allocate_inference_cache(...)"
            ) from None
        if batch > cache[0].shape[0]:
            raise ValueError(f"batch {batch} exceeds the cache's batch size {cache[0].shape[0]}")
        return tuple(t[:batch] for t in cache)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``; x (B, L, D), shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def resolve_policy(policy: ExecutionPolicy | None) -> ExecutionPolicy:
    """``policy``, or :func:`~aimkit.policy.default_policy` (the environment, read now) when None."""
    return default_policy() if policy is None else policy


class Block(nn.Module):
    """Pre-norm residual block with adaLN-modulated sublayers.

    ``residual = x + residual``; ``h = gate * mixer(modulate(norm(residual), shift, scale))``;
    with an MLP a second modulated sublayer follows. The residual stream is kept in float32 when
    ``residual_in_fp32`` (as in the official AiM blocks).

    Args:
        dim: model width D.
        mixer_cls: factory ``dim -> mixer`` (already bound to its layer index).
        norm_cls: factory ``dim -> norm``.
        mlp_cls: optional factory ``dim -> mlp``; adds a second sublayer and 3 more modulation rows.
        residual_in_fp32: keep the residual stream in float32.
    """

    def __init__(
        self,
        dim: int,
        mixer_cls: Callable[[int], nn.Module],
        norm_cls: Callable[[int], nn.Module],
        mlp_cls: Callable[[int], nn.Module] | None = None,
        residual_in_fp32: bool = True,
    ):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.norm = norm_cls(dim)
        self.mixer = mixer_cls(dim)
        if mlp_cls is not None:
            self.norm2 = norm_cls(dim)
            self.mlp = mlp_cls(dim)
        else:
            self.norm2 = None
            self.mlp = None

    @property
    def mod_chunks(self) -> int:
        """How many modulation rows (each (B, D)) this block consumes: 3 per sublayer."""
        return 3 if self.mlp is None else 6

    def sublayers(
        self,
    ) -> list[tuple[nn.Module, Callable[[Tensor, InferenceParams], tuple[Tensor, DeferredRowNorm | None]]]]:
        """``(norm, decode-step function)`` of each modulated sublayer, in order (for fused decoding).

        A step function maps h (B, 1, D) to ``(out (B, 1, D), deferred)``: ``deferred`` is None,
        or the :class:`~aimkit.kernels.glue.DeferredRowNorm` factor that ``out`` still lacks (a
        mixer's ``step_with_deferred_norm``)."""
        deferring = getattr(self.mixer, "step_with_deferred_norm", None)
        subs = [(self.norm, deferring or (lambda h, params: (self.mixer.step(h, params), None)))]
        if self.mlp is not None:
            subs.append((self.norm2, lambda h, _params: (self.mlp(h), None)))
        return subs

    def sequence_sublayers(self) -> list[tuple[nn.Module, Callable[[Tensor, InferenceParams | None], Tensor]]]:
        """``(norm, whole-sequence function)`` of each modulated sublayer, in order."""
        subs = [(self.norm, lambda h, params: self.mixer(h, inference_params=params))]
        if self.mlp is not None:
            subs.append((self.norm2, lambda h, _params: self.mlp(h)))
        return subs

    def _pre(self, hidden: Tensor, residual: Tensor | None, norm: nn.Module) -> tuple[Tensor, Tensor]:
        residual = hidden if residual is None else hidden + residual
        if self.residual_in_fp32:
            residual = residual.float()
        return norm(residual.to(norm.weight.dtype)), residual

    def forward(
        self,
        hidden: Tensor,
        residual: Tensor | None,
        mod: Tensor,
        inference_params: InferenceParams | None = None,
        step: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """hidden (B, L, D), residual (B, L, D) or None, mod (B, mod_chunks, D) -> (hidden, residual).

        :class:`Backbone` runs blocks through here except for whole-sequence forwards on CUDA
        with policy ``compile_glue``, where it calls the sublayers directly with compiled glue
        (:meth:`Backbone._run_compiled_glue`): a subclass that overrides this method should be
        built with a policy whose ``compile_glue`` is false."""
        h, residual = self._pre(hidden, residual, self.norm)
        shift, scale, gate = mod[:, 0], mod[:, 1], mod[:, 2]
        h = modulate(h, shift, scale)
        h = self.mixer.step(h, inference_params) if step else self.mixer(h, inference_params=inference_params)
        h = gate.unsqueeze(1) * h
        if self.mlp is not None:
            h, residual = self._pre(h, residual, self.norm2)
            shift2, scale2, gate2 = mod[:, 3], mod[:, 4], mod[:, 5]
            h = gate2.unsqueeze(1) * self.mlp(modulate(h, shift2, scale2))
        return h, residual


class Backbone(nn.Module):
    """A stack of modulated blocks and the final norm ``norm_f``.

    Args:
        d_model: width D.
        n_layer: number of blocks.
        mixer_cls: factory ``(dim, layer_idx) -> mixer``.
        norm_cls: factory ``dim -> norm`` (RMSNorm in every preset).
        mlp_cls: optional factory ``dim -> mlp`` (the transformer's SwiGLU; None for Mamba2).
        residual_in_fp32: keep the residual stream in float32.
        policy: which implementation each operation runs (None: :func:`~aimkit.policy.default_policy`,
            read once); subclasses hand the same object to the sub-modules that branch on it.

    Attributes:
        policy: the :class:`~aimkit.policy.ExecutionPolicy`, read at every call.
    """

    _glue = TrainCompiled(add_norm_modulate, "glue")  # the compiled glue (an instance may hold its own)

    def __init__(
        self,
        d_model: int,
        n_layer: int,
        mixer_cls: Callable[..., nn.Module],
        norm_cls: Callable[[int], nn.Module],
        mlp_cls: Callable[[int], nn.Module] | None = None,
        residual_in_fp32: bool = True,
        *,
        policy: ExecutionPolicy | None = None,
    ):
        super().__init__()
        self.policy = resolve_policy(policy)
        self.d_model = d_model
        self.layers = nn.ModuleList(
            Block(
                d_model,
                lambda dim, i=i: mixer_cls(dim, layer_idx=i),
                norm_cls,
                mlp_cls,
                residual_in_fp32=residual_in_fp32,
            )
            for i in range(n_layer)
        )
        self.norm_f = norm_cls(d_model)

    @property
    def mod_chunks(self) -> int:
        """Modulation rows per layer (3 for a mixer-only block, 6 with an MLP)."""
        return self.layers[0].mod_chunks

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None
    ) -> dict[int, tuple[Tensor, ...]]:
        """Per-layer cache tensors for ``batch_size`` sequences of up to ``max_seqlen`` positions."""
        return {
            i: layer.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype)
            for i, layer in enumerate(self.layers)
        }

    def sublayer_modules(self) -> list[nn.Module]:
        """The modulated sublayers' modules in the order a whole-sequence forward runs them
        (``layers[0].mixer``, ``layers[0].mlp`` if any, ``layers[1].mixer``, ...): each maps h
        (B, L, D) -> (B, L, D) when called without a cache. What the layer-graphed training step
        replays from CUDA graphs (:mod:`aimkit.training.layer_graphs`)."""
        return [m for layer in self.layers for m in (layer.mixer, layer.mlp) if m is not None]

    def _run(self, x: Tensor, mods: Sequence[Tensor], inference_params, step: bool) -> Tensor:
        if len(mods) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} modulation tensors, got {len(mods)}")
        if not step and inference_params is None and self._compiles_glue(x):
            return self._run_compiled_glue(x, mods)
        hidden, residual = x, None
        for layer, mod in zip(self.layers, mods):
            hidden, residual = layer(hidden, residual, mod, inference_params=inference_params, step=step)
        residual = hidden + residual
        return self.norm_f(residual.to(self.norm_f.weight.dtype))

    def _glue_stages(self, mods: Sequence[Tensor], step: bool):
        """The walk through the stack that the fused glue paths share: for each modulated sublayer
        in order ``(norm, shift, scale, sublayer, gate)`` (the (B, D) modulation views; ``gate``
        scales that sublayer's output in the next glue), then ``(norm_f, None, None, None, None)``.
        ``step`` picks the decode-step sublayer functions (:meth:`Block.sublayers`), else the
        whole-sequence ones (:meth:`Block.sequence_sublayers`)."""
        for layer, mod in zip(self.layers, mods):
            for j, (norm, sublayer) in enumerate(layer.sublayers() if step else layer.sequence_sublayers()):
                yield norm, mod[:, 3 * j], mod[:, 3 * j + 1], sublayer, mod[:, 3 * j + 2]
        yield self.norm_f, None, None, None, None

    def _compiles_glue(self, x: Tensor) -> bool:
        """Whether a whole-sequence forward without a cache runs the compiled glue: policy
        ``compile_glue``, a device the compiled function serves (CUDA for Inductor) and a stack
        the glue reproduces."""
        return self.policy.compile_glue and self._glue.wants_compile(x.device) and self._glue_layout_ok()

    def _run_compiled_glue(self, x: Tensor, mods: Sequence[Tensor]) -> Tensor:
        """The whole-sequence forward without a cache, the glue between sublayers as one compiled
        function (:func:`aimkit.kernels.glue.add_norm_modulate`; measured faster in training,
        docs/benchmarks.md)."""
        device = x.device
        out_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        hidden, gate, residual = x, None, None
        for norm, shift, scale, sublayer, next_gate in self._glue_stages(mods, step=False):
            last = sublayer is None  # the final norm: output in its weight's dtype
            h, residual = self._glue(device, hidden, gate, residual, norm.weight, norm.eps, shift, scale,
                                     norm.weight.dtype if last else out_dtype or norm.weight.dtype)
            if last:
                return h
            hidden, gate = sublayer(h, None), next_gate  # (B, L, D)

    def forward(
        self, x: Tensor, mods: Sequence[Tensor], inference_params: InferenceParams | None = None
    ) -> Tensor:
        """x (B, L, D), mods: n_layer tensors (B, mod_chunks, D) -> normed hidden (B, L, D).

        With ``inference_params`` the mixers also fill their caches (prefill). Without, on CUDA
        with policy ``compile_glue``, the glue between sublayers runs compiled
        (:mod:`aimkit.kernels.compiled`; same maths, the gated residual formed in float32)."""
        return self._run(x, mods, inference_params, step=False)

    def step(self, x: Tensor, mods: Sequence[Tensor], inference_params: InferenceParams) -> Tensor:
        """One position: x (B, 1, D) -> (B, 1, D), updating every layer's cache in place.

        With policy ``decode_streams`` above 1 on CUDA, the rows are decoded in that many groups,
        each on its own stream (:meth:`step_in_row_groups`); otherwise :meth:`step_rows`."""
        groups = self.policy.decode_streams
        if groups > 1 and x.is_cuda and x.shape[0] >= groups:
            return self.step_in_row_groups(x, mods, inference_params, groups, _side_streams(x.device, groups - 1))
        return self.step_rows(x, mods, inference_params)

    def step_in_row_groups(self, x: Tensor, mods: Sequence[Tensor], inference_params: InferenceParams,
                           groups: int, side_streams: Sequence[torch.cuda.Stream] = ()) -> Tensor:
        """:meth:`step_rows` of ``groups`` contiguous groups of rows apart, each against its rows
        of the cache (:meth:`InferenceParams.rows`); equal row by row to one step of all rows up
        to the rounding of the smaller matmuls.

        Args:
            x: (B, 1, D), B >= groups; mods: n_layer tensors (B, mod_chunks, D).
            side_streams: ``groups - 1`` CUDA streams: group 0 runs on the current stream, group
                i on ``side_streams[i - 1]``, forked from and joined back into the current stream
                (also inside a CUDA-graph capture). Empty: the groups run one after another.

        Returns:
            (B, 1, D).
        """
        batch = x.shape[0]
        if not 1 <= groups <= batch:
            raise ValueError(f"cannot split {batch} rows into {groups} groups")
        if side_streams and len(side_streams) != groups - 1:
            raise ValueError(f"{groups} groups need {groups - 1} side streams, got {len(side_streams)}")
        size, extra = divmod(batch, groups)  # the first `extra` groups take one row more
        sizes = [size + (i < extra) for i in range(groups)]
        starts = [sum(sizes[:i]) for i in range(groups)]
        main = torch.cuda.current_stream(x.device) if side_streams else None
        for stream in side_streams:
            stream.wait_stream(main)  # the inputs and the cache as the current stream left them
        outs = []
        for i, (start, size) in enumerate(zip(starts, sizes)):
            stop = start + size
            where = torch.cuda.stream(side_streams[i - 1]) if side_streams and i > 0 else contextlib.nullcontext()
            with where:
                outs.append(self.step_rows(x[start:stop], [m[start:stop] for m in mods],
                                           inference_params.rows(start, stop)))
        for stream in side_streams:
            main.wait_stream(stream)
        return torch.cat(outs)

    def step_rows(self, x: Tensor, mods: Sequence[Tensor], inference_params: InferenceParams) -> Tensor:
        """One position of every row together: x (B, 1, D) -> (B, 1, D), updating every layer's
        cache in place.

        With policy ``decode_glue`` on the kernel, the glue between sublayers (gated residual add,
        RMSNorm, modulation) runs as one fused kernel per sublayer
        (:func:`aimkit.kernels.decode_glue.add_norm_modulate`); the result equals the unfused
        :meth:`forward` arithmetic up to rounding (float32 inside). A sublayer that defers its
        output's per-row norm factor (Mamba2's folded gated norm, policy ``fold_gated_norm``) has
        it applied inside the next glue kernel."""
        if not (self.policy.use_kernel("decode_glue", x) and self._glue_layout_ok()):
            return self._run(x, mods, inference_params, step=True)
        from ..kernels import decode_glue  # Triton: imported only when the kernel runs

        if len(mods) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} modulation tensors, got {len(mods)}")
        hidden, gate, residual = x[:, 0], None, None  # (B, D), gate of the previous sublayer
        deferred = None  # the previous sublayer's DeferredRowNorm, if any
        for norm, shift, scale, sublayer, next_gate in self._glue_stages(mods, step=True):
            partials, norm_dim, norm_eps = deferred if deferred is not None else (None, 0, 0.0)
            h, residual = decode_glue.add_norm_modulate(
                hidden, gate, residual, norm.weight, norm.eps, shift, scale,
                hidden_sq_partials=partials, hidden_norm_dim=norm_dim, hidden_norm_eps=norm_eps,
            )
            if sublayer is None:  # the final norm
                return h.unsqueeze(1)
            out, deferred = sublayer(h.unsqueeze(1), inference_params)
            hidden, gate = out[:, 0], next_gate  # (B, D)

    def prefill_first(self, x: Tensor, mods: Sequence[Tensor], inference_params: InferenceParams) -> Tensor:
        """Prefill of a single first position (the class token) through the decode step.

        Equal to ``forward(x, mods, inference_params)`` at ``seqlen_offset == 0`` with one
        position, but it runs the step's operations (the policy's decode kernels) instead of the chunked
        scan, which costs many small launches for one token. Mixers with a recurrent history
        (``reset_inference_cache``) are reset first; attention masks everything past position 0.

        Args:
            x: (B, 1, D); ``inference_params.position`` must be 0.
        """
        if x.shape[1] != 1:
            raise ValueError(f"prefill_first takes one position, got {x.shape[1]}")
        if inference_params.seqlen_offset != 0:
            raise ValueError(f"prefill_first starts a sequence (offset 0), got offset {inference_params.seqlen_offset}")
        for layer in self.layers:
            reset = getattr(layer.mixer, "reset_inference_cache", None)
            if reset is not None:
                reset(inference_params, x.shape[0])
        return self.step(x, mods, inference_params)

    def _glue_layout_ok(self) -> bool:
        """Whether fused glue reproduces this stack: float32 residual, affine RMSNorms."""
        norms = [self.norm_f] + [n for layer in self.layers for n in (layer.norm, layer.norm2) if n is not None]
        return self.layers[0].residual_in_fp32 and all(
            isinstance(n, nn.RMSNorm) and n.weight is not None and n.eps is not None for n in norms
        )


@functools.cache
def _side_streams(device: torch.device, count: int) -> tuple[torch.cuda.Stream, ...]:
    """``count`` CUDA streams of ``device`` for :meth:`Backbone.step`'s row groups, made once per
    process (a stream outlives every graph captured with it)."""
    return tuple(torch.cuda.Stream(device) for _ in range(count))


def rms_norm_factory(eps: float = 1e-5, device=None, dtype=None) -> Callable[[int], nn.Module]:
    """``dim -> nn.RMSNorm(dim, eps)``: the norm used by every AiM block."""
    return lambda dim: nn.RMSNorm(dim, eps=eps, device=device, dtype=dtype)
