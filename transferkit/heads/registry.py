"""scikit-learn heads on bottleneck features: registry, fitting, folding into Keras.

A *head* is a scikit-learn classifier trained on the pooled features of a frozen backbone. Each
registry entry is a ``Pipeline`` (with a ``StandardScaler`` where the estimator is sensitive to
feature scale) plus a small hyper-parameter grid, searched by stratified cross-validation on the
training features only. Linear heads (``linear-svm``, ``logreg``, ``ridge``) fold, scaler
included, into one Keras ``Dense`` layer, so they export and serve exactly like the softmax head;
SVM and ridge margins are no probabilities, so calibrating them fits a softmax temperature on
held-out margins that folds into the same layer (:func:`fit_temperature`).
Fitted heads are saved with skops (no pickle), with the backbone identity in a JSON sidecar
(:mod:`transferkit.heads.saving`).

Nothing here imports TensorFlow at module level.

Example:
    >>> from sklearn.datasets import make_classification
    >>> X, y = make_classification(90, 16, n_informative=6, n_classes=3, random_state=0)
    >>> head = fit_head("logreg", X, y, search=False)
    >>> scores, kind = head_scores(head.estimator_, X)
    >>> scores.shape, kind
    ((90, 3), 'proba')
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.validation import check_is_fitted

from transferkit.errors import DataError, InputError
from transferkit.progress import SearchProgress

#: Most cross-validation folds a search uses; fewer when the smallest class has fewer images.
MAX_FOLDS = 5

@dataclass(frozen=True)
class HeadSpec:
    """One registry entry.

    Attributes:
        name: the kebab-case name users type (``linear-svm``).
        description: one line for listings.
        build: ``seed -> unfitted Pipeline`` whose last step is named ``"clf"``.
        grid: the default search grid, in ``Pipeline`` parameter names (``clf__C``).
        linear: whether :func:`fold_linear_head` can turn it into a Dense layer.
    """

    name: str
    description: str
    build: Callable[[int], Pipeline]
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    linear: bool = False


def _scaled(estimator) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("clf", estimator)])


HEADS: dict[str, HeadSpec] = {
    spec.name: spec
    for spec in (
        # No scaler: on pooled ImageNet features (non-negative, few strong channels) standardising
        # lifts near-silent channels to unit variance and costs accuracy. Measured on mobilenet_v2
        # features, 5-fold CV on train + val: sign digits 0.929 raw vs 0.913 scaled (best C each),
        # ants/bees 0.959 vs 0.955. Grid: the best C was 0.003 (ants/bees) and 0.01 (sign digits);
        # 0.1 was never better and is the slowest to converge, so it is left out.
        # dual=True: on a few thousand ~1000-d features liblinear's dual solver is ~10x faster
        # than the primal one "auto" picks when rows outnumber features.
        HeadSpec("linear-svm", "linear support vector machine (LinearSVC)",
                 lambda seed: Pipeline([("clf", LinearSVC(C=0.01, dual=True, max_iter=2000, random_state=seed))]),
                 {"clf__C": [0.003, 0.01]}, linear=True),
        HeadSpec("rbf-svm", "RBF-kernel support vector machine (SVC)",
                 lambda seed: _scaled(SVC(C=10.0, gamma="scale", random_state=seed)),
                 {"clf__C": [1.0, 10.0]}),
        HeadSpec("logreg", "multinomial logistic regression",
                 # Scaled: without it lbfgs needs 40-100x longer on raw pooled features. C=10 was never
                 # chosen on the measured sets (best: 0.01) and only costs search time.
                 lambda seed: _scaled(LogisticRegression(C=0.1, max_iter=2000, random_state=seed)),
                 {"clf__C": [0.01, 0.1, 1.0]}, linear=True),
        # Scaled because Euclidean distance on raw features is dominated by a few large channels.
        # k: the CV optimum was 9 (sign digits) and 15 (ants/bees), k <= 5 was 2-3 points worse.
        HeadSpec("knn", "k nearest neighbours (Euclidean, distance-weighted)",
                 lambda seed: _scaled(KNeighborsClassifier(n_neighbors=9, weights="distance")),
                 {"clf__n_neighbors": [3, 9, 15, 25]}),
        HeadSpec("ridge", "ridge-regression classifier (one-vs-rest least squares)",
                 # alpha: the CV optimum was 1000 (sign digits) and 3000 (ants/bees) on ~1000-d features; the
                 # default (no search) stays lower because the penalty is not scaled by the number of images.
                 lambda seed: _scaled(RidgeClassifier(alpha=100.0)),
                 {"clf__alpha": [100.0, 1000.0, 3000.0]}, linear=True),
        # Trees are scale-invariant: no scaler. One job: the machine's cores are shared.
        HeadSpec("random-forest", "random forest of 200 trees",
                 lambda seed: Pipeline([("clf", RandomForestClassifier(n_estimators=200, n_jobs=1,
                                                                       random_state=seed))]),
                 {"clf__max_features": ["sqrt", "log2"]}),
        HeadSpec("mlp", "one-hidden-layer perceptron (256 units)",
                 lambda seed: _scaled(MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, max_iter=300,
                                                    random_state=seed)),
                 {"clf__alpha": [1e-4, 1e-2]}),
    )
}


def get_head(name: str) -> HeadSpec:
    """The registry entry for a name (case-insensitive, ``_`` accepted for ``-``).

    Raises:
        InputError: unknown name; the message suggests the closest names and lists them all.

    Example:
        >>> get_head("Linear_SVM").name
        'linear-svm'
    """
    key = str(name).strip().lower().replace("_", "-")
    if key in HEADS:
        return HEADS[key]
    close = difflib.get_close_matches(key, HEADS, n=2, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise InputError(f"Unknown head '{name}'.{hint} Allowed: {', '.join(HEADS)}.")


def make_head(name: str, search: bool = True, seed: int = 0, num_folds: int = MAX_FOLDS):
    """An unfitted head: the registry ``Pipeline``, wrapped in ``GridSearchCV`` when ``search``.

    Args:
        name: a key of :data:`HEADS`.
        search: wrap in a stratified grid search over the entry's default grid.
        seed: random state of the estimator and of the fold shuffling.
        num_folds: cross-validation folds (:func:`fit_head` lowers it to fit the smallest class).

    Example:
        >>> make_head("ridge", search=False).steps[-1][1]
        RidgeClassifier(alpha=100.0)
    """
    spec = get_head(name)
    pipeline = spec.build(seed)
    if not search or not spec.grid:
        return pipeline
    cv = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    # error_score="raise": a grid point that cannot fit is a bug to see, not a silent NaN.
    return GridSearchCV(pipeline, dict(spec.grid), cv=cv, scoring="accuracy", n_jobs=1, error_score="raise")


@dataclass
class FittedHead:
    """A head fitted by :func:`fit_head`.

    Attributes:
        name: registry name.
        estimator_: what to score with: the fitted pipeline, or a ``CalibratedClassifierCV``
            around it when calibration was asked for.
        best_params_: the chosen grid point (the defaults' values when there was no search).
        fit_seconds_: wall time of search, refit and calibration.
        num_folds_: cross-validation folds of the search (0 = no search).
        cv_score_: mean cross-validated accuracy of the best grid point (None without search).
        temperature_: for a calibrated linear head without probabilities (``linear-svm``,
            ``ridge``): its probabilities are ``softmax(logits / temperature_)``, the logits being
            the folded decision scores (:func:`fit_temperature`); None otherwise.
    """

    name: str
    estimator_: Any
    best_params_: dict[str, Any]
    fit_seconds_: float
    num_folds_: int = 0
    cv_score_: float | None = None
    temperature_: float | None = None

    @property
    def pipeline_(self) -> Pipeline:
        """The uncalibrated fitted pipeline: its decision rule is what :meth:`predict` and folding use."""
        return base_pipeline(self.estimator_)

    @property
    def classes_(self) -> np.ndarray:
        return self.pipeline_.classes_

    def predict(self, X) -> np.ndarray:
        """Class labels by the pipeline's own rule (calibration changes scores, not decisions)."""
        return self.pipeline_.predict(X)

    def scores(self, X) -> tuple[np.ndarray, str]:
        """See :func:`head_scores`; a head with a temperature gives its calibrated probabilities."""
        scores, kind = head_scores(self.estimator_, X)
        if self.temperature_ is None or kind == "proba":
            return scores, kind
        from scipy.special import softmax

        return softmax(scores / self.temperature_, axis=1), "proba"


def base_pipeline(estimator) -> Pipeline:
    """The fitted pipeline inside a calibrated head (or the estimator itself)."""
    if isinstance(estimator, CalibratedClassifierCV):
        # ensemble=False: one calibrated classifier whose estimator was refitted on all the data.
        return estimator.calibrated_classifiers_[0].estimator
    return estimator


def fit_head(name: str, X, y, search: bool = True, seed: int = 0, calibrate: bool = False) -> FittedHead:
    """Fit a head on training features, with its grid search and optional calibration.

    The search uses ``min(MAX_FOLDS, smallest class count)`` stratified folds and is skipped
    (defaults used) when a class has fewer than 2 images. ``calibrate`` gives heads without
    probabilities calibrated ones from out-of-fold decision scores: a softmax temperature for the
    linear ones (``linear-svm``, ``ridge``; it folds into their Dense layer and leaves every
    decision as it was), sigmoid calibration for ``rbf-svm``. The decision rule itself is the
    pipeline refitted on all of ``X``.

    Args:
        name: a key of :data:`HEADS`.
        X: ``(n, feature_dim)`` training features.
        y: ``(n,)`` labels.
        search: search the default grid.
        seed: random state.
        calibrate: add calibrated probabilities where the head has none.

    Example:
        >>> from sklearn.datasets import make_classification
        >>> X, y = make_classification(60, 8, random_state=0)
        >>> fit_head("linear-svm", X, y, calibrate=True).scores(X)[1]
        'proba'
    """
    spec = get_head(name)
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2 or len(X) != len(y):
        raise InputError(f"Expected features of shape (n, feature_dim) and n labels, got {X.shape} and {y.shape}.")
    _, counts = np.unique(y, return_counts=True)
    if len(counts) < 2:
        raise DataError(f"A head needs at least 2 classes in the training features, got {len(counts)}.")
    num_folds = int(min(MAX_FOLDS, counts.min())) if counts.min() >= 2 else 0
    start = time.perf_counter()
    searching = search and num_folds >= 2
    model = make_head(spec.name, search=searching, seed=seed, num_folds=max(num_folds, 2))
    # A search fold trains on about (k-1)/k of the rows; the refit and calibration on all of them.
    _fit_to_size(model, len(y) - -(-len(y) // num_folds) if searching else len(y))
    if isinstance(model, GridSearchCV):
        SearchProgress.attach(model, spec.name, len(y))  # a search can take minutes: say how far it is
    model.fit(X, y)
    if isinstance(model, GridSearchCV):
        pipeline, best, cv_score, used_folds = model.best_estimator_, dict(model.best_params_), \
            float(model.best_score_), num_folds
    else:
        pipeline, cv_score, used_folds = model, None, 0
        best = {key: pipeline.get_params()[key] for key in spec.grid}
    estimator, temperature = pipeline, None
    if calibrate and not hasattr(pipeline, "predict_proba"):
        if num_folds < 2:
            raise DataError("Cannot calibrate: every class needs at least 2 training images "
                            f"(smallest has {counts.min()}). Train without calibration.")
        cv = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
        if spec.linear:
            temperature = fit_temperature(pipeline, X, y, cv)
        else:
            estimator = CalibratedClassifierCV(clone(pipeline), method="sigmoid", cv=cv, ensemble=False).fit(X, y)
    return FittedHead(spec.name, estimator, best, time.perf_counter() - start, used_folds, cv_score, temperature)


def fit_temperature(pipeline, X, y, cv) -> float:
    """The softmax temperature that turns a fitted linear head's decision scores into calibrated probabilities.

    Temperature scaling (Guo et al., 2017): ``softmax(logits / T)`` with the one ``T`` that
    minimises the log-loss of held-out logits, here each image's decision scores from the fold
    that did not train on it (``cross_val_predict``, the pipeline's own settings). One positive
    scalar changes no argmax, so the head decides exactly as before (accuracy unchanged), and it
    folds into the Dense layer (kernel and bias divided by ``T``), so the exported model outputs
    probabilities. The logits are those of :func:`fold_linear_head` (``[-d/2, d/2]`` for a binary
    head, whose softmax is then Platt's ``sigmoid(d / T)``).

    Returns:
        ``T`` > 0 (below 1 sharpens margins such as an SVM's, which sit near +-1).

    Example:
        >>> from sklearn.datasets import make_classification
        >>> X, y = make_classification(60, 8, random_state=0)
        >>> head = fit_head("ridge", X, y, search=False)
        >>> fit_temperature(head.pipeline_, X, y, StratifiedKFold(3)) > 0
        True
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax
    from sklearn.model_selection import cross_val_predict

    decision = np.asarray(cross_val_predict(clone(pipeline), X, y, cv=cv, method="decision_function"), np.float64)
    logits = np.column_stack([-decision / 2, decision / 2]) if decision.ndim == 1 else decision
    target = np.searchsorted(np.unique(y), y)  # columns follow the sorted classes, as classes_ does
    rows = np.arange(len(target))

    def log_loss(log_inverse: float) -> float:
        return float(-log_softmax(logits * np.exp(log_inverse), axis=1)[rows, target].mean())

    # The log-loss is convex in 1 / T; searched on its logarithm, within T = e^-12 .. e^12, so
    # held-out margins that separate every image cannot push T to zero.
    best = minimize_scalar(log_loss, bounds=(-12.0, 12.0), method="bounded")
    return float(np.exp(-best.x))


def _fit_to_size(model, num_train: int) -> None:
    """Keep k of kNN below the number of training rows (of a fold), where larger k cannot fit."""
    if isinstance(model, GridSearchCV):
        grid = model.param_grid
        if "clf__n_neighbors" in grid:
            allowed = [k for k in grid["clf__n_neighbors"] if k <= num_train] or [1]
            model.set_params(param_grid={**grid, "clf__n_neighbors": allowed})
        model = model.estimator
    if "clf__n_neighbors" in model.get_params():
        model.set_params(clf__n_neighbors=min(model.get_params()["clf__n_neighbors"], max(num_train, 1)))


def head_scores(estimator, X) -> tuple[np.ndarray, str]:
    """Per-class scores for top-k accuracy and reports: probabilities where the head has them.

    Returns:
        ``(scores, kind)``: ``(n, num_classes)`` scores in ``estimator.classes_`` order, and
        ``"proba"`` or ``"decision"``. A binary decision function ``d`` becomes the columns
        ``[-d/2, d/2]``, exactly the logits of the folded Keras layer (whose argmax is sklearn's
        ``predict`` and whose softmax is logistic regression's ``predict_proba``).

    Example:
        >>> from sklearn.datasets import make_classification
        >>> X, y = make_classification(40, 5, random_state=0)
        >>> head_scores(fit_head("ridge", X, y, search=False).estimator_, X)[0].shape
        (40, 2)
    """
    if hasattr(estimator, "predict_proba"):
        return np.asarray(estimator.predict_proba(X)), "proba"
    scores = np.asarray(estimator.decision_function(X), dtype=np.float64)
    if scores.ndim == 1:
        scores = np.column_stack([-scores / 2, scores / 2])
    return scores, "decision"


# ----------------------------------------------------------------------------- folding into Keras


def fold_linear_head(pipeline) -> tuple[np.ndarray, np.ndarray]:
    """The ``(kernel, bias)`` of a Dense layer equal to a fitted linear pipeline's decision function.

    The scaler folds in: ``((x - mean) / scale) @ W.T + b == x @ (W / scale).T + (b - (mean / scale) @ W.T)``.
    Columns follow ``classes_``. A binary head (one decision column ``d``) becomes two columns
    ``[-d/2, d/2]``: the argmax is sklearn's ``predict`` and the softmax is ``sigmoid(d)``,
    logistic regression's probability.

    Args:
        pipeline: a fitted ``linear-svm``, ``logreg`` or ``ridge`` head (a ``FittedHead``, its
            calibrated estimator or the pipeline itself).

    Returns:
        ``kernel`` ``(feature_dim, num_classes)`` and ``bias`` ``(num_classes,)``, float64.

    Raises:
        InputError: the head is not linear or contains a step other than StandardScaler.

    Example:
        >>> from sklearn.datasets import make_classification
        >>> X, y = make_classification(60, 8, n_informative=4, n_classes=3, random_state=0)
        >>> head = fit_head("ridge", X, y, search=False)
        >>> kernel, bias = fold_linear_head(head)
        >>> bool(np.allclose(X @ kernel + bias, head.pipeline_.decision_function(X)))
        True
    """
    pipeline = base_pipeline(pipeline.estimator_ if isinstance(pipeline, FittedHead) else pipeline)
    steps = pipeline.steps if isinstance(pipeline, Pipeline) else [("clf", pipeline)]
    clf = steps[-1][1]
    if not isinstance(clf, LinearSVC | LogisticRegression | RidgeClassifier):
        linear = ", ".join(name for name, spec in HEADS.items() if spec.linear)
        raise InputError(f"Only linear heads fold into a Dense layer (allowed: {linear}); got {type(clf).__name__}.")
    check_is_fitted(clf)
    # (num_outputs, dim); a binary RidgeClassifier stores its one row as a 1-D coef_.
    weight = np.atleast_2d(np.asarray(clf.coef_, dtype=np.float64))
    bias = np.broadcast_to(np.asarray(clf.intercept_, dtype=np.float64), (weight.shape[0],)).copy()
    for name, step in reversed(steps[:-1]):
        if step is None or step == "passthrough":
            continue
        if not isinstance(step, StandardScaler):
            raise InputError(f"Cannot fold pipeline step '{name}' ({type(step).__name__}); only StandardScaler folds.")
        scale = np.ones(weight.shape[1]) if step.scale_ is None else np.asarray(step.scale_, dtype=np.float64)
        mean = np.zeros(weight.shape[1]) if step.mean_ is None else np.asarray(step.mean_, dtype=np.float64)
        weight = weight / scale
        bias = bias - weight @ mean
    if weight.shape[0] == 1:
        weight = np.vstack([-weight / 2, weight / 2])
        bias = np.array([-bias[0] / 2, bias[0] / 2])
    return weight.T.copy(), bias


def keras_head_layer(pipeline, name: str = "predictions"):
    """A built Keras Dense layer computing a linear head: probabilities where the head has them.

    ``logreg`` gives ``predict_proba`` (multinomial, or binary via ``[-d/2, d/2]``); a calibrated
    SVM or ridge head (``fit_head(..., calibrate=True)``) gives ``softmax(decision / T)``, its
    temperature folded into the kernel and bias. An SVM or ridge head fitted without calibration
    gives its raw decision scores (linear activation), which are no probabilities. The argmax is
    always sklearn's ``predict``.

    Example:
        >>> layer = keras_head_layer(fit_head("logreg", X, y, search=False))  # doctest: +SKIP
        >>> layer(X.astype("float32")).shape  # doctest: +SKIP
        (60, 3)
    """
    import keras

    kernel, bias = fold_linear_head(pipeline)
    clf = base_pipeline(pipeline.estimator_ if isinstance(pipeline, FittedHead) else pipeline)
    clf = clf.steps[-1][1] if isinstance(clf, Pipeline) else clf
    temperature = pipeline.temperature_ if isinstance(pipeline, FittedHead) else None
    if temperature is not None and not isinstance(clf, LogisticRegression):
        kernel, bias = kernel / temperature, bias / temperature  # softmax(logits / T), folded
    activation = "softmax" if isinstance(clf, LogisticRegression) or temperature is not None else "linear"
    layer = keras.layers.Dense(kernel.shape[1], activation=activation, name=name, dtype="float32")
    layer.build((None, kernel.shape[0]))
    layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return layer


def attach_head(backbone, pipeline, name: str = "predictions"):
    """One flat Keras model: the backbone (raw pixels in) with a folded linear head on its output.

    Example:
        >>> model = attach_head(backbone, head)  # doctest: +SKIP
        >>> model.predict(images).argmax(1)  # == head.predict(features)  # doctest: +SKIP
    """
    import keras

    layer = keras_head_layer(pipeline, name=name)
    return keras.Model(backbone.inputs, layer(backbone.output), name=f"{backbone.name}_{name}")
