"""Export a run's model for serving: ``.keras``, TensorFlow SavedModel or TFLite, with a parity check.

Every artifact takes raw RGB pixels at the model's input size and does its own preprocessing,
so serving code only decodes and resizes (squash to ``size x size``, bilinear, no crop, as in
training):

==============  =============================================  ===================================
format          input                                          output
==============  =============================================  ===================================
keras           float32 ``(n, size, size, 3)`` in 0-255         probabilities ``(n, classes)``
                (uint8 arrays are accepted and converted)
saved-model     signature ``serving_default``: uint8 ``image``  ``probabilities`` float32
                ``(n, size, size, 3)``; ``serving_float``: the
                same as float32 in 0-255
tflite          uint8 ``image`` ``(1, size, size, 3)`` (batch   ``probabilities`` float32
                resizable), for every ``--quantize``
==============  =============================================  ===================================

uint8 is the default because that is what an image decoder hands a server or a phone: no
scaling convention to get wrong, a quarter of the bytes of float32, and the natural input of a
full-integer (int8) TFLite model. The cast to float happens inside the artifact.

The export folder holds the artifact, ``labels.txt`` (class names in output order) and
``model_card.json`` (classes, input format, preprocessing, backbone, strategy, the run's test
metrics, versions, date and the parity check). It is written to a temporary folder and renamed
into place, so a failed export leaves nothing half-written.

Parity: the artifact, loaded back from disk, and the in-memory Keras model classify the same
held-out images (the run's test split); float exports must agree on every top-1 class and
within 1e-4 in every probability, or the export fails. Quantised exports report the
agreement and the accuracy drop.

Example:
    >>> card = export_run("runs/first", "exports/mobile", "tflite", quantize="int8")  # doctest: +SKIP
    >>> card["parity"]["top1_agreement"]  # doctest: +SKIP
    0.984
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from transferkit import __version__, files
from transferkit.errors import ArgumentError, ExportError, InputError
from transferkit.runtime import native_stderr_quiet
from transferkit.serving import outputs, runs
from transferkit.serving.predictors import (
    ARTIFACT_NAMES,
    CARD_FILE,
    FLOAT_SIGNATURE,
    INPUT_NAME,
    OUTPUT_NAME,
    UINT8_SIGNATURE,
    KerasPredictor,
    load_predictor,
    tflite_interpreter,
)

log = logging.getLogger("transferkit")

FORMATS = ("keras", "saved-model", "tflite")
QUANTIZATIONS = ("none", "fp16", "int8")
#: Largest probability difference a float export may show against the Keras model.
FLOAT_TOLERANCE = 1e-4
#: Operations whose weights must be int8 in a full-integer TFLite model.
KERNEL_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


def export_run(run_dir: str | os.PathLike, output_dir: str | os.PathLike, fmt: str = "keras",
               quantize: str = "none", *, image_dir: str | os.PathLike | None = None, overwrite: bool = False,
               num_parity_images: int = 64, num_representative: int = 200) -> dict:
    """Export the model of a run folder and check that the artifact predicts like it.

    Args:
        run_dir: a ``transferkit train`` run folder.
        output_dir: the export folder to create (refused when non-empty unless ``overwrite``).
        fmt: ``"keras"``, ``"saved-model"`` or ``"tflite"``.
        quantize: ``"none"``, ``"fp16"`` or ``"int8"`` (TFLite only).
        image_dir: images for the parity check (and int8 calibration) when the run's own image
            folder is not on this machine.
        num_parity_images: held-out images compared (spread evenly over the test split).
        num_representative: training images that calibrate int8 quantisation.

    Returns:
        The model card written to ``model_card.json``.

    Raises:
        ArgumentError: an unknown format or quantisation (an InputError).
        InputError: a bad output folder or run folder, or int8 for a format other than tflite.
        ExportError: a float export disagrees with the Keras model, or int8 kernels are missing.
    """
    if fmt not in FORMATS:
        raise ArgumentError("fmt", f"one of {', '.join(FORMATS)}", fmt)
    if quantize not in QUANTIZATIONS:
        raise ArgumentError("quantize", f"one of {', '.join(QUANTIZATIONS)}", quantize)
    if quantize != "none" and fmt != "tflite":
        raise InputError(f"--quantize {quantize} applies to --format tflite only; {fmt} exports are float32. "
                         "Drop --quantize or export to tflite.")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"Export folder '{output_dir}' (-o) is a file. Choose a folder path.")
    outputs.check_outside_inputs(output_dir, "-o/--output-dir", [image_dir])
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise InputError(f"Export folder '{output_dir}' (-o) already exists and is not empty. Choose a new "
                             "folder, or pass --overwrite to replace it.")
        _check_replaceable(output_dir)
    outputs.check_writable_dir(output_dir.parent if output_dir.parent != Path("") else Path("."), "-o")
    run = runs.load_run(run_dir)
    run.require_keras_head("export")
    held_out = sample_images(run, ("test", "val"), num_parity_images, image_dir)
    representative = None
    if quantize == "int8":
        representative = sample_images(run, ("train",), num_representative, image_dir, allow_random=False)

    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-"))
    try:
        artifact = tmp / ARTIFACT_NAMES[fmt]
        if fmt == "keras":
            runs.save_model(run.model, artifact)
        elif fmt == "saved-model":
            write_saved_model(run.model, artifact)
        else:
            with tempfile.TemporaryDirectory(dir=tmp) as saved:
                write_saved_model(run.model, Path(saved) / "saved_model")
                content = convert_tflite(Path(saved) / "saved_model", quantize,
                                         representative.images if representative else None)
            files.write_bytes(artifact, content)
        runs.write_labels(tmp / runs.LABELS_FILE, run.class_names)
        parity = check_parity(run, load_predictor(tmp / ARTIFACT_NAMES[fmt], batch_size=16), held_out, quantize)
        card = model_card(run, fmt, quantize, parity, representative)
        if fmt == "tflite" and quantize == "int8":
            card["int8_kernels"] = check_int8_kernels(artifact)
        files.write_json(tmp / CARD_FILE, card)
        outputs.mark_output_dir(tmp, "export")
        _publish(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    card["output_dir"] = str(output_dir)
    return card


def _check_replaceable(output_dir: Path) -> None:
    """``--overwrite`` replaces a whole export folder, so it must be one transferkit wrote and hold
    nothing else: refuse before any work otherwise (nothing is deleted that transferkit did not write)."""
    if not outputs.is_output_dir(output_dir):
        raise InputError(f"Export folder '{output_dir}' (-o) is not empty and was not written by transferkit (it has "
                         f"no {runs.MARKER_FILE} file), so --overwrite will not replace it. Choose a new or empty "
                         "folder.")
    ours = {*ARTIFACT_NAMES.values(), runs.LABELS_FILE, CARD_FILE, runs.MARKER_FILE}
    foreign = sorted(entry.name for entry in output_dir.iterdir() if entry.name not in ours)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise InputError(f"Export folder '{output_dir}' (-o) holds files transferkit did not write ({shown}); "
                         "--overwrite replaces the whole folder, so move them out first or choose a new folder.")


def _publish(tmp: Path, output_dir: Path) -> None:
    """Rename the finished folder into place; an old folder is moved aside first, then removed."""
    old = None
    if output_dir.exists():
        old = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.old-"))
        os.replace(output_dir, old / "previous")
    os.chmod(tmp, 0o777 & ~_umask())
    os.replace(tmp, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------ writers


def write_saved_model(model, path: Path) -> None:
    """A SavedModel with a uint8 ``serving_default`` and a float32 ``serving_float`` signature."""
    import keras
    import tensorflow as tf

    size = int(model.input_shape[1])
    archive = keras.export.ExportArchive()
    archive.track(model)

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT_NAME)])
    def serve_uint8(image):
        return {OUTPUT_NAME: model(tf.cast(image, tf.float32), training=False)}

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name=INPUT_NAME)])
    def serve_float(image):
        return {OUTPUT_NAME: model(image, training=False)}

    archive.add_endpoint(UINT8_SIGNATURE, serve_uint8)
    archive.add_endpoint(FLOAT_SIGNATURE, serve_float)
    archive.write_out(str(path), verbose=False)


def convert_tflite(saved_model: Path, quantize: str, representative: np.ndarray | None = None) -> bytes:
    """Convert the uint8 signature of a SavedModel to TFLite (built-in ops only, so no Flex delegate).

    Keras 3 models convert through a SavedModel (``from_keras_model`` needs Keras 2); this is
    also the path ``keras.Model.export(format="litert")`` takes. ``fp16`` stores weights as
    float16; ``int8`` is full-integer quantisation calibrated on ``representative`` images
    (uint8 pixels in, float32 probabilities out).
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=[UINT8_SIGNATURE])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]

        def dataset():
            for image in representative:
                yield {INPUT_NAME: image[None].astype(np.uint8)}

        converter.representative_dataset = dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
    try:
        # Calibration uses tf.lite.Interpreter (deprecated, still working) and prints C++ INFO lines.
        with warnings.catch_warnings(), native_stderr_quiet():
            warnings.simplefilter("ignore", UserWarning)
            return converter.convert()
    except Exception as exc:  # noqa: BLE001 - the converter raises many types; all mean "cannot convert"
        raise ExportError(f"TFLite conversion ({quantize}) failed: {type(exc).__name__}: {str(exc)[:400]}. "
                          "Try --quantize none, or --format saved-model.") from exc


def check_int8_kernels(path: Path) -> dict:
    """Check that every convolution and dense op of a TFLite model has int8 weights.

    Returns:
        ``{"ops": count of kernel ops, "int8": how many have int8 weights}``.

    Raises:
        ExportError: some kernel is not int8 (the model would run in float on the device).
    """
    interpreter = tflite_interpreter(model_path=str(path))
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    kernels = [op for op in interpreter._get_ops_details() if op["op_name"] in KERNEL_OPS]
    # A kernel op's second input is its weight tensor.
    int8 = [op for op in kernels if len(op["inputs"]) > 1 and tensors[op["inputs"][1]]["dtype"] == np.int8]
    if not kernels or len(int8) != len(kernels):
        raise ExportError(f"The int8 TFLite model '{path}' has {len(int8)} int8 kernels out of {len(kernels)} "
                          "convolution/dense ops: quantisation did not cover the model.")
    return {"ops": len(kernels), "int8": len(int8)}


# ------------------------------------------------------------------------------------------ images


class ImageSample:
    """Decoded images with, where known, their labels and where they came from."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, source: str, paths: list[str]):
        self.images, self.labels, self.source, self.paths = images, labels, source, paths


def _spread(items: list, count: int) -> list:
    """``count`` items spread evenly over a list (all of them when it is short), order kept."""
    if len(items) <= count:
        return items
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, count).round().astype(int))]


def sample_images(run, splits: tuple[str, ...], count: int, image_dir=None, *,
                  allow_random: bool = True) -> ImageSample:
    """Images of a run's splits (first split with images wins), else of ``image_dir``, else random pixels.

    Raises:
        InputError: no image found and ``allow_random`` is off.
    """
    from transferkit.data.scan import find_images, load_image, read_splits_csv

    size = run.image_size
    candidates: list[tuple[Path, int | None]] = []
    source = ""
    root = run.image_root
    splits_csv = run.run_dir / runs.SPLITS_FILE
    if image_dir is None and root and Path(root).is_dir() and splits_csv.is_file():
        folder = read_splits_csv(splits_csv, root=root, class_names=run.class_names)
        for split in splits:
            rows = [(folder.abs_path(p), int(label)) for p, label, s in
                    zip(folder.paths, folder.labels, folder.splits, strict=True) if s == split]
            if rows:
                candidates, source = rows, f"{split} split of {root}"
                break
    if not candidates and image_dir is not None:
        candidates = [(p, None) for p in find_images(image_dir)]
        source = f"images in {image_dir}"
    images, labels, paths = [], [], []
    for path, label in _spread(candidates, count):
        try:
            images.append(load_image(path, size))
        except ValueError:
            continue
        labels.append(label)
        paths.append(str(path))
    if images:
        known = all(label is not None for label in labels)
        return ImageSample(np.stack(images), np.array(labels) if known else None, source, paths)
    if not allow_random:
        raise InputError(f"int8 quantisation needs calibration images, and none were found: the run's image "
                         f"folder '{root}' is not on this machine. Pass --image-dir with a few hundred of the "
                         "training photos.")
    log.warning("The run's images are not on this machine (%s): the parity check uses random pixels. "
                "Pass --image-dir to check on real photos.", root)
    rng = np.random.default_rng(0)
    return ImageSample(rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8), None, "random pixels", [])


# ------------------------------------------------------------------------------------------ parity


def check_parity(run, predictor, sample: ImageSample, quantize: str) -> dict:
    """Compare the artifact with the in-memory Keras model on the same images.

    Raises:
        ExportError: a float export (``quantize == "none"``) disagrees on a top-1 class or by more
            than :data:`FLOAT_TOLERANCE` in a probability.
    """
    reference = KerasPredictor(run.model, run.class_names, batch_size=16).predict(sample.images)
    exported = predictor.predict(sample.images)
    agree = reference.argmax(axis=1) == exported.argmax(axis=1)
    result = {
        "images": int(len(sample.images)),
        "source": sample.source,
        "top1_agreement": round(float(agree.mean()), 6),
        "max_abs_diff": float(np.abs(reference - exported).max()),
        "tolerance": FLOAT_TOLERANCE if quantize == "none" else None,
    }
    if sample.labels is not None:
        keras_accuracy = float((reference.argmax(axis=1) == sample.labels).mean())
        export_accuracy = float((exported.argmax(axis=1) == sample.labels).mean())
        result.update(keras_accuracy=round(keras_accuracy, 6), export_accuracy=round(export_accuracy, 6),
                      accuracy_drop=round(keras_accuracy - export_accuracy, 6))
    if quantize == "none" and (not agree.all() or result["max_abs_diff"] > FLOAT_TOLERANCE):
        raise ExportError(
            f"The exported model does not predict like the trained one on {result['images']} images "
            f"({sample.source}): top-1 agreement {result['top1_agreement']:.1%}, largest probability difference "
            f"{result['max_abs_diff']:.2e} (allowed: 100% and {FLOAT_TOLERANCE:g}). Nothing was written; "
            "please report this with the run's config.yaml."
        )
    return result


def model_card(run, fmt: str, quantize: str, parity: dict, representative: ImageSample | None) -> dict:
    """What a user of the artifact needs to know, as a JSON-ready dictionary."""
    import json

    import keras
    import tensorflow as tf

    from transferkit.models.registry import get_backbone

    size = run.image_size
    backbone = run.config.get("backbone")
    try:
        spec = get_backbone(backbone) if backbone else None
    except InputError:
        spec = None
    metrics_path = run.run_dir / runs.METRICS_FILE
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    test = metrics.get("test", {})
    dtype = "float32" if fmt == "keras" else "uint8"
    card = {
        "format": fmt,
        "quantize": quantize,
        "artifact": ARTIFACT_NAMES[fmt],
        "class_names": list(run.class_names),
        "input": {
            "name": INPUT_NAME,
            "shape": [None if fmt != "tflite" else 1, size, size, 3],
            "dtype": dtype,
            "range": "0-255",
            "color": "RGB",
            "resize": f"squash to {size}x{size} (bilinear, aspect ratio not kept, no crop), as in training",
            "signatures": ({UINT8_SIGNATURE: "uint8", FLOAT_SIGNATURE: "float32 0-255"}
                           if fmt == "saved-model" else None),
        },
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "meaning": "class probabilities (softmax), "
                   "columns in class_names order"},
        "preprocessing": {"mode": spec.preprocessing if spec else None, "inside_model": True},
        "backbone": backbone,
        "family": spec.family if spec else None,
        "strategy": run.config.get("strategy"),
        "source_run": str(run.run_dir.resolve()),
        "metrics": {key: test[key] for key in ("split", "accuracy", "macro_f1", "balanced_accuracy",
                                                "top_k_accuracy", "num_examples") if key in test},
        "parity": parity,
        "versions": {"transferkit": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if representative is not None:
        card["calibration"] = {"images": int(len(representative.images)), "source": representative.source}
    return card
