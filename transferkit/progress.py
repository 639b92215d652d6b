"""Progress of long work, readable in a terminal and in a redirected log.

- Keras' bars (extraction, prediction, ``fit``): :func:`keras_verbose` picks their mode for the
  stdout at hand.
- scikit-learn grid searches, which report nothing (``verbose`` prints to stdout, bypassing the
  CLI): :class:`SearchProgress` logs one line per candidate as its folds finish.

Nothing here imports TensorFlow or scikit-learn.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

log = logging.getLogger("transferkit")


def keras_verbose(verbose: int) -> int:
    """The ``verbose`` to give Keras (``keras.utils.Progbar``, ``Model.fit``) for this stdout.

    Keras' live bar (1) writes colour codes and carriage returns whenever it runs on a POSIX
    system, terminal or not, so a log file fills with escape codes and half-drawn bars. On a
    stdout that is not a terminal it becomes Keras' own quiet mode (2): one plain line when a
    bar (an extraction, an epoch) is done. 0 stays silent.

    Example:
        >>> keras_verbose(0)
        0
    """
    if verbose == 1 and not (hasattr(sys.stdout, "isatty") and sys.stdout.isatty()):
        return 2
    return verbose


def progress_bar(target: int, unit_name: str, verbose: int):
    """A ``keras.utils.Progbar`` for ``target`` units, readable on the stdout at hand.

    In a terminal it is Keras' live bar. On a redirected stdout Keras has no mode that is both plain
    and alive (its bar writes colour codes and carriage returns; its quiet mode prints nothing
    until the end, so a log of a 20-minute extraction shows nothing for 20 minutes): there the bar
    prints one plain line each time another 5% is done or 30 s have passed, and Keras' own line at
    the end. Written here because Keras has no such mode.

    Example:
        >>> bar = progress_bar(400, "image", verbose=0)  # doctest: +SKIP
        >>> bar.add(32)  # doctest: +SKIP
    """
    import keras

    mode = keras_verbose(verbose)
    if mode != 2 or verbose != 1:
        return keras.utils.Progbar(target, unit_name=unit_name, verbose=mode)

    class LogProgbar(keras.utils.Progbar):
        def __init__(self):
            super().__init__(target, unit_name=unit_name, verbose=2)
            self._step, self._shown, self._shown_at = max(1, -(-target // 20)), 0, time.time()

        def update(self, current, values=None, finalize=None):
            done = finalize if finalize is not None else (self.target is not None and current >= self.target)
            now = time.time()
            if not done and (current >= self._shown + self._step or now - self._shown_at >= 30):
                self._shown, self._shown_at = current, now
                sys.stdout.write(f"{current}/{self.target} {self.unit_name}s - {now - self._start:.0f}s\n")
                sys.stdout.flush()
            super().update(current, values, finalize)

    return LogProgbar()


class SearchProgress:
    """A ``GridSearchCV`` scorer (accuracy, as ``scoring="accuracy"``) that also logs the search's
    progress: one line per candidate when its last fold is scored.

    scikit-learn has no progress callback; with ``n_jobs=1`` a search scores each fit as soon as
    it is trained, candidate after candidate, fold after fold, so counting the calls is exact.

    Args:
        name: the head's name for the messages.
        params: the grid's parameter names, shown with each candidate's values.
        num_candidates: grid points; ``num_folds``: cross-validation folds.

    Example:
        >>> search = GridSearchCV(pipeline, grid, cv=5)  # doctest: +SKIP
        >>> SearchProgress.attach(search, "logreg", num_images=len(y))  # doctest: +SKIP
    """

    def __init__(self, name: str, params: Sequence[str], num_candidates: int, num_folds: int):
        self.name, self.params = name, list(params)
        self.num_candidates, self.num_folds = num_candidates, num_folds
        self.scores: list[float] = []
        self.started = time.perf_counter()

    def __call__(self, estimator, X, y) -> float:
        from sklearn.metrics import accuracy_score

        score = float(accuracy_score(y, estimator.predict(X)))
        self.scores.append(score)
        done = len(self.scores)
        if done % self.num_folds == 0:
            values = estimator.get_params()
            shown = ", ".join(f"{p.removeprefix('clf__')}={values[p]}" for p in self.params)
            mean = sum(self.scores[-self.num_folds:]) / self.num_folds
            log.info("  %s: candidate %d of %d (%s): cross-validated accuracy %.3f; %d of %d fits done, %.0f s.",
                     self.name, done // self.num_folds, self.num_candidates, shown, mean, done,
                     self.num_candidates * self.num_folds, time.perf_counter() - self.started)
        return score

    @classmethod
    def attach(cls, search, name: str, num_images: int) -> None:
        """Make ``search`` (an unfitted ``GridSearchCV`` scoring accuracy) report its progress, and
        say what it is about to fit."""
        from sklearn.model_selection import ParameterGrid

        candidates, folds = len(ParameterGrid(search.param_grid)), search.cv.get_n_splits()
        search.set_params(scoring=cls(name, list(search.param_grid), candidates, folds))
        log.info("%s: grid search of %d candidates x %d folds (%d fits) on %d images, then a refit of the best on all "
                 "of them.", name, candidates, folds, candidates * folds, num_images)
