"""The run folder: what a ``train`` run writes, and loading it back for ``evaluate`` and ``predict``.

Layout of RUN_DIR::

    model.keras     raw RGB pixels (0-255) in, class probabilities out; preprocessing inside
    labels.txt      class names, one a line, in output order
    config.yaml     the resolved settings (re-run with ``transferkit train --config``)
    splits.csv      every image with its label and split
    history.csv     per-epoch loss and accuracy (Keras CSVLogger)
    metrics.json    test metrics, counts, skipped files, timings
    predictions.csv each test image: true class, predicted class, confidence
    skipped.csv     images that could not be used, with the reason
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transferkit import files
from transferkit.errors import InputError

MODEL_FILE = "model.keras"
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.yaml"
SPLITS_FILE = "splits.csv"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
SKIPPED_FILE = "skipped.csv"
PREDICTIONS_FILE = "predictions.csv"
STATUS_FILE = "status.json"
CHECKPOINT_DIR = "checkpoints"
HEAD_FILE = "head.skops"


def prepare_output_dir(path: str | os.PathLike, overwrite: bool = False, option: str = "-o/--output-dir") -> Path:
    """Check an output folder before a long job starts: refuse to mix runs, fail early if unwritable.

    Raises:
        InputError: the folder is not empty (and ``overwrite`` is off), is a file, or is read-only.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"Output folder '{path}' ({option}) is a file. Choose a folder path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise InputError(
            f"Output folder '{path}' ({option}) already exists and is not empty. "
            "Choose a new folder, or pass --overwrite to replace the run in it."
        )
    check_writable_dir(path, option)
    return path


def clear_previous_run(run_dir: str | os.PathLike) -> None:
    """Before a new (not resumed) run in an ``--overwrite`` folder: remove the files of the previous
    run that this one would otherwise read as its own. Its checkpoints would be resumed by the
    fine-tune phase, and a ``head.skops`` would make a softmax run load as a scikit-learn one.
    Every other file is rewritten by the new run."""
    run_dir = Path(run_dir)
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    for name in (HEAD_FILE, Path(HEAD_FILE).with_suffix(".json").name):
        (run_dir / name).unlink(missing_ok=True)


def check_writable_dir(path: str | os.PathLike, option: str) -> Path:
    """Create a folder if needed and prove a file can be written in it, before any long work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise InputError(
            f"Cannot write to folder '{path}' ({option}): {exc.strerror or exc}. Choose a writable folder."
        ) from exc
    return path


def resumable_config(run_dir: str | os.PathLike) -> Path:
    """The ``config.yaml`` of a run that can be resumed (``--resume``), checked before any work."""
    run_dir = Path(run_dir)
    config = run_dir / CONFIG_FILE
    if not config.is_file():
        raise InputError(f"Cannot resume '{run_dir}': it has no {CONFIG_FILE}, so it is not a transferkit run "
                         "folder. Pass the -o folder of an interrupted 'transferkit train' run.")
    status = run_dir / STATUS_FILE
    if status.is_file() and json.loads(status.read_text(encoding="utf-8")).get("state") == "finished":
        raise InputError(f"Run '{run_dir}' already finished; there is nothing to resume. Train into a new folder "
                         "(or pass --overwrite with -o to replace it).")
    return config


def write_labels(path: str | os.PathLike, class_names: Sequence[str]) -> None:
    files.write_text(path, "".join(f"{name}\n" for name in class_names))


def save_model(model, path: str | os.PathLike) -> None:
    """``model.save`` to a temporary ``.keras`` file, then rename into place."""
    with files.atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


@dataclass
class Run:
    """A trained run loaded back from its folder."""

    run_dir: Path
    model: object
    class_names: list[str]
    config: dict
    head: object = None  # a non-linear scikit-learn head on the model's features (train --head knn)

    def predictor(self, batch_size: int = 32):
        """The run as a :class:`transferkit.predictors.Predictor` (pixels in, class scores out)."""
        from transferkit.predictors import HeadPredictor, KerasPredictor

        if self.head is not None:
            return HeadPredictor(self.model, self.head, self.class_names, self.run_dir, batch_size)
        return KerasPredictor(self.model, self.class_names, self.run_dir, batch_size)

    def require_keras_head(self, action: str) -> None:
        """Refuse ``action`` (export, Grad-CAM) on a run whose head is not a Keras layer."""
        if self.head is not None:
            raise InputError(f"Cannot {action} run '{self.run_dir}': its {self.head.name} head is a scikit-learn "
                             "model, not a Keras layer. Train with the softmax head or a linear one (linear-svm, "
                             "logreg, ridge), which fold into the Keras model.")

    @property
    def image_size(self) -> int:
        return int(self.model.input_shape[1])

    @property
    def image_root(self) -> str | None:
        """The folder the run's images are in: ``metrics.json`` records the one actually read
        (for a ``tfds:`` input, where TFDS's images were written), else ``config.yaml``'s."""
        metrics = self.run_dir / METRICS_FILE
        if metrics.is_file():
            recorded = json.loads(metrics.read_text(encoding="utf-8")).get("image_dir")
            if recorded:
                return recorded
        return self.config.get("image_dir")


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """Refuse a folder that is not a finished run, before anything slow starts."""
    run_dir = Path(run_dir)
    missing = [name for name in (MODEL_FILE, LABELS_FILE) if not (run_dir / name).is_file()]
    if missing:
        raise InputError(
            f"'{run_dir}' is not a transferkit run folder (missing {', '.join(missing)}). "
            "Pass the -o folder of a finished 'transferkit train' run."
        )
    return run_dir


def load_run(run_dir: str | os.PathLike) -> Run:
    """Load the model, labels and settings of a ``transferkit train`` run.

    The model loads with Keras' safe mode on: a run folder from elsewhere cannot run code
    through a Lambda layer.

    Raises:
        InputError: the folder is not a complete run folder.
    """
    import yaml

    run_dir = check_run_dir(run_dir)
    import keras

    import transferkit.layers  # noqa: F401 - registers the Preprocess layer for deserialisation

    try:
        model = keras.saving.load_model(run_dir / MODEL_FILE, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - zip, HDF5 and Keras errors all mean "unusable file"
        raise InputError(
            f"Cannot load model '{run_dir / MODEL_FILE}': {type(exc).__name__}: {str(exc)[:200]}. "
            "The file is damaged or not a transferkit model; train the run again."
        ) from exc
    class_names = [line for line in (run_dir / LABELS_FILE).read_text(encoding="utf-8").splitlines() if line]
    config_path = run_dir / CONFIG_FILE
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except yaml.YAMLError as exc:
        raise InputError(f"Run settings '{config_path}' are not valid YAML: {exc}") from exc
    head = None
    if (run_dir / HEAD_FILE).is_file():
        from transferkit.heads import load_head

        head, _ = load_head(run_dir / HEAD_FILE)  # registry types only: no file can run code
        outputs = len(head.classes_)
    else:
        outputs = model.output_shape[-1]
    if outputs != len(class_names):
        raise InputError(
            f"Run folder '{run_dir}' is inconsistent: the model has {outputs} outputs "
            f"but {LABELS_FILE} lists {len(class_names)} classes."
        )
    return Run(run_dir, model, class_names, config or {}, head)


def predict_files(run, paths: Sequence[str | os.PathLike], *, top_k: int = 1, batch_size: int = 32,
                  verbose: int = 0, tta: bool = False) -> list[dict]:
    """Classify image files and folders (searched recursively) with a loaded run or a predictor.

    Args:
        run: a :class:`Run`, or a :class:`transferkit.predictors.Predictor` (any exported model).
        tta: average the 10-crop test-time augmentation (:mod:`transferkit.tta`).

    Returns:
        One row per image, in the order given (folders sorted): ``{"path", "ok", "error",
        "predictions": [(class name, probability), ...]}`` with the ``top_k`` best first.
    """
    import numpy as np

    from transferkit.data import find_images
    from transferkit.predictors import predict_paths

    files: list[Path] = []
    for item in paths:
        item = Path(item)
        if item.is_dir():
            files.extend(find_images(item))
        elif item.is_file():
            files.append(item)
        else:
            raise InputError(f"'{item}' is neither an image file nor a folder. Check the path.")
    if not files:
        raise InputError(f"No image files found in {', '.join(map(str, paths))}.")
    predictor = run.predictor(batch_size) if isinstance(run, Run) else run
    result = predict_paths(predictor, files, batch_size=batch_size, tta=tta, verbose=verbose)
    k = max(1, min(top_k, len(run.class_names)))
    rows = []
    for i, path in enumerate(files):
        probs = result.probabilities[i]
        best = np.argsort(-probs)[:k] if result.ok[i] else []
        rows.append({
            "path": str(path),
            "ok": bool(result.ok[i]),
            "error": result.errors.get(i, ""),
            "predictions": [(run.class_names[c], float(probs[c])) for c in best],
        })
    return rows
