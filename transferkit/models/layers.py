"""Custom Keras layers saved inside transferkit models.

Imports Keras at module level: import this module lazily.
"""

from __future__ import annotations

import keras
from keras.applications import imagenet_utils

from transferkit.config import PREPROCESSING_MODES


@keras.saving.register_keras_serializable(package="transferkit")
class Preprocess(keras.layers.Layer):
    """Backbone preprocessing as a layer, so a saved model takes raw RGB pixels (0-255).

    Delegates to Keras' own ``imagenet_utils.preprocess_input`` so training and serving use
    exactly the arithmetic Keras documents for each family; it holds no weights, so Keras'
    HDF5 weight files still load by layer order.

    Args:
        mode: ``"tf"`` (scale to [-1, 1]), ``"caffe"`` (RGB->BGR, subtract ImageNet mean),
            ``"torch"`` (scale to [0, 1], normalise by ImageNet mean/std) or ``"none"``
            (the backbone rescales inside, e.g. EfficientNet and ConvNeXt).

    Example:
        >>> layer = Preprocess(mode="tf")
        >>> float(layer(keras.ops.full((1, 2, 2, 3), 255.0))[0, 0, 0, 0])
        1.0
    """

    def __init__(self, mode: str = "tf", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"Unknown preprocessing mode {mode!r}; allowed: {', '.join(PREPROCESSING_MODES)}.")
        self.mode = mode

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        if self.mode == "none":
            return x
        return imagenet_utils.preprocess_input(x, data_format="channels_last", mode=self.mode)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="transferkit")
class MirrorBatch(keras.layers.Layer):
    """Test-time flip averaging, first half: each image and its left-right mirror in one batch.

    ``(n, h, w, c) -> (2n, h, w, c)``: the n images, then their mirrors. The backbone then runs
    once on the doubled batch and :class:`MirrorMean` averages each image's two pooled features,
    so the features the head sees (in training, from the cache, and in the saved model) are
    ``(f(x) + f(mirror(x))) / 2``. Measured on mobilenet_v2 (README, Results): +1.3 points on
    ants/bees and on sign digits for the freeze-all head, at twice the extraction cost.
    """

    def call(self, inputs):
        return keras.ops.concatenate([inputs, keras.ops.flip(inputs, axis=2)], axis=0)

    def compute_output_shape(self, input_shape):
        return (None, *input_shape[1:])


@keras.saving.register_keras_serializable(package="transferkit")
class MirrorMean(keras.layers.Layer):
    """Test-time flip averaging, second half: ``(2n, d) -> (n, d)``, the mean of each image's
    features and its mirror's (the batch :class:`MirrorBatch` made)."""

    def call(self, inputs):
        return keras.ops.mean(keras.ops.reshape(inputs, (2, -1, inputs.shape[-1])), axis=0)

    def compute_output_shape(self, input_shape):
        return input_shape
