"""Cache keys: what identifies a cached feature vector.

A vector's key is the content hash of its image's bytes (:func:`hash_file`; renaming or moving the
image keeps it) within the folder of its :class:`FeatureSpec` (everything else that changes the
vector, including the cache format version). This module owns both halves of the key and
:class:`FileHashes`, the cache root's record of file hashes by path + size + mtime that lets an
unchanged folder be re-run without reading its images. It reads and writes no vectors (that is
:mod:`transferkit.cache.store`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from transferkit.errors import CacheError

#: Bumped whenever the meaning or layout of a stored vector changes; old entries stop matching.
FORMAT_VERSION = 2

#: How the loader resizes (see transferkit.images.load_image); part of every key.
RESIZE_METHOD = "pillow-draft-bilinear-squash"

HASHES_FILE = "file-hashes.sqlite"


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
    #: Augmented views (see transferkit.views): the augmentation settings, and which view (1..K).
    augmentation: str = ""
    view: int = 0

    def __post_init__(self):
        if bool(self.augmentation) != (self.view > 0):
            raise ValueError(f"An augmented view needs both settings and a view >= 1, got "
                             f"augmentation={self.augmentation!r}, view={self.view}.")

    @classmethod
    def for_model(cls, backbone, model, dtype: str = "float32") -> FeatureSpec:
        """The key of features computed by ``model`` (built by ``load_backbone`` for ``backbone``).

        The one place a key is assembled, so no caller can leave a setting out of it.
        """
        from transferkit.weights import weights_fingerprint

        return cls(backbone.name, weights_fingerprint(model), int(model.input_shape[1]), backbone.preprocessing,
                   dtype=dtype)

    def for_view(self, augmentation: str, view: int) -> FeatureSpec:
        """The spec of augmented view ``view`` (>= 1) of these features, for augmentation settings
        ``augmentation`` (:func:`transferkit.views.augmentation_id`)."""
        return dataclasses.replace(self, augmentation=augmentation, view=view)

    def key(self) -> str:
        fields = asdict(self)
        if not self.augmentation:
            # Un-augmented features keep the key they had before views existed: old caches stay valid.
            del fields["augmentation"], fields["view"]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def hash_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes: the image part of a cache key (renaming keeps it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FileHashes:
    """Content hashes of files (images, and the cache's own shards), remembered by (absolute
    path, size, mtime).

    An unchanged folder is then re-run without reading its images; an edited file has a new
    size or mtime and is hashed again. SQLite (standard library) because two extractions may
    share one cache: it handles concurrent writers, and a crash loses at most the open batch.

    Example:
        >>> FileHashes(tmp_dir).hashes([path])  # doctest: +SKIP
        ['9f86d0...']
    """

    def __init__(self, cache_dir: str | os.PathLike):
        self.path = Path(cache_dir) / HASHES_FILE

    def _connect(self) -> contextlib.closing[sqlite3.Connection]:
        return contextlib.closing(sqlite3.connect(self.path, timeout=60))

    def hashes(self, paths: Sequence[Path]) -> list[str | OSError]:
        """The hash of each file, or the OSError that stopped reading it."""
        try:
            return self._hashes(paths)
        except sqlite3.DatabaseError as exc:
            # Disk full, a read-only folder, or a damaged file: name it. It only remembers hashes.
            raise CacheError(
                f"Cannot use the file-hash index '{self.path}': {exc}. Free some space or fix the folder's "
                "permissions; if the file is damaged, delete it (it only remembers file hashes, which are "
                "computed again)."
            ) from exc

    def _hashes(self, paths: Sequence[Path]) -> list[str | OSError]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        results: list[str | OSError] = []
        fresh = []
        with self._connect() as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, "
                       "mtime_ns INTEGER, sha256 TEXT)")
            for path in paths:
                try:
                    real = str(Path(path).resolve())
                    stat = os.stat(real)
                    row = db.execute("SELECT size, mtime_ns, sha256 FROM hashes WHERE path = ?", (real,)).fetchone()
                    if row and row[0] == stat.st_size and row[1] == stat.st_mtime_ns:
                        results.append(row[2])
                        continue
                    digest = hash_file(real)
                except OSError as exc:
                    results.append(exc)
                    continue
                fresh.append((real, stat.st_size, stat.st_mtime_ns, digest))
                results.append(digest)
            if fresh:  # no write (no journal file) when nothing changed: works on a full disk
                db.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?)", fresh)
        return results

    def live(self) -> set[str]:
        """Content hashes of the files still present, unchanged, at a path hashed here (what
        ``cache prune --missing`` keeps)."""
        if not self.path.is_file():
            return set()
        live = set()
        with self._connect() as db:
            for path, size, mtime_ns, digest in db.execute("SELECT path, size, mtime_ns, sha256 FROM hashes"):
                with contextlib.suppress(OSError):
                    stat = os.stat(path)
                    if stat.st_size == size and stat.st_mtime_ns == mtime_ns:
                        live.add(digest)
        return live
