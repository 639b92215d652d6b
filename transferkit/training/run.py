"""Train a classifier on a folder of images and write the run folder.

``freeze-all``: the backbone runs once per image (its pooled features come from the cache), a
softmax head trains on those features with early stopping, and the saved model is the backbone
and that same head in one flat graph that takes raw RGB pixels.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit import files
from transferkit.cache import FeatureCache, FeatureSpec, FileHashes, default_cache_dir, extract_features
from transferkit.cache.views import view_groups, with_view_rows
from transferkit.config import TrainConfig, save_config
from transferkit.data.augment import describe_augmentation, describe_run_augmentation, describe_views
from transferkit.data.checks import check_strict, dataset_warnings
from transferkit.data.scan import ImageFolder, scan_folder, write_splits_csv
from transferkit.data.splits import assign_roles, with_roles
from transferkit.errors import DataError, TransferkitError
from transferkit.evaluation.evaluate import write_predictions
from transferkit.evaluation.metrics import classification_metrics
from transferkit.models.build import block_boundaries
from transferkit.models.registry import BackboneSpec, check_image_size, get_backbone
from transferkit.models.weights import ResolvedWeights, load_backbone, resolve_weights
from transferkit.report import data as report_data
from transferkit.runtime import AUTO_BATCH_START, check_optional_flags, with_batch_backoff
from transferkit.serving import runs
from transferkit.training.distribute import make_strategy, output_dir_for
from transferkit.training.finetune import class_weights, fine_tune_phase, tensorboard_callbacks
from transferkit.training.head import SoftmaxHead, fit_softmax_head, head_layers, head_val_loss, refits
from transferkit.training.strategies import choose_strategy, fine_tune_rate, plan_phases

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
                         test_fraction=config.test_fraction)
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
    inputs = (config.image_dir, folder.root)  # folder.root: where a tfds: input was written out
    overwrite = config.overwrite or worker_dir != Path(config.output_dir)
    # Every check before the claim: a refused start leaves RUN_DIR as it was (a read-only -o
    # creates no cache folder; a bad --cache-dir leaves no locked, marked RUN_DIR).
    runs.check_output_dir(worker_dir, overwrite, inputs=inputs, resume=resume)
    runs.check_cache_dir(config.cache_dir or default_cache_dir(), inputs)
    # It locks RUN_DIR for this process (run_training releases it) and marks it as a transferkit folder.
    run_dir = runs.prepare_output_dir(worker_dir, overwrite, inputs=inputs, command="train", resume=resume)
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
        runs.release_output_dir(plan.run_dir)  # taken by prepare_training


def _run_locked(plan: TrainingPlan, verbose: int, resume: bool) -> TrainResult:
    started = time.perf_counter()
    config, weights, folder, run_dir = plan.config, plan.weights, plan.folder, plan.run_dir
    if resume and _report_pending(run_dir):
        return _worker_done(plan, _finish_report(plan))
    if weights.kind == "random":
        log.warning("WARNING: --weights none: the backbone is randomly initialised; expect poor accuracy.")
    log.info(
        "Found %d images in %d classes in %s (%s split), %d skipped, %d ignored.",
        len(folder.paths), len(folder.class_names), folder.root, folder.split_source,
        len(folder.skipped), folder.num_ignored,
    )
    for rel, reason in folder.skipped:
        log.warning("Skipped %s: %s", rel, reason)
    # Hashes are remembered by the cache's index, so extraction does not read the images again.
    hashes = FileHashes(config.cache_dir or default_cache_dir()).hashes([folder.abs_path(p) for p in folder.paths])
    for message in dataset_warnings(folder, hashes):
        log.warning(message)
    if not resume:
        runs.clear_previous_run(run_dir)
    save_config(config, run_dir / runs.CONFIG_FILE)  # first, so an interrupted run can resume
    _write_status(run_dir, "running", stage="train")
    try:
        result = _run_phases(plan, started, verbose, resume)
    except BaseException as exc:
        _write_failure(run_dir, exc)
        raise
    _write_status(run_dir, "finished", stage="done")
    return _worker_done(plan, result)


def _worker_done(plan: TrainingPlan, result: TrainResult) -> TrainResult:
    """A non-chief worker deletes its scratch copy at the end; the chief's folder is the run."""
    if plan.is_worker_copy:
        shutil.rmtree(plan.run_dir, ignore_errors=True)
        log.info("This worker's part is done; the chief writes %s.", plan.config.output_dir)
        result = dataclasses.replace(result, run_dir=Path(plan.config.output_dir))
    return result


def _write_status(run_dir: Path, state: str, detail: str = "", *, stage: str) -> None:
    """``status.json`` says whether a run finished, failed or was interrupted (resume with --resume),
    and its stage: ``train`` until the model and metrics are written, then ``report``, then ``done``."""
    files.write_json(run_dir / runs.STATUS_FILE, {"state": state, "stage": stage, "detail": detail,
                                                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _write_failure(run_dir: Path, exc: BaseException) -> None:
    """The run stopped: say how, keeping the stage it had reached (so --resume redoes only the rest)."""
    _write_status(run_dir, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                  f"{type(exc).__name__}: {exc}"[:300], stage=runs.read_status(run_dir).get("stage", "train"))


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
            result = TrainResult(run_dir, json.loads((run_dir / runs.METRICS_FILE).read_text(encoding="utf-8")))
        else:
            result = TrainResult(run_dir, _write_train_report(runs.load_run(run_dir), None, None, plan.config.seed))
            log.info("The feature map needs the backbone's features: add it with 'transferkit report %s "
                     "--feature-map'.", run_dir)
    except BaseException as exc:
        _write_failure(run_dir, exc)
        raise
    _write_status(run_dir, "finished", stage="done")
    return result


def _write_train_report(run: runs.Run, features, feature_labels, seed: int) -> dict:
    """The report of a train run (Grad-CAM on its model unless a scikit-learn head has no gradient to
    follow); returns its metrics."""
    from transferkit.report.writer import gradcam_explainer, write_report

    explainer = None if run.head is not None or (run.run_dir / runs.HEAD_FILE).exists() else gradcam_explainer(run)
    html, _ = write_report(run.run_dir, features=features, feature_labels=feature_labels, explainer=explainer,
                           seed=seed)
    log.info("Report: %s", html)
    return json.loads((run.run_dir / runs.METRICS_FILE).read_text(encoding="utf-8"))


def _run_phases(plan: TrainingPlan, started: float, verbose: int, resume: bool) -> TrainResult:
    config, spec, image_size, weights, folder, run_dir = (
        plan.config, plan.spec, plan.image_size, plan.weights, plan.folder, plan.run_dir)
    distribution = make_strategy(config.distribute)  # first: multi-worker must precede any TensorFlow op
    import keras

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        import tensorflow as tf

        log.info("--deterministic: TensorFlow op determinism is on (slower; results repeat exactly).")
        tf.config.experimental.enable_op_determinism()
    log.info("Backbone %s at %d px, weights: %s", spec.name, image_size, weights.source)
    # Flip averaging is a freeze-all feature (fine-tuning sees mirrored images through augmentation);
    # auto starts from the freeze-all head, and extracts plain features again if it fine-tunes.
    mirrored = config.flip_average and config.strategy in ("freeze-all", "auto")
    backbone = load_backbone(spec, weights, image_size, mirror=mirrored)
    paths = [folder.abs_path(p) for p in folder.paths]

    def extract(model):
        store = FeatureCache(config.cache_dir or default_cache_dir(),
                             FeatureSpec.for_model(spec, model, config.cache_dtype))
        result, batch_size = with_batch_backoff(
            lambda batch: extract_features(model, paths, store, batch_size=batch, verbose=verbose,
                                           views=config.augment_views, augmentation=config),
            config.batch_size, "extraction")  # a retry resumes: the vectors computed so far are in the cache
        return result, batch_size, store

    extraction, extraction_batch, cache = extract(backbone)
    log.info("Features: %d images, %s.", len(folder.paths), extraction.summary())
    for rel, reason in extraction.skipped_files(folder.paths):
        log.warning("Skipped %s: %s", rel, reason)
    skipped = list(folder.skipped) + extraction.skipped_files(folder.paths)
    if config.strict:
        check_strict(skipped)  # the vectors computed so far stay in the cache

    roles = assign_roles(folder, extraction.ok, config.seed)
    features, labels = extraction.vectors, folder.labels
    train_idx, val_idx, test_idx = (np.flatnonzero(roles == r) for r in ("train", "val", "test"))
    num_classes = len(folder.class_names)
    evidence = None
    if config.strategy == "auto":
        evidence = _auto_evidence(config, backbone, features, labels, train_idx, val_idx, mirrored)
    strategy, why = resolve_strategy(config, np.bincount(labels[train_idx], minlength=num_classes), evidence)
    if mirrored and strategy != "freeze-all":
        log.info("Fine-tuning trains on plain images: extracting the head phase's features without the mirror.")
        backbone = load_backbone(spec, weights, image_size)
        extraction, extraction_batch, cache = extract(backbone)
        if not np.array_equal(extraction.ok, roles != "skipped"):
            raise DataError("Images changed while transferkit read them (some decode now and not before, or the "
                            "reverse). Run again.")
        features = extraction.vectors
    rate, rate_reason = fine_tune_rate(len(train_idx), config.fine_tune_learning_rate)
    config = config.replace(fine_tune_learning_rate=rate)  # config.yaml keeps the setting as given
    phases = plan_phases(strategy, num_blocks=len(block_boundaries(spec, backbone)),
                         unfreeze_blocks=config.unfreeze_blocks)
    log.info("Strategy %s%s: %s.", strategy, f" ({why})" if why else "",
             " then ".join(_describe_phase(p, config, mirrored and strategy == "freeze-all") for p in phases))
    if len(phases) > 1 and config.head == "softmax":
        log.info("Fine-tune rate %g: %s.", rate, rate_reason)
    weights_by_class = class_weights(labels[train_idx], num_classes) if config.class_weight == "auto" else None
    checkpoint_dir = run_dir / runs.CHECKPOINT_DIR
    eval_idx, eval_split = (test_idx, "test") if len(test_idx) else (val_idx, "val")
    # --augment-views K: the head trains on each training image and its K cached augmented views.
    head_features, head_labels, head_train_idx = with_view_rows(extraction, labels, train_idx)

    fit_started = time.perf_counter()
    history: list[dict] = []
    fine_tune_info: dict = {}
    if config.head != "softmax":
        model, probabilities, head_info = _train_sklearn_head(config, backbone, head_features, head_labels,
                                                              head_train_idx, val_idx, eval_idx, folder.class_names,
                                                              run_dir)
    else:
        head = _head_phase(config.replace(batch_size=AUTO_BATCH_START) if config.batch_size == "auto" else config,
                           head_features, head_labels, head_train_idx, val_idx, test_idx, checkpoint_dir,
                           refit=len(phases) == 1, class_weight=weights_by_class, resume=resume, verbose=verbose,
                           groups=view_groups(extraction, train_idx))
        history += [{"phase": "head", **row} for row in head.history]
        # The epoch counts stay top-level for the adam head, where earlier versions kept them.
        head_info = {"head_fit": head.info, **{key: head.info[key] for key in ("epochs_run", "best_epoch",
                                                                               "refit_epochs") if key in head.info}}
        # The model reuses the very head layers trained above on the backbone's output: one
        # flat graph, raw pixels in, no weight copying that could drift.
        model = keras.Model(backbone.input, head.head(backbone.output), name=f"transferkit_{spec.name}")
        if len(phases) == 1:
            probabilities = head.predict(features[eval_idx])
        else:
            baseline = head_val_loss(head, features, labels, val_idx)

            def tune(batch: int):
                return fine_tune_phase(config.replace(batch_size=batch), spec, image_size, backbone, model, phases[1],
                                       folder, labels, train_idx, val_idx, checkpoint_dir, weights_by_class,
                                       distribution, verbose, baseline=baseline)

            (model, rows, fine_tune_info), tuned_batch = with_batch_backoff(
                tune, config.batch_size, "the fine-tune phase")
            fine_tune_info.update(batch_size=tuned_batch, learning_rate=rate, learning_rate_reason=rate_reason)
            history += [{"phase": "fine-tune", **row} for row in rows]
            if refits(config, val_idx, test_idx):
                probabilities, fine_tune_info["head_refit"] = refit_tuned_head(
                    model, backbone, paths, labels, np.concatenate([train_idx, val_idx]), eval_idx, config,
                    weights_by_class)
            else:
                probabilities, _ = with_batch_backoff(
                    lambda batch: _predict_images(model, [paths[i] for i in eval_idx], batch), config.batch_size,
                    "prediction")
    fit_seconds = time.perf_counter() - fit_started
    runs.save_model(model, run_dir / runs.MODEL_FILE)

    test_metrics = classification_metrics(labels[eval_idx], probabilities, folder.class_names)
    test_metrics["split"] = eval_split
    run_folder = with_roles(folder, roles)
    metrics = {
        "test": test_metrics,
        "backbone": spec.name,
        "image_size": image_size,
        "weights": weights.source,
        "strategy": strategy,
        "strategy_reason": why,
        "auto_evidence": evidence.as_dict() if evidence is not None else None,
        "phases": [dataclasses.asdict(p) for p in phases],
        "head": config.head,
        **head_info,
        "fine_tune": fine_tune_info,
        "augmentation": describe_run_augmentation(config, fine_tunes=len(phases) > 1),
        "class_weight": weights_by_class and {folder.class_names[c]: round(w, 4) for c, w in weights_by_class.items()},
        "image_dir": str(folder.root.resolve()),
        "split_source": folder.split_source,
        "counts": run_folder.counts(),
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "num_ignored": folder.num_ignored,
        "extraction": {
            "images": len(folder.paths),
            "computed": extraction.num_computed,
            "cached": extraction.num_cached,
            "augmented_views": config.augment_views,
            "views_computed": extraction.num_views_computed,
            "views_cached": extraction.num_views_cached,
            "images_per_second": round(extraction.images_per_second, 2),
            "batch_size": extraction_batch,
            "seconds": round(extraction.seconds, 2),
            "cache_dir": str(cache.dir),
        },
        "timings": {"fit_seconds": round(fit_seconds, 2), "total_seconds": round(time.perf_counter() - started, 2)},
        "versions": report_data.collect_versions(),
    }
    runs.write_labels(run_dir / runs.LABELS_FILE, folder.class_names)
    write_splits_csv(run_folder, run_dir / runs.SPLITS_FILE)  # skipped images are in skipped.csv
    files.write_csv(run_dir / runs.SKIPPED_FILE, ["path", "reason"], skipped)
    _write_history(run_dir / runs.HISTORY_FILE, history)
    write_predictions(run_dir / runs.PREDICTIONS_FILE, [folder.paths[i] for i in eval_idx], labels[eval_idx],
                      probabilities, folder.class_names)
    files.write_json(run_dir / runs.METRICS_FILE, metrics)
    # The model and metrics are complete: an interruption from here on leaves only the report to
    # write (--resume writes it), and the fine-tune backup is no longer needed.
    _write_status(run_dir, "running", stage="report")
    clear_backup(checkpoint_dir)
    if plan.is_worker_copy:
        return TrainResult(run_dir, metrics)
    # Grad-CAM follows the model in memory (no reload).
    _write_train_report(runs.Run(run_dir, model, folder.class_names, config.to_dict()), features[extraction.ok],
                        labels[extraction.ok], config.seed)
    return TrainResult(run_dir, metrics)


def clear_backup(checkpoint_dir: Path) -> None:
    """Remove the fine-tune backup (its files only: see :data:`runs.BACKUP_PATTERNS`)."""
    backup = checkpoint_dir / runs.BACKUP_DIR
    for path in [p for pattern in runs.BACKUP_PATTERNS for p in backup.glob(pattern)]:
        path.unlink(missing_ok=True)
    try:
        backup.rmdir()
    except OSError:
        pass  # absent, or holds a file that is not ours


def resolve_strategy(config: TrainConfig, train_counts: np.ndarray, evidence=None) -> tuple[str, str]:
    """The strategy to run and why (``auto`` decides from the training images per class and the
    frozen head's ``evidence``, :func:`_auto_evidence`).

    Flags that only shape the fine-tune phase are named when the strategy has none, so that no
    flag is silently without effect.
    """
    strategy, why = config.strategy, ""
    if strategy == "auto":
        strategy, why = choose_strategy(train_counts.tolist(), evidence, fine_tune_from=config.auto_fine_tune_from,
                                        full_retrain_from=config.auto_full_retrain_from)
    if strategy == "freeze-all":
        moot = [flag for flag, given in (("--xla", config.xla), ("--mixed-precision", config.mixed_precision))
                if given]
        if moot:
            log.warning("WARNING: %s only shape%s the fine-tune phase; freeze-all has none, so %s not used.",
                        " and ".join(moot), "s" if len(moot) == 1 else "", "it is" if len(moot) == 1 else "they are")
    if config.head == "softmax" and config.head_solver == "exact":
        defaults = TrainConfig("", "")
        moot = [f"--{name.replace('_', '-')}" for name in ("epochs", "learning_rate", "patience")
                if getattr(config, name) != getattr(defaults, name)]
        if strategy == "freeze-all":  # dropout and TensorBoard also shape a fine-tune phase
            moot += [flag for flag, given in (("--dropout", config.dropout), ("--tensorboard", config.tensorboard))
                     if given]
        if moot:
            log.warning("WARNING: %s only shape%s the Keras-trained head (--head-solver adam); the exact head "
                        "(the default) has no epochs, so %s not used.", _in_words(moot),
                        "s" if len(moot) == 1 else "", "it is" if len(moot) == 1 else "they are")
    return strategy, why


def _in_words(flags: list[str]) -> str:
    """``--a``, ``--a and --b``, ``--a, --b and --c``."""
    return " and ".join(flags) if len(flags) < 3 else f"{', '.join(flags[:-1])} and {flags[-1]}"


#: A fine-tune epoch's cost in forward passes of its training images (backward through the top
#: blocks, augmentation and decoding included) plus one pass of the val images. Measured: sign
#: digits, mobilenet_v2, 1,444 training images at 32.6 s an epoch against 79 images/s forward: 1.6.
FINE_TUNE_EPOCH_COST = 2.0
#: The same with ``--fine-tune-views``: each view costs a forward pass with its augmentation
#: (1.3) once, then an epoch of the top blocks on the cached output 0.3 forward passes per
#: training image. Measured: sign digits, mobilenet_v2 (4 of 18 blocks train), 4 views of 1,437
#: images and 201 val images in 201 s, epochs of 10.3 s, while a forward pass ran 39 images/s.
FROZEN_VIEW_COST, FROZEN_EPOCH_COST = 1.3, 0.3


def _auto_evidence(config: TrainConfig, backbone, features, labels, train_idx, val_idx, mirrored: bool):
    """``--strategy auto``'s evidence: the frozen head on train + val (C, learning curve) and the
    fine-tune epoch time estimated from one timed forward batch on this machine."""
    from transferkit.heads.softmax import auto_evidence

    size = int(backbone.input_shape[1])
    batch = np.zeros((16, size, size, 3), np.float32)
    backbone.predict_on_batch(batch)  # warm-up: graph tracing is not the steady state
    timings = []
    for _ in range(3):  # the fastest of three: other processes only ever slow a run down
        started = time.perf_counter()
        backbone.predict_on_batch(batch)
        timings.append(time.perf_counter() - started)
    per_image = min(timings) / len(batch) / (2 if mirrored else 1)
    num_train, num_val = len(train_idx), len(val_idx)
    if config.fine_tune_views:  # the usual case; a cut too large for memory trains on live images (slower)
        setup = per_image * FROZEN_VIEW_COST * (config.fine_tune_views * num_train + num_val)
        epoch_seconds = per_image * FROZEN_EPOCH_COST * (num_train + num_val / 3)
    else:
        setup, epoch_seconds = 0.0, per_image * (FINE_TUNE_EPOCH_COST * num_train + num_val)
    trval_idx = np.concatenate([train_idx, val_idx])
    evidence = auto_evidence(features[trval_idx], labels[trval_idx], seed=config.seed, seconds_per_epoch=epoch_seconds,
                             fine_tune_epochs=config.fine_tune_epochs, setup_seconds=setup)
    log.info("auto: frozen head cross-validated accuracy %.3f; learning curve %s; fine-tune estimate %.0f s, then "
             "%.0f s an epoch.", evidence.cv_accuracy,
             ", ".join(f"{share:.0%}: {acc:.3f}" for share, acc in evidence.learning_curve), setup, epoch_seconds)
    return evidence


def _describe_phase(phase, config: TrainConfig, mirrored: bool = False) -> str:
    """The phase in words, as it will run: a scikit-learn head has no epochs or rate to show."""
    if phase.on_features:
        views = describe_views(config)
        rows = f"; trains on {views}" if views else ""
        if config.head != "softmax":
            fit = "grid search by cross-validation, then a refit" if config.search else "default hyper-parameters"
            return f"scikit-learn head {config.head} on the cached features of train + val ({fit}{rows})"
        if config.head_solver == "exact":
            penalty = ("L2 strength chosen by cross-validation" if config.regularization is None
                       else f"L2 strength {config.regularization:g}")
            mirror = ", flip-averaged features" if mirrored else ""
            return f"exact softmax head on cached features ({penalty}{mirror}{rows})"
        return f"head on cached features (up to {config.epochs} epochs, rate {config.learning_rate:g}{rows})"
    return (f"{phase.unfreeze_blocks} top block(s) with the head on live images ({config.fine_tune_epochs} epochs, "
            f"{config.schedule} schedule, rates {config.fine_tune_learning_rate:g} head / "
            f"{config.fine_tune_learning_rate * phase.rate_multipliers[1]:g} top block / "
            f"{config.fine_tune_learning_rate * phase.rate_multipliers[2]:g} deeper; "
            f"BatchNorm {'trains' if config.train_bn else 'frozen'}; augmentation: {describe_augmentation(config)})")


def refit_tuned_head(model, backbone, paths: list[str], labels: np.ndarray, trval_idx: np.ndarray, eval_idx: np.ndarray,
                     config: TrainConfig, class_weight: dict | None) -> tuple[np.ndarray, dict]:
    """After the fine-tune phase, refit the model's ``predictions`` layer on the train + val images'
    features through the fine-tuned ``backbone`` (whose layers ``model`` shares), as freeze-all
    refits its head: every labelled non-test image counts, the early-stopping images included.

    The fit is the exact head of freeze-all (:func:`transferkit.heads.softmax.fit_exact_softmax`,
    its ``C`` chosen by cross-validation on these features unless ``--regularization`` is given):
    no epoch count has to be chosen for features the head phase never saw. It is folded into the
    layer in place, so the saved graph is unchanged. Measured with mobilenet_v2 (README, Results):
    on the same fine-tuned models, ants/bees seeds 0-2 0.954/0.948/0.941 against 0.941/0.941/0.928
    without; sign digits 0.979 against 0.981.

    Returns:
        ``(probabilities of the eval_idx images, info for metrics.json)``.
    """
    from transferkit.heads.softmax import fit_exact_softmax

    started = time.perf_counter()
    index = np.concatenate([trval_idx, eval_idx])
    features, _ = with_batch_backoff(lambda batch: _predict_images(backbone, [paths[i] for i in index], batch),
                                     config.batch_size, "prediction")
    # Every class has training images (assign_roles), so the columns follow the class indices.
    exact = fit_exact_softmax(features[:len(trval_idx)], labels[trval_idx], seed=config.seed,
                              regularization=config.regularization, class_weight=class_weight)
    layer = model.get_layer("predictions")  # on the backbone's output (the dropout before it passes inputs through)
    layer.set_weights([w.astype(np.float32) for w in exact.kernel_bias()])
    probabilities = np.asarray(layer(features[len(trval_idx):].astype(np.float32)))
    log.info("Head refit on the fine-tuned features of train + val (%d images): C = %g (%s).", len(trval_idx),
             exact.C, exact.chosen_by)
    return probabilities, {"images": len(trval_idx), "seconds": round(time.perf_counter() - started, 2),
                           "C": exact.C, "chosen_by": exact.chosen_by}


def _head_phase(config, features, labels, train_idx, val_idx, test_idx, checkpoint_dir: Path, *, refit: bool,
                class_weight, resume: bool, verbose: int, groups: np.ndarray | None = None) -> SoftmaxHead:
    """Phase 1 on cached features; before a fine-tune phase its weights are checkpointed so that
    ``--resume`` does not train it again."""
    import keras

    saved = checkpoint_dir / "head.weights.h5"
    num_classes = int(labels.max()) + 1
    if resume and saved.is_file() and not refit:
        try:
            state = json.loads((checkpoint_dir / "head.json").read_text(encoding="utf-8"))
            info = dict(state["info"])
            head, model = head_layers(keras, config, features.shape[1], num_classes, info.get("regularization"),
                                       int(info.get("images", len(train_idx))))
            model.load_weights(saved)
            restored = SoftmaxHead(head, model, info, 0.0, list(state["history"]))
        except Exception as exc:  # noqa: BLE001 - HDF5, JSON and shape errors all mean "damaged checkpoint"
            log.warning("WARNING: the head phase's checkpoint in %s is damaged (%s: %s); training the head again.",
                        checkpoint_dir, type(exc).__name__, str(exc)[:200])
        else:
            log.info("Resumed: head phase restored from %s.", saved)
            return restored
    result = fit_softmax_head(features, labels, train_idx, val_idx, test_idx,
                              config.replace(refit=config.refit and refit), class_weight=class_weight, verbose=verbose,
                              extra_callbacks=tensorboard_callbacks(config, checkpoint_dir, "head"), groups=groups)
    if not refit:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        runs.save_weights(result.model, saved)
        files.write_json(checkpoint_dir / "head.json", {"info": result.info, "history": result.history})
    return result


def _predict_images(model, paths, batch_size: int) -> np.ndarray:
    """Model outputs for image files (all decodable: they passed extraction)."""
    result = extract_features(model, paths, None, batch_size=batch_size, verbose=0)
    return result.vectors


def _train_sklearn_head(config, backbone, features, labels, train_idx, val_idx, eval_idx, class_names, run_dir):
    """``--head NAME``: a scikit-learn head on the cached features of train + val (its grid search's
    cross-validation replaces early stopping).

    A linear head is folded into a Dense layer on the backbone, so ``model.keras`` serves exactly
    like a softmax run (the fold is checked against scikit-learn on the evaluation split). Other
    heads are saved with skops as ``head.skops`` next to the backbone, which then outputs features.
    Every head outputs probabilities: heads without them are calibrated on held-out decision
    scores (SVM and ridge margins by a softmax temperature folded into the layer, which changes
    no prediction; see :func:`transferkit.heads.registry.fit_temperature`).
    """
    import keras

    from transferkit.heads import registry as heads
    from transferkit.heads.saving import save_head

    spec = heads.get_head(config.head)
    trval_idx = np.concatenate([train_idx, val_idx])
    counts = np.bincount(labels[trval_idx])
    # Calibration holds images out (cross-validation), so every class needs two; a linear head
    # can still serve softmax(decision scores) without it, said below.
    calibrate = not spec.linear or counts[counts > 0].min() >= 2
    fitted = heads.fit_head(config.head, features[trval_idx], labels[trval_idx], search=config.search,
                            seed=config.seed, calibrate=calibrate)
    log.info("Head %s fitted on %d images in %.1f s (%s).", config.head, len(trval_idx), fitted.fit_seconds_,
             ", ".join(f"{k.removeprefix('clf__')}={v}" for k, v in fitted.best_params_.items()) or "defaults")
    eval_features = features[eval_idx]
    info = {"head_params": {k.removeprefix("clf__"): v for k, v in fitted.best_params_.items()},
            "head_cv_accuracy": fitted.cv_score_, "head_fit_seconds": round(fitted.fit_seconds_, 3)}
    if spec.linear:
        if fitted.temperature_ is not None:
            info["head_calibration"] = (f"softmax temperature {fitted.temperature_:.4g}, fitted on held-out "
                                        "(cross-validated) decision scores")
            log.info("Head %s: decision scores calibrated into probabilities (%s).", config.head,
                     info["head_calibration"])
        elif not calibrate:
            fitted.temperature_ = 1.0  # a distribution still, but nothing held out to calibrate it on
            info["head_calibration"] = "none (a class has fewer than 2 training images): softmax of the decision scores"
            log.warning("WARNING: head %s: a class has fewer than 2 training images, so its probabilities are "
                        "the softmax of its decision scores, not calibrated.", config.head)
        layer = heads.keras_head_layer(fitted)
        outputs = np.asarray(layer(eval_features.astype(np.float32)))
        agreement = float(np.mean(outputs.argmax(1) == fitted.predict(eval_features)))
        if agreement < 1.0:
            raise TransferkitError(f"Folding head {config.head} into Keras changed {1 - agreement:.1%} of the "
                                   "predictions; please report this bug.")
        model = keras.Model(backbone.input, layer(backbone.output), name=f"transferkit_{config.head}")
        info.update(head_outputs="probabilities" if outputs.min() >= 0 and np.allclose(outputs.sum(1), 1, atol=1e-4)
                    else "decision scores", fold_agreement=agreement)
        return model, outputs, info
    scores, kind = fitted.scores(eval_features)
    save_head(fitted, run_dir / runs.HEAD_FILE, {
        "backbone": config.backbone, "image_size": int(backbone.input_shape[1]),
        "weights_id": FeatureSpec.for_model(get_backbone(config.backbone), backbone).weights_id,
        "class_names": list(class_names)})
    info.update(head_outputs="probabilities" if kind == "proba" else "decision scores")
    return backbone, scores, info


def _write_history(path: Path, rows: list[dict]) -> None:
    """``history.csv``: one row per epoch of every phase, numbered per phase."""
    columns = ["phase", "epoch"] + sorted({k for row in rows for k in row} - {"phase", "epoch"})
    files.write_csv(path, columns, [[row.get(c, "") for c in columns] for row in rows])
