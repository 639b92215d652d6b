"""Feature extraction: every image's vector from the store where present, one backbone pass for the rest.

This module owns :func:`extract_features` and what it returns (:class:`ExtractionResult`): looking
the images up by their remembered hashes (:class:`~transferkit.cache.keys.FileHashes`) in a
:class:`~transferkit.cache.store.FeatureCache`, running the backbone over a ``tf.data`` pipeline of
the rest, and :class:`PendingVectors`, which writes fresh vectors to the store as they come (every
``flush_every`` and on an interruption, so a killed run resumes where it stopped).

Every image the pipeline touches is read once (:func:`read_image`): the key a vector is stored
under is the hash of the very bytes that were decoded, so a file replaced or edited at any moment
cannot put one image's vector under another image's hash. The augmented views' pass
(:mod:`transferkit.views`) reuses the same pieces.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferkit import files, runtime
from transferkit.cache.keys import FileHashes
from transferkit.cache.store import LAST_RUN_FILE, FeatureCache, write_error
from transferkit.progress import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    from transferkit.config import TrainConfig


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


class PendingVectors:
    """Computed vectors not yet stored: written as one shard per cache once ``flush_every`` have
    gathered, and when leaving :meth:`kept`, even on Ctrl-C or an error.

    Example:
        >>> with PendingVectors(512).kept() as pending:  # doctest: +SKIP
        ...     for keys, vectors in batches:
        ...         for key, vector in zip(keys, vectors):
        ...             pending.add(cache, key, vector)
        ...         pending.flush_if_full()
    """

    def __init__(self, flush_every: int):
        self.flush_every = flush_every
        self._pending: dict[int, tuple[FeatureCache, list[str], list[np.ndarray]]] = {}

    def add(self, cache: FeatureCache | None, key: str, vector: np.ndarray) -> None:
        """Queue ``vector`` under ``key`` for ``cache`` (nothing to keep without a cache)."""
        if cache is not None:
            _, keys, vectors = self._pending.setdefault(id(cache), (cache, [], []))
            keys.append(key)
            vectors.append(vector)

    def full(self) -> bool:
        """Whether ``flush_every`` vectors have gathered."""
        return sum(len(keys) for _, keys, _ in self._pending.values()) >= self.flush_every

    def flush_if_full(self) -> None:
        if self.full():
            self.flush()

    def flush(self) -> None:
        for cache, keys, vectors in self._pending.values():
            cache.put(keys, np.stack(vectors))  # atomic: one shard per cache
        self._pending.clear()

    @contextlib.contextmanager
    def kept(self) -> Iterator[PendingVectors]:
        """Flush on the way out; on Ctrl-C or a failure keep every finished vector, so the next run
        resumes from here."""
        try:
            yield self
        except (KeyboardInterrupt, Exception):
            with contextlib.suppress(Exception):  # e.g. the disk is full: the original error matters
                self.flush()
            raise
        self.flush()


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

    image_size = int(model.input_shape[1])
    feature_dim = int(model.output_shape[-1])
    n = len(paths)
    vectors = np.zeros((n, feature_dim), dtype=np.float32) if keep_vectors else None
    ok = np.ones(n, dtype=bool)
    errors: dict[int, str] = {}

    hashes: list[str | None] = [None] * n
    todo: list[int] = list(range(n))
    num_cached = num_computed = 0
    memo = FileHashes(cache.root) if cache is not None else None
    remembered: dict[int, str] = {}  # image -> the hash the memo gave for its unchanged file
    if memo is not None:  # without a cache (predict, evaluate) there is nothing to look up
        # Unchanged files (same path and status as when last read) are looked up without reading them.
        for i, digest in enumerate(memo.lookup(paths)):
            if isinstance(digest, OSError):
                ok[i] = False
                errors[i] = f"cannot read file: {digest.strerror or digest}"
            elif digest is not None:
                remembered[i] = digest
        rows = list(remembered)
        for i, hit in zip(rows, cache.fill(list(remembered.values()), vectors, rows), strict=True):
            if hit:
                hashes[i] = remembered[i]
                num_cached += 1
        todo = [i for i in range(n) if ok[i] and hashes[i] is None]

    start = time.perf_counter()
    if todo:
        # The rest is read once each: hashed and looked up (a moved or copied file is a hit without
        # decoding), else decoded from those same bytes and run through the backbone.
        reads: dict[int, ImageRead] = {}  # position in todo -> what reading it gave (pipeline threads)
        if cache is not None:
            cache.contains([])  # load the shard index now, not in the pipeline's threads
        predict = compiled_predict(model)
        dataset = read_dataset([paths[i] for i in todo], image_size, batch_size, reads, cache)
        progress = progress_bar(len(todo), "image", verbose)
        noted: set[int] = set()

        def remember_reads() -> None:
            """New hashes into the memo, before the vectors they key are stored (on a full disk the
            error then names the index, which cannot grow either)."""
            fresh = [(position, read) for position, read in list(reads.items())
                     if position not in noted and read.status is not None
                     and read.digest != remembered.get(todo[position])]
            if memo is not None:
                memo.remember((paths[todo[position]], read.status, read.digest) for position, read in fresh)
            noted.update(position for position, _ in fresh)

        try:
            # Ctrl-C acts between batches (never swallowed inside TensorFlow), after the vectors are saved.
            with runtime.interrupt_checkpoints() as check, PendingVectors(flush_every).kept() as pending:
                for images, positions in dataset:
                    check()
                    batch_vectors = predict(images).numpy()
                    positions = positions.numpy()
                    for vector, position in zip(batch_vectors, positions, strict=True):
                        i = todo[position]
                        hashes[i] = reads[position].digest  # of the bytes decoded, whatever the memo said
                        if keep_vectors:
                            vectors[i] = vector
                        pending.add(cache, hashes[i], vector)
                    num_computed += len(batch_vectors)
                    progress.update(int(positions[-1]) + 1)  # in order: every file before it is done
                    if pending.full():
                        remember_reads()
                        pending.flush()
                remember_reads()
        except BaseException:
            with contextlib.suppress(Exception):  # it only saves a read: the original error matters
                remember_reads()  # what was read is remembered, even after an interruption
            raise
        progress.update(len(todo))
        moved = []
        for position, i in enumerate(todo):
            read = reads[position]
            if read.reason is not None:
                ok[i] = False
                errors[i] = read.reason
            elif read.cached:
                hashes[i] = read.digest
                moved.append(i)
        if moved:  # moved, copied or renamed files: the vectors of their bytes were stored before
            for i, hit in zip(moved, cache.fill([hashes[i] for i in moved], vectors, moved), strict=True):
                if hit:
                    num_cached += 1
                else:  # its shard was found damaged and set aside meanwhile
                    ok[i] = False
                    errors[i] = "its cached vector became unreadable during extraction; run again to compute it"
    seconds = time.perf_counter() - start
    if cache is not None and cache.dir.is_dir():
        try:
            files.write_json(cache.dir / LAST_RUN_FILE, {
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "images": n, "cached": num_cached,
                "computed": num_computed, "hit_rate": round(num_cached / n, 4) if n else 0.0})
        except OSError as exc:
            raise write_error(cache.dir / LAST_RUN_FILE, exc) from exc
    result = ExtractionResult(vectors, ok, errors, num_cached, num_computed, seconds)
    if views:
        from transferkit.views import extract_views

        extract_views(model, paths, hashes, result, cache, views, augmentation, batch_size=batch_size,
                      flush_every=flush_every, verbose=verbose, keep_vectors=keep_vectors)
    return result


#: The traced inference function of each live model: tracing MobileNetV2 costs about a second,
#: paid once per model, not once per extraction (views, incremental runs, benchmarks).
_PREDICT_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_predict(model):
    """The model's traced inference function (``model.predict`` per batch would re-trace and is slower)."""
    predict = _PREDICT_FUNCTIONS.get(model)
    if predict is None:
        import tensorflow as tf

        live = weakref.ref(model)  # a strong reference here would keep the model (the key) alive forever

        @tf.function(reduce_retracing=True)
        def predict(images):
            return live()(images, training=False)

        _PREDICT_FUNCTIONS[model] = predict
    return predict


@dataclass(frozen=True)
class ImageRead:
    """What reading one image file once gave (see :func:`read_image`).

    Attributes:
        digest: SHA-256 of the bytes read (``None`` when they could not be read).
        status: the file's status the bytes were read under, ``None`` when it changed while being
            read (the hash is then not remembered for it).
        reason: why the image gives no vector (cannot be read or decoded), else ``None``.
        cached: the cache already holds the vector of these bytes, so they were not decoded.
    """

    digest: str | None
    status: os.stat_result | None
    reason: str | None = None
    cached: bool = False


def read_image(path: str | os.PathLike, size: int, is_cached=None) -> tuple[np.ndarray | None, ImageRead]:
    """Read a file once, hash the bytes, and decode those same bytes: ``(uint8 pixels or None, read)``.

    The one place extraction and augmented views read an image, so a vector is always stored under
    the hash of the bytes it was computed from. The file is opened by the images module's safe
    opener (:func:`transferkit.images.read_image_file`: regular files only, size limit) and decoded
    by :func:`transferkit.images.decode_image`, the decoder behind ``load_image`` (training and
    serving parity). ``is_cached(digest)`` true skips decoding. Never raises: a file that cannot be
    used gives ``None`` and a reason.

    Example:
        >>> pixels, read = read_image("photos/cat/001.jpg", 224)  # doctest: +SKIP
        >>> read.digest == hash_file("photos/cat/001.jpg")  # doctest: +SKIP
        True
    """
    from transferkit.images import decode_image, read_image_file, short_message

    try:
        data, status = read_image_file(path)
    except Exception as exc:  # noqa: BLE001 - ImageFileError's message is the reason; anything else too
        return None, ImageRead(None, None, short_message(exc))
    digest = hashlib.sha256(data).hexdigest()
    if is_cached is not None and is_cached(digest):
        return None, ImageRead(digest, status, cached=True)
    try:
        return decode_image(data, size), ImageRead(digest, status)
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop a pipeline of thousands
        return None, ImageRead(digest, status, f"cannot decode image: {short_message(exc)}")


def read_dataset(paths: Sequence[str | os.PathLike], size: int, batch_size: int, reads: dict[int, ImageRead],
                 cache: FeatureCache | None = None):
    """A ``tf.data.Dataset`` of ``(images, positions)`` batches: the files of ``paths`` that decoded,
    in order, each read once by :func:`read_image` in parallel; ``images`` float32 raw 0..255.

    What each file's read gave lands in ``reads[position]`` (its hash, or why it was skipped) before
    its image is batched. Files whose bytes already have a vector in ``cache`` are not decoded.
    """
    import tensorflow as tf

    blank = np.zeros((size, size, 3), dtype=np.float32)
    is_cached = (lambda digest: cache.contains([digest])[0]) if cache is not None else None

    def _read(position) -> tuple[np.ndarray, np.bool_]:
        position = int(position)
        image, reads[position] = read_image(paths[position], size, is_cached)
        return (blank, np.bool_(False)) if image is None else (image.astype(np.float32), np.bool_(True))

    def _map(position):
        image, decoded = tf.numpy_function(_read, [position], [tf.float32, tf.bool], stateful=False)
        image.set_shape((size, size, 3))
        decoded.set_shape(())
        return image, position, decoded

    return (tf.data.Dataset.range(len(paths))
            .map(_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .filter(lambda _image, _position, decoded: decoded)
            .map(lambda image, position, _decoded: (image, position))
            .batch(int(batch_size))
            .prefetch(tf.data.AUTOTUNE))


def decode_reason(exc: BaseException) -> str:
    """The one-line reason of a :func:`~transferkit.images.load_image` failure."""
    # load_image's message repeats the path, which the skipped list shows already: give the cause.
    cause = exc.__cause__ or exc
    return f"cannot decode image: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}"


def decode_error(path: Path, image_size: int) -> str:
    """The reason an image failed inside the tf.data pipeline, recovered by decoding it again."""
    from transferkit.images import load_image

    try:
        load_image(path, image_size)
    except Exception as exc:  # noqa: BLE001 - the reason is reported, the file skipped
        return decode_reason(exc)
    return "cannot decode image"
