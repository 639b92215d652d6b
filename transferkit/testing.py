"""Helpers for tests, recipes and notebooks: synthetic image folders (and a tiny backbone, below).

Nothing here imports TensorFlow at module level.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from dataclasses import dataclass
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


# ------------------------------------------------------------------------------ awkward image folder

#: Why each refused file of :func:`make_awkward_folder` is skipped (the start of the reason).
REASON_EMPTY = "empty file"
REASON_NOT_IMAGE = "not an image Pillow can read"
REASON_BOMB = "over Pillow's decompression-bomb limit"
REASON_PERMISSION = "permission denied"
REASON_UNDECODABLE = "cannot decode image"
REASON_SPECIAL = "not a regular file"
REASON_LINK_LOOP = "symbolic link loop"
REASON_MISSING = "file not found"


@dataclass(frozen=True)
class AwkwardFolder:
    """What :func:`make_awkward_folder` wrote and what transferkit must make of it.

    Attributes:
        root: The folder (classes ``cat`` and ``dog``).
        used: Relative paths of every file that must be read, sorted.
        skipped_at_scan: ``{relative path: reason prefix}`` of files refused when scanning.
        skipped_at_decode: ``{relative path: reason prefix}`` of files whose header reads but whose pixels
            do not (found by extraction).
        num_ignored: Hidden, system and non-image entries and symlink loops to be ignored silently.
        permissions_enforced: False when the OS let us read a mode-000 file (running as root, or an OS
            without POSIX permissions): ``locked.jpg`` is then in ``used``.
        special_files: Relative paths of the FIFO, socket and device named like images (those this OS
            let us make); each is in ``skipped_at_scan``. Opening one the ordinary way blocks or reads
            forever.
        undecodable_names: Relative paths (as Python spells them: ``os.fsdecode``) of files whose names
            are not valid UTF-8, empty when the file system refuses such names.
    """

    root: Path
    used: tuple[str, ...]
    skipped_at_scan: dict[str, str]
    skipped_at_decode: dict[str, str]
    num_ignored: int
    permissions_enforced: bool
    special_files: tuple[str, ...] = ()
    undecodable_names: tuple[str, ...] = ()

    @property
    def skipped(self) -> dict[str, str]:
        """Every refused file with its reason prefix."""
        return {**self.skipped_at_scan, **self.skipped_at_decode}


def make_awkward_folder(root: str | os.PathLike, *, images_per_class: int = 10, image_size: int = 32,
                        seed: int = 0) -> AwkwardFolder:
    """Write a two-class folder holding every kind of file real photo folders contain.

    Besides ``images_per_class`` learnable images per class (as :func:`make_image_folder`), it holds:

    * readable: an EXIF-rotated JPEG (48x24 stored, left half red and right half blue, orientation 6, so
      it displays 24x48 with red on top), a CMYK JPEG, grayscale, palette and 16-bit PNGs, an animated
      GIF (first frame red, second blue), a PNG with alpha (left opaque red, right transparent), WebP, BMP,
      TIFF, upper-case extensions, names with spaces and non-ASCII characters, a 1x1 image, a 4000x10
      image, a nested folder, and a 4800x3200 JPEG photo;
    * hostile names, all readable images: a Latin-1 name that is not valid UTF-8 (``b"caf\\xe9"``, as
      old archives unpack), a name with a line break, one in decomposed Unicode (macOS), one with a
      comma and quotes (CSV), one starting with a dash, one of 255 bytes, and a folder named
      ``album.jpg`` holding an image;
    * refused: an empty file, a truncated JPEG (its header reads, its pixels do not), an HTML page and a
      text file with image extensions (one of them with a name that is not UTF-8), two decompression
      bombs (PNGs of a few kB declaring 100 million and 10 billion pixels), an unreadable (mode 000)
      file, a FIFO, a socket and a link to ``/dev/zero`` named like images (opened the ordinary way, the
      first two block and the last reads forever), a link to itself and a broken link;
    * ignored: ``.DS_Store``, ``Thumbs.db``, ``desktop.ini``, a dot-file, a macOS ``._`` file, text files
      and two symlink loops (a folder linked to itself and to the image folder).

    Special files and names this OS or file system refuses are left out (see ``special_files`` and
    ``undecodable_names``).

    Returns:
        An :class:`AwkwardFolder` saying which files must be used, skipped (with why) and ignored.

    Example:
        >>> awkward = make_awkward_folder(tmp_path / "awkward")  # doctest: +SKIP
        >>> sorted(awkward.skipped)[:2]  # doctest: +SKIP
        ['cat/bomb.png', 'cat/empty.jpg']
    """
    from PIL import Image

    root = Path(root)
    used: list[str] = []
    ignored = 0

    def save(rel: str, img, fmt: str, **options) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, fmt, **options)
        used.append(rel)
        return path

    for k, name in enumerate(("cat", "dog")):
        for i in range(images_per_class):
            pixels = _class_image(np.random.default_rng([seed, k, i]), k, 2, image_size)
            save(f"{name}/regular_{i:02d}.png", Image.fromarray(pixels), "PNG")

    halves = np.zeros((24, 48, 3), np.uint8)
    halves[:, :24] = (255, 0, 0)
    halves[:, 24:] = (0, 0, 255)
    rotated = Image.fromarray(halves)
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    save("cat/exif_rotated.jpg", rotated, "JPEG", exif=exif, quality=95)
    save("cat/cmyk.jpg", Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG")
    save("cat/grayscale.png", Image.new("L", (30, 40), 90), "PNG")
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 128, 255] + [0, 0, 0] * 255)
    save("cat/palette.png", palette, "PNG")
    frames = [Image.new("RGB", (32, 32), color).convert("P") for color in ((255, 0, 0), (0, 0, 255))]
    save("cat/animated.gif", frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    alpha = np.zeros((32, 32, 4), np.uint8)
    alpha[:, :16] = (255, 0, 0, 255)
    save("cat/alpha.png", Image.fromarray(alpha, "RGBA"), "PNG")
    save("cat/deep_16bit.png", Image.fromarray(np.full((32, 32), 40000, np.uint16)), "PNG")
    save("cat/photo.webp", Image.new("RGB", (36, 28), (200, 120, 40)), "WEBP", quality=90)

    save("dog/bitmap.bmp", Image.new("RGB", (30, 30), (20, 160, 90)), "BMP")
    save("dog/scan.tif", Image.new("RGB", (30, 30), (90, 20, 160)), "TIFF", compression="tiff_lzw")
    save("dog/SHOUT.JPEG", Image.new("RGB", (30, 30), (120, 120, 20)), "JPEG")
    save("dog/IMG_0001.PNG", Image.new("RGB", (30, 30), (20, 120, 120)), "PNG")
    save("dog/name with spaces.png", Image.new("RGB", (30, 30), (60, 60, 200)), "PNG")
    save("dog/café 猫 ñandú.png", Image.new("RGB", (30, 30), (200, 60, 60)), "PNG")
    save("dog/one_pixel.png", Image.new("RGB", (1, 1), (10, 200, 10)), "PNG")
    save("dog/very_wide.png", Image.new("RGB", (4000, 10), (10, 10, 200)), "PNG")
    save("dog/nested/deeper/nested.jpg", Image.new("RGB", (30, 30), (150, 150, 150)), "JPEG")
    gradient = Image.linear_gradient("L").resize((4800, 3200)).convert("RGB")
    save("dog/large_photo.jpg", gradient, "JPEG", quality=85)

    scan_refused: dict[str, str] = {}
    decode_refused: dict[str, str] = {}
    (root / "cat" / "empty.jpg").write_bytes(b"")
    scan_refused["cat/empty.jpg"] = REASON_EMPTY
    noise = np.random.default_rng([seed, 99]).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "cat" / "truncated.jpg", "JPEG", quality=90)
    whole = (root / "cat" / "truncated.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(whole[: len(whole) * 2 // 3])  # header intact, pixels cut
    decode_refused["cat/truncated.jpg"] = REASON_UNDECODABLE
    (root / "dog" / "page.png").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>\n")
    scan_refused["dog/page.png"] = REASON_NOT_IMAGE
    (root / "dog" / "notes.jpg").write_text("not a photo, just notes\n")
    scan_refused["dog/notes.jpg"] = REASON_NOT_IMAGE
    # Between Pillow's limit and twice it, Pillow only warns and would decode 100 million pixels.
    _write_png_bomb(root / "cat" / "bomb.png", 10_000, 10_000)
    scan_refused["cat/bomb.png"] = REASON_BOMB
    _write_png_bomb(root / "dog" / "huge_bomb.png", 100_000, 100_000, rows=16)
    scan_refused["dog/huge_bomb.png"] = REASON_BOMB
    locked = root / "cat" / "locked.jpg"
    Image.new("RGB", (30, 30), (255, 255, 0)).save(locked, "JPEG")
    locked.chmod(0)
    enforced = not _can_read(locked)
    if enforced:
        scan_refused["cat/locked.jpg"] = REASON_PERMISSION
    else:
        used.append("cat/locked.jpg")

    for rel, data in ((".DS_Store", b"\0\0\0\1Bud1"), ("README.txt", b"loose file beside the classes\n"),
                      ("cat/Thumbs.db", b"\xd0\xcf\x11\xe0"), ("cat/notes.txt", b"a note\n"),
                      ("cat/._exif_rotated.jpg", b"\0\5\26\7 macOS resource fork"),
                      ("dog/desktop.ini", b"[.ShellClassInfo]\n"), ("dog/.hidden.png", whole),
                      ("dog/labels.csv", b"file,label\n")):
        (root / rel).write_bytes(data)
        ignored += 1
    (root / "cat" / "loop").symlink_to(".", target_is_directory=True)  # a folder inside itself
    (root / "dog" / "nested" / "up").symlink_to("../..", target_is_directory=True)  # back to the root
    ignored += 2

    # Hostile names: each must reach every file transferkit writes and lead back to its file.
    for rel, color in (("dog/line\nbreak.png", (30, 90, 30)), ("dog/cafe\u0301 decomposed.png", (90, 30, 30)),
                       ('dog/comma, "quoted".png', (30, 30, 90)), ("dog/-starts-with-dash.png", (90, 90, 30)),
                       ("cat/" + "l" * 251 + ".png", (30, 90, 90)), ("dog/album.jpg/inside.png", (90, 30, 90))):
        save(rel, Image.new("RGB", (30, 30), color), "PNG")
    undecodable = []
    for rel, data in (("cat/caf\udce9 latin-1.png", None), ("dog/\udcff\udcfe latin-1.jpg", b"not an image\n")):
        path = root / rel
        try:
            if data is None:
                Image.new("RGB", (30, 30), (160, 100, 40)).save(path, "PNG")
            else:
                path.write_bytes(data)
        except (OSError, UnicodeError):  # macOS and Windows file systems refuse names that are not UTF-8
            continue
        undecodable.append(rel)
        if data is None:
            used.append(rel)
        else:
            scan_refused[rel] = REASON_NOT_IMAGE

    (root / "cat" / "self_loop.jpg").symlink_to("self_loop.jpg")
    scan_refused["cat/self_loop.jpg"] = REASON_LINK_LOOP
    (root / "dog" / "broken_link.jpg").symlink_to("nowhere.jpg")
    scan_refused["dog/broken_link.jpg"] = REASON_MISSING
    special = [rel for rel in ("cat/fifo.jpg", "cat/socket.png", "dog/zero.jpg") if _make_special(root / rel)]
    scan_refused.update(dict.fromkeys(special, REASON_SPECIAL))
    return AwkwardFolder(root, tuple(sorted(used)), scan_refused, decode_refused, ignored, enforced,
                         tuple(special), tuple(undecodable))


def _make_special(path: Path) -> bool:
    """Make the special file ``path`` names (``fifo``, ``socket`` or ``zero`` in its name); False if this OS cannot."""
    import socket

    try:
        if "fifo" in path.name:
            os.mkfifo(path)
        elif "socket" in path.name:
            with socket.socket(socket.AF_UNIX) as server:
                server.bind(str(path))  # the socket file stays after the socket is closed
        elif Path("/dev/zero").exists():
            path.symlink_to("/dev/zero")  # reading it never ends
        else:
            return False
    except (AttributeError, OSError):  # no mkfifo or AF_UNIX (Windows), or a socket path over ~100 bytes
        return False
    return True


def _can_read(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except PermissionError:
        return False
    return True


def _write_png_bomb(path: Path, width: int, height: int, rows: int | None = None) -> None:
    """A 1-bit PNG declaring ``width`` x ``height`` pixels, a few kB on disk (``rows``: write only so many)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    scanline = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(scanline) for _ in range(height if rows is None else rows))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body + compressor.flush())
                     + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------ tiny test backbone


def run_cli(*args, catch_exceptions: bool = False, **kwargs):
    """Run ``transferkit ARGS`` in this process through Click's test runner; arguments may be paths.

    Exceptions other than the CLI's own exits propagate (``catch_exceptions=False``), so a test sees
    the traceback of a bug instead of an exit code.

    Example:
        >>> run_cli("--version").output.startswith("transferkit")
        True
    """
    from click.testing import CliRunner

    from transferkit.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=catch_exceptions, **kwargs)


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
