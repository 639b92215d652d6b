"""Bottleneck feature cache: vectors keyed by image content and by everything that shapes them.

Layout of a cache folder::

    file-hashes.sqlite             content hash of each image file, by path + size + mtime
    <backbone>-<spec key>/         one folder per FeatureSpec (settings behind the key)
        spec.json                  those settings, for people and ``cache info``
        shard-<sha256>.h5          keys (image content hashes) and vectors, HDF5
        last_run.json              images, hits and computed vectors of the last extraction

A shard is written to a temporary file, named after the SHA-256 of its own bytes and renamed
into place, so an interrupted run leaves only whole shards (the next run computes just what is
missing), two processes can add shards to one cache at once without a lock, and ``verify`` can
check every file against its name.  The datasets carry HDF5's Fletcher-32 checksums, so a damaged
chunk raises on reading instead of returning numbers; such a shard is moved aside to ``*.bad``
and its vectors are computed again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferkit import files, runtime
from transferkit.errors import CacheError

if TYPE_CHECKING:  # pragma: no cover
    from transferkit.config import TrainConfig

log = logging.getLogger("transferkit")

#: Bumped whenever the meaning or layout of a stored vector changes; old entries stop matching.
FORMAT_VERSION = 2

#: How the loader resizes (see transferkit.data.load_image); part of every key.
RESIZE_METHOD = "pillow-draft-bilinear-squash"

SHARD_PATTERN = "shard-*.h5"
#: Most vectors in one shard written by ``prune`` (a shard is built in memory before it is written).
PRUNE_SHARD_ROWS = 65536
HASHES_FILE = "file-hashes.sqlite"
LAST_RUN_FILE = "last_run.json"


def default_cache_dir() -> Path:
    """``$TRANSFERKIT_CACHE_DIR``, else the platform's user cache folder (``~/.cache/transferkit``)."""
    if os.environ.get("TRANSFERKIT_CACHE_DIR"):
        return Path(os.environ["TRANSFERKIT_CACHE_DIR"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("transferkit"))


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
        with contextlib.closing(sqlite3.connect(self.path, timeout=60)) as db, db:
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


class FeatureCache:
    """The vectors of one :class:`FeatureSpec`, keyed by image content hash.

    Args:
        cache_dir: the cache root (several specs share it, each in its own sub-folder).
        spec: the settings these vectors were computed with.
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
            shards = sorted(self.dir.glob(SHARD_PATTERN))
            # Each shard's bytes against the checksum in its name. Remembered by path+size+mtime,
            # so a shard is hashed once, and again only when something has written to it.
            digests = FileHashes(self.root).hashes(shards)
            for shard, digest in zip(shards, digests, strict=True):
                try:
                    if isinstance(digest, OSError):
                        raise digest
                    if not digest.startswith(shard.stem.removeprefix("shard-")):
                        raise ValueError("contents do not match the checksum in its name")
                    keys = _read_keys(shard)
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
                vectors = _read_rows(shard, unique)
            except Exception as exc:  # noqa: BLE001 - a checksum or format error: recompute
                self._set_aside(shard, exc)
                continue
            for (_, i), j in zip(items, inverse, strict=True):
                out[i] = vectors[j].astype(np.float32)
        return out

    def put(self, hashes: Sequence[str], vectors: np.ndarray) -> None:
        """Store vectors as one new shard, atomically (temporary file, then rename)."""
        if len(hashes) == 0:
            return
        vectors = np.asarray(vectors, dtype=self.spec.dtype)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            spec_path = self.dir / "spec.json"
            if not spec_path.exists():
                files.write_json(spec_path, asdict(self.spec))
            shard = _write_shard(self.dir, hashes, vectors)
        except OSError as exc:
            raise _write_error(self.dir, exc) from exc
        index = self._load()
        for row, key in enumerate(hashes):
            index.setdefault(key, (shard, row))

    def verify(self) -> list[tuple[Path, str]]:
        """Every damaged shard of this spec with the reason (checksums and contents re-read)."""
        return [(shard, reason) for shard in sorted(self.dir.glob(SHARD_PATTERN))
                if (reason := verify_shard(shard)) is not None]


def _write_error(path: Path, exc: BaseException) -> CacheError:
    """A cache write failed (disk full, read-only, permissions): say where, why and what to do."""
    reason = getattr(exc, "strerror", None) or str(exc)
    return CacheError(
        f"Cannot write to the feature cache '{path}': {reason}. The vectors already stored are intact; free "
        "some space (or fix the permissions) and run again to resume, or choose another folder with --cache-dir.")


def _write_shard(folder: Path, hashes: Sequence[str], vectors: np.ndarray) -> Path:
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


def _read_keys(shard: Path) -> list[str]:
    import h5py

    with h5py.File(shard, "r") as handle:
        keys = handle["keys"][:]
        num_vectors = handle["vectors"].shape[0]
    if len(keys) != num_vectors:
        raise ValueError(f"{len(keys)} keys for {num_vectors} vectors")
    return [k.decode() for k in keys]


def _read_rows(shard: Path, rows: np.ndarray) -> np.ndarray:
    import h5py

    with h5py.File(shard, "r") as handle:
        vectors = handle["vectors"]
        # Fancy indexing row by row is slow in HDF5; read whole chunks when most rows are wanted.
        return vectors[:][rows] if len(rows) * 4 > vectors.shape[0] else vectors[rows]


def verify_shard(shard: Path) -> str | None:
    """Why a shard cannot be trusted (its bytes no longer match its name, or a dataset fails its
    checksum), or ``None`` when it is sound."""
    try:
        digest = hash_file(shard)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if not digest.startswith(shard.stem.removeprefix("shard-")):
        return "contents do not match the checksum in its name"
    try:
        _read_rows(shard, np.arange(len(_read_keys(shard))))
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError/KeyError/ValueError variously
        return f"cannot be read: {exc}"
    return None


def cache_specs(cache_dir: str | os.PathLike) -> list[Path]:
    """The spec folders of a cache root (each holds one FeatureSpec's shards)."""
    root = Path(cache_dir)
    return sorted(p for p in root.iterdir() if (p / "spec.json").is_file()) if root.is_dir() else []


@dataclass
class ExtractionResult:
    """Features for a list of images, in their order.

    Attributes:
        vectors: ``(n, feature_dim)`` float32, rows of failed images zeros; ``None`` when the
            caller asked only to fill the cache.
        ok: ``(n,)`` bool, False where the image could not be decoded.
        errors: ``{index: reason}`` for the failed images.
        num_cached: vectors found in the cache.
        num_computed: vectors computed by the backbone in this call.
        seconds: wall time of the backbone pass.
        view_vectors: ``(n, K, feature_dim)`` float32 vectors of the K augmented views (view k
            of image i at ``[i, k - 1]``), with ``views=K``; ``None`` otherwise or when the caller
            asked only to fill the cache.
        num_views_cached: augmented-view vectors found in the cache.
        num_views_computed: augmented-view vectors computed in this call.
        views_seconds: wall time of the augmented views' pass.
    """

    vectors: np.ndarray | None
    ok: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    num_cached: int = 0
    num_computed: int = 0
    seconds: float = 0.0
    view_vectors: np.ndarray | None = None
    num_views_cached: int = 0
    num_views_computed: int = 0
    views_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.num_computed / self.seconds if self.seconds > 0 else 0.0

    @property
    def views_per_second(self) -> float:
        return self.num_views_computed / self.views_seconds if self.views_seconds > 0 else 0.0

    def skipped_files(self, names: Sequence[str]) -> list[tuple[str, str]]:
        """``(name, reason)`` of the images that failed, given the names of all images in order."""
        return [(names[i], reason) for i, reason in sorted(self.errors.items())]

    def summary(self) -> str:
        """``"500 computed (78.6 images/s), 0 from cache"``; no rate when nothing was computed."""
        rate = f" ({self.images_per_second:.1f} images/s)" if self.num_computed else ""
        text = f"{self.num_computed} computed{rate}, {self.num_cached} from cache"
        if self.num_views_computed or self.num_views_cached:
            rate = f" ({self.views_per_second:.1f} views/s)" if self.num_views_computed else ""
            text += (f"; augmented views: {self.num_views_computed} computed{rate}, "
                     f"{self.num_views_cached} from cache")
        return text


def extract_features(
    model,
    paths: Sequence[Path],
    cache: FeatureCache | None,
    *,
    batch_size: int = 32,
    flush_every: int = 512,
    verbose: int = 1,
    keep_vectors: bool = True,
    views: int = 0,
    augmentation: TrainConfig | None = None,
) -> ExtractionResult:
    """Pooled features for every image: from the cache where present, one backbone pass for the rest.

    Vectors are written to the cache every ``flush_every`` images, so an interrupted extraction
    keeps its finished work and the next call resumes from there.

    Args:
        model: the backbone from :func:`transferkit.weights.load_backbone`.
        paths: image files.
        cache: where to look up and store vectors; ``None`` computes everything.
        batch_size: images per backbone call.
        flush_every: images between cache writes.
        verbose: 1 shows a Keras progress bar.
        keep_vectors: False only fills the cache (``vectors`` is then ``None``): memory stays flat
            however large the folder, since no vector is held beyond the batch being written.
        views: also the vectors of this many augmented views per image (see :mod:`transferkit.views`),
            each cached like the originals: a second call computes none of them.
        augmentation: the augmentation strengths (the ``augment_*`` fields) and ``seed`` of the
            views; TrainConfig's defaults when ``None``.

    Example:
        >>> result = extract_features(model, paths, cache, views=4)  # doctest: +SKIP
        >>> result.vectors.shape, result.view_vectors.shape  # doctest: +SKIP
        ((120, 1280), (120, 4, 1280))
    """
    import keras

    from transferkit.data import image_dataset, load_image

    image_size = int(model.input_shape[1])
    feature_dim = int(model.output_shape[-1])
    n = len(paths)
    vectors = np.zeros((n, feature_dim), dtype=np.float32) if keep_vectors else None
    ok = np.ones(n, dtype=bool)
    errors: dict[int, str] = {}

    hashes: list[str | None] = [None] * n
    missing: list[int] = list(range(n))
    if cache is not None:  # without a cache (predict, evaluate) there is nothing to look up
        for i, digest in enumerate(FileHashes(cache.root).hashes(paths)):
            if isinstance(digest, OSError):
                ok[i] = False
                errors[i] = f"cannot read file: {digest.strerror or digest}"
            else:
                hashes[i] = digest
        readable = [i for i in range(n) if hashes[i] is not None]
        if keep_vectors:
            found = cache.get([hashes[i] for i in readable])
            missing = [i for i, vector in zip(readable, found, strict=True) if vector is None]
            for i, vector in zip(readable, found, strict=True):
                if vector is not None:
                    vectors[i] = vector
        else:
            present = cache.contains([hashes[i] for i in readable])
            missing = [i for i, found in zip(readable, present, strict=True) if not found]
    num_cached = n - len(missing) - len(errors)

    start = time.perf_counter()
    if missing:
        predict = _compiled_predict(model)
        dataset = image_dataset([paths[i] for i in missing], image_size, batch_size)
        progress = keras.utils.Progbar(len(missing), unit_name="image", verbose=verbose)
        pending_keys: list[str] = []
        pending_vectors: list[np.ndarray] = []
        done = 0
        # Ctrl-C acts between batches (never swallowed inside TensorFlow), after the vectors are saved.
        with runtime.interrupt_checkpoints() as check:
            try:
                for images, flags in dataset:
                    check()
                    batch_vectors = predict(images).numpy()
                    flags = flags.numpy()
                    for j, (vector, good) in enumerate(zip(batch_vectors, flags, strict=True)):
                        i = missing[done + j]
                        if good:
                            if keep_vectors:
                                vectors[i] = vector
                            pending_keys.append(hashes[i])
                            pending_vectors.append(vector)
                        else:
                            ok[i] = False
                            errors[i] = _decode_error(load_image, paths[i], image_size)
                    done += len(flags)
                    progress.update(done)
                    if cache is not None and len(pending_keys) >= flush_every:
                        cache.put(pending_keys, np.stack(pending_vectors))
                        pending_keys, pending_vectors = [], []
            except (KeyboardInterrupt, Exception):
                # Ctrl-C or a failure mid-way: keep every finished vector, so the next run resumes from here.
                if cache is not None and pending_keys:
                    with contextlib.suppress(Exception):  # e.g. the disk is full: the original error matters
                        cache.put(pending_keys, np.stack(pending_vectors))
                raise
            if cache is not None and pending_keys:
                cache.put(pending_keys, np.stack(pending_vectors))
    seconds = time.perf_counter() - start
    num_computed = len(missing) - sum(1 for i in missing if not ok[i])
    if cache is not None and cache.dir.is_dir():
        try:
            files.write_json(cache.dir / LAST_RUN_FILE, {
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "images": n, "cached": num_cached,
                "computed": num_computed, "hit_rate": round(num_cached / n, 4) if n else 0.0})
        except OSError as exc:
            raise _write_error(cache.dir / LAST_RUN_FILE, exc) from exc
    result = ExtractionResult(vectors, ok, errors, num_cached, num_computed, seconds)
    if views:
        from transferkit.views import extract_views

        extract_views(model, paths, hashes, result, cache, views, augmentation, batch_size=batch_size,
                      flush_every=flush_every, verbose=verbose, keep_vectors=keep_vectors)
    return result


def _compiled_predict(model):
    """One traced inference function (``model.predict`` per batch would re-trace and is slower)."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def predict(images):
        return model(images, training=False)

    return predict


def _decode_error(load_image, path: Path, image_size: int) -> str:
    """The reason an image failed inside the tf.data pipeline, recovered by decoding it again."""
    try:
        load_image(path, image_size)
    except Exception as exc:  # noqa: BLE001 - the reason is reported, the file skipped
        # load_image's message repeats the path, which the skipped list shows already: give the cause.
        cause = exc.__cause__ or exc
        return f"cannot decode image: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}"
    return "cannot decode image"


# ------------------------------------------------------------------------------ maintenance


def cache_summary(cache_dir: str | os.PathLike) -> list[dict]:
    """One row per FeatureSpec in a cache: settings, entries, shards, bytes, last run."""
    rows = []
    for spec_dir in cache_specs(cache_dir):
        shards = sorted(spec_dir.glob(SHARD_PATTERN))
        entries = 0
        for shard in shards:
            with contextlib.suppress(Exception):  # damaged shards are `verify`'s business
                entries += len(_read_keys(shard))
        last_run = spec_dir / LAST_RUN_FILE
        rows.append({
            "folder": spec_dir.name,
            "spec": json.loads((spec_dir / "spec.json").read_text()),
            "entries": entries,
            "shards": len(shards),
            "bytes": sum(s.stat().st_size for s in shards),
            "last_run": json.loads(last_run.read_text()) if last_run.is_file() else None,
        })
    return rows


def verify_cache(cache_dir: str | os.PathLike) -> tuple[int, list[tuple[Path, str]]]:
    """``(shards checked, [(damaged shard, reason), ...])`` over every spec of a cache."""
    shards = [s for spec_dir in cache_specs(cache_dir) for s in sorted(spec_dir.glob(SHARD_PATTERN))]
    return len(shards), [(s, r) for s in shards if (r := verify_shard(s)) is not None]


def _live_hashes(cache_dir: Path) -> set[str]:
    """Content hashes of files still present, unchanged, at a path this cache has hashed."""
    db_path = cache_dir / HASHES_FILE
    if not db_path.is_file():
        return set()
    live = set()
    with contextlib.closing(sqlite3.connect(db_path, timeout=60)) as db:
        for path, size, mtime_ns, digest in db.execute("SELECT path, size, mtime_ns, sha256 FROM hashes"):
            with contextlib.suppress(OSError):
                stat = os.stat(path)
                if stat.st_size == size and stat.st_mtime_ns == mtime_ns:
                    live.add(digest)
    return live


def prune_cache(cache_dir: str | os.PathLike, *, missing: bool = False, older_than: float | None = None) -> dict:
    """Drop entries whose images are gone (``missing``) or shards older than a time, and compact.

    An image is "gone" when no file this cache has hashed, at its recorded path, still has those
    bytes. Each spec's surviving vectors are rewritten into one shard (of up to ``PRUNE_SHARD_ROWS``
    vectors) before the old shards are deleted, so an interruption leaves duplicates (harmless), never
    a hole. Temporary files more than an hour old (left by killed runs) are deleted too.

    Args:
        cache_dir: the cache root.
        missing: drop vectors of images that are gone.
        older_than: drop shards last written before this POSIX time.

    Returns:
        ``{"entries_before", "entries_after", "shards_before", "shards_after"}``.
    """
    root = Path(cache_dir)
    live = _live_hashes(root) if missing else None
    report = dict.fromkeys(("entries_before", "entries_after", "shards_before", "shards_after"), 0)
    for spec_dir in cache_specs(root):
        shards = sorted(spec_dir.glob(SHARD_PATTERN))
        keep_keys: list[str] = []
        keep_vectors: list[np.ndarray] = []
        seen: set[str] = set()
        for shard in shards:
            if verify_shard(shard) is not None:
                continue  # damaged: dropped, its vectors will be computed again
            keys = _read_keys(shard)
            report["entries_before"] += len(keys)
            if older_than is not None and shard.stat().st_mtime < older_than:
                continue
            vectors = _read_rows(shard, np.arange(len(keys)))
            for key, vector in zip(keys, vectors, strict=True):
                if key not in seen and (live is None or key in live):
                    seen.add(key)
                    keep_keys.append(key)
                    keep_vectors.append(vector)
        report["shards_before"] += len(shards)
        # Shards of at most PRUNE_SHARD_ROWS vectors: a shard is built in memory before it is written.
        new = {_write_shard(spec_dir, keep_keys[i:i + PRUNE_SHARD_ROWS],
                            np.stack(keep_vectors[i:i + PRUNE_SHARD_ROWS]))
               for i in range(0, len(keep_keys), PRUNE_SHARD_ROWS)}
        for shard in shards:
            if shard not in new:
                shard.unlink(missing_ok=True)
        for tmp in spec_dir.glob(".*.tmp"):  # left by a killed writer; an hour is far beyond any write
            with contextlib.suppress(OSError):  # another process may finish or remove it meanwhile
                if time.time() - tmp.stat().st_mtime > 3600:
                    tmp.unlink()
        report["entries_after"] += len(keep_keys)
        report["shards_after"] += len(new)
    return report


def merge_caches(cache_dir: str | os.PathLike, sources: Sequence[str | os.PathLike]) -> dict:
    """Copy every sound shard of other caches (e.g. one per worker) into ``cache_dir``.

    Shards are named by content, so a shard already present is skipped and merging twice is
    harmless. Damaged shards are reported and not copied.

    Returns:
        ``{"copied", "already_present", "damaged": [(shard, reason), ...]}``.
    """
    import shutil

    target_root = Path(cache_dir)
    report: dict = {"copied": 0, "already_present": 0, "damaged": []}
    for source in sources:
        if not cache_specs(source):
            raise CacheError(f"'{source}' holds no transferkit feature cache (no <backbone>-<key>/spec.json).")
        for spec_dir in cache_specs(source):
            target_dir = target_root / spec_dir.name
            target_dir.mkdir(parents=True, exist_ok=True)
            if not (target_dir / "spec.json").exists():
                files.write_bytes(target_dir / "spec.json", (spec_dir / "spec.json").read_bytes())
            for shard in sorted(spec_dir.glob(SHARD_PATTERN)):
                if (target_dir / shard.name).exists():
                    report["already_present"] += 1
                elif (reason := verify_shard(shard)) is not None:
                    report["damaged"].append((shard, reason))
                else:
                    with files.atomic_path(target_dir / shard.name, suffix=".h5") as tmp:
                        shutil.copyfile(shard, tmp)
                    report["copied"] += 1
    return report


# ------------------------------------------------------------------------------ export

FEATURE_FORMATS = ("npz", "parquet", "csv")


def write_features(path: str | os.PathLike, file_format: str, rel_paths: Sequence[str], labels: np.ndarray,
                   class_names: Sequence[str], splits: Sequence[str], vectors: np.ndarray,
                   views: Sequence[int] | None = None) -> None:
    """Write features for another tool, atomically: one row per image (or per augmented view).

    npz holds arrays ``paths``, ``labels``, ``class_names``, ``splits``, ``features``; parquet and
    CSV hold columns ``path, label, class_name, split, f0 .. f{d-1}`` (flat columns, which every
    tool reads). With ``views`` (0 = the image itself, 1..K its augmented views), npz also holds
    ``views`` and the other formats a ``view`` column after ``split``.

    Example:
        >>> write_features("f.npz", "npz", ["a/1.jpg"], np.array([0]), ["a"], ["train"], np.ones((1, 2)))
        ... # doctest: +SKIP
    """
    if file_format not in FEATURE_FORMATS:
        raise ValueError(f"Unknown format {file_format!r}; allowed: {', '.join(FEATURE_FORMATS)}.")
    labels = np.asarray(labels)
    vectors = np.asarray(vectors, dtype=np.float32)
    if file_format == "npz":
        with files.atomic_path(path, suffix=".npz") as tmp:
            extra = {} if views is None else {"views": np.asarray(views, dtype=np.int64)}
            np.savez(tmp, paths=np.asarray(rel_paths, dtype=str), labels=labels,
                     class_names=np.asarray(class_names, dtype=str), splits=np.asarray(splits, dtype=str),
                     features=vectors, **extra)
        return
    columns = {"path": list(rel_paths), "label": labels.tolist(),
               "class_name": [class_names[i] for i in labels], "split": list(splits)}
    if views is not None:
        columns["view"] = [int(v) for v in views]
    columns.update({f"f{j}": vectors[:, j] for j in range(vectors.shape[1])})
    if file_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with files.atomic_path(path, suffix=".parquet") as tmp:
            pq.write_table(pa.table(columns), tmp)
    else:
        header = list(columns)
        files.write_csv(path, header, zip(*(columns[name] for name in header), strict=True))
