"""transferkit: transfer learning for Keras 3 from the command line, and from Python.

Importing the package is cheap: TensorFlow is imported only by the modules that need it, and the
public names below load their module on first use.

Example:
    >>> import transferkit
    >>> transferkit.TrainConfig("photos", "runs/a", epochs=5).epochs
    5
"""

from __future__ import annotations

import importlib
from pathlib import Path

__version__ = "0.1.0"

#: The bundled demo photos (500 sign-language digits, 10 classes) that ``transferkit demo`` uses.
DEMO_DIR = Path(__file__).parent / "assets" / "demo" / "sign_digits"

# Public name -> the module that defines it (what the CLI is built on).
_EXPORTS = {
    "TrainConfig": "transferkit.config",
    "load_config": "transferkit.config",
    "train": "transferkit.training.run",
    "TrainResult": "transferkit.training.run",
    "evaluate_run": "transferkit.evaluation.evaluate",
    "load_predictor": "transferkit.serving.predictors",
    "predict_paths": "transferkit.serving.predictors",
    "predict_files": "transferkit.serving.predictors",
    "load_run": "transferkit.serving.runs",
    "extract_features": "transferkit.cache",
    "FeatureCache": "transferkit.cache",
    "BottleneckFeatures": "transferkit.heads.estimator",
    "scan_folder": "transferkit.data.scan",
    "fit_head": "transferkit.heads.registry",
    "CompareConfig": "transferkit.heads.compare",
    "explain_files": "transferkit.evaluation.explain",
}

__all__ = ["DEMO_DIR", "__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # the next access is a plain attribute
        return value
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
