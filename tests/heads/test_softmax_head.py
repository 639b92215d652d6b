"""The exact softmax head: the optimum, its C chosen by cross-validation, folds that respect groups."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from transferkit.heads.softmax import fit_exact_softmax, learning_curve


def _noisy(n=200):
    return make_classification(n, 40, n_informative=8, n_classes=3, flip_y=0.2, random_state=0)


def test_the_head_is_the_optimum_at_the_cross_validated_c():
    X, y = _noisy()
    head = fit_exact_softmax(X, y, seed=0)
    assert head.chosen_by == "cross-validation" and head.num_folds == 5
    losses = [point["log_loss"] for point in head.curve]
    assert head.C == head.curve[int(np.argmin(losses))]["C"]
    reference = LogisticRegression(C=head.C, tol=1e-10, max_iter=10000).fit(X, y)
    np.testing.assert_allclose(head.probabilities(X), reference.predict_proba(X), atol=1e-5)
    kernel, bias = head.kernel_bias()
    logits = X @ kernel + bias
    np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), reference.predict_proba(X),
                               atol=1e-5)


def test_a_given_regularization_skips_the_search():
    X, y = _noisy(90)
    head = fit_exact_softmax(X, y, regularization=4.0)
    assert head.C == 0.25 and head.chosen_by == "given" and head.curve == []


def test_an_image_and_its_views_stay_in_one_fold():
    """Three copies of each row stand for an image and its augmented views. Folds that split the
    copies hold out rows the model trained on, and the weakest penalty looks best; grouped folds
    do not."""
    # More features than images, as pooled features of a small photo set: copies can be memorised.
    X, y = make_classification(150, 300, n_informative=8, n_classes=3, flip_y=0.2, random_state=0)
    copies, labels = np.concatenate([X, X, X]), np.concatenate([y, y, y])
    groups = np.concatenate([np.arange(len(y))] * 3)
    leaky = fit_exact_softmax(copies, labels, seed=0)
    grouped = fit_exact_softmax(copies, labels, seed=0, groups=groups)
    assert leaky.C >= 100 * grouped.C  # measured: 0.32 against 0.001 (0.003 without the copies)


def test_learning_curve_grows_with_the_share():
    X, y = _noisy(300)
    curve = learning_curve(X, y, 1.0, seed=0)
    assert [share for share, _ in curve] == [0.25, 0.5, 1.0]
    assert all(0 <= accuracy <= 1 for _, accuracy in curve)
