"""The shard store: the vectors of each FeatureSpec in content-named HDF5 shards on disk.

Layout of a cache folder::

    file-hashes.sqlite             content hash of each image file, by path + size + mtime
    <backbone>-<spec key>/         one folder per FeatureSpec (settings behind the key)
        spec.json                  those settings, for people and ``cache info``
        shard-<sha256>.h5          keys (image content hashes) and vectors, HDF5
        last_run.json              images, hits and computed vectors of the last extraction

This module owns that layout, :class:`FeatureCache` (look-up and storage of one spec's vectors)
and the shard files themselves: writing, reading and checking them. A shard is written to a
temporary file, named after the SHA-256 of its own bytes and renamed into place, so an
interrupted run leaves only whole shards (the next run computes just what is missing), two
processes can add shards to one cache at once without a lock, and ``verify`` can check every file
against its name. The datasets carry HDF5's Fletcher-32 checksums, so a damaged chunk raises on
reading instead of returning numbers; such a shard is moved aside to ``*.bad`` and its vectors
are computed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from transferkit import files
from transferkit.cache.keys import FORMAT_VERSION, FeatureSpec, FileHashes, hash_file
from transferkit.errors import CacheError

log = logging.getLogger("transferkit")

SHARD_PATTERN = "shard-*.h5"
SPEC_FILE = "spec.json"
LAST_RUN_FILE = "last_run.json"
_NAME_MISMATCH = "contents do not match the checksum in its name"


def default_cache_dir() -> Path:
    """``$TRANSFERKIT_CACHE_DIR``, else the platform's user cache folder (``~/.cache/transferkit``)."""
    if os.environ.get("TRANSFERKIT_CACHE_DIR"):
        return Path(os.environ["TRANSFERKIT_CACHE_DIR"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("transferkit"))


class FeatureCache:
    """The vectors of one :class:`FeatureSpec`, keyed by image content hash.

    Args:
        cache_dir: the cache root (several specs share it, each in its own sub-folder).
        spec: the settings these vectors were computed with.

    Example:
        >>> cache = FeatureCache("runs/cache", FeatureSpec("tiny_test", "w1", 32, "tf"))  # doctest: +SKIP
        >>> cache.put(["9f86d0..."], vectors); cache.get(["9f86d0...", "unknown"])  # doctest: +SKIP
        [array([...], dtype=float32), None]
    """

    def __init__(self, cache_dir: str | os.PathLike, spec: FeatureSpec):
        self.spec = spec
        self.root = Path(cache_dir)
        self.dir = self.root / f"{spec.backbone}-{spec.key()}"
        self._index: dict[str, tuple[Path, int]] | None = None
        self.bad_shards: list[Path] = []

    def _load(self) -> dict[str, tuple[Path, int]]:
        """key -> (shard, row), from the keys of every shard (vectors stay on disk)."""
        if self._index is None:
            self._index = {}
            shards = spec_shards(self.dir)
            # Each shard's bytes against the checksum in its name. Remembered by path+size+mtime,
            # so a shard is hashed once, and again only when something has written to it.
            digests = FileHashes(self.root).hashes(shards)
            for shard, digest in zip(shards, digests, strict=True):
                try:
                    if isinstance(digest, OSError):
                        raise digest
                    if not _matches_name(shard, digest):
                        raise ValueError(_NAME_MISMATCH)
                    keys = read_keys(shard)
                except Exception as exc:  # noqa: BLE001 - any unreadable shard is recomputed
                    self._set_aside(shard, exc)
                    continue
                for row, key in enumerate(keys):
                    self._index.setdefault(key, (shard, row))
        return self._index

    def _set_aside(self, shard: Path, exc: BaseException) -> None:
        # Renamed aside (kept for inspection) so it is reported once, not on every run.
        bad = shard.with_suffix(".bad")
        log.warning("Damaged cache shard %s (%s): its vectors will be computed again; moved to %s.",
                    shard, exc, bad.name)
        with contextlib.suppress(OSError):
            shard.rename(bad)
        self.bad_shards.append(shard)
        if self._index is not None:
            self._index = {k: v for k, v in self._index.items() if v[0] != shard}

    def __len__(self) -> int:
        return len(self._load())

    def contains(self, hashes: Sequence[str]) -> list[bool]:
        """Whether each hash has a vector, without reading any vector."""
        index = self._load()
        return [h in index for h in hashes]

    def get(self, hashes: Sequence[str]) -> list[np.ndarray | None]:
        """The cached vector (float32) for each hash, ``None`` where it is missing."""
        index = self._load()
        out: list[np.ndarray | None] = [None] * len(hashes)
        wanted: dict[Path, list[tuple[int, int]]] = defaultdict(list)
        for i, key in enumerate(hashes):
            if key in index:
                shard, row = index[key]
                wanted[shard].append((row, i))
        for shard, items in wanted.items():
            rows = np.array([row for row, _ in items])
            unique, inverse = np.unique(rows, return_inverse=True)
            try:
                vectors = read_rows(shard, unique)
            except Exception as exc:  # noqa: BLE001 - a checksum or format error: recompute
                self._set_aside(shard, exc)
                continue
            for (_, i), j in zip(items, inverse, strict=True):
                out[i] = vectors[j].astype(np.float32)
        return out

    def fill(self, hashes: Sequence[str], out: np.ndarray | None, rows: Sequence[int]) -> np.ndarray:
        """Which hashes have a vector, as a bool array; with ``out``, also copies the vector of
        ``hashes[j]`` to ``out[rows[j]]`` where found (without ``out`` no vector is read)."""
        if out is None:
            return np.array(self.contains(hashes), dtype=bool)
        found = np.zeros(len(hashes), dtype=bool)
        for j, (row, vector) in enumerate(zip(rows, self.get(hashes), strict=True)):
            if vector is not None:
                out[row] = vector
                found[j] = True
        return found

    def put(self, hashes: Sequence[str], vectors: np.ndarray) -> None:
        """Store vectors as one new shard, atomically (temporary file, then rename)."""
        if len(hashes) == 0:
            return
        vectors = np.asarray(vectors, dtype=self.spec.dtype)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            spec_path = self.dir / SPEC_FILE
            if not spec_path.exists():
                files.write_json(spec_path, asdict(self.spec))
            shard = write_shard(self.dir, hashes, vectors)
        except OSError as exc:
            raise write_error(self.dir, exc) from exc
        index = self._load()
        for row, key in enumerate(hashes):
            index.setdefault(key, (shard, row))

    def verify(self) -> list[tuple[Path, str]]:
        """Every damaged shard of this spec with the reason (checksums and contents re-read)."""
        return damaged_shards(spec_shards(self.dir))


def write_error(path: Path, exc: BaseException) -> CacheError:
    """A cache write failed (disk full, read-only, permissions): say where, why and what to do."""
    reason = getattr(exc, "strerror", None) or str(exc)
    return CacheError(
        f"Cannot write to the feature cache '{path}': {reason}. The vectors already stored are intact; free "
        "some space (or fix the permissions) and run again to resume, or choose another folder with --cache-dir.")


def write_shard(folder: Path, hashes: Sequence[str], vectors: np.ndarray) -> Path:
    """Write one shard atomically, named after the SHA-256 of its bytes; returns its path.

    The HDF5 file is built in memory and written with plain file I/O: a full disk or a read-only
    folder then raises an ordinary OSError naming the file. (Written to disk by HDF5 itself, a write
    failing when the file closes surfaced only as an ignored error, and the process then crashed.)
    """
    import io

    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        handle.attrs["format_version"] = FORMAT_VERSION
        handle.create_dataset("keys", data=np.array(hashes, dtype="S64"), fletcher32=True)
        handle.create_dataset("vectors", data=vectors, fletcher32=True,
                              chunks=(min(len(vectors), 256), vectors.shape[1]))
    data = buffer.getbuffer()  # a view: no second copy of the vectors
    # Named after its own bytes: unique across writers, and checkable by `cache verify`.
    target = folder / f"shard-{hashlib.sha256(data).hexdigest()[:32]}.h5"
    files.write_bytes(target, data)
    return target


def read_keys(shard: Path) -> list[str]:
    """The keys (image content hashes) of a shard, in row order."""
    import h5py

    with h5py.File(shard, "r") as handle:
        keys = handle["keys"][:]
        num_vectors = handle["vectors"].shape[0]
    if len(keys) != num_vectors:
        raise ValueError(f"{len(keys)} keys for {num_vectors} vectors")
    return [k.decode() for k in keys]


def read_rows(shard: Path, rows: np.ndarray) -> np.ndarray:
    """The vectors at ``rows`` (sorted, unique) of a shard, in its storage dtype."""
    import h5py

    with h5py.File(shard, "r") as handle:
        vectors = handle["vectors"]
        # Fancy indexing row by row is slow in HDF5; read whole chunks when most rows are wanted.
        return vectors[:][rows] if len(rows) * 4 > vectors.shape[0] else vectors[rows]


def _matches_name(shard: Path, digest: str) -> bool:
    return digest.startswith(shard.stem.removeprefix("shard-"))


def verify_shard(shard: Path) -> str | None:
    """Why a shard cannot be trusted (its bytes no longer match its name, or a dataset fails its
    checksum), or ``None`` when it is sound."""
    try:
        digest = hash_file(shard)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if not _matches_name(shard, digest):
        return _NAME_MISMATCH
    try:
        read_rows(shard, np.arange(len(read_keys(shard))))
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError/KeyError/ValueError variously
        return f"cannot be read: {exc}"
    return None


def damaged_shards(shards: Sequence[Path]) -> list[tuple[Path, str]]:
    """``(shard, reason)`` for each of ``shards`` that :func:`verify_shard` finds damaged."""
    return [(shard, reason) for shard in shards if (reason := verify_shard(shard)) is not None]


def cache_specs(cache_dir: str | os.PathLike) -> list[Path]:
    """The spec folders of a cache root (each holds one FeatureSpec's shards)."""
    root = Path(cache_dir)
    return sorted(p for p in root.iterdir() if (p / SPEC_FILE).is_file()) if root.is_dir() else []


def spec_shards(spec_dir: Path) -> list[Path]:
    """The shards of one spec folder, in name order."""
    return sorted(spec_dir.glob(SHARD_PATTERN))
