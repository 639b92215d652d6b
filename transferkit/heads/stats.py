"""Statistics for comparing heads honestly on one test split: McNemar's test, bootstrap intervals
and the verdict (a winner only where the difference is significant).

Both take per-image correctness (boolean arrays in the same image order), so any two heads scored
on the same test images can be compared, whatever their score types.

Example:
    >>> a = np.array([1, 1, 1, 1, 1, 1, 0, 1], bool)
    >>> b = np.array([1, 0, 0, 0, 0, 0, 1, 1], bool)
    >>> round(mcnemar(a, b)[1], 4)
    0.2188
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from transferkit.errors import InputError

#: p-value below which a difference between two heads counts as significant (McNemar).
ALPHA = 0.05

#: The head the verdict also tests the best one against: the default softmax head
#: (``transferkit.heads.compare.SOFTMAX``).
REFERENCE = "softmax"

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


# ----------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class Verdict:
    """Which head, if any, is significantly the best.

    Attributes:
        winner: the best head when significantly better than the runner-up and the reference, else None.
        best: the head with the highest (mean) accuracy.
        runner_up: the second-best head (None with a single head).
        p_runner_up: McNemar p of best vs runner-up (the largest over seeds).
        p_reference: McNemar p of best vs the reference head (None when best is the reference
            or the runner-up, or there is no reference).
        text: one sentence for people.
    """

    winner: str | None
    best: str
    runner_up: str | None
    p_runner_up: float | None
    p_reference: float | None
    text: str


def paired_mcnemar(correct_a: Sequence[np.ndarray], correct_b: Sequence[np.ndarray]) -> float:
    """McNemar's p-value of two heads, the largest over their seeds (significant only if it is in every seed).

    Runs pair up seed by seed; a head run once (fine-tune-top) pairs with every run of the other.
    """
    if len(correct_a) != len(correct_b) and 1 not in (len(correct_a), len(correct_b)):
        raise InputError(f"Cannot pair {len(correct_a)} and {len(correct_b)} seeded runs for McNemar's test.")
    count = max(len(correct_a), len(correct_b))
    pairs = zip(list(correct_a) * (count // len(correct_a)), list(correct_b) * (count // len(correct_b)), strict=True)
    return max(mcnemar(a, b)[1] for a, b in pairs)


def pick_winner(correct: Mapping[str, Sequence[np.ndarray]], reference: str | None = REFERENCE,
                alpha: float = ALPHA) -> Verdict:
    """Name a winner only when the difference is significant.

    Heads are ranked by accuracy (mean over seeds). The best is the winner when McNemar's test
    against the runner-up gives p < ``alpha`` in every seed, and, when the reference (softmax)
    is neither of them, also against the reference. Ties at the top have no winner.

    Args:
        correct: head name -> per-seed boolean arrays, True where the head is right on a test image
            (the same images, in the same order, for every head).
        reference: the baseline head, or None.
        alpha: significance level.

    Example:
        >>> a, b = np.array([1] * 40 + [0] * 0, bool), np.array([1] * 20 + [0] * 20, bool)
        >>> pick_winner({"softmax": [b], "logreg": [a]}).winner
        'logreg'
    """
    if not correct:
        raise InputError("No heads to compare.")
    accuracy = {name: float(np.mean([np.mean(c) for c in runs_])) for name, runs_ in correct.items()}
    ranked = sorted(accuracy, key=lambda name: -accuracy[name])  # stable: ties keep the given order
    best = ranked[0]
    if len(ranked) == 1:
        return Verdict(None, best, None, None, None, f"Only one head ({best}) was trained; nothing to compare.")
    runner_up = ranked[1]
    p_runner = paired_mcnemar(correct[best], correct[runner_up])
    p_ref = None
    if reference in correct and reference not in (best, runner_up):
        p_ref = paired_mcnemar(correct[best], correct[reference])
    lead = f"{best} {accuracy[best]:.3f} vs {runner_up} {accuracy[runner_up]:.3f}"
    if accuracy[best] == accuracy[runner_up]:
        return Verdict(None, best, runner_up, p_runner, p_ref,
                       f"No head is significantly better than the others: {best} and {runner_up} tie at "
                       f"{accuracy[best]:.3f}.")
    if p_runner < alpha and (p_ref is None or p_ref < alpha):
        against_ref = f"; vs {reference} p = {p_ref:.3g}" if p_ref is not None else ""
        return Verdict(best, best, runner_up, p_runner, p_ref,
                       f"{best} is significantly the best head: {lead} (McNemar p = {p_runner:.3g}{against_ref}).")
    which = (f"vs {runner_up} p = {p_runner:.3g}" if p_runner >= alpha else f"vs {reference} p = {p_ref:.3g}")
    return Verdict(None, best, runner_up, p_runner, p_ref,
                   f"No head is significantly better than the others: {lead}, McNemar {which} "
                   f"(significant needs p < {alpha:g}); on this test set the difference may be chance.")
