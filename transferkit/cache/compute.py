"""The pieces every backbone pass over image files shares (the images' own vectors in
:mod:`transferkit.cache.extraction`, the augmented views in :mod:`transferkit.cache.views`, and the
cache's deep verification): reading each file once (:func:`read_image`, :func:`read_dataset`),
the model's traced inference function (:func:`compiled_predict`), the vectors waiting to be
stored (:class:`PendingVectors`) and what a pass returns (:class:`ExtractionResult`).

Every image a pass touches is read once: the key a vector is stored under is the hash of the very
bytes that were decoded, so a file replaced or edited at any moment cannot put one image's vector
under another image's hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.cache.store import FeatureCache


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
    opener (:func:`transferkit.data.images.read_image_file`: regular files only, size limit) and decoded
    by :func:`transferkit.data.images.decode_image`, the decoder behind ``load_image`` (training and
    serving parity). ``is_cached(digest)`` true skips decoding. Never raises: a file that cannot be
    used gives ``None`` and a reason.

    Example:
        >>> pixels, read = read_image("photos/cat/001.jpg", 224)  # doctest: +SKIP
        >>> read.digest == hash_file("photos/cat/001.jpg")  # doctest: +SKIP
        True
    """
    from transferkit.data.images import decode_image, read_image_file, short_message

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
    """The one-line reason of a :func:`~transferkit.data.images.load_image` failure."""
    # load_image's message repeats the path, which the skipped list shows already: give the cause.
    cause = exc.__cause__ or exc
    return f"cannot decode image: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}"


def decode_error(path: Path, image_size: int) -> str:
    """The reason an image failed inside the tf.data pipeline, recovered by decoding it again."""
    from transferkit.data.images import load_image

    try:
        load_image(path, image_size)
    except Exception as exc:  # noqa: BLE001 - the reason is reported, the file skipped
        return decode_reason(exc)
    return "cannot decode image"
