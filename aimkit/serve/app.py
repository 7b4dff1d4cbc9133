"""The demo's work: form values checked with the library's own rules, one generation at a time.

:class:`DemoApp` knows nothing about HTTP: it turns the fields of a form into a checked
:class:`GridRequest` (any bad value raises one :class:`~aimkit.errors.ConfigError` naming it) and a
request into the bytes of a PNG grid. Generations of one model run one at a time behind a lock;
at most ``max_queue`` more wait for it, and a request beyond those is refused at once with
:class:`BusyError` instead of piling up threads and memory.
"""

from __future__ import annotations

import io
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..config import check_class_names
from ..errors import AimkitError, ConfigError, did_you_mean
from ..samplers.api import class_names_of

__all__ = ["FIELDS", "RANDOM_CLASS", "BusyError", "GridRequest", "GridResult", "DemoApp", "model_class_names"]

# form fields, named as the library's own arguments so that its error messages name them too
FIELDS = ("class", "cfg_scale", "temperature", "top_k", "top_p", "seed", "count")
RANDOM_CLASS = "random"  # the class field's value for "a random class per image, drawn from the seed"
_SETTINGS = {"cfg_scale": float, "temperature": float, "top_k": int, "top_p": float}  # check_sampling_args' order
_MAX_SEED = 2**63  # what torch.Generator.manual_seed takes
_UPSCALE_BELOW = 128  # images smaller than this are shown 2x (nearest neighbour), as `aimkit generate` does


class BusyError(AimkitError):
    """Every place in the queue is taken; the caller should try again later (HTTP 429)."""


@dataclass(frozen=True)
class GridRequest:
    """One checked request: what :meth:`DemoApp.render` samples.

    Attributes:
        labels: class ids, one per image (already repeated or drawn to the count).
        cfg_scale, temperature, top_k, top_p: sampling settings, checked by ``check_sampling_args``.
        seed: seed of the tokens (and of the random classes).
    """

    labels: tuple[int, ...]
    cfg_scale: float
    temperature: float
    top_k: int
    top_p: float
    seed: int


@dataclass(frozen=True)
class GridResult:
    """A rendered grid: the PNG bytes, the request it answers and the seconds it took."""

    png: bytes
    request: GridRequest
    seconds: float


def model_class_names(model) -> list[str] | None:
    """The model's class names (``config.class_names``) when it carries them, else None."""
    names = class_names_of(model)
    if not names or len(names) != model.num_classes:
        return None
    return [str(name) for name in names]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _one_value(fields: Mapping[str, Sequence[str]], key: str) -> str:
    values = fields.get(key) or [""]
    if len(values) > 1:
        raise ConfigError(f"{key} was given {len(values)} times; give it once")
    return values[0].strip()


def _number(text: str, key: str, kind: type) -> Any:
    try:
        return kind(text)
    except (ValueError, OverflowError):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{key} must be {what}, got {text[:40]!r}") from None


class DemoApp:
    """A model behind a form: checks form values, renders grids one at a time, bounds the queue.

    Args:
        model: a :class:`~aimkit.generator.Generator` with a tokenizer.
        name: what the page calls the model (default: its class name).
        max_queue: requests that may wait while one generates; one more gets :class:`BusyError`.
        max_count: the most images one request may ask for.
        class_names: names of the classes, index = class id; default: the model's
            ``config.class_names`` when it has them, else the ids as text.
        generate_fn: the sampling function, called as :func:`aimkit.samplers.generate`
            (tests pass a wrapper that blocks to fill the queue).
    """

    def __init__(
        self,
        model,
        *,
        name: str | None = None,
        max_queue: int = 4,
        max_count: int = 16,
        class_names: Sequence[str] | None = None,
        generate_fn: Callable[..., Any] | None = None,
    ) -> None:
        if not (_is_int(max_queue) and _is_int(max_count) and max_queue >= 0 and max_count >= 1):
            raise ConfigError(f"max_queue must be an integer >= 0 and max_count one >= 1, got {max_queue!r} "
                              f"and {max_count!r}")
        if getattr(model, "tokenizer", None) is None:
            raise ConfigError("the demo shows images, but this model has no tokenizer to decode its tokens; "
                              "build it with one")
        if generate_fn is None:
            from ..samplers import generate as generate_fn
        self.model = model
        self.name = name or type(model).__name__
        self.max_queue = max_queue
        self.max_count = max_count
        names = model_class_names(model) if class_names is None else [str(n) for n in class_names]
        if names is not None:
            check_class_names(names, model.num_classes)
        self.named_classes = names is not None  # real names (captions show them) or just the ids
        self.class_names = names if names is not None else [str(i) for i in range(model.num_classes)]
        self.defaults = model.config.pretty_sampling
        self._generate = generate_fn
        self._lock = threading.Lock()  # one generation at a time per model
        self._slots = threading.BoundedSemaphore(max_queue + 1)  # the running one + the waiting ones
        self._pending = 0
        self._count_lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Requests admitted and not finished: the one generating plus those waiting."""
        with self._count_lock:
            return self._pending

    # ----------------------------------------------------------------------------- checking a form
    def parse(self, fields: Mapping[str, Sequence[str]]) -> GridRequest:
        """Check the form fields (each a list of strings, as ``urllib.parse.parse_qs`` gives them).

        Blank fields take the model's ``pretty_sampling`` settings, one image, class ``random``
        and a fresh random seed.

        Raises:
            ConfigError: an unknown or repeated field, or a value the library refuses.
        """
        from ..samplers.api import check_sampling_args, resolve_labels

        for key in fields:
            if key not in FIELDS:
                raise ConfigError(f"unknown field {key!r}{did_you_mean(key, FIELDS)}")
        text = {key: _one_value(fields, key) for key in FIELDS}
        settings = check_sampling_args(*(
            getattr(self.defaults, key) if not text[key] else _number(text[key], key, kind)
            for key, kind in _SETTINGS.items()
        ))
        count = 1 if not text["count"] else _number(text["count"], "count", int)
        if not 1 <= count <= self.max_count:
            raise ConfigError(f"count must be an integer in [1, {self.max_count}], got {_shown(count)}")
        seed = secrets.randbelow(2**31) if not text["seed"] else _number(text["seed"], "seed", int)
        if not 0 <= seed < _MAX_SEED:
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {_shown(seed)}")
        label = self.class_id(text["class"])
        labels = resolve_labels(self.model, None if label is None else [label], count, seed)
        return GridRequest(tuple(labels.tolist()), *settings, seed=seed)

    def class_id(self, text: str) -> int | None:
        """A class given by name (ignoring case) or by id -> its id; blank, or ``random`` where no
        class has that name -> None.

        Raises:
            ConfigError: no class of that name, naming the closest ones.
        """
        if not text:
            return None
        folded = [name.strip().casefold() for name in self.class_names]
        if text.casefold() in folded:  # names are distinct ignoring case (checked in __init__)
            return folded.index(text.casefold())
        if text == RANDOM_CLASS:
            return None
        if text.isascii() and text.isdigit() and int(text) < len(self.class_names):
            return int(text)
        hint = did_you_mean(text, self.class_names) if self.named_classes else ""
        if not hint:
            few = self.named_classes and len(self.class_names) <= 40
            hint = (f"; choose one of {', '.join(self.class_names)}" if few
                    else f"; give a class name or an id in [0, {len(self.class_names)})")
        raise ConfigError(f"unknown class {text[:60]!r}{hint}")

    # ----------------------------------------------------------------------------- generating
    @contextmanager
    def _admitted(self):
        """A place in the queue, then the model: :class:`BusyError` when every place is taken."""
        if not self._slots.acquire(blocking=False):
            raise BusyError(
                f"busy: one grid is generating and {self.max_queue} more are waiting; try again shortly"
            )
        with self._count_lock:
            self._pending += 1
        try:
            with self._lock:
                yield
        finally:
            with self._count_lock:
                self._pending -= 1
            self._slots.release()

    def handle(self, fields: Mapping[str, Sequence[str]]) -> GridResult:
        """Check a form and render its grid, waiting for the model in the bounded queue.

        Raises:
            ConfigError: a bad form value (checked before queueing).
            BusyError: the queue is full.
        """
        request = self.parse(fields)
        with self._admitted():
            start = time.perf_counter()
            png = self.render(request)
            return GridResult(png, request, time.perf_counter() - start)

    def render(self, request: GridRequest) -> bytes:
        """Sample the request's images and return them as one captioned PNG grid (the caller holds
        the model: use :meth:`handle` from concurrent code)."""
        from PIL import Image

        from ..samplers.grid import make_grid

        images = self._generate(
            self.model,
            list(request.labels),
            cfg_scale=request.cfg_scale,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            seed=request.seed,
            output="uint8",
            batch_size=len(request.labels),
            progress=False,
            defaults="pretty",
        )
        if images.shape[1] < _UPSCALE_BELOW:  # small images: 2x so the grid and its captions are readable
            images = images.repeat(2, axis=1).repeat(2, axis=2)
        nrow = min(len(images), math.ceil(math.sqrt(len(images))))
        grid = make_grid(images, nrow=nrow, labels=list(request.labels),
                         class_names=self.class_names if self.named_classes else None)
        buffer = io.BytesIO()
        Image.fromarray(grid).save(buffer, format="PNG")
        return buffer.getvalue()
