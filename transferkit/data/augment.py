"""Training-time augmentation and the tf.data pipeline of live images for fine-tuning.

Augmentation runs inside the tf.data pipeline (Keras preprocessing layers called in training
mode), never in the saved model: the exported graph stays raw pixels -> preprocessing ->
backbone -> head, and evaluation, serving and Grad-CAM never see a random layer.

The random resized crop (Inception / ResNet training recipe) and AlexNet's "fancy PCA" colour
shift are written with tf.image ops here: Keras 3 has neither as a layer.
"""

from __future__ import annotations

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
    """One line naming the augmentations the fine-tune phase applies (``none`` when ``--augment`` is off)."""
    parts = _augmentation_parts(config) if config.augment else []
    return ", ".join(parts) or "none"


def describe_views(config: TrainConfig) -> str:
    """What the head trains on with ``--augment-views K`` (views use the strengths whatever ``--augment``
    says, see :func:`augmented_view`), or ``""`` without views.

    Example:
        >>> describe_views(TrainConfig("photos", "run", augment_views=2, augment_rotation=0))[:54]
        'each training image and 2 cached augmented views of it'
    """
    if not config.augment_views:
        return ""
    return (f"each training image and {config.augment_views} cached augmented view{'s' * (config.augment_views > 1)} "
            f"of it ({', '.join(_augmentation_parts(config)) or 'no augmentation: every strength is 0'})")


def describe_run_augmentation(config: TrainConfig, fine_tunes: bool) -> str:
    """``metrics.json``'s ``augmentation``: what each phase of a run trained on.

    Example:
        >>> describe_run_augmentation(TrainConfig("photos", "run"), fine_tunes=False)
        'none (the head trains on the cached features of the images as they are)'
    """
    views = describe_views(config)
    head = f"head: {views}" if views else ""
    if not fine_tunes:
        return head or "none (the head trains on the cached features of the images as they are)"
    live = describe_augmentation(config)
    return f"{head}; fine-tune phase: {live}" if head else live


def _augmentation_parts(config: TrainConfig) -> list[str]:
    """The augmentations the config's strengths turn on, in words (the ``augment`` switch aside)."""
    parts = []
    if config.augment_flip:
        parts.append("horizontal flip")
    if config.augment_crop < 1:
        parts.append(f"random resized crop (scale {config.augment_crop:g}-1)")
    for name in ("rotation", "zoom", "translation", "brightness", "contrast", "saturation", "pca"):
        value = getattr(config, f"augment_{name}")
        if value:
            parts.append(f"{'PCA colour' if name == 'pca' else name} {value:g}")
    return parts


def batch_augmentation(config: TrainConfig, seed: int) -> Callable | None:
    """The batch-level augmentations (Keras preprocessing layers) as one callable, or None.

    Images are floats in 0-255; every layer is told so (``value_range``).
    """
    if not config.augment:
        return None
    import keras

    # float32 whatever the global policy: under mixed precision pixels stay float32 until the model.
    f32 = {"dtype": "float32"}
    layers = []
    if config.augment_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed, **f32))
    if config.augment_rotation:
        layers.append(keras.layers.RandomRotation(config.augment_rotation, fill_mode="reflect", seed=seed + 1, **f32))
    if config.augment_zoom:
        layers.append(keras.layers.RandomZoom(config.augment_zoom, fill_mode="reflect", seed=seed + 2, **f32))
    if config.augment_translation:
        layers.append(keras.layers.RandomTranslation(config.augment_translation, config.augment_translation,
                                                     fill_mode="reflect", seed=seed + 3, **f32))
    if config.augment_brightness:
        layers.append(keras.layers.RandomBrightness(config.augment_brightness, value_range=(0, 255), seed=seed + 4,
                                                    **f32))
    if config.augment_contrast:
        layers.append(keras.layers.RandomContrast(config.augment_contrast, value_range=(0, 255), seed=seed + 5, **f32))
    if config.augment_saturation:
        layers.append(keras.layers.RandomSaturation((0.5 - config.augment_saturation / 2,
                                                     0.5 + config.augment_saturation / 2),
                                                    value_range=(0, 255), seed=seed + 6, **f32))
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


def random_resized_crop(image, min_scale: float, seed):
    """Crop a random region (``min_scale``-100% of the area, aspect 3/4-4/3) and resize it back to
    the image's size.

    Stateless (``seed`` is a shape ``(2,)`` integer tensor): the stateful
    ``tf.image.sample_distorted_bounding_box`` treats an op seed of 0 (the default ``--seed``) as
    "no seed", so its crops could not repeat, and it refuses to run under ``--deterministic``.
    """
    import tensorflow as tf

    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(min_scale, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    return tf.image.resize(tf.slice(image, begin, crop_size), tf.shape(image)[:2], method="bilinear")


def training_images(paths: Sequence[str], labels: np.ndarray, size: int, batch_size: int, *, config: TrainConfig,
                    shuffle: bool, seed: int, sample_weights: np.ndarray | None = None, balanced: bool = False):
    """A ``tf.data.Dataset`` of ``(images, labels[, weights])`` batches from image files.

    Images are decoded once with :func:`transferkit.data.scan.load_image` (the same decoding as the
    feature cache and prediction), kept in memory as uint8 when they fit, then shuffled,
    augmented (when ``shuffle`` and ``config.augment``) and batched; decoding and augmentation
    overlap with training through ``prefetch``.

    Args:
        paths: files that are known to decode (the extraction's ``ok`` images).
        balanced: draw every class equally often (``--sampling balanced``); an epoch then has
            as many batches as the natural order would.
    """
    import tensorflow as tf

    from transferkit.data.scan import decode_in_graph, path_strings

    labels = np.asarray(labels, dtype=np.int32)

    def _load(raw_path, label, *rest):
        image, _ = decode_in_graph(raw_path, size)  # load_image's 0-255 integers: uint8 is exact
        return (tf.cast(image, tf.uint8), label, *rest)

    columns = [path_strings(paths), labels]
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
    dataset = dataset.map(lambda image, *rest: (tf.cast(image, tf.float32), *rest),
                          num_parallel_calls=tf.data.AUTOTUNE)
    if augment and crop_scale < 1:
        # One stateless seed pair per image, new every epoch and the same on every rerun.
        crop_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        dataset = tf.data.Dataset.zip(dataset, crop_seeds).map(
            lambda element, crop_seed: (random_resized_crop(element[0], crop_scale, crop_seed), *element[1:]),
            num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size)
    batch_augment = batch_augmentation(config, seed) if augment else None
    if batch_augment is not None:
        dataset = dataset.map(lambda image, *rest: (batch_augment(image), *rest),
                              num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


# ------------------------------------------------------------------- deterministic (cached) views


def view_seed(content_hash: str, view: int, seed: int) -> np.ndarray:
    """The stateless seed of one augmented view: a function of the image's bytes (their hash), the
    view number and the run's seed only, so a view is the same in every process, on every run.

    Example:
        >>> view_seed("9f86d0", 1, 0).shape
        (2,)
    """
    import hashlib

    digest = hashlib.sha256(f"{content_hash}:{view}:{seed}".encode()).digest()
    return np.frombuffer(digest[:16], dtype="<i8").copy()


def augmented_view(image, seed, config: TrainConfig):
    """One augmented view of a ``(size, size, 3)`` 0-255 image, the same for the same ``seed``.

    The augmentations of ``--augment`` at the config's strengths (``augment_*``; the ``augment``
    switch itself is not consulted: asking for a view asks for augmentation), in the order of
    :func:`training_images`: random resized crop, horizontal flip, rotation + zoom + translation
    (one affine resampling, reflected at the borders), brightness, contrast, saturation and PCA
    colour. Every random draw is a stateless TensorFlow op seeded from ``seed`` (a shape ``(2,)``
    integer tensor, see :func:`view_seed`), so the view can be cached by content.

    Example:
        >>> view = augmented_view(tf.zeros((224, 224, 3)), view_seed(digest, 1, 0), config)  # doctest: +SKIP
    """
    import math

    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 7)
    image = tf.convert_to_tensor(image, tf.float32)
    height_width = tf.shape(image)[:2]
    if config.augment_crop < 1:
        image = random_resized_crop(image, config.augment_crop, seeds[0])
    if config.augment_flip:
        image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    if config.augment_rotation or config.augment_zoom or config.augment_translation:
        # Keras' factors: rotation in turns, zoom and translation as fractions of the side, each +-factor.
        draw = tf.random.stateless_uniform((4,), seeds[2], minval=-1.0, maxval=1.0)
        angle = draw[0] * config.augment_rotation * 2 * math.pi
        scale = 1.0 + draw[1] * config.augment_zoom
        height, width = (tf.cast(d, tf.float32) for d in tf.unstack(height_width))
        shift_x, shift_y = draw[2] * config.augment_translation * width, draw[3] * config.augment_translation * height
        center_x, center_y = (width - 1) / 2, (height - 1) / 2
        # Maps each output pixel to the input point it samples: rotate and scale about the centre, then shift.
        a0, a1 = scale * tf.cos(angle), -scale * tf.sin(angle)
        b0, b1 = scale * tf.sin(angle), scale * tf.cos(angle)
        transform = tf.stack([a0, a1, center_x - a0 * center_x - a1 * center_y + shift_x,
                              b0, b1, center_y - b0 * center_x - b1 * center_y + shift_y, 0.0, 0.0])
        image = tf.raw_ops.ImageProjectiveTransformV3(
            images=image[None], transforms=transform[None], output_shape=height_width, fill_value=0.0,
            interpolation="BILINEAR", fill_mode="REFLECT")[0]
    if config.augment_brightness:
        image = tf.image.stateless_random_brightness(image, config.augment_brightness * 255.0, seeds[3])
        image = tf.clip_by_value(image, 0.0, 255.0)
    if config.augment_contrast:
        image = tf.image.stateless_random_contrast(image, 1 - config.augment_contrast, 1 + config.augment_contrast,
                                                   seeds[4])
        image = tf.clip_by_value(image, 0.0, 255.0)
    if config.augment_saturation:
        # keras.layers.RandomSaturation's range for the same strength: factors f/(1-f), f in 0.5 +- s/2.
        low = max(0.5 - config.augment_saturation / 2, 0.01)
        low_factor, high_factor = low / (1 - low), (1 - low) / low
        image = tf.image.stateless_random_saturation(image / 255.0, low_factor, high_factor, seeds[5]) * 255.0
        image = tf.clip_by_value(image, 0.0, 255.0)
    if config.augment_pca:
        alpha = tf.random.stateless_normal((3,), seeds[6], stddev=config.augment_pca)
        shift = tf.linalg.matvec(IMAGENET_EIGENVECTORS, alpha * IMAGENET_EIGENVALUES) * 255.0
        image = tf.clip_by_value(image + shift, 0.0, 255.0)
    return image
