"""Heads on cached features: the scikit-learn registry, the exact softmax, the estimator, comparisons.

The registry's main names are importable from here (``transferkit.heads.fold_linear_head``); each
lives in its module: :mod:`~transferkit.heads.registry` (heads, fitting, folding into Keras),
:mod:`~transferkit.heads.saving`, :mod:`~transferkit.heads.softmax` (the exact solver),
:mod:`~transferkit.heads.estimator` (``BottleneckFeatures``), :mod:`~transferkit.heads.compare`
and :mod:`~transferkit.heads.stats`. Nothing here imports TensorFlow.
"""

from transferkit.heads.registry import (
    HEADS,
    FittedHead,
    attach_head,
    fit_head,
    fold_linear_head,
    get_head,
    keras_head_layer,
)

__all__ = ["HEADS", "FittedHead", "attach_head", "fit_head", "fold_linear_head", "get_head", "keras_head_layer"]
