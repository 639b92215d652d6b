"""Scan a dataset into images, labels and stable splits: a folder of class folders, a manifest file
or a TFDS name.

The input is a folder with one sub-folder per class (images may be nested deeper)::

    photos/cat/001.jpg
    photos/cat/2023/holiday/IMG_0042.JPG
    photos/dog/rex.png

or a folder that is already split into ``train/``, ``val/`` (or ``validation/``) and ``test/``, each
holding class folders, or ``tfds:NAME[:SPLIT]``, a TensorFlow Datasets image classification set,
which :mod:`transferkit.data.tfds` writes out once as such a folder. Example::

    folder = scan_folder("photos", seed=0)
    train_paths, train_labels = folder.subset("train")
    write_splits_csv(folder, "runs/exp1/splits.csv")
    ds = image_dataset([folder.abs_path(p) for p in train_paths], size=224, batch_size=32)

This module is the entry point for datasets; the pieces live beside it and are importable from
here too: decoding in :mod:`transferkit.data.images` (:func:`load_image`, :func:`image_dataset`), splits
and ``splits.csv`` in :mod:`transferkit.data.splits` (:class:`ImageFolder`, :func:`read_splits_csv`),
manifests in :mod:`transferkit.data.manifest`, the rules for class names in
:mod:`transferkit.data.names`. Scanning a folder imports no TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transferkit import files
from transferkit.data.images import (
    ALLOWED_EXTENSIONS,
    IMAGE_EXTENSIONS,
    decode_in_graph,
    image_dataset,
    load_image,
    path_strings,
    short_message,
    unreadable_reason,
)
from transferkit.data.manifest import is_manifest, read_manifest, scan_manifest
from transferkit.data.names import check_class_names
from transferkit.data.splits import (
    SPLITS,
    ImageFolder,
    check_fractions,
    hash_splits,
    read_splits_csv,
    stable_fraction,
    unlabelled_folder,
    write_splits_csv,
)
from transferkit.data.tfds import is_tfds_name
from transferkit.errors import ArgumentError, DataError

__all__ = [
    "IMAGE_EXTENSIONS", "SPLITS", "ImageFolder", "check_class_names", "decode_in_graph", "find_images",
    "image_dataset", "load_image", "path_strings", "read_splits_csv", "scan_folder", "stable_fraction",
    "write_splits_csv",
]

# Files and folders that operating systems and tools leave behind; never images, never classes.
_SYSTEM_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx", "@eadir", "$recycle.bin"})
# Folder names (lower-case) that mark a pre-split dataset, mapped to the split they hold.
_SPLIT_DIRS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_UNLABELLED_HINT = (" (Photos without classes: 'transferkit extract', 'features export' and 'features plot' "
                    "take them as they are.)")


def scan_folder(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    class_names: Sequence[str] | None = None,
    labels: str = "required",
    allow_outside: bool = False,
) -> ImageFolder:
    """Find the images of a class-per-folder dataset and assign each one a stable split.

    With ``labels="optional"`` (extract, features export and plot), a folder with fewer than two
    class folders is a photo collection without labels: every image under it, however deep, with no
    label and no split (see :attr:`ImageFolder.labelled`).

    When ``root`` holds ``train/`` plus ``val/``, ``validation/`` or ``test/`` folders, those are the
    splits (``split_source="folders"``; the fractions and seed are then unused). Otherwise a file's split
    comes from a SHA-1 hash of ``seed`` and its relative path, so adding or removing other files never
    moves it. A small fix-up then makes every split see every class: for a class with at least 3 images,
    an empty split takes one image (the one with the highest hash) from the class's largest split
    (normally train).

    Each candidate is opened with Pillow (header only); files that cannot be opened go to ``skipped``
    instead of raising. Decoding errors in the pixel data show up later in :func:`load_image`.

    ``tfds:NAME[:SPLIT]`` scans the folder :func:`transferkit.data.tfds.prepare_tfds` writes (once)
    for that TensorFlow Datasets split; its classes keep TFDS's label order.

    Args:
        root: Folder with one sub-folder per class, a ``.csv`` or ``.jsonl`` manifest of
            ``path,label[,split]`` rows (:mod:`transferkit.data.manifest`; ``split_source="manifest"``
            when it has a split column), or ``tfds:NAME[:SPLIT]``.
        seed: Changes the hash split (not the folder split).
        val_fraction: Expected share of the validation split, in [0, 1).
        test_fraction: Expected share of the test split, in [0, 1); ``val + test < 1``.
        class_names: Known classes in label order (e.g. from a trained model's ``labels.txt``);
            a folder class missing from it raises. Classes without a folder are allowed.
        labels: ``"required"`` (train, evaluate, compare: refuse a folder without two classes) or
            ``"optional"`` (scan such a folder unlabelled).
        allow_outside: a manifest's paths may leave its folder (see :func:`read_manifest`).

    Returns:
        An :class:`ImageFolder`.

    Raises:
        DataError: Root missing, no class folders, a class without readable images, fewer than two
            classes, an unknown class, a class name that :func:`check_class_names` refuses, or bad
            fractions; a TFDS dataset that is unknown or unavailable.

    Example:
        >>> folder = scan_folder("photos", seed=1)  # doctest: +SKIP
        >>> folder.counts()["val"]  # doctest: +SKIP
        {'cat': 15, 'dog': 12}
    """
    check_fractions(val_fraction, test_fraction)
    if labels not in ("required", "optional"):
        raise ArgumentError("labels", "'required' or 'optional'", labels)
    if is_tfds_name(root):
        from transferkit.data.tfds import prepare_tfds

        prepared = prepare_tfds(root)
        root, class_names = prepared.root, prepared.class_names if class_names is None else class_names
    if is_manifest(root):
        return scan_manifest(read_manifest(root, allow_outside=allow_outside), seed=seed, val_fraction=val_fraction,
                              test_fraction=test_fraction, class_names=class_names, labels=labels)
    root = Path(root)
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
                class_dirs.setdefault(files.utf8_view(name), []).append((f"{dir_name}/{name}", split))
        _count_loose_files(root, ignored)
        for dir_name, _ in split_dirs:
            _count_loose_files(root / dir_name, ignored)
    else:
        for name in top_dirs:
            # A class name is text: its UTF-8 spelling in any locale (check_class_names refuses other bytes).
            class_dirs[files.utf8_view(name)] = [(name, None)]
        _count_loose_files(root, ignored)

    if labels == "optional" and len(class_dirs) < 2 and not split_dirs:
        return _scan_unlabelled(root)
    if not class_dirs:
        raise DataError(
            f"Image folder '{root}' has no class sub-folders. transferkit expects one sub-folder per "
            f"class, e.g. photos/cat/*.jpg, photos/dog/*.jpg (or train/, val/, test/ folders that each "
            f"hold such class folders).{_UNLABELLED_HINT}")

    check_class_names(sorted(class_dirs), root)
    names = _resolve_class_names(root, sorted(class_dirs), class_names)
    index_of = {name: i for i, name in enumerate(names)}

    records: list[tuple[str, int, str | None]] = []  # (relative path, label, split or None)
    skipped: list[tuple[str, str]] = []
    for name in sorted(class_dirs):
        found = 0
        for rel_dir, split in class_dirs[name]:
            for rel in _walk_images(root, rel_dir, ignored, skipped):
                reason = unreadable_reason(root / rel)
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
                f"{noun} {where} {verb} no readable images (allowed: {ALLOWED_EXTENSIONS}). Add images or remove "
                f"the folder.")

    records.sort(key=lambda r: r[0])
    paths = tuple(r[0] for r in records)
    labels = np.asarray([r[1] for r in records], dtype=np.int64)
    if split_dirs:
        splits = tuple(r[2] for r in records)
        source = "folders"
    else:
        splits = hash_splits(paths, labels, seed, val_fraction, test_fraction)
        source = "hash"
    labels.flags.writeable = False
    return ImageFolder(root=root, class_names=tuple(names), paths=paths, labels=labels,
                       splits=splits, split_source=source, skipped=tuple(sorted(skipped)),
                       num_ignored=ignored.value)


def _scan_unlabelled(root: Path) -> ImageFolder:
    """Every readable image under ``root`` (recursively), without labels or splits."""
    ignored, skipped = _Counter(), []
    found = [rel.removeprefix("./") for rel in _walk_images(root, ".", ignored, skipped)]
    return unlabelled_folder(root, found, skipped, ignored.value, f"Image folder '{root}'")


class _Counter:
    value = 0

    def add(self, n: int = 1) -> None:
        self.value += n


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
            elif _is_dir(entry):  # follows a symlinked class folder, on purpose
                names.append(entry.name)
    return sorted(names)


def _is_dir(entry: os.DirEntry) -> bool:
    """``entry.is_dir()``, False for a link that cannot be followed: DirEntry raises for a link to
    itself (ELOOP) where it returns False for a broken one; the file is then skipped with its reason."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_loop(entry: os.DirEntry, *folders: str) -> bool:
    """Whether ``entry`` is a link to a folder that contains (or is) one of ``folders`` (real paths).

    Following it would walk those folders again, e.g. another class's images under this class.
    """
    if not entry.is_symlink() or not _is_dir(entry):
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
            if not _is_ignored_name(entry.name) and not _is_dir(entry):
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
            f"Add a folder per class, e.g. photos/cat/ and photos/dog/.{_UNLABELLED_HINT}")
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
            skipped.append((rel, f"folder cannot be listed: {short_message(exc)}"))
            continue
        for entry in entries:
            child = f"{rel}/{entry.name}"
            if _is_ignored_name(entry.name) or _is_loop(entry, real_start, real_root):
                ignored.add()
            elif _is_dir(entry):
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
