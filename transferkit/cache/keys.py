"""Cache keys: what identifies a cached feature vector.

A vector's key is the content hash of its image's bytes (:func:`hash_file`; renaming or moving the
image keeps it) within the folder of its :class:`FeatureSpec` (everything else that changes the
vector, including the cache format version). This module owns both halves of the key and
:class:`FileHashes`, the cache root's record of file hashes by path and file status (size,
nanosecond mtime and ctime, inode, device) that lets an unchanged folder be re-run without reading
its images. It reads and writes no vectors (that is :mod:`transferkit.cache.store`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from transferkit import files
from transferkit.errors import CacheError
from transferkit.files import file_signature

#: Bumped whenever the meaning or layout of a stored vector changes; old entries stop matching.
FORMAT_VERSION = 2

#: How the loader resizes (see transferkit.data.images.load_image); part of every key.
RESIZE_METHOD = "pillow-draft-bilinear-squash"

HASHES_FILE = "file-hashes.sqlite"


#: ``FeatureSpec.tta`` of flip-averaged features (a backbone built with ``mirror=True``).
MIRROR = "hflip-mean"


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that changes a feature vector besides the image bytes.

    Example:
        >>> spec = FeatureSpec("mobilenet_v2_035", "ab12", 224, "tf")
        >>> len(spec.key())
        16
    """

    backbone: str
    weights_id: str
    image_size: int
    preprocessing: str
    pooling: str = "avg"
    layer: str = "pooled"
    resize: str = RESIZE_METHOD
    dtype: str = "float32"
    version: int = FORMAT_VERSION
    #: Augmented views (see transferkit.cache.views): the augmentation settings, and which view (1..K).
    augmentation: str = ""
    view: int = 0
    #: Test-time views averaged into the vector: "" (none) or MIRROR ("hflip-mean": the image and its mirror).
    tta: str = ""

    def __post_init__(self):
        if bool(self.augmentation) != (self.view > 0):
            raise ValueError(f"An augmented view needs both settings and a view >= 1, got "
                             f"augmentation={self.augmentation!r}, view={self.view}.")

    @classmethod
    def for_model(cls, backbone, model, dtype: str = "float32") -> FeatureSpec:
        """The key of features computed by ``model`` (built by ``load_backbone`` for ``backbone``).

        The one place a key is assembled, so no caller can leave a setting out of it.
        """
        from transferkit.models.weights import weights_fingerprint

        mirrored = any(type(layer).__name__ == "MirrorBatch" for layer in model.layers)
        return cls(backbone.name, weights_fingerprint(model), int(model.input_shape[1]), backbone.preprocessing,
                   dtype=dtype, tta=MIRROR if mirrored else "")

    def for_view(self, augmentation: str, view: int) -> FeatureSpec:
        """The spec of augmented view ``view`` (>= 1) of these features, for augmentation settings
        ``augmentation`` (:func:`transferkit.cache.views.augmentation_id`)."""
        return dataclasses.replace(self, augmentation=augmentation, view=view)

    def key(self) -> str:
        fields = asdict(self)
        if not self.augmentation:
            # Un-augmented features keep the key they had before views existed: old caches stay valid.
            del fields["augmentation"], fields["view"]
        if not self.tta:
            del fields["tta"]  # likewise for features without test-time views
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def hash_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes: the image part of a cache key (renaming keeps it)."""
    digest = hashlib.sha256()
    with files.open_regular(path) as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FileHashes:
    """Content hashes of files (images, and the cache's own shards), remembered by absolute path
    and :func:`transferkit.files.file_signature` (size, nanosecond mtime and ctime, inode, device).

    An unchanged folder is then re-run without reading its images; an edited, replaced or touched
    file has a new signature and is hashed again. SQLite (standard library) because two
    extractions may share one cache: it handles concurrent writers, and a crash loses at most the
    open batch. Paths are stored as bytes (``os.fsencode``), so names that are not valid UTF-8 work.

    The table ``file_hashes`` replaced ``hashes`` (keyed by size + mtime only): old rows are never
    used to skip a read, so each file is hashed once more after the upgrade; they still count for
    :meth:`live` and :meth:`sources`, and older transferkit versions sharing the cache keep their table.

    Example:
        >>> FileHashes(tmp_dir).hashes([path])  # doctest: +SKIP
        ['9f86d0...']
    """

    def __init__(self, cache_dir: str | os.PathLike):
        self.path = Path(cache_dir) / HASHES_FILE

    def _connect(self) -> contextlib.closing[sqlite3.Connection]:
        return contextlib.closing(sqlite3.connect(self.path, timeout=60))

    def _guarded(self, action, *args):
        try:
            return action(*args)
        except sqlite3.DatabaseError as exc:
            # Disk full, a read-only folder, or a damaged file: name it. It only remembers hashes.
            raise CacheError(
                f"Cannot use the file-hash index '{self.path}': {exc}. Free some space or fix the folder's "
                "permissions; if the file is damaged, delete it (it only remembers file hashes, which are "
                "computed again)."
            ) from exc

    @staticmethod
    def _create(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS file_hashes (path BLOB PRIMARY KEY, signature TEXT, sha256 TEXT)")

    @staticmethod
    def _has_table(db: sqlite3.Connection, name: str) -> bool:
        # Readers only look: creating the table would be a write (fails on a full disk or read-only cache).
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return db.execute(query, (name,)).fetchone() is not None

    def hashes(self, paths: Sequence[Path]) -> list[str | OSError]:
        """The hash of each file, or the OSError that stopped reading it (remembered for next time)."""
        return self._guarded(self._hashes, paths)

    def lookup(self, paths: Sequence[Path]) -> list[str | OSError | None]:
        """The remembered hash of each file whose signature is unchanged, ``None`` where the file must be
        read to know it, or the OSError of a file that cannot be found. Reads no file, writes nothing."""
        return self._guarded(self._lookup, paths)

    def remember(self, entries: Iterable[tuple[str | os.PathLike, os.stat_result, str]]) -> None:
        """Record ``(path, status, sha256)`` triples: the status must be the one the bytes were read under
        (:func:`transferkit.data.images.read_image_file` gives it)."""
        rows = [(os.fsencode(Path(path).resolve()), file_signature(status), digest)
                for path, status, digest in entries]
        if rows:
            self._guarded(self._write, rows)

    def _write(self, rows: list[tuple[bytes, str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db, db:
            self._create(db)
            db.executemany("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?)", rows)

    def _lookup(self, paths: Sequence[Path]) -> list[str | OSError | None]:
        results: list[str | OSError | None] = []
        with contextlib.ExitStack() as stack:
            db = stack.enter_context(self._connect()) if self.path.is_file() else None
            if db is not None and not self._has_table(db, "file_hashes"):
                db = None
            for path in paths:
                try:
                    real = Path(path).resolve()
                    signature = file_signature(os.stat(real))
                except OSError as exc:
                    results.append(exc)
                    continue
                row = db.execute("SELECT signature, sha256 FROM file_hashes WHERE path = ?",
                                 (os.fsencode(real),)).fetchone() if db is not None else None
                results.append(row[1] if row and row[0] == signature else None)
        return results

    def _hashes(self, paths: Sequence[Path]) -> list[str | OSError]:
        results: list[str | OSError] = []
        fresh = []
        for path, known in zip(paths, self._lookup(paths), strict=True):
            if known is not None:
                results.append(known)
                continue
            try:
                real = Path(path).resolve()
                before = os.stat(real)
                digest = hash_file(real)
                # Remembered only if nothing wrote to or replaced the file while it was hashed.
                if file_signature(os.stat(real)) == file_signature(before):
                    fresh.append((real, before, digest))
            except OSError as exc:
                results.append(exc)
                continue
            results.append(digest)
        if fresh:  # no write (no journal file) when nothing changed: works on a full disk
            self.remember(fresh)
        return results

    def _rows(self) -> Iterable[tuple[str, os.stat_result | None, str, bool]]:
        """``(path, current status or None if gone, sha256, unchanged)`` for every remembered file,
        both tables (legacy rows compare size + mtime, as they were written)."""
        if not self.path.is_file():
            return
        rows: list[tuple[str, str, str, bool]] = []
        with self._connect() as db:
            if self._has_table(db, "file_hashes"):
                rows += [(os.fsdecode(p), sig, digest, False)
                         for p, sig, digest in db.execute("SELECT path, signature, sha256 FROM file_hashes")]
            if self._has_table(db, "hashes"):
                rows += [(p, f"{size}:{mtime_ns}", digest, True)
                         for p, size, mtime_ns, digest in db.execute("SELECT path, size, mtime_ns, sha256 FROM hashes")]
        for path, signature, digest, old in rows:
            try:
                status = os.stat(path)
            except OSError:
                yield path, None, digest, False
                continue
            now = f"{status.st_size}:{status.st_mtime_ns}" if old else file_signature(status)
            yield path, status, digest, now == signature

    def live(self) -> set[str]:
        """Content hashes of the files still present, unchanged, at a path hashed here (what
        ``cache prune --missing`` keeps)."""
        return self._guarded(lambda: {digest for _, _, digest, unchanged in self._rows() if unchanged})

    def sources(self) -> dict[str, list[str]]:
        """sha256 -> the paths remembered with that content that still exist, unchanged ones first
        (``cache verify --deep`` recomputes vectors from them; each must still be hashed to be sure)."""
        def collect():
            found: dict[str, list[tuple[bool, str]]] = {}
            for path, status, digest, unchanged in self._rows():
                if status is not None:
                    found.setdefault(digest, []).append((not unchanged, path))
            return {digest: [p for _, p in sorted(items)] for digest, items in found.items()}

        return self._guarded(collect)
