"""The head comparison: every head on the same cached features, split and seed, compared honestly.

The backbone runs once (features come from the cache); the softmax head and each scikit-learn head
of :mod:`transferkit.heads.registry` then train on the same labelled images and are scored on the same test
images. What is the same for every head:

- the split (train / val / test roles, from ``--seed`` exactly as ``transferkit train`` makes it);
- the labelled data: train + val. The softmax head is ``transferkit train``'s freeze-all head (the
  same function, :func:`transferkit.training.head.fit_softmax_head`): the exact regularised optimum,
  its ``C`` chosen by cross-validation; the scikit-learn heads run their cross-validated grid
  search;
- the seed of each repetition: with ``num_seeds`` N, every head trains N times with seeds
  ``seed, seed + 1, ...`` (weight initialisation, shuffling, cross-validation folds, a forest's
  trees) and the bootstrap resamples with the same seed; the split never changes.

Each head is tested against the reference (the softmax head) with McNemar's test on the test
images, and a winner is named only when it is significantly better than the runner-up (and than
the reference): see :func:`pick_winner`. Writing the files is :mod:`transferkit.report.comparison`.

Example:
    >>> config = CompareConfig("photos", "cmp", backbone="mobilenet_v2", heads=("softmax", "linear-svm"))
    >>> result = run_comparison(prepare_comparison(config))  # doctest: +SKIP
    >>> result.verdict.text  # doctest: +SKIP
    'No head is significantly better than the others: ...'
"""

from __future__ import annotations

import csv
import difflib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit import files
from transferkit.cache import default_cache_dir
from transferkit.config import FeatureSettings, TrainConfig
from transferkit.data.scan import ImageFolder
from transferkit.errors import ArgumentError, DataError
from transferkit.evaluation.metrics import classification_metrics, expected_calibration_error
from transferkit.heads.registry import HEADS
from transferkit.heads.stats import Verdict, bootstrap_accuracy_ci, paired_mcnemar, pick_winner
from transferkit.models.registry import BackboneSpec
from transferkit.models.weights import ResolvedWeights
from transferkit.serving import outputs, runs

log = logging.getLogger("transferkit")

SOFTMAX = "softmax"
FINE_TUNE = "fine-tune-top"
#: Heads compared when ``--heads`` is not given: the softmax head, the three linear heads and kNN.
#: benchmarks/compare.py, 3,000 images (2,539 to train on), 2-core CPU shared at load 4.5: the five fits took
#: 162 s, 128 s of them logreg's grid search (2,062 images on a quieter machine: 38 s for the whole run).
DEFAULT_HEADS = (SOFTMAX, "linear-svm", "logreg", "ridge", "knn")
#: Top-k accuracies reported (only for k below the number of classes).
TOP_K = (3, 5)
#: Bootstrap resamples per accuracy interval.
BOOTSTRAP_RESAMPLES = 2000
#: Repeats of the latency measurement; the fastest counts (the others include scheduler noise).
LATENCY_REPEATS = 3


@dataclass(frozen=True)
class CompareConfig(FeatureSettings):
    """Everything one ``transferkit compare`` run depends on.

    The softmax head trains with the defaults of ``transferkit train`` (see :meth:`train_config`).

    Example:
        >>> CompareConfig("photos", "cmp", heads=("softmax", "knn"), num_seeds=3).seeds
        (0, 1, 2)
    """

    image_dir: str
    output_dir: str
    heads: tuple[str, ...] = DEFAULT_HEADS
    search: bool = True
    calibrate: bool = False
    num_seeds: int = 1
    with_fine_tune: bool = False
    flip_average: bool = True
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    overwrite: bool = False

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "heads", resolve_heads(self.heads))
        if not isinstance(self.num_seeds, int) or self.num_seeds < 1:
            raise ArgumentError("num_seeds", "an integer >= 1", self.num_seeds)
        self.train_config()  # the shared settings are checked by TrainConfig's own rules

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(range(self.seed, self.seed + self.num_seeds))

    def train_config(self, **changes: Any) -> TrainConfig:
        """The ``transferkit train`` settings of the softmax (and fine-tune) arm: the same split and cache."""
        return TrainConfig(self.image_dir, self.output_dir, **self.feature_settings(), val_fraction=self.val_fraction,
                           test_fraction=self.test_fraction, flip_average=self.flip_average,
                           overwrite=self.overwrite).replace(**changes)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["heads"] = list(self.heads)
        data["overwrite"] = False  # a saved config repeats the run; it never overwrites
        return data


def resolve_heads(names: str | Sequence[str]) -> tuple[str, ...]:
    """Head names from ``--heads`` (comma-separated or a sequence): checked, canonical, deduplicated.

    ``all`` stands for the softmax head and every registry head.

    Raises:
        ArgumentError: an unknown name (with the closest names), or an empty list.

    Example:
        >>> resolve_heads("softmax, Linear_SVM,knn,knn")
        ('softmax', 'linear-svm', 'knn')
    """
    if isinstance(names, str):
        names = names.split(",")
    allowed = (SOFTMAX, *HEADS)
    resolved: list[str] = []
    for raw in names:
        key = str(raw).strip().lower().replace("_", "-")
        if not key:
            continue
        if key == "all":
            resolved.extend(allowed)
            continue
        if key == FINE_TUNE:
            raise ArgumentError("heads", "heads on cached features (the fine-tuned model is an arm of its own: "
                                "with_fine_tune, --with-fine-tune)", str(raw).strip())
        if key not in allowed:
            close = difflib.get_close_matches(key, (*allowed, "all"), n=2, cutoff=0.5)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ArgumentError("heads", f"head names from {', '.join(allowed)}, or all{hint}", str(raw).strip())
        resolved.append(key)
    unique = tuple(dict.fromkeys(resolved))
    if not unique:
        raise ArgumentError("heads", f"at least one head name from {', '.join(allowed)}, or all", ",".join(names))
    return unique


# ----------------------------------------------------------------------------- prepare


@dataclass
class ComparisonPlan:
    """A checked comparison: everything validated, nothing computed yet."""

    config: CompareConfig
    spec: BackboneSpec
    image_size: int
    weights: ResolvedWeights
    folder: ImageFolder
    output_dir: Path


def prepare_comparison(config: CompareConfig) -> ComparisonPlan:
    """Check everything a comparison needs, without TensorFlow: a mistake fails in seconds.

    Raises:
        InputError, WeightsError, DataError: with a message naming the option or file.
    """
    from transferkit.training.run import check_inputs

    spec, image_size, folder, weights, roles = check_inputs(config)
    if not (roles == "test").any():
        raise DataError(f"'{folder.root}' leaves no test images, and a comparison needs images no head has seen. "
                        "Raise --test-fraction (or add a test/ or val/ folder).")
    if len(set(folder.labels[roles == "test"].tolist())) < 2:
        raise DataError(f"The test split of '{folder.root}' holds a single class; accuracy there says little. "
                        "Add images or raise --test-fraction.")
    inputs = (config.image_dir, *folder.scanned_dirs)
    # Every check before the claim: a refused start leaves the output folder as it was.
    outputs.check_output_dir(config.output_dir, config.overwrite, inputs=inputs)
    outputs.check_cache_dir(config.cache_dir or default_cache_dir(), inputs)
    # Claimed (locked, marked) until run_comparison ends.
    output_dir = outputs.prepare_output_dir(config.output_dir, config.overwrite, inputs=inputs, command="compare")
    if config.with_fine_tune:
        from transferkit.training.run import prepare_training

        fine_tune_dir = output_dir / FINE_TUNE
        try:
            prepare_training(config.train_config(strategy=FINE_TUNE, output_dir=str(fine_tune_dir), overwrite=True))
        except BaseException:
            outputs.release_output_dir(output_dir)
            raise
        finally:
            outputs.release_output_dir(fine_tune_dir)  # only checked here; its train() claims it again
    return ComparisonPlan(config, spec, image_size, weights, folder, output_dir)


# ----------------------------------------------------------------------------- one trained head


@dataclass
class HeadRun:
    """One head trained with one seed and scored on the test images.

    Attributes:
        head: head name (``softmax``, a registry name or ``fine-tune-top``).
        seed: its seed.
        predicted: ``(n_test,)`` predicted class indices (the head's own decision rule).
        scores: ``(n_test, num_classes)`` probabilities or decision scores, columns in class order.
        score_kind: ``"proba"`` or ``"decision"``.
        fit_seconds: wall time of training (search, refit and calibration included).
        latency_ms: milliseconds per test image to score cached features (None for fine-tune-top).
        info: what the head chose: grid point and CV score, or epochs.
    """

    head: str
    seed: int
    predicted: np.ndarray
    scores: np.ndarray
    score_kind: str
    fit_seconds: float
    latency_ms: float | None
    info: dict[str, Any] = field(default_factory=dict)


def _latency_ms(score: Callable[[], Any], num_images: int) -> float:
    """Milliseconds per image of scoring every test image in one call (after one warm-up call)."""
    score()  # Keras traces its predict function on the first call
    best = float("inf")
    for _ in range(LATENCY_REPEATS):
        started = time.perf_counter()
        score()
        best = min(best, time.perf_counter() - started)
    return 1000 * best / max(num_images, 1)


def fit_sklearn_arm(name: str, features: np.ndarray, labels: np.ndarray, fit_idx: np.ndarray, test_idx: np.ndarray,
                    seed: int, *, search: bool, calibrate: bool) -> HeadRun:
    """Train a registry head on ``fit_idx`` (train + val) and score it on ``test_idx``."""
    from transferkit.heads.registry import fit_head

    head = fit_head(name, features[fit_idx], labels[fit_idx], search=search, seed=seed, calibrate=calibrate)
    x_test = features[test_idx]

    def score():
        return head.predict(x_test), head.scores(x_test)

    predicted, (scores, kind) = score()
    info = {"best_params": {k: _plain(v) for k, v in head.best_params_.items()}, "cv_folds": head.num_folds_,
            "cv_accuracy": head.cv_score_}
    return HeadRun(name, seed, np.asarray(predicted), scores, kind, head.fit_seconds_,
                   _latency_ms(score, len(test_idx)), info)


def fit_softmax_arm(features: np.ndarray, labels: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                    test_idx: np.ndarray, config: TrainConfig, seed: int, *,
                    history_path: Path | None = None) -> HeadRun:
    """Fit the softmax head exactly as ``transferkit train`` does (the same function and settings)
    and score it."""
    import keras

    from transferkit.training.head import fit_softmax_head

    keras.utils.set_random_seed(seed)
    head = fit_softmax_head(features, labels, train_idx, val_idx, test_idx, config.replace(seed=seed),
                            history_path=history_path)
    x_test = features[test_idx]
    probabilities = np.asarray(head.predict(x_test))
    return HeadRun(SOFTMAX, seed, probabilities.argmax(axis=1), probabilities, "proba", head.fit_seconds,
                   _latency_ms(lambda: head.predict(x_test), len(test_idx)), head.info)


def fit_fine_tune_arm(plan: ComparisonPlan, test_paths: Sequence[str], verbose: int) -> HeadRun:
    """Run ``transferkit train --strategy fine-tune-top`` into ``OUTPUT_DIR/fine-tune-top`` and score
    its model on the comparison's test images (checked to be the run's own test split)."""
    from transferkit.cache import extract_features
    from transferkit.training.run import train

    run_dir = plan.output_dir / FINE_TUNE
    config = plan.config.train_config(strategy=FINE_TUNE, output_dir=str(run_dir), overwrite=True)
    result = train(config, verbose=verbose)
    with files.open_text(run_dir / runs.SPLITS_FILE) as handle:  # names that are not UTF-8 read back as written
        run_test = {files.native_name(row["path"]) for row in csv.DictReader(handle) if row["split"] == "test"}
    if run_test != set(test_paths):
        raise DataError(f"The fine-tune-top run in '{run_dir}' tested on other images than the heads "
                        f"({len(run_test)} vs {len(test_paths)}); the folder changed during the comparison. Run again.")
    run = runs.load_run(run_dir)
    extraction = extract_features(run.model, [plan.folder.abs_path(p) for p in test_paths], None,
                                  batch_size=plan.config.batch_size, verbose=0)
    if not extraction.ok.all():
        raise DataError(f"{int((~extraction.ok).sum())} test images could not be read again for the fine-tune-top "
                        "model; the folder changed during the comparison. Run again.")
    probabilities = extraction.vectors
    info = {key: result.metrics.get(key) for key in ("head_fit", "fine_tune")}
    info["run_dir"] = str(run_dir)
    return HeadRun(FINE_TUNE, plan.config.seed, probabilities.argmax(axis=1), probabilities, "proba",
                   float(result.metrics["timings"]["fit_seconds"]), None, info)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


# ----------------------------------------------------------------------------- metrics


def run_metrics(y_true: np.ndarray, run: HeadRun, class_names: Sequence[str]) -> dict[str, Any]:
    """The metrics of one head run on the test images (:func:`classification_metrics`, the one
    definition train and evaluate use), with its interval, calibration and costs, JSON-ready."""
    from sklearn import metrics

    labels = np.arange(len(class_names))
    base = classification_metrics(y_true, run.scores, class_names, top_k=TOP_K, predicted=run.predicted)
    low, high = bootstrap_accuracy_ci(run.predicted == y_true, n_resamples=BOOTSTRAP_RESAMPLES, seed=run.seed)
    result = {
        "seed": run.seed,
        "accuracy": base["accuracy"],
        "accuracy_ci": [low, high],
        "top_k_accuracy": base["top_k_accuracy"],
        "macro_f1": base["macro_f1"],
        "balanced_accuracy": base["balanced_accuracy"],
        "log_loss": None,
        "ece": None,
        "score_kind": run.score_kind,
        "fit_seconds": run.fit_seconds,
        "latency_ms_per_image": run.latency_ms,
        "confusion_matrix": base["confusion_matrix"],
        **run.info,
    }
    if run.score_kind == "proba":
        result["log_loss"] = float(metrics.log_loss(y_true, run.scores, labels=labels))
        result["ece"] = expected_calibration_error(y_true, run.scores)
    return result


# ----------------------------------------------------------------------------- the whole comparison


@dataclass
class ComparisonResult:
    """A finished comparison.

    Attributes:
        output_dir: where everything was written.
        summary: the content of ``comparison.json``.
        verdict: the winner rule's outcome.
        table: the comparison table as Markdown (what the CLI prints).
    """

    output_dir: Path
    summary: dict[str, Any]
    verdict: Verdict
    table: str


def run_comparison(plan: ComparisonPlan, *, verbose: int = 1) -> ComparisonResult:
    """Extract (cached) features once, train every head with every seed, score, and write the files.

    Args:
        plan: from :func:`prepare_comparison`.
        verbose: 0 silent, 1 extraction progress bar.
    """
    try:
        return _run_claimed(plan, verbose)
    finally:
        outputs.release_output_dir(plan.output_dir)  # claimed by prepare_comparison


def _run_claimed(plan: ComparisonPlan, verbose: int) -> ComparisonResult:
    from transferkit.cache import FeatureCache, FeatureSpec, extract_features
    from transferkit.data.splits import assign_roles, with_roles
    from transferkit.models.weights import load_backbone
    from transferkit.report import comparison as comparison_report

    started = time.perf_counter()
    config, spec, folder, out = plan.config, plan.spec, plan.folder, plan.output_dir
    if plan.weights.kind == "random":
        log.warning("WARNING: --weights none: the backbone is randomly initialised; expect poor accuracy.")
    log.info("Found %d images in %d classes in %s (%s split), %d skipped.", len(folder.paths),
             len(folder.class_names), folder.source, folder.split_source, len(folder.skipped))
    import keras

    keras.utils.set_random_seed(config.seed)  # --weights none: the same seed gives the same (cached) vectors
    backbone = load_backbone(spec, plan.weights, plan.image_size, mirror=config.flip_average)
    cache = FeatureCache(config.cache_dir or default_cache_dir(), FeatureSpec.for_model(spec, backbone,
                                                                                        config.cache_dtype))
    extraction = extract_features(backbone, [folder.abs_path(p) for p in folder.paths], cache,
                                  batch_size=config.batch_size, verbose=verbose)
    log.info("Features: %d images, %s.", len(folder.paths), extraction.summary())
    skipped = list(folder.skipped) + extraction.skipped_files(folder.paths)
    for rel, reason in skipped:
        log.warning("Skipped %s: %s", rel, reason)
    roles = assign_roles(folder, extraction.ok, config.seed)
    features, labels = extraction.vectors, folder.labels
    train_idx, val_idx, test_idx = (np.flatnonzero(roles == r) for r in ("train", "val", "test"))
    if not len(test_idx):
        raise DataError("No test image could be read; nothing to compare on. See skipped.csv.")
    fit_idx = np.concatenate([train_idx, val_idx])
    y_test = labels[test_idx]
    train_config = config.train_config(output_dir=str(out))

    head_runs: dict[str, list[HeadRun]] = {}
    for name in config.heads:
        for seed in config.seeds:
            log.info("Training %s (seed %d) on %d images...", name, seed, len(fit_idx))
            if name == SOFTMAX:
                history = out / "history-softmax.csv" if seed == config.seed else None
                run = fit_softmax_arm(features, labels, train_idx, val_idx, test_idx, train_config, seed,
                                      history_path=history)
            else:
                run = fit_sklearn_arm(name, features, labels, fit_idx, test_idx, seed, search=config.search,
                                      calibrate=config.calibrate)
            head_runs.setdefault(name, []).append(run)
    if config.with_fine_tune:
        log.info("Training %s (seed %d) on live images...", FINE_TUNE, config.seed)
        head_runs[FINE_TUNE] = [fit_fine_tune_arm(plan, [folder.paths[i] for i in test_idx], verbose)]

    per_head = {name: [run_metrics(y_test, run, folder.class_names) for run in runs_]
                for name, runs_ in head_runs.items()}
    correct = {name: [run.predicted == y_test for run in runs_] for name, runs_ in head_runs.items()}
    reference = SOFTMAX if SOFTMAX in correct else next(iter(correct))
    verdict = pick_winner(correct, reference)
    run_folder = with_roles(folder, roles)
    summary = comparison_report.summarise(
        per_head, {name: paired_mcnemar(c, correct[reference]) for name, c in correct.items()}, reference, verdict,
        plan=plan, extraction=extraction, run_folder=run_folder, skipped=skipped,
        total_seconds=time.perf_counter() - started)
    usable = roles != "skipped"
    table = comparison_report.write_outputs(plan, summary, run_folder, skipped, features[usable], labels[usable])
    return ComparisonResult(out, summary, verdict, table)
