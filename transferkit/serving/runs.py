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
    status.json     running / finished / failed / interrupted, and the stage reached
    .transferkit-run   marks a folder transferkit writes (every command's -o): --overwrite needs it
    .transferkit-lock  held (flock) by the process writing the folder; a second one is refused

Claiming, locking and clearing an output folder is :mod:`transferkit.serving.outputs`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transferkit import files
from transferkit.errors import InputError
from transferkit.serving.schema import METRICS_VERSION, EvaluationMetrics, RunMetrics, metrics_version

log = logging.getLogger("transferkit")

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
MARKER_FILE = ".transferkit-run"
LOCK_FILE = ".transferkit-lock"
#: What the head and fine-tune phases write under ``checkpoints/``: all that --overwrite removes there.
CHECKPOINT_FILES = ("head.weights.h5", "head.json", "best.weights.h5", "history-fine-tune.csv")
BACKUP_DIR = "backup"
#: What :class:`transferkit.training.finetune` 's backup writes in ``checkpoints/backup`` (Keras' own names
#: included: folders from before the atomic backup).
BACKUP_PATTERNS = ("state.json", "epoch-*.weights.h5", "latest.weights.h5", "latest.weights.h5.bkp",
                   "training_metadata.json", "training_metadata.json.bkp", ".*.tmp", ".*.weights.h5")


#: What a command wrote before the :data:`MARKER_FILE` existed: a folder holding every file of one
#: of these sets is a transferkit output of an earlier version, which ``--overwrite`` may replace.
#: (explain's overlays are only PNGs, which cannot be told from the user's own pictures: refused.)
EARLIER_OUTPUTS = {
    "train": (MODEL_FILE, LABELS_FILE, CONFIG_FILE),
    "evaluate/ensemble": (METRICS_FILE, PREDICTIONS_FILE),
    "compare": ("comparison.json", "comparison.csv"),
    "export": ("model_card.json", LABELS_FILE),
}
#: transferkit's own bookkeeping: a folder holding only these is empty (a start that failed after
#: claiming the folder leaves them; a plain re-run must not be refused for it).
BOOKKEEPING_FILES = (MARKER_FILE, LOCK_FILE)


def read_status(run_dir: str | os.PathLike) -> dict:
    """``status.json`` of a run: ``state`` (running, finished, failed, interrupted), ``stage``
    (``train``, or ``report`` once the model and metrics are written), ``detail``.

    A missing, damaged or hostile file (not JSON, not an object, binary, a FIFO or device) is an
    unknown state: ``{}``, with a warning for a damaged one.
    """
    path = Path(run_dir) / STATUS_FILE
    try:
        return _read_status_file(path)
    except files.NotRegularFileError as exc:
        log.warning("Ignoring the run status '%s' (%s); treating the run's state as unknown.", path, exc.strerror)
        return {}


def write_status(run_dir: Path, state: str, detail: str = "", *, stage: str) -> None:
    """``status.json`` says whether a run finished, failed or was interrupted (resume with --resume),
    and its stage: ``train`` until the model and metrics are written, then ``report``, then ``done``."""
    files.write_json(run_dir / STATUS_FILE, {"state": state, "stage": stage, "detail": detail,
                                             "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def write_failure(run_dir: Path, exc: BaseException) -> None:
    """The run stopped: say how, keeping the stage it had reached (so --resume redoes only the rest)."""
    write_status(run_dir, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                 f"{type(exc).__name__}: {exc}"[:300], stage=read_status(run_dir).get("stage", "train"))


def _read_status_file(path: Path) -> dict:
    """:func:`read_status`, except that a FIFO, socket, device or folder raises NotRegularFileError."""
    try:
        data = json.loads(files.read_regular_bytes(path, max_bytes=1 << 16).decode("utf-8"))
    except FileNotFoundError:
        return {}
    except files.NotRegularFileError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning("Ignoring the damaged run status '%s' (%s); treating the run's state as unknown.", path,
                    type(exc).__name__)
        return {}
    if not isinstance(data, dict):
        log.warning("Ignoring the run status '%s': a JSON %s, not an object; treating the run's state as unknown.",
                    path, type(data).__name__)
        return {}
    return {key: value for key, value in data.items() if isinstance(value, str)}


def resumable_config(run_dir: str | os.PathLike) -> Path:
    """The ``config.yaml`` of a run that can be resumed (``--resume``), checked before any work."""
    run_dir = Path(run_dir)
    config = run_dir / CONFIG_FILE
    if not config.is_file():
        raise InputError(f"Cannot resume '{run_dir}': it has no {CONFIG_FILE}, so it is not a transferkit run "
                         "folder. Pass the -o folder of an interrupted 'transferkit train' run.")
    try:
        state = _read_status_file(run_dir / STATUS_FILE).get("state")
    except files.NotRegularFileError as exc:
        raise InputError(f"Cannot resume '{run_dir}': its {STATUS_FILE} is {exc.strerror}, not the file transferkit "
                         f"writes. Move it out of the folder and run the command again.") from None
    if state == "finished":
        raise InputError(f"Run '{run_dir}' already finished; there is nothing to resume. Train into a new folder "
                         "(or pass --overwrite with -o to replace it).")
    return config


def read_metrics(run_dir: str | os.PathLike) -> RunMetrics | EvaluationMetrics:
    """The ``metrics.json`` of a train or evaluate folder: the one reader of the file (the report,
    ``--resume``, the run's result), checked to be the JSON object transferkit writes.

    Raises:
        InputError: the file is missing, not JSON, or not an object.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise InputError(f"'{run_dir}' holds no {METRICS_FILE}: pass the -o folder of a finished "
                         "'transferkit train' or 'transferkit evaluate'.")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"'{path}' is not valid JSON ({exc}); run the command again.") from exc
    if not isinstance(metrics, dict):
        raise InputError(f"'{path}' holds a JSON {type(metrics).__name__}, not the object "
                         "'transferkit train' or 'transferkit evaluate' writes; run the command again.")
    if metrics_version(metrics) > METRICS_VERSION:
        log.warning("'%s' was written by a newer transferkit (metrics version %s; this one reads up to %d): "
                    "what it does not know is left out.", path, metrics["version"], METRICS_VERSION)
    return metrics


def read_settings(path: str | os.PathLike) -> dict:
    """A run's ``config.yaml`` as a mapping (``{}`` where absent): the one reader of the file.

    Raises:
        InputError: the file is damaged or hostile (:func:`transferkit.config.read_yaml`); the report
            catches it and is drawn without the settings, ``evaluate`` and ``predict`` stop.
    """
    from transferkit.config import read_yaml

    path = Path(path)
    if not path.is_file():
        return {}
    return read_yaml(path, "Run settings", "The file is damaged; train the run again or restore the file.")


def write_labels(path: str | os.PathLike, class_names: Sequence[str]) -> None:
    files.write_text(path, "".join(f"{name}\n" for name in class_names))


def save_model(model, path: str | os.PathLike) -> None:
    """``model.save`` to a temporary ``.keras`` file, then rename into place."""
    with files.atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


def save_weights(model, path: str | os.PathLike) -> None:
    """``model.save_weights`` to a temporary ``.weights.h5`` file, then rename into place: an
    interrupted write leaves the previous file whole (h5py writes in place)."""
    with files.atomic_path(path, suffix=".weights.h5") as tmp:
        model.save_weights(tmp)


@dataclass
class Run:
    """A trained run loaded back from its folder."""

    run_dir: Path
    model: object
    class_names: list[str]
    config: dict
    head: object = None  # a non-linear scikit-learn head on the model's features (train --head knn)

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
        try:
            recorded = json.loads(metrics.read_text(encoding="utf-8")) if metrics.is_file() else {}
        except (OSError, UnicodeDecodeError, ValueError):
            recorded = {}  # a damaged metrics.json: fall back to the settings
        recorded = recorded.get("image_dir") if isinstance(recorded, dict) else None
        if isinstance(recorded, str) and recorded:
            return recorded
        configured = self.config.get("image_dir")
        return configured if isinstance(configured, str) else None


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from ``labels.txt``, one a line (blank lines skipped).

    Raises:
        InputError: a name holds a control character (a damaged or hostile file).
    """
    path = Path(path)
    # Bytes that are not UTF-8 come back as the file-name bytes they stand for (files.NAME_ERRORS).
    text = path.read_bytes().decode("utf-8", files.NAME_ERRORS)
    names = [line for line in text.split("\n") if line.strip("\r")]
    names = [name.removesuffix("\r") for name in names]
    bad = next((n for n in names if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in n)), None)
    if bad is not None:
        raise InputError(f"Class names '{path}' hold a name with a control character ({bad[:40]!r}). The file is "
                         "damaged; train the run again or restore the file.")
    return names


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
    run_dir = check_run_dir(run_dir)
    import keras

    import transferkit.models.layers  # noqa: F401 - registers the Preprocess layer for deserialisation

    try:
        model = keras.saving.load_model(run_dir / MODEL_FILE, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - zip, HDF5 and Keras errors all mean "unusable file"
        raise InputError(
            f"Cannot load model '{run_dir / MODEL_FILE}': {type(exc).__name__}: {str(exc)[:200]}. "
            "The file is damaged or not a transferkit model; train the run again."
        ) from exc
    class_names = read_labels(run_dir / LABELS_FILE)
    config = read_settings(run_dir / CONFIG_FILE)
    head = None
    if (run_dir / HEAD_FILE).is_file():
        from transferkit.heads.saving import load_head

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


def write_history(path: Path, rows: list[dict]) -> None:
    """``history.csv``: one row per epoch of every phase, numbered per phase."""
    columns = ["phase", "epoch"] + sorted({k for row in rows for k in row} - {"phase", "epoch"})
    files.write_csv(path, columns, [[row.get(c, "") for c in columns] for row in rows])
