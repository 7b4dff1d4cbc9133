"""Subcommands of the ``aimkit`` CLI, one module each (see :mod:`aimkit.cli`)."""
