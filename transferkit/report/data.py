"""Reading a train or evaluate folder for the report: metrics, settings, history, predictions, versions.

Anything optional that is missing reads as empty, so a report can be drawn for any finished
folder, including those of older versions. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path

import numpy as np

from transferkit import files
from transferkit.errors import InputError
from transferkit.serving import runs
from transferkit.serving.schema import EvaluationMetrics, RunMetrics

log = logging.getLogger("transferkit")


def collect_versions() -> dict[str, str]:
    """Versions of transferkit, Python and the libraries that shape a model, without importing them.

    Example:
        >>> sorted(collect_versions())[:3]
        ['keras', 'numpy', 'python']
    """
    import platform
    from importlib import metadata

    from transferkit import __version__

    found = {"transferkit": __version__, "python": platform.python_version()}
    for name, dists in (("tensorflow", ("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tf-nightly")),
                        ("keras", ("keras",)), ("scikit-learn", ("scikit-learn",)), ("numpy", ("numpy",))):
        for dist in dists:
            try:
                found[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            found[name] = "not installed"
    return found


def feature_settings(run_dir: str | os.PathLike) -> dict:
    """What gives a train or evaluate folder's bottleneck features: the image folder and backbone settings.

    For ``transferkit report --feature-map``: the features come from the cache with these.

    Raises:
        InputError: the folder does not say which images or backbone it used.
    """
    run = RunFolder(Path(run_dir))
    config = run.config
    image_dir = run.metrics.get("image_dir") or config.get("image_dir")
    if not image_dir or not config.get("backbone"):
        raise InputError(f"'{run_dir}' does not record its image folder and backbone ({runs.CONFIG_FILE} missing?), "
                         "so its features cannot be found; draw them with 'transferkit features plot'.")
    if not Path(image_dir).is_dir():
        raise InputError(f"The image folder of '{run_dir}', '{image_dir}', is not there any more; the feature map "
                         "needs its images (or their cached features found by their bytes).")
    return {"image_dir": str(image_dir), "backbone": config["backbone"], "weights": config.get("weights", "imagenet"),
            "image_size": config.get("image_size"), "cache_dir": config.get("cache_dir"),
            "cache_dtype": config.get("cache_dtype", "float32"), "seed": int(config.get("seed") or 0),
            "class_names": run.class_names}


class RunFolder:
    """The files of a train or evaluate folder, read once; anything missing becomes empty."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        metrics_path = run_dir / runs.METRICS_FILE
        self.metrics: RunMetrics | EvaluationMetrics = runs.read_metrics(run_dir)
        if isinstance(self.metrics.get("test"), dict):
            self.kind, self.test = "train", self.metrics["test"]
        elif "confusion_matrix" in self.metrics:
            self.kind, self.test = "evaluate", self.metrics
        else:
            raise InputError(f"'{metrics_path}' holds no test metrics; is it from 'transferkit train' or "
                             "'transferkit evaluate'?")
        self.class_names = list(self.test.get("class_names") or self._labels())
        if not all(isinstance(name, str) for name in self.class_names):
            raise InputError(f"'{metrics_path}': class_names must be a list of names; the file is damaged, run the "
                             "command again.")
        self.config_error = ""  # why the settings could not be read, shown in their place
        self.config = self._yaml(run_dir / runs.CONFIG_FILE)
        self.config_source = runs.CONFIG_FILE
        if not self.config and self.kind == "evaluate" and self.metrics.get("run_dir"):
            # An evaluation's settings are those of the run it evaluated.
            self.config_source = str(Path(self.metrics["run_dir"]) / runs.CONFIG_FILE)
            self.config = self._yaml(Path(self.config_source))
        self.history, self.phases = read_history(run_dir / runs.HISTORY_FILE)
        self.predictions = read_csv(run_dir / runs.PREDICTIONS_FILE)
        self.skipped = read_csv(run_dir / runs.SKIPPED_FILE)
        if not self.skipped and self.metrics.get("skipped"):
            self.skipped = [{"path": s.get("path", ""), "reason": s.get("reason", "")} for s in self.metrics["skipped"]]

    def _labels(self) -> list[str]:
        path = self.dir / runs.LABELS_FILE
        return runs.read_labels(path) if path.is_file() else []

    def _yaml(self, path: Path) -> dict:
        try:
            return runs.read_settings(path)
        except InputError as exc:  # damaged or hostile: the report is drawn without the settings, and says why
            self.config_error = f"The settings were left out: {exc}"
            log.warning("%s", self.config_error)
            return {}

    def image_path(self, rel: str) -> Path:
        """Where an image of ``predictions.csv`` is: relative to, or absolute inside, the run's image folder.

        ``predictions.csv`` may come from someone else: a path that leaves the image folder (``..``,
        another absolute path, a NUL) is refused, so a report never shows a file from elsewhere.

        Raises:
            ValueError: the path is outside the image folder, or the folder does not record one; the
                message is the reason.
        """
        root = self.metrics.get("image_dir") or self.config.get("image_dir")
        if not isinstance(root, str) or not root or "\0" in root:
            raise ValueError(f"the folder's {runs.METRICS_FILE} records no image folder, so its images "
                             "cannot be found")
        if not isinstance(rel, str) or not rel or "\0" in rel:
            raise ValueError(f"no usable path in {runs.PREDICTIONS_FILE}")
        base = os.path.abspath(files.native_name(root))
        path = os.path.abspath(os.path.join(base, files.native_name(rel)))  # an absolute rel stays itself
        if os.path.commonpath([base, path]) != base:
            raise ValueError(f"outside the run's image folder '{files.display_name(root)}'; not read")
        return Path(path)


def read_history(path: Path) -> tuple[dict[str, list[float]], list[str] | None]:
    """``history.csv`` as column -> values, and each epoch's phase (None for a one-phase run).

    Phases come from a ``phase`` column, or, for files appended to by several ``CSVLogger``
    runs, from a repeated header line or an epoch counter that starts again.
    """
    if not path.is_file():
        return {}, None
    with files.open_text(path) as handle:  # damaged bytes read as escapes, not a UnicodeDecodeError
        rows = list(csv.reader(handle))
    if not rows:
        return {}, None
    header, columns, phases, phase_no = rows[0], {}, [], 1
    last_epoch = -math.inf
    for row in rows[1:]:
        if not row:
            continue
        if row == header or (row and row[0] == "epoch"):
            header, phase_no, last_epoch = row, phase_no + 1, -math.inf
            continue
        record = dict(zip(header, row, strict=False))
        epoch = to_float(record.get("epoch"))
        if "phase" not in record and np.isfinite(epoch) and epoch <= last_epoch:
            phase_no += 1
        last_epoch = epoch if np.isfinite(epoch) else last_epoch
        phases.append(record.get("phase") or f"phase {phase_no}")
        for key, value in record.items():
            if key not in ("epoch", "phase"):
                columns.setdefault(key, [math.nan] * (len(phases) - 1)).append(to_float(value))
        for values in columns.values():  # a column a later phase lacks
            values.extend([math.nan] * (len(phases) - len(values)))
    return columns, (phases if len(set(phases)) > 1 else None)


def to_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV the run wrote (file names that are not UTF-8 come back as written); ``[]`` if absent."""
    if not path.is_file():
        return []
    with files.open_text(path) as handle:
        return list(csv.DictReader(handle))
