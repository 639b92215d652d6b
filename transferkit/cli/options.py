"""Options and argument types shared by several commands, declared once.

Bounds and defaults come from :mod:`transferkit.config` (never retyped), so an option and a
recipe key are refused alike and cannot drift.
"""

from __future__ import annotations

from pathlib import Path

import click

from transferkit import config as limits
from transferkit.config import TrainConfig
from transferkit.errors import TransferkitError, short_repr

DEMO_BACKBONE = "mobilenet_v2_035"


def default(name: str):
    """A TrainConfig field's default, so an option's default cannot drift from the library's."""
    return TrainConfig.__dataclass_fields__[name].default


def backbone_option(default: str | None = DEMO_BACKBONE):
    return click.option(
        "--backbone", default=default, show_default=True, required=default is None,
        help="Backbone name; 'transferkit backbones' lists them.",
    )


weights_option = click.option(
    "--weights", default="imagenet", show_default=True,
    help="'imagenet' (Keras cache, bundled or downloaded), 'none' (random init) or a weights file path.",
)
class Bounded(click.IntRange):
    """An integer in ``[low, high]``: config.py's bounds, so an option and a recipe are refused alike.

    The message says what is allowed and why, and what was received (cut short).
    """

    def __init__(self, low: int, high: int, expected: str):
        super().__init__(low, high)
        self.expected = expected

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            received = short_repr(value) if not isinstance(value, str) else short_repr(value)[1:-1]
            self.fail(f"expected {self.expected}, received {received}.", param, ctx)


SEED = Bounded(0, limits.MAX_SEED, limits.SEED_RANGE)
EPOCHS = Bounded(1, limits.MAX_EPOCHS, limits.EPOCHS_RANGE)
AUGMENT_VIEWS = Bounded(0, limits.MAX_AUGMENT_VIEWS, limits.AUGMENT_VIEWS_RANGE)
BATCH_SIZE_OR_AUTO = Bounded(1, limits.MAX_BATCH_SIZE, f"{limits.BATCH_SIZE_RANGE}, or auto")

image_size_option = click.option(
    "--image-size", type=Bounded(limits.MIN_IMAGE_SIZE, limits.MAX_IMAGE_SIZE, limits.IMAGE_SIZE_RANGE),
    default=None, help="Input size in pixels (square). Default: the backbone's native size.",
)
class BatchSize(click.ParamType):
    """A positive integer up to config.MAX_BATCH_SIZE, or ``auto`` (``train --batch-size auto``)."""

    name = "integer|auto"

    def convert(self, value, param, ctx):
        return value if value == "auto" else BATCH_SIZE_OR_AUTO.convert(value, param, ctx)


batch_size_option = click.option(
    "--batch-size", type=Bounded(1, limits.MAX_BATCH_SIZE, limits.BATCH_SIZE_RANGE), default=32,
    show_default=True, help="Images per batch.")
cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False), default=None,
    help="Feature cache folder. Default: $TRANSFERKIT_CACHE_DIR or the user cache folder.",
)
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
allow_outside_option = click.option(
    "--allow-outside", is_flag=True,
    help="A manifest (.csv/.jsonl) may list images outside its own folder (../ or absolute paths).",
)
strict_option = click.option(
    "--strict", is_flag=True,
    help="Fail (exit 2, listing them) if any image file is skipped, instead of going on without it.",
)
cache_dtype_option = click.option(
    "--cache-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
    help="How cached vectors are stored; float16 halves the cache (vectors are used as float32).",
)
augment_views_option = click.option(
    "--augment-views", type=AUGMENT_VIEWS, default=0, show_default=True, metavar="K",
    help="Also cache K augmented views per image (random crop, flip, rotation, brightness, contrast, PCA "
         "colour at train's default augmentation strengths, seeded by --seed), so a head can train with "
         "augmentation.",
)




def stack(*decorators):
    """Several option decorators as one, applied in the order given (as if written one per line)."""

    def apply(function):
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


#: The options of every command that extracts features: where the backbone's weights come from,
#: its input size, the batch, and the cache.
extraction_options = stack(weights_option, image_size_option, batch_size_option, cache_dir_option, cache_dtype_option)


def seed_option(help: str):
    return click.option("--seed", type=SEED, default=0, show_default=True, help=help)


overwrite_file_option = click.option("--overwrite", is_flag=True, help="Replace an existing output file.")

tta_option = click.option(
    "--tta", is_flag=True,
    help="Test-time augmentation: average the predictions of 10 views per image (centre and 4 corner crops "
         "of 0.875 x the side, each also mirrored); about 10x slower.",
)

class ImageDir(click.Path):
    """An existing folder, a ``.csv`` or ``.jsonl`` manifest file, or a TensorFlow Datasets name
    ``tfds:NAME[:SPLIT]`` (checked for its form only)."""

    def __init__(self, exists: bool = True):
        super().__init__(exists=exists, file_okay=False)

    def convert(self, value, param, ctx):
        from transferkit.data.manifest import MANIFEST_SUFFIXES, is_manifest

        if is_manifest(value):
            if self.exists and not Path(value).is_file():
                self.fail(f"manifest '{value}' does not exist (or is not a file).", param, ctx)
            return value
        if Path(str(value)).is_file():
            self.fail(f"'{value}' is a file: give a folder of images, or a manifest ending in "
                      f"{' or '.join(MANIFEST_SUFFIXES)} (path,label[,split] rows).", param, ctx)
        if isinstance(value, str) and value.startswith("tfds:"):
            from transferkit.data.tfds import parse_tfds_name

            try:
                parse_tfds_name(value)
            except TransferkitError as exc:
                self.fail(str(exc), param, ctx)
            return value
        return super().convert(value, param, ctx)


IMAGE_DIR_TYPE = ImageDir()
image_dir_argument = click.argument("image_dir", type=IMAGE_DIR_TYPE, metavar="IMAGE_DIR")


def merge_config(config_path, options: dict, cls: type, **paths) -> dict:
    """A recipe's settings (``--config``), overridden by the environment, overridden by the flags.

    The one merge of every command that takes a recipe: recipe < ``TRANSFERKIT_<COMMAND>_<OPTION>``
    (Click's ``auto_envvar_prefix``, set on the group) < the command line. Options left at their
    default do not override the recipe; ``paths`` (IMAGE_DIR, -o) override it when given and are
    required in one place or the other.
    """
    from transferkit.config import load_settings

    ctx = click.get_current_context()
    settings = load_settings(config_path, cls) if config_path else {}
    for name, value in options.items():
        if not config_path or ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
            settings[name] = value
    settings.update({name: value for name, value in paths.items() if value})
    for name in paths:
        if not settings.get(name):
            raise click.UsageError(_MISSING[name])
    return settings


_MISSING = {
    "image_dir": "Missing argument 'IMAGE_DIR' (a folder with one sub-folder per class, a .csv or .jsonl "
                 "manifest, or tfds:NAME).",
    "output_dir": "Missing option '-o' / '--output-dir' (the folder to write).",
    "output": "Missing option '-o' / '--output' (the file to write).",
}
