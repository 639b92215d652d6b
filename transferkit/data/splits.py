"""Which images train, validate and test: :class:`ImageFolder`, the stable hash split, ``splits.csv``.

A file's split depends only on its relative path and the seed (:func:`stable_fraction`), so adding or
removing other files never moves it; ``splits.csv`` records the split of a run so it can be read
back (:func:`read_splits_csv`) by evaluation, export and ensembles. Example::

    folder = scan_folder("photos", seed=0)          # transferkit.data.scan
    train_paths, train_labels = folder.subset("train")
    write_splits_csv(folder, "runs/exp1/splits.csv")
    again = read_splits_csv("runs/exp1/splits.csv", root="photos")
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit import files
from transferkit.data.images import ALLOWED_EXTENSIONS, unreadable_reason
from transferkit.errors import DataError, InputError

SPLITS = ("train", "val", "test")

_CSV_COLUMNS = ("path", "label", "class_name", "split")


@dataclass(frozen=True, eq=False)  # eq=False: a generated __eq__/__hash__ would choke on the ndarray
class ImageFolder:
    """Every usable image of a dataset with its label and split.

    Made by :func:`transferkit.data.scan.scan_folder` (or read back by :func:`read_splits_csv`).

    ``paths``, ``labels`` and ``splits`` are aligned and ordered by ``paths`` (sorted POSIX strings).
    ``labels`` is read-only.

    An unlabelled folder (``scan_folder(..., labels="optional")`` on photos without class folders)
    has no classes: ``class_names`` is empty, every label is -1 and every split ``""``
    (``split_source="none"``); :attr:`labelled` is False.

    Attributes:
        root: The scanned folder.
        class_names: Class names; ``labels`` index into this tuple.
        paths: POSIX paths relative to ``root``, sorted.
        labels: ``int64`` class index per path.
        splits: ``"train"``, ``"val"`` or ``"test"`` per path.
        split_source: ``"folders"`` (root held train/val/test folders), ``"hash"`` (computed here),
            ``"csv"`` (read back by :func:`read_splits_csv`), ``"manifest"`` (a manifest's split
            column) or ``"none"`` (unlabelled).
        skipped: ``(relative path, reason)`` of image-named files that could not be opened.
        num_ignored: Hidden, system and non-image entries that were ignored (a hidden folder counts once).
        manifest: The ``.csv`` or ``.jsonl`` file the images were listed in (``root`` is its folder),
            or None for a scanned folder.
    """

    root: Path
    class_names: tuple[str, ...]
    paths: tuple[str, ...]
    labels: np.ndarray
    splits: tuple[str, ...]
    split_source: str
    skipped: tuple[tuple[str, str], ...] = ()
    num_ignored: int = 0
    manifest: Path | None = None

    @property
    def source(self) -> Path:
        """What the images were read from, for messages: the manifest, or the folder."""
        return self.manifest or self.root

    @property
    def scanned_dirs(self) -> tuple[Path, ...]:
        """Folders whose whole content is read as images (transferkit never writes into them):
        ``root``, or none for a manifest, which reads only the files it lists."""
        return () if self.manifest is not None else (self.root,)

    @property
    def labelled(self) -> bool:
        """Whether the images have classes (and splits)."""
        return bool(self.class_names)

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


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise :class:`DataError` unless both shares are in [0, 1) and leave images to train on."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value < 1:
            raise DataError(f"{name} must be a number in [0, 1), got {value!r}. Example: 0.15.")
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction + test_fraction must be below 1 so training keeps some images, got "
            f"{val_fraction} + {test_fraction}. Example: 0.15 + 0.15.")


def stable_fraction(rel: str, seed: int) -> float:
    """A stable number in [0, 1) for a relative path and seed (NFC so macOS/Linux names agree).

    The split rule: a file's split depends on nothing but its own path and the seed, so adding
    or removing other files never moves it.

    Example:
        >>> stable_fraction("cat/1.jpg", 0) == stable_fraction("cat/1.jpg", 0)
        True
    """
    # A name's bytes, whatever the locale: names that are not UTF-8 (surrogates) hash too.
    key = f"{seed}\0{unicodedata.normalize('NFC', files.utf8_view(rel))}".encode("utf-8", files.NAME_ERRORS)
    return int.from_bytes(hashlib.sha1(key).digest()[:8], "big") / 2.0**64


#: A class needs this many images for one in each of train, val and test. A smaller class is all in train,
#: whatever the seed (see :func:`hash_splits`).
MIN_SPLIT_CLASS_IMAGES = 3


def hash_splits(paths: tuple[str, ...], labels: np.ndarray, seed: int,
                val_fraction: float, test_fraction: float) -> tuple[str, ...]:
    """The split of each path: by :func:`stable_fraction`, then per class by its number of images only.

    * A class of fewer than :data:`MIN_SPLIT_CLASS_IMAGES` images is all in train. It cannot reach every
      split anyway, and holding some of it out would depend on the seed: one seed would leave it without
      training images (a run refused) where another trains on it. Its accuracy cannot be measured, which
      :func:`transferkit.data.checks.dataset_warnings` says.
    * A class of 3 or more gets at least one image in every split in use: an empty split takes one image
      (the one with the highest hash) from the class's largest split (train on ties), which keeps one.

    Example:
        >>> hash_splits(("a/1.jpg", "a/2.jpg", "b/1.jpg"), np.array([0, 0, 1]), 0, 0.15, 0.15)
        ('train', 'train', 'train')
    """
    units = [stable_fraction(p, seed) for p in paths]
    splits = ["test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
              for u in units]
    wanted = ["train"] + (["val"] if val_fraction > 0 else []) + (["test"] if test_fraction > 0 else [])
    for label in np.unique(labels).tolist():
        members = np.flatnonzero(labels == label).tolist()
        if len(members) < MIN_SPLIT_CLASS_IMAGES:
            for i in members:
                splits[i] = "train"
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


def write_splits_csv(folder: ImageFolder, path: str | os.PathLike) -> None:
    """Write ``path,label,class_name,split`` rows (one per image, in ``folder.paths`` order) atomically.

    File names that are not UTF-8 are written as their bytes (:mod:`transferkit.files`), so
    :func:`read_splits_csv` finds the same files.

    Example:
        >>> write_splits_csv(folder, run_dir / "splits.csv")  # doctest: +SKIP
    """
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
    with files.open_text(path) as fh:  # file names that are not UTF-8 come back as written
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
            rows.append((files.native_name(rel), label, name, split))

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


# ----------------------------------------------------------------------------- a run's roles

#: Share of the training images held out for early stopping when the folder's own ``val/``
#: split serves as the test split.
EARLY_STOPPING_FRACTION = 0.15


def assign_roles(folder: ImageFolder, ok: np.ndarray, seed: int, *, check: bool = True) -> np.ndarray:
    """The role of each image in this run: ``train``, ``val`` (early stopping), ``test`` or ``skipped``.

    The one rule for a run's splits: ``train`` uses it, and so does ``features export``, whose
    ``split`` column is therefore the split ``train`` would use with the same seed.

    A folder split as ``train/`` + ``val/`` without ``test/`` (or a manifest's split column without
    ``test``) uses its ``val/`` images as the test
    split, so the reported accuracy is on images that chose nothing (not even the epoch), and
    early stopping uses a stable share of ``train/`` instead (the same hash rule as the folder
    split).  ``train/`` + ``test/`` without ``val/`` carves early-stopping images the same way.

    Args:
        folder: the scanned folder (its ``splits`` as found on disk or hashed with ``seed``).
        ok: ``(n,)`` False for images that could not be used (their role is ``skipped``).
        seed: seed of the early-stopping share carved from ``train/``.
        check: refuse roles a run cannot train on (a class without training images, nothing held
            out); ``features export`` labels any folder and passes False.

    Example:
        >>> roles = assign_roles(folder, np.ones(len(folder.paths), bool), seed=0)  # doctest: +SKIP
        >>> with_roles(folder, roles).counts()["test"]  # doctest: +SKIP
        {'ants': 70, 'bees': 83}
    """
    roles = np.array(folder.splits, dtype=object)
    if folder.split_source in ("folders", "manifest"):  # splits given, not hashed
        if not (roles == "test").any():
            roles[roles == "val"] = "test"
        if not (roles == "val").any():
            # The hash split's rule, so whether a class keeps training images depends on its count, not the seed.
            train = np.flatnonzero(roles == "train")
            roles[train] = hash_splits(tuple(folder.paths[i] for i in train), folder.labels[train], seed,
                                       val_fraction=EARLY_STOPPING_FRACTION, test_fraction=0.0)
    roles[~ok] = "skipped"
    if not check:
        return roles
    train_classes = set(folder.labels[roles == "train"].tolist())
    missing = [folder.class_names[c] for c in range(len(folder.class_names)) if c not in train_classes]
    if missing:
        raise DataError(
            f"No training images for class(es) {', '.join(missing)} in '{folder.root}'. "
            "Add images to those class folders (at least 3 each), or remove the folders."
        )
    if not (roles == "test").any() and not (roles == "val").any():
        raise InputError(
            f"'{folder.root}' has too few images to hold any out for testing. Add images, or raise "
            "--val-fraction / --test-fraction."
        )
    return roles


def with_roles(folder: ImageFolder, roles: np.ndarray) -> ImageFolder:
    """The folder with each image's role in this run as its split; skipped images left out."""
    keep = roles != "skipped"
    return dataclasses.replace(
        folder,
        paths=tuple(p for p, k in zip(folder.paths, keep, strict=True) if k),
        labels=folder.labels[keep],
        splits=tuple(str(r) for r in roles[keep]),
    )


def unlabelled_folder(root: Path, candidates: list[str], skipped: list[tuple[str, str]], num_ignored: int,
                where: str) -> ImageFolder:
    """An :class:`ImageFolder` of the readable images among ``candidates`` (paths relative to
    ``root``), without labels or splits; the others go to ``skipped`` with their reason.

    Raises:
        DataError: no candidate is readable (``where`` names the input, e.g. "Image folder 'x'").
    """
    paths = []
    for rel in candidates:
        reason = unreadable_reason(root / rel)
        if reason is None:
            paths.append(rel)
        else:
            skipped.append((rel, reason))
    if not paths:
        raise DataError(f"{where} holds no readable images (allowed: {ALLOWED_EXTENSIONS}). Add images, or give the "
                        f"folder that holds them.")
    labels = np.full(len(paths), -1, dtype=np.int64)
    labels.flags.writeable = False
    return ImageFolder(root=root, class_names=(), paths=tuple(sorted(paths)), labels=labels,
                       splits=("",) * len(paths), split_source="none", skipped=tuple(sorted(skipped)),
                       num_ignored=num_ignored)
