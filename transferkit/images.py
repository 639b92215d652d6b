"""Decode image files into pixels: Pillow for one file, ``tf.data`` for many.

One decoder serves every path into a model (feature extraction, augmented views, fine-tuning,
prediction, Grad-CAM), so training and serving see the same pixels: JPEGs decode at reduced scale
when much larger than the model's input (``draft``), EXIF orientation is applied, any mode becomes
8-bit RGB, and the image is squashed to ``size x size`` with a bilinear filter. Files over Pillow's
decompression-bomb limit are refused before decoding. Example::

    pixels = load_image("photos/cat/001.jpg", 224)           # uint8 (224, 224, 3)
    ds = image_dataset(["photos/cat/001.jpg"], 224, 32)     # (images, ok) batches

TensorFlow is imported only inside the ``tf.data`` functions, so checking a file stays cheap.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

#: The file name extensions treated as images (lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def unreadable_reason(path: Path) -> str | None:
    """``None`` when Pillow can open the file's header, else a short reason."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_size == 0:
            return "empty file"
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; the check below refuses those too.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                size = img.size  # the header is parsed by open(); no pixel is decoded
        return _bomb_reason(size)
    except PermissionError:
        return "permission denied"
    except FileNotFoundError:
        return "file not found (broken link?)"
    except Image.DecompressionBombError as exc:
        return f"{BOMB_REASON}: {short_message(exc)}"
    except UnidentifiedImageError:
        return "not an image Pillow can read: unknown format (a text or HTML file, or another file renamed?)"
    except (OSError, ValueError, SyntaxError) as exc:
        # SyntaxError: some Pillow plugins raise it for malformed headers.
        return f"not an image Pillow can read: {short_message(exc)}"
    except Exception as exc:  # noqa: BLE001 - a malformed file may make a Pillow plugin raise anything
        return f"not an image Pillow can read: {type(exc).__name__}: {short_message(exc)}"


#: The start of the reason a file over Pillow's pixel limit is refused with.
BOMB_REASON = "over Pillow's decompression-bomb limit"


def _bomb_reason(size: tuple[int, int]) -> str | None:
    """Why an image of this size is refused without decoding it, or ``None``.

    Pillow raises only above twice ``Image.MAX_IMAGE_PIXELS`` and merely warns above it; a file of a
    few kilobytes can declare 100 million pixels, so anything above the limit itself is refused.
    """
    limit = Image.MAX_IMAGE_PIXELS
    width, height = size
    if limit is not None and width * height > limit:
        return (f"{BOMB_REASON}: {width}x{height} = {width * height:,} pixels, more than {limit:,} "
                f"(PIL.Image.MAX_IMAGE_PIXELS); not decoded")
    return None


def short_message(exc: BaseException) -> str:
    """The first line of an exception's message, at most 120 characters (for one-line reasons)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Decode an image into a ``uint8`` array of shape ``(size, size, 3)``.

    JPEGs decode at a reduced scale when much larger than ``size`` (``draft``), EXIF orientation is
    applied, animated images give their first frame, any mode (palette, grayscale, CMYK, 16-bit) becomes
    8-bit RGB, and transparency is composited onto white.

    Raises:
        ValueError: The file cannot be decoded (truncated, corrupt, missing, or over Pillow's
            decompression-bomb limit, refused before decoding); the message says why.

    Example:
        >>> load_image("photos/cat/001.jpg", 224).shape  # doctest: +SKIP
        (224, 224, 3)
    """
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}.")
    size = int(size)
    try:
        with Image.open(path) as img:
            if (reason := _bomb_reason(img.size)) is not None:
                raise ValueError(reason)
            if img.format == "JPEG":
                # Decode at 1/2, 1/4 or 1/8 scale while still >= size on both sides: much faster for
                # big photos. The pixels differ slightly from a full decode (cache keys must say so).
                img.draft("RGB", (size, size))
            img.seek(0)
            img = ImageOps.exif_transpose(img)  # returns a loaded copy, detached from the file
            img = to_rgb(img)
            # Squash to size x size, aspect ratio not kept: the same geometry as the default of
            # keras.utils.image_dataset_from_directory (crop_to_aspect_ratio=False). Pillow's bilinear
            # filter antialiases when shrinking, so values are close to but not identical with tf.image.
            img = img.resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"Cannot decode image '{path}': {BOMB_REASON}: {short_message(exc)}") from exc
    except (OSError, ValueError, SyntaxError, EOFError, UnidentifiedImageError) as exc:
        raise ValueError(f"Cannot decode image '{path}': {short_message(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - malformed data can make Pillow raise anything; one bad file
        # must not stop a tf.data pipeline of thousands
        raise ValueError(f"Cannot decode image '{path}': {type(exc).__name__}: {short_message(exc)}") from exc
    if arr.shape != (size, size, 3):  # pragma: no cover - defensive
        raise ValueError(f"Cannot decode image '{path}': got shape {arr.shape}.")
    return arr


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: 16-bit and float gray scaled (not clipped), transparency on white."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img), mode)).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16/32-bit integer or float gray values to 0..255 (Pillow's convert() would clip them)."""
    arr = arr.astype(np.float64)
    if mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    elif mode == "F" and arr.size and float(np.nanmax(arr)) <= 1.0:
        scale = 255.0
    elif arr.size and float(np.nanmax(arr)) > 255:
        scale = 255.0 / 65535.0  # 16-bit data stored in a 32-bit mode
    else:
        scale = 1.0
    return np.clip(np.nan_to_num(arr * scale), 0, 255).round().astype(np.uint8)


def path_strings(paths: Sequence[str | os.PathLike]):
    """File paths as a string tensor for tf.data: bytes via fsencode, so names that are not valid
    UTF-8 survive the round trip."""
    import tensorflow as tf

    return tf.constant([os.fsencode(p) for p in paths], dtype=tf.string, shape=(len(paths),))


def decode_in_graph(raw_path, size: int):
    """Inside a tf.data map: :func:`load_image` of one path, as ``(float32 image, ok)`` tensors.

    A file that fails to decode gives an all-zero image and ``ok`` False instead of stopping the
    pipeline.
    """
    import tensorflow as tf

    blank = np.zeros((size, size, 3), dtype=np.float32)

    def _decode(path: bytes) -> tuple[np.ndarray, np.bool_]:
        try:
            return load_image(os.fsdecode(path), size).astype(np.float32), np.bool_(True)
        except ValueError:
            return blank, np.bool_(False)

    image, ok = tf.numpy_function(_decode, [raw_path], [tf.float32, tf.bool], stateful=False)
    image.set_shape((size, size, 3))
    ok.set_shape(())
    return image, ok


def image_dataset(paths: Sequence[str | os.PathLike], size: int, batch_size: int) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of ``(images, ok)`` batches, in the order of ``paths``.

    ``images`` is ``float32`` of shape ``(batch, size, size, 3)`` with raw values in 0..255 (the model
    does its own preprocessing); ``ok`` is a ``bool`` vector of shape ``(batch,)``. A file that fails to
    decode does not stop the pipeline: its image is all zeros and its ``ok`` is ``False``, and the caller
    drops it (call :func:`load_image` on it to get the reason). Decoding runs in parallel but the output
    order is deterministic; the last batch may be smaller.

    Example:
        >>> for images, ok in image_dataset(paths, 224, 32):  # doctest: +SKIP
        ...     features = backbone(images[ok])
    """
    import tensorflow as tf

    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}.")
    return (tf.data.Dataset.from_tensor_slices(path_strings(paths))
            .map(lambda raw_path: decode_in_graph(raw_path, size), num_parallel_calls=tf.data.AUTOTUNE,
                 deterministic=True)
            .batch(int(batch_size))
            .prefetch(tf.data.AUTOTUNE))
