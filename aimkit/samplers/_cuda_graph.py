"""CUDA-graph capture of a model's decode step, reused across decoding runs.

One :class:`DecodeGraph` holds, for one model, one batch size (rows of the possibly doubled
batch), one cache dtype and one execution policy: the model's inference cache, static input
buffers (the token batch and a copy of every tensor of the decoding condition), the captured
graph and its static logits.
A run then goes::

    graph = get_decode_graph(model, cond, rows, model.policy)   # captured on first use, cached after
    graph.start(cond)                                # copy cond in, reset the cache position
    logits = model.prefill(graph.cond, graph.inference_params)   # eager, overwrites the states
    graph.inference_params.advance(1)
    logits = graph.step(tokens); graph.inference_params.advance(1) ...

Reuse is safe because prefill rewrites every recurrent state from scratch and attention caches
mask every entry beyond the current position. Graphs live in a weak-key table per model and are
dropped when the model's parameters move (``.to()``, dtype change) or its ``position_offset``
changes, since both are baked into a captured graph. The model's
:class:`~aimkit.policy.ExecutionPolicy` (which kernels the step launches, the state dtype) is part
of the key: after ``gen.policy`` changes, the next run captures a new graph instead of replaying
one recorded under the old policy. :func:`clear_decode_graphs` frees them.

Only the decode step is captured; nothing here knows what kind of model it drives.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor, nn

from ..policy import ExecutionPolicy

__all__ = ["DecodeGraph", "get_decode_graph", "clear_decode_graphs"]

logger = logging.getLogger(__name__)

# model -> (fingerprint, {(rows, cache dtype, policy): DecodeGraph})
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, tuple[Hashable, dict[Hashable, DecodeGraph]]]
_GRAPHS = weakref.WeakKeyDictionary()


def _static_copy(cond: Any) -> Any:
    """A fresh buffer for every tensor of a (named) tuple of tensors, same type and layout."""
    if isinstance(cond, Tensor):
        return cond.clone()
    if isinstance(cond, tuple):
        items = [_static_copy(t) for t in cond]
        return type(cond)(*items) if hasattr(cond, "_fields") else tuple(items)
    raise TypeError(f"a decoding condition must be a tensor or a tuple of tensors, got {type(cond).__name__}")


def _first_tensor(cond: Any) -> Tensor:
    return cond if isinstance(cond, Tensor) else _first_tensor(cond[0])


def _copy_into(dst: Any, src: Any) -> None:
    if isinstance(dst, Tensor):
        dst.copy_(src)
        return
    for d, s in zip(dst, src):
        _copy_into(d, s)


class DecodeGraph:
    """A captured ``model.decode_step`` for one batch of ``rows`` sequences.

    Args:
        model: anything with ``allocate_inference_cache`` and ``decode_step``.
        cond: an example decoding condition (its shapes and dtypes are captured).
        rows: batch size of the decode step (2B under guidance).
        cache_dtype: dtype passed to ``allocate_inference_cache`` (None = the model's).
        num_warmup: eager steps run on a side stream before capture.

    Attributes:
        inference_params: the cache the graph reads and writes; reset by :meth:`start`.
        tokens: (rows,) int64 static input.
        cond: static copy of the condition; prefill must read this one.
        logits: (rows, V) static output, overwritten by each :meth:`step`.
        capture_seconds: wall time of warm-up plus capture.
    """

    def __init__(self, model, cond: Any, rows: int, cache_dtype: torch.dtype | None = None,
                 num_warmup: int = 2):
        start = time.perf_counter()
        self.inference_params = model.allocate_inference_cache(rows, dtype=cache_dtype)
        device = _first_tensor(cond).device
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.cond = _static_copy(cond)
        params = self.inference_params
        params.reset()
        params.advance(1)  # a valid decode position (first image token) for warm-up and capture
        torch.cuda.synchronize(device)
        main = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(num_warmup):
                model.decode_step(self.tokens, self.cond, params)
        main.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_step(self.tokens, self.cond, params)
        torch.cuda.synchronize(device)
        params.reset()
        self.capture_seconds = time.perf_counter() - start

    def start(self, cond: Any) -> None:
        """Begin a run: copy the run's condition into the static buffers, rewind the cache."""
        _copy_into(self.cond, cond)
        self.inference_params.reset()

    def step(self, tokens: Tensor) -> Tensor:
        """Replay one decode step for ``tokens`` (rows,); returns the static (rows, V) logits.

        The returned tensor is overwritten by the next call: consume it first."""
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


def _fingerprint(model: nn.Module) -> Hashable:
    """What a captured graph depends on besides shapes: tensor addresses and the position offset."""
    ptrs = tuple(t.data_ptr() for t in model.parameters()) + tuple(t.data_ptr() for t in model.buffers())
    return ptrs, getattr(model, "position_offset", None)


def get_decode_graph(
    model: nn.Module, cond: Any, rows: int, policy: ExecutionPolicy, cache_dtype: torch.dtype | None = None
) -> tuple[DecodeGraph, float]:
    """The cached graph for ``(model, rows, policy, cache_dtype)``, capturing it on first use.

    Args:
        model: the decoder (see :class:`DecodeGraph`).
        cond: the run's decoding condition (an example of its shapes on first use).
        rows: batch size of the decode step.
        policy: the model's execution policy now (``model.policy``): a graph captured under
            another policy is never replayed.
        cache_dtype: dtype passed to ``allocate_inference_cache`` (None = the model's).

    Returns:
        ``(graph, seconds)`` where ``seconds`` is the capture time spent in this call (0.0 on reuse).
    """
    fingerprint = _fingerprint(model)
    entry = _GRAPHS.get(model)
    if entry is None or entry[0] != fingerprint:
        entry = (fingerprint, {})
        _GRAPHS[model] = entry
    graphs = entry[1]
    key = (rows, cache_dtype, policy)
    if key in graphs:
        return graphs[key], 0.0
    graph = DecodeGraph(model, cond, rows, cache_dtype)
    graphs[key] = graph
    logger.info("captured a CUDA graph of the decode step for batch %d (cache dtype %s, policy %s) in %.2f s",
                rows, cache_dtype or "default", policy.describe(), graph.capture_seconds)
    return graph, graph.capture_seconds


def clear_decode_graphs(model: nn.Module | None = None) -> None:
    """Free the captured graphs (and their caches) of ``model``, or of every model."""
    if model is None:
        _GRAPHS.clear()
    else:
        _GRAPHS.pop(model, None)
