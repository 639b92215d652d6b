"""The default head on cached features: the exact L2-regularised softmax (multinomial logistic) optimum.

``transferkit train`` (freeze-all, and the head phase before fine-tuning) and ``transferkit
compare`` (its ``softmax`` arm) fit their head here, one definition for both. The head is
scikit-learn's ``LogisticRegression`` on the raw pooled features, found by Newton-CG to a tolerance of
1e-8 in float64: the optimum itself, not wherever an epoch count stopped. Its one setting, the L2
strength ``C``, is chosen by stratified k-fold cross-validation on the fitting images
(``LogisticRegressionCV``, warm starts along a log-spaced path, scored by held-out log-loss, which
is smooth where accuracy ties), then the head is refitted on all of them with that ``C`` and folded
into a Keras ``Dense(softmax)`` layer (:func:`transferkit.heads.registry.fold_linear_head`). The Keras
layers of that head (:func:`head_layers`) are the one head definition of every strategy: the
fine-tune phase trains the very same layers, penalty included.

Why this and not a Keras head trained with Adam and early stopping (still available as
``--head-solver adam``): on the same cached features the early-stopped head scored 0.915-0.948 on
ants/bees across seeds (mean 0.932), the exact cross-validated optimum 0.954-0.967 (README,
Results), with no epoch count, learning rate or patience to guess and the same model on every run.

No scaler: pooled ImageNet features are non-negative with a few strong channels, and
standardising them cost accuracy (measured: ants/bees 0.954 raw vs 0.935 standardised).

Nothing here imports TensorFlow at module level.

Example:
    >>> from sklearn.datasets import make_classification
    >>> X, y = make_classification(120, 16, n_informative=6, n_classes=3, random_state=0)
    >>> head = fit_exact_softmax(X, y, seed=0)
    >>> head.probabilities(X).shape, head.C in C_GRID
    ((120, 3), True)
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from transferkit.config import TrainConfig
from transferkit.errors import DataError

log = logging.getLogger("transferkit")

#: The regularisation path searched: C = 1 / regularization, half-decade steps. On pooled
#: MobileNet features the chosen C was 0.03-1 (ants/bees, sign digits); the ends leave room.
C_GRID = tuple(float(c) for c in np.logspace(-3, 2, 11))

#: Most cross-validation folds; fewer when the smallest class has fewer images.
MAX_FOLDS = 5

#: Tolerance of the final fit: the optimum to about 1e-5 in probability, so the folded head is the
#: same on every machine (scikit-learn's default 1e-4 leaves probabilities ~1e-2 from it).
FINAL_TOL = 1e-8


@dataclass
class ExactSoftmax:
    """A fitted exact softmax head.

    Attributes:
        estimator: the fitted ``LogisticRegression`` (columns of its scores follow ``classes``).
        C: the inverse L2 strength used (``1 / regularization``).
        chosen_by: ``"cross-validation"``, ``"given"`` (``--regularization``) or why no search ran.
        num_folds: folds of the search (0: none).
        curve: the cross-validation curve, one dict per grid point: ``C``, mean held-out
            ``log_loss`` and its standard deviation over the folds (empty without a search).
        fit_seconds: wall time of search and final fit.
    """

    estimator: object
    C: float
    chosen_by: str
    num_folds: int = 0
    curve: list[dict] = field(default_factory=list)
    fit_seconds: float = 0.0

    @property
    def classes(self) -> np.ndarray:
        return self.estimator.classes_

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        return self.estimator.predict_proba(np.asarray(features, dtype=np.float64))

    def kernel_bias(self) -> tuple[np.ndarray, np.ndarray]:
        """The Dense layer's ``(kernel, bias)``: its softmax is :meth:`probabilities`."""
        from transferkit.heads.registry import fold_linear_head

        return fold_linear_head(self.estimator)

    def info(self) -> dict:
        """What ``metrics.json`` records about the head (``head_fit``)."""
        return {"solver": "exact", "C": self.C, "regularization": 1 / self.C if self.C else None,
                "chosen_by": self.chosen_by, "cv_folds": self.num_folds, "cv_curve": self.curve,
                "fit_seconds": round(self.fit_seconds, 3)}


def fit_exact_softmax(features: np.ndarray, labels: np.ndarray, *, seed: int = 0, regularization: float | None = None,
                      class_weight: dict | None = None, num_folds: int = MAX_FOLDS,
                      groups: np.ndarray | None = None) -> ExactSoftmax:
    """Fit the exact L2-regularised softmax head, its ``C`` chosen by cross-validation.

    Args:
        features: ``(n, dim)`` fitting features (train + val, or train before fine-tuning).
        labels: ``(n,)`` class indices; every class of the model must occur.
        seed: shuffling of the stratified folds.
        regularization: a fixed L2 strength (``C = 1 / regularization``; 0 = none) instead of the
            search; None searches :data:`C_GRID`.
        groups: rows of one group stay in one fold (an image and its augmented views).
        class_weight: per-class loss weights (``--class-weight auto``).
        num_folds: at most this many folds (fewer when the smallest class has fewer images; no
            search below 2, and then ``C = 1``, said in ``chosen_by``).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    started = time.perf_counter()
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    smallest = int(np.bincount(y)[np.unique(y)].min()) if len(y) else 0
    folds = min(num_folds, smallest)
    curve: list[dict] = []
    if regularization is not None:
        C, chosen_by, folds = (1 / regularization if regularization else np.inf), "given", 0
    elif folds < 2:
        C, chosen_by, folds = 1.0, "default C = 1 (a class has fewer than 2 images: nothing to cross-validate)", 0
    else:
        losses = cross_validated_losses(x, y, folds, seed, class_weight, groups)
        searched = ~np.isnan(losses[0])
        mean, std = losses[:, searched].mean(axis=0), losses[:, searched].std(axis=0)
        C, chosen_by = C_GRID[int(np.argmin(mean))], "cross-validation"
        curve = [{"C": c, "log_loss": round(float(m), 5), "log_loss_std": round(float(s), 5)}
                 for c, m, s in zip(np.array(C_GRID)[searched], mean, std, strict=True)]
    # Newton-CG to FINAL_TOL in float64: 7 s on 2,062 x 1,280 features, where L-BFGS needed 54 s to
    # reach 1e-6. Without a penalty the optimum may not exist (separable classes): a looser tolerance.
    estimator = LogisticRegression(C=C, solver="newton-cg", max_iter=1000, tol=FINAL_TOL if np.isfinite(C) else 1e-4,
                                   class_weight=class_weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # only without a penalty, on separable data
        estimator.fit(x, y)
    return ExactSoftmax(estimator, float(C), chosen_by, folds, curve, time.perf_counter() - started)


def cross_validated_losses(x: np.ndarray, y: np.ndarray, folds: int, seed: int,
                           class_weight: dict | None = None, groups: np.ndarray | None = None) -> np.ndarray:
    """Held-out log-loss of each fold (rows) at each ``C`` of :data:`C_GRID` (columns).

    The folds walk the grid together from the strongest penalty to the weakest, each with warm
    starts (the previous optimum starts the next fit), by Newton-CG in float32 to a tolerance of
    1e-5: the held-out losses agree with L-BFGS at 1e-6 to about 1e-3. Measured on 2,062 x 1,280
    sign-digits features, one fold's path of 11 points: 6 s, against 15 s for L-BFGS at 1e-4
    (float32) and 4 minutes at 1e-6 (float64): pooled ImageNet features are ill-conditioned (a
    few strong channels), which L-BFGS pays for in iterations and Newton-CG does not. The walk
    stops once the mean held-out loss has risen at two grid points in a row past its minimum (the
    curve is unimodal in practice, and the weakest penalties are the slowest fits); those columns
    are NaN.

    Written here rather than with ``LogisticRegressionCV``, whose fitted attributes change
    shape across scikit-learn 1.9-1.10 (it warns about it) and which cannot stop the path early.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    x = np.asarray(x, dtype=np.float32)
    classes = np.unique(y)
    if groups is None:
        splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y))
    else:
        splits = list(StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(x, y, groups))
    models = [LogisticRegression(solver="newton-cg", max_iter=1000, tol=1e-5, warm_start=True,
                                 class_weight=class_weight) for _ in splits]
    losses = np.full((folds, len(C_GRID)), np.nan)
    rises = 0
    for column, c in enumerate(C_GRID):
        for fold, ((fit, held_out), model) in enumerate(zip(splits, models, strict=True)):
            with warnings.catch_warnings():
                # Weak penalties on separable folds converge slowly; their held-out loss is what
                # counts here, and it shows them worse. The final fit is to FINAL_TOL.
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.set_params(C=c).fit(x[fit], y[fit])
            losses[fold, column] = log_loss(y[held_out], model.predict_proba(x[held_out]), labels=classes)
        mean = losses[:, : column + 1].mean(axis=0)
        rises = rises + 1 if column and mean[column] > mean[column - 1] else 0
        if rises >= 2 and mean[column] > mean.min():
            break
    return losses


#: Shares of each cross-validation training fold the ``auto`` learning curve trains on.
LEARNING_CURVE_SHARES = (0.25, 0.5, 1.0)


def learning_curve(features: np.ndarray, labels: np.ndarray, C: float, *, seed: int = 0,
                   num_folds: int = MAX_FOLDS) -> tuple[tuple[float, float], ...]:
    """The exact head's cross-validated accuracy at ``C`` when trained on growing shares of each
    training fold (scikit-learn's ``learning_curve``): ``((share, accuracy), ...)``.

    A share whose subsample misses a class in some fold scores the other folds only.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.model_selection import learning_curve as sk_learning_curve

    y = np.asarray(labels)
    folds = min(num_folds, int(np.bincount(y)[np.unique(y)].min()))
    if folds < 2:
        return ()
    estimator = LogisticRegression(C=C, solver="newton-cg", tol=1e-5, max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a subsample that misses a class scores NaN, said above
        _, _, held_out = sk_learning_curve(
            estimator, np.asarray(features, dtype=np.float32), y, train_sizes=list(LEARNING_CURVE_SHARES),
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed), scoring="accuracy", shuffle=True,
            random_state=seed, error_score=np.nan, n_jobs=1)
    return tuple((share, float(np.nanmean(scores))) for share, scores in zip(LEARNING_CURVE_SHARES, held_out,
                                                                              strict=True)
                 if np.isfinite(scores).any())


def auto_evidence(features: np.ndarray, labels: np.ndarray, *, seed: int, seconds_per_epoch: float,
                  fine_tune_epochs: int, setup_seconds: float = 0.0, class_weight: dict | None = None):
    """What ``--strategy auto`` decides from (:class:`transferkit.training.strategies.AutoEvidence`): the
    exact head's C by cross-validation on ``features`` (train + val), its learning curve at that
    C, and the fine-tune cost estimate passed in."""
    from transferkit.training.strategies import AutoEvidence

    head = fit_exact_softmax(features, labels, seed=seed, class_weight=class_weight)
    curve = learning_curve(features, labels, head.C, seed=seed)
    if len(curve) >= 2:
        slope = float(np.polyfit(np.log2([share for share, _ in curve]), [acc for _, acc in curve], 1)[0])
    else:
        slope = 0.0
    cv_accuracy = curve[-1][1] if curve else float("nan")
    return AutoEvidence(cv_accuracy, curve, slope, seconds_per_epoch, fine_tune_epochs, setup_seconds)


# ----------------------------------------------------------------------------- the Keras head


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
