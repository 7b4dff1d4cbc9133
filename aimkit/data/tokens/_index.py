"""``index.json`` of a token directory: its schema, checked reading and atomic writing.

The fields are listed in :mod:`aimkit.data.tokens`. :func:`read_index` type-checks every entry,
so a damaged index fails with one line naming the first wrong entry.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..._io import read_json, write_text_atomic
from ...errors import ConfigError

INDEX_NAME = "index.json"
FORMAT_VERSION = 1

PathLike = str | os.PathLike


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-00000.safetensors``."""
    return f"shard-{index:05d}.safetensors"


def write_index(path: Path, data: Mapping[str, Any]) -> None:
    """Write an index atomically (temporary file + rename)."""
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def is_int(x: Any) -> bool:
    """True for an int that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


_INDEX_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "tokenizer": ("a string", lambda x: isinstance(x, str)),
    "codebook_size": ("a positive integer", lambda x: is_int(x) and x > 0),
    "image_size": ("a positive integer", lambda x: is_int(x) and x > 0),
    "grid_size": ("a positive integer", lambda x: is_int(x) and x > 0),
    "num_tokens": ("a positive integer", lambda x: is_int(x) and x > 0),
    "variants": ("a non-empty list of names",
                 lambda x: isinstance(x, list) and bool(x) and all(isinstance(v, str) for v in x)),
    "classes": ("a list of names", lambda x: isinstance(x, list) and all(isinstance(v, str) for v in x)),
    "shard_size": ("a positive integer", lambda x: is_int(x) and x > 0),
    "shards": ("a list", lambda x: isinstance(x, list)),
    "complete": ("true or false", lambda x: isinstance(x, bool)),
}
_SHARD_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "file": ("a file name", lambda x: isinstance(x, str) and x != ""),
    "start": ("an integer >= 0", lambda x: is_int(x) and x >= 0),
    "stop": ("an integer >= 0", lambda x: is_int(x) and x >= 0),
    "count": ("an integer >= 0", lambda x: is_int(x) and x >= 0),
    "completed": ("true or false", lambda x: isinstance(x, bool)),
}
_OPTIONAL_SHARD_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "skipped": ("an integer >= 0", lambda x: is_int(x) and x >= 0),
    "bytes": ("an integer >= 0 or null", lambda x: x is None or (is_int(x) and x >= 0)),
    "sha256": ("a hex digest or null", lambda x: x is None or (isinstance(x, str) and len(x) == 64)),
}


def _check_index(index: dict[str, Any], path: Path) -> None:
    """Raise ConfigError naming the first key of ``index`` with a wrong type or value."""
    bad = f"{path} is damaged"
    for key, (want, ok) in _INDEX_TYPES.items():
        if key not in index:
            raise ConfigError(f"{bad}: it has no {key!r} entry")
        if not ok(index[key]):
            raise ConfigError(f"{bad}: {key!r} should be {want}, got {json.dumps(index[key])[:60]}")
    if index["num_tokens"] != index["grid_size"] ** 2:
        raise ConfigError(f"{bad}: num_tokens {index['num_tokens']} is not grid_size {index['grid_size']} squared")
    for i, entry in enumerate(index["shards"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"{bad}: shards[{i}] should be a mapping, got {json.dumps(entry)[:60]}")
        for key, (want, ok) in _SHARD_TYPES.items():
            if not ok(entry.get(key)):
                raise ConfigError(f"{bad}: shards[{i}].{key} should be {want}, got {json.dumps(entry.get(key))[:60]}")
        for key, (want, ok) in _OPTIONAL_SHARD_TYPES.items():
            if key in entry and not ok(entry[key]):
                raise ConfigError(f"{bad}: shards[{i}].{key} should be {want}, got {json.dumps(entry[key])[:60]}")
        if entry["stop"] < entry["start"] or entry["count"] > entry["stop"] - entry["start"]:
            raise ConfigError(f"{bad}: shards[{i}] has start {entry['start']}, stop {entry['stop']}, "
                              f"count {entry['count']}")


def read_index(root: PathLike) -> dict[str, Any]:
    """The parsed, type-checked ``index.json`` of a token directory.

    Raises:
        ConfigError: the folder has no index, or it is not valid JSON of the expected layout
            (the message names the first wrong entry).
    """
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise ConfigError(f"{root} is not a token directory (no {INDEX_NAME}); create one with `aimkit tokenize`")
    index = read_json(path, ConfigError)
    if not isinstance(index, dict) or index.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{path} is not an aimkit token index (format {FORMAT_VERSION})")
    _check_index(index, path)
    return index


def shard_path(root: Path, name: str) -> Path:
    """``root / name``, refusing names that are absolute or lead outside ``root``."""
    if os.path.isabs(name) or Path(name).drive:
        raise ConfigError(f"{root / INDEX_NAME} names shard {name!r}, an absolute path; shards must lie in {root}")
    path = root / name
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise ConfigError(f"{root / INDEX_NAME} names shard {name!r}, which lies outside {root}; refusing to read it")
    return path
