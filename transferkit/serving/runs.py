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

What transferkit never does to an output folder: write inside an input image folder, write
into a non-empty folder without ``--overwrite``, ``--overwrite`` a folder it did not mark, or
delete anything there but the files it names itself (:func:`clear_previous_run`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from transferkit import files
from transferkit.errors import InputError
from transferkit.serving.schema import METRICS_VERSION, EvaluationMetrics, RunMetrics, metrics_version

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; folders are not locked there
    fcntl = None

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


def check_output_dir(path: str | os.PathLike, overwrite: bool = False, option: str = "-o/--output-dir", *,
                     inputs: Iterable[str | os.PathLike | None] = (), resume: bool = False) -> Path:
    """Every refusal of :func:`prepare_output_dir`, creating and claiming nothing: callers run it
    before their other checks (the cache folder), so a refused job leaves nothing behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"Output folder '{path}' ({option}) is a file. Choose a folder path.")
    check_outside_inputs(path, option, inputs)
    if path.is_dir() and any(entry.name not in BOOKKEEPING_FILES for entry in path.iterdir()):
        if not (overwrite or resume):
            raise InputError(
                f"Output folder '{path}' ({option}) already exists and is not empty. "
                "Choose a new folder, or pass --overwrite to replace the run in it."
            )
        if not (is_output_dir(path) or resume):
            raise InputError(
                f"Output folder '{path}' ({option}) is not empty and was not written by transferkit (it has no "
                f"{MARKER_FILE} file), so --overwrite will not replace anything in it. Choose a new or empty "
                "folder."
            )
    existing = path
    while not existing.is_dir() and existing.parent != existing:
        existing = existing.parent  # the folder will be created there: prove that is possible
    check_writable_dir(existing, option)
    return path


def prepare_output_dir(path: str | os.PathLike, overwrite: bool = False, option: str = "-o/--output-dir", *,
                       inputs: Iterable[str | os.PathLike | None] = (), command: str = "",
                       resume: bool = False) -> Path:
    """Check an output folder before a long job starts, then claim it: refuse to mix runs, to write
    into an input image folder, or to replace what transferkit did not write; fail early if
    unwritable; lock it for this process (:func:`lock_output_dir`) and mark it as ours.

    The claim lasts until :func:`release_output_dir` (or use :func:`claimed_output_dir`).

    Args:
        inputs: the image folders the job reads; the output may not be one of them or inside one.
        command: the command writing the folder, recorded in its marker file.
        resume: the folder is an interrupted run to continue (its ``config.yaml`` was checked by
            :func:`resumable_config`); runs from before the marker file are accepted.

    Raises:
        InputError: the folder is not empty (and ``overwrite`` is off), is not a transferkit folder
            (and ``overwrite`` is on), is a file, is inside an input, is read-only, or is in use.
    """
    path = check_output_dir(path, overwrite, option, inputs=inputs, resume=resume)
    check_writable_dir(path, option)
    lock_output_dir(path, option)
    if not (path / MARKER_FILE).is_file():
        mark_output_dir(path, command)
    return path


@contextlib.contextmanager
def claimed_output_dir(path: str | os.PathLike, overwrite: bool = False, option: str = "-o/--output-dir", *,
                       inputs: Iterable[str | os.PathLike | None] = (), command: str = "") -> Iterator[Path]:
    """:func:`prepare_output_dir` for the length of a ``with`` block: the lock is released when the
    work ends, however it ends (another process may then write the folder)."""
    path = prepare_output_dir(path, overwrite, option, inputs=inputs, command=command)
    try:
        yield path
    finally:
        release_output_dir(path)


def mark_output_dir(path: str | os.PathLike, command: str) -> None:
    """Write the :data:`MARKER_FILE` that makes a folder one transferkit may ``--overwrite``."""
    files.write_json(Path(path) / MARKER_FILE, {"tool": "transferkit", "command": command,
                                                "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


def is_output_dir(path: str | os.PathLike) -> bool:
    """Whether transferkit wrote this folder: it holds the :data:`MARKER_FILE`, or is recognisably
    the output of an earlier version (:data:`EARLIER_OUTPUTS`)."""
    path = Path(path)
    if (path / MARKER_FILE).is_file():
        return True
    return any(all((path / name).exists() for name in names) for names in EARLIER_OUTPUTS.values())


def check_outside_inputs(path: str | os.PathLike, option: str, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output (folder or file) that is an input image folder or inside one, symlinks
    resolved: the next scan would read it back as images (a run folder becomes extra classes).

    ``tfds:`` names and None are skipped.
    """
    target = Path(path).resolve()
    for image_dir in inputs:
        if image_dir is None or str(image_dir).startswith("tfds:"):
            continue
        root = Path(image_dir).resolve()
        if target == root or root in target.parents:
            raise InputError(
                f"{option} '{path}' is {'the' if target == root else 'inside the'} image folder '{image_dir}'. "
                "transferkit never writes into an image folder (the next scan would read what it wrote as "
                "images or classes); choose a path outside it."
            )


def check_cache_dir(cache_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """The feature cache folder: outside every input image folder, and writable."""
    check_outside_inputs(cache_dir, "--cache-dir", inputs)
    return check_writable_dir(cache_dir, "--cache-dir")


#: Locks this process holds, by the lock file's (st_dev, st_ino): a second claim from the same
#: process reuses its lock, and a folder deleted and made again (a new lock file) is locked anew.
#: The value is the open descriptor and the resolved folder it was taken for.
_LOCKS: dict[tuple[int, int], tuple[int, Path]] = {}
#: A lock file holding more than this is not one transferkit wrote (it holds a pid, nothing else).
_PID_BYTES = 20


def lock_output_dir(path: str | os.PathLike, option: str = "-o/--output-dir") -> None:
    """Hold an exclusive ``flock`` on the folder's :data:`LOCK_FILE` until :func:`release_output_dir`
    or the end of the process (the system drops it when the process dies, even by SIGKILL, so a
    killed run can be resumed at once).

    Raises:
        InputError: another process holds it, or the lock file is not a plain file of its own (a
            symlink, a hard link, a folder): transferkit writes the pid into it, so it may not be
            anybody else's file.
    """
    path = Path(path)
    if fcntl is None:
        return
    lock = path / LOCK_FILE
    # O_NOFOLLOW: never open what a symlink of that name points to; O_NONBLOCK: a FIFO cannot hang us.
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        try:
            fd, created = os.open(lock, flags | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            fd, created = os.open(lock, flags), False
    except OSError as exc:
        raise _foreign_lock(lock, option, "a symbolic link" if lock.is_symlink() else exc.strerror or str(exc)) \
            from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise _foreign_lock(lock, option, "not a regular file" if not stat.S_ISREG(info.st_mode)
                            else f"a file with {info.st_nlink} hard links")
    key = (info.st_dev, info.st_ino)
    if key in _LOCKS:  # this process holds it already (the descriptor keeps the inode from being reused)
        os.close(fd)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise InputError(
            f"Output folder '{path}' ({option}) is being written by another transferkit process"
            f"{f' (pid {holder})' if holder.isdigit() else ''}. Wait for it to finish (then --resume or "
            "--overwrite), or choose another folder."
        ) from None
    except OSError as exc:  # a file system without locks (some network mounts): go on unlocked
        os.close(fd)
        log.warning("Cannot lock output folder '%s' (%s); make sure no other process writes to it.", path,
                    exc.strerror or exc)
        return
    previous = os.pread(fd, _PID_BYTES + 1, 0)
    if created or (len(previous) <= _PID_BYTES and previous.strip().isdigit()):  # only ever our own pid
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)  # for the message above, nothing else
    _LOCKS[key] = (fd, path.resolve())


def _foreign_lock(lock: Path, option: str, why: str) -> InputError:
    return InputError(f"Cannot lock output folder '{lock.parent}' ({option}): its {LOCK_FILE} is not a lock file "
                      f"transferkit can use ({why}); transferkit writes into that file, so it must be a plain file "
                      "of its own. Remove it if it is yours to remove, or choose another folder.")


def release_output_dir(path: str | os.PathLike) -> None:
    """Release the lock :func:`lock_output_dir` took (no-op when this process holds none)."""
    path = Path(path)
    resolved = path.resolve()
    try:
        info = os.stat(path / LOCK_FILE, follow_symlinks=False)
        current = (info.st_dev, info.st_ino)
    except OSError:  # the folder or its lock file is gone: release what was taken for this path
        current = None
    for key, (fd, folder) in list(_LOCKS.items()):
        if key == current or folder == resolved:
            del _LOCKS[key]
            os.close(fd)


def clear_previous_run(run_dir: str | os.PathLike) -> None:
    """Before a new (not resumed) run in an ``--overwrite`` folder: remove the files of the previous
    run that this one would otherwise read as its own. Its checkpoints would be resumed by the
    fine-tune phase, and a ``head.skops`` would make a softmax run load as a scikit-learn one.
    Every other file is rewritten by the new run.

    Only files transferkit names are removed (never a whole folder), and only from a folder it
    marked: a file another tool (or the user) put in ``checkpoints/`` stays.
    """
    run_dir = Path(run_dir)
    if not is_output_dir(run_dir):
        raise InputError(f"'{run_dir}' is not a transferkit output folder (no {MARKER_FILE}); nothing was removed.")
    checkpoints = run_dir / CHECKPOINT_DIR
    # feature_map.json: a report redrawn without features (a resumed report) would show the old run's map.
    doomed = [run_dir / HEAD_FILE, run_dir / Path(HEAD_FILE).with_suffix(".json").name, run_dir / "feature_map.json"]
    doomed += [checkpoints / name for name in CHECKPOINT_FILES]
    doomed += [p for pattern in BACKUP_PATTERNS for p in (checkpoints / BACKUP_DIR).glob(pattern)]
    for path in doomed:
        if path.is_file() or path.is_symlink():  # a link is removed, never what it points to
            path.unlink(missing_ok=True)
    for folder in (checkpoints / BACKUP_DIR, checkpoints):
        try:
            folder.rmdir()  # only when empty: whatever else is there was not ours to remove
        except OSError:
            pass


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
