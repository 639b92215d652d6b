"""Augmented views in the feature cache: a head trains with augmentation, the backbone runs once.

``--augment-views K`` stores, besides each image's own vector (view 0), the vectors of K augmented
views of it (views 1..K: crops, flips, colour shifts at the strengths of ``--augment``). A view is
a function of the image's bytes, its number, the augmentation settings and the seed only (stateless
TensorFlow ops, :func:`transferkit.data.augment.augmented_view`), so its vector can be cached for good:

* each view k has its own :class:`~transferkit.cache.FeatureSpec` (the image's spec plus the
  settings, :func:`augmentation_id`, and ``view=k``) and its own cache folder, keyed by the image's
  content hash like view 0: renaming an image keeps every view, ``cache prune``, ``verify`` and
  ``merge`` treat views like any other vectors, and changing any setting is a miss, never a stale
  vector;
* view 0 keeps the key it always had, so caches written before views existed stay valid.

Example::

    result = extract_features(backbone, paths, cache, views=4, augmentation=config)
    features, labels, train_idx = with_view_rows(result, labels, train_idx)  # 5 rows per training image
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transferkit.cache import compute
from transferkit.cache.compute import ExtractionResult
from transferkit.cache.keys import hash_file
from transferkit.cache.store import FeatureCache
from transferkit.config import TrainConfig
from transferkit.data.augment import augmented_view, view_seed
from transferkit.progress import progress_bar

#: Bumped whenever :func:`transferkit.data.augment.augmented_view` changes the pixels it makes: part of
#: every view's key, so cached views of the old algorithm stop matching.
VIEWS_VERSION = 1

_STRENGTHS = ("crop", "rotation", "zoom", "translation", "brightness", "contrast", "saturation", "pca")


def augmentation_id(config: TrainConfig) -> str:
    """The settings that shape an augmented view, as one canonical string (part of the view's key).

    Example:
        >>> augmentation_id(TrainConfig(image_dir="p", output_dir="r"))
        'v1 flip=1 crop=0.35 rotation=0.05 zoom=0 translation=0 brightness=0.2 contrast=0.2 saturation=0 pca=0.1 seed=0'
    """
    strengths = " ".join(f"{name}={getattr(config, f'augment_{name}'):.6g}" for name in _STRENGTHS)
    return f"v{VIEWS_VERSION} flip={int(config.augment_flip)} {strengths} seed={config.seed}"


def view_caches(cache: FeatureCache, views: int, config: TrainConfig) -> list[FeatureCache]:
    """The caches of views 1..``views`` of ``cache``'s features (one folder each, beside it)."""
    settings = augmentation_id(config)
    return [FeatureCache(cache.root, cache.spec.for_view(settings, k)) for k in range(1, views + 1)]


def extract_views(model, paths: Sequence[Path], hashes: Sequence[str | None], result: ExtractionResult,
                  cache: FeatureCache | None, views: int, config: TrainConfig | None, *, batch_size: int = 32,
                  flush_every: int = 512, verbose: int = 1, keep_vectors: bool = True) -> None:
    """Fill ``result``'s view fields: K augmented views of every image that decoded (``result.ok``).

    Called by :func:`transferkit.cache.extract_features` after the images' own vectors; computes
    only the (image, view) pairs missing from the cache, writing them as it goes (every
    ``flush_every`` views, and on an interruption), so a killed run resumes where it stopped.
    ``hashes`` are the content hashes of the bytes extract_features decoded; each image is read
    again here and its views are stored only if its bytes still have that hash.
    """

    if views < 1:
        raise ValueError(f"views must be a positive integer, got {views!r}.")
    config = config or TrainConfig(image_dir="", output_dir="")
    image_size = int(model.input_shape[1])
    feature_dim = int(model.output_shape[-1])
    n = len(paths)
    images = [i for i in range(n) if result.ok[i]]
    digests = {i: hashes[i] or hash_file(paths[i]) for i in images}
    caches = view_caches(cache, views, config) if cache is not None else [None] * views
    view_vectors = np.zeros((n, views, feature_dim), dtype=np.float32) if keep_vectors else None
    missing = np.ones((n, views), dtype=bool)
    missing[[i for i in range(n) if not result.ok[i]]] = False
    if cache is not None:
        keys = [digests[i] for i in images]
        for k, view_cache in enumerate(caches):
            out = view_vectors[:, k] if keep_vectors else None  # a view: found vectors land in view_vectors
            missing[images, k] = ~view_cache.fill(keys, out, images)
    pairs = [(i, k) for i in range(n) for k in range(views) if missing[i, k]]  # the dataset's order
    result.num_views_cached = len(images) * views - len(pairs)

    start = time.perf_counter()
    computed = 0
    if pairs:
        todo = [i for i in range(n) if missing[i].any()]
        seeds = np.stack([[view_seed(digests[i], k + 1, config.seed) for k in range(views)] for i in todo])
        dataset = view_dataset([paths[i] for i in todo], seeds, missing[todo], image_size, batch_size, config,
                               digests=[digests[i] for i in todo])
        predict = compute.compiled_predict(model)
        progress = progress_bar(len(pairs), "view", verbose)
        done = 0
        with compute.PendingVectors(flush_every).kept() as pending:  # one shard per view's cache
            for batch, flags in dataset:
                batch_vectors = predict(batch).numpy()
                for (i, k), vector, good in zip(pairs[done:done + len(batch_vectors)], batch_vectors,
                                                flags.numpy(), strict=True):
                    if not good:  # its bytes now are not the ones its own vector (and seeds) came from
                        result.ok[i] = False
                        result.errors.setdefault(i, "the file changed during extraction; run again")
                        continue
                    computed += 1
                    if keep_vectors:
                        view_vectors[i, k] = vector
                    pending.add(caches[k], digests[i], vector)
                done += len(batch_vectors)
                progress.update(done)
                pending.flush_if_full()
    result.views_seconds = time.perf_counter() - start
    result.num_views_computed = computed
    result.view_vectors = view_vectors


def view_dataset(paths: Sequence[str | os.PathLike], seeds: np.ndarray, wanted: np.ndarray, size: int,
                 batch_size: int, config: TrainConfig, *, digests: Sequence[str] | None = None):
    """A ``tf.data.Dataset`` of ``(views, ok)`` batches: for each image in order, the views ``k``
    where ``wanted[i, k]``, made with ``seeds[i, k]`` (each image is read and decoded once).

    Images are read once and decoded by :func:`transferkit.cache.compute.read_image` (the
    decoder of the cache's own vectors). With ``digests``, an image whose bytes no longer hash to
    ``digests[i]`` (the key its views are stored under, and their seeds' source) gives ``ok``
    False, like an image that fails to decode: its views are blank and must not be stored.
    """
    import tensorflow as tf

    views = int(seeds.shape[1])
    blank = np.zeros((size, size, 3), dtype=np.float32)

    def _decode(position) -> tuple[np.ndarray, np.bool_]:
        position = int(position)
        image, read = compute.read_image(paths[position], size)
        if image is None or (digests is not None and read.digest != digests[position]):
            return blank, np.bool_(False)
        return image.astype(np.float32), np.bool_(True)

    def _views(position, image_seeds, image_wanted):
        image, ok = tf.numpy_function(_decode, [position], [tf.float32, tf.bool], stateful=False)
        image.set_shape((size, size, 3))
        ok.set_shape(())
        made = tf.map_fn(lambda seed: augmented_view(image, seed, config), image_seeds,
                         fn_output_signature=tf.TensorSpec((size, size, 3), tf.float32))
        return made, image_wanted, tf.fill([views], ok)

    positions = np.arange(len(paths), dtype=np.int64)
    return (tf.data.Dataset.from_tensor_slices((positions, seeds.astype(np.int64), wanted.astype(bool)))
            .map(_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .unbatch()
            .filter(lambda _view, want, _ok: want)
            .map(lambda view, _want, ok: (view, ok))
            .batch(int(batch_size))
            .prefetch(tf.data.AUTOTUNE))


def with_view_rows(result: ExtractionResult, labels: np.ndarray,
                   train_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features and labels with the augmented views of the training images appended as extra rows.

    The first ``n`` rows are ``result.vectors`` unchanged, so validation and test indices stay
    valid; the returned training index lists each training image's own row and then its K views.
    Without views, the inputs come back as they are.

    Example:
        >>> features, labels, train_idx = with_view_rows(result, labels, train_idx)  # doctest: +SKIP
        >>> head = fit_softmax_head(features, labels, train_idx, val_idx, test_idx, config)  # doctest: +SKIP
    """
    labels = np.asarray(labels)
    train_idx = np.asarray(train_idx)
    if result.view_vectors is None or result.view_vectors.shape[1] == 0:
        return result.vectors, labels, train_idx
    extra = result.view_vectors[train_idx].reshape(-1, result.vectors.shape[1])  # image-major: i's views together
    features = np.concatenate([result.vectors, extra])
    all_labels = np.concatenate([labels, np.repeat(labels[train_idx], result.view_vectors.shape[1])])
    n = len(result.vectors)
    return features, all_labels, np.concatenate([train_idx, np.arange(n, n + len(extra))])


def view_groups(result: ExtractionResult, train_idx: np.ndarray) -> np.ndarray | None:
    """The source image of each row :func:`with_view_rows` returns (None without views), so that
    cross-validation keeps an image and its views in one fold: a view held out while its image
    trains would make weak regularisation look better than it is (measured: ants/bees with 2 views
    chose C = 31.6 from such leaky folds)."""
    if result.view_vectors is None or result.view_vectors.shape[1] == 0:
        return None
    views = np.repeat(np.asarray(train_idx), result.view_vectors.shape[1])
    return np.concatenate([np.arange(len(result.vectors)), views])


def training_rows(result: ExtractionResult, labels: np.ndarray, train_idx: np.ndarray) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
    """``(X, y)`` of the training images: their own vectors, then their K augmented views.

    Example:
        >>> X, y = training_rows(result, labels, train_idx)  # doctest: +SKIP
        >>> LinearSVC().fit(X, y)  # doctest: +SKIP
    """
    features, all_labels, rows = with_view_rows(result, labels, train_idx)
    return features[rows], all_labels[rows]
