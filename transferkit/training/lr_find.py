"""The learning-rate range test (Smith 2015; fastai's ``lr_find``) on cached features.

The head trains for one short sweep with the rate growing exponentially each batch; the loss
against the rate shows where learning starts, where it is fastest and where it diverges. The
sweep runs on the cached bottleneck features, so it costs seconds once features exist. The
suggestion is the rate where the smoothed loss falls fastest: a suggestion, to check on the plot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from transferkit.config import TrainConfig

#: Stop the sweep once the smoothed loss exceeds this multiple of its minimum (it has diverged).
DIVERGENCE_FACTOR = 4.0
#: Weight of the exponential moving average that smooths the per-batch losses (fastai's 0.98).
SMOOTHING = 0.98


@dataclass
class RateSweep:
    """Rates tried, the smoothed loss at each, and the suggested rate."""

    rates: np.ndarray
    losses: np.ndarray
    suggestion: float
    min_loss_rate: float


def find_learning_rate(features: np.ndarray, labels: np.ndarray, config: TrainConfig, *, min_rate: float = 1e-6,
                       max_rate: float = 1.0, num_steps: int = 100) -> RateSweep:
    """Sweep the head's learning rate from ``min_rate`` to ``max_rate`` over ``num_steps`` batches.

    Example:
        >>> sweep = find_learning_rate(features, labels, TrainConfig("photos", "runs/x"))  # doctest: +SKIP
        >>> f"{sweep.suggestion:.0e}"  # doctest: +SKIP
        '3e-03'
    """
    import keras

    keras.utils.set_random_seed(config.seed)
    num_classes = int(labels.max()) + 1
    model = keras.Sequential([keras.Input((features.shape[1],)),
                              keras.layers.Dense(num_classes, activation="softmax")])
    optimizer = keras.optimizers.Adam(min_rate)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    rates = min_rate * (max_rate / min_rate) ** (np.arange(num_steps) / max(1, num_steps - 1))
    rng = np.random.default_rng(config.seed)
    order = np.concatenate([rng.permutation(len(labels)) for _ in range(num_steps * config.batch_size
                                                                       // max(1, len(labels)) + 1)])
    average, smoothed = 0.0, []
    for step, rate in enumerate(rates):
        optimizer.learning_rate.assign(rate)
        batch = order[step * config.batch_size:(step + 1) * config.batch_size]
        loss = float(model.train_on_batch(features[batch], labels[batch]))
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed.append(average / (1 - SMOOTHING ** (step + 1)))  # bias-corrected, as Adam's moments
        if not np.isfinite(loss) or smoothed[-1] > DIVERGENCE_FACTOR * min(smoothed):
            break
    losses = np.array(smoothed)
    rates = rates[:len(losses)]
    best = int(np.argmin(losses))
    # Slope over a window of a tenth of the sweep, after its first tenth: the first losses are
    # noise around the starting loss and single-step slopes would pick that noise.
    window, start = max(1, len(losses) // 10), len(losses) // 10
    ends = np.arange(start + window, best + 1)
    if len(ends):
        log_rates = np.log10(rates)
        slopes = (losses[ends] - losses[ends - window]) / (log_rates[ends] - log_rates[ends - window])
        steepest = int(ends[np.argmin(slopes)]) - window // 2
        suggestion = float(rates[steepest])
    else:
        suggestion = float(rates[best] / 10)  # too short a sweep: fastai's "minimum / 10" rule
    return RateSweep(rates, losses, suggestion, float(rates[best]))


def plot_sweep(sweep: RateSweep, title: str) -> bytes:
    """The loss against the rate (log scale) with the suggestion marked, as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=110)
    axis.plot(sweep.rates, sweep.losses, color="#1f77b4")
    axis.set_xscale("log")
    axis.set_xlabel("learning rate (log scale)")
    axis.set_ylabel("training loss (smoothed)")
    axis.axvline(sweep.suggestion, color="#d62728", linestyle="--",
                 label=f"suggestion {sweep.suggestion:.1e} (steepest descent)")
    axis.axvline(sweep.min_loss_rate, color="#7f7f7f", linestyle=":", label=f"lowest loss {sweep.min_loss_rate:.1e}")
    axis.set_title(title)
    axis.legend()
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
