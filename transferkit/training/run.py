"""Train a classifier on a folder of images and write the run folder.

``freeze-all``: the backbone runs once per image (its pooled features come from the cache), a
softmax head trains on those features with early stopping, and the saved model is the backbone
and that same head in one flat graph that takes raw RGB pixels.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit import files
from transferkit.cache import (
    ExtractionResult,
    FeatureCache,
    FeatureSpec,
    FileHashes,
    default_cache_dir,
    extract_features,
)
from transferkit.cache.views import view_groups, with_view_rows
from transferkit.config import TrainConfig, save_config
from transferkit.data.augment import describe_run_augmentation
from transferkit.data.checks import check_strict, dataset_warnings
from transferkit.data.scan import ImageFolder, scan_folder, write_splits_csv
from transferkit.data.splits import assign_roles, with_roles
from transferkit.errors import DataError
from transferkit.evaluation.evaluate import write_predictions
from transferkit.evaluation.metrics import classification_metrics
from transferkit.models.build import block_boundaries
from transferkit.models.registry import BackboneSpec, check_image_size, get_backbone
from transferkit.models.weights import ResolvedWeights, load_backbone, resolve_weights
from transferkit.report import data as report_data
from transferkit.runtime import AUTO_BATCH_START, check_optional_flags, with_batch_backoff
from transferkit.serving import outputs, runs
from transferkit.serving.schema import METRICS_VERSION, RunMetrics
from transferkit.training.choice import describe_phase, measure_auto_evidence, resolve_strategy
from transferkit.training.distribute import make_strategy, output_dir_for
from transferkit.training.finetune import class_weights, fine_tune_phase
from transferkit.training.head import head_val_loss, refits
from transferkit.training.phases import fit_sklearn_head, head_phase, predict_images, refit_tuned_head
from transferkit.training.strategies import fine_tune_rate, plan_phases

log = logging.getLogger("transferkit")

@dataclass
class TrainResult:
    """What a finished ``train`` run reports back.

    Attributes:
        run_dir: the folder everything was written to.
        metrics: the content of ``metrics.json``.
    """

    run_dir: Path
    metrics: dict

    @property
    def test_accuracy(self) -> float:
        return self.metrics["test"]["accuracy"]


@dataclass
class TrainingPlan:
    """A checked training job: everything validated, nothing computed yet."""

    config: TrainConfig
    spec: BackboneSpec
    image_size: int
    weights: ResolvedWeights
    folder: ImageFolder
    run_dir: Path

    @property
    def is_worker_copy(self) -> bool:
        """A non-chief worker of ``--distribute multi-worker``: its folder is scratch, deleted at the end."""
        return self.run_dir != Path(self.config.output_dir)


def check_inputs(config, strict: bool = False) -> tuple[BackboneSpec, int, ImageFolder, ResolvedWeights, np.ndarray]:
    """The checks every job on a folder starts with, without TensorFlow: backbone and size, the
    folder and its split, the weights (which may download, so after the cheap checks).

    Args:
        config: any settings with ``backbone``, ``image_size``, ``image_dir``, ``weights``,
            ``seed``, ``val_fraction`` and ``test_fraction`` (train and compare settings).
        strict: fail when the scan skipped a file.

    Returns:
        ``(spec, image_size, folder, weights, roles)``, roles as :func:`assign_roles` gives them
        before extraction.
    """
    spec = get_backbone(config.backbone)
    image_size = check_image_size(spec, config.image_size)
    folder = scan_folder(config.image_dir, seed=config.seed, val_fraction=config.val_fraction,
                         test_fraction=config.test_fraction, allow_outside=config.allow_outside)
    if strict:
        check_strict(folder.skipped)
    weights = resolve_weights(spec, config.weights, image_size)
    roles = assign_roles(folder, np.ones(len(folder.paths), dtype=bool), config.seed)  # split problems fail now
    return spec, image_size, folder, weights, roles


def prepare_training(config: TrainConfig, resume: bool = False) -> TrainingPlan:
    """Check everything a run needs without TensorFlow: backbone, weights, input and output folders.

    A mistake fails here in seconds, never after extraction.

    Raises:
        InputError, WeightsError, DataError: with a message naming the option or file.
    """
    check_optional_flags(config)  # first: seconds, before the folder scan and any weights download
    spec, image_size, folder, weights, _ = check_inputs(config, strict=config.strict)
    if config.head != "softmax":
        from transferkit.heads.registry import get_head

        get_head(config.head)  # an unknown name fails now, with the nearest one suggested
    # A non-chief worker of --distribute multi-worker writes its checkpoints beside RUN_DIR.
    worker_dir = output_dir_for(config.output_dir, config.distribute)
    inputs = (config.image_dir, *folder.scanned_dirs)  # a tfds: input's folder, written out
    overwrite = config.overwrite or worker_dir != Path(config.output_dir)
    # Every check before the claim: a refused start leaves RUN_DIR as it was (a read-only -o
    # creates no cache folder; a bad --cache-dir leaves no locked, marked RUN_DIR).
    outputs.check_output_dir(worker_dir, overwrite, inputs=inputs, resume=resume)
    outputs.check_cache_dir(config.cache_dir or default_cache_dir(), inputs)
    # It locks RUN_DIR for this process (run_training releases it) and marks it as a transferkit folder.
    run_dir = outputs.prepare_output_dir(worker_dir, overwrite, inputs=inputs, command="train", resume=resume)
    return TrainingPlan(config, spec, image_size, weights, folder, run_dir)


def train(config: TrainConfig, *, verbose: int = 1) -> TrainResult:
    """Run one experiment end to end: scan, extract (cached), train, evaluate, write RUN_DIR.

    Args:
        config: the settings; see :class:`transferkit.config.TrainConfig`.
        verbose: 0 silent, 1 progress bar for extraction, 2 also one line per epoch.

    Returns:
        TrainResult with the run folder and its metrics.

    Example:
        >>> result = train(TrainConfig("photos", "runs/first", backbone="mobilenet_v2_035"))  # doctest: +SKIP
        >>> result.test_accuracy  # doctest: +SKIP
        0.93
    """
    return run_training(prepare_training(config), verbose=verbose)


def run_training(plan: TrainingPlan, *, verbose: int = 1, resume: bool = False) -> TrainResult:
    """Run a job checked by :func:`prepare_training` (see :func:`train`).

    Args:
        resume: continue the run in ``plan.run_dir`` from its checkpoints (``--resume``).
    """
    try:
        return _run_locked(plan, verbose, resume)
    finally:
        outputs.release_output_dir(plan.run_dir)  # taken by prepare_training


def _run_locked(plan: TrainingPlan, verbose: int, resume: bool) -> TrainResult:
    started = time.perf_counter()
    config, weights, folder, run_dir = plan.config, plan.weights, plan.folder, plan.run_dir
    if resume and _report_pending(run_dir):
        return _worker_done(plan, _finish_report(plan))
    if weights.kind == "random":
        log.warning("WARNING: --weights none: the backbone is randomly initialised; expect poor accuracy.")
    log.info(
        "Found %d images in %d classes in %s (%s split), %d skipped, %d ignored.",
        len(folder.paths), len(folder.class_names), folder.source, folder.split_source,
        len(folder.skipped), folder.num_ignored,
    )
    for rel, reason in folder.skipped:
        log.warning("Skipped %s: %s", rel, reason)
    # Hashes are remembered by the cache's index, so extraction does not read the images again.
    hashes = FileHashes(config.cache_dir or default_cache_dir()).hashes([folder.abs_path(p) for p in folder.paths])
    for message in dataset_warnings(folder, hashes):
        log.warning(message)
    if not resume:
        outputs.clear_previous_run(run_dir)
    save_config(config, run_dir / runs.CONFIG_FILE)  # first, so an interrupted run can resume
    runs.write_status(run_dir, "running", stage="train")
    try:
        result = _run_phases(plan, started, verbose, resume)
    except BaseException as exc:
        runs.write_failure(run_dir, exc)
        raise
    runs.write_status(run_dir, "finished", stage="done")
    return _worker_done(plan, result)


def _worker_done(plan: TrainingPlan, result: TrainResult) -> TrainResult:
    """A non-chief worker deletes its scratch copy at the end; the chief's folder is the run."""
    if plan.is_worker_copy:
        shutil.rmtree(plan.run_dir, ignore_errors=True)
        log.info("This worker's part is done; the chief writes %s.", plan.config.output_dir)
        result = dataclasses.replace(result, run_dir=Path(plan.config.output_dir))
    return result


def _report_pending(run_dir: Path) -> bool:
    """The run stopped while writing its report: the model and metrics are complete."""
    return (runs.read_status(run_dir).get("stage") == "report" and (run_dir / runs.MODEL_FILE).is_file()
            and (run_dir / runs.METRICS_FILE).is_file())


def _finish_report(plan: TrainingPlan) -> TrainResult:
    """``--resume`` of a run stopped during its report: write the report, nothing else."""
    run_dir = plan.run_dir
    log.info("Resumed: the model and metrics of %s are complete; writing the report only.", run_dir)
    try:
        if plan.is_worker_copy:  # workers write no report
            result = TrainResult(run_dir, runs.read_metrics(run_dir))
        else:
            result = TrainResult(run_dir, _write_train_report(runs.load_run(run_dir), None, None, plan.config.seed))
            log.info("The feature map needs the backbone's features: add it with 'transferkit report %s "
                     "--feature-map'.", run_dir)
    except BaseException as exc:
        runs.write_failure(run_dir, exc)
        raise
    runs.write_status(run_dir, "finished", stage="done")
    return result


def _write_train_report(run: runs.Run, features, feature_labels, seed: int) -> dict:
    """The report of a train run (Grad-CAM on its model unless a scikit-learn head has no gradient to
    follow); returns its metrics."""
    from transferkit.report.writer import gradcam_explainer, write_report

    explainer = None if run.head is not None or (run.run_dir / runs.HEAD_FILE).exists() else gradcam_explainer(run)
    html, _ = write_report(run.run_dir, features=features, feature_labels=feature_labels, explainer=explainer,
                           seed=seed)
    log.info("Report: %s", html)
    return runs.read_metrics(run.run_dir)


@dataclass
class _Features:
    """The extraction step's result: the backbone, every image's cached vector, and the split."""

    backbone: object
    extraction: ExtractionResult
    batch_size: int
    cache: FeatureCache
    skipped: list[tuple[str, str]]
    roles: np.ndarray
    mirrored: bool

    def indices(self, role: str) -> np.ndarray:
        return np.flatnonzero(self.roles == role)

    def evaluation(self) -> tuple[np.ndarray, str]:
        """The images the run is scored on, and their split: test, or val where there is no test split."""
        test_idx = self.indices("test")
        return (test_idx, "test") if len(test_idx) else (self.indices("val"), "val")


@dataclass
class _Choice:
    """The strategy step's result: what runs, why, and the settings it runs with."""

    config: TrainConfig
    strategy: str
    why: str
    evidence: object
    phases: list
    rate_reason: str
    class_weight: dict | None  # ``--class-weight auto``: class index -> weight


@dataclass
class _Fitted:
    """The fitting step's result: the model to save and its outputs on the evaluation images."""

    model: object
    probabilities: np.ndarray
    history: list[dict]
    head_info: dict
    fine_tune_info: dict
    seconds: float


def _run_phases(plan: TrainingPlan, started: float, verbose: int, resume: bool) -> TrainResult:
    """The run after its checks, step by step: start TensorFlow, extract, choose, fit, write."""
    distribution = _start_session(plan)  # first: multi-worker must precede any TensorFlow op
    data = _extract_step(plan, verbose)
    choice = _choose_step(plan, data, verbose)
    fitted = _fit_step(plan, data, choice, distribution, verbose, resume)
    metrics = _write_run(plan, data, choice, fitted, started)
    if plan.is_worker_copy:
        return TrainResult(plan.run_dir, metrics)
    # Grad-CAM follows the model in memory (no reload).
    ok = data.extraction.ok
    _write_train_report(runs.Run(plan.run_dir, fitted.model, plan.folder.class_names, choice.config.to_dict()),
                        data.extraction.vectors[ok], plan.folder.labels[ok], plan.config.seed)
    return TrainResult(plan.run_dir, metrics)


def _start_session(plan: TrainingPlan):
    """The distribution strategy (``--distribute``), the seed and ``--deterministic``."""
    config = plan.config
    distribution = make_strategy(config.distribute)
    import keras

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        import tensorflow as tf

        log.info("--deterministic: TensorFlow op determinism is on (slower; results repeat exactly).")
        tf.config.experimental.enable_op_determinism()
    log.info("Backbone %s at %d px, weights: %s", plan.spec.name, plan.image_size, plan.weights.source)
    return distribution


def _extract(plan: TrainingPlan, model, verbose: int):
    """Every image's vector through ``model``, from the cache where present, with batch back-off."""
    config = plan.config
    paths = [plan.folder.abs_path(p) for p in plan.folder.paths]
    store = FeatureCache(config.cache_dir or default_cache_dir(), FeatureSpec.for_model(plan.spec, model,
                                                                                          config.cache_dtype))
    result, batch_size = with_batch_backoff(
        lambda batch: extract_features(model, paths, store, batch_size=batch, verbose=verbose,
                                       views=config.augment_views, augmentation=config),
        config.batch_size, "extraction")  # a retry resumes: the vectors computed so far are in the cache
    return result, batch_size, store


def _extract_step(plan: TrainingPlan, verbose: int) -> _Features:
    """Load the backbone and extract (or look up) the features; skipped files, ``--strict``, roles."""
    config, folder = plan.config, plan.folder
    # Flip averaging is a freeze-all feature (fine-tuning sees mirrored images through augmentation);
    # auto starts from the freeze-all head, and extracts plain features again if it fine-tunes.
    mirrored = config.flip_average and config.strategy in ("freeze-all", "auto")
    backbone = load_backbone(plan.spec, plan.weights, plan.image_size, mirror=mirrored)
    extraction, batch_size, cache = _extract(plan, backbone, verbose)
    log.info("Features: %d images, %s.", len(folder.paths), extraction.summary())
    for rel, reason in extraction.skipped_files(folder.paths):
        log.warning("Skipped %s: %s", rel, reason)
    skipped = list(folder.skipped) + extraction.skipped_files(folder.paths)
    if config.strict:
        check_strict(skipped)  # the vectors computed so far stay in the cache
    roles = assign_roles(folder, extraction.ok, config.seed)
    return _Features(backbone, extraction, batch_size, cache, skipped, roles, mirrored)


def _choose_step(plan: TrainingPlan, data: _Features, verbose: int) -> _Choice:
    """The strategy (``auto`` measures its evidence), the fine-tune rate and the phase plan; a
    fine-tuning run on flip-averaged features extracts plain ones again (updating ``data``)."""
    config, labels = plan.config, plan.folder.labels
    train_idx, val_idx = data.indices("train"), data.indices("val")
    evidence = None
    if config.strategy == "auto":
        evidence = measure_auto_evidence(config, data.backbone, data.extraction.vectors, labels, train_idx, val_idx,
                                         data.mirrored)
    counts = np.bincount(labels[train_idx], minlength=len(plan.folder.class_names))
    strategy, why = resolve_strategy(config, counts, evidence)
    if data.mirrored and strategy != "freeze-all":
        log.info("Fine-tuning trains on plain images: extracting the head phase's features without the mirror.")
        data.backbone = load_backbone(plan.spec, plan.weights, plan.image_size)
        extraction, data.batch_size, data.cache = _extract(plan, data.backbone, verbose)
        if not np.array_equal(extraction.ok, data.roles != "skipped"):
            raise DataError("Images changed while transferkit read them (some decode now and not before, or the "
                            "reverse). Run again.")
        data.extraction = extraction
    rate, rate_reason = fine_tune_rate(len(train_idx), config.fine_tune_learning_rate)
    config = config.replace(fine_tune_learning_rate=rate)  # config.yaml keeps the setting as given
    phases = plan_phases(strategy, num_blocks=len(block_boundaries(plan.spec, data.backbone)),
                         unfreeze_blocks=config.unfreeze_blocks)
    log.info("Strategy %s%s: %s.", strategy, f" ({why})" if why else "",
             " then ".join(describe_phase(p, config, data.mirrored and strategy == "freeze-all") for p in phases))
    if len(phases) > 1 and config.head == "softmax":
        log.info("Fine-tune rate %g: %s.", rate, rate_reason)
    weights_by_class = class_weights(labels[train_idx], len(counts)) if config.class_weight == "auto" else None
    return _Choice(config, strategy, why, evidence, phases, rate_reason, weights_by_class)


def _fit_step(plan: TrainingPlan, data: _Features, choice: _Choice, distribution, verbose: int,
              resume: bool) -> _Fitted:
    """Fit the phases: a scikit-learn head, or the softmax head then (if planned) the fine-tune phase."""
    import keras

    config, folder, phases = choice.config, plan.folder, choice.phases
    labels, features = folder.labels, data.extraction.vectors
    train_idx, val_idx, test_idx = data.indices("train"), data.indices("val"), data.indices("test")
    eval_idx, _ = data.evaluation()
    weights_by_class = choice.class_weight
    checkpoint_dir = plan.run_dir / runs.CHECKPOINT_DIR
    # --augment-views K: the head trains on each training image and its K cached augmented views.
    head_features, head_labels, head_train_idx = with_view_rows(data.extraction, labels, train_idx)
    started = time.perf_counter()
    history: list[dict] = []
    fine_tune_info: dict = {}
    if config.head != "softmax":
        model, probabilities, head_info = fit_sklearn_head(config, data.backbone, head_features, head_labels,
                                                           head_train_idx, val_idx, eval_idx, folder.class_names,
                                                           plan.run_dir)
        return _Fitted(model, probabilities, history, head_info, fine_tune_info, time.perf_counter() - started)
    head = head_phase(config.replace(batch_size=AUTO_BATCH_START) if config.batch_size == "auto" else config,
                      head_features, head_labels, head_train_idx, val_idx, test_idx, checkpoint_dir,
                      refit=len(phases) == 1, class_weight=weights_by_class, resume=resume, verbose=verbose,
                      groups=view_groups(data.extraction, train_idx))
    history += [{"phase": "head", **row} for row in head.history]
    # The epoch counts stay top-level for the adam head, where earlier versions kept them.
    head_info = {"head_fit": head.info, **{key: head.info[key] for key in ("epochs_run", "best_epoch",
                                                                           "refit_epochs") if key in head.info}}
    # The model reuses the very head layers trained above on the backbone's output: one
    # flat graph, raw pixels in, no weight copying that could drift.
    model = keras.Model(data.backbone.input, head.head(data.backbone.output), name=f"transferkit_{plan.spec.name}")
    if len(phases) == 1:
        probabilities = head.predict(features[eval_idx])
        return _Fitted(model, probabilities, history, head_info, fine_tune_info, time.perf_counter() - started)
    baseline = head_val_loss(head, features, labels, val_idx)

    def tune(batch: int):
        return fine_tune_phase(config.replace(batch_size=batch), plan.spec, plan.image_size, data.backbone, model,
                               phases[1], folder, labels, train_idx, val_idx, checkpoint_dir, weights_by_class,
                               distribution, verbose, baseline=baseline)

    (model, rows, fine_tune_info), tuned_batch = with_batch_backoff(tune, config.batch_size, "the fine-tune phase")
    fine_tune_info.update(batch_size=tuned_batch, learning_rate=config.fine_tune_learning_rate,
                          learning_rate_reason=choice.rate_reason)
    history += [{"phase": "fine-tune", **row} for row in rows]
    paths = [folder.abs_path(p) for p in folder.paths]
    if refits(config, val_idx, test_idx):
        probabilities, fine_tune_info["head_refit"] = refit_tuned_head(
            model, data.backbone, paths, labels, np.concatenate([train_idx, val_idx]), eval_idx, config,
            weights_by_class)
    else:
        probabilities, _ = with_batch_backoff(
            lambda batch: predict_images(model, [paths[i] for i in eval_idx], batch), config.batch_size, "prediction")
    return _Fitted(model, probabilities, history, head_info, fine_tune_info, time.perf_counter() - started)


def _write_run(plan: TrainingPlan, data: _Features, choice: _Choice, fitted: _Fitted, started: float) -> RunMetrics:
    """Write the model, ``metrics.json`` and the run's CSV files; returns the metrics."""
    config, folder, run_dir, extraction = choice.config, plan.folder, plan.run_dir, data.extraction
    labels, phases = folder.labels, choice.phases
    eval_idx, eval_split = data.evaluation()
    runs.save_model(fitted.model, run_dir / runs.MODEL_FILE)
    test_metrics = classification_metrics(labels[eval_idx], fitted.probabilities, folder.class_names)
    test_metrics["split"] = eval_split
    run_folder = with_roles(folder, data.roles)
    weights_by_class = choice.class_weight
    metrics: RunMetrics = {
        "version": METRICS_VERSION,
        "test": test_metrics,
        "backbone": plan.spec.name,
        "image_size": plan.image_size,
        "weights": plan.weights.source,
        "strategy": choice.strategy,
        "strategy_reason": choice.why,
        "auto_evidence": choice.evidence.as_dict() if choice.evidence is not None else None,
        "phases": [dataclasses.asdict(p) for p in phases],
        "head": config.head,
        **fitted.head_info,
        "fine_tune": fitted.fine_tune_info,
        "augmentation": describe_run_augmentation(config, fine_tunes=len(phases) > 1),
        "class_weight": weights_by_class and {folder.class_names[c]: round(w, 4) for c, w in weights_by_class.items()},
        "image_dir": str(folder.root.resolve()),
        "split_source": folder.split_source,
        "counts": run_folder.counts(),
        "skipped": [{"path": p, "reason": r} for p, r in data.skipped],
        "num_ignored": folder.num_ignored,
        "extraction": {
            "images": len(folder.paths),
            "computed": extraction.num_computed,
            "cached": extraction.num_cached,
            "augmented_views": config.augment_views,
            "views_computed": extraction.num_views_computed,
            "views_cached": extraction.num_views_cached,
            "images_per_second": round(extraction.images_per_second, 2),
            "batch_size": data.batch_size,
            "seconds": round(extraction.seconds, 2),
            "cache_dir": str(data.cache.dir),
        },
        "timings": {"fit_seconds": round(fitted.seconds, 2), "total_seconds": round(time.perf_counter() - started, 2)},
        "versions": report_data.collect_versions(),
    }
    runs.write_labels(run_dir / runs.LABELS_FILE, folder.class_names)
    write_splits_csv(run_folder, run_dir / runs.SPLITS_FILE)  # skipped images are in skipped.csv
    files.write_csv(run_dir / runs.SKIPPED_FILE, ["path", "reason"], data.skipped)
    runs.write_history(run_dir / runs.HISTORY_FILE, fitted.history)
    write_predictions(run_dir / runs.PREDICTIONS_FILE, [folder.paths[i] for i in eval_idx], labels[eval_idx],
                      fitted.probabilities, folder.class_names)
    files.write_json(run_dir / runs.METRICS_FILE, metrics)
    # The model and metrics are complete: an interruption from here on leaves only the report to
    # write (--resume writes it), and the fine-tune backup is no longer needed.
    runs.write_status(run_dir, "running", stage="report")
    outputs.clear_backup(run_dir / runs.CHECKPOINT_DIR)
    return metrics
