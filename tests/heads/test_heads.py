"""scikit-learn heads on synthetic features: training, scores, folding into Keras, save/load, statistics."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import top_k_accuracy_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from transferkit.errors import DataError, InputError
from transferkit.heads.estimator import BottleneckFeatures
from transferkit.heads.registry import (
    HEADS,
    attach_head,
    fit_head,
    fold_linear_head,
    get_head,
    head_scores,
    keras_head_layer,
    make_head,
)
from transferkit.heads.saving import load_head, save_head
from transferkit.heads.stats import bootstrap_accuracy_ci, mcnemar

LINEAR = [name for name, spec in HEADS.items() if spec.linear]
IDENTITY = {"backbone": "tiny_test", "image_size": 32, "weights_id": "0123abcd", "class_names": ["a", "b", "c"]}


def features(num_classes=3, separable=True, n=150, seed=0):
    """Train/test features; separable = well-separated clusters, else overlapping with label noise."""
    X, y = make_classification(n, 12, n_informative=6, n_redundant=2, n_classes=num_classes,
                               n_clusters_per_class=1, class_sep=3.0 if separable else 1.0,
                               flip_y=0.0 if separable else 0.15, random_state=seed)
    X = X * 5 + 3  # features are not standardised, so the scaler (and its folding) matters
    return X[: n * 2 // 3], y[: n * 2 // 3], X[n * 2 // 3:], y[n * 2 // 3:]


@pytest.fixture(autouse=True)
def quiet_convergence():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


# ----------------------------------------------------------------------------- registry and fitting


def test_registry_has_the_seven_heads():
    assert set(HEADS) == {"linear-svm", "rbf-svm", "logreg", "knn", "ridge", "random-forest", "mlp"}
    assert set(LINEAR) == {"linear-svm", "logreg", "ridge"}
    assert get_head("Random_Forest").name == "random-forest"


def test_unknown_head_suggests_names():
    with pytest.raises(InputError, match=r"Unknown head 'lin-svm'\. Did you mean: linear-svm.*Allowed: linear-svm"):
        make_head("lin-svm")


@pytest.mark.parametrize("name", sorted(HEADS))
def test_each_head_trains_predicts_and_scores(name):
    X, y, X_test, y_test = features()
    head = fit_head(name, X, y, search=False)
    assert head.num_folds_ == 0 and head.cv_score_ is None
    assert set(head.best_params_) == set(HEADS[name].grid)
    assert head.fit_seconds_ > 0
    assert (head.predict(X_test) == y_test).mean() >= 0.85
    scores, kind = head_scores(head.estimator_, X_test)
    assert scores.shape == (len(X_test), 3)
    assert kind == ("decision" if name in ("linear-svm", "rbf-svm", "ridge") else "proba")
    assert top_k_accuracy_score(y_test, scores, k=2, labels=head.classes_) >= 0.95


def test_heads_on_overlapping_classes_still_beat_chance():
    X, y, X_test, y_test = features(separable=False)
    for name in HEADS:  # 3 classes: chance is 1/3
        assert (fit_head(name, X, y, search=False).predict(X_test) == y_test).mean() > 0.45, name


def test_search_uses_stratified_folds_on_training_features():
    X, y, _, _ = features(separable=False)
    head = fit_head("logreg", X, y, search=True)
    assert head.num_folds_ == 5
    assert head.best_params_["clf__C"] in HEADS["logreg"].grid["clf__C"]
    assert 0 < head.cv_score_ <= 1


@pytest.mark.parametrize("name", sorted(HEADS))
def test_each_head_searches_its_grid(name):
    X, y, _, _ = features(n=60)
    head = fit_head(name, X, y, search=True)
    assert head.num_folds_ == 5 and 0 < head.cv_score_ <= 1
    for key, value in head.best_params_.items():
        assert value in HEADS[name].grid[key]


def test_search_folds_capped_by_smallest_class_and_knn_k_by_fold_size():
    X, y, _, _ = features()
    keep = np.concatenate([np.flatnonzero(y == 0)[:3], np.flatnonzero(y == 1)[:3], np.flatnonzero(y == 2)[:3]])
    head = fit_head("knn", X[keep], y[keep], search=True)
    assert head.num_folds_ == 3
    assert head.best_params_["clf__n_neighbors"] <= 6  # 9 images, 3 folds: 6 training rows per fold


def test_no_search_when_a_class_has_one_image():
    X, y, _, _ = features()
    keep = np.concatenate([np.flatnonzero(y == 0)[:1], np.flatnonzero(y != 0)[:20]])
    head = fit_head("ridge", X[keep], y[keep], search=True)
    assert head.num_folds_ == 0 and head.cv_score_ is None
    with pytest.raises(DataError, match="Cannot calibrate"):
        fit_head("linear-svm", X[keep], y[keep], calibrate=True)


def test_calibrated_svm_gives_probabilities_and_keeps_its_decision_rule():
    X, y, X_test, _ = features(separable=False)
    head = fit_head("linear-svm", X, y, search=False, calibrate=True)
    scores, kind = head.scores(X_test)
    assert kind == "proba"
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-9)
    plain = fit_head("linear-svm", X, y, search=False)
    np.testing.assert_array_equal(head.predict(X_test), plain.predict(X_test))
    kernel, bias = fold_linear_head(head)  # folding uses the decision rule, not the calibration
    np.testing.assert_array_equal((X_test @ kernel + bias).argmax(axis=1), head.predict(X_test))


def test_bad_training_features_are_refused():
    with pytest.raises(InputError, match=r"shape \(n, feature_dim\)"):
        fit_head("logreg", np.zeros(5), np.zeros(5))
    with pytest.raises(DataError, match="at least 2 classes"):
        fit_head("logreg", np.zeros((5, 2)), np.zeros(5))


# ----------------------------------------------------------------------------- folding into Keras


@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("separable", [True, False])
def test_fold_equals_decision_function_and_predict(name, num_classes, separable):
    X, y, X_test, _ = features(num_classes, separable)
    head = fit_head(name, X, y, search=False)
    kernel, bias = fold_linear_head(head)
    logits = X_test @ kernel + bias
    decision = head.pipeline_.decision_function(X_test)
    if num_classes == 2:
        np.testing.assert_allclose(logits[:, 1] - logits[:, 0], decision, rtol=1e-9, atol=1e-9)
    else:
        np.testing.assert_allclose(logits, decision, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(head.classes_[logits.argmax(axis=1)], head.predict(X_test))
    scores, kind = head_scores(head.pipeline_, X_test)
    if kind == "proba":  # logreg: the softmax of the folded logits is predict_proba
        softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
        np.testing.assert_allclose(softmax / softmax.sum(axis=1, keepdims=True), scores, atol=1e-9)
    else:  # head_scores and the folded layer give the same decision scores, binary included
        np.testing.assert_allclose(logits, scores, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_keras_layer_matches_sklearn(num_classes):
    X, y, X_test, _ = features(num_classes, separable=False)
    inputs = X_test.astype(np.float32)
    for name in LINEAR:
        head = fit_head(name, X, y, search=False)
        layer = keras_head_layer(head)
        output = np.asarray(layer(inputs))
        np.testing.assert_array_equal(output.argmax(axis=1), head.predict(X_test), err_msg=name)
        if name == "logreg":
            np.testing.assert_allclose(output, head.estimator_.predict_proba(X_test), atol=1e-5)


def test_attached_head_serves_like_the_sklearn_head(tmp_path):
    # The whole chain: raw images -> backbone -> folded head equals the sklearn head on the same features.
    from transferkit.testing import make_image_folder

    root = make_image_folder(tmp_path / "photos", num_classes=3, images_per_class=6, image_size=32)
    paths = sorted(str(p) for p in root.glob("*/*.png"))
    labels = np.array([int(p.split("class_")[1][0]) for p in paths])
    transformer = BottleneckFeatures(backbone="tiny_test", weights="none", image_size=32).fit(paths)
    vectors = transformer.transform(paths)
    head = fit_head("logreg", vectors, labels, search=False)
    model = attach_head(transformer.model_, head)
    import keras

    assert not any(isinstance(layer, keras.Model) for layer in model.layers)  # one flat graph
    from transferkit.data.scan import load_image

    images = np.stack([load_image(p, 32) for p in paths]).astype(np.float32)
    probabilities = model.predict(images, verbose=0)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), head.predict(vectors))
    np.testing.assert_allclose(probabilities, head.estimator_.predict_proba(vectors), atol=1e-5)


def test_nonlinear_heads_do_not_fold():
    X, y, _, _ = features()
    with pytest.raises(InputError, match=r"Only linear heads fold.*got KNeighborsClassifier"):
        fold_linear_head(fit_head("knn", X, y, search=False))


# ----------------------------------------------------------------------------- save and load


@pytest.mark.parametrize("name", sorted(HEADS))
def test_save_load_round_trip(name, tmp_path):
    X, y, X_test, _ = features()
    head = fit_head(name, X, y, search=False, calibrate=name == "linear-svm")
    sidecar = save_head(head, tmp_path / "head.skops", IDENTITY)
    assert json.loads(sidecar.read_text())["backbone"] == IDENTITY
    loaded, backbone = load_head(tmp_path / "head.skops")
    assert backbone == IDENTITY and loaded.name == name
    np.testing.assert_array_equal(loaded.predict(X_test), head.predict(X_test))
    np.testing.assert_allclose(loaded.scores(X_test)[0], head.scores(X_test)[0])


class CustomScaler(StandardScaler):
    """A type skops does not know: stands for anything that could run code when loaded."""


def test_untrusted_types_are_refused_unless_trusted(tmp_path):
    X, y, X_test, _ = features()
    head = fit_head("logreg", X, y, search=False)
    head.estimator_ = Pipeline([("scale", CustomScaler()), ("clf", LogisticRegression())]).fit(X, y)
    save_head(head, tmp_path / "head.skops", IDENTITY)
    with pytest.raises(InputError, match=r"CustomScaler.*trust=True"):
        load_head(tmp_path / "head.skops")
    loaded, _ = load_head(tmp_path / "head.skops", trust=True)
    np.testing.assert_array_equal(loaded.predict(X_test), head.predict(X_test))


def test_save_needs_full_backbone_identity(tmp_path):
    X, y, _, _ = features()
    head = fit_head("ridge", X, y, search=False)
    with pytest.raises(InputError, match="missing: weights_id"):
        save_head(head, tmp_path / "head.skops", {"backbone": "x", "image_size": 32, "class_names": ["a"]})
    with pytest.raises(InputError, match="do not index the 2 class names"):
        save_head(head, tmp_path / "head.skops", {**IDENTITY, "class_names": ["a", "b"]})
    with pytest.raises(InputError, match="does not exist"):
        load_head(tmp_path / "missing.skops")


# ----------------------------------------------------------------------------- statistics


def test_mcnemar_exact_by_hand():
    # b = 5 (A right, B wrong), c = 1: two-sided binomial p = 2 * P(X <= 1 | n=6, 1/2) = 2 * 7/64.
    a = np.array([1] * 5 + [0] + [1] * 4, bool)
    b = np.array([0] * 5 + [1] + [1] * 4, bool)
    statistic, p = mcnemar(a, b)
    assert statistic == 1.0 and p == pytest.approx(14 / 64)
    assert mcnemar(a, a) == (0.0, 1.0)


def test_mcnemar_chi_square_by_hand():
    # b = 30, c = 10: (|30 - 10| - 1)^2 / 40 = 9.025; chi-square 1 dof: p = erfc(sqrt(9.025 / 2)).
    a = np.array([1] * 30 + [0] * 10 + [1] * 60, bool)
    b = np.array([0] * 30 + [1] * 10 + [1] * 60, bool)
    statistic, p = mcnemar(a, b)
    assert statistic == pytest.approx(9.025)
    assert p == pytest.approx(math.erfc(math.sqrt(9.025 / 2)))
    with pytest.raises(InputError, match="same images"):
        mcnemar(a, b[:5])


def test_bootstrap_interval_by_hand():
    # Two images, one right: resampled accuracy is 0, 1/2 or 1 with probability 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% percentiles are 0 and 1.
    assert bootstrap_accuracy_ci([True, False], n_resamples=2000) == (0.0, 1.0)
    assert bootstrap_accuracy_ci([True] * 20) == (1.0, 1.0)
    correct = np.array([True] * 80 + [False] * 20)
    low, high = bootstrap_accuracy_ci(correct, seed=1)
    # Normal approximation: 0.8 +- 1.96 * sqrt(0.8 * 0.2 / 100) = 0.8 +- 0.078.
    assert low == pytest.approx(0.722, abs=0.02) and high == pytest.approx(0.878, abs=0.02)
    assert bootstrap_accuracy_ci(correct, seed=1) == (low, high)
