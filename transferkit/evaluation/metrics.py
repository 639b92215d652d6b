"""Classification metrics, one definition for train, evaluate, ensembles and the head comparison.

scikit-learn computes them; :func:`classification_metrics` gathers them into one JSON-ready
dictionary, and :func:`expected_calibration_error` adds the one metric scikit-learn lacks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Bins of the expected calibration error (equal-width confidence bins, as in Guo et al. 2017).
ECE_BINS = 15


def classification_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str], top_k: Sequence[int] = (1, 3, 5),
    predicted: np.ndarray | None = None,
) -> dict:
    """Accuracy, top-k accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix.

    Args:
        y_true: ``(n,)`` true class indices.
        probabilities: ``(n, num_classes)`` scores or probabilities, columns in class order.
        class_names: names in column order.
        top_k: k values for top-k accuracy; values >= the number of classes are skipped.
        predicted: ``(n,)`` predicted class indices, where a head predicts otherwise than the
            arg-max of ``probabilities`` (ties of decision scores); None = that arg-max.

    Returns:
        A dictionary with plain Python numbers and lists, ready for ``json.dump``.

    Example:
        >>> m = classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"])
        >>> m["accuracy"], m["per_class"]["b"]["recall"]
        (1.0, 1.0)
    """
    from sklearn import metrics

    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities)
    num_classes = len(class_names)
    labels = np.arange(num_classes)
    y_pred = probabilities.argmax(axis=1) if predicted is None else np.asarray(predicted)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    result = {
        "num_examples": int(len(y_true)),
        "accuracy": float(metrics.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(metrics.balanced_accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(metrics.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "top_k_accuracy": {
            str(k): float(metrics.top_k_accuracy_score(y_true, probabilities, k=k, labels=labels))
            for k in top_k
            if 1 < k < num_classes
        },
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": list(class_names),
    }
    return result


def expected_calibration_error(y_true, probabilities, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error: how far confidence is from accuracy, on average.

    scikit-learn has no ECE; this weights its reliability curve (``calibration_curve`` of
    "the prediction is right" against the top probability, equal-width bins) by each bin's share
    of the images: ``sum_b n_b / n * |accuracy_b - confidence_b|``.

    Example:
        >>> expected_calibration_error([0, 1], [[0.9, 0.1], [0.2, 0.8]])
        0.15
    """
    from sklearn.calibration import calibration_curve

    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = np.clip(probabilities.max(axis=1), 0.0, 1.0)
    right = (probabilities.argmax(axis=1) == np.asarray(y_true)).astype(int)
    accuracy, mean_confidence = calibration_curve(right, confidence, n_bins=n_bins, strategy="uniform", pos_label=1)
    # The bin of each image, by the same rule calibration_curve uses, for the bins' weights.
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], confidence), minlength=n_bins)
    weights = counts[counts > 0] / len(confidence)
    return round(float(np.sum(weights * np.abs(accuracy - mean_confidence))), 12)
