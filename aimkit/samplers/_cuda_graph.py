"""CUDA-graph capture of a model's decode step, reused across decoding runs.

One :class:`DecodeGraph` holds, for one model and one batch size (rows of the possibly doubled
batch) and cache dtype: the model's inference cache, static input buffers (the token batch and a
copy of every tensor of the decoding condition), the captured graph and its static logits.
A run then goes::

    graph = get_decode_graph(model, cond, rows)      # captured on first use, cached after
    graph.start(cond)                                # copy cond in, reset the cache position
    logits = model.prefill(graph.cond, graph.inference_params)   # eager, overwrites the states
    graph.inference_params.advance(1)
    logits = graph.step(tokens); graph.inference_params.advance(1) ...

Reuse is safe because prefill rewrites every recurrent state from scratch and attention caches
mask every entry beyond the current position. Graphs live in a weak-key table per model and are
dropped when the model's parameters move (``.to()``, dtype change) or its ``position_offset``
changes, since both are baked into a captured graph. :func:`clear_decode_graphs` frees them.

With ``branches=k`` the graph holds k independent copies of the step, each over a contiguous
group of rows of the same cache and launched from its own stream, which the GPU overlaps (see
:class:`DecodeGraph`). Decoding conditions must therefore be tensors (or tuples of tensors) with
the batch as dimension 0.

Only the decode step is captured; nothing here knows what kind of model it drives.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any, Dict, Hashable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..backbones.base import InferenceParams

__all__ = ["DecodeGraph", "branch_bounds", "get_decode_graph", "clear_decode_graphs"]

logger = logging.getLogger(__name__)

# model -> (fingerprint, {(rows, cache dtype): DecodeGraph})
_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, Tuple[Hashable, Dict[Hashable, DecodeGraph]]]"
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


def _rows_of(cond: Any, start: int, stop: int) -> Any:
    """Views of rows ``[start, stop)`` of every tensor of a condition (batch is dim 0 of each)."""
    if isinstance(cond, Tensor):
        return cond[start:stop]
    items = [_rows_of(t, start, stop) for t in cond]
    return type(cond)(*items) if hasattr(cond, "_fields") else tuple(items)


def _cache_rows(params: InferenceParams, start: int, stop: int) -> InferenceParams:
    """An InferenceParams over rows ``[start, stop)`` of ``params``' cache (views, shared position)."""
    return InferenceParams(
        max_seqlen=params.max_seqlen,
        max_batch_size=stop - start,
        seqlen_offset=params.seqlen_offset,
        key_value_memory_dict={i: tuple(t[start:stop] for t in ts) for i, ts in params.key_value_memory_dict.items()},
        position=params.position,
    )


def branch_bounds(rows: int, branches: int) -> List[Tuple[int, int]]:
    """Split ``rows`` into ``branches`` contiguous, near-equal ``(start, stop)`` ranges."""
    if branches < 1 or branches > rows:
        raise ValueError(f"cannot split {rows} rows into {branches} branches")
    sizes = [rows // branches + (i < rows % branches) for i in range(branches)]
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


class DecodeGraph:
    """A captured ``model.decode_step`` for one batch of ``rows`` sequences.

    With ``branches > 1`` the rows are split into that many groups whose decode steps are
    captured on separate streams, so the graph holds independent branches that the GPU runs
    concurrently: one group's bandwidth-bound state update overlaps another's small, latency-bound
    kernels (projections, convolution, norms). Every group reads and writes its rows of one shared
    cache (views), so prefill and the caller see a single ``rows``-sized cache either way; the cost
    is that each group reads the weights once per step.

    Args:
        model: anything with ``allocate_inference_cache`` and ``decode_step``; every tensor of
            its decoding condition must have the batch as dimension 0.
        cond: an example decoding condition (its shapes and dtypes are captured).
        rows: batch size of the decode step (2B under guidance).
        cache_dtype: dtype passed to ``allocate_inference_cache`` (None = the model's).
        num_warmup: eager steps run on a side stream before capture.
        branches: concurrent row groups (1 = the plain sequential step).

    Attributes:
        inference_params: the cache the graph reads and writes; reset by :meth:`start`.
        tokens: (rows,) int64 static input.
        cond: static copy of the condition; prefill must read this one.
        logits: (rows, V) static output, overwritten by each :meth:`step`.
        capture_seconds: wall time of warm-up plus capture.
    """

    def __init__(self, model, cond: Any, rows: int, cache_dtype: Optional[torch.dtype] = None,
                 num_warmup: int = 2, branches: int = 1):
        start = time.perf_counter()
        self.branches = branches
        self.inference_params = model.allocate_inference_cache(rows, dtype=cache_dtype)
        device = _first_tensor(cond).device
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.cond = _static_copy(cond)
        params = self.inference_params
        params.reset()
        params.advance(1)  # a valid decode position (first image token) for warm-up and capture
        if branches == 1:
            parts = [(0, rows, self.cond, params)]
        else:
            parts = [(a, b, _rows_of(self.cond, a, b), _cache_rows(params, a, b)) for a, b in branch_bounds(rows, branches)]

        def step_all(streams):
            outs = []
            for (a, b, part_cond, part_params), stream in zip(parts, streams):
                with torch.cuda.stream(stream):
                    outs.append(model.decode_step(self.tokens[a:b], part_cond, part_params))
            return outs

        torch.cuda.synchronize(device)
        main = torch.cuda.current_stream(device)
        side = [torch.cuda.Stream(device) for _ in parts]
        for s in side:
            s.wait_stream(main)
        for _ in range(num_warmup):
            step_all(side)
        for s in side:
            main.wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            if branches == 1:
                self.logits = model.decode_step(self.tokens, parts[0][2], parts[0][3])
            else:
                capture = torch.cuda.current_stream(device)
                for s in side:
                    s.wait_stream(capture)  # fork
                outs = step_all(side)
                for s in side:
                    capture.wait_stream(s)  # join
                self.logits = torch.cat(outs)  # (rows, V)
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
    model: nn.Module, cond: Any, rows: int, cache_dtype: Optional[torch.dtype] = None, branches: int = 1
) -> Tuple[DecodeGraph, float]:
    """The cached graph for ``(model, rows, cache_dtype, branches)``, capturing it on first use.

    Returns:
        ``(graph, seconds)`` where ``seconds`` is the capture time spent in this call (0.0 on reuse).
    """
    fingerprint = _fingerprint(model)
    entry = _GRAPHS.get(model)
    if entry is None or entry[0] != fingerprint:
        entry = (fingerprint, {})
        _GRAPHS[model] = entry
    graphs = entry[1]
    key = (rows, cache_dtype, branches)
    if key in graphs:
        return graphs[key], 0.0
    graph = DecodeGraph(model, cond, rows, cache_dtype, branches=branches)
    graphs[key] = graph
    logger.info(
        "captured a CUDA graph of the decode step for batch %d (cache dtype %s, %d branches) in %.2f s",
        rows,
        cache_dtype or "default",
        branches,
        graph.capture_seconds,
    )
    return graph, graph.capture_seconds


def clear_decode_graphs(model: Optional[nn.Module] = None) -> None:
    """Free the captured graphs (and their caches) of ``model``, or of every model."""
    if model is None:
        _GRAPHS.clear()
    else:
        _GRAPHS.pop(model, None)
