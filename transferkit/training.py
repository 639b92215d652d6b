"""Train a classifier on a folder of images and write the run folder.

``freeze-all``: the backbone runs once per image (its pooled features come from the cache), a
softmax head trains on those features with early stopping, and the saved model is the backbone
and that same head in one flat graph that takes raw RGB pixels.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit import files, runs
from transferkit.backbones import BackboneSpec, check_image_size, get_backbone
from transferkit.cache import FeatureCache, FeatureSpec, default_cache_dir, extract_features
from transferkit.config import TrainConfig, save_config
from transferkit.data import ImageFolder, scan_folder, stable_fraction, write_splits_csv
from transferkit.errors import DataError, InputError
from transferkit.evaluation import classification_metrics, write_predictions
from transferkit.weights import ResolvedWeights, load_backbone, resolve_weights

log = logging.getLogger("transferkit")

#: Share of the training images held out for early stopping when the folder's own ``val/``
#: split serves as the test split.
EARLY_STOPPING_FRACTION = 0.15


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


def prepare_training(config: TrainConfig) -> TrainingPlan:
    """Check everything a run needs without TensorFlow: backbone, weights, input and output folders.

    A mistake fails here in seconds, never after extraction.

    Raises:
        InputError, WeightsError, DataError: with a message naming the option or file.
    """
    spec = get_backbone(config.backbone)
    image_size = check_image_size(spec, config.image_size)
    folder = scan_folder(config.image_dir, seed=config.seed, val_fraction=config.val_fraction,
                         test_fraction=config.test_fraction)
    # Weights may download (slow), so they come after the cheap checks and before any writing.
    weights = resolve_weights(spec, config.weights, image_size)
    assign_roles(folder, np.ones(len(folder.paths), dtype=bool), config.seed)  # split problems fail now
    run_dir = runs.prepare_output_dir(config.output_dir, config.overwrite)
    runs.check_writable_dir(config.cache_dir or default_cache_dir(), "--cache-dir")
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


def run_training(plan: TrainingPlan, *, verbose: int = 1) -> TrainResult:
    """Run a job checked by :func:`prepare_training` (see :func:`train`)."""
    started = time.perf_counter()
    config, spec, image_size, weights, folder, run_dir = (
        plan.config, plan.spec, plan.image_size, plan.weights, plan.folder, plan.run_dir)
    if weights.kind == "random":
        log.warning("WARNING: --weights none: the backbone is randomly initialised; expect poor accuracy.")
    log.info(
        "Found %d images in %d classes in %s (%s split), %d skipped, %d ignored.",
        len(folder.paths), len(folder.class_names), folder.root, folder.split_source,
        len(folder.skipped), folder.num_ignored,
    )
    for rel, reason in folder.skipped:
        log.warning("Skipped %s: %s", rel, reason)

    import keras

    keras.utils.set_random_seed(config.seed)
    log.info("Backbone %s at %d px, weights: %s", spec.name, image_size, weights.source)
    backbone = load_backbone(spec, weights, image_size)
    cache = FeatureCache(config.cache_dir or default_cache_dir(),
                         FeatureSpec.for_model(spec, backbone, config.cache_dtype))
    extraction = extract_features(
        backbone, [folder.abs_path(p) for p in folder.paths], cache, batch_size=config.batch_size, verbose=verbose
    )
    log.info("Features: %d images, %s.", len(folder.paths), extraction.summary())
    for rel, reason in extraction.skipped_files(folder.paths):
        log.warning("Skipped %s: %s", rel, reason)
    skipped = list(folder.skipped) + extraction.skipped_files(folder.paths)

    roles = assign_roles(folder, extraction.ok, config.seed)
    features, labels = extraction.vectors, folder.labels
    train_idx, val_idx, test_idx = (np.flatnonzero(roles == r) for r in ("train", "val", "test"))
    num_classes = len(folder.class_names)
    monitor = "val_loss" if len(val_idx) else "loss"
    fit_started = time.perf_counter()
    head, head_model = _compiled_head(keras, config, spec.feature_dim, num_classes, len(train_idx))
    history = head_model.fit(
        _feature_dataset(features, labels, train_idx, config, shuffle=True),
        validation_data=_feature_dataset(features, labels, val_idx, config) if len(val_idx) else None,
        epochs=config.epochs, verbose=2 if verbose >= 2 else 0, shuffle=False,  # the dataset shuffles
        callbacks=[
            keras.callbacks.EarlyStopping(monitor=monitor, patience=config.patience, restore_best_weights=True),
            keras.callbacks.CSVLogger(str(run_dir / runs.HISTORY_FILE)),
        ],
    )
    losses = history.history[monitor]
    best_epoch = int(np.argmin(losses)) + 1
    log.info("Head trained: %d epochs, best epoch %d (%s %.4f).", len(losses), best_epoch, monitor, min(losses))
    refit_epochs = 0
    # No refit when val is also the reported split (no test images): that would test on training data.
    if config.refit and len(val_idx) and len(test_idx):
        # Early stopping chose the epoch count; now use every labelled non-test image for it.
        # Measured with patience 10: +0.6 points on ants/bees, +3.6 on all sign digits (compare
        # benchmarks/head_defaults.py with and without refit=false).
        trval_idx = np.concatenate([train_idx, val_idx])
        head, head_model = _compiled_head(keras, config, spec.feature_dim, num_classes, len(trval_idx))
        head_model.fit(_feature_dataset(features, labels, trval_idx, config, shuffle=True),
                       epochs=best_epoch, verbose=0, shuffle=False)
        refit_epochs = best_epoch
        log.info("Refit on train + val (%d images) for %d epochs.", len(trval_idx), best_epoch)
    fit_seconds = time.perf_counter() - fit_started

    # The saved model reuses the very head layers trained above on the backbone's output: one
    # flat graph, raw pixels in, no weight copying that could drift.
    model = keras.Model(backbone.input, head(backbone.output), name=f"transferkit_{spec.name}")
    runs.save_model(model, run_dir / runs.MODEL_FILE)

    eval_idx = test_idx if len(test_idx) else val_idx
    eval_split = "test" if len(test_idx) else "val"
    probabilities = head_model.predict(features[eval_idx], verbose=0)
    test_metrics = classification_metrics(labels[eval_idx], probabilities, folder.class_names)
    test_metrics["split"] = eval_split

    run_folder = _with_roles(folder, roles)
    metrics = {
        "test": test_metrics,
        "backbone": spec.name,
        "image_size": image_size,
        "weights": weights.source,
        "strategy": config.strategy,
        "epochs_run": len(losses),
        "best_epoch": best_epoch,
        "refit_epochs": refit_epochs,
        "split_source": folder.split_source,
        "counts": run_folder.counts(),
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "num_ignored": folder.num_ignored,
        "extraction": {
            "images": len(folder.paths),
            "computed": extraction.num_computed,
            "cached": extraction.num_cached,
            "images_per_second": round(extraction.images_per_second, 2),
            "seconds": round(extraction.seconds, 2),
            "cache_dir": str(cache.dir),
        },
        "timings": {"fit_seconds": round(fit_seconds, 2), "total_seconds": round(time.perf_counter() - started, 2)},
    }
    runs.write_labels(run_dir / runs.LABELS_FILE, folder.class_names)
    save_config(config, run_dir / runs.CONFIG_FILE)
    write_splits_csv(run_folder, run_dir / runs.SPLITS_FILE)  # skipped images are in skipped.csv
    files.write_csv(run_dir / runs.SKIPPED_FILE, ["path", "reason"], skipped)
    write_predictions(run_dir / runs.PREDICTIONS_FILE, [folder.paths[i] for i in eval_idx], labels[eval_idx],
                      probabilities, folder.class_names)
    files.write_json(run_dir / runs.METRICS_FILE, metrics)
    return TrainResult(run_dir, metrics)


def _compiled_head(keras, config: TrainConfig, feature_dim: int, num_classes: int, num_train: int):
    """The softmax head as reusable layers, and a compiled model that trains them on features.

    The L2 penalty ``regularization / (2 * num_train) * ||W||^2`` on the mean loss is the penalty of
    scikit-learn's ``LogisticRegression(C=1 / regularization)``: with the defaults the head reaches
    the same optimum as that well-tested baseline (measured in benchmarks/head_defaults.py).
    """
    regularizer = keras.regularizers.L2(config.regularization / (2 * num_train)) if config.regularization else None
    layers = [keras.layers.Dropout(config.dropout, name="head_dropout"),
              keras.layers.Dense(num_classes, activation="softmax", kernel_regularizer=regularizer,
                                 name="predictions")]

    def head(x):
        for layer in layers:
            x = layer(x)
        return x

    features = keras.Input((feature_dim,), name="features")
    model = keras.Model(features, head(features), name="head")
    # Several steps per call: the head is tiny, so Keras' per-step overhead would dominate.
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], steps_per_execution=16)
    return head, model


def _feature_dataset(features: np.ndarray, labels: np.ndarray, index: np.ndarray, config: TrainConfig,
                     shuffle: bool = False):
    """Cached features as a tf.data pipeline (4-6x less per-epoch overhead than NumPy arrays in fit)."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((features[index], labels[index])).cache()
    if shuffle:
        dataset = dataset.shuffle(len(index), seed=config.seed, reshuffle_each_iteration=True)
    return dataset.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)


def assign_roles(folder: ImageFolder, ok: np.ndarray, seed: int) -> np.ndarray:
    """The role of each image in this run: ``train``, ``val`` (early stopping), ``test`` or ``skipped``.

    A folder split as ``train/`` + ``val/`` without ``test/`` uses its ``val/`` images as the test
    split, so the reported accuracy is on images that chose nothing (not even the epoch), and
    early stopping uses a stable share of ``train/`` instead (the same hash rule as the folder
    split).  ``train/`` + ``test/`` without ``val/`` carves early-stopping images the same way.
    """
    roles = np.array(folder.splits, dtype=object)
    if folder.split_source == "folders":
        if not (roles == "test").any():
            roles[roles == "val"] = "test"
        if not (roles == "val").any():
            for i, rel in enumerate(folder.paths):
                if roles[i] == "train" and stable_fraction(rel, seed) < EARLY_STOPPING_FRACTION:
                    roles[i] = "val"
    roles[~ok] = "skipped"
    train_classes = set(folder.labels[roles == "train"].tolist())
    missing = [folder.class_names[c] for c in range(len(folder.class_names)) if c not in train_classes]
    if missing:
        raise DataError(
            f"No training images for class(es) {', '.join(missing)} in '{folder.root}'. "
            "Add images to those class folders (at least 3 each), or remove the folders."
        )
    if not (roles == "test").any() and not (roles == "val").any():
        raise InputError(
            f"'{folder.root}' has too few images to hold any out for testing. Add images, or raise "
            "--val-fraction / --test-fraction."
        )
    return roles


def _with_roles(folder: ImageFolder, roles: np.ndarray) -> ImageFolder:
    """The folder with each image's role in this run as its split; skipped images left out."""
    import dataclasses

    keep = roles != "skipped"
    return dataclasses.replace(
        folder,
        paths=tuple(p for p, k in zip(folder.paths, keep, strict=True) if k),
        labels=folder.labels[keep],
        splits=tuple(str(r) for r in roles[keep]),
    )
