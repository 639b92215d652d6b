"""Saving a fitted scikit-learn head safely: skops (no pickle) plus a JSON sidecar with the
backbone identity the head needs; loading refuses types that could run code.

Example:
    >>> from transferkit.heads.saving import load_head
    >>> head, backbone = load_head(run_dir / "head.skops")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from transferkit import files
from transferkit.errors import InputError
from transferkit.heads.registry import FittedHead

#: Keys the backbone identity saved beside a head must have, so predict recomputes the same features.
BACKBONE_KEYS = ("backbone", "image_size", "weights_id", "class_names")

#: Version of the saved-head layout (the JSON sidecar); bumped when its meaning changes.
HEAD_FORMAT_VERSION = 1

# Internal scikit-learn types that skops does not trust by default but that the registry's own
# heads contain (kNN's tree and metric, a forest's trees, MLP's optimiser, calibration). A saved
# head holding anything else is refused unless the caller says they trust the file.
_REGISTRY_TYPES = frozenset({
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.tree._tree.Tree",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.model_selection._split.StratifiedKFold",
})


def save_head(head: FittedHead, path: str | os.PathLike, backbone: Mapping[str, Any]) -> Path:
    """Write a fitted head with skops (``path``) and its identity to a JSON sidecar (``.json``).

    Args:
        head: from :func:`transferkit.heads.registry.fit_head`.
        path: the ``.skops`` file to write (atomically).
        backbone: identity of the features the head was trained on: ``backbone``, ``image_size``,
            ``weights_id``, ``class_names`` (more keys are kept).

    Returns:
        The sidecar path.

    Example:
        >>> save_head(head, run_dir / "head.skops", {"backbone": "mobilenet_v2", "image_size": 224,
        ...           "weights_id": "3f2a...", "class_names": ["ants", "bees"]})  # doctest: +SKIP
    """
    import sklearn
    import skops
    import skops.io as sio

    missing = [key for key in BACKBONE_KEYS if key not in backbone]
    if missing:
        raise InputError(f"The backbone identity saved with a head needs {', '.join(BACKBONE_KEYS)}; "
                         f"missing: {', '.join(missing)}.")
    classes = head.classes_
    names = list(backbone["class_names"])
    if np.issubdtype(classes.dtype, np.integer) and (classes.min() < 0 or classes.max() >= len(names)):
        raise InputError(f"Head labels {classes.tolist()} do not index the {len(names)} class names given.")
    path = Path(path)
    with files.atomic_path(path, suffix=".skops") as tmp:
        sio.dump(head.estimator_, tmp)
    sidecar = path.with_suffix(".json")
    files.write_json(sidecar, {
        "format": HEAD_FORMAT_VERSION,
        "head": head.name,
        "best_params": {key: _jsonable(value) for key, value in head.best_params_.items()},
        "fit_seconds": head.fit_seconds_,
        "num_folds": head.num_folds_,
        "cv_score": head.cv_score_,
        "temperature": head.temperature_,
        "classes": [_jsonable(c) for c in classes.tolist()],
        "backbone": {key: _jsonable(value) for key, value in backbone.items()},
        "sklearn_version": sklearn.__version__,
        "skops_version": skops.__version__,
    })
    return sidecar


def load_head(path: str | os.PathLike, trust: bool = False) -> tuple[FittedHead, dict[str, Any]]:
    """Load a head written by :func:`save_head`, refusing unknown types unless ``trust``.

    skops loads only types it trusts; the few scikit-learn internals the registry's heads contain
    are trusted here too. Anything else could run code on load, so it is refused unless the user
    says they trust the file.

    Returns:
        ``(head, backbone)``: the head and the backbone identity it needs.

    Raises:
        InputError: the file or its sidecar is missing, or it holds untrusted types.

    Example:
        >>> head, backbone = load_head(run_dir / "head.skops")  # doctest: +SKIP
    """
    import skops.io as sio

    path = Path(path)
    sidecar = path.with_suffix(".json")
    for needed in (path, sidecar):
        if not needed.is_file():
            raise InputError(f"Saved head file '{needed}' does not exist (save_head writes {path.name} and "
                             f"{sidecar.name} together).")
    data = path.read_bytes()  # read once: the bytes checked are the bytes loaded
    untrusted = [t for t in sio.get_untrusted_types(data=data) if t not in _REGISTRY_TYPES]
    if untrusted and not trust:
        raise InputError(f"Saved head '{path}' contains types that could run code when loaded: "
                         f"{', '.join(untrusted)}. Load it only if you trust its source, with trust=True (--trust).")
    estimator = sio.loads(data, trusted=sorted(set(sio.get_untrusted_types(data=data))))
    info = json.loads(sidecar.read_text(encoding="utf-8"))
    temperature = info.get("temperature")
    if temperature is not None and not (isinstance(temperature, int | float) and 0 < temperature < float("inf")):
        raise InputError(f"Saved head sidecar '{sidecar}' has temperature {str(temperature)[:40]!r}; expected a "
                         "positive number or null. Train the head again.")
    head = FittedHead(info["head"], estimator, dict(info.get("best_params", {})), float(info.get("fit_seconds", 0.0)),
                      int(info.get("num_folds", 0)), info.get("cv_score"), temperature)
    return head, dict(info["backbone"])


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return value
