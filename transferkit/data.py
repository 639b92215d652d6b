"""Scan a folder of images into paths, labels and stable splits; decode images; build ``tf.data`` input.

The input is a folder with one sub-folder per class (images may be nested deeper)::

    photos/cat/001.jpg
    photos/cat/2023/holiday/IMG_0042.JPG
    photos/dog/rex.png

or a folder that is already split into ``train/``, ``val/`` (or ``validation/``) and ``test/``, each
holding class folders. Example::

    folder = scan_folder("photos", seed=0)
    train_paths, train_labels = folder.subset("train")
    write_splits_csv(folder, "runs/exp1/splits.csv")
    ds = image_dataset([folder.abs_path(p) for p in train_paths], size=224, batch_size=32)

TensorFlow is imported only inside :func:`image_dataset`, so scanning and splitting stay cheap.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import stat
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from transferkit.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")

# Files and folders that operating systems and tools leave behind; never images, never classes.
_SYSTEM_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx", "@eadir", "$recycle.bin"})
# Folder names (lower-case) that mark a pre-split dataset, mapped to the split they hold.
_SPLIT_DIRS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_CSV_COLUMNS = ("path", "label", "class_name", "split")
_ALLOWED = " ".join(IMAGE_EXTENSIONS)


@dataclass(frozen=True, eq=False)  # eq=False: a generated __eq__/__hash__ would choke on the ndarray
class ImageFolder:
    """The result of :func:`scan_folder`: every usable image with its label and split.

    ``paths``, ``labels`` and ``splits`` are aligned and ordered by ``paths`` (sorted POSIX strings).
    ``labels`` is read-only.

    Attributes:
        root: The scanned folder.
        class_names: Class names; ``labels`` index into this tuple.
        paths: POSIX paths relative to ``root``, sorted.
        labels: ``int64`` class index per path.
        splits: ``"train"``, ``"val"`` or ``"test"`` per path.
        split_source: ``"folders"`` (root held train/val/test folders), ``"hash"`` (computed here) or
            ``"csv"`` (read back by :func:`read_splits_csv`).
        skipped: ``(relative path, reason)`` of image-named files that could not be opened.
        num_ignored: Hidden, system and non-image entries that were ignored (a hidden folder counts once).
    """

    root: Path
    class_names: tuple[str, ...]
    paths: tuple[str, ...]
    labels: np.ndarray
    splits: tuple[str, ...]
    split_source: str
    skipped: tuple[tuple[str, str], ...] = ()
    num_ignored: int = 0

    def abs_path(self, rel: str) -> Path:
        """The full path of an entry of ``paths``."""
        return self.root / rel

    def subset(self, split: str) -> tuple[list[str], np.ndarray]:
        """``(relative paths, labels)`` of one split, in ``paths`` order.

        Example:
            >>> paths, labels = folder.subset("val")  # doctest: +SKIP
        """
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}.")
        index = [i for i, s in enumerate(self.splits) if s == split]
        return [self.paths[i] for i in index], self.labels[index]

    def counts(self) -> dict[str, dict[str, int]]:
        """``split -> class name -> number of images``; every split and class appears, zeros included."""
        table = {split: dict.fromkeys(self.class_names, 0) for split in SPLITS}
        for label, split in zip(self.labels.tolist(), self.splits, strict=True):
            table[split][self.class_names[label]] += 1
        return table


# --------------------------------------------------------------------------------------------- scan


def scan_folder(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    class_names: Sequence[str] | None = None,
) -> ImageFolder:
    """Find the images of a class-per-folder dataset and assign each one a stable split.

    When ``root`` holds ``train/`` plus ``val/``, ``validation/`` or ``test/`` folders, those are the
    splits (``split_source="folders"``; the fractions and seed are then unused). Otherwise a file's split
    comes from a SHA-1 hash of ``seed`` and its relative path, so adding or removing other files never
    moves it. A small fix-up then makes every split see every class: for a class with at least 3 images,
    an empty split takes one image (the one with the highest hash) from the class's largest split
    (normally train).

    Each candidate is opened with Pillow (header only); files that cannot be opened go to ``skipped``
    instead of raising. Decoding errors in the pixel data show up later in :func:`load_image`.

    Args:
        root: Folder with one sub-folder per class.
        seed: Changes the hash split (not the folder split).
        val_fraction: Expected share of the validation split, in [0, 1).
        test_fraction: Expected share of the test split, in [0, 1); ``val + test < 1``.
        class_names: Known classes in label order (e.g. from a trained model's ``labels.txt``);
            a folder class missing from it raises. Classes without a folder are allowed.

    Returns:
        An :class:`ImageFolder`.

    Raises:
        DataError: Root missing, no class folders, a class without readable images, fewer than two
            classes, an unknown class, or bad fractions.

    Example:
        >>> folder = scan_folder("photos", seed=1)  # doctest: +SKIP
        >>> folder.counts()["val"]  # doctest: +SKIP
        {'cat': 15, 'dog': 12}
    """
    root = Path(root)
    _check_fractions(val_fraction, test_fraction)
    if not root.exists():
        raise DataError(f"Image folder '{root}' does not exist. Check the path (it is relative to "
                        f"'{Path.cwd()}').")
    if not root.is_dir():
        raise DataError(f"'{root}' is not a folder. Give the folder that holds one sub-folder per class, "
                        f"e.g. photos/ with photos/cat/*.jpg, photos/dog/*.jpg.")

    ignored = _Counter()
    top_dirs = _list_subdirs(root, ignored)
    split_dirs = _detect_split_dirs(root, top_dirs)

    # class name -> list of (class folder relative to root, split or None)
    class_dirs: dict[str, list[tuple[str, str | None]]] = {}
    if split_dirs:
        for dir_name, split in split_dirs:
            for name in _list_subdirs(root / dir_name, ignored):
                class_dirs.setdefault(name, []).append((f"{dir_name}/{name}", split))
        _count_loose_files(root, ignored)
        for dir_name, _ in split_dirs:
            _count_loose_files(root / dir_name, ignored)
    else:
        for name in top_dirs:
            class_dirs[name] = [(name, None)]
        _count_loose_files(root, ignored)

    if not class_dirs:
        raise DataError(
            f"Image folder '{root}' has no class sub-folders. transferkit expects one sub-folder per "
            f"class, e.g. photos/cat/*.jpg, photos/dog/*.jpg (or train/, val/, test/ folders that each "
            f"hold such class folders).")

    names = _resolve_class_names(root, sorted(class_dirs), class_names)
    index_of = {name: i for i, name in enumerate(names)}

    records: list[tuple[str, int, str | None]] = []  # (relative path, label, split or None)
    skipped: list[tuple[str, str]] = []
    for name in sorted(class_dirs):
        found = 0
        for rel_dir, split in class_dirs[name]:
            for rel in _walk_images(root, rel_dir, ignored, skipped):
                reason = _unreadable_reason(root / rel)
                if reason is None:
                    records.append((rel, index_of[name], split))
                    found += 1
                else:
                    skipped.append((rel, reason))
        if found == 0:
            where = ", ".join(f"'{_show(root, d)}'" for d, _ in class_dirs[name])
            noun = "Class folder" if len(class_dirs[name]) == 1 else "Class folders"
            verb = "holds" if len(class_dirs[name]) == 1 else "hold"
            raise DataError(
                f"{noun} {where} {verb} no readable images (allowed: {_ALLOWED}). Add images or remove "
                f"the folder.")

    records.sort(key=lambda r: r[0])
    paths = tuple(r[0] for r in records)
    labels = np.asarray([r[1] for r in records], dtype=np.int64)
    if split_dirs:
        splits = tuple(r[2] for r in records)
        source = "folders"
    else:
        splits = _hash_splits(paths, labels, seed, val_fraction, test_fraction)
        source = "hash"
    labels.flags.writeable = False
    return ImageFolder(root=root, class_names=tuple(names), paths=paths, labels=labels,
                       splits=splits, split_source=source, skipped=tuple(sorted(skipped)),
                       num_ignored=ignored.value)


class _Counter:
    value = 0

    def add(self, n: int = 1) -> None:
        self.value += n


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value < 1:
            raise DataError(f"{name} must be a number in [0, 1), got {value!r}. Example: 0.15.")
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction + test_fraction must be below 1 so training keeps some images, got "
            f"{val_fraction} + {test_fraction}. Example: 0.15 + 0.15.")


def _is_ignored_name(name: str) -> bool:
    return name.startswith(".") or name.lower() in _SYSTEM_NAMES


def _show(root: Path, rel: str) -> str:
    return (root / rel).as_posix()


def _list_subdirs(folder: Path, ignored: _Counter) -> list[str]:
    """Sorted names of the visible sub-folders of ``folder``; hidden/system entries are counted."""
    names = []
    real = os.path.realpath(folder)
    with os.scandir(folder) as entries:
        for entry in entries:
            if _is_ignored_name(entry.name) or _is_loop(entry, real):
                ignored.add()
            elif entry.is_dir():  # follows a symlinked class folder, on purpose
                names.append(entry.name)
    return sorted(names)


def _is_loop(entry: os.DirEntry, *folders: str) -> bool:
    """Whether ``entry`` is a link to a folder that contains (or is) one of ``folders`` (real paths).

    Following it would walk those folders again, e.g. another class's images under this class.
    """
    if not entry.is_symlink() or not entry.is_dir():
        return False
    try:
        target = os.path.realpath(entry.path)
        return any(os.path.commonpath([target, folder]) == target for folder in folders)
    except OSError:
        return True
    except ValueError:  # paths on different drives (Windows): cannot contain each other
        return False


def _count_loose_files(folder: Path, ignored: _Counter) -> None:
    """Files next to the class folders belong to no class: ignore them (hidden ones were counted)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if not _is_ignored_name(entry.name) and not entry.is_dir():
                ignored.add()


def _detect_split_dirs(root: Path, top_dirs: list[str]) -> list[tuple[str, str]]:
    """``[(folder name, split)]`` when root is pre-split, else ``[]``."""
    found = {name: _SPLIT_DIRS[name.lower()] for name in top_dirs if name.lower() in _SPLIT_DIRS}
    kinds = sorted(found.values())
    if "train" not in kinds or len(kinds) < 2:
        return []
    for split in SPLITS:
        same = [name for name, s in found.items() if s == split]
        if len(same) > 1:
            raise DataError(
                f"Image folder '{root}' has both {' and '.join(f'{n}/' for n in sorted(same))}; "
                f"keep one of them.")
    others = [name for name in top_dirs if name not in found]
    if others:
        raise DataError(
            f"Image folder '{root}' mixes split folders ({', '.join(f'{n}/' for n in sorted(found))}) "
            f"with other folders ({', '.join(f'{n}/' for n in others)}). Move the other folders into "
            f"train/ (or a split folder), or remove them.")
    return sorted(found.items(), key=lambda item: SPLITS.index(item[1]))


def _resolve_class_names(root: Path, found: list[str], given: Sequence[str] | None) -> list[str]:
    if given is None:
        names = found
    else:
        names = list(given)
        if len(set(names)) != len(names):
            raise DataError(f"class_names has duplicates: {names}. Give each class once.")
        unknown = [name for name in found if name not in set(names)]
        if unknown:
            raise DataError(
                f"Image folder '{root}' has class folder(s) {', '.join(repr(n) for n in unknown)} that "
                f"the model does not know; known classes: {', '.join(names)}. Remove or rename those "
                f"folders.")
    if len(names) < 2:
        got = f"only {names[0]!r}" if names else "none"
        raise DataError(
            f"Image folder '{root}' needs at least 2 classes (one sub-folder per class), found {got}. "
            f"Add a folder per class, e.g. photos/cat/ and photos/dog/.")
    return names


def _walk_images(root: Path, rel_dir: str, ignored: _Counter,
                 skipped: list[tuple[str, str]]) -> list[str]:
    """POSIX paths (relative to root) of the image-named files under ``root/rel_dir``, recursively.

    Symlinked folders are followed (datasets are often assembled from links), except links to a folder
    that contains the class folder or the image folder: those are loops, and following them would give
    this class the images of others. They are counted as ignored. Each real folder is visited once.
    A folder that cannot be listed goes to ``skipped``.
    """
    out: list[str] = []
    visited: set[str] = set()
    real_root, real_start = os.path.realpath(root), os.path.realpath(root / rel_dir)
    stack = [rel_dir]
    while stack:
        rel = stack.pop()
        folder = root / rel
        try:
            real = os.path.realpath(folder)
        except OSError:
            continue
        if real in visited:
            continue
        visited.add(real)
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except PermissionError:
            skipped.append((rel, "permission denied"))
            continue
        except OSError as exc:
            skipped.append((rel, f"folder cannot be listed: {_short(exc)}"))
            continue
        for entry in entries:
            child = f"{rel}/{entry.name}"
            if _is_ignored_name(entry.name) or _is_loop(entry, real_start, real_root):
                ignored.add()
            elif entry.is_dir():
                stack.append(child)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                out.append(child)
            else:
                ignored.add()  # non-image file (or a broken link without an image name)
    return out


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under a folder, recursively and sorted; hidden and system files left out.

    Example:
        >>> find_images("photos")  # doctest: +SKIP
        [PosixPath('photos/cat/1.jpg'), PosixPath('photos/dog/2.png')]
    """
    root = Path(folder)
    return [root / rel for rel in sorted(_walk_images(root, ".", _Counter(), []))]


def _unreadable_reason(path: Path) -> str | None:
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
        return f"{BOMB_REASON}: {_short(exc)}"
    except UnidentifiedImageError:
        return "not an image Pillow can read: unknown format (a text or HTML file, or another file renamed?)"
    except (OSError, ValueError, SyntaxError) as exc:
        # SyntaxError: some Pillow plugins raise it for malformed headers.
        return f"not an image Pillow can read: {_short(exc)}"
    except Exception as exc:  # noqa: BLE001 - a malformed file may make a Pillow plugin raise anything
        return f"not an image Pillow can read: {type(exc).__name__}: {_short(exc)}"


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


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


# --------------------------------------------------------------------------------------------- split


def stable_fraction(rel: str, seed: int) -> float:
    """A stable number in [0, 1) for a relative path and seed (NFC so macOS/Linux names agree).

    The split rule: a file's split depends on nothing but its own path and the seed, so adding
    or removing other files never moves it.

    Example:
        >>> stable_fraction("cat/1.jpg", 0) == stable_fraction("cat/1.jpg", 0)
        True
    """
    key = f"{seed}\0{unicodedata.normalize('NFC', rel)}".encode()
    return int.from_bytes(hashlib.sha1(key).digest()[:8], "big") / 2.0**64


def _hash_splits(paths: tuple[str, ...], labels: np.ndarray, seed: int,
                 val_fraction: float, test_fraction: float) -> tuple[str, ...]:
    units = [stable_fraction(p, seed) for p in paths]
    splits = ["test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
              for u in units]
    wanted = ["train"] + (["val"] if val_fraction > 0 else []) + (["test"] if test_fraction > 0 else [])
    for label in np.unique(labels).tolist():
        members = np.flatnonzero(labels == label).tolist()
        if len(members) < 3:
            continue
        for target in wanted:
            by_split = {s: [i for i in members if splits[i] == s] for s in SPLITS}
            if by_split[target]:
                continue
            # Donor: the largest split (train on ties), keeping at least one image there.
            donor = max(SPLITS, key=lambda s: (len(by_split[s]), s == "train"))
            if len(by_split[donor]) < 2:
                continue
            moved = max(by_split[donor], key=lambda i: units[i])
            splits[moved] = target
    return tuple(splits)


# --------------------------------------------------------------------------------------------- csv


def write_splits_csv(folder: ImageFolder, path: str | os.PathLike) -> None:
    """Write ``path,label,class_name,split`` rows (one per image, in ``folder.paths`` order) atomically.

    Example:
        >>> write_splits_csv(folder, run_dir / "splits.csv")  # doctest: +SKIP
    """
    from transferkit import files

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    files.write_csv(path, _CSV_COLUMNS, (
        (rel, label, folder.class_names[label], split)
        for rel, label, split in zip(folder.paths, folder.labels.tolist(), folder.splits, strict=True)
    ))


def read_splits_csv(
    path: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
) -> ImageFolder:
    """Read a file written by :func:`write_splits_csv` back into an :class:`ImageFolder`.

    Args:
        path: The ``splits.csv`` file.
        root: The image folder the relative paths point into; defaults to the CSV's folder.
        class_names: Full class order (e.g. from ``labels.txt``). Needed only when some class has no
            row, since then the CSV alone cannot tell its name; when given, rows must agree with it.

    Returns:
        An :class:`ImageFolder` with ``split_source="csv"``, rows sorted by path.

    Raises:
        DataError: Missing file, wrong header, bad row, or labels that disagree with class names.

    Example:
        >>> folder = read_splits_csv("runs/exp1/splits.csv", root="photos")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Splits file '{path}' does not exist. Give the splits.csv of an earlier run.")
    rows: list[tuple[str, int, str, str]] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != _CSV_COLUMNS:
            raise DataError(f"Splits file '{path}' must start with the header {','.join(_CSV_COLUMNS)}; "
                            f"got {','.join(header or [])!r}.")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 4:
                raise DataError(f"Splits file '{path}' line {line}: expected 4 columns, got {len(row)}.")
            rel, label_text, name, split = row
            try:
                label = int(label_text)
            except ValueError:
                raise DataError(f"Splits file '{path}' line {line}: label {label_text!r} is not an "
                                f"integer.") from None
            if label < 0:
                raise DataError(f"Splits file '{path}' line {line}: label {label} is negative.")
            if split not in SPLITS:
                raise DataError(f"Splits file '{path}' line {line}: split {split!r} is not one of "
                                f"{', '.join(SPLITS)}.")
            if not _is_inside(rel):
                raise DataError(f"Splits file '{path}' line {line}: path {rel!r} leaves the image folder "
                                f"(absolute, empty or with '..'); paths must be relative to it, e.g. cat/001.jpg.")
            rows.append((rel, label, name, split))

    mapping: dict[int, str] = {}
    for _rel, label, name, _split in rows:
        if mapping.setdefault(label, name) != name:
            raise DataError(f"Splits file '{path}': label {label} is used for both "
                            f"{mapping[label]!r} and {name!r}.")
    if class_names is not None:
        names = list(class_names)
        for label, name in mapping.items():
            if label >= len(names) or names[label] != name:
                raise DataError(f"Splits file '{path}': label {label} is {name!r} in the file but the "
                                f"given class names are {names}.")
    else:
        if mapping and sorted(mapping) != list(range(max(mapping) + 1)):
            missing = sorted(set(range(max(mapping) + 1)) - set(mapping))
            raise DataError(f"Splits file '{path}' has no row for label(s) {missing}, so their class "
                            f"names are unknown; pass class_names (e.g. from labels.txt).")
        names = [mapping[i] for i in range(len(mapping))]
    if len(set(names)) != len(names):
        raise DataError(f"Splits file '{path}': a class name appears under two labels: {names}.")
    seen: set[str] = set()
    for rel, *_ in rows:
        if rel in seen:
            raise DataError(f"Splits file '{path}' lists '{rel}' twice.")
        seen.add(rel)

    rows.sort(key=lambda r: r[0])
    labels = np.asarray([r[1] for r in rows], dtype=np.int64)
    labels.flags.writeable = False
    return ImageFolder(root=Path(root) if root is not None else path.parent,
                       class_names=tuple(names), paths=tuple(r[0] for r in rows), labels=labels,
                       splits=tuple(r[3] for r in rows), split_source="csv")


def _is_inside(rel: str) -> bool:
    """Whether a relative path from a file stays inside the folder it is relative to.

    Paths read from files (``splits.csv``) may come from someone else; ``root / "/etc/passwd"`` is
    ``/etc/passwd`` in pathlib, so absolute paths, drive letters and ``..`` parts are refused.
    """
    if not rel or "\0" in rel:
        return False
    parts = rel.replace("\\", "/").split("/")
    return not (rel.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts)


# --------------------------------------------------------------------------------------------- decode


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
            img = _to_rgb(img)
            # Squash to size x size, aspect ratio not kept: the same geometry as the default of
            # keras.utils.image_dataset_from_directory (crop_to_aspect_ratio=False). Pillow's bilinear
            # filter antialiases when shrinking, so values are close to but not identical with tf.image.
            img = img.resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"Cannot decode image '{path}': {BOMB_REASON}: {_short(exc)}") from exc
    except (OSError, ValueError, SyntaxError, EOFError, UnidentifiedImageError) as exc:
        raise ValueError(f"Cannot decode image '{path}': {_short(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - malformed data can make Pillow raise anything; one bad file
        # must not stop a tf.data pipeline of thousands
        raise ValueError(f"Cannot decode image '{path}': {type(exc).__name__}: {_short(exc)}") from exc
    if arr.shape != (size, size, 3):  # pragma: no cover - defensive
        raise ValueError(f"Cannot decode image '{path}': got shape {arr.shape}.")
    return arr


def _to_rgb(img: Image.Image) -> Image.Image:
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
