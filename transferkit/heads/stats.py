"""Statistics for comparing heads honestly on one test split: McNemar's test and bootstrap intervals.

Both take per-image correctness (boolean arrays in the same image order), so any two heads scored
on the same test images can be compared, whatever their score types.

Example:
    >>> a = np.array([1, 1, 1, 1, 1, 1, 0, 1], bool)
    >>> b = np.array([1, 0, 0, 0, 0, 0, 1, 1], bool)
    >>> round(mcnemar(a, b)[1], 4)
    0.2188
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from transferkit.errors import InputError

#: p-value below which a difference between two heads counts as significant (McNemar).
ALPHA = 0.05

#: Below this many discordant pairs the chi-square approximation is poor; use the exact test.
EXACT_BELOW = 25


def _as_correct(correct, name: str) -> np.ndarray:
    array = np.asarray(correct)
    if array.ndim != 1:
        raise InputError(f"'{name}' must be a 1-D array of per-image correctness, got shape {array.shape}.")
    return array.astype(bool)


def mcnemar(correct_a, correct_b) -> tuple[float, float]:
    """McNemar's test: do two classifiers err on the same images at different rates?

    Only discordant images count: ``b`` (A right, B wrong) and ``c`` (A wrong, B right). With
    ``b + c < 25`` the test is the exact two-sided binomial test of ``b`` out of ``b + c`` at 1/2
    (statistic ``min(b, c)``); otherwise chi-square with continuity correction,
    ``(|b - c| - 1)^2 / (b + c)`` on 1 degree of freedom. No discordant image gives ``(0.0, 1.0)``.

    Args:
        correct_a: ``(n,)`` bool, classifier A right on each test image.
        correct_b: ``(n,)`` bool, classifier B right on the same images.

    Returns:
        ``(statistic, p_value)``.

    Example:
        >>> mcnemar([True, True, False], [True, True, False])
        (0.0, 1.0)
    """
    a = _as_correct(correct_a, "correct_a")
    b_ = _as_correct(correct_b, "correct_b")
    if a.shape != b_.shape:
        raise InputError(f"McNemar's test needs both heads scored on the same images; got {a.size} and {b_.size}.")
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    n = b + c
    if n == 0:
        return 0.0, 1.0
    if n < EXACT_BELOW:
        return float(min(b, c)), float(stats.binomtest(b, n, 0.5).pvalue)
    statistic = (abs(b - c) - 1) ** 2 / n
    return float(statistic), float(stats.chi2.sf(statistic, df=1))


def bootstrap_accuracy_ci(correct, n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval for accuracy: resample the test images with replacement.

    Percentile (not BCa) because accuracy is a bounded mean where BCa fails on perfect scores,
    and a 100%-accurate head must get the interval ``(1.0, 1.0)``, not NaN.

    Args:
        correct: ``(n,)`` bool, right or wrong on each test image.
        n_resamples: bootstrap resamples.
        seed: random seed (the same seed gives the same interval).
        level: confidence level.

    Returns:
        ``(low, high)``.

    Example:
        >>> bootstrap_accuracy_ci([True] * 10)
        (1.0, 1.0)
    """
    values = _as_correct(correct, "correct").astype(np.float64)
    if values.size == 0:
        raise InputError("Cannot bootstrap the accuracy of an empty test split.")
    if not 0 < level < 1:
        raise InputError(f"Confidence level must be between 0 and 1, got {level}.")
    if values.min() == values.max():  # every resample has the same accuracy
        return float(values[0]), float(values[0])
    result = stats.bootstrap((values,), np.mean, n_resamples=n_resamples, confidence_level=level,
                             method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
