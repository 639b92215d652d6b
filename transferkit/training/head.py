"""THE Keras head: one definition of the softmax layers every strategy trains and saves.

Freeze-all fits these layers on cached features (:func:`fit_softmax_head`: by default the exact
optimum of :func:`transferkit.heads.softmax.fit_exact_softmax`, folded into the layer; ``--head-solver
adam`` trains them with Adam and early stopping); fine-tuning trains the very same layers, L2 penalty
included; the model rebuilt under ``--mixed-precision`` or ``--distribute`` rebuilds them from their
config (:func:`head_layers`). ``transferkit compare``'s ``softmax`` arm is this head too.

Nothing here imports TensorFlow at module level.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from transferkit.config import TrainConfig
from transferkit.errors import DataError
from transferkit.heads.softmax import fit_exact_softmax

log = logging.getLogger("transferkit")


@dataclass
class SoftmaxHead:
    """A softmax head fitted on cached features by :func:`fit_softmax_head`.

    Attributes:
        head: applies the fitted layers to a Keras tensor (``head(backbone.output)``).
        model: a Keras model of those layers, features in, probabilities out.
        info: how it was fitted, for ``metrics.json`` (``head_fit``): the solver, and the chosen
            ``C`` with its cross-validation curve (exact) or the epoch counts (adam).
        history: one dictionary per epoch (adam; empty for the exact head, which has no epochs).
    """

    head: Callable
    model: object
    info: dict
    fit_seconds: float
    history: list[dict]

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.model.predict(features, verbose=0, batch_size=1024)


def fit_softmax_head(features: np.ndarray, labels: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                     test_idx: np.ndarray, config: TrainConfig, *, history_path: str | os.PathLike | None = None,
                     class_weight: dict | None = None, verbose: int = 0,
                     extra_callbacks: list | None = None, groups: np.ndarray | None = None) -> SoftmaxHead:
    """The softmax head on cached features, as ``config.head_solver`` fits it; ``train`` and
    ``compare`` both fit theirs here. ``groups`` (one per row of ``features``): rows of one image
    (its augmented views, :func:`transferkit.cache.views.view_groups`) stay in one cross-validation fold.

    ``exact`` (the default): :func:`transferkit.heads.softmax.fit_exact_softmax` on train + val when
    ``config.refit`` (and a test split is reported), else on train only, its ``C`` chosen by
    cross-validation on those images (or ``config.regularization``).
    ``adam``: the Keras head, early-stopped on ``val_idx`` and refitted (``config.refit``) on
    train + val for the best epoch count; ``history_path`` and ``extra_callbacks`` (e.g.
    ``--tensorboard``'s) join its fit.

    No refit when there is no test split: val is then the reported split, and fitting on it would
    test on training data.
    """
    if config.head_solver == "adam":
        return _fit_adam_head(features, labels, train_idx, val_idx, test_idx, config, history_path=history_path,
                              class_weight=class_weight, verbose=verbose, extra_callbacks=extra_callbacks)
    import keras

    fit_idx = np.concatenate([train_idx, val_idx]) if refits(config, val_idx, test_idx) else train_idx
    num_classes = max(int(labels.max()) + 1 if len(labels) else 0, len(np.unique(labels)))
    exact = fit_exact_softmax(features[fit_idx], labels[fit_idx], seed=config.seed,
                              regularization=config.regularization, class_weight=class_weight,
                              groups=None if groups is None else groups[fit_idx])
    if len(exact.classes) != num_classes:  # every class has training images (assign_roles checks it)
        raise DataError(f"The head's training images hold {len(exact.classes)} of {num_classes} classes.")
    head, model = head_layers(keras, config, features.shape[1], num_classes,
                               1 / exact.C if np.isfinite(exact.C) else 0.0, len(fit_idx))
    model.get_layer("predictions").set_weights([w.astype(np.float32) for w in exact.kernel_bias()])
    info = {**exact.info(), "images": len(fit_idx)}
    log.info("Head fitted exactly on %d images in %.1f s: C = %g (%s%s).", len(fit_idx), exact.fit_seconds, exact.C,
             exact.chosen_by, f", {exact.num_folds} folds" if exact.num_folds else "")
    return SoftmaxHead(head, model, info, exact.fit_seconds, [])


def head_val_loss(head: SoftmaxHead, features: np.ndarray, labels: np.ndarray, val_idx: np.ndarray) -> float | None:
    """The head's validation loss as the fine-tune phase measures its own (cross-entropy plus the
    head's L2 penalty, by Keras): the baseline fine-tuning must beat. None without val images."""
    if not len(val_idx):
        return None
    head.model.compile(loss="sparse_categorical_crossentropy")
    return float(head.model.evaluate(features[val_idx], labels[val_idx], verbose=0, batch_size=1024))


def _fit_adam_head(features, labels, train_idx, val_idx, test_idx, config: TrainConfig, *, history_path,
                   class_weight, verbose, extra_callbacks) -> SoftmaxHead:
    """``--head-solver adam``: the Keras head trained with Adam, early-stopped on ``val_idx``, then
    (``config.refit``) refitted on train + val for the best epoch count."""
    import keras

    started = time.perf_counter()
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    num_classes = max(num_classes, len(np.unique(labels)))
    feature_dim = features.shape[1]
    monitor = "val_loss" if len(val_idx) else "loss"
    config = config.replace(regularization=1.0) if config.regularization is None else config
    head, head_model = _compiled_head(keras, config, feature_dim, num_classes, len(train_idx))
    callbacks = [keras.callbacks.EarlyStopping(monitor=monitor, patience=config.patience, restore_best_weights=True)]
    if history_path is not None:
        callbacks.append(keras.callbacks.CSVLogger(str(history_path)))
    callbacks += extra_callbacks or []
    fitted = head_model.fit(
        _feature_dataset(features, labels, train_idx, config, shuffle=True),
        validation_data=_feature_dataset(features, labels, val_idx, config) if len(val_idx) else None,
        epochs=config.epochs, verbose=2 if verbose >= 2 else 0, shuffle=False,  # the dataset shuffles
        class_weight=class_weight, callbacks=callbacks,
    )
    losses = fitted.history[monitor]
    best_epoch = int(np.argmin(losses)) + 1
    rows = [{"epoch": i, **{k: float(v[i]) for k, v in fitted.history.items()}} for i in range(len(losses))]
    log.info("Head trained: %d epochs, best epoch %d (%s %.4f).", len(losses), best_epoch, monitor, min(losses))
    refit_epochs = 0
    if refits(config, val_idx, test_idx):
        # Early stopping chose the epoch count; now use every labelled non-test image for it.
        trval_idx = np.concatenate([train_idx, val_idx])
        head, head_model = _compiled_head(keras, config, feature_dim, num_classes, len(trval_idx))
        head_model.fit(_feature_dataset(features, labels, trval_idx, config, shuffle=True),
                       epochs=best_epoch, verbose=0, shuffle=False, class_weight=class_weight)
        refit_epochs = best_epoch
        log.info("Refit on train + val (%d images) for %d epochs.", len(trval_idx), best_epoch)
    info = {"solver": "adam", "epochs_run": len(losses), "best_epoch": best_epoch, "refit_epochs": refit_epochs,
            "regularization": config.regularization}
    return SoftmaxHead(head, head_model, info, time.perf_counter() - started, rows)


def refits(config: TrainConfig, val_idx: np.ndarray, test_idx: np.ndarray) -> bool:
    """Whether the final head is refitted on train + val: ``--refit`` (the default), and only when a
    test split is reported (refitting on val would otherwise test on training data)."""
    return bool(config.refit and len(val_idx) and len(test_idx))


def head_layers(keras, config: TrainConfig, feature_dim: int, num_classes: int, regularization: float | None,
                 num_train: int):
    """The softmax head as reusable layers (dropout, then ``Dense(softmax)`` named ``predictions``),
    and an uncompiled model of them on features: the one head definition of every strategy.

    The L2 penalty ``regularization / (2 * num_train) * ||W||^2`` on the mean loss is the penalty of
    scikit-learn's ``LogisticRegression(C=1 / regularization)`` on ``num_train`` images, so a
    fine-tune phase after the exact head continues the objective that head solved.
    """
    regularizer = keras.regularizers.L2(regularization / (2 * num_train)) if regularization else None
    layers = [keras.layers.Dropout(config.dropout, name="head_dropout"),
              keras.layers.Dense(num_classes, activation="softmax", kernel_regularizer=regularizer,
                                 name="predictions")]

    def head(x):
        for layer in layers:
            x = layer(x)
        return x

    features = keras.Input((feature_dim,), name="features")
    return head, keras.Model(features, head(features), name="head")


def _compiled_head(keras, config: TrainConfig, feature_dim: int, num_classes: int, num_train: int):
    """The head of :func:`head_layers`, compiled to train on features with Adam (``--head-solver adam``)."""
    head, model = head_layers(keras, config, feature_dim, num_classes, config.regularization, num_train)
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
