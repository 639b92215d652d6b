"""The ``metrics.json`` of a run folder, typed in one place.

``train`` writes :class:`RunMetrics`, ``evaluate`` writes :class:`EvaluationMetrics`; the report,
``evaluate``, ``export`` and the comparison read them. Both are JSON objects (TypedDicts: the file
stays plain JSON for any tool) with a ``version``; fields are added, never renamed, so a reader of
version N reads every earlier file (files written before versions existed have none: version 0).

Example:
    >>> metrics_version({"version": 1, "test": {}})
    1
    >>> metrics_version({"test": {}})
    0
"""

from __future__ import annotations

from typing import Any, TypedDict

#: The layout written today. 1: ``version`` itself (2026-12-01), with every field below.
METRICS_VERSION = 1


class ClassMetrics(TypedDict):
    precision: float
    recall: float
    f1: float
    support: int


class TestMetrics(TypedDict, total=False):
    """:func:`transferkit.evaluation.metrics.classification_metrics` of the test (or val) images."""

    num_examples: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    top_k_accuracy: dict[str, float]  # "3" -> accuracy, for k below the number of classes
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted, in class_names order
    class_names: list[str]
    split: str  # "test", or "val" when the folder has no test split


class SkippedFile(TypedDict):
    path: str
    reason: str


class ExtractionInfo(TypedDict):
    images: int
    computed: int
    cached: int
    augmented_views: int
    views_computed: int
    views_cached: int
    images_per_second: float
    batch_size: int
    seconds: float
    cache_dir: str


class Timings(TypedDict):
    fit_seconds: float
    total_seconds: float


class RunMetrics(TypedDict, total=False):
    """What ``transferkit train`` writes. Optional groups: the Adam head's epoch counts
    (``epochs_run``, ``best_epoch``, ``refit_epochs``) and a scikit-learn head's fit
    (``head_params``, ``head_cv_accuracy``, ``head_fit_seconds``, ``head_calibration``,
    ``head_outputs``, ``fold_agreement``)."""

    version: int
    test: TestMetrics
    backbone: str
    image_size: int
    weights: str  # where the weights came from, in words
    strategy: str  # freeze-all, fine-tune-top or full-retrain (auto's choice)
    strategy_reason: str
    auto_evidence: dict[str, Any] | None
    phases: list[dict[str, Any]]  # transferkit.training.strategies.Phase as a dict
    head: str
    head_fit: dict[str, Any]
    epochs_run: int
    best_epoch: int
    refit_epochs: int
    head_params: dict[str, Any]
    head_cv_accuracy: float | None
    head_fit_seconds: float
    head_calibration: str
    head_outputs: str
    fold_agreement: float
    fine_tune: dict[str, Any]  # empty without a fine-tune phase
    augmentation: dict[str, Any]
    class_weight: dict[str, float] | None
    image_dir: str
    split_source: str
    counts: dict[str, dict[str, int]]  # split -> class -> images
    skipped: list[SkippedFile]
    num_ignored: int
    extraction: ExtractionInfo
    timings: Timings
    versions: dict[str, str]  # package -> version


class EvaluationMetrics(TestMetrics, total=False):
    """What ``transferkit evaluate`` writes: the metrics at top level, with where they came from."""

    version: int
    run_dir: str
    image_dir: str
    skipped: list[SkippedFile]
    images_per_second: float
    versions: dict[str, str]
    tta: dict[str, Any]  # with --tta: accuracy and macro-F1 with and without it


def metrics_version(metrics: dict) -> int:
    """The layout version of a loaded ``metrics.json`` (0: written before versions existed)."""
    version = metrics.get("version", 0)
    return version if isinstance(version, int) and not isinstance(version, bool) else 0
