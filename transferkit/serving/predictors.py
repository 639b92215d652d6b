"""One interface over everything that classifies images: a run folder, a ``.keras`` file, a
SavedModel, a ``.tflite`` file, or a ``transferkit export`` folder.

A :class:`Predictor` has ``class_names`` (output order), ``image_size`` (square input side) and
``predict(images)``: raw RGB pixels ``(n, size, size, 3)``, ``uint8`` or float in 0-255, to
``(n, num_classes)`` probabilities. :func:`predict_paths` runs one over image files, decoding
them exactly as training did, optionally with 10-crop test-time augmentation.

Example:
    >>> predictor = load_predictor("exports/mobile")        # doctest: +SKIP
    >>> result = predict_paths(predictor, ["photo.jpg"])    # doctest: +SKIP
    >>> predictor.class_names[result.probabilities[0].argmax()]  # doctest: +SKIP
    'bees'

Keras files load with Keras' safe mode on, so a model file cannot run code through a Lambda
layer; SavedModels and TFLite files hold TensorFlow ops only, but load only those you trust.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit import files
from transferkit.errors import InputError
from transferkit.progress import progress_bar
from transferkit.runtime import native_stderr_quiet
from transferkit.serving import runs

CARD_FILE = "model_card.json"
LABELS_FILE = "labels.txt"
#: The artifact inside an export folder, per format.
ARTIFACT_NAMES = {"keras": "model.keras", "saved-model": "saved_model", "tflite": "model.tflite"}
#: SavedModel signatures: raw uint8 pixels (the default) and float32 pixels in 0-255.
UINT8_SIGNATURE = "serving_default"
FLOAT_SIGNATURE = "serving_float"
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"


class Predictor:
    """Raw RGB pixels in, class probabilities out.

    Attributes:
        class_names: class names in output order.
        image_size: the square input side the model expects (serving code resizes to it).
        kind: ``"keras"``, ``"saved-model"`` or ``"tflite"``.
        source: the file or folder it was loaded from.
        batch_size: images per call to the underlying model.
    """

    kind = ""

    def __init__(self, class_names, image_size: int, source: str | os.PathLike = "", batch_size: int = 32):
        self.class_names = list(class_names)
        self.image_size = int(image_size)
        self.source = str(source)
        self.batch_size = int(batch_size)

    def predict(self, images) -> np.ndarray:
        """Probabilities ``(n, num_classes)`` for pixels ``(n, image_size, image_size, 3)`` in 0-255."""
        images = np.asarray(images)
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise InputError(f"Images for {self.source or 'the model'} must have shape (n, {self.image_size}, "
                             f"{self.image_size}, 3); got {images.shape}. Resize them to {self.image_size} px.")
        if not len(images):
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        parts = [self._predict(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _predict(self, images: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class KerasPredictor(Predictor):
    """A Keras model in memory (a run's ``model.keras`` or an exported one)."""

    kind = "keras"

    def __init__(self, model, class_names, source="", batch_size: int = 32):
        import tensorflow as tf

        super().__init__(class_names, model.input_shape[1], source, batch_size)
        self.model = model
        size = self.image_size
        # One trace for every batch size (a shape-polymorphic signature), so calls never retrace.
        self._call = tf.function(lambda images: model(images, training=False),
                                 input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])

    def _predict(self, images):
        return self._call(images.astype(np.float32, copy=False)).numpy()


class HeadPredictor(KerasPredictor):
    """A run trained with a non-linear scikit-learn head: the backbone's features, then the head's
    probabilities (calibrated) or decision scores."""

    def __init__(self, backbone, head, class_names, source="", batch_size: int = 32):
        super().__init__(backbone, class_names, source, batch_size)
        self.head = head

    def _predict(self, images):
        scores, _ = self.head.scores(super()._predict(images))
        return scores


class SavedModelPredictor(Predictor):
    """A SavedModel written by ``transferkit export --format saved-model``."""

    kind = "saved-model"

    def __init__(self, path, class_names, batch_size: int = 32):
        import tensorflow as tf

        try:
            self.loaded = tf.saved_model.load(str(path))
            self._uint8 = self.loaded.signatures[UINT8_SIGNATURE]
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"Cannot load SavedModel '{path}': {str(exc)[:200]}. Export it again with "
                             "'transferkit export --format saved-model'.") from exc
        self._float = self.loaded.signatures.get(FLOAT_SIGNATURE)
        spec = self._uint8.structured_input_signature[1][INPUT_NAME]
        super().__init__(class_names, spec.shape[1], path, batch_size)

    def _predict(self, images):
        import tensorflow as tf

        if images.dtype != np.uint8 and self._float is not None:
            return self._float(**{INPUT_NAME: tf.constant(images, tf.float32)})[OUTPUT_NAME].numpy()
        return self._uint8(**{INPUT_NAME: tf.constant(_to_uint8(images))})[OUTPUT_NAME].numpy()


class TFLitePredictor(Predictor):
    """A ``.tflite`` file written by ``transferkit export --format tflite`` (uint8 pixels in)."""

    kind = "tflite"

    def __init__(self, path, class_names, batch_size: int = 32):
        try:
            self.interpreter = tflite_interpreter(model_path=str(path))
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"Cannot load TFLite model '{path}': {str(exc)[:200]}. Export it again with "
                             "'transferkit export --format tflite'.") from exc
        self._runner = self.interpreter.get_signature_runner()
        detail = self.interpreter.get_input_details()[0]
        self._input_dtype = detail["dtype"]
        super().__init__(class_names, detail["shape"][1], path, batch_size)

    def _predict(self, images):
        pixels = _to_uint8(images) if self._input_dtype == np.uint8 else images.astype(self._input_dtype)
        return self._runner(**{INPUT_NAME: pixels})[OUTPUT_NAME]


def tflite_interpreter(**kwargs):
    """LiteRT's interpreter when ``ai-edge-litert`` is installed, else TensorFlow's own (deprecated)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
    with warnings.catch_warnings(), native_stderr_quiet():  # "deprecated"; "Created XNNPACK delegate"
        warnings.simplefilter("ignore", UserWarning)
        interpreter = Interpreter(**kwargs)
        interpreter.allocate_tensors()  # the XNNPACK line is printed here
    return interpreter


def _to_uint8(images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return images
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ loading


def is_artifact(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an exported model rather than a run folder."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in (".keras", ".tflite")
    return (path / CARD_FILE).is_file() or (path / "saved_model.pb").is_file()


def read_labels(path: Path, artifact: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"No {LABELS_FILE} beside '{artifact}' (looked for '{path}'): the class names are "
                         f"unknown. Put the {LABELS_FILE} of the export (one class a line, in output order) there.")
    return runs.read_labels(path)  # one reader of labels.txt: run folders and exports split names alike


def run_predictor(run, batch_size: int = 32) -> Predictor:
    """A loaded run (:func:`transferkit.serving.runs.load_run`) as a :class:`Predictor` (pixels in, class
    scores out)."""
    if run.head is not None:
        return HeadPredictor(run.model, run.head, run.class_names, run.run_dir, batch_size)
    return KerasPredictor(run.model, run.class_names, run.run_dir, batch_size)


def write_prediction_rows(path: str | os.PathLike, rows: list[dict], top_k: int) -> None:
    """``predict -o``: :func:`predict_files`' rows as JSON (``.json``) or CSV, atomically.

    CSV columns: ``path, ok, error, class_1, prob_1, ... class_k, prob_k``; a failed image gets
    empty class and probability cells, so every row has every column.
    """
    if str(path).lower().endswith(".json"):
        files.write_json(path, rows)
        return
    columns = ["path", "ok", "error"] + [c for i in range(1, top_k + 1) for c in (f"class_{i}", f"prob_{i}")]
    files.write_csv(path, columns, [[r["path"], r["ok"], r["error"]] + [v for pair in r["predictions"] for v in pair]
                                    + ["", ""] * (top_k - len(r["predictions"])) for r in rows])


def predict_files(run, paths: Sequence[str | os.PathLike], *, top_k: int = 1, batch_size: int = 32,
                  verbose: int = 0, tta: bool = False) -> list[dict]:
    """Classify image files and folders (searched recursively) with a loaded run or a predictor.

    Args:
        run: a :class:`transferkit.serving.runs.Run`, or a :class:`Predictor` (any exported model).
        tta: average the 10-crop test-time augmentation (:mod:`transferkit.evaluation.tta`).

    Returns:
        One row per image, in the order given (folders sorted): ``{"path", "ok", "error",
        "predictions": [(class name, probability), ...]}`` with the ``top_k`` best first.
    """
    from transferkit.data.scan import find_images

    found: list[Path] = []
    for item in paths:
        item = Path(item)
        if item.is_dir():
            found.extend(find_images(item))
        elif item.is_file():
            found.append(item)
        else:
            raise InputError(f"'{item}' is neither an image file nor a folder. Check the path.")
    if not found:
        raise InputError(f"No image files found in {', '.join(map(str, paths))}.")
    predictor = run_predictor(run, batch_size) if isinstance(run, runs.Run) else run
    result = predict_paths(predictor, found, batch_size=batch_size, tta=tta, verbose=verbose)
    k = max(1, min(top_k, len(run.class_names)))
    rows = []
    for i, path in enumerate(found):
        probs = result.probabilities[i]
        best = np.argsort(-probs)[:k] if result.ok[i] else []
        rows.append({
            "path": str(path),
            "ok": bool(result.ok[i]),
            "error": result.errors.get(i, ""),
            "predictions": [(run.class_names[c], float(probs[c])) for c in best],
        })
    return rows


def load_predictor(path: str | os.PathLike, batch_size: int = 32) -> Predictor:
    """Load a run folder, an export folder, a ``.keras``/``.tflite`` file or a SavedModel folder.

    Class names come from ``labels.txt`` in the same folder (or, for a SavedModel folder, its
    parent, the export folder).

    Raises:
        InputError: not a model this knows, no labels, or the file does not load.
    """
    path = Path(path)
    if path.is_dir() and (path / CARD_FILE).is_file():
        try:
            card = json.loads((path / CARD_FILE).read_text(encoding="utf-8"))
            artifact = path / card["artifact"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"Export card '{path / CARD_FILE}' is damaged ({exc}). Export the run again.") from exc
        return _load_artifact(artifact, read_labels(path / LABELS_FILE, artifact), batch_size)
    if path.is_dir() and (path / "saved_model.pb").is_file():
        labels = path / LABELS_FILE if (path / LABELS_FILE).is_file() else path.parent / LABELS_FILE
        return _load_artifact(path, read_labels(labels, path), batch_size)
    if path.is_file() and path.suffix.lower() in (".keras", ".tflite"):
        return _load_artifact(path, read_labels(path.parent / LABELS_FILE, path), batch_size)
    if path.is_dir():
        return run_predictor(runs.load_run(path), batch_size)  # raises the "not a run folder" message
    raise InputError(f"'{path}' is not a model: give a run folder, an export folder (with {CARD_FILE}), a .keras "
                     "or .tflite file, or a SavedModel folder.")


def _load_artifact(path: Path, class_names: list[str], batch_size: int) -> Predictor:
    if not path.exists():
        raise InputError(f"Model file '{path}' is missing. Export the run again.")
    if path.is_dir():
        predictor = SavedModelPredictor(path, class_names, batch_size)
    elif path.suffix.lower() == ".tflite":
        predictor = TFLitePredictor(path, class_names, batch_size)
    else:
        predictor = KerasPredictor(load_keras_model(path), class_names, path, batch_size)
    num_outputs = predictor.predict(np.zeros((1, predictor.image_size, predictor.image_size, 3), np.uint8)).shape[1]
    if num_outputs != len(class_names):
        raise InputError(f"'{path}' has {num_outputs} outputs but its {LABELS_FILE} lists {len(class_names)} "
                         "classes. Use the labels.txt written with this model.")
    return predictor


def load_keras_model(path: str | os.PathLike):
    """Load a ``.keras`` file with safe mode on (no code from the file runs; keep it on)."""
    import keras

    import transferkit.models.layers  # noqa: F401 - registers the Preprocess layer for deserialisation

    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - zip, HDF5 and Keras errors all mean "unusable file"
        raise InputError(f"Cannot load model '{path}': {type(exc).__name__}: {str(exc)[:200]}. "
                         "The file is damaged or not a transferkit model.") from exc


# ------------------------------------------------------------------------------------------ files


@dataclass
class Predictions:
    """Probabilities for a list of image files, in their order.

    Attributes:
        probabilities: ``(n, num_classes)``; rows of images that failed to decode are zeros.
        ok: ``(n,)`` False where the image could not be decoded.
        errors: ``{index: reason}`` for those images.
        plain: with TTA, the probabilities of the plain (single view) pass; else None.
    """

    probabilities: np.ndarray
    ok: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    plain: np.ndarray | None = None


def predict_paths(predictor: Predictor, paths, *, batch_size: int = 32, tta: bool = False,
                  verbose: int = 0) -> Predictions:
    """Classify image files, decoded and resized as in training (``transferkit.data.scan.image_dataset``).

    Args:
        predictor: from :func:`load_predictor`.
        paths: image files.
        tta: also run the 10-crop test-time augmentation (:mod:`transferkit.evaluation.tta`);
            ``probabilities`` are then the averaged ones and ``plain`` the single-view ones.
        verbose: 1 shows a Keras progress bar.
    """

    from transferkit.cache.compute import decode_error
    from transferkit.data.scan import image_dataset
    from transferkit.evaluation import tta as tta_module

    paths = [Path(p) for p in paths]
    n, num_classes = len(paths), len(predictor.class_names)
    probabilities = np.zeros((n, num_classes), dtype=np.float32)
    plain = np.zeros((n, num_classes), dtype=np.float32) if tta else None
    ok = np.ones(n, dtype=bool)
    errors: dict[int, str] = {}
    progress = progress_bar(n, "image", verbose)
    start = 0
    for images, flags in image_dataset(paths, predictor.image_size, batch_size):
        flags = flags.numpy()
        index = np.arange(start, start + len(flags))
        good = index[flags]
        for i in index[~flags]:
            ok[i] = False
            errors[int(i)] = decode_error(paths[i], predictor.image_size)
        if len(good):
            batch = images.numpy()[flags]
            single = predictor.predict(batch)
            if tta:
                plain[good] = single
                probabilities[good] = tta_module.average_views(predictor.predict(tta_module.ten_crop(batch).numpy()))
            else:
                probabilities[good] = single
        start += len(flags)
        progress.update(start)
    return Predictions(probabilities, ok, errors, plain)
