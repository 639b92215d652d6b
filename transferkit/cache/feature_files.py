"""Feature files: cached features written out for other tools (``transferkit features export``).

This module owns the npz, parquet and CSV layouts of exported features: one row per image (or
per augmented view) with its relative path, label, class name and split. It writes files only;
the vectors come from :func:`transferkit.cache.extraction.extract_features`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from transferkit import files

FEATURE_FORMATS = ("npz", "parquet", "csv")


def write_features(path: str | os.PathLike, file_format: str, rel_paths: Sequence[str],
                   labels: np.ndarray | None = None, class_names: Sequence[str] | None = None,
                   splits: Sequence[str] | None = None, *, vectors: np.ndarray,
                   views: Sequence[int] | None = None) -> None:
    """Write features for another tool, atomically: one row per image (or per augmented view).

    npz holds arrays ``paths``, ``labels``, ``class_names``, ``splits``, ``features``; parquet and
    CSV hold columns ``path, label, class_name, split, f0 .. f{d-1}`` (flat columns, which every
    tool reads). With ``views`` (0 = the image itself, 1..K its augmented views), npz also holds
    ``views`` and the other formats a ``view`` column after ``split``. Unlabelled images
    (``labels`` None) have no ``labels``, ``class_names`` and ``splits`` (no ``label``,
    ``class_name`` and ``split`` columns): none is invented.

    File names that are not UTF-8 (see :mod:`transferkit.files`) round-trip: CSV holds their bytes,
    npz Python's strings for them (``s.encode("utf-8", "surrogateescape")`` gives back the bytes). Parquet strings
    must be UTF-8, so there such a name's ``path`` shows each undecodable byte as ``\\xNN`` and a
    ``path_bytes`` column (binary, only when some name needs it) holds every name's exact bytes.

    Example:
        >>> write_features("f.npz", "npz", ["a/1.jpg"], np.array([0]), ["a"], ["train"], vectors=np.ones((1, 2)))
        ... # doctest: +SKIP
    """
    if file_format not in FEATURE_FORMATS:
        raise ValueError(f"Unknown format {file_format!r}; allowed: {', '.join(FEATURE_FORMATS)}.")
    vectors = np.asarray(vectors, dtype=np.float32)
    if (labels is None) != (class_names is None) or (labels is None) != (splits is None):
        raise ValueError("labels, class_names and splits go together: give all three, or none (unlabelled).")
    if file_format == "npz":
        arrays = {"paths": np.asarray([files.utf8_view(p) for p in rel_paths], dtype=str)}
        if labels is not None:
            arrays.update(labels=np.asarray(labels), class_names=np.asarray(class_names, dtype=str),
                          splits=np.asarray(splits, dtype=str))
        arrays["features"] = vectors
        if views is not None:
            arrays["views"] = np.asarray(views, dtype=np.int64)
        with files.atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)
        return
    columns = {"path": list(rel_paths)}
    if labels is not None:
        labels = np.asarray(labels)
        columns.update(label=labels.tolist(), class_name=[class_names[i] for i in labels], split=list(splits))
    if views is not None:
        columns["view"] = [int(v) for v in views]
    columns.update({f"f{j}": vectors[:, j] for j in range(vectors.shape[1])})
    if file_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        shown = [files.display_name(p) for p in columns["path"]]
        if shown != [files.utf8_view(p) for p in columns["path"]]:  # some name is not UTF-8
            columns = {"path": shown, "path_bytes": [p.encode("utf-8", files.NAME_ERRORS) for p in columns["path"]],
                       **{k: v for k, v in columns.items() if k != "path"}}
        if "class_name" in columns:
            columns["class_name"] = [files.display_name(c) for c in columns["class_name"]]
        with files.atomic_path(path, suffix=".parquet") as tmp:
            pq.write_table(pa.table(columns), tmp)
    else:
        header = list(columns)
        files.write_csv(path, header, zip(*(columns[name] for name in header), strict=True))
