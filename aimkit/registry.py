"""Registries of swappable components.

Each component kind has one :class:`Registry`. Components register themselves with a decorator
next to their definition::

    @BACKBONES.register("mamba2")
    class Mamba2Backbone(...): ...

Names are lower-case words joined by hyphens (``vq-f16``, ``adaln-group``, ``aim-xl``). A lookup
of an unknown name raises :class:`~aimkit.errors.UnknownNameError` naming the closest known names;
registering a taken name raises :class:`~aimkit.errors.DuplicateNameError`.

Third-party packages add components through the entry-point group ``aimkit.plugins``: each entry
point names a module (or a callable) that is imported (or called) the first time any registry is
searched, and which registers its components with these same decorators.
"""

from __future__ import annotations

import fnmatch
import re
import threading
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any, TypeVar

from .errors import DuplicateNameError, UnknownNameError, did_you_mean

__all__ = [
    "Registry",
    "TOKENIZERS",
    "BACKBONES",
    "CONDITIONING",
    "SAMPLERS",
    "GENERATORS",
    "ENTRY_POINT_GROUP",
    "load_plugins",
    "list_models",
]

ENTRY_POINT_GROUP = "aimkit.plugins"
_NAME_RE = re.compile(r"^[a-z0-9]+(?:[-.][a-z0-9]+)*$")
T = TypeVar("T")

_plugins_lock = threading.RLock()  # re-entrant: a plugin may look names up while loading
_plugins_loaded = False
_plugin_errors: dict[str, str] = {}


def load_plugins(force: bool = False) -> dict[str, str]:
    """Import every ``aimkit.plugins`` entry point once.

    Returns a mapping of entry-point names that failed to load to the error text; failures are
    reported (in unknown-name errors) but never stop aimkit itself from working.
    """
    global _plugins_loaded
    with _plugins_lock:
        if _plugins_loaded and not force:
            return dict(_plugin_errors)
        _plugins_loaded = True  # set first: a plugin may itself look names up
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
                if callable(obj) and not isinstance(obj, type):
                    obj()
            except Exception as exc:  # a broken plugin must not break aimkit
                _plugin_errors[ep.name] = f"{type(exc).__name__}: {exc}"
        return dict(_plugin_errors)


class Registry:
    """A name → object table for one kind of component.

    Args:
        kind: what is registered, used in messages (``"backbone"``).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None) -> Callable[[T], T]:
        """Register ``obj`` under ``name``; usable as ``@REG.register("name")`` or directly."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(
                f"{self.kind} name {name!r} is not valid: use lower-case words, digits and hyphens"
            )

        def _add(target: T) -> T:
            if name in self._entries:
                raise DuplicateNameError(
                    f"{self.kind} {name!r} is already registered (by {_describe(self._entries[name])}); "
                    "choose another name"
                )
            self._entries[name] = target
            return target

        return _add(obj) if obj is not None else _add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests and interactive sessions)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> Any:
        """Return the object registered as ``name`` or raise with the closest known names."""
        try:
            if name not in self._entries:
                load_plugins()
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            pass
        known = sorted(self._entries)
        hint = did_you_mean(name.lower() if isinstance(name, str) else name, known, cutoff=0.4)  # names are lower-case
        listing = ", ".join(known) if known else "none"
        broken = f" (plugins that failed to load: {', '.join(_plugin_errors)})" if _plugin_errors else ""
        raise UnknownNameError(f"unknown {self.kind} {name!r}{hint} Known {self.kind}s: {listing}{broken}")

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted registered names, optionally filtered by an fnmatch ``pattern`` (``"aim-*"``)."""
        load_plugins()
        names = sorted(self._entries)
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def _describe(obj: Any) -> str:
    mod = getattr(obj, "__module__", "?")
    return f"{mod}.{getattr(obj, '__qualname__', type(obj).__name__)}"


TOKENIZERS = Registry("tokenizer")
BACKBONES = Registry("backbone")
CONDITIONING = Registry("conditioning")
SAMPLERS = Registry("sampler")
GENERATORS = Registry("generator")


def list_models(pattern: str | None = None) -> list[str]:
    """Names of the generator presets, e.g. ``list_models("aim-*")``."""
    return GENERATORS.names(pattern)
