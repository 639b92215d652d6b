"""Evaluating a run on a folder of labelled images: its metrics, ``predictions.csv`` and the report data.

The metrics themselves are :func:`transferkit.evaluation.metrics.classification_metrics`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from transferkit.evaluation.metrics import classification_metrics


def write_predictions(path, rel_paths: Sequence[str], y_true: np.ndarray, probabilities: np.ndarray,
                      class_names: Sequence[str]) -> None:
    """Write ``predictions.csv``: one row per evaluated image with its true and predicted class.

    Columns: ``path, label, predicted, confidence, correct`` (confidence is the predicted class's
    probability or score); the report's gallery of worst mistakes reads it.
    """
    from transferkit import files

    predicted = np.asarray(probabilities).argmax(axis=1)
    confidence = np.asarray(probabilities)[np.arange(len(predicted)), predicted]
    files.write_csv(path, ["path", "label", "predicted", "confidence", "correct"], [
        [rel, class_names[t], class_names[p], f"{c:.6f}", int(t == p)]
        for rel, t, p, c in zip(rel_paths, np.asarray(y_true), predicted, confidence, strict=True)
    ])


def evaluate_run(run_dir, image_dir, output_dir=None, *, batch_size: int = 32, overwrite: bool = True,
                 verbose: int = 1, tta: bool = False, allow_outside: bool = False) -> dict:
    """Evaluate a trained run on every image of a labelled folder and write ``metrics.json``.

    The folder's class sub-folders must be among the run's classes (a folder may lack some).

    Args:
        run_dir: the folder of a ``transferkit train`` run.
        image_dir: a folder with one sub-folder per class (split folders are pooled), or a
            ``.csv``/``.jsonl`` manifest (:mod:`transferkit.data.manifest`; its splits are pooled too).
        output_dir: where to write; default ``RUN_DIR/evaluations/<folder name>`` (a manifest's
            file name without its ending).
        tta: evaluate with 10-crop test-time augmentation (:mod:`transferkit.evaluation.tta`); the metrics are
            then those of the averaged predictions, and ``metrics["tta"]`` holds the accuracy and
            macro-F1 with and without it.
        allow_outside: a manifest's paths may leave its folder.

    Returns:
        The metrics written.
    """
    import dataclasses
    from pathlib import Path

    from transferkit import files
    from transferkit.data.scan import scan_folder
    from transferkit.errors import DataError
    from transferkit.evaluation.tta import TTA_DESCRIPTION
    from transferkit.report.data import collect_versions
    from transferkit.report.writer import gradcam_explainer, write_report
    from transferkit.serving import outputs, runs
    from transferkit.serving.predictors import predict_paths, run_predictor
    from transferkit.serving.schema import METRICS_VERSION, EvaluationMetrics

    # Resolved once, here: metrics.json, predictions.csv and the report then name the same files
    # whatever folder a later 'transferkit report' runs in (a relative image folder was joined to
    # itself by the report, so its thumbnails and Grad-CAM found no image).
    # The folder is resolved after the scan: IMAGE_DIR may be a tfds:NAME, which names no path.
    run = runs.load_run(Path(run_dir).resolve())
    folder = scan_folder(image_dir, class_names=run.class_names, allow_outside=allow_outside)
    folder = dataclasses.replace(folder, root=folder.root.resolve())
    name = folder.manifest.stem if folder.manifest else folder.root.name  # two manifests in a folder: two names
    output_dir = Path(output_dir) if output_dir else run.run_dir / "evaluations" / name
    # Claimed (locked, marked) while it is written, released however this ends.
    with outputs.claimed_output_dir(output_dir, overwrite=overwrite, inputs=(image_dir, *folder.scanned_dirs),
                                 command="evaluate") as output_dir:
        started = time.perf_counter()
        result = predict_paths(run_predictor(run, batch_size), [folder.abs_path(p) for p in folder.paths],
                               batch_size=batch_size, tta=tta, verbose=verbose)
        seconds = time.perf_counter() - started
        ok = result.ok
        skipped = list(folder.skipped) + [(folder.paths[i], reason) for i, reason in sorted(result.errors.items())]
        if not ok.any():
            raise DataError(f"None of the {len(ok)} images in '{folder.root}' could be decoded; nothing to evaluate. "
                            f"First failure: {skipped[0][0]}: {skipped[0][1]}.")
        metrics: EvaluationMetrics = {
            "version": METRICS_VERSION,
            **classification_metrics(folder.labels[ok], result.probabilities[ok], run.class_names),
        }
        metrics.update(
            run_dir=str(run.run_dir),
            image_dir=str(folder.root),
            skipped=[{"path": p, "reason": r} for p, r in skipped],
            images_per_second=round(int(ok.sum()) / seconds, 2) if seconds > 0 else 0.0,
            versions=collect_versions(),
        )
        if tta:
            plain = classification_metrics(folder.labels[ok], result.plain[ok], run.class_names)
            metrics["tta"] = {
                "method": TTA_DESCRIPTION,
                "accuracy_without": plain["accuracy"],
                "accuracy_with": metrics["accuracy"],
                "accuracy_gain": metrics["accuracy"] - plain["accuracy"],
                "macro_f1_without": plain["macro_f1"],
                "macro_f1_with": metrics["macro_f1"],
            }
        files.write_json(output_dir / runs.METRICS_FILE, metrics)
        used = [str(folder.abs_path(p)) for p, k in zip(folder.paths, ok, strict=True) if k]
        write_predictions(output_dir / runs.PREDICTIONS_FILE, used, folder.labels[ok], result.probabilities[ok],
                          run.class_names)
        files.write_csv(output_dir / runs.SKIPPED_FILE, ["path", "reason"], skipped)
        # Reads the files just written; the loaded model adds Grad-CAM of the worst mistakes.
        write_report(output_dir, explainer=gradcam_explainer(run))
        metrics["output_dir"] = str(output_dir)
        return metrics
