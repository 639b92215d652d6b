"""Exceptions raised by the library; only ``cli.py`` turns them into messages and exit codes.

Every message says what is wrong, what is allowed, what was received and how to fix it.
"""

from __future__ import annotations


class TransferkitError(Exception):
    """Base class: a problem the user can fix, reported without a traceback (exit code 1)."""

    exit_code = 1


class InputError(TransferkitError):
    """Bad option, path or file given by the user (exit code 2, like Click's usage errors)."""

    exit_code = 2


class UnknownBackboneError(InputError):
    """A backbone name that is not in the registry."""


class WeightsError(TransferkitError):
    """ImageNet weights are missing, unreadable or do not fit the backbone."""


class DataError(InputError):
    """An image folder that cannot be used as given (no classes, empty class, bad split)."""


class CacheError(TransferkitError):
    """The feature cache cannot be read or written."""


class ExportError(TransferkitError):
    """An exported model does not predict like the trained one, or cannot be built."""
