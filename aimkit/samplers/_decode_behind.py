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

Three rules keep the pipeline correct. The codes of a batch are checked once, on the sampling
stream, before the side stream takes them (the tokenizer's range check reads them back to the
host; per chunk on the side stream it would make the host wait for the decoding queued there).
Device tensors the side stream reads are recorded on it, so the allocator never hands them to
later work before the decoding is done, even when the consumer stops early. And what reaches the
caller is a pageable copy: the pinned staging buffers go back to PyTorch's pinned-memory cache
after each batch instead of accumulating over a long run. If sampling a batch fails (an error, or
Ctrl-C), the batch already decoded is still yielded before the error propagates, so that a caller
writing shards keeps it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["DECODE_CHUNK", "chunk_decoder", "decode_pixels", "outputs_in_order", "stack_outputs", "uint8_nhwc"]

DECODE_CHUNK = 64  # images decoded at once: bounds activation memory (about 6 GB in bf16 at 256 px)


def uint8_nhwc(images: Tensor) -> Tensor:
    """(B, C, H, W) float images in [-1, 1] -> (B, H, W, C) uint8 on the same device."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


def chunk_decoder(tokenizer, codes: Tensor) -> Callable[[Tensor], Tensor]:
    """A function decoding chunks of ``codes`` (B, N), its checks done now, once.

    A tokenizer with the :class:`~aimkit.tokenizers.base.Tokenizer` contract checks the codes here
    (``check_codes``, which reads their range back to the host) and decodes chunks with
    ``decode_checked``; any other module with a ``decode(codes)`` method is used as it is."""
    check, decode_checked = getattr(tokenizer, "check_codes", None), getattr(tokenizer, "decode_checked", None)
    if check is None or decode_checked is None:
        return tokenizer.decode
    grid = check(codes)
    return lambda chunk: decode_checked(chunk, grid)


def decode_pixels(model, codes: Tensor, output: str, decode: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """(B, N) codes -> what ``output`` sends to the host, on the model's device.

    ``"tokens"``: the codes; ``"tensor"``: (B, 3, H, W) float32 in [-1, 1]; ``"uint8"`` / ``"pil"``:
    (B, H, W, 3) uint8. Decoded in chunks of :data:`DECODE_CHUNK` images by ``decode``
    (:func:`chunk_decoder` of these codes; None makes it here)."""
    if output == "tokens":
        return codes
    if decode is None:
        decode = chunk_decoder(model.tokenizer, codes)
    parts = []
    with torch.inference_mode():
        for chunk in codes.split(DECODE_CHUNK):
            images = decode(chunk)
            parts.append(uint8_nhwc(images) if output in ("uint8", "pil") else images.float().clamp(-1, 1))
    return torch.cat(parts)  # outside inference mode: a normal tensor, which callers may modify in place


def _host_output(host: Tensor, output: str) -> Any:
    """The caller's output from a host tensor: a pageable copy when ``host`` is pinned (the pinned
    block then returns to PyTorch's cache for the next batch)."""
    if host.is_pinned():
        host = torch.empty(host.shape, dtype=host.dtype).copy_(host)
    if output in ("tokens", "tensor"):
        return host
    array = host.numpy()
    if output == "uint8":
        return array
    from PIL import Image

    return [Image.fromarray(a) for a in array]


class _Pending:
    """One batch's output on its way to the host: :meth:`result` waits for its copy and returns it."""

    def __init__(self, host: Tensor, event: torch.cuda.Event | None, output: str):
        self._host, self._event, self._output = host, event, output

    def wait(self) -> None:
        """Wait until the copy to the host is done (no-op off CUDA)."""
        if self._event is not None:
            self._event.synchronize()

    def result(self) -> Any:
        self.wait()
        return _host_output(self._host, self._output)


def _launch(model, codes: Tensor, output: str, stream: torch.cuda.Stream | None) -> _Pending:
    """Start converting ``codes``: on ``stream`` (CUDA, returns at once) or here (stream None)."""
    if stream is None:
        return _Pending(decode_pixels(model, codes, output).cpu(), None, output)
    # checked here, on the stream that wrote the codes (check_codes reads them back: a wait on that stream only)
    decode = None if output == "tokens" else chunk_decoder(model.tokenizer, codes)
    stream.wait_stream(torch.cuda.current_stream(codes.device))
    codes.record_stream(stream)  # not reused by later work on the sampling stream before the side stream is done
    with torch.cuda.stream(stream):
        out = decode_pixels(model, codes, output, decode)
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)  # out was allocated on this stream: freed after the copy
        event = torch.cuda.Event()
        event.record(stream)
    return _Pending(host, event, output)


def _hand_over(pending: _Pending, in_flight: _Pending | None) -> Iterator[Any]:
    """Yield ``pending``'s output. A Ctrl-C during the wait for it is raised after the yield; when
    the consumer stops at the yield, or on that Ctrl-C, the batch ``in_flight`` is waited for first."""
    try:
        out, interrupt = pending.result(), None
    except KeyboardInterrupt as exc:
        out, interrupt = pending.result(), exc
    try:
        yield out
    except GeneratorExit:  # the consumer stopped: let the copy in flight finish, then stop
        if in_flight is not None:
            in_flight.wait()
        raise
    if interrupt is not None:
        if in_flight is not None:
            in_flight.wait()
        raise interrupt


def outputs_in_order(model, codes_of_batches: Iterable[Tensor], output: str) -> Iterator[Any]:
    """Each batch's output, in order, from an iterable that samples the batches' (B, N) codes.

    On CUDA batch k is decoded on a side stream while the iterable samples batch k + 1; its
    output is yielded once batch k + 1's codes exist (the last one at the end). When sampling
    batch k + 1 (or starting its decoding) raises, batch k is yielded first, then the error
    propagates; a Ctrl-C while waiting for a batch's pixels is raised once that batch is yielded.
    When the consumer stops early, the batch in flight is waited for and dropped."""
    stream, pending = None, None
    batches = iter(codes_of_batches)
    while True:
        try:
            codes = next(batches, None)
            if codes is None:
                break
            if stream is None and codes.device.type == "cuda":
                stream = torch.cuda.Stream(codes.device)
            job = _launch(model, codes, output, stream)
        except BaseException:  # noqa: BLE001  (re-raised: Ctrl-C must not lose the batch already decoded)
            if pending is not None:
                done, pending = pending, None
                yield done.result()
            raise
        if pending is not None:
            yield from _hand_over(pending, job)
        pending = job
    if pending is not None:
        yield from _hand_over(pending, None)


def stack_outputs(parts: list, output: str) -> Any:
    """The outputs of several batches as one output of the same kind."""
    if output in ("tokens", "tensor"):
        return torch.cat(parts)
    if output == "uint8":
        return np.concatenate(parts)
    return [image for part in parts for image in part]
