"""Test-time augmentation: the classic 10-crop of the ImageNet papers (AlexNet, VGG, ResNet).

Each image becomes ten views: the centre and the four corner crops, each covering
``CROP_FRACTION`` (0.875) of the image's width and height, resized back to the model's input
size, and the horizontal mirror of each. The model's probabilities over the ten views are
averaged. Everything is TensorFlow ops on whole batches (``tf.image.crop_and_resize`` crops
and resizes in one bilinear step), so it runs inside the prediction pipeline.

Example:
    >>> views = ten_crop(images)                      # doctest: +SKIP
    >>> probabilities = average_views(model(views))   # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

#: Side of each crop as a fraction of the image side (224 of 256 in the ImageNet recipe).
CROP_FRACTION = 0.875
#: Views per image: 5 crops x (as is, mirrored).
NUM_VIEWS = 10

TTA_DESCRIPTION = (f"10-crop: centre + 4 corner crops of {CROP_FRACTION:g} x the image side, resized back to "
                   "the input size, each also mirrored left-right; probabilities averaged")


def crop_boxes(crop_fraction: float = CROP_FRACTION) -> np.ndarray:
    """The five crop boxes ``[y1, x1, y2, x2]`` in normalised coordinates: centre, then the corners.

    Example:
        >>> crop_boxes(0.5)[0].tolist()
        [0.25, 0.25, 0.75, 0.75]
    """
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}.")
    f = float(crop_fraction)
    m = (1 - f) / 2
    return np.array([
        [m, m, m + f, m + f],          # centre
        [0, 0, f, f],                  # top left
        [0, 1 - f, f, 1],              # top right
        [1 - f, 0, 1, f],              # bottom left
        [1 - f, 1 - f, 1, 1],          # bottom right
    ], dtype=np.float32)


def ten_crop(images, crop_fraction: float = CROP_FRACTION):
    """The ten views of each image in a batch, image by image.

    Args:
        images: ``(n, H, W, 3)`` tensor or array of pixels (any dtype; values kept, 0-255).
        crop_fraction: crop side as a fraction of the image side.

    Returns:
        A ``float32`` tensor ``(n * 10, H, W, 3)``: rows ``10 i .. 10 i + 9`` are image ``i``'s
        views (centre, 4 corners, then their mirrors).
    """
    import tensorflow as tf

    images = tf.cast(tf.convert_to_tensor(images), tf.float32)
    n = tf.shape(images)[0]
    size = tf.shape(images)[1:3]
    boxes = tf.tile(tf.constant(crop_boxes(crop_fraction)), [n, 1])
    box_indices = tf.repeat(tf.range(n), 5)
    crops = tf.image.crop_and_resize(images, boxes, box_indices, size, method="bilinear")
    mirrored = tf.reverse(crops, axis=[2])
    shape = tf.concat([[n, 5], tf.shape(crops)[1:]], axis=0)
    views = tf.concat([tf.reshape(crops, shape), tf.reshape(mirrored, shape)], axis=1)
    return tf.reshape(views, tf.concat([[n * NUM_VIEWS], tf.shape(crops)[1:]], axis=0))


def average_views(probabilities) -> np.ndarray:
    """Average ``(n * 10, num_classes)`` per-view probabilities into ``(n, num_classes)``."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.shape[0] % NUM_VIEWS:
        raise ValueError(f"expected a multiple of {NUM_VIEWS} rows, got {probabilities.shape[0]}.")
    return probabilities.reshape(-1, NUM_VIEWS, probabilities.shape[-1]).mean(axis=1)
