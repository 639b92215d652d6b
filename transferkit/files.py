"""Atomic file writes: a reader (or the next run after a crash) sees the old file or the new one,
never half of one; and the one safe way to read a file (:func:`open_regular`).

Written by hand because the standard library has no atomic write and the well-kept packages for
it add nothing here: a temporary file in the target's folder, flushed and fsynced, given the
permissions a plain ``open`` would give (``mkstemp`` makes files private to their owner, which
would hide shared caches and run folders from teammates), then renamed over the target.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block succeeds.

    For writers that want a file name (``model.save``, ``np.savez``). ``suffix`` keeps an
    extension such writers insist on. On error the temporary file is removed.

    Example:
        >>> with atomic_path("model.keras", suffix=".keras") as tmp:  # doctest: +SKIP
        ...     model.save(tmp)
    """
    path = Path(path)
    # The start of the name only: a name near the 255-byte limit must leave room for the rest.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:40]}.", suffix=suffix or ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        publish(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # "No space left on device" from write() names no file: name it
        raise


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make a finished temporary file durable and readable, then rename it onto ``path``."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, _default_mode())
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (after a power cut the folder names the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not openable as a folder here (e.g. Windows): the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; nothing more can be done
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8, except that a file name's bytes that are not UTF-8 are written as they are (see below)."""
    write_bytes(path, text.encode("utf-8", NAME_ERRORS))


def write_json(path: str | os.PathLike, data) -> None:
    r"""JSON in UTF-8; a file name's bytes that are not UTF-8 become ``\udcXX`` escapes (see below)."""
    text = utf8_view(json.dumps(data, indent=2, ensure_ascii=False))
    # JSON text must be Unicode: the lone surrogates left stand for undecodable bytes; escaped, they
    # are still valid JSON and json.loads gives back the very string (and so the file name).
    write_text(path, _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n")


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


# ------------------------------------------------------------------------------ file names in files
#
# A file name is bytes on POSIX; Python shows bytes that are not valid in the file system encoding
# (a Latin-1 name such as b"caf\xe9.jpg", or any non-ASCII name when Python runs in the ASCII
# "C" locale) as lone surrogates ("caf\udce9.jpg"). Every file transferkit writes keeps such names
# so that they lead back to the file:
#
# * text files (CSV such as splits.csv, predictions.csv, skipped.csv, predict --output; labels.txt)
#   hold the name's bytes as they are: UTF-8 for every valid name, the raw bytes otherwise. Read them
#   with ``open_text`` (or ``errors="surrogateescape"``, e.g. pandas' ``encoding_errors=``);
# * JSON holds each undecodable byte as the escape ``\udcXX`` (XX its value), which json.loads turns
#   back into the same string;
# * npz holds the same strings; Parquet, whose strings must be UTF-8, holds a ``path_bytes`` column
#   with each name's exact bytes when some name is not UTF-8 (see transferkit.cache.feature_files).

#: The codec error handler that writes (and reads back) the bytes a lone surrogate stands for.
NAME_ERRORS = "surrogateescape"
_SURROGATE = re.compile("[\ud800-\udfff]")


def utf8_view(text: str) -> str:
    r"""``text`` with file-name bytes that are valid UTF-8 shown as their characters (only bytes that are
    not UTF-8 stay surrogates): one spelling whatever the locale Python runs in.

    Example:
        >>> utf8_view("caf\udcc3\udca9.jpg")  # a UTF-8 name as read in the C locale
        'café.jpg'
    """
    try:
        return text.encode("utf-8", NAME_ERRORS).decode("utf-8", NAME_ERRORS)
    except UnicodeEncodeError:  # a surrogate that stands for no byte: leave the text alone
        return text


def native_name(text: str) -> str:
    """A file name read from a transferkit file, spelled as this Python's ``os`` functions expect.

    The inverse of :func:`utf8_view`: the same under a UTF-8 locale; in the ASCII C locale, "café"
    becomes the surrogates that stand for its bytes, so ``open`` finds the file.
    """
    try:
        return os.fsdecode(text.encode("utf-8", NAME_ERRORS))
    except UnicodeEncodeError:
        return text


def display_name(text: str) -> str:
    r"""A file name for people: bytes that are not UTF-8 shown as ``\xNN`` and control characters
    (a line break in a name) as Python escapes, so it prints anywhere and on one line.

    Example:
        >>> display_name("caf\udce9\n.jpg")
        'caf\\xe9\\n.jpg'
    """
    return _UNPRINTABLE.sub(_escape, utf8_view(text))


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    return match.group().encode("unicode_escape").decode("ascii") if code < 0xD800 else f"\\u{code:04x}"


def open_text(path: str | os.PathLike):
    """Open a text file transferkit wrote (CSV, labels.txt) for reading: names come back as written."""
    return open(path, encoding="utf-8", errors=NAME_ERRORS, newline="")


# ------------------------------------------------------------------------------ reading files safely
#
# Every file transferkit reads from a folder a user controls (images, a run's status.json and
# config.yaml, recipes, checkpoint state, the report's feature map) is opened by open_regular. A FIFO
# named like one of them blocks a plain open() forever (it waits for a writer); a device can act on
# being opened, or never end. Checking by name first (is_file, stat) and then opening the plain way
# still hangs on a FIFO swapped in between, so the check that counts is fstat of what was opened,
# non-blocking.


class NotRegularFileError(OSError):
    """A FIFO, socket, device or folder where a file was expected; refused unread.

    ``strerror`` is the short reason, e.g. ``"not a regular file: a named pipe (FIFO)"``.
    """


class FileTooLargeError(OSError):
    """A file larger than its reader allows; refused unread (or once it grew past the limit)."""


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISLNK, "a symbolic link"))


def _check_regular(status: os.stat_result, path, max_bytes: int | None) -> None:
    if not stat.S_ISREG(status.st_mode):
        kind = next((name for test, name in _KINDS if test(status.st_mode)), "a special file")
        raise NotRegularFileError(errno.EINVAL, f"not a regular file: {kind}", os.fsdecode(path))
    if max_bytes is not None and status.st_size > max_bytes:
        raise FileTooLargeError(errno.EFBIG, _too_large(status.st_size, max_bytes), os.fsdecode(path))


def _too_large(size: int, max_bytes: int) -> str:
    return f"larger than {max_bytes:,} bytes ({size:,} bytes)"


def open_regular(path: str | os.PathLike, max_bytes: int | None = None, *,
                 follow_symlinks: bool = True) -> BinaryIO:
    """Open a regular file for reading in binary mode, refusing anything else without blocking.

    Looked at before opening (opening a device can act on it), then opened with ``O_NONBLOCK`` (a FIFO
    swapped in meanwhile opens at once instead of waiting for a writer) and checked again with ``fstat``
    on what was actually opened; ``O_NONBLOCK`` is cleared once the file is known to be regular.

    Args:
        path: the file.
        max_bytes: refuse a file whose size is more than this (checked on the open file).
        follow_symlinks: False refuses a symbolic link (``O_NOFOLLOW``) instead of reading its target.

    Raises:
        NotRegularFileError: a FIFO, socket, device or folder (``strerror`` says which).
        FileTooLargeError: over ``max_bytes``.
        OSError: the file cannot be opened (missing, permission denied, ...).

    Example:
        >>> with open_regular("runs/first/status.json", max_bytes=65536) as handle:  # doctest: +SKIP
        ...     data = handle.read()
    """
    flags = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
             | getattr(os, "O_BINARY", 0) | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0)))
    _check_regular(os.stat(path, follow_symlinks=follow_symlinks), path, max_bytes)
    fd = os.open(path, flags)
    try:
        _check_regular(os.fstat(fd), path, max_bytes)
        if flags & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)  # readers of the file object expect ordinary reads
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_bytes(path: str | os.PathLike, max_bytes: int | None = None, *,
                       follow_symlinks: bool = True) -> bytes:
    """All the bytes of a regular file, opened by :func:`open_regular`; at most ``max_bytes`` (also
    when the file grew while it was read).

    Raises:
        As :func:`open_regular`.

    Example:
        >>> json.loads(read_regular_bytes("runs/first/status.json", max_bytes=65536))  # doctest: +SKIP
        {'state': 'finished', ...}
    """
    with open_regular(path, max_bytes, follow_symlinks=follow_symlinks) as handle:
        data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise FileTooLargeError(errno.EFBIG, _too_large(len(data), max_bytes), os.fsdecode(path))
    return data


def file_signature(status: os.stat_result) -> str:
    """What says a file is unchanged: size, nanosecond mtime and ctime, inode and device.

    Size and mtime alone miss an edit that keeps the size and restores the mtime (``touch -r``,
    ``os.utime``, archive extraction); the ctime cannot be set by users and changes with every write
    and every ``utime``; the inode and device change when a file is replaced by a rename or moved
    to another disk. A string: inode numbers can exceed SQLite's 64-bit signed integers (the cache's
    hash memo stores it).
    """
    return (f"{status.st_size}:{status.st_mtime_ns}:{status.st_ctime_ns}:"
            f"{status.st_ino}:{status.st_dev}")
