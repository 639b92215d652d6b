"""Settings as frozen dataclasses, validated before any TensorFlow work.

A run's resolved settings are written to ``RUN_DIR/config.yaml`` and load back with
:func:`load_config`, so any run can be repeated exactly.  Unknown keys fail with the nearest
valid key suggested.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.errors import InputError

STRATEGIES = ("freeze-all",)


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
    image_size: int | None = None
    batch_size: int = 32
    epochs: int = 500
    learning_rate: float = 1e-3
    patience: int = 20
    dropout: float = 0.0
    regularization: float = 1.0
    refit: bool = True
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    cache_dir: str | None = None
    cache_dtype: str = "float32"
    min_accuracy: float | None = None
    overwrite: bool = False

    def __post_init__(self):
        _check(self.strategy in STRATEGIES, "strategy", f"one of {', '.join(STRATEGIES)}", self.strategy)
        _check(self.image_size is None or self.image_size >= 8, "image_size", "an integer >= 8", self.image_size)
        _check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
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

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

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
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if isinstance(value, bool) and kind is not bool:
            continue  # YAML's true/false is never a number or a name
        if kind is bool and isinstance(value, bool) or kind is int and isinstance(value, int):
            return value
        if kind is float and isinstance(value, (int, float)):
            return float(value)
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
    except yaml.YAMLError as exc:
        raise InputError(f"Config file '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"Config file '{path}' must hold a mapping of option: value, found {type(data).__name__}.")
    return check_settings(data, cls, source=f"'{path}'")


def load_config(path: str | os.PathLike, cls: type = TrainConfig):
    """Read a complete config written by :func:`save_config` (or by hand)."""
    return config_from_dict(load_settings(path, cls), cls, source=f"'{path}'")
