"""Exception types shared by every aimkit component.

User-facing errors derive from :class:`AimkitError`; the CLI prints their message on one line
and exits with status 2 instead of showing a traceback.
"""

__all__ = ["AimkitError", "UnknownNameError", "DuplicateNameError", "ConfigError", "CheckpointError"]


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
