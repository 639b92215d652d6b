"""Exceptions raised by the library; only ``transferkit.cli`` turns them into messages and exit codes.

Every message says what is wrong, what is allowed, what was received and how to fix it.
"""

from __future__ import annotations


class TransferkitError(Exception):
    """Base class: a problem the user can fix, reported without a traceback (exit code 1)."""

    exit_code = 1


class InputError(TransferkitError, ValueError):
    """Bad option, path or file given by the user (exit code 2, like Click's usage errors)."""

    exit_code = 2


class ArgumentError(InputError):
    """A library argument outside what it accepts, said Keras' way, naming the Python argument:
    "`epochs` must be an integer from 1 to 10000. Received: epochs=0".

    The CLI says the same with its option's name (:meth:`for_option`): "Invalid --epochs: ...".

    Example:
        >>> str(ArgumentError("epochs", "an integer from 1 to 10000", 0))
        '`epochs` must be an integer from 1 to 10000. Received: epochs=0'
    """

    def __init__(self, argument: str, expected: str, received: object):
        self.argument, self.expected, self.received = argument, expected, short_repr(received)
        super().__init__(f"`{argument}` must be {expected}. Received: {argument}={self.received}")

    def for_option(self, option: str) -> str:
        return f"Invalid {option}: expected {self.expected}, received {self.received}."


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


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for messages that echo a user's value.

    A value from a file can be huge (a YAML list of a million items, a 100,000-digit integer, whose
    ``repr`` Python even refuses); a message must stay one readable line whatever it holds.

    Example:
        >>> short_repr("x" * 1000, limit=12)
        "'xxx...xxxx'"
        >>> short_repr(list(range(100)))
        '[0, 1, 2, 3, 4, 5, ...]'
    """
    import reprlib

    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = shortener.maxlong = limit
    try:
        text = shortener.repr(value)
    except ValueError:  # an int beyond Python's 4,300-digit str() limit
        return f"<an integer of {value.bit_length() if isinstance(value, int) else '?'} bits>"
    return text if len(text) <= limit else text[:limit - 3] + "..."
