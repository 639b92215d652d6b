"""Atomic file writes: a reader (or the next run after a crash) sees the old file or the new one,
never half of one.

Written by hand because the standard library has no atomic write and the well-kept packages for
it add nothing here: a temporary file in the target's folder, flushed and fsynced, given the
permissions a plain ``open`` would give (``mkstemp`` makes files private to their owner, which
would hide shared caches and run folders from teammates), then renamed over the target.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path


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
