"""The default head on cached features: the exact L2-regularised softmax (multinomial logistic) optimum.

``transferkit train`` (freeze-all, and the head phase before fine-tuning) and ``transferkit
compare`` (its ``softmax`` arm) fit their head here, one definition for both. The head is
scikit-learn's ``LogisticRegression`` on the raw pooled features, found by Newton-CG to a tolerance of
1e-8 in float64: the optimum itself, not wherever an epoch count stopped. Its one setting, the L2
strength ``C``, is chosen by stratified k-fold cross-validation on the fitting images
(``LogisticRegressionCV``, warm starts along a log-spaced path, scored by held-out log-loss, which
is smooth where accuracy ties), then the head is refitted on all of them with that ``C`` and folded
into a Keras ``Dense(softmax)`` layer (:func:`transferkit.heads.registry.fold_linear_head`). The Keras
layers of that head are :mod:`transferkit.training.head`, the one head definition of every
strategy: the fine-tune phase trains the very same layers, penalty included.

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
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

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
