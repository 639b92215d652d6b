"""Image lists as files: a CSV or JSON-lines manifest of ``path,label[,split]`` rows.

Labelling tools and spreadsheets keep labels in such files, with the images in one folder::

    path,label,split
    images/001.jpg,cat,train
    images/002.jpg,dog,val

    {"path": "images/001.jpg", "label": "cat", "split": "train"}

Wherever a command takes IMAGE_DIR, a ``.csv`` or ``.jsonl`` file works too;
:func:`transferkit.data.scan.scan_folder` reads it with :func:`read_manifest`. Paths are relative to
the manifest's folder (``\\`` is read as ``/``, as Windows tools write them); a path that leaves that
folder is refused unless allowed (``--allow-outside``). The ``split`` column is optional: given,
it is kept (``validation`` = ``val``); absent, the stable hashed split applies. Other columns are
ignored, with a note. Without a label column, a manifest lists unlabelled photos (for extract and
features export).

Every problem row is reported at once with its line number (the header is line 1); files that are
missing or not images are skipped with a reason later, like a folder's.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.data.images import ALLOWED_EXTENSIONS, unreadable_reason
from transferkit.data.names import check_class_names
from transferkit.data.splits import ImageFolder, hash_splits, unlabelled_folder
from transferkit.errors import DataError, short_repr

log = logging.getLogger("transferkit")

#: File name endings read as manifests instead of folders.
MANIFEST_SUFFIXES = (".csv", ".jsonl")
#: Column names accepted for each field, in order of preference (compared without case).
COLUMNS = {"path": ("path", "file", "filename", "image", "image_path"),
           "label": ("label", "class", "class_name", "category"),
           "split": ("split",)}
_SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_SHOWN = 20  # problem rows listed in one error


@dataclass(frozen=True)
class ManifestRow:
    """One image of a manifest: its line (1-based, header included), path (POSIX, relative to the
    manifest's folder), label (None in an unlabelled manifest) and split (None when not given)."""

    line: int
    path: str
    label: str | None
    split: str | None


@dataclass(frozen=True)
class Manifest:
    """A manifest as read: its rows in file order, and notes (ignored columns) for the user."""

    path: Path
    rows: tuple[ManifestRow, ...]
    labelled: bool
    has_splits: bool
    notes: tuple[str, ...] = ()

    @property
    def root(self) -> Path:
        """The folder the paths are relative to."""
        return self.path.parent


def is_manifest(value) -> bool:
    """Whether an IMAGE_DIR value names a manifest file (by its ending)."""
    return isinstance(value, (str, os.PathLike)) and Path(value).suffix.lower() in MANIFEST_SUFFIXES


def read_manifest(path: str | os.PathLike, *, allow_outside: bool = False) -> Manifest:
    """Read and check a ``.csv`` or ``.jsonl`` manifest.

    With ``allow_outside``, paths may leave the manifest's folder (``../``, absolute paths); the
    images' root is then the deepest folder that holds the manifest's folder and every image.

    Raises:
        DataError: the file is missing or empty, a column is missing, or rows are bad (not UTF-8,
            wrong number of fields, empty path or label, unknown split, a path listed twice or
            leaving the manifest's folder, some rows with a split and others without): every bad
            row is named by its line number.

    Example:
        >>> manifest = read_manifest("labels.csv")  # doctest: +SKIP
        >>> manifest.rows[0]  # doctest: +SKIP
        ManifestRow(line=2, path='images/001.jpg', label='cat', split='train')
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"Manifest '{path}' does not exist. Check the path (it is relative to "
                        f"'{Path.cwd()}').") from None
    except OSError as exc:
        raise DataError(f"Manifest '{path}' cannot be read: {exc.strerror or exc}.") from None
    problems: list[str] = []
    text = _decode(data, problems)
    records, fields, notes = (_jsonl_records if path.suffix.lower() == ".jsonl" else _csv_records)(text, problems)
    if not records and not problems:
        problems.append("no image rows: add one row per image (path, label and optionally split)")
    rows = _rows(records, fields, problems, allow_outside)
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:_SHOWN])
        more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise DataError(f"Manifest '{path}' has {len(problems)} problem(s):\n{shown}{more}\nFix these rows "
                        "(paths are relative to the manifest's folder; splits are train, val or test).")
    return Manifest(path=path, rows=tuple(rows), labelled="label" in fields, has_splits=any(r.split for r in rows),
                    notes=tuple(notes))


def _decode(data: bytes, problems: list[str]) -> str:
    """The file as text: UTF-8 (a byte-order mark is dropped); each line that is not is a problem."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(f"line {number}: not UTF-8 text (byte 0x{line[exc.start]:02x} at column {exc.start + 1}); "
                            "save the file as UTF-8")
    return data.decode("utf-8", errors="replace")


def _csv_records(text: str, problems: list[str]) -> tuple[list[tuple[int, dict]], dict, list[str]]:
    """``([(line, {field: value})], {field: column name}, notes)`` of a CSV manifest."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    while header is not None and not any(cell.strip() for cell in header):
        header = next(reader, None)  # blank lines before the header
    if header is None:
        return [], {}, []
    fields, notes = _fields([cell.strip() for cell in header], reader.line_num, problems)
    if "path" not in fields:
        return [], fields, notes
    index = {field: header.index(name) for field, name in fields.items()}
    records = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            problems.append(f"line {reader.line_num}: {len(row)} field(s), expected {len(header)} "
                            f"({','.join(header)}); a separator other than ',' or an unquoted comma in a name?")
            continue
        records.append((reader.line_num, {field: row[i] for field, i in index.items()}))
    return records, fields, notes


def _jsonl_records(text: str, problems: list[str]) -> tuple[list[tuple[int, dict]], dict, list[str]]:
    """The same for JSON lines: one object per line, keys as CSV's column names."""
    records, seen = [], set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not JSON ({exc.msg})")
            continue
        if not isinstance(value, dict):
            problems.append(f"line {number}: a JSON object is expected, e.g. "
                            '{"path": "a.jpg", "label": "cat"}')
            continue
        seen.update(value)
        records.append((number, value))
    fields, notes = _fields(sorted(seen), 1, problems) if records else ({}, [])
    if "path" not in fields:
        return [], fields, notes
    out = []
    for number, value in records:
        row = {}
        for field, name in fields.items():
            item = value.get(name)
            if item is not None and not isinstance(item, (str, int)) or isinstance(item, bool):
                problems.append(f"line {number}: \"{name}\" must be text, received {short_repr(item)}")
            row[field] = "" if item is None else str(item)
        out.append((number, row))
    return out, fields, notes


def _leaves(rel: str) -> bool:
    """Whether a normalised manifest path leaves the manifest's folder (``..``, absolute, a drive)."""
    return rel.startswith("/") or rel == ".." or rel.startswith("../") or (len(rel) > 1 and rel[1] == ":")


def _fields(names: list[str], line: int, problems: list[str]) -> tuple[dict, list[str]]:
    """``{field: column name}`` for the columns found, and a note on the columns ignored."""
    lowered = {name.lower(): name for name in reversed(names)}
    fields = {}
    for field, choices in COLUMNS.items():
        found = next((lowered[c] for c in choices if c in lowered), None)
        if found is not None:
            fields[field] = found
    if "path" not in fields:
        problems.append(f"line {line}: no path column (found: {', '.join(names) or 'none'}). The first line must "
                        f"name the columns, e.g. path,label,split")
    ignored = [name for name in names if name and name not in fields.values()]
    notes = [f"columns ignored: {', '.join(ignored)}"] if ignored else []
    return fields, notes


def _rows(records: list[tuple[int, dict]], fields: dict, problems: list[str],
          allow_outside: bool = False) -> list[ManifestRow]:
    rows, first_line = [], {}
    has_split = "split" in fields and any(values.get("split", "").strip() for _, values in records)
    for line, values in records:
        raw = values["path"].strip()
        rel = posixpath.normpath(raw.replace("\\", "/")) if raw else ""
        label = values["label"].strip() if "label" in fields else None
        split = values.get("split", "").strip().lower() if has_split else None
        bad = []
        if not rel:
            bad.append("empty path")
        elif not allow_outside and _leaves(rel):
            bad.append(f"path {short_repr(raw)} leaves the manifest's folder; give it relative to that folder "
                       "(or move the manifest up to a folder that holds every image, or pass --allow-outside)")
        elif rel in first_line:
            bad.append(f"path {short_repr(raw)} is listed again (first on line {first_line[rel]})")
        if label is not None and not label:
            bad.append("empty label")
        elif label is not None and "|" in label:
            bad.append(f"label {short_repr(label)} names several classes; multi-label manifests are not "
                       "supported yet, give one label per row")
        if has_split and not split:
            bad.append("no split, while other rows have one; give every row a split, or none")
        elif has_split and split not in _SPLITS:
            bad.append(f"unknown split {short_repr(values['split'].strip())} (allowed: train, val, validation, test)")
        if bad:
            problems.append(f"line {line}: {'; '.join(bad)}")
            continue
        first_line[rel] = line
        rows.append(ManifestRow(line, rel, label, _SPLITS[split] if has_split else None))
    return rows


def scan_manifest(manifest: Manifest, *, seed: int, val_fraction: float, test_fraction: float,
                   class_names: Sequence[str] | None, labels: str) -> ImageFolder:
    """A manifest's images as an :class:`ImageFolder`, for :func:`transferkit.data.scan.scan_folder`
    (whose arguments these are): files that are missing or not images are skipped with their line
    and reason; the manifest's splits are kept (``split_source="manifest"``), else hashed. The
    folder's root is the manifest's folder, or (paths allowed outside it) the deepest folder that
    holds it and every image, so every path stays relative to the root."""
    root, where = manifest.root, f"Manifest '{manifest.path}'"
    if any(_leaves(row.path) for row in manifest.rows):  # --allow-outside: the root holds every image
        base = os.path.abspath(root)
        targets = [os.path.normpath(os.path.join(base, row.path)) for row in manifest.rows]
        root = Path(os.path.commonpath([base, *targets]))
        manifest = dataclasses.replace(manifest, rows=tuple(
            dataclasses.replace(row, path=Path(os.path.relpath(target, root)).as_posix())
            for row, target in zip(manifest.rows, targets, strict=True)))
        first: dict[str, int] = {}
        for row in manifest.rows:  # one file named two ways (relative and absolute)
            if first.setdefault(row.path, row.line) != row.line:
                raise DataError(f"{where}: line {row.line} lists the image of line {first[row.path]} again "
                                f"({row.path} under {root}). Keep one of the two rows.")
    for note in manifest.notes:
        log.info("%s: %s.", manifest.path, note)
    found = sorted({row.label for row in manifest.rows if row.label is not None})
    if labels == "optional" and (not manifest.labelled or len(found) < 2):
        return dataclasses.replace(unlabelled_folder(root, [row.path for row in manifest.rows], [], 0, where),
                                   manifest=manifest.path)
    if not manifest.labelled:
        raise DataError(f"{where} has no label column. Add one (path,label[,split]) to train, evaluate or compare "
                        "on it; 'transferkit extract' and 'features export' take it as it is.")
    check_class_names(found, manifest.path)
    names = list(class_names) if class_names is not None else found
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DataError(f"{where} has label(s) {', '.join(repr(n) for n in unknown)} that the model does not know; "
                        f"known classes: {', '.join(names)}. Remove those rows or fix their labels.")
    if len(names) < 2:
        raise DataError(f"{where} needs at least 2 classes, found {', '.join(repr(n) for n in names) or 'none'}. "
                        "Add rows of another class.")
    index_of = {name: i for i, name in enumerate(names)}
    records, skipped = [], []
    for row in sorted(manifest.rows, key=lambda r: r.path):
        reason = unreadable_reason(root / row.path)
        if reason is None:
            records.append(row)
        else:
            skipped.append((row.path, f"line {row.line}: {reason}"))
    empty = sorted(set(found) - {row.label for row in records})
    if empty:
        raise DataError(f"{where}: class(es) {', '.join(repr(n) for n in empty)} have no readable images (allowed: "
                        f"{ALLOWED_EXTENSIONS}). Fix their rows or remove them.")
    paths = tuple(row.path for row in records)
    label_array = np.asarray([index_of[row.label] for row in records], dtype=np.int64)
    if manifest.has_splits:
        splits, source = tuple(row.split for row in records), "manifest"
    else:
        splits, source = hash_splits(paths, label_array, seed, val_fraction, test_fraction), "hash"
    label_array.flags.writeable = False
    return ImageFolder(root=root, class_names=tuple(names), paths=paths, labels=label_array, splits=splits,
                       split_source=source, skipped=tuple(skipped), manifest=manifest.path)
