"""Which strategy a run takes, and the phases in words: ``--strategy auto``'s evidence, measured on
this machine, and the warnings for flags the chosen strategy does not use.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from transferkit.config import TrainConfig
from transferkit.data.augment import describe_augmentation, describe_views
from transferkit.training.strategies import choose_strategy

log = logging.getLogger("transferkit")


def resolve_strategy(config: TrainConfig, train_counts: np.ndarray, evidence=None) -> tuple[str, str]:
    """The strategy to run and why (``auto`` decides from the training images per class and the
    frozen head's ``evidence``, :func:`measure_auto_evidence`).

    Flags that only shape the fine-tune phase are named when the strategy has none, so that no
    flag is silently without effect.
    """
    strategy, why = config.strategy, ""
    if strategy == "auto":
        strategy, why = choose_strategy(train_counts.tolist(), evidence, fine_tune_from=config.auto_fine_tune_from,
                                        full_retrain_from=config.auto_full_retrain_from)
    if strategy == "freeze-all":
        moot = [flag for flag, given in (("--xla", config.xla), ("--mixed-precision", config.mixed_precision))
                if given]
        if moot:
            log.warning("WARNING: %s only shape%s the fine-tune phase; freeze-all has none, so %s not used.",
                        " and ".join(moot), "s" if len(moot) == 1 else "", "it is" if len(moot) == 1 else "they are")
    if config.head == "softmax" and config.head_solver == "exact":
        defaults = TrainConfig("", "")
        moot = [f"--{name.replace('_', '-')}" for name in ("epochs", "learning_rate", "patience")
                if getattr(config, name) != getattr(defaults, name)]
        if strategy == "freeze-all":  # dropout and TensorBoard also shape a fine-tune phase
            moot += [flag for flag, given in (("--dropout", config.dropout), ("--tensorboard", config.tensorboard))
                     if given]
        if moot:
            log.warning("WARNING: %s only shape%s the Keras-trained head (--head-solver adam); the exact head "
                        "(the default) has no epochs, so %s not used.", _in_words(moot),
                        "s" if len(moot) == 1 else "", "it is" if len(moot) == 1 else "they are")
    return strategy, why


def _in_words(flags: list[str]) -> str:
    """``--a``, ``--a and --b``, ``--a, --b and --c``."""
    return " and ".join(flags) if len(flags) < 3 else f"{', '.join(flags[:-1])} and {flags[-1]}"


#: A fine-tune epoch's cost in forward passes of its training images (backward through the top
#: blocks, augmentation and decoding included) plus one pass of the val images. Measured: sign
#: digits, mobilenet_v2, 1,444 training images at 32.6 s an epoch against 79 images/s forward: 1.6.
FINE_TUNE_EPOCH_COST = 2.0
#: The same with ``--fine-tune-views``: each view costs a forward pass with its augmentation
#: (1.3) once, then an epoch of the top blocks on the cached output 0.3 forward passes per
#: training image. Measured: sign digits, mobilenet_v2 (4 of 18 blocks train), 4 views of 1,437
#: images and 201 val images in 201 s, epochs of 10.3 s, while a forward pass ran 39 images/s.
FROZEN_VIEW_COST, FROZEN_EPOCH_COST = 1.3, 0.3


def measure_auto_evidence(config: TrainConfig, backbone, features, labels, train_idx, val_idx, mirrored: bool):
    """``--strategy auto``'s evidence: the frozen head on train + val (C, learning curve) and the
    fine-tune epoch time estimated from one timed forward batch on this machine."""
    from transferkit.heads.softmax import auto_evidence

    size = int(backbone.input_shape[1])
    batch = np.zeros((16, size, size, 3), np.float32)
    backbone.predict_on_batch(batch)  # warm-up: graph tracing is not the steady state
    timings = []
    for _ in range(3):  # the fastest of three: other processes only ever slow a run down
        started = time.perf_counter()
        backbone.predict_on_batch(batch)
        timings.append(time.perf_counter() - started)
    per_image = min(timings) / len(batch) / (2 if mirrored else 1)
    num_train, num_val = len(train_idx), len(val_idx)
    if config.fine_tune_views:  # the usual case; a cut too large for memory trains on live images (slower)
        setup = per_image * FROZEN_VIEW_COST * (config.fine_tune_views * num_train + num_val)
        epoch_seconds = per_image * FROZEN_EPOCH_COST * (num_train + num_val / 3)
    else:
        setup, epoch_seconds = 0.0, per_image * (FINE_TUNE_EPOCH_COST * num_train + num_val)
    trval_idx = np.concatenate([train_idx, val_idx])
    evidence = auto_evidence(features[trval_idx], labels[trval_idx], seed=config.seed, seconds_per_epoch=epoch_seconds,
                             fine_tune_epochs=config.fine_tune_epochs, setup_seconds=setup)
    log.info("auto: frozen head cross-validated accuracy %.3f; learning curve %s; fine-tune estimate %.0f s, then "
             "%.0f s an epoch.", evidence.cv_accuracy,
             ", ".join(f"{share:.0%}: {acc:.3f}" for share, acc in evidence.learning_curve), setup, epoch_seconds)
    return evidence


def describe_phase(phase, config: TrainConfig, mirrored: bool = False) -> str:
    """The phase in words, as it will run: a scikit-learn head has no epochs or rate to show."""
    if phase.on_features:
        views = describe_views(config)
        rows = f"; trains on {views}" if views else ""
        if config.head != "softmax":
            fit = "grid search by cross-validation, then a refit" if config.search else "default hyper-parameters"
            return f"scikit-learn head {config.head} on the cached features of train + val ({fit}{rows})"
        if config.head_solver == "exact":
            penalty = ("L2 strength chosen by cross-validation" if config.regularization is None
                       else f"L2 strength {config.regularization:g}")
            mirror = ", flip-averaged features" if mirrored else ""
            return f"exact softmax head on cached features ({penalty}{mirror}{rows})"
        return f"head on cached features (up to {config.epochs} epochs, rate {config.learning_rate:g}{rows})"
    return (f"{phase.unfreeze_blocks} top block(s) with the head on live images ({config.fine_tune_epochs} epochs, "
            f"{config.schedule} schedule, rates {config.fine_tune_learning_rate:g} head / "
            f"{config.fine_tune_learning_rate * phase.rate_multipliers[1]:g} top block / "
            f"{config.fine_tune_learning_rate * phase.rate_multipliers[2]:g} deeper; "
            f"BatchNorm {'trains' if config.train_bn else 'frozen'}; augmentation: {describe_augmentation(config)})")
