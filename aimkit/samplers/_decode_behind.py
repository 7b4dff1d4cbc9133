"""Codes to the output ``generate`` returns, decoded while the next batch is sampled.

``generate`` samples a batch's tokens, then turns them into its output (``"tokens"``, ``"tensor"``,
``"uint8"`` or ``"pil"``). On CUDA :func:`outputs_in_order` does the second part behind the first:
batch k's codes are decoded by the tokenizer on a side stream, converted there to what goes to
the host (uint8 NHWC pixels for ``"uint8"`` / ``"pil"``, a quarter of float32's bytes; float32
NCHW for ``"tensor"``) and copied into pinned host memory, while the host goes on to launch the
sampling of batch k + 1. The decoder's convolutions then run beside the memory-bound decode
steps instead of after them, and the host never waits for pixels it does not need yet.

On other devices each batch is converted as soon as its codes exist (there is no stream to hide
the work on). The pixels are the same either way: the conversion is the same sequence of
element-wise operations on the same device.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["DECODE_CHUNK", "decode_pixels", "outputs_in_order", "stack_outputs", "uint8_nhwc"]

DECODE_CHUNK = 64  # images decoded at once: bounds activation memory (about 6 GB in bf16 at 256 px)


def uint8_nhwc(images: Tensor) -> Tensor:
    """(B, C, H, W) float images in [-1, 1] -> (B, H, W, C) uint8 on the same device."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


def decode_pixels(model, codes: Tensor, output: str) -> Tensor:
    """(B, N) codes -> what ``output`` sends to the host, on the model's device.

    ``"tokens"``: the codes; ``"tensor"``: (B, 3, H, W) float32 in [-1, 1]; ``"uint8"`` / ``"pil"``:
    (B, H, W, 3) uint8. Decoded in chunks of :data:`DECODE_CHUNK` images."""
    if output == "tokens":
        return codes
    parts = []
    with torch.inference_mode():
        for chunk in codes.split(DECODE_CHUNK):
            images = model.tokenizer.decode(chunk)
            parts.append(uint8_nhwc(images) if output in ("uint8", "pil") else images.float().clamp(-1, 1))
    return torch.cat(parts)  # outside inference mode: a normal tensor, which callers may modify in place


def _host_output(host: Tensor, output: str) -> Any:
    if output in ("tokens", "tensor"):
        return host
    array = host.numpy()
    if output == "uint8":
        return array
    from PIL import Image

    return [Image.fromarray(a) for a in array]


class _Pending:
    """One batch's output on its way to the host: :meth:`result` waits for its copy and returns it."""

    def __init__(self, host: Tensor, event: torch.cuda.Event | None, keep: tuple, output: str):
        self._host, self._event, self._keep, self._output = host, event, keep, output

    def result(self) -> Any:
        if self._event is not None:
            self._event.synchronize()
        self._keep = ()  # the device tensors the copy read may be freed now
        return _host_output(self._host, self._output)


def _launch(model, codes: Tensor, output: str, stream: torch.cuda.Stream | None) -> _Pending:
    """Start converting ``codes``: on ``stream`` (CUDA, returns at once) or here (stream None)."""
    if stream is None:
        return _Pending(decode_pixels(model, codes, output).cpu(), None, (), output)
    stream.wait_stream(torch.cuda.current_stream(codes.device))  # the codes are written on the sampling stream
    with torch.cuda.stream(stream):
        out = decode_pixels(model, codes, output)
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    # codes and out stay referenced until the copy is done: the sampling stream must not reuse them
    return _Pending(host, event, (codes, out), output)


def outputs_in_order(model, codes_of_batches: Iterable[Tensor], output: str) -> Iterator[Any]:
    """Each batch's output, in order, from an iterable that samples the batches' (B, N) codes.

    On CUDA batch k is decoded on a side stream while the iterable samples batch k + 1; its
    output is yielded once batch k + 1's codes exist (the last one at the end)."""
    stream, pending = None, None
    for codes in codes_of_batches:
        if stream is None and codes.device.type == "cuda":
            stream = torch.cuda.Stream(codes.device)
        job = _launch(model, codes, output, stream)
        if pending is not None:
            yield pending.result()
        pending = job
    if pending is not None:
        yield pending.result()


def stack_outputs(parts: list, output: str) -> Any:
    """The outputs of several batches as one output of the same kind."""
    if output in ("tokens", "tensor"):
        return torch.cat(parts)
    if output == "uint8":
        return np.concatenate(parts)
    return [image for part in parts for image in part]
