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

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from transferkit.errors import DataError


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
        """``(n, feature_dim)`` float32 features of the image files ``X``: a sequence of paths, or one
        folder or ``.csv``/``.jsonl`` manifest, labelled or not, whose rows come in the order of
        ``scan_folder(X, labels="optional").paths`` (files it skips are left out).

        Raises:
            DataError: an image could not be read or decoded (all failures are listed).
        """
        from transferkit.cache import FeatureCache, extract_features

        check_is_fitted(self, "model_")
        if isinstance(X, (str, os.PathLike)):
            from transferkit.data.scan import scan_folder

            folder = scan_folder(X, seed=self.seed, labels="optional")
            paths = [folder.abs_path(p) for p in folder.paths]
        else:
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
        """The backbone identity :func:`transferkit.heads.saving.save_head` stores, for features from
        this transformer."""
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
