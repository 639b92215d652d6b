"""Settings as frozen dataclasses, validated before any TensorFlow work.

A run's resolved settings are written to ``RUN_DIR/config.yaml`` and load back with
:func:`load_config`, so any run can be repeated exactly.  Unknown keys fail with the nearest
valid key suggested.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.errors import InputError
from transferkit.strategies import AUTO_FINE_TUNE_FROM, AUTO_FULL_RETRAIN_FROM, STRATEGIES

SCHEDULES = ("cosine", "one-cycle", "constant")
DISTRIBUTE = ("none", "mirrored", "multi-worker")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one ``transferkit train`` run depends on.

    Example:
        >>> cfg = TrainConfig(image_dir="photos", output_dir="runs/a", epochs=5)
        >>> cfg.replace(seed=1).seed
        1
    """

    image_dir: str
    output_dir: str
    backbone: str = "mobilenet_v2_035"
    weights: str = "imagenet"
    strategy: str = "freeze-all"
    head: str = "softmax"
    image_size: int | None = None
    batch_size: int | str = 32
    epochs: int = 500
    learning_rate: float = 1e-3
    patience: int = 20
    dropout: float = 0.0
    regularization: float = 1.0
    refit: bool = True
    search: bool = True
    unfreeze_blocks: int | None = None
    fine_tune_epochs: int = 20
    fine_tune_learning_rate: float | None = None  # None: strategies.fine_tune_rate decides from the data
    fine_tune_patience: int = 0
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    train_bn: bool = False
    auto_fine_tune_from: int = AUTO_FINE_TUNE_FROM
    auto_full_retrain_from: int = AUTO_FULL_RETRAIN_FROM
    augment: bool = True
    augment_flip: bool = True
    augment_crop: float = 0.35
    augment_rotation: float = 0.05
    augment_zoom: float = 0.0
    augment_translation: float = 0.0
    augment_brightness: float = 0.2
    augment_contrast: float = 0.2
    augment_saturation: float = 0.0
    augment_pca: float = 0.1
    augment_views: int = 0
    class_weight: str = "none"
    sampling: str = "natural"
    deterministic: bool = False
    mixed_precision: bool = False
    xla: bool = False
    distribute: str = "none"
    tensorboard: bool = False
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    cache_dir: str | None = None
    cache_dtype: str = "float32"
    min_accuracy: float | None = None
    overwrite: bool = False
    strict: bool = False

    def __post_init__(self):
        _check(self.strategy in STRATEGIES, "strategy", f"one of {', '.join(STRATEGIES)}", self.strategy)
        _check(self.unfreeze_blocks is None or self.unfreeze_blocks >= 1, "unfreeze_blocks", "an integer >= 1",
               self.unfreeze_blocks)
        _check(self.fine_tune_epochs >= 1, "fine_tune_epochs", "an integer >= 1", self.fine_tune_epochs)
        _check(self.fine_tune_learning_rate is None or 0 < self.fine_tune_learning_rate < 10,
               "fine_tune_learning_rate", "a number between 0 and 10", self.fine_tune_learning_rate)
        _check(self.fine_tune_patience >= 0, "fine_tune_patience", "an integer >= 0", self.fine_tune_patience)
        _check(self.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        _check(self.warmup_epochs >= 0, "warmup_epochs", "a number >= 0", self.warmup_epochs)
        _check(1 <= self.auto_fine_tune_from <= self.auto_full_retrain_from, "auto_fine_tune_from",
               "an integer >= 1 and <= --auto-full-retrain-from", self.auto_fine_tune_from)
        _check(0 < self.augment_crop <= 1, "augment_crop", "the smallest crop's share of the image, in (0, 1]",
               self.augment_crop)
        for name in ("augment_rotation", "augment_zoom", "augment_translation", "augment_brightness",
                     "augment_contrast", "augment_saturation", "augment_pca"):
            _check(0 <= getattr(self, name) <= 1, name, "a number in [0, 1] (0 turns it off)", getattr(self, name))
        _check(self.augment_views >= 0, "augment_views", "an integer >= 0", self.augment_views)
        _check(self.class_weight in ("none", "auto"), "class_weight", "none or auto", self.class_weight)
        _check(self.sampling in ("natural", "balanced"), "sampling", "natural or balanced", self.sampling)
        _check(self.distribute in DISTRIBUTE, "distribute", f"one of {', '.join(DISTRIBUTE)}", self.distribute)
        _check(self.head == "softmax" or self.strategy == "freeze-all", "head",
               "softmax with --strategy fine-tune-top/full-retrain/auto (scikit-learn heads train on frozen "
               "features: use --strategy freeze-all)", self.head)
        _check(self.image_size is None or self.image_size >= 8, "image_size", "an integer >= 8", self.image_size)
        _check(self.batch_size == "auto" or isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size",
               "an integer >= 1 or auto", self.batch_size)
        _check(self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        _check(0 < self.learning_rate < 10, "learning_rate", "a number between 0 and 10", self.learning_rate)
        _check(self.patience >= 0, "patience", "an integer >= 0", self.patience)
        _check(0 <= self.dropout < 1, "dropout", "a number in [0, 1)", self.dropout)
        _check(self.regularization >= 0, "regularization", "a number >= 0", self.regularization)
        _check(self.cache_dtype in ("float32", "float16"), "cache_dtype", "float32 or float16", self.cache_dtype)
        _check(0 < self.val_fraction < 1, "val_fraction", "a number in (0, 1)", self.val_fraction)
        _check(0 <= self.test_fraction < 1, "test_fraction", "a number in [0, 1)", self.test_fraction)
        _check(
            self.val_fraction + self.test_fraction < 1,
            "test_fraction",
            "val_fraction + test_fraction below 1, leaving images to train on",
            self.val_fraction + self.test_fraction,
        )
        _check(
            self.min_accuracy is None or 0 <= self.min_accuracy <= 1,
            "min_accuracy",
            "a number in [0, 1]",
            self.min_accuracy,
        )
        _check(isinstance(self.strict, bool), "strict", "true or false", self.strict)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FEATURE_FORMATS = ("npz", "parquet", "csv")


@dataclass(frozen=True)
class FeatureExportConfig:
    """Everything one ``transferkit features export`` depends on: the keys of its ``--config`` recipe.

    Example:
        >>> FeatureExportConfig("photos", "features.parquet").file_format
        'parquet'
    """

    image_dir: str
    output: str
    backbone: str = "mobilenet_v2_035"
    format: str | None = None
    weights: str = "imagenet"
    image_size: int | None = None
    batch_size: int = 32
    cache_dir: str | None = None
    cache_dtype: str = "float32"
    seed: int = 0
    augment_views: int = 0
    overwrite: bool = False
    strict: bool = False

    def __post_init__(self):
        _check(self.format is None or self.format in FEATURE_FORMATS, "format",
               f"one of {', '.join(FEATURE_FORMATS)}", self.format)
        _check(self.file_format in FEATURE_FORMATS, "format", f"one of {', '.join(FEATURE_FORMATS)}, or an output "
               f"file ending in .npz, .parquet or .csv (the format cannot be told from '{Path(self.output).name}')",
               self.format)
        _check(self.image_size is None or self.image_size >= 8, "image_size", "an integer >= 8", self.image_size)
        _check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        _check(self.cache_dtype in ("float32", "float16"), "cache_dtype", "float32 or float16", self.cache_dtype)
        _check(self.augment_views >= 0, "augment_views", "an integer >= 0", self.augment_views)

    @property
    def file_format(self) -> str:
        """``format``, else the output file's extension."""
        return self.format or Path(self.output).suffix.lower().lstrip(".")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check(ok: bool, name: str, expected: str, received: Any) -> None:
    if not ok:
        raise InputError(f"Invalid {_option(name)}: expected {expected}, received {received!r}.")


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_settings(data: Mapping[str, Any], cls: type = TrainConfig, source: str = "settings") -> dict[str, Any]:
    """Check a mapping of settings by name and type, without requiring every field.

    Keys may use ``-`` or ``_`` (``batch-size`` = ``batch_size``). Unknown keys fail with the
    nearest valid key; a value of the wrong type fails naming its option (YAML's ``ten`` for
    ``epochs``, or ``"no"`` for a flag, never reaches Keras).

    Returns:
        The settings with normalised keys and numbers (an integer where a float is expected).
    """
    hints = typing.get_type_hints(cls)
    values = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in hints:
            close = difflib.get_close_matches(key, sorted(hints), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise InputError(f"Unknown key '{raw_key}' in {source}.{hint} Valid keys: {', '.join(sorted(hints))}.")
        values[key] = _typed(key, value, hints[key], source)
    return values


def _typed(key: str, value: Any, hint: Any, source: str) -> Any:
    if typing.get_origin(hint) is tuple:  # a list of names, e.g. compare's heads: a YAML list or "a,b"
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and items and all(isinstance(item, str) for item in items):
            return tuple(item.strip() for item in items)
        raise InputError(f"Invalid {_option(key)} in {source}: expected a list of names or a comma-separated "
                         f"string, received {value!r}.")
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if isinstance(value, bool) and kind is not bool:
            continue  # YAML's true/false is never a number or a name
        if kind is bool and isinstance(value, bool) or kind is int and isinstance(value, int):
            return value
        if kind is float and isinstance(value, (int, float)):
            try:
                number = float(value)
            except OverflowError:  # an integer of hundreds of digits
                break
            if math.isfinite(number):  # nan and inf would pass range checks written as "not <" or ">="
                return number
            break
        if kind is str and isinstance(value, (str, int, float)):
            return str(value)
    expected = " or ".join(_EXPECTED.get(kind, "nothing") for kind in allowed)
    raise InputError(f"Invalid {_option(key)} in {source}: expected {expected}, received {value!r}.")


def config_from_dict(data: Mapping[str, Any], cls: type = TrainConfig, source: str = "settings"):
    """Build a config from a mapping, checked by :func:`check_settings`."""
    values = check_settings(data, cls, source)
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in values and f.default is dataclasses.MISSING]
    if missing:
        raise InputError(f"Missing {', '.join(_option(m) for m in missing)} in {source}.")
    return cls(**values)


def save_config(config, path: str | os.PathLike) -> None:
    """Write a config as YAML, atomically; ``overwrite`` is saved off, so a re-run never overwrites."""
    import yaml

    from transferkit import files

    data = config.to_dict()
    if "overwrite" in data:
        data["overwrite"] = False
    files.write_text(path, yaml.safe_dump(data, sort_keys=False))


def load_settings(path: str | os.PathLike, cls: type = TrainConfig) -> dict[str, Any]:
    """Read a YAML recipe or saved config: checked settings, not necessarily all of them."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise InputError(f"Cannot read config file '{path}': {exc.strerror or exc}.") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"Config file '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         "save it as UTF-8.") from exc
    except yaml.YAMLError as exc:
        raise InputError(f"Config file '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"Config file '{path}' must hold a mapping of option: value, found {type(data).__name__}.")
    return check_settings(data, cls, source=f"'{path}'")


def load_config(path: str | os.PathLike, cls: type = TrainConfig):
    """Read a complete config written by :func:`save_config` (or by hand)."""
    return config_from_dict(load_settings(path, cls), cls, source=f"'{path}'")
