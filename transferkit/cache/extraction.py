"""Feature extraction: every image's vector from the store where present, one backbone pass for the rest.

This module owns :func:`extract_features` and what it returns (:class:`ExtractionResult`): hashing
the images (through :class:`~transferkit.cache.keys.FileHashes`), looking them up in a
:class:`~transferkit.cache.store.FeatureCache`, running the backbone over a ``tf.data`` pipeline of
the missing ones, and :class:`PendingVectors`, which writes fresh vectors to the store as they come
(every ``flush_every`` and on an interruption, so a killed run resumes where it stopped). The
augmented views' pass (:mod:`transferkit.views`) reuses the same pieces.
"""

from __future__ import annotations

import contextlib
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
from transferkit.progress import keras_verbose

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

    def flush_if_full(self) -> None:
        if sum(len(keys) for _, keys, _ in self._pending.values()) >= self.flush_every:
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
    import keras

    from transferkit.images import image_dataset

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
        found = cache.fill([hashes[i] for i in readable], vectors, readable)
        missing = [i for i, hit in zip(readable, found, strict=True) if not hit]
    num_cached = n - len(missing) - len(errors)

    start = time.perf_counter()
    if missing:
        predict = compiled_predict(model)
        dataset = image_dataset([paths[i] for i in missing], image_size, batch_size)
        progress = keras.utils.Progbar(len(missing), unit_name="image", verbose=keras_verbose(verbose))
        done = 0
        # Ctrl-C acts between batches (never swallowed inside TensorFlow), after the vectors are saved.
        with runtime.interrupt_checkpoints() as check, PendingVectors(flush_every).kept() as pending:
            for images, flags in dataset:
                check()
                batch_vectors = predict(images).numpy()
                flags = flags.numpy()
                for j, (vector, good) in enumerate(zip(batch_vectors, flags, strict=True)):
                    i = missing[done + j]
                    if good:
                        if keep_vectors:
                            vectors[i] = vector
                        pending.add(cache, hashes[i], vector)
                    else:
                        ok[i] = False
                        errors[i] = decode_error(paths[i], image_size)
                done += len(flags)
                progress.update(done)
                pending.flush_if_full()
    seconds = time.perf_counter() - start
    num_computed = len(missing) - sum(1 for i in missing if not ok[i])
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


def decode_error(path: Path, image_size: int) -> str:
    """The reason an image failed inside the tf.data pipeline, recovered by decoding it again."""
    from transferkit.images import load_image

    try:
        load_image(path, image_size)
    except Exception as exc:  # noqa: BLE001 - the reason is reported, the file skipped
        # load_image's message repeats the path, which the skipped list shows already: give the cause.
        cause = exc.__cause__ or exc
        return f"cannot decode image: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}"
    return "cannot decode image"
