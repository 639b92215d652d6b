"""Decode image files into pixels: Pillow for one file, ``tf.data`` for many.

One decoder serves every path into a model (feature extraction, augmented views, fine-tuning,
prediction, Grad-CAM), so training and serving see the same pixels: JPEGs decode at reduced scale
when much larger than the model's input (``draft``), EXIF orientation is applied, any mode becomes
8-bit RGB, and the image is squashed to ``size x size`` with a bilinear filter.

Every image file is opened by :func:`open_image_file` (regular files only, so a FIFO, socket or device
named ``*.jpg`` is refused at once instead of blocking; at most ``MAX_FILE_BYTES``), and images over
Pillow's pixel limit are refused from their header, before decoding. A refused file gives a short
reason, never a hang. Example::

    pixels = load_image("photos/cat/001.jpg", 224)           # uint8 (224, 224, 3)
    data = read_image_bytes("photos/cat/001.jpg")            # hash these bytes, then decode the same
    pixels = decode_image(data, 224)
    ds = image_dataset(["photos/cat/001.jpg"], 224, 32)     # (images, ok) batches

TensorFlow is imported only inside the ``tf.data`` functions, so checking a file stays cheap.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from transferkit import files

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

#: The file name extensions treated as images (lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: The same, as messages list them ("allowed: .jpg .jpeg ...").
ALLOWED_EXTENSIONS = " ".join(IMAGE_EXTENSIONS)


#: Largest image file read, in bytes: bigger files are refused unread, as ``PIL.Image.MAX_IMAGE_PIXELS``
#: refuses images with more pixels (raise both for giant scans). 256 MiB holds any photo Pillow's
#: pixel limit lets through, even an uncompressed 8-bit RGB one.
MAX_FILE_BYTES = 256 * 1024 * 1024


class ImageFileError(ValueError):
    """A file refused as an image; ``str()`` is the short reason (``"not a regular file: a socket"``)."""


def _check_size_of(st: os.stat_result) -> None:
    """The image-specific limits, on top of :func:`transferkit.files.open_regular`'s regular-file check."""
    if st.st_size == 0:
        raise ImageFileError("empty file")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageFileError(_too_big(st.st_size))


def _too_big(num_bytes: int) -> str:
    return (f"file too large: {num_bytes:,} bytes, more than {MAX_FILE_BYTES:,} "
            f"(transferkit.data.images.MAX_FILE_BYTES); not read")


@contextlib.contextmanager
def open_image_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a file for reading as an image: regular files only, not empty, at most ``MAX_FILE_BYTES``.

    The one way transferkit opens an image file (scan, decode, thumbnails, Grad-CAM). A FIFO, socket,
    device or folder named ``*.jpg`` is refused without blocking by :func:`transferkit.files.open_regular`
    (the one safe way transferkit opens a file: non-blocking, ``fstat`` of what was opened, so a file
    swapped for a FIFO after being looked at is refused too); the limits of an image come on top.

    Raises:
        ImageFileError: A ``ValueError`` whose message is the short reason (``"empty file"``,
            ``"not a regular file: a named pipe (FIFO)"``, ``"permission denied"``, ...).

    Example:
        >>> with open_image_file("photos/cat/001.jpg") as handle:  # doctest: +SKIP
        ...     header = handle.read(16)
    """
    try:
        handle = files.open_regular(path)
    except files.NotRegularFileError as exc:
        raise ImageFileError(exc.strerror) from None  # the short reason says it all
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        raise ImageFileError(_os_reason(exc)) from exc
    with handle:
        _check_size_of(os.fstat(handle.fileno()))
        yield handle


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "file not found (broken link?)"
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if isinstance(exc, OSError) and exc.errno == errno.ENXIO:
        return "not a regular file: a socket or a device without a driver"
    if isinstance(exc, OSError):
        return f"cannot read file: {exc.strerror or short_message(exc)}"
    return f"cannot read file: {short_message(exc)}"


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """All the bytes of an image file, read once through :func:`open_image_file`.

    Raises:
        ImageFileError: Not a regular file, empty, over ``MAX_FILE_BYTES`` (also when it grew while
            being read), or unreadable; the message is the short reason.

    Example:
        >>> pixels = decode_image(read_image_bytes("photos/cat/001.jpg"), 224)  # doctest: +SKIP
    """
    return read_image_file(path)[0]


def read_image_file(path: str | os.PathLike) -> tuple[bytes, os.stat_result | None]:
    """An image file's bytes, read once through :func:`open_image_file`, and its status when nothing
    changed it while it was read (else ``None``).

    For callers that must hash and decode the same bytes (the feature cache): hash ``data``, decode it
    with :func:`decode_image`, and remember the hash for the status only when it is not ``None``.

    Raises:
        ImageFileError: As :func:`read_image_bytes`.

    Example:
        >>> data, status = read_image_file("photos/cat/001.jpg")  # doctest: +SKIP
    """
    with open_image_file(path) as handle:
        try:
            before = os.fstat(handle.fileno())
            data = handle.read(MAX_FILE_BYTES + 1)
            after = os.fstat(handle.fileno())
        except OSError as exc:
            raise ImageFileError(_os_reason(exc)) from exc
    if len(data) > MAX_FILE_BYTES:
        raise ImageFileError(_too_big(len(data)))
    if not data:
        raise ImageFileError("empty file")
    unchanged = len(data) == before.st_size and files.file_signature(before) == files.file_signature(after)
    return data, before if unchanged else None


def unreadable_reason(path: Path) -> str | None:
    """``None`` when Pillow can open the file's header, else a short reason."""
    try:
        with open_image_file(path) as handle, _pillow_open(handle) as img:
            size = img.size  # the header is parsed by open(); no pixel is decoded
        return _bomb_reason(size)
    except ImageFileError as exc:
        return str(exc)
    except Image.DecompressionBombError as exc:
        return f"{BOMB_REASON}: {short_message(exc)}"
    except UnidentifiedImageError:
        return "not an image Pillow can read: unknown format (a text or HTML file, or another file renamed?)"
    except (OSError, ValueError, SyntaxError) as exc:
        # SyntaxError: some Pillow plugins raise it for malformed headers.
        return f"not an image Pillow can read: {short_message(exc)}"
    except Exception as exc:  # noqa: BLE001 - a malformed file may make a Pillow plugin raise anything
        return f"not an image Pillow can read: {type(exc).__name__}: {short_message(exc)}"


@contextlib.contextmanager
def _pillow_open(source: BinaryIO | bytes) -> Iterator[Image.Image]:
    """Pillow's ``Image.open`` of an open file or of bytes, without its decompression-bomb warning
    (:func:`_bomb_reason` refuses those images anyway)."""
    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice it; _bomb_reason refuses those too.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    with img:
        yield img


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


def load_image(path: str | os.PathLike | BinaryIO, size: int) -> np.ndarray:
    """Decode an image file into a ``uint8`` array of shape ``(size, size, 3)``.

    The file is read by :func:`read_image_bytes` (regular files only, size limit) and decoded by
    :func:`decode_image`; an open binary file (``io.BytesIO`` of bytes already read) is decoded as is.

    Raises:
        ValueError: The file cannot be read or decoded (not a regular file, too large, truncated,
            corrupt, missing, or over Pillow's decompression-bomb limit, refused before decoding):
            ``"Cannot decode image '<path>': <reason>"``, raised from an exception whose message is
            the reason alone.

    Example:
        >>> load_image("photos/cat/001.jpg", 224).shape  # doctest: +SKIP
        (224, 224, 3)
    """
    _check_size(size)
    try:
        if hasattr(path, "read"):  # an open binary file or BytesIO: bytes already read by the caller
            return decode_image(path.read(MAX_FILE_BYTES + 1), size)
        return decode_image(read_image_bytes(path), size)
    except ImageFileError as exc:
        name = getattr(path, "name", None) or "image bytes" if hasattr(path, "read") else path
        raise ValueError(f"Cannot decode image '{name}': {exc}") from exc


def _check_size(size) -> None:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}.")


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode an image file's bytes into a ``uint8`` array of shape ``(size, size, 3)``.

    JPEGs decode at a reduced scale when much larger than ``size`` (``draft``), EXIF orientation is
    applied, animated images give their first frame, any mode (palette, grayscale, CMYK, 16-bit) becomes
    8-bit RGB, and transparency is composited onto white. Images over Pillow's pixel limit are refused
    from their header, before any pixel is decoded.

    Raises:
        ImageFileError: The bytes cannot be decoded; the message is the short reason.

    Example:
        >>> decode_image(read_image_bytes("photos/cat/001.jpg"), 224).shape  # doctest: +SKIP
        (224, 224, 3)
    """
    _check_size(size)
    size = int(size)
    try:
        with _pillow_open(data) as img:
            if (reason := _bomb_reason(img.size)) is not None:
                raise ImageFileError(reason)
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
    except ImageFileError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageFileError(f"{BOMB_REASON}: {short_message(exc)}") from exc
    except (OSError, ValueError, SyntaxError, EOFError, UnidentifiedImageError) as exc:
        raise ImageFileError(short_message(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - malformed data can make Pillow raise anything; one bad file
        # must not stop a tf.data pipeline of thousands
        raise ImageFileError(f"{type(exc).__name__}: {short_message(exc)}") from exc
    if arr.shape != (size, size, 3):  # pragma: no cover - defensive
        raise ImageFileError(f"got shape {arr.shape}")
    return arr


def display_image(path: str | os.PathLike, max_side: int) -> np.ndarray:
    """The photo as a person sees it, for thumbnails and overlays: ``uint8`` RGB, EXIF orientation
    applied, first frame, longest side at most ``max_side`` (aspect ratio kept).

    Read and checked as :func:`load_image` reads (regular files, size and pixel limits).

    Raises:
        ValueError: As :func:`load_image`.

    Example:
        >>> display_image("photos/cat/001.jpg", 448).shape  # doctest: +SKIP
        (336, 448, 3)
    """
    try:
        return display_image_bytes(read_image_bytes(path), max_side)
    except ImageFileError as exc:
        raise ValueError(f"Cannot decode image '{path}': {exc}") from exc


def display_image_bytes(data: bytes, max_side: int) -> np.ndarray:
    """:func:`display_image` of a file's bytes (from :func:`read_image_bytes`).

    Raises:
        ImageFileError: The bytes cannot be decoded; the message is the short reason.
    """
    try:
        with _pillow_open(data) as img:
            if (reason := _bomb_reason(img.size)) is not None:
                raise ImageFileError(reason)
            if img.format == "JPEG":
                img.draft("RGB", (max_side, max_side))  # at least max_side on both sides: no visible loss
            img.seek(0)
            img = to_rgb(ImageOps.exif_transpose(img))
            img.thumbnail((max_side, max_side), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except ImageFileError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageFileError(f"{BOMB_REASON}: {short_message(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - malformed data can make Pillow raise anything
        raise ImageFileError(short_message(exc)) from exc


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
