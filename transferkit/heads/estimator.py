"""``BottleneckFeatures``: transferkit's cached backbone features as a scikit-learn transformer.

Image paths in, pooled features out, following the estimator contract (``__init__`` only stores,
``fit`` returns self, fitted attributes end in ``_``), so it works in a ``Pipeline``, with
``clone`` and in a grid search. Features come from (and fill) the same content-addressed cache as
``transferkit extract``.

Nothing here imports TensorFlow at module level.

Example:
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.pipeline import make_pipeline
    >>> model = make_pipeline(BottleneckFeatures("mobilenet_v2_035"), LogisticRegression())  # doctest: +SKIP
    >>> model.fit(paths, labels).predict(new_paths)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from transferkit.errors import DataError

log = logging.getLogger("transferkit")


class BottleneckFeatures(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Image paths in, pooled backbone features out: transferkit's features in your own scikit-learn code.

    Args:
        backbone: a registry name (``transferkit backbones`` lists them).
        weights: ``"imagenet"``, ``"none"`` (random; seeded by ``seed``) or a weights file.
        image_size: input size; None = the backbone's native size.
        batch_size: images per backbone call.
        cache_dir: a feature-cache folder to reuse and fill (None = compute every time).
        seed: Keras' global seed, set before building a randomly initialised backbone so
            its features (and cache entries) repeat.

    Attributes:
        backbone_spec_: the registry entry.
        resolved_weights_: where the weights came from.
        image_size_: the input size used.
        model_: the Keras backbone (raw RGB 0-255 in, pooled features out).
        weights_id_: fingerprint of the loaded weights (part of the cache key and of a saved head's identity).

    Example:
        >>> from sklearn.pipeline import make_pipeline
        >>> model = make_pipeline(BottleneckFeatures("mobilenet_v2_035"), LogisticRegression())  # doctest: +SKIP
        >>> model.fit(paths, labels).predict(new_paths)  # doctest: +SKIP
    """

    def __init__(self, backbone: str = "mobilenet_v2_035", weights: str = "imagenet", image_size: int | None = None,
                 batch_size: int = 32, cache_dir: str | os.PathLike | None = None, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.seed = seed

    def fit(self, X=None, y=None):
        """Build the backbone with its weights (the images are not needed, only the settings)."""
        from transferkit.cache import FeatureSpec
        from transferkit.models.registry import check_image_size, get_backbone
        from transferkit.models.weights import load_backbone, resolve_weights
        from transferkit.runtime import start_tensorflow

        spec = get_backbone(self.backbone)
        size = check_image_size(spec, self.image_size)
        resolved = resolve_weights(spec, self.weights, size)
        start_tensorflow()
        if resolved.path is None:
            import keras

            keras.utils.set_random_seed(self.seed)
        self.backbone_spec_ = spec
        self.resolved_weights_ = resolved
        self.image_size_ = size
        self.model_ = load_backbone(spec, resolved, size)
        self.feature_spec_ = FeatureSpec.for_model(self.backbone_spec_, self.model_)
        self.weights_id_ = self.feature_spec_.weights_id
        self._n_features_out = int(self.model_.output_shape[-1])
        return self

    def transform(self, X) -> np.ndarray:
        """``(n, feature_dim)`` float32 features of the image files ``X`` (a sequence of paths).

        Raises:
            DataError: an image could not be read or decoded (all failures are listed).
        """
        from transferkit.cache import FeatureCache, extract_features

        check_is_fitted(self, "model_")
        paths = [Path(str(p)) for p in np.asarray(X, dtype=object).ravel()]
        cache = None
        if self.cache_dir is not None:
            cache = FeatureCache(self.cache_dir, self.feature_spec_)
        result = extract_features(self.model_, paths, cache, batch_size=self.batch_size, verbose=0)
        if not result.ok.all():
            failed = "; ".join(f"{name}: {reason}" for name, reason in result.skipped_files([str(p) for p in paths]))
            raise DataError(f"{len(result.errors)} of {len(paths)} images could not be used: {failed}.")
        return result.vectors

    def identity(self, class_names: Sequence[str]) -> dict[str, Any]:
        """The backbone identity :func:`save_head` stores, for features from this transformer."""
        check_is_fitted(self, "model_")
        return {"backbone": self.backbone_spec_.name, "image_size": self.image_size_,
                "weights_id": self.weights_id_, "class_names": list(class_names)}

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.one_d_array = True
        tags.input_tags.string = True
        tags.target_tags.required = False
        return tags


# ----------------------------------------------------------------------------- whole folders (the CLI's commands)


def extract_folder(image_dir, backbone, weights, image_size, batch_size, cache_dir, cache_dtype, seed, quiet,
                   select=None, keep_vectors=True, strict=False, views=0):
    """Scan, check, then compute (or look up) the features of a folder: shared by extract and export.

    With ``views`` K, also K augmented views per image (TrainConfig's default strengths, ``seed``).

    Returns:
        ``(folder, relative paths extracted, ExtractionResult, FeatureCache)``; skipped files
        are logged (with ``strict``, any skipped file raises instead).
    """
    from transferkit import runtime
    from transferkit.cache import FeatureCache, FeatureSpec, default_cache_dir, extract_features
    from transferkit.config import TrainConfig
    from transferkit.data.checks import check_strict
    from transferkit.data.scan import scan_folder
    from transferkit.models.registry import check_image_size, get_backbone
    from transferkit.models.weights import load_backbone, resolve_weights
    from transferkit.serving import runs

    spec = get_backbone(backbone)
    size = check_image_size(spec, image_size)
    folder = scan_folder(image_dir, seed=seed)  # the hash split of train with the same --seed
    if strict:
        check_strict(folder.skipped)  # before any TensorFlow work
    paths = [p for p in folder.paths if select is None or select(p)]
    resolved = resolve_weights(spec, weights, size)
    cache_dir = runs.check_cache_dir(cache_dir or default_cache_dir(), (image_dir, folder.root))
    runtime.start_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)  # --weights none: the same seed gives the same vectors
    model = load_backbone(spec, resolved, size)
    cache = FeatureCache(cache_dir, FeatureSpec.for_model(spec, model, cache_dtype))
    augmentation = TrainConfig(image_dir=str(image_dir), output_dir="", seed=seed) if views else None
    result = extract_features(model, [folder.abs_path(p) for p in paths], cache, batch_size=batch_size,
                              verbose=0 if quiet else 1, keep_vectors=keep_vectors, views=views,
                              augmentation=augmentation)
    skipped = list(folder.skipped) + result.skipped_files(paths)
    if strict:
        check_strict(skipped)  # the vectors computed so far stay in the cache
    for rel, reason in skipped:
        log.warning("Skipped %s: %s", rel, reason)
    return folder, paths, result, cache


def export_folder_features(folder, paths, result, cache, output, file_format: str, seed: int,
                           augment_views: int = 0) -> tuple[int, int]:
    """``features export``'s file: one row per image extracted by :func:`extract_folder` (K + 1 per
    image with ``augment_views`` K), with its label and the split ``train`` would give it with
    ``seed``. Warns when a copy of one image sits in two splits.

    Returns:
        ``(rows written, feature dimension)``.
    """
    from transferkit.cache import FileHashes, write_features
    from transferkit.data.checks import dataset_warnings
    from transferkit.data.splits import assign_roles

    # The rows carry each image's split: say so when a copy of one image sits in two splits.
    hashes = FileHashes(cache.root).hashes([folder.abs_path(p) for p in folder.paths])  # remembered: no re-read
    for message in dataset_warnings(folder, hashes):
        log.warning(message)
    index = {p: i for i, p in enumerate(folder.paths)}
    rows = [index[p] for p, good in zip(paths, result.ok, strict=True) if good]
    used = np.zeros(len(folder.paths), dtype=bool)
    used[rows] = True
    # Train's rule, not the folders' names: a train/val folder's val/ is train's test split (and a
    # share of train/ its early-stopping val), so the split column is the split train uses.
    roles = assign_roles(folder, used, seed, check=False)
    vectors, views = result.vectors[result.ok], None
    if augment_views:  # K + 1 rows per image, image by image: view 0 (the image), then its views 1..K
        vectors = np.concatenate([vectors[:, None], result.view_vectors[result.ok]], axis=1)
        vectors = vectors.reshape(-1, vectors.shape[-1])
        rows = np.repeat(rows, augment_views + 1).tolist()
        views = np.tile(np.arange(augment_views + 1), len(rows) // (augment_views + 1))
    write_features(output, file_format, [folder.paths[i] for i in rows], folder.labels[rows], folder.class_names,
                   [str(roles[i]) for i in rows], vectors, views=views)
    return len(rows), result.vectors.shape[1]
