"""Settings as frozen dataclasses, validated before any TensorFlow work.

A run's resolved settings are written to ``RUN_DIR/config.yaml`` and load back with
:func:`load_config`, so any run can be repeated exactly.  Unknown keys fail with the nearest
valid key suggested.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit import files
from transferkit.errors import ArgumentError, InputError, short_repr
from transferkit.training.strategies import AUTO_FINE_TUNE_FROM, AUTO_FULL_RETRAIN_FROM, STRATEGIES

SCHEDULES = ("cosine", "one-cycle", "constant")
DISTRIBUTE = ("none", "mirrored", "multi-worker")
#: How the softmax head is fitted on cached features: exact (L-BFGS to the L2-regularised optimum,
#: C by cross-validation; transferkit.heads.softmax) or adam (Keras, epochs and early stopping).
HEAD_SOLVERS = ("exact", "adam")
#: How a backbone's input is scaled (Keras' ``imagenet_utils`` modes, or ``none`` where the backbone
#: rescales inside): the registry's ``preprocessing`` and the ``Preprocess`` layer's ``mode``.
PREPROCESSING_MODES = ("tf", "caffe", "torch", "none")
#: How cached vectors are stored (used as float32 either way).
CACHE_DTYPES = ("float32", "float16")

# Bounds of the numeric settings, the same for command-line options (cli/options.py builds its types from
# them) and recipes: a value outside them is a typo or an accident, refused before any work.
#: NumPy's and TensorFlow's seeds are unsigned 32-bit integers.
MAX_SEED = 2**32 - 1
#: The smallest input any backbone family accepts; families refuse more (backbones.check_image_size).
MIN_IMAGE_SIZE = 8
#: The largest native size in keras.applications is 600 px (EfficientNetB7); memory grows with the square of
#: the side, so 100,000 px would need a 112 GiB batch.
MAX_IMAGE_SIZE = 1024
#: Early stopping ends runs long before this; more is a typo (an extra zero or two).
MAX_EPOCHS = 100_000
#: A batch of 4,096 images of 224 px is already 2.5 GB of pixels.
MAX_BATCH_SIZE = 4096
#: Augmented views cached per image: each one is a backbone pass over every image.
MAX_AUGMENT_VIEWS = 1000

SEED_RANGE = f"an integer from 0 to {MAX_SEED} (2**32 - 1: NumPy and TensorFlow seeds are 32-bit)"
IMAGE_SIZE_RANGE = (f"an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels (the largest native size of a "
                    "keras.applications backbone is 600; memory grows with the square of the size)")
EPOCHS_RANGE = f"an integer from 1 to {MAX_EPOCHS} (early stopping usually ends a run within a few hundred)"
BATCH_SIZE_RANGE = f"an integer from 1 to {MAX_BATCH_SIZE}"
AUGMENT_VIEWS_RANGE = f"an integer from 0 to {MAX_AUGMENT_VIEWS}"


@dataclass(frozen=True, kw_only=True)
class FeatureSettings:
    """The settings every command that computes features shares (train, compare, extract, features
    export): the backbone, its weights and input size, the batch, the cache, the seed and whether a
    manifest may list images outside its folder. Declared and checked once here; each command's
    settings add their own fields (keyword-only here, so a command's positional fields, its image
    folder and output, come first).

    Example:
        >>> FeatureSettings(backbone="resnet50", seed=3).cache_dtype
        'float32'
    """

    #: Whether ``batch_size`` may be ``"auto"`` (train backs off on out-of-memory errors).
    AUTO_BATCH_SIZE: typing.ClassVar[bool] = False

    backbone: str = "mobilenet_v2_035"
    weights: str = "imagenet"
    image_size: int | None = None
    batch_size: int | str = 32  # "auto" only where AUTO_BATCH_SIZE
    cache_dir: str | None = None
    cache_dtype: str = "float32"
    seed: int = 0
    allow_outside: bool = False  # a manifest's paths may leave its folder

    def __post_init__(self):
        _check_image_size(self.image_size)
        auto = self.AUTO_BATCH_SIZE and self.batch_size == "auto"
        _check(auto or _in_range(self.batch_size, 1, MAX_BATCH_SIZE), "batch_size",
               BATCH_SIZE_RANGE + (", or auto" if self.AUTO_BATCH_SIZE else ""), self.batch_size)
        _check(self.cache_dtype in CACHE_DTYPES, "cache_dtype", " or ".join(CACHE_DTYPES), self.cache_dtype)
        _check(_in_range(self.seed, 0, MAX_SEED), "seed", SEED_RANGE, self.seed)
        _check(isinstance(self.allow_outside, bool), "allow_outside", "true or false", self.allow_outside)

    def feature_settings(self) -> dict[str, Any]:
        """The shared settings alone (the fields declared here), e.g. to make another command's settings."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(FeatureSettings)}

    def to_dict(self) -> dict[str, Any]:
        """The settings by name: the command's required ones (folder, output) first, then these shared
        ones, then the rest."""
        data = dataclasses.asdict(self)
        first = [f.name for f in dataclasses.fields(self) if f.default is dataclasses.MISSING]
        first += [f.name for f in dataclasses.fields(FeatureSettings)]
        return {**{name: data[name] for name in first}, **data}


@dataclass(frozen=True)
class TrainConfig(FeatureSettings):
    """Everything one ``transferkit train`` run depends on.

    Example:
        >>> cfg = TrainConfig(image_dir="photos", output_dir="runs/a", epochs=5)
        >>> cfg.replace(seed=1).seed
        1
    """

    AUTO_BATCH_SIZE: typing.ClassVar[bool] = True

    image_dir: str
    output_dir: str
    strategy: str = "freeze-all"
    head: str = "softmax"
    head_solver: str = "exact"
    flip_average: bool = True
    epochs: int = 500
    learning_rate: float = 1e-3
    patience: int = 20
    dropout: float = 0.0
    regularization: float | None = None  # None: chosen by cross-validation (exact head), 1.0 for adam
    refit: bool = True
    search: bool = True
    unfreeze_blocks: int | None = None
    fine_tune_epochs: int = 20
    fine_tune_learning_rate: float | None = None  # None: strategies.fine_tune_rate decides from the data
    fine_tune_patience: int = 0
    fine_tune_views: int = 4
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
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    min_accuracy: float | None = None
    overwrite: bool = False
    strict: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check(self.strategy in STRATEGIES, "strategy", f"one of {', '.join(STRATEGIES)}", self.strategy)
        _check(self.unfreeze_blocks is None or self.unfreeze_blocks >= 1, "unfreeze_blocks", "an integer >= 1",
               self.unfreeze_blocks)
        _check(1 <= self.fine_tune_epochs <= MAX_EPOCHS, "fine_tune_epochs", EPOCHS_RANGE, self.fine_tune_epochs)
        _check(self.fine_tune_learning_rate is None or 0 < self.fine_tune_learning_rate < 10,
               "fine_tune_learning_rate", "a number between 0 and 10", self.fine_tune_learning_rate)
        _check(self.fine_tune_patience >= 0, "fine_tune_patience", "an integer >= 0", self.fine_tune_patience)
        _check(0 <= self.fine_tune_views <= MAX_AUGMENT_VIEWS, "fine_tune_views", AUGMENT_VIEWS_RANGE,
               self.fine_tune_views)
        _check(self.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        _check(0 <= self.warmup_epochs <= MAX_EPOCHS, "warmup_epochs", f"a number from 0 to {MAX_EPOCHS}",
               self.warmup_epochs)
        _check(1 <= self.auto_fine_tune_from <= self.auto_full_retrain_from, "auto_fine_tune_from",
               "an integer >= 1 and <= --auto-full-retrain-from", self.auto_fine_tune_from)
        _check(0 < self.augment_crop <= 1, "augment_crop", "the smallest crop's share of the image, in (0, 1]",
               self.augment_crop)
        for name in ("augment_rotation", "augment_zoom", "augment_translation", "augment_brightness",
                     "augment_contrast", "augment_saturation", "augment_pca"):
            _check(0 <= getattr(self, name) <= 1, name, "a number in [0, 1] (0 turns it off)", getattr(self, name))
        _check(0 <= self.augment_views <= MAX_AUGMENT_VIEWS, "augment_views", AUGMENT_VIEWS_RANGE,
               self.augment_views)
        _check(self.class_weight in ("none", "auto"), "class_weight", "none or auto", self.class_weight)
        _check(self.sampling in ("natural", "balanced"), "sampling", "natural or balanced", self.sampling)
        _check(self.distribute in DISTRIBUTE, "distribute", f"one of {', '.join(DISTRIBUTE)}", self.distribute)
        _check(self.head == "softmax" or self.strategy == "freeze-all", "head",
               "softmax with --strategy fine-tune-top/full-retrain/auto (scikit-learn heads train on frozen "
               "features: use --strategy freeze-all)", self.head)
        _check(_in_range(self.epochs, 1, MAX_EPOCHS), "epochs", EPOCHS_RANGE, self.epochs)
        _check(0 < self.learning_rate < 10, "learning_rate", "a number between 0 and 10", self.learning_rate)
        _check(self.patience >= 0, "patience", "an integer >= 0", self.patience)
        _check(0 <= self.dropout < 1, "dropout", "a number in [0, 1)", self.dropout)
        _check(self.regularization is None or self.regularization >= 0, "regularization",
               "a number >= 0, or none (chosen by cross-validation)", self.regularization)
        _check(self.head_solver in HEAD_SOLVERS, "head_solver", f"one of {', '.join(HEAD_SOLVERS)}", self.head_solver)
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


FEATURE_FORMATS = ("npz", "parquet", "csv")


@dataclass(frozen=True)
class FeatureExportConfig(FeatureSettings):
    """Everything one ``transferkit features export`` depends on: the keys of its ``--config`` recipe.

    Example:
        >>> FeatureExportConfig("photos", "features.parquet").file_format
        'parquet'
    """

    image_dir: str
    output: str
    format: str | None = None
    augment_views: int = 0
    overwrite: bool = False
    strict: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check(self.format is None or self.format in FEATURE_FORMATS, "format",
               f"one of {', '.join(FEATURE_FORMATS)}", self.format)
        _check(self.file_format in FEATURE_FORMATS, "format", f"one of {', '.join(FEATURE_FORMATS)}, or an output "
               f"file ending in .npz, .parquet or .csv (the format cannot be told from "
               f"{short_repr(Path(self.output).name)})",
               self.format)
        _check(_in_range(self.augment_views, 0, MAX_AUGMENT_VIEWS), "augment_views", AUGMENT_VIEWS_RANGE,
               self.augment_views)

    @property
    def file_format(self) -> str:
        """``format``, else the output file's extension."""
        return self.format or Path(self.output).suffix.lower().lstrip(".")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check(ok: bool, name: str, expected: str, received: Any) -> None:
    if not ok:
        raise ArgumentError(name, expected, received)


def _in_range(value: Any, low: int, high: int) -> bool:
    """Whether ``value`` is an integer (not a bool) in ``[low, high]``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_image_size(image_size: int | None) -> None:
    _check(image_size is None or _in_range(image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), "image_size",
           IMAGE_SIZE_RANGE, image_size)


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_settings(data: Mapping[str, Any], cls: type = TrainConfig, source: str = "settings") -> dict[str, Any]:
    """Check a mapping of settings by name and type, without requiring every field.

    Keys may use ``-`` or ``_`` (``batch-size`` = ``batch_size``). Unknown keys fail with the
    nearest valid key; a value of the wrong type fails naming its option (YAML's ``ten`` for
    ``epochs``, or ``"no"`` for a flag, never reaches Keras).

    Returns:
        The settings with normalised keys and numbers (an integer where a float is expected).
    """
    types_ = typing.get_type_hints(cls)
    hints = {f.name: types_[f.name] for f in dataclasses.fields(cls)}  # settings only, not class constants
    values = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in hints:
            close = difflib.get_close_matches(key, sorted(hints), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise InputError(f"Unknown key {short_repr(str(raw_key))} in {source}.{hint} "
                             f"Valid keys: {', '.join(sorted(hints))}.")
        values[key] = _typed(key, value, hints[key], source)
    return values


def _typed(key: str, value: Any, hint: Any, source: str) -> Any:
    if typing.get_origin(hint) is tuple:  # a list of names, e.g. compare's heads: a YAML list or "a,b"
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and items and all(isinstance(item, str) for item in items):
            return tuple(item.strip() for item in items)
        raise InputError(f"Invalid {_option(key)} in {source}: expected a list of names or a comma-separated "
                         f"string, received {short_repr(value)}.")
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
    raise InputError(f"Invalid {_option(key)} in {source}: expected {expected}, received {short_repr(value)}.")


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
    """Read a YAML recipe or saved config (:func:`read_yaml`): checked settings, not necessarily all of them."""
    return check_settings(read_yaml(path, "Config file"), cls, source=f"'{path}'")


def load_config(path: str | os.PathLike, cls: type = TrainConfig):
    """Read a complete config written by :func:`save_config` (or by hand)."""
    return config_from_dict(load_settings(path, cls), cls, source=f"'{path}'")


# ----------------------------------------------------------------------------- YAML

#: The largest YAML file transferkit reads. Settings files are about 1 KB; PyYAML needs seconds for a 64 KiB
#: file of one long list (about 5 s pure Python, under 1 s with libyaml), and a minute for 1 MiB.
MAX_YAML_BYTES = 64 * 1024
#: Deeper nesting than any settings file needs (PyYAML composes recursively).
MAX_YAML_DEPTH = 32


class _YamlRefused(Exception):
    """Something the strict loader does not accept, at a line of the file."""

    def __init__(self, message: str, mark):
        super().__init__(message)
        self.line = mark.line + 1 if mark is not None else None


@functools.cache
def _strict_loader(base: type) -> type:
    """A safe loader (``base``: ``yaml.CSafeLoader`` or ``yaml.SafeLoader``) that refuses duplicate keys."""
    import yaml

    class StrictLoader(base):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                first_line: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if not isinstance(key_node, yaml.ScalarNode):
                        continue  # a list or mapping as a key: the safe loader refuses it itself
                    key = self.construct_object(key_node)
                    if key in first_line:
                        raise _YamlRefused(f"key {short_repr(key)} appears twice (first on line {first_line[key]}); "
                                           "keep one of them", key_node.start_mark)
                    first_line[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def _load_strict_yaml(text: str) -> Any:
    """Safe YAML without anchors and aliases, nested at most :data:`MAX_YAML_DEPTH` deep, no duplicate keys.

    The events are checked before anything is built: an alias is how a "billion laughs" file expands a few
    hundred bytes into gigabytes (and settings never need one).
    """
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it: 5x faster
    depth = 0
    for event in yaml.parse(text, Loader=base):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _YamlRefused("YAML anchors and aliases (&name, *name, <<: *name) are not allowed in transferkit "
                               "files; write each value out", event.start_mark)
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise _YamlRefused(f"values are nested more than {MAX_YAML_DEPTH} levels deep", event.start_mark)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return yaml.load(text, Loader=_strict_loader(base))  # noqa: S506 - a safe loader


def read_yaml(path: str | os.PathLike, what: str = "YAML file", fix: str = "") -> dict[str, Any]:
    """Read a YAML file of settings: the one way transferkit reads YAML (recipes, a run's ``config.yaml``).

    Safe YAML only (no Python objects), at most :data:`MAX_YAML_BYTES`, no anchors or aliases, no
    duplicate keys, at most :data:`MAX_YAML_DEPTH` levels, and a mapping at the top (an empty file is
    ``{}``). Messages name the file and the line and never echo more than a short excerpt.

    Args:
        path: The file.
        what: How messages call it, e.g. ``"Config file"`` or ``"Run settings"``.
        fix: What to do, added to every message (e.g. "Train the run again.").

    Raises:
        InputError: the file cannot be read or breaks one of the rules above.

    Example:
        >>> read_yaml("recipes/ants-bees-fine-tune.yaml")["strategy"]  # doctest: +SKIP
        'fine-tune-top'
    """
    import yaml

    path = Path(path)
    fix = f" {fix}" if fix else ""
    try:
        data = files.read_regular_bytes(path, MAX_YAML_BYTES)
    except files.NotRegularFileError as exc:  # a FIFO, opened the plain way, would block forever
        raise InputError(f"{what} '{path}' is {exc.strerror}; give a YAML file.{fix}") from None
    except files.FileTooLargeError:
        raise InputError(f"{what} '{path}' is larger than {MAX_YAML_BYTES // 1024} KiB; settings files are a few "
                         f"KB. Check that it is the right file.{fix}") from None
    except OSError as exc:
        raise InputError(f"Cannot read {what.lower()} '{path}': {exc.strerror or exc}.{fix}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         f"save it as UTF-8.{fix}") from exc
    try:
        value = _load_strict_yaml(text)
    except _YamlRefused as exc:
        where = f" line {exc.line}" if exc.line else ""
        raise InputError(f"{what} '{path}'{where}: {exc}.{fix}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{what} '{path}' is not valid YAML: {str(exc)[:500]}{fix}") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4,300 digits
        reason = str(exc).split(";")[0][:200]
        raise InputError(f"{what} '{path}' holds a value transferkit cannot read: {reason}.{fix}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{what} '{path}' must hold a mapping of option: value (e.g. 'epochs: 10'), found a "
                         f"{type(value).__name__}: {short_repr(value)}.{fix}")
    return value
