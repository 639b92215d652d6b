"""Training-time augmentation and the tf.data pipeline of live images for fine-tuning.

Augmentation runs inside the tf.data pipeline (Keras preprocessing layers called in training
mode), never in the saved model: the exported graph stays raw pixels -> preprocessing ->
backbone -> head, and evaluation, serving and Grad-CAM never see a random layer.

The random resized crop (Inception / ResNet training recipe) and AlexNet's "fancy PCA" colour
shift are written with tf.image ops here: Keras 3 has neither as a layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from transferkit.config import TrainConfig

#: Eigenvalues and eigenvectors (columns) of the RGB covariance of ImageNet pixels in [0, 1], as
#: published with AlexNet's PCA colour augmentation (values from fb.resnet.torch).
IMAGENET_EIGENVALUES = np.array([0.2175, 0.0188, 0.0045], dtype=np.float32)
IMAGENET_EIGENVECTORS = np.array([[-0.5675, 0.7192, 0.4009],
                                  [-0.5808, -0.0045, -0.8140],
                                  [-0.5836, -0.6948, 0.4203]], dtype=np.float32)

#: Decoded training images are kept in memory (uint8) up to this many bytes; above it they are
#: decoded again every epoch.
MAX_CACHED_BYTES = 3 << 30


def describe_augmentation(config: TrainConfig) -> str:
    """One line naming the augmentations a config turns on (``none`` when ``--augment`` is off)."""
    if not config.augment:
        return "none"
    parts = []
    if config.augment_flip:
        parts.append("horizontal flip")
    if config.augment_crop < 1:
        parts.append(f"random resized crop (scale {config.augment_crop:g}-1)")
    for name in ("rotation", "zoom", "translation", "brightness", "contrast", "saturation", "pca"):
        value = getattr(config, f"augment_{name}")
        if value:
            parts.append(f"{'PCA colour' if name == 'pca' else name} {value:g}")
    return ", ".join(parts) or "none"


def batch_augmentation(config: TrainConfig, seed: int) -> Callable | None:
    """The batch-level augmentations (Keras preprocessing layers) as one callable, or None.

    Images are floats in 0-255; every layer is told so (``value_range``).
    """
    if not config.augment:
        return None
    import keras

    layers = []
    if config.augment_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if config.augment_rotation:
        layers.append(keras.layers.RandomRotation(config.augment_rotation, fill_mode="reflect", seed=seed + 1))
    if config.augment_zoom:
        layers.append(keras.layers.RandomZoom(config.augment_zoom, fill_mode="reflect", seed=seed + 2))
    if config.augment_translation:
        layers.append(keras.layers.RandomTranslation(config.augment_translation, config.augment_translation,
                                                     fill_mode="reflect", seed=seed + 3))
    if config.augment_brightness:
        layers.append(keras.layers.RandomBrightness(config.augment_brightness, value_range=(0, 255), seed=seed + 4))
    if config.augment_contrast:
        layers.append(keras.layers.RandomContrast(config.augment_contrast, value_range=(0, 255), seed=seed + 5))
    if config.augment_saturation:
        layers.append(keras.layers.RandomSaturation((0.5 - config.augment_saturation / 2,
                                                     0.5 + config.augment_saturation / 2),
                                                    value_range=(0, 255), seed=seed + 6))
    pca = config.augment_pca

    def apply(images):
        for layer in layers:
            images = layer(images, training=True)
        if pca:
            images = pca_colour_shift(images, pca, seed + 7)
        return images

    return apply


def pca_colour_shift(images, strength: float, seed: int):
    """AlexNet's PCA colour augmentation on a batch of 0-255 images.

    Each image gets ``eigvecs @ (alpha * eigvals) * 255`` added to every pixel, with
    ``alpha ~ N(0, strength)`` per image and channel.
    """
    import tensorflow as tf

    alpha = tf.random.normal((tf.shape(images)[0], 3), stddev=strength, seed=seed)
    shift = tf.matmul(alpha * IMAGENET_EIGENVALUES, IMAGENET_EIGENVECTORS, transpose_b=True) * 255.0
    return tf.clip_by_value(images + shift[:, None, None, :], 0.0, 255.0)


def random_resized_crop(image, size: int, min_scale: float, seed: int):
    """Crop a random region (``min_scale``-100% of the area, aspect 3/4-4/3) and resize it to ``size``."""
    import tensorflow as tf

    begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(min_scale, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True, seed=seed)
    crop = tf.slice(image, begin, crop_size)
    return tf.image.resize(crop, (size, size), method="bilinear")


def training_images(paths: Sequence[str], labels: np.ndarray, size: int, batch_size: int, *, config: TrainConfig,
                    shuffle: bool, seed: int, sample_weights: np.ndarray | None = None, balanced: bool = False):
    """A ``tf.data.Dataset`` of ``(images, labels[, weights])`` batches from image files.

    Images are decoded once with :func:`transferkit.data.load_image` (the same decoding as the
    feature cache and prediction), kept in memory as uint8 when they fit, then shuffled,
    augmented (when ``shuffle`` and ``config.augment``) and batched; decoding and augmentation
    overlap with training through ``prefetch``.

    Args:
        paths: files that are known to decode (the extraction's ``ok`` images).
        balanced: draw every class equally often (``--sampling balanced``); an epoch then has
            as many batches as the natural order would.
    """
    import tensorflow as tf

    from transferkit.data import load_image

    labels = np.asarray(labels, dtype=np.int32)

    def _decode(raw_path: bytes) -> np.ndarray:
        return load_image(os.fsdecode(raw_path), size).astype(np.uint8)

    def _load(raw_path, label, *rest):
        image = tf.numpy_function(_decode, [raw_path], tf.uint8, stateful=False)
        image.set_shape((size, size, 3))
        return (image, label, *rest)

    columns = [tf.constant([os.fsencode(p) for p in paths], dtype=tf.string, shape=(len(paths),)), labels]
    if sample_weights is not None:
        columns.append(np.asarray(sample_weights, dtype=np.float32))
    dataset = tf.data.Dataset.from_tensor_slices(tuple(columns)).map(_load, num_parallel_calls=tf.data.AUTOTUNE)
    if len(paths) * size * size * 3 <= MAX_CACHED_BYTES:
        dataset = dataset.cache()
    if balanced:
        per_class = [dataset.filter(lambda _image, label, *_rest, c=c: label == c).repeat()
                     for c in np.unique(labels)]
        dataset = tf.data.Dataset.sample_from_datasets(per_class, seed=seed).take(len(paths))
    if shuffle:
        dataset = dataset.shuffle(min(len(paths), 4096), seed=seed, reshuffle_each_iteration=True)
    augment = config.augment and shuffle
    crop_scale = config.augment_crop

    def _per_image(image, label, *rest):
        image = tf.cast(image, tf.float32)
        if augment and crop_scale < 1:
            image = random_resized_crop(image, size, crop_scale, seed)
        return (image, label, *rest)

    dataset = dataset.map(_per_image, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    batch_augment = batch_augmentation(config, seed) if augment else None
    if batch_augment is not None:
        dataset = dataset.map(lambda image, *rest: (batch_augment(image), *rest),
                              num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)
