"""``generate``: class labels in, images (or tokens) out, in batches with a progress bar by token step.

Example::

    model = aimkit.build("aim-b", pretrained=True, device="cuda")
    images = model.generate([207, 360, 387], seed=0, output="pil")  # or samplers.generate(model, ...)

Unspecified sampling settings come from the model's preset: ``model.config.fid_sampling``
(``defaults="fid"``, what FID numbers are measured with) or ``model.config.pretty_sampling``
(``defaults="pretty"``, for pictures people look at).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, did_you_mean
from ..registry import SAMPLERS
from ._decode_behind import outputs_in_order, stack_outputs, uint8_nhwc
from .logits import check_sampling_args
from .schedules import get_schedule

__all__ = ["OUTPUTS", "MAX_IMAGES", "class_id", "class_names_of", "generate", "generate_batches", "progress_bar",
           "resolve_labels", "to_uint8", "to_pil"]

OUTPUTS = ("tokens", "tensor", "uint8", "pil")
# generate() returns every image in memory; more than this many images in one call is refused up
# front (before any allocation). Larger runs belong to aimkit.eval.fid_sampling.sample_to_shards /
# `aimkit sample`, which write shards to disk.
MAX_IMAGES = 10_000_000
_LABEL_SEED_SALT = 0x5DEECE66D  # labels are drawn from a generator seeded apart from the tokens'
_SIGNED_OR_BYTE = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _bad_labels(labels: Any) -> ConfigError:
    text = repr(labels)
    text = text if len(text) <= 80 else text[:77] + "..."
    return ConfigError(f"labels must be a non-empty 1-D list or tensor of integer class ids or class names, got {text}")


def _out_of_range(worst: int, num_classes: int) -> ConfigError:
    return ConfigError(f"label {worst} is outside [0, {num_classes}): the model has {num_classes} classes")


def class_names_of(model) -> tuple[str, ...] | None:
    """The class names of a generator or a config (``config.class_names``), or None."""
    return getattr(getattr(model, "config", model), "class_names", None)


@functools.lru_cache(maxsize=8)
def _name_table(names: tuple[str, ...]) -> dict[str, int]:
    return {name.strip().lower(): i for i, name in enumerate(names)}


def class_id(name: str, names: Sequence[str] | None) -> int:
    """The class id of ``name`` (exact match ignoring case and surrounding spaces).

    Raises:
        ConfigError: the model has no class names, or none matches (with the closest names).
    """
    if not names:
        raise ConfigError(f"label {name!r} is a class name, but this model has no class names; "
                          "give class ids (integers) instead")
    table = _name_table(tuple(names))
    key = name.strip().lower()
    if key in table:
        return table[key]
    hint = " (a class id is given as an integer, not a string)" if key.lstrip("-").isdigit() else ""
    raise ConfigError(f"unknown class name {name!r}{hint}{did_you_mean(key, table, cutoff=0.6)}")


def _label_value(value: Any, names: Sequence[str] | None, labels: Any) -> int:
    if _is_scalar_array(value):  # an element of list(tensor): one id (or name), checked below
        value = value.item()
    if isinstance(value, str):
        return class_id(value, names)
    if not _is_int(value):
        raise _bad_labels(labels)
    return int(value)


def _is_scalar_array(value: Any) -> bool:
    """A 0-d tensor or numpy array (``labels[0]``, ``np.array(3)``): one label, like an int."""
    return (torch.is_tensor(value) or isinstance(value, np.ndarray)) and value.ndim == 0


def _labels_from_items(labels: Any, num_classes: int, names: Sequence[str] | None = None) -> Tensor:
    """A list-like of Python / numpy ints or class names -> (n,) int64, range-checked before any
    conversion."""
    if isinstance(labels, str):
        labels = [labels]  # one class name
    if isinstance(labels, (Mapping, Set, bytes, bytearray)):  # keys, no order, characters
        raise _bad_labels(labels)
    try:
        items = list(labels)
    except TypeError:
        raise _bad_labels(labels) from None
    if not items:
        raise _bad_labels(labels)
    values = [_label_value(v, names, labels) for v in items]
    for v in values:  # before torch.tensor, which overflows on ints beyond int64
        if not 0 <= v < num_classes:
            raise _out_of_range(v, num_classes)
    return torch.tensor(values, dtype=torch.long)


def _check_count(count: int) -> None:
    if count > MAX_IMAGES:
        raise ConfigError(
            f"{count} images in one generate call is more than the {MAX_IMAGES} it holds in memory; "
            "use `aimkit sample` (aimkit.eval.fid_sampling.sample_to_shards), which writes shards to disk"
        )


def resolve_labels(
    model, labels: Any = None, num_images: int | None = None, seed: int | None = None
) -> Tensor:
    """The (n,) int64 CPU label tensor :func:`generate` samples for.

    Args:
        model: gives ``num_classes`` and ``config.class_names`` (a config works too).
        labels: an int (a 0-d integer tensor or array too), a class name, a sequence / array /
            tensor of ints in ``[0, num_classes)``
            or of class names (``config.class_names``, matched ignoring case; ints and names may
            mix), or None for ``num_images`` uniformly random labels (drawn from ``seed`` when
            given). Mappings and sets are refused.
        num_images: with labels given, repeat them cyclically to this many images (not fewer
            than the labels); at most :data:`MAX_IMAGES`.
        seed: seed of the random labels.

    Raises:
        ConfigError: bad labels or count.
    """
    if num_images is not None and (not _is_int(num_images) or num_images <= 0):
        raise ConfigError(f"num_images must be a positive integer, got {num_images!r}")
    if num_images is not None:
        num_images = int(num_images)
        _check_count(num_images)
    seed = _check_seed(seed)
    num_classes = model.num_classes
    if labels is None:
        if num_images is None:
            raise ConfigError("pass labels, num_images, or both")
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed((seed ^ _LABEL_SEED_SALT) % 2**63)
        return torch.randint(0, num_classes, (num_images,), generator=gen)
    out = _given_labels(labels, num_classes, class_names_of(model))
    _check_count(out.numel())
    if num_images is not None and num_images < out.numel():  # dropping labels silently would lose images
        raise ConfigError(f"num_images={num_images} is fewer than the {out.numel()} labels given; pass fewer "
                          "labels or a num_images of at least their count (labels repeat to fill it)")
    if num_images is not None:
        out = out[torch.arange(num_images) % out.numel()]
    return out


def _given_labels(labels: Any, num_classes: int, names: Sequence[str] | None) -> Tensor:
    """Caller-given labels (int, name, sequence, array or tensor) as a checked (n,) int64 CPU tensor."""
    if _is_int(labels):
        labels = [labels]
    if _is_scalar_array(labels):  # one label; its dtype is checked as a 1-D one's
        labels = labels.reshape(1)
    if torch.is_tensor(labels) and labels.dtype not in _SIGNED_OR_BYTE:  # uint16..uint64: no min/max kernels
        if labels.dim() != 1 or not _integer_dtype(labels.dtype):
            raise _bad_labels(labels)
        labels = labels.detach().cpu().numpy()
    if not torch.is_tensor(labels):
        return _labels_from_items(labels, num_classes, names)
    if labels.dim() != 1 or labels.numel() == 0 or not _integer_dtype(labels.dtype):
        raise _bad_labels(labels)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise _out_of_range(lo if lo < 0 else hi, num_classes)
    return labels.detach().cpu().long()


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) float images in [-1, 1] -> (B, H, W, 3) uint8 numpy array."""
    return uint8_nhwc(images).cpu().numpy()


def to_pil(images: Tensor) -> list[Any]:
    """(B, 3, H, W) float images in [-1, 1] -> list of RGB ``PIL.Image``."""
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8(images)]


def _resolve_sampler(model, sampler):
    if sampler is None:
        spec = model.config.sampler
        cls = SAMPLERS.get(spec.name)
        return cls() if spec.config is None else cls(config=spec.config)
    if isinstance(sampler, str):
        return SAMPLERS.get(sampler)()
    if isinstance(sampler, type) or not callable(getattr(sampler, "sample_tokens", None)):
        raise ConfigError(f"sampler must be a registered name or an object with sample_tokens() (an instance, "
                          f"not a class), got {sampler!r}")
    return sampler


def _device_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def generate(
    model,
    labels: Any = None,
    *,
    num_images: int | None = None,
    cfg_scale: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    output: str = "tensor",
    batch_size: int = 64,
    schedule: str | Callable[[int, int, float], float] = "constant",
    progress: Any = None,
    defaults: str = "fid",
    sampler: Any = None,
):
    """Generate images of the given classes.

    Args:
        model: a :class:`~aimkit.generator.Generator`.
        labels: class ids in ``[0, num_classes)`` (int, list, array or tensor) or class names
            (``model.config.class_names``, e.g. ``["golden retriever"]``, ignoring case), or None
            for ``num_images`` random classes.
        num_images: number of images; with ``labels`` the labels repeat cyclically to this count
            (at least one image per label).
        cfg_scale: classifier-free guidance scale (1 = no guidance, half the compute).
        temperature: softmax temperature (0 = greedy).
        top_k: keep the k most likely tokens at each step (0 = all).
        top_p: nucleus mass in (0, 1] (1 = all).
        seed: makes the call reproducible: the same call returns the same images, another seed
            different ones. Tokens are drawn from one ``torch.Generator`` on the model's device
            that runs through every batch, so an image depends on ``batch_size`` and on its place
            in the call as well as on the seed. None uses torch's global random state.
        output: ``"tokens"`` (B, N) int64 codes, no decoding; ``"tensor"`` (B, 3, H, W) float32
            in [-1, 1]; ``"uint8"`` (B, H, W, 3) numpy array; ``"pil"`` list of PIL images.
            Tensors are returned on the CPU.
        batch_size: images sampled together (the decoding batch is twice this under guidance).
        schedule: guidance schedule, ``"constant"``, ``"linear"`` or a callable, see
            :mod:`aimkit.samplers.schedules`.
        progress: a tqdm bar on stderr in images, advanced at every token step (rate and ETA):
            True / False, or None to show it when stderr is a terminal, else once the work has run
            5 s; or an open bar counting images (:func:`progress_bar`), advanced and left open.
        defaults: ``"fid"`` or ``"pretty"``: which preset sampling settings fill the arguments
            left as None.
        sampler: a sampler object or registered sampler name; None uses ``model.config.sampler``.

    Returns:
        The images (or tokens) in the format chosen by ``output``, in label order.

    Raises:
        ConfigError: an argument is out of range, or pixels are requested from a model without
            a tokenizer.
    """
    _check_call(model, output, defaults)
    if not _is_int(batch_size) or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size, seed = int(batch_size), _check_seed(seed)  # numpy integers become Python ints
    settings = _settings(model, defaults, cfg_scale, temperature, top_k, top_p, schedule)
    labels = resolve_labels(model, labels, num_images, seed)
    generator = _device_generator(seed, model.device)  # one random stream through every batch
    batches = [(batch, generator) for batch in labels.split(batch_size)]
    parts = _sample_batches(model, _resolve_sampler(model, sampler), batches, output, progress, settings)
    return stack_outputs(list(parts), output)


def generate_batches(
    model,
    batches: Sequence[tuple[Any, int | None]],
    *,
    cfg_scale: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    output: str = "tensor",
    schedule: str | Callable[[int, int, float], float] = "constant",
    progress: Any = None,
    defaults: str = "fid",
    sampler: Any = None,
) -> Iterator[Any]:
    """Generate several batches, each with its own labels and seed; yield each batch's output in order.

    Batch ``(labels, seed)`` gives what ``generate(labels, seed=seed, batch_size=len(labels), ...)``
    gives. On CUDA the decoding of batch k (a side stream) runs while batch k + 1 is sampled, so
    pixels cost little beyond the sampling itself; batch k is yielded once batch k + 1's tokens
    exist. ``aimkit sample`` writes its shards from this stream.

    Args:
        model: a :class:`~aimkit.generator.Generator`.
        batches: ``(labels, seed)`` pairs: labels as :func:`generate` takes them (ids or class
            names, not None), seed an integer in ``[0, 2**63)`` or None.
        cfg_scale, temperature, top_k, top_p, output, schedule, defaults, sampler: as for
            :func:`generate`, the same for every batch.
        progress: as for :func:`generate`, over the images of every batch.

    Returns:
        An iterator of the batches' outputs. Arguments and every batch's labels are checked
        before the first batch is sampled.
    """
    _check_call(model, output, defaults)
    settings = _settings(model, defaults, cfg_scale, temperature, top_k, top_p, schedule)
    plan = []
    for item in batches:
        if not isinstance(item, tuple) or len(item) != 2:
            raise ConfigError(f"batches must hold (labels, seed) pairs, got {item!r}")
        labels, seed = item
        if labels is None:
            raise ConfigError("every batch needs its labels (class ids or names), got None")
        seed = _check_seed(seed)
        plan.append((resolve_labels(model, labels), _device_generator(seed, model.device)))
    return _sample_batches(model, _resolve_sampler(model, sampler), plan, output, progress, settings)


def _check_call(model, output: str, defaults: str) -> None:
    """The argument checks of :func:`generate` that do not depend on the sampling settings."""
    if output not in OUTPUTS:
        raise ConfigError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    if defaults not in ("fid", "pretty"):
        raise ConfigError(f"defaults must be 'fid' or 'pretty', got {defaults!r}")
    if output != "tokens" and getattr(model, "tokenizer", None) is None:
        raise ConfigError(
            f"output={output!r} needs a tokenizer to decode pixels but this model has none; "
            "build it with a tokenizer or use output='tokens'"
        )


def _check_seed(seed: Any) -> int | None:
    """``seed`` as a Python int (numpy integers too), or None."""
    if seed is None:
        return None
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")
    return int(seed)


def _settings(model, defaults: str, cfg_scale, temperature, top_k, top_p, schedule) -> dict:
    """The sampler's keyword arguments: the given settings, the preset's for those left None."""
    preset = model.config.fid_sampling if defaults == "fid" else model.config.pretty_sampling
    cfg_scale, temperature, top_k, top_p = check_sampling_args(
        preset.cfg_scale if cfg_scale is None else cfg_scale,
        preset.temperature if temperature is None else temperature,
        preset.top_k if top_k is None else top_k,
        preset.top_p if top_p is None else top_p,
    )
    return dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                schedule=get_schedule(schedule))


def _sample_batches(model, sampler, batches: list[tuple[Tensor, torch.Generator | None]], output: str,
                    progress: Any, settings: dict) -> Iterator[Any]:
    """Each batch's output in order, one image bar advanced by token steps; the decoding of a
    batch overlaps the sampling of the next (:func:`~._decode_behind.outputs_in_order`)."""
    extra_args = {}
    with _bar_for(progress, sum(labels.numel() for labels, _ in batches), "generating") as bar:
        steps = _TokenSteps(bar)
        if _accepts_on_step(sampler):
            extra_args["on_step"] = steps

        def codes_of_batches():
            for labels, generator in batches:
                steps.start(labels.numel())
                codes = sampler.sample_tokens(model, labels, **settings, generator=generator, **extra_args)
                steps.finish()
                yield codes

        yield from outputs_in_order(model, codes_of_batches(), output)


# ---------------------------------------------------------------------------------------- progress
_LONG_WORK_SECONDS = 5.0  # stderr not a terminal, progress=None: a bar appears once the work runs this long
_LOG_REFRESH_SECONDS = 10.0  # stderr not a terminal (a log file): the bar is redrawn at most this often
_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_img}/{total_fmt} img [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def _count_text(n: float | None) -> str:
    """An image count with fractional progress: ``12.5``, or ``64`` when whole."""
    if n is None:
        return ""
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.1f}"


@functools.lru_cache(maxsize=1)
def _image_bar_class():
    from tqdm.auto import tqdm

    class ImageBar(tqdm):
        """A tqdm bar over images that advances by fractions of a batch (one token step at a time)."""

        @property
        def format_dict(self):
            values = super().format_dict
            values["n_img"] = _count_text(values.get("n"))
            return values

    return ImageBar


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(total: int, desc: str, show: bool | None = None, **kwargs: Any):
    """A tqdm bar on stderr counting ``total`` images, with rate and ETA.

    Args:
        total: images the work makes.
        desc: the bar's label.
        show: True / False; None shows it when stderr is a terminal, else only once the work has run
            for 5 s. Off a terminal (a log file) it is redrawn at most every 10 s.
        **kwargs: further tqdm arguments (``disable`` wins over ``show``).
    """
    terminal = _stderr_is_terminal()
    options: dict[str, Any] = {} if terminal else {"mininterval": _LOG_REFRESH_SECONDS}
    if show is None and not terminal:
        options["delay"] = _LONG_WORK_SECONDS
    options.update(kwargs)
    options.setdefault("disable", show is False or total <= 0)
    return _image_bar_class()(total=total, desc=desc, unit="img", bar_format=_BAR_FORMAT, file=sys.stderr,
                              dynamic_ncols=True, **options)


@contextlib.contextmanager
def _bar_for(progress: Any, total: int, desc: str):
    """``progress`` itself when it is a bar (advanced, not closed), else a new :func:`progress_bar`."""
    if callable(getattr(progress, "update", None)):
        yield progress
        return
    with progress_bar(total, desc, None if progress is None else bool(progress)) as bar:
        yield bar


def _accepts_on_step(sampler) -> bool:
    try:
        params = inspect.signature(sampler.sample_tokens).parameters
    except (TypeError, ValueError):
        return False
    return "on_step" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class _TokenSteps:
    """The sampler's ``on_step`` callback: moves an image bar by ``batch / num_tokens`` per token step.

    Reads nothing from the device (the sampler passes Python ints), so it costs no synchronisation.
    """

    def __init__(self, bar):
        self._bar, self._base, self._size = bar, 0.0, 0

    def start(self, size: int) -> None:
        self._base, self._size = float(self._bar.n or 0), size

    def __call__(self, step: int, num_steps: int) -> None:
        self._to(self._base + self._size * (step + 1) / num_steps)

    def finish(self) -> None:
        self._to(self._base + self._size)

    def _to(self, target: float) -> None:
        if self._bar.disable or target <= self._bar.n:
            return
        self._bar.update(target - self._bar.n)
        self._bar.n = target  # exact: whole batches end on whole image counts
