"""Exception types shared by every aimkit component.

User-facing errors derive from :class:`AimkitError`; the CLI prints their message on one line
and exits with status 2 instead of showing a traceback.
"""

import difflib
import errno
from collections.abc import Iterable

__all__ = [
    "AimkitError",
    "UnknownNameError",
    "DuplicateNameError",
    "ConfigError",
    "CheckpointError",
    "did_you_mean",
    "environment_error_message",
]


def did_you_mean(name: object, choices: Iterable[str], cutoff: float = 0.5, quote: bool = True) -> str:
    """``"; did you mean 'a', 'b'?"`` for the (up to three) choices closest to ``name``, or ``""``.

    The one suggestion helper behind every "unknown name" message (registries, config keys,
    build overrides, recipe names), so they all read the same way."""
    close = difflib.get_close_matches(str(name), list(choices), n=3, cutoff=cutoff)
    if not close:
        return ""
    return f"; did you mean {', '.join(repr(c) if quote else c for c in close)}?"


class AimkitError(Exception):
    """Base class of errors caused by the caller's input (names, arguments, files)."""


class UnknownNameError(AimkitError, KeyError):
    """A registry lookup for a name that nobody registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(AimkitError):
    """A second registration under a name that is already taken."""


class ConfigError(AimkitError, ValueError):
    """An argument, override or config key that is missing, unknown or out of range."""


class CheckpointError(AimkitError):
    """A weight file that cannot be read, or whose tensors do not fit the model."""


# OS errors caused by where the user asked us to write or read, not by a bug in aimkit
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is not a directory",
    errno.EISDIR: "is a directory",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "already exists",
}


def environment_error_message(exc: BaseException):
    """One line for an ``OSError`` that the user's environment caused (full disk, read-only or
    missing path, permissions); ``None`` for anything else, which is then treated as a bug."""
    if not isinstance(exc, OSError) or exc.errno not in _ENVIRONMENT_ERRNOS:
        return None
    where = f": {exc.filename}" if exc.filename else ""
    reason = exc.strerror if exc.errno == errno.EEXIST and exc.strerror else _ENVIRONMENT_ERRNOS[exc.errno]
    return f"{reason}{where}"
