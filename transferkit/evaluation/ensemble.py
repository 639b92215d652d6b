"""Ensembles: average the class probabilities of several trained runs.

Averaging the softmax outputs of independently trained models is the simplest reliable gain of
the ImageNet playbook (AlexNet, VGG and ResNet all report it). The runs must predict the same
classes; their backbones, input sizes and strategies may differ (each member decodes the images
at its own input size).

Example:
    >>> metrics = ensemble_runs(["runs/a", "runs/b"], "runs/ab")  # doctest: +SKIP
    >>> metrics["accuracy"], [m["accuracy"] for m in metrics["members"]]  # doctest: +SKIP
    (0.96, [0.94, 0.93])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transferkit import files
from transferkit.errors import DataError, InputError
from transferkit.serving import outputs, runs


def evaluation_images(loaded: Sequence, image_dir=None) -> tuple[list[Path], np.ndarray, str, list]:
    """The labelled images an ensemble is scored on: ``image_dir``, else the runs' common test split.

    Returns:
        ``(paths, labels in the first run's class order, description, skipped files)``.

    Raises:
        InputError: no ``image_dir`` and the runs do not share an image folder and test split.
    """
    from transferkit.data.scan import read_splits_csv, scan_folder

    class_names = loaded[0].class_names
    if image_dir is not None:
        folder = scan_folder(image_dir, class_names=class_names)
        return [folder.abs_path(p) for p in folder.paths], np.asarray(folder.labels), str(folder.root), \
            list(folder.skipped)
    roots = {str(Path(run.image_root).resolve()) if run.image_root else None for run in loaded}
    root = next(iter(roots))
    problem = None
    if len(roots) != 1 or root is None:
        problem = "they were trained on different image folders"
    elif not Path(root).is_dir():
        problem = f"their image folder '{root}' is not on this machine"
    else:
        tests = []
        for run in loaded:
            splits = run.run_dir / runs.SPLITS_FILE
            if not splits.is_file():
                problem = f"'{run.run_dir}' has no {runs.SPLITS_FILE}"
                break
            folder = read_splits_csv(splits, root=root, class_names=run.class_names)
            tests.append({p: folder.class_names[label] for p, label, s in
                          zip(folder.paths, folder.labels, folder.splits, strict=True) if s == "test"})
        if problem is None and any(t != tests[0] for t in tests[1:]):
            problem = "their test splits differ (different --seed, fractions or images)"
        elif problem is None and not tests[0]:
            problem = "they have no test split"
    if problem:
        raise InputError(f"Cannot score the ensemble on the runs' own test split: {problem}. Pass --image-dir "
                         "with a labelled folder (one sub-folder per class) to evaluate on.")
    paths = sorted(tests[0])
    labels = np.array([class_names.index(tests[0][p]) for p in paths])
    return [Path(root) / p for p in paths], labels, f"test split of {root}", []


def ensemble_runs(run_dirs: Sequence[str | os.PathLike], output_dir: str | os.PathLike, image_dir=None, *,
                  batch_size: int = 32, overwrite: bool = False, tta: bool = False, verbose: int = 0) -> dict:
    """Score each run and the average of their probabilities on the same images; write the results.

    Writes ``metrics.json`` (the ensemble's metrics, as ``evaluate`` writes them, plus
    ``members``: each run's accuracy and macro-F1 and ``gain_over_best_member``),
    ``predictions.csv`` and ``skipped.csv`` into ``output_dir``.

    Args:
        run_dirs: two or more run folders predicting the same classes.
        image_dir: labelled folder to score on; default the runs' common test split.
        tta: each member predicts with 10-crop test-time augmentation.

    Raises:
        InputError: fewer than two runs, different class names, or no common evaluation images.
    """
    from transferkit.evaluation.evaluate import write_predictions
    from transferkit.evaluation.metrics import classification_metrics
    from transferkit.serving.predictors import predict_paths, run_predictor

    if len(run_dirs) < 2:
        raise InputError(f"An ensemble needs at least two run folders; received {len(run_dirs)}.")
    for run_dir in run_dirs:
        runs.check_run_dir(run_dir)
    # Claimed (locked, marked) while it is written, released however this ends.
    with outputs.claimed_output_dir(output_dir, overwrite=overwrite, inputs=[image_dir],
                                    command="ensemble") as output_dir:
        loaded = [runs.load_run(run_dir) for run_dir in run_dirs]
        class_names = loaded[0].class_names
        for run in loaded[1:]:
            if sorted(run.class_names) != sorted(class_names):
                only_first = sorted(set(class_names) - set(run.class_names))
                only_other = sorted(set(run.class_names) - set(class_names))
                raise InputError(
                    f"Runs '{loaded[0].run_dir}' and '{run.run_dir}' predict different classes (only in the first: "
                    f"{only_first or 'none'}; only in the second: {only_other or 'none'}). Ensemble runs trained on "
                    "the same classes."
                )
        paths, labels, source, skipped = evaluation_images(loaded, image_dir)
        ok = np.ones(len(paths), dtype=bool)
        member_probs = []
        for run in loaded:
            result = predict_paths(run_predictor(run, batch_size), paths,
                                   batch_size=batch_size, tta=tta, verbose=verbose)
            order = [run.class_names.index(name) for name in class_names]  # columns in the first run's order
            member_probs.append(result.probabilities[:, order])
            ok &= result.ok
            skipped += [(str(paths[i]), reason) for i, reason in sorted(result.errors.items())]
        if not ok.any():
            raise DataError(f"None of the {len(paths)} images ({source}) could be decoded; nothing to evaluate.")
        skipped = list(dict.fromkeys(skipped))
        average = np.mean(member_probs, axis=0)
        metrics = classification_metrics(labels[ok], average[ok], class_names)
        members = []
        for run, probs in zip(loaded, member_probs, strict=True):
            member = classification_metrics(labels[ok], probs[ok], class_names)
            members.append({"run_dir": str(run.run_dir), "backbone": run.config.get("backbone"),
                            "strategy": run.config.get("strategy"), "accuracy": member["accuracy"],
                            "macro_f1": member["macro_f1"]})
        metrics.update(
            method="mean of the members' class probabilities" + (" (each with 10-crop TTA)" if tta else ""),
            members=members,
            gain_over_best_member=metrics["accuracy"] - max(m["accuracy"] for m in members),
            image_dir=source,
            skipped=[{"path": p, "reason": r} for p, r in skipped],
        )
        files.write_json(output_dir / runs.METRICS_FILE, metrics)
        used = [str(p) for p, good in zip(paths, ok, strict=True) if good]
        write_predictions(output_dir / runs.PREDICTIONS_FILE, used, labels[ok], average[ok], class_names)
        files.write_csv(output_dir / runs.SKIPPED_FILE, ["path", "reason"], skipped)
        metrics["output_dir"] = str(output_dir)
        return metrics
