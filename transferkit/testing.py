"""Helpers for tests, recipes and notebooks: synthetic image folders (and a tiny backbone, below).

Nothing here imports TensorFlow at module level.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# ------------------------------------------------------------------------------ synthetic image folders

_FORMATS = {  # format name -> (file extension, Pillow format)
    "png": (".png", "PNG"),
    "jpg": (".jpg", "JPEG"),
    "jpeg": (".jpeg", "JPEG"),
    "bmp": (".bmp", "BMP"),
    "gif": (".gif", "GIF"),
    "webp": (".webp", "WEBP"),
    "tif": (".tif", "TIFF"),
    "tiff": (".tiff", "TIFF"),
}


def make_image_folder(
    root: str | os.PathLike,
    *,
    num_classes: int = 3,
    images_per_class: int = 12,
    image_size: int = 32,
    split_dirs: bool = False,
    formats: Sequence[str] = ("png",),
    seed: int = 0,
    class_prefix: str = "class_",
) -> Path:
    """Write a small synthetic, learnable image folder and return its root.

    Class ``k`` is named ``f"{class_prefix}{k}"`` (zero-padded so sorted order is label order) and its
    images share a base colour (hues evenly spaced) and a stripe pattern (orientation and period depend
    on the class), plus per-image noise, random stripe phase, brightness jitter and a size that varies
    by up to about 20% around ``image_size``. A tiny CNN separates the classes in a few epochs.

    File names are ``0000.png``, ``0001.jpg``, ... with ``formats`` cycled across a class's images.
    With ``split_dirs=True`` the folder is ``root/{train,val,test}/<class>/...``; ``images_per_class``
    is then the total per class, about 20% each to val and test (at least 1 each when there are 3 or
    more). Output is deterministic for a given ``seed`` and arguments.

    Args:
        root: Folder to write into (created if missing; existing files with the same names are
            overwritten).
        num_classes: Number of classes (>= 1).
        images_per_class: Images per class (>= 1).
        image_size: Nominal side length in pixels (>= 8).
        split_dirs: Write train/val/test sub-folders instead of a flat class-per-folder layout.
        formats: File formats to cycle through: png, jpg, jpeg, bmp, gif, webp, tif, tiff.
        seed: Random seed.
        class_prefix: Prefix of the class folder names.

    Returns:
        ``Path(root)``.

    Example:
        >>> from transferkit.testing import make_image_folder
        >>> root = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=4,
        ...                          formats=("png", "jpg"))  # doctest: +SKIP
        >>> sorted(p.name for p in (root / "class_0").iterdir())  # doctest: +SKIP
        ['0000.png', '0001.jpg', '0002.png', '0003.jpg']
    """
    from PIL import Image

    if num_classes < 1 or images_per_class < 1:
        raise ValueError(f"num_classes and images_per_class must be >= 1, got {num_classes} and "
                         f"{images_per_class}.")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}.")
    formats = tuple(f.lower().lstrip(".") for f in formats)
    unknown = [f for f in formats if f not in _FORMATS]
    if not formats or unknown:
        raise ValueError(f"Unknown image format(s) {unknown or formats!r}; allowed: "
                         f"{', '.join(_FORMATS)}.")

    root = Path(root)
    width = len(str(num_classes - 1))
    for k in range(num_classes):
        name = f"{class_prefix}{k:0{width}d}"
        split_of = _split_plan(images_per_class) if split_dirs else ["" for _ in range(images_per_class)]
        for i in range(images_per_class):
            rng = np.random.default_rng([seed, k, i])
            pixels = _class_image(rng, k, num_classes, image_size)
            ext, pil_format = _FORMATS[formats[i % len(formats)]]
            folder = root / split_of[i] / name if split_of[i] else root / name
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(pixels, "RGB")
            if pil_format == "GIF":
                img = img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            options = {"quality": 95} if pil_format in ("JPEG", "WEBP") else {}
            img.save(folder / f"{i:04d}{ext}", pil_format, **options)
    return root


def _split_plan(n: int) -> list[str]:
    """train/val/test for ``n`` images of a class: ~20% each to val and test, >= 1 each when n >= 3."""
    num_held = max(1, round(0.2 * n)) if n >= 3 else 0
    return ["val"] * num_held + ["test"] * num_held + ["train"] * (n - 2 * num_held)


def _class_image(rng: np.random.Generator, k: int, num_classes: int, image_size: int) -> np.ndarray:
    """One ``uint8`` RGB image for class ``k``: class colour + class stripes + per-image variation."""
    jitter = max(1, image_size // 5)
    h = int(image_size + rng.integers(-jitter, jitter + 1))
    w = int(image_size + rng.integers(-jitter, jitter + 1))
    hue = k / num_classes
    base = np.array(colorsys.hsv_to_rgb(hue, 0.75, 0.85)) * 255.0
    stripe = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.6, 0.35)) * 255.0
    # Orientation cycles through 4 angles; the period changes every 4 classes, so patterns stay distinct.
    angle = (k % 4) * np.pi / 4
    period = image_size / (3 + 2 * (k // 4 % 3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    coord = (xx * np.cos(angle) + yy * np.sin(angle)) * image_size / max(h, w)
    phase = rng.uniform(0, period)
    mask = (((coord + phase) / period) % 1.0 < 0.5)[..., None]
    pixels = np.where(mask, stripe, base) * rng.uniform(0.85, 1.15)
    pixels = pixels + rng.normal(0.0, 18.0, size=(h, w, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ tiny test backbone


def tiny_backbone(include_top: bool = False, weights=None, input_tensor=None, input_shape=None,
                  pooling: str | None = "avg", classes: int = 1000, **kwargs):
    """A three-block CNN with the ``keras.applications`` constructor signature, for fast tests.

    Registered as backbone ``tiny_test`` (random initialisation only, ~6k parameters) so tests,
    recipes and notebooks exercise exactly the code paths of real backbones in seconds. Blocks are
    named ``block1`` .. ``block3`` like VGG's, and contain BatchNormalization so fine-tuning
    tests can check BN statistics.

    Example:
        >>> model = tiny_backbone(input_shape=(32, 32, 3))  # doctest: +SKIP
        >>> model.output_shape  # doctest: +SKIP
        (None, 32)
    """
    import keras
    from keras import layers

    if input_tensor is None:
        inputs = layers.Input(shape=input_shape or (32, 32, 3))
        x = inputs
    else:
        inputs, x = input_tensor, input_tensor
    for block, filters in enumerate((8, 16, 32), start=1):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{block}_conv")(x)
        x = layers.BatchNormalization(name=f"block{block}_bn")(x)
        x = layers.ReLU(name=f"block{block}_relu")(x)
        if block < 3:
            x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    if pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    if include_top:
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    source = keras.utils.get_source_inputs(inputs) if input_tensor is not None else inputs
    model = keras.Model(source, x, name="tiny_test")
    if weights is not None:
        model.load_weights(weights)
    return model
