"""The ``transferkit`` command line: parses options, calls the library, maps errors to exit codes.

Only this module prints.  TensorFlow is imported inside the commands that need it, so ``--help``
and ``transferkit backbones`` answer at once.  Exit codes: 0 success, 1 runtime error or a failed
``--min-accuracy`` gate, 2 usage error (bad option, path or input), 130 interrupted.
"""

from __future__ import annotations

import codecs
import functools
import json
import logging
import sys
from pathlib import Path

import click

from transferkit import DEMO_DIR, __version__, runtime
from transferkit import config as limits
from transferkit.config import DISTRIBUTE, HEAD_SOLVERS, SCHEDULES, TrainConfig
from transferkit.errors import TransferkitError, short_repr
from transferkit.strategies import STRATEGIES

log = logging.getLogger("transferkit")

DEMO_BACKBONE = "mobilenet_v2_035"


def _default(name: str):
    """A TrainConfig field's default, so an option's default cannot drift from the library's."""
    return TrainConfig.__dataclass_fields__[name].default


class _ClickHandler(logging.Handler):
    """Library log records to stderr; warnings in yellow."""

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if record.levelno >= logging.WARNING:
            message = click.style(message, fg="yellow")
        click.echo(message, err=True)


def _console_escape(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler for the console: what cannot be printed is shown as an escape, never an error.

    A file name's bytes that are not UTF-8 (surrogates) show as ``\\xNN`` (as files.display_name), any
    other character the terminal's encoding lacks as ``\\uNNNN``.
    """
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    shown = "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}"
                    if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}" for c in exc.object[exc.start:exc.end])
    return shown, exc.end


codecs.register_error("transferkit.console", _console_escape)


def _console_never_fails() -> None:
    """Printing a file name (or anything) must not crash a command: the streams escape what they cannot encode."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="transferkit.console")
        except (AttributeError, ValueError, OSError):  # not a TextIOWrapper (a test's stream): leave it
            pass


def _handle_errors(func):
    """Turn library errors into a one-line message and an exit code (traceback only with --debug)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = ctx.find_root().params.get("debug", False)
        try:
            return func(*args, **kwargs)
        except TransferkitError as exc:
            if debug:
                raise
            click.echo(click.style("Error: ", fg="red", bold=True) + str(exc), err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:  # disk full, permissions, a folder removed mid-run
            if debug:
                raise
            where = f" '{exc.filename}'" if exc.filename else ""
            click.echo(click.style("Error: ", fg="red", bold=True) + f"cannot access{where}: "
                       f"{exc.strerror or exc}. Check the path, free space and permissions.", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            message = "Interrupted. Finished features are kept in the cache; run again to resume."
            run_dir = ctx.params.get("output_dir") or ctx.params.get("resume_dir")
            if ctx.info_name == "train" and run_dir:
                message += f" Continue the training with: transferkit train --resume {run_dir}"
            click.echo(message, err=True)
            ctx.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="transferkit")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
def main(debug: bool) -> None:
    """Transfer learning for Keras 3: train, evaluate and use image classifiers built on
    ImageNet-pretrained backbones, from a folder with one sub-folder per class.

    \b
    Start here:   transferkit demo
    Your data:    transferkit train PHOTOS_DIR -o runs/first
    """
    _console_never_fails()
    logging.basicConfig(level=logging.WARNING)
    log.handlers[:] = [_ClickHandler()]
    log.setLevel(logging.INFO)
    log.propagate = False
    runtime.show_startup_logs = debug


# ----------------------------------------------------------------------------- shared options

def _backbone_option(default: str | None = DEMO_BACKBONE):
    return click.option(
        "--backbone", default=default, show_default=True, required=default is None,
        help="Backbone name; 'transferkit backbones' lists them.",
    )


_weights_option = click.option(
    "--weights", default="imagenet", show_default=True,
    help="'imagenet' (Keras cache, bundled or downloaded), 'none' (random init) or a weights file path.",
)
class _Bounded(click.IntRange):
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


_SEED = _Bounded(0, limits.MAX_SEED, limits.SEED_RANGE)
_EPOCHS = _Bounded(1, limits.MAX_EPOCHS, limits.EPOCHS_RANGE)
_AUGMENT_VIEWS = _Bounded(0, limits.MAX_AUGMENT_VIEWS, limits.AUGMENT_VIEWS_RANGE)
_BATCH_SIZE_OR_AUTO = _Bounded(1, limits.MAX_BATCH_SIZE, f"{limits.BATCH_SIZE_RANGE}, or auto")

_image_size_option = click.option(
    "--image-size", type=_Bounded(limits.MIN_IMAGE_SIZE, limits.MAX_IMAGE_SIZE, limits.IMAGE_SIZE_RANGE),
    default=None, help="Input size in pixels (square). Default: the backbone's native size.",
)
class _BatchSize(click.ParamType):
    """A positive integer up to config.MAX_BATCH_SIZE, or ``auto`` (``train --batch-size auto``)."""

    name = "integer|auto"

    def convert(self, value, param, ctx):
        return value if value == "auto" else _BATCH_SIZE_OR_AUTO.convert(value, param, ctx)


_batch_size_option = click.option(
    "--batch-size", type=_Bounded(1, limits.MAX_BATCH_SIZE, limits.BATCH_SIZE_RANGE), default=32,
    show_default=True, help="Images per batch.")
_cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False), default=None,
    help="Feature cache folder. Default: $TRANSFERKIT_CACHE_DIR or the user cache folder.",
)
_quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
_strict_option = click.option(
    "--strict", is_flag=True,
    help="Fail (exit 2, listing them) if any image file is skipped, instead of going on without it.",
)
_cache_dtype_option = click.option(
    "--cache-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
    help="How cached vectors are stored; float16 halves the cache (vectors are used as float32).",
)
_augment_views_option = click.option(
    "--augment-views", type=_AUGMENT_VIEWS, default=0, show_default=True, metavar="K",
    help="Also cache K augmented views per image (random crop, flip, rotation, brightness, contrast, PCA "
         "colour at train's default augmentation strengths, seeded by --seed), so a head can train with "
         "augmentation.",
)


_tta_option = click.option(
    "--tta", is_flag=True,
    help="Test-time augmentation: average the predictions of 10 views per image (centre and 4 corner crops "
         "of 0.875 x the side, each also mirrored); about 10x slower.",
)

class _ImageDir(click.Path):
    """An existing folder, or a TensorFlow Datasets name ``tfds:NAME[:SPLIT]`` (checked for its form only)."""

    def __init__(self):
        super().__init__(exists=True, file_okay=False)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.startswith("tfds:"):
            from transferkit.tfds_folder import parse_tfds_name

            try:
                parse_tfds_name(value)
            except TransferkitError as exc:
                self.fail(str(exc), param, ctx)
            return value
        return super().convert(value, param, ctx)


IMAGE_DIR_TYPE = _ImageDir()
_image_dir_argument = click.argument("image_dir", type=IMAGE_DIR_TYPE, metavar="IMAGE_DIR")


# ----------------------------------------------------------------------------- backbones

@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_handle_errors
def backbones(as_json: bool) -> None:
    """List the backbones: input size, feature size, parameters, offline weights."""
    from transferkit.backbones import list_backbones
    from transferkit.weights import BUNDLED_WEIGHTS_DIR, find_offline

    rows = []
    for spec in list_backbones():
        local = find_offline(spec) if spec.pretrained else None
        offline = "bundled" if local and local.parent == BUNDLED_WEIGHTS_DIR else ("cache" if local else "")
        rows.append({
            "name": spec.name, "family": spec.family, "input_size": spec.input_size,
            "feature_dim": spec.feature_dim, "num_params": spec.num_params, "num_blocks": spec.num_blocks,
            "preprocessing": spec.preprocessing, "pretrained": spec.pretrained,
            "weights_offline": offline or None,
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = f"{'name':<22} {'input':>5} {'features':>8} {'params':>8} {'blocks':>6}  offline weights"
    click.echo(header)
    click.echo("-" * len(header))
    for row in rows:
        offline = row["weights_offline"] or ("-" if row["pretrained"] else "n/a (test backbone)")
        click.echo(
            f"{row['name']:<22} {row['input_size']:>5} {row['feature_dim']:>8} "
            f"{row['num_params'] / 1e6:>7.1f}M {row['num_blocks']:>6}  {offline}"
        )
    from transferkit.weights import keras_models_dir

    click.echo(f"\nOffline weights are looked up in {keras_models_dir()} (KERAS_HOME) and in the package.")


# ----------------------------------------------------------------------------- weights

@main.group()
def weights() -> None:
    """Manage ImageNet weights files in Keras' cache."""


@weights.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@_backbone_option(default=None)
@_image_size_option
@_handle_errors
def weights_import(file: str, backbone: str, image_size: int | None) -> None:
    """Verify FILE by loading it into a backbone, then place it in Keras' cache.

    Use it to bring weights downloaded on another machine to an offline one.
    """
    from transferkit.backbones import get_backbone
    from transferkit.weights import import_weights

    spec = get_backbone(backbone)
    runtime.start_tensorflow()
    target = import_weights(file, spec, image_size)
    click.echo(f"Verified {file} for {spec.name}; placed at {target}.")


# ----------------------------------------------------------------------------- extract

@main.command()
@_image_dir_argument
@_backbone_option()
@_weights_option
@_image_size_option
@_batch_size_option
@_cache_dir_option
@_cache_dtype_option
@click.option("--seed", type=_SEED, default=0, show_default=True,
              help="Seed of the random initialisation with --weights none (so re-runs hit the cache).")
@click.option("--num-shards", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the images across this many workers (e.g. jobs of a cluster scheduler).")
@click.option("--shard-index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which part this worker extracts (0 .. num-shards - 1).")
@_augment_views_option
@_strict_option
@_quiet_option
@_handle_errors
def extract(image_dir, backbone, weights, image_size, batch_size, cache_dir, cache_dtype, seed, num_shards,
            shard_index, augment_views, strict, quiet) -> None:
    """Compute the pooled bottleneck features of every image in IMAGE_DIR into the cache.

    Images already in the cache (same bytes, same settings) are not computed again. With
    --num-shards N, N workers (--shard-index 0 .. N-1) each extract a fixed part, chosen by a
    hash of each file's relative path; 'transferkit cache merge' then joins their caches.
    """
    from transferkit.data import stable_fraction

    if shard_index >= num_shards:
        raise click.BadParameter(f"must be below --num-shards ({num_shards}), received {shard_index}",
                                 param_hint="--shard-index")
    folder, paths, result, cache = _extract_folder(
        image_dir, backbone, weights, image_size, batch_size, cache_dir, cache_dtype, seed, quiet,
        select=lambda rel: int(stable_fraction(rel, 0) * num_shards) == shard_index, keep_vectors=False,
        strict=strict, views=augment_views)
    skipped = list(folder.skipped) + result.skipped_files(paths)
    rate = f"; {result.images_per_second:.1f} images/s" if result.num_computed else ""
    part = f" (part {shard_index + 1} of {num_shards}: {len(paths)} images)" if num_shards > 1 else ""
    click.echo(
        f"Images seen: {len(folder.paths) + len(folder.skipped)}{part}; computed: {result.num_computed}; "
        f"already cached: {result.num_cached}; skipped: {len(skipped)}; ignored: {folder.num_ignored} "
        f"(hidden, system and non-image files){rate}.\nCache: {cache.dir}"
    )
    if augment_views:
        rate = f"; {result.views_per_second:.1f} views/s" if result.num_views_computed else ""
        click.echo(f"Augmented views ({augment_views} per image): computed: {result.num_views_computed}; "
                   f"already cached: {result.num_views_cached}{rate}.")


def _extract_folder(image_dir, backbone, weights, image_size, batch_size, cache_dir, cache_dtype, seed, quiet,
                    select=None, keep_vectors=True, strict=False, views=0):
    """Scan, check, then compute (or look up) the features of a folder: shared by extract and export.

    With ``views`` K, also K augmented views per image (TrainConfig's default strengths, ``seed``).

    Returns:
        ``(folder, relative paths extracted, ExtractionResult, FeatureCache)``; skipped files
        are logged (with ``strict``, any skipped file raises instead).
    """
    from transferkit import runs
    from transferkit.backbones import check_image_size, get_backbone
    from transferkit.cache import FeatureCache, FeatureSpec, default_cache_dir, extract_features
    from transferkit.checks import check_strict
    from transferkit.data import scan_folder
    from transferkit.weights import load_backbone, resolve_weights

    spec = get_backbone(backbone)
    size = check_image_size(spec, image_size)
    folder = scan_folder(image_dir, seed=seed)  # the hash split of train with the same --seed
    if strict:
        check_strict(folder.skipped)  # before any TensorFlow work
    paths = [p for p in folder.paths if select is None or select(p)]
    resolved = resolve_weights(spec, weights, size)
    cache_dir = runs.check_cache_dir(cache_dir or default_cache_dir(), (image_dir, folder.root))
    runtime.start_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)  # --weights none: the same seed gives the same vectors
    model = load_backbone(spec, resolved, size)
    cache = FeatureCache(cache_dir, FeatureSpec.for_model(spec, model, cache_dtype))
    augmentation = TrainConfig(image_dir=str(image_dir), output_dir="", seed=seed) if views else None
    result = extract_features(model, [folder.abs_path(p) for p in paths], cache, batch_size=batch_size,
                              verbose=0 if quiet else 1, keep_vectors=keep_vectors, views=views,
                              augmentation=augmentation)
    skipped = list(folder.skipped) + result.skipped_files(paths)
    if strict:
        check_strict(skipped)  # the vectors computed so far stay in the cache
    for rel, reason in skipped:
        log.warning("Skipped %s: %s", rel, reason)
    return folder, paths, result, cache


# ----------------------------------------------------------------------------- features

@main.group()
def features() -> None:
    """Bottleneck features for use in other tools."""


@features.command("export")
@click.argument("image_dir", type=IMAGE_DIR_TYPE, required=False, metavar="IMAGE_DIR")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="YAML recipe of these options (e.g. recipes/ants-bees-export-features.yaml); flags override it.")
@_backbone_option()
@click.option("--format", "format", type=click.Choice(["npz", "parquet", "csv"]), default=None,
              help="File format. Default: from the -o file's extension.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False),
              help="File to write (required, here or in --config): one row per image (relative path, label, split, "
                   "feature vector).")
@_weights_option
@_image_size_option
@_batch_size_option
@_cache_dir_option
@_cache_dtype_option
@click.option("--seed", type=_SEED, default=0, show_default=True, help="Seed of the split (and of --weights none).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@_augment_views_option
@_strict_option
@_quiet_option
@_handle_errors
def features_export(image_dir, output, config_path, quiet, **options) -> None:
    """Write the features of every image in IMAGE_DIR to one npz, parquet or CSV file.

    Features come from the cache where present. Rows: path (relative to IMAGE_DIR), label
    (class index), class_name, split (as train would make it with the same --seed), then the
    vector (columns f0, f1, ... in parquet and CSV; an array 'features' in npz). With
    --augment-views K, K + 1 rows per image and a column 'view' after split: 0 is the image
    itself, 1..K its augmented views. IMAGE_DIR may be tfds:NAME[:SPLIT] (TensorFlow Datasets).
    """
    import numpy as np

    from transferkit.cache import write_features
    from transferkit.config import FeatureExportConfig, config_from_dict

    settings = _merge_config(config_path, options, FeatureExportConfig, image_dir=image_dir, output=output)
    config = config_from_dict(settings, FeatureExportConfig, source="the options")
    output, file_format, augment_views = Path(config.output), config.file_format, config.augment_views
    if output.exists() and not config.overwrite:
        raise click.BadParameter(f"'{output}' exists; pass --overwrite to replace it", param_hint="-o/--output")
    from transferkit.runs import check_outside_inputs, check_writable_dir

    check_outside_inputs(output, "-o/--output", [config.image_dir])  # never write into the image folder
    output.resolve().parent.mkdir(parents=True, exist_ok=True)  # as train makes its run folder

    check_writable_dir(output.resolve().parent, "-o/--output")  # a read-only folder fails now, not at the end
    folder, paths, result, cache = _extract_folder(
        config.image_dir, config.backbone, config.weights, config.image_size, config.batch_size, config.cache_dir,
        config.cache_dtype, config.seed, quiet, strict=config.strict, views=augment_views)
    from transferkit.cache import FileHashes
    from transferkit.checks import dataset_warnings

    # The rows carry each image's split: say so when a copy of one image sits in two splits.
    hashes = FileHashes(cache.root).hashes([folder.abs_path(p) for p in folder.paths])  # remembered: no re-read
    for message in dataset_warnings(folder, hashes):
        log.warning(message)
    index = {p: i for i, p in enumerate(folder.paths)}
    rows = [index[p] for p, good in zip(paths, result.ok, strict=True) if good]
    from transferkit.training import assign_roles

    used = np.zeros(len(folder.paths), dtype=bool)
    used[rows] = True
    # Train's rule, not the folders' names: a train/val folder's val/ is train's test split (and a
    # share of train/ its early-stopping val), so the split column is the split train uses.
    roles = assign_roles(folder, used, config.seed, check=False)
    vectors, views = result.vectors[result.ok], None
    if augment_views:  # K + 1 rows per image, image by image: view 0 (the image), then its views 1..K
        vectors = np.concatenate([vectors[:, None], result.view_vectors[result.ok]], axis=1)
        vectors = vectors.reshape(-1, vectors.shape[-1])
        rows = np.repeat(rows, augment_views + 1).tolist()
        views = np.tile(np.arange(augment_views + 1), len(rows) // (augment_views + 1))
    write_features(output, file_format, [folder.paths[i] for i in rows], folder.labels[rows], folder.class_names,
                   [str(roles[i]) for i in rows], vectors, views=views)
    click.echo(f"Wrote {len(rows)} rows x {result.vectors.shape[1]} features to {output} ({file_format}).")


@features.command("plot")
@_image_dir_argument
@_backbone_option()
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), required=True,
              help="PNG file to write.")
@click.option("--method", type=click.Choice(["pca", "tsne", "both"]), default="pca", show_default=True,
              help="pca: linear, fast; tsne: keeps neighbourhoods (slower, sampled); both: side by side.")
@click.option("--max-points", type=click.IntRange(min=3), default=None,
              help="Images drawn (a stratified sample). Default: 2,000 for t-SNE, 10,000 for PCA.")
@_weights_option
@_image_size_option
@_batch_size_option
@_cache_dir_option
@_cache_dtype_option
@click.option("--seed", type=_SEED, default=0, show_default=True, help="Seed of the sample and of t-SNE.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@_quiet_option
@_handle_errors
def features_plot(image_dir, backbone, output_path, method, max_points, weights, image_size, batch_size, cache_dir,
                  cache_dtype, seed, overwrite, quiet) -> None:
    """Draw the features of IMAGE_DIR in 2-D, coloured by class: how separable are the classes?

    Features come from the cache (computed where missing). Well separated clusters mean a
    head on the frozen backbone (freeze-all) can tell the classes apart; overlapping ones
    suggest fine-tuning, a bigger backbone or cleaner labels.
    """
    from transferkit import files, plots

    output = Path(output_path)
    if output.suffix.lower() != ".png":
        raise click.BadParameter(f"must end in .png, received '{output.name}'", param_hint="-o/--output")
    if output.exists() and not overwrite:
        raise click.BadParameter(f"'{output}' exists; pass --overwrite to replace it", param_hint="-o/--output")
    if not output.resolve().parent.is_dir():
        raise click.BadParameter(f"folder '{output.parent}' does not exist", param_hint="-o/--output")
    from transferkit.runs import check_outside_inputs

    check_outside_inputs(output, "-o/--output", [image_dir])  # never write into the image folder
    folder, _, result, _ = _extract_folder(image_dir, backbone, weights, image_size, batch_size, cache_dir,
                                           cache_dtype, seed, quiet)
    vectors, labels = result.vectors[result.ok], folder.labels[result.ok]
    methods = ["pca", "tsne"] if method == "both" else [method]
    projections = [plots.project_features(vectors, labels, m, max_points=max_points, seed=seed) for m in methods]
    title = f"{Path(image_dir).resolve().name}: {backbone} features"
    files.write_bytes(output, plots.feature_map_png(projections, folder.class_names, title))
    drawn = ", ".join(f"{info['method']}: {info['num_points']} of {info['num_total']} images"
                      for _, _, info in projections)
    click.echo(f"Wrote {output} ({drawn}; {len(folder.class_names)} classes).")


@main.command("lr-find")
@_image_dir_argument
@_backbone_option()
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), required=True,
              help="PNG file for the loss-against-rate plot.")
@_weights_option
@_image_size_option
@_batch_size_option
@_cache_dir_option
@_cache_dtype_option
@click.option("--seed", type=_SEED, default=0, show_default=True, help="Seed of the split and the sweep.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@_quiet_option
@_handle_errors
def lr_find(image_dir, backbone, output_path, weights, image_size, batch_size, cache_dir, cache_dtype, seed, overwrite,
            quiet) -> None:
    """Sweep the head's learning rate on IMAGE_DIR's training split and suggest one.

    The sweep trains a softmax head on the cached features with the rate growing each batch
    (the range test of Smith 2015, as fastai's lr_find); the plot shows the loss against the
    rate. The suggestion (steepest fall of the loss) is a starting point, not a guarantee:
    check the plot, then pass it to train --learning-rate, with train --head-solver adam (the
    default, exact head has no learning rate).
    """
    import numpy as np

    from transferkit import files
    from transferkit.config import TrainConfig
    from transferkit.lr_find import find_learning_rate, plot_sweep

    output = Path(output_path)
    if output.suffix.lower() != ".png":
        raise click.BadParameter(f"must end in .png, received '{output.name}'", param_hint="-o/--output")
    if output.exists() and not overwrite:
        raise click.BadParameter(f"'{output}' exists; pass --overwrite to replace it", param_hint="-o/--output")
    from transferkit.runs import check_outside_inputs

    check_outside_inputs(output, "-o/--output", [image_dir])  # never write into the image folder
    folder, paths, result, _ = _extract_folder(image_dir, backbone, weights, image_size, batch_size, cache_dir,
                                               cache_dtype, seed, quiet)
    train = result.ok & (np.array(folder.splits) == "train")
    sweep = find_learning_rate(result.vectors[train], folder.labels[train],
                               TrainConfig(str(image_dir), "", batch_size=batch_size, seed=seed))
    files.write_bytes(output, plot_sweep(sweep, f"{Path(image_dir).resolve().name}: {backbone} head"))
    click.echo(f"Swept {len(sweep.rates)} rates on {int(train.sum())} training images; lowest loss at "
               f"{sweep.min_loss_rate:.1e}.")
    click.echo(f"Suggested learning rate: {sweep.suggestion:.1e} for --head-solver adam (steepest fall of the loss; "
               f"a suggestion, check the plot: {output}).")


# ----------------------------------------------------------------------------- cache

@main.group()
def cache() -> None:
    """Inspect and maintain the feature cache (the folder of extract --cache-dir and train --cache-dir)."""


def _cache_root(cache_dir: str | None) -> Path:
    from transferkit.cache import default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir()


@cache.command("info")
@_cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_handle_errors
def cache_info(cache_dir, as_json) -> None:
    """Entries, size and settings of each backbone's features, and the last run's hit rate."""
    from transferkit.cache import cache_summary

    root = _cache_root(cache_dir)
    rows = cache_summary(root)
    if as_json:
        click.echo(json.dumps({"cache_dir": str(root), "specs": rows}, indent=2))
        return
    click.echo(f"Cache: {root}")
    if not rows:
        click.echo("  (empty)")
    for row in rows:
        spec, last = row["spec"], row["last_run"]
        hit = (f"; last run {last['date']}: {last['images']} images, hit rate {last['hit_rate']:.0%}"
               if last else "")
        view = f" augmented view {spec['view']}" if spec.get("view") else ""
        click.echo(
            f"  {spec['backbone']} {spec['image_size']}px {spec['dtype']}{view}: {row['entries']} vectors in "
            f"{row['shards']} shards, {row['bytes'] / 1e6:.1f} MB{hit}  [{row['folder']}]"
        )
    click.echo(f"Total: {sum(r['entries'] for r in rows)} vectors, {sum(r['bytes'] for r in rows) / 1e6:.1f} MB")


@cache.command("verify")
@_cache_dir_option
@click.option("--deep", is_flag=True,
              help="Also recompute a sample of vectors from their images and compare them with the cached ones.")
@click.option("--sample", type=click.IntRange(min=1), default=None,
              help="With --deep: vectors recomputed per backbone setting.  [default: 100]")
@click.option("--weights", default=None,
              help="With --deep: the weights the vectors were built with (imagenet, none, or a file). "
                   "Default: whichever of imagenet and none matches the cache's weights fingerprint.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="With --deep and --weights none: the seed the weights were built with (the sample of "
                   "vectors is drawn with a fixed seed of its own, so every run checks the same vectors).")
@_handle_errors
def cache_verify(cache_dir, deep, sample, weights, seed) -> None:
    """Re-read every shard against its checksums; exit 1 if any is damaged.

    Damaged shards are never read as numbers: the next extraction sets them aside and
    computes their vectors again (or run 'transferkit cache prune' to drop them now).
    With --deep, also recompute a sample of vectors from their images (found
    through the cache's file-hash index, used only while they still have the same
    bytes) and exit 1 if any cached vector differs, or if nothing could be verified.
    """
    from transferkit.cache import verify_cache

    if not deep and (sample is not None or weights is not None):
        raise click.UsageError("--sample and --weights go with --deep.")
    root = _cache_root(cache_dir)
    checked, damaged = verify_cache(root)
    for shard, reason in damaged:
        click.echo(click.style("Damaged: ", fg="red") + f"{shard}: {reason}")
    click.echo(f"Checked {checked} shards in {root}: {len(damaged)} damaged.")
    mismatches, unverified = [], False
    if deep:
        from transferkit.cache import verify_vectors

        runtime.start_tensorflow()
        report = verify_vectors(root, sample=sample or 100, weights=weights, seed=seed)
        mismatches = report["mismatches"]
        for spec_dir, reason in report["not_checked"]:
            log.warning("Not checked: %s: %s", spec_dir, reason)
        for path, spec_dir, detail in mismatches:
            click.echo(click.style("Mismatch: ", fg="red") + f"{path}: {spec_dir.name}: {detail}")
        gone = f"; {report['no_source']} vectors have no unchanged image left" if report["no_source"] else ""
        click.echo(f"Recomputed {report['checked']} sampled vectors from their images: {len(mismatches)} "
                   f"differ{gone}.")
        if mismatches:
            click.echo("Delete the folders named above (transferkit recomputes their vectors on the next run).")
        unverified = report["checked"] == 0 and bool(report["vectors"] or report["not_checked"])
        if unverified:  # 0 of 0 differ is not a pass
            click.echo(click.style("Not verified: ", fg="red") + "nothing could be verified: no cached vector could "
                       "be recomputed (see 'Not checked' above, and the vectors whose image is gone or changed). "
                       "Pass --weights (and --seed for none) as the vectors were built, where their images are.")
    if damaged or mismatches or unverified:
        sys.exit(1)


@cache.command("prune")
@_cache_dir_option
@click.option("--missing", is_flag=True, help="Drop vectors of images that are gone (or changed) from their paths.")
@click.option("--older-than", type=click.DateTime(), default=None,
              help="Drop vectors written before this date (e.g. 2026-01-31).")
@_handle_errors
def cache_prune(cache_dir, missing, older_than) -> None:
    """Drop entries, drop damaged shards, and compact each backbone's vectors into one shard."""
    from transferkit.cache import prune_cache

    root = _cache_root(cache_dir)
    report = prune_cache(root, missing=missing, older_than=older_than.timestamp() if older_than else None)
    click.echo(
        f"{root}: {report['entries_before']} -> {report['entries_after']} vectors, "
        f"{report['shards_before']} -> {report['shards_after']} shards."
    )


@cache.command("merge")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@_cache_dir_option
@_handle_errors
def cache_merge(sources, cache_dir) -> None:
    """Copy the shards of other caches (e.g. one per worker of extract --num-shards) into this one."""
    from transferkit.cache import merge_caches

    root = _cache_root(cache_dir)
    report = merge_caches(root, sources)
    for shard, reason in report["damaged"]:
        log.warning("Not copied, damaged: %s: %s", shard, reason)
    click.echo(f"Merged into {root}: {report['copied']} shards copied, {report['already_present']} already "
               f"present, {len(report['damaged'])} damaged.")
    if report["damaged"]:
        sys.exit(1)


# ----------------------------------------------------------------------------- train

@main.command()
@click.argument("image_dir", type=click.Path(file_okay=False), required=False, metavar="IMAGE_DIR")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), help="Run folder to write (required).")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="YAML file of options (e.g. a previous RUN_DIR/config.yaml); flags override it.")
@_backbone_option()
@_weights_option
@click.option("--strategy", type=click.Choice(STRATEGIES), default="freeze-all", show_default=True,
              help="freeze-all: a head on the frozen backbone's cached features. fine-tune-top: then train the top "
                   "blocks too. full-retrain: then train every layer. auto: pick from the images per class.")
@click.option("--head", default="softmax", show_default=True,
              help="softmax, or a scikit-learn head on the cached features (freeze-all only): "
                   "linear-svm, rbf-svm, logreg, knn, ridge, random-forest, mlp.")
@click.option("--search/--no-search", default=True, show_default=True,
              help="scikit-learn heads: search their small hyper-parameter grid by cross-validation.")
@_image_size_option
@click.option("--head-solver", type=click.Choice(HEAD_SOLVERS), default="exact", show_default=True,
              help="How the softmax head is fitted on cached features. exact: the L2-regularised optimum (L-BFGS), "
                   "its strength chosen by cross-validation. adam: Keras with --epochs, --learning-rate, --patience.")
@click.option("--flip-average/--no-flip-average", default=True, show_default=True,
              help="freeze-all: each image's features are the mean of its own and its left-right mirror's, in "
                   "training and in the saved model (+1.3 points measured on both dev sets; twice the extraction "
                   "time). Turn it off where mirroring changes the class (text, some symbols).")
@click.option("--epochs", type=_EPOCHS, default=500, show_default=True,
              help="--head-solver adam: maximum epochs; early stopping usually ends sooner.")
@click.option("--batch-size", type=_BatchSize(), default=32, show_default=True,
              help="Images per batch, or auto: start at 32 and halve whenever a phase runs out of memory.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="--head-solver adam: Adam learning rate of the head.")
@click.option("--patience", type=click.IntRange(min=0), default=20, show_default=True,
              help="--head-solver adam: epochs without validation-loss improvement before stopping.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Dropout before the softmax layer.")
@click.option("--regularization", type=click.FloatRange(min=0), default=None,
              help="L2 penalty on the softmax head, as 1/C of scikit-learn's LogisticRegression (0 = none). "
                   "[default: chosen by cross-validation; 1.0 with --head-solver adam]")
@click.option("--refit/--no-refit", default=True, show_default=True,
              help="Fit the final softmax head on train + val (freeze-all: the exact head, or adam for the "
                   "early-stopping epoch count; after fine-tuning: the exact head on the fine-tuned features).")
@click.option("--unfreeze-blocks", type=click.IntRange(min=1), default=None,
              help="fine-tune-top: how many top blocks of the backbone train. [default: about 20% of the blocks]")
@click.option("--fine-tune-epochs", type=_EPOCHS, default=_default("fine_tune_epochs"),
              show_default=True, help="Epochs of the fine-tune phase (best epoch kept, early stopping on val).")
@click.option("--fine-tune-learning-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak rate of the head in the fine-tune phase; the top block gets 1/10, deeper blocks 1/100. "
                   "[default: 1e-3, scaled down in proportion below 1,000 training images]")
@click.option("--fine-tune-patience", type=click.IntRange(min=0), default=_default("fine_tune_patience"),
              show_default=True, help="Stop fine-tuning after this many epochs without improvement (0 = never).")
@click.option("--fine-tune-views", type=_AUGMENT_VIEWS, default=_default("fine_tune_views"),
              show_default=True,
              help="fine-tune-top: run the frozen blocks once on this many augmented views of each training image "
                   "and train the top blocks on their output, epoch after epoch (0 = live images every epoch).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=_default("schedule"), show_default=True,
              help="Fine-tune learning-rate schedule: warm-up then cosine decay, one-cycle, or constant.")
@click.option("--train-bn", is_flag=True, help="Let BatchNormalization layers train while fine-tuning "
                                               "(default: frozen, in inference mode).")
@click.option("--augment/--no-augment", default=_default("augment"), show_default=True,
              help="Augment training images while fine-tuning (random crop, flip, rotation, brightness, contrast, "
                   "PCA colour; strengths in a recipe). freeze-all is unaffected (see --augment-views).")
@click.option("--augment-views", type=_AUGMENT_VIEWS, default=0, show_default=True,
              help="Train the head also on K cached augmented views of each training image (no backbone re-run).")
@click.option("--class-weight", type=click.Choice(["none", "auto"]), default="none", show_default=True,
              help="auto: weight classes inversely to their training counts (imbalanced data).")
@click.option("--sampling", type=click.Choice(["natural", "balanced"]), default="natural", show_default=True,
              help="Fine-tune phase: balanced draws every class equally often.")
@click.option("--deterministic", is_flag=True, help="TensorFlow op determinism: identical reruns, slower.")
@click.option("--mixed-precision", is_flag=True,
              help="float16 on a GPU, bfloat16 on CPUs that have it (output layer stays float32).")
@click.option("--xla", is_flag=True, help="Compile the fine-tune step with XLA (jit_compile).")
@click.option("--distribute", type=click.Choice(DISTRIBUTE), default="none", show_default=True,
              help="The fine-tune phase on every GPU of this machine (mirrored) or on the workers named by "
                   "TF_CONFIG (multi-worker: run the same command on each; the chief writes RUN_DIR).")
@click.option("--tensorboard", is_flag=True, help="Write TensorBoard logs to RUN_DIR/checkpoints/logs.")
@click.option("--seed", type=_SEED, default=0, show_default=True, help="Seed for the split and the training.")
@click.option("--val-fraction", type=float, default=0.15, show_default=True,
              help="Share of images for validation when IMAGE_DIR is not split into folders.")
@click.option("--test-fraction", type=float, default=0.15, show_default=True,
              help="Share of images for the test when IMAGE_DIR is not split into folders.")
@_cache_dir_option
@_cache_dtype_option
@click.option("--min-accuracy", type=click.FloatRange(0, 1), default=None,
              help="Exit with code 1 (after writing everything) if test accuracy is below this. Default: no gate.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty output folder.")
@_strict_option
@click.option("--resume", "resume_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Continue an interrupted run from its checkpoints (its config.yaml; other flags are ignored).")
@click.option("-v", "--verbose", count=True, help="-v: one line per head epoch, progress bars when fine-tuning.")
@_quiet_option
@_handle_errors
def train(image_dir, output_dir, config_path, resume_dir, quiet, verbose, **options) -> None:
    """Train a classifier on IMAGE_DIR (one sub-folder per class) and write RUN_DIR.

    \b
    IMAGE_DIR may be split into train/ val/ (or validation/) [test/] folders; otherwise a
    stable stratified split is made and written to RUN_DIR/splits.csv.  A train/ + val/
    folder without test/ reports its accuracy on val/.  IMAGE_DIR may also be a TensorFlow
    Datasets name, tfds:NAME[:SPLIT] (e.g. tfds:tf_flowers, tfds:mnist), written out once as
    a folder under $TRANSFERKIT_DATA_DIR; TFDS's own train/test splits are kept.
    """
    from transferkit.config import TrainConfig, config_from_dict, load_config, load_settings

    if resume_dir:
        from transferkit import runs

        config = load_config(runs.resumable_config(resume_dir)).replace(output_dir=resume_dir)
        _run_training(config, verbose=0 if quiet else 1 + verbose, resume=True)
        return
    ctx = click.get_current_context()
    settings = load_settings(config_path) if config_path else {}
    # Flags given on the command line override the config file; defaults do not.
    for name, value in options.items():
        if not config_path or ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
            settings[name] = value
    if image_dir:
        settings["image_dir"] = image_dir
    if output_dir:
        settings["output_dir"] = output_dir
    if not settings.get("image_dir"):
        raise click.UsageError("Missing argument 'IMAGE_DIR' (a folder with one sub-folder per class).")
    if not settings.get("output_dir"):
        raise click.UsageError("Missing option '-o' / '--output-dir' (the run folder to write).")
    config = config_from_dict(settings, TrainConfig, source="the options")
    _run_training(config, verbose=0 if quiet else 1 + verbose)


def _run_training(config, verbose: int, resume: bool = False) -> None:
    from transferkit.training import prepare_training, run_training

    plan = prepare_training(config, resume=resume)  # every check that needs no TensorFlow, first
    runtime.start_tensorflow()
    result = run_training(plan, verbose=verbose, resume=resume)
    test = result.metrics["test"]
    split = test["split"]
    click.echo(
        f"\n{split} accuracy: {test['accuracy']:.3f}  macro-F1: {test['macro_f1']:.3f}  "
        f"({test['num_examples']} images, {len(test['class_names'])} classes)"
    )
    click.echo(f"Run folder: {result.run_dir}")
    if config.min_accuracy is not None and test["accuracy"] < config.min_accuracy:
        click.echo(
            click.style("Failed: ", fg="red", bold=True)
            + f"{split} accuracy {test['accuracy']:.3f} is below --min-accuracy {config.min_accuracy}.",
            err=True,
        )
        sys.exit(1)


def _merge_config(config_path, options: dict, cls: type, **paths) -> dict:
    """A recipe's settings (``--config``), overridden by the flags given on the command line.

    Flags left at their default do not override the recipe; ``paths`` (IMAGE_DIR, -o) override
    it when given and are required in one place or the other.
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
    "image_dir": "Missing argument 'IMAGE_DIR' (a folder with one sub-folder per class, or tfds:NAME).",
    "output_dir": "Missing option '-o' / '--output-dir' (the folder to write).",
    "output": "Missing option '-o' / '--output' (the file to write).",
}


# ----------------------------------------------------------------------------- compare

@main.command()
@click.argument("image_dir", type=IMAGE_DIR_TYPE, required=False, metavar="IMAGE_DIR")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False),
              help="Folder for the report (report.html/.md), the table (comparison.md/.csv/.json), the plots and "
                   "the split (required).")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="YAML recipe of these options (e.g. recipes/ants-bees-compare-heads.yaml, or a previous "
                   "OUTPUT_DIR/config.yaml); flags override it.")
@click.option("--backbone", default=None,
              help="Backbone name (required, here or in --config); 'transferkit backbones' lists them.")
@click.option("--heads", default="softmax,linear-svm,logreg,ridge,knn", show_default=True,
              help="Comma-separated heads: softmax and any of linear-svm, rbf-svm, logreg, knn, ridge, "
                   "random-forest, mlp; or 'all'.")
@click.option("--search/--no-search", default=True, show_default=True,
              help="scikit-learn heads: search their small hyper-parameter grid by cross-validation.")
@click.option("--calibrate", is_flag=True,
              help="Give SVMs and ridge calibrated probabilities (for log-loss and ECE); slower.")
@click.option("--seeds", "num_seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train every head with N seeds (the split stays fixed); report mean ± std.")
@click.option("--with-fine-tune", is_flag=True,
              help="Add a fine-tune-top model (transferkit train --strategy fine-tune-top) as one more arm.")
@click.option("--flip-average/--no-flip-average", default=True, show_default=True,
              help="Every head's features are the mean of each image's and its left-right mirror's, as train's "
                   "freeze-all uses them.")
@_weights_option
@_image_size_option
@_batch_size_option
@_cache_dir_option
@_cache_dtype_option
@click.option("--seed", type=_SEED, default=0, show_default=True, help="Seed of the split and of the first run.")
@click.option("--val-fraction", type=float, default=0.15, show_default=True,
              help="Share of images for validation when IMAGE_DIR is not split into folders.")
@click.option("--test-fraction", type=float, default=0.15, show_default=True,
              help="Share of images for the test when IMAGE_DIR is not split into folders.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty output folder.")
@_quiet_option
@_handle_errors
def compare(image_dir, output_dir, config_path, quiet, **options) -> None:
    """Compare heads on IMAGE_DIR: softmax versus scikit-learn heads (and fine-tuning), honestly.

    \b
    The backbone runs once (features are cached); every head trains on the same images and
    seed and is scored on the same test images, with bootstrap 95% intervals and McNemar's
    test against softmax. A winner is named only when the difference is significant.
    """
    from transferkit.compare import CompareConfig, prepare_comparison, run_comparison
    from transferkit.config import config_from_dict

    settings = _merge_config(config_path, options, CompareConfig, image_dir=image_dir, output_dir=output_dir)
    if not settings.get("backbone"):
        raise click.UsageError("Missing option '--backbone' (on the command line or in --config).")
    config = config_from_dict(settings, CompareConfig, source="the options")
    plan = prepare_comparison(config)  # every check that needs no TensorFlow, first
    runtime.start_tensorflow()
    result = run_comparison(plan, verbose=0 if quiet else 1)
    counts = result.summary["num_images"]
    click.echo(f"\n{counts['test']} test images, {len(result.summary['class_names'])} classes, "
               f"backbone {result.summary['backbone']}:\n")
    click.echo(result.table)
    if config.num_seeds > 1:
        click.echo(f"Means over {config.num_seeds} seeds on one split; 95% CI of seed {config.seed}; "
                   "McNemar p: the largest over seeds.")
    click.echo("\n" + click.style("Verdict: ", bold=True) + result.verdict.text)
    click.echo(f"\nWritten to {result.output_dir}: comparison.md/.csv/.json, plots/"
               f"\nReport: {result.output_dir / 'report.html'}")


# ----------------------------------------------------------------------------- evaluate / predict

@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("image_dir", type=IMAGE_DIR_TYPE)
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), default=None,
              help="Where to write metrics.json. Default: RUN_DIR/evaluations/<IMAGE_DIR name>.")
@_batch_size_option
@_tta_option
@_quiet_option
@_handle_errors
def evaluate(run_dir, image_dir, output_dir, batch_size, tta, quiet) -> None:
    """Evaluate the model of RUN_DIR on every image of a labelled IMAGE_DIR."""
    from transferkit.evaluation import evaluate_run
    from transferkit.runs import check_run_dir

    check_run_dir(run_dir)
    runtime.start_tensorflow()

    metrics = evaluate_run(run_dir, image_dir, output_dir, batch_size=batch_size, verbose=0 if quiet else 1,
                           tta=tta)
    for item in metrics["skipped"]:
        log.warning("Skipped %s: %s", item["path"], item["reason"])
    gain = metrics.get("tta")
    click.echo(
        f"accuracy: {metrics['accuracy']:.3f}  macro-F1: {metrics['macro_f1']:.3f}  ({metrics['num_examples']} images)"
        + (f"\nwith TTA; without: accuracy {gain['accuracy_without']:.3f}, gain {gain['accuracy_gain']:+.3f}"
           if gain else "")
        + f"\nMetrics: {Path(metrics['output_dir']) / 'metrics.json'}"
        + f"\nReport: {Path(metrics['output_dir']) / 'report.html'}"
    )


@main.command()
@click.argument("run_dir", type=click.Path(exists=True), metavar="RUN_DIR|MODEL")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True, help="Classes to show per image.")
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the predictions to FILE.csv or FILE.json.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@_batch_size_option
@_tta_option
@_handle_errors
def predict(run_dir, paths, top_k, output_path, overwrite, batch_size, tta) -> None:
    """Classify image files and folders (searched recursively) with a run's model or an exported one.

    RUN_DIR|MODEL is a run folder, a 'transferkit export' folder, or a .keras file, .tflite
    file or SavedModel folder with its labels.txt beside it. Keras files load in Keras' safe
    mode, which refuses code inside a model file: keep it that way for files you did not make.
    """
    from transferkit import files, predictors, runs

    if output_path and Path(output_path).suffix.lower() not in (".csv", ".json"):
        raise click.BadParameter("must end in .csv or .json", param_hint="-o/--output")
    if output_path and Path(output_path).exists() and not overwrite:
        raise click.BadParameter(f"'{output_path}' exists; pass --overwrite to replace it", param_hint="-o/--output")
    if output_path and not Path(output_path).resolve().parent.is_dir():
        raise click.BadParameter(f"folder '{Path(output_path).parent}' does not exist", param_hint="-o/--output")
    if not predictors.is_artifact(run_dir):
        runs.check_run_dir(run_dir)
    runtime.start_tensorflow()
    run = predictors.load_predictor(run_dir, batch_size=batch_size)
    rows = runs.predict_files(run, paths, top_k=top_k, batch_size=batch_size, tta=tta)
    for row in rows:
        if row["ok"]:
            shown = "  ".join(f"{name} {prob:.3f}" for name, prob in row["predictions"])
        else:
            shown = click.style(f"skipped: {row['error']}", fg="yellow")
        click.echo(f"{files.display_name(row['path'])}\t{shown}")  # one line per image, whatever its name
    if output_path:
        if output_path.lower().endswith(".json"):
            files.write_json(output_path, rows)
        else:
            k = min(top_k, len(run.class_names))
            files.write_csv(
                output_path,
                ["path", "ok", "error"] + [c for i in range(1, k + 1) for c in (f"class_{i}", f"prob_{i}")],
                # Failed images get empty class/probability cells, so every row has every column.
                [[r["path"], r["ok"], r["error"]] + [v for pair in r["predictions"] for v in pair]
                 + ["", ""] * (k - len(r["predictions"])) for r in rows],
            )
        click.echo(f"Wrote {len(rows)} predictions to {output_path}")


# ----------------------------------------------------------------------------- report

@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--feature-map", is_flag=True,
              help="Add the feature map: the backbone's features of the run's images, from the cache (computed "
                   "where missing; needs the image folder).")
@click.option("--gradcam", is_flag=True, help="Add Grad-CAM overlays of the worst mistakes (loads the model).")
@_batch_size_option
@_quiet_option
@_handle_errors
def report(run_dir, feature_map, gradcam, batch_size, quiet) -> None:
    """Draw RUN_DIR/report.html, report.md and plots/ again from a train or evaluate folder.

    Reads only the folder's files (metrics, predictions, history, settings), so it takes
    seconds and needs neither the images (except for the thumbnails of mistakes) nor TensorFlow,
    unless --feature-map or --gradcam ask for the backbone or the model.
    """
    from transferkit.report import gradcam_explainer, write_report
    from transferkit.report_data import feature_settings

    features = labels = None
    settings = feature_settings(run_dir) if feature_map else None  # fails before any TensorFlow work
    if settings:
        import numpy as np

        folder, _, result, _ = _extract_folder(
            settings["image_dir"], settings["backbone"], settings["weights"], settings["image_size"], batch_size,
            settings["cache_dir"], settings["cache_dtype"], settings["seed"], quiet)
        index = {name: i for i, name in enumerate(settings["class_names"])}
        unknown = [name for name in folder.class_names if name not in index]
        if unknown:
            raise click.UsageError(f"class folder(s) {', '.join(unknown)} of '{settings['image_dir']}' are not "
                                   f"classes of the run ({', '.join(settings['class_names'][:10])}...).")
        features = result.vectors[result.ok]
        labels = np.array([index[folder.class_names[c]] for c in folder.labels[result.ok]], dtype=np.int64)
    explainer = None
    if gradcam:
        runtime.start_tensorflow()
        explainer = gradcam_explainer(run_dir)
    html_path, md_path = write_report(run_dir, features=features, feature_labels=labels, explainer=explainer,
                                      seed=settings["seed"] if settings else 0)
    click.echo(f"Report: {html_path}\nMarkdown and plots: {md_path}, {md_path.parent / 'plots'}")


# ----------------------------------------------------------------------------- export / explain / ensemble

@main.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["keras", "saved-model", "tflite"]), default="keras",
              show_default=True, help="keras: a .keras file; saved-model: TensorFlow Serving; tflite: phones, edge.")
@click.option("--quantize", type=click.Choice(["none", "fp16", "int8"]), default="none", show_default=True,
              help="TFLite only: fp16 halves the file; int8 (full-integer, calibrated on training images) "
                   "quarters it and runs on integer-only accelerators.")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), required=True,
              help="Export folder to create: the model, labels.txt and model_card.json.")
@click.option("--image-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Images for the parity check and int8 calibration, when the run's photos are not on this machine. "
                   "Default: the run's own image folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing export folder.")
@_handle_errors
def export_command(run_dir, fmt, quantize, output_dir, image_dir, overwrite) -> None:
    """Export the model of RUN_DIR for serving, and check it predicts like the trained model.

    \b
    Input: raw RGB pixels at the model's size, preprocessing inside, so serving code only
    decodes and resizes (squash, bilinear, no crop):
      keras        float32 (n, size, size, 3) in 0-255
      saved-model  'serving_default': uint8 'image' (n, size, size, 3); 'serving_float': float32 0-255
      tflite       uint8 'image' (1, size, size, 3), every --quantize; float32 probabilities out
    The artifact's predictions on the run's held-out images are compared with the Keras
    model's: float exports must agree on every top-1 class and within 1e-4, or nothing is
    written; quantised ones report their drop in model_card.json.
    """
    from transferkit.export import export_run
    from transferkit.runs import check_run_dir

    check_run_dir(run_dir)
    runtime.start_tensorflow()
    card = export_run(run_dir, output_dir, fmt, quantize, image_dir=image_dir, overwrite=overwrite)
    parity = card["parity"]
    drop = f", accuracy {parity['keras_accuracy']:.3f} -> {parity['export_accuracy']:.3f}" \
        if "export_accuracy" in parity else ""
    click.echo(f"Parity on {parity['images']} images ({parity['source']}): top-1 agreement "
               f"{parity['top1_agreement']:.1%}, max probability difference {parity['max_abs_diff']:.2e}{drop}")
    if "int8_kernels" in card:
        click.echo(f"int8 kernels: {card['int8_kernels']['int8']} of {card['int8_kernels']['ops']} conv/dense ops")
    out = Path(card["output_dir"])
    size = sum(p.stat().st_size for p in (out / card["artifact"]).rglob("*") if p.is_file()) \
        if (out / card["artifact"]).is_dir() else (out / card["artifact"]).stat().st_size
    click.echo(f"Exported {fmt}{'' if quantize == 'none' else ' (' + quantize + ')'} to {out / card['artifact']} "
               f"({size / 1e6:.1f} MB); labels.txt and model_card.json beside it.")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True), metavar="IMAGE...")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), required=True,
              help="Folder for the overlay PNGs (one per image, named after it).")
@click.option("--class", "class_name", default=None,
              help="Explain this class instead of the predicted one.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty output folder.")
@_handle_errors
def explain(run_dir, images, output_dir, class_name, overwrite) -> None:
    """Grad-CAM: show which part of each image made the model of RUN_DIR choose its class.

    IMAGE may be files or folders (searched recursively). Each PNG shows the photo and the heat
    map of the last convolutional block over it, titled with the predicted class and score.
    """
    from transferkit import files, runs
    from transferkit.data import find_images
    from transferkit.explain import explain_files

    runs.check_run_dir(run_dir)
    paths = [p for item in images for p in (find_images(item) if Path(item).is_dir() else [Path(item)])]
    if not paths:
        raise click.BadParameter("no image files found", param_hint="IMAGE")
    # A folder named is an image folder: nothing is written in it. A photo named alone does not make its
    # folder a dataset ('explain RUN photo.jpg -o cams' beside the photo is fine), but the overlays may
    # not land among the photos themselves.
    for item in images:
        if not Path(item).is_dir() and Path(output_dir).resolve() == Path(item).resolve().parent:
            raise click.BadParameter(f"'{output_dir}' is the image folder of '{item}': the overlays (PNG files) "
                                     "would land among your photos; choose a path outside it.", param_hint="-o")
    inputs = [item for item in images if Path(item).is_dir()]
    with runs.claimed_output_dir(output_dir, overwrite, inputs=inputs, command="explain") as output:
        runtime.start_tensorflow()
        run = runs.load_run(run_dir)
        run.require_keras_head("explain (Grad-CAM)")
        rows = explain_files(run, paths, output, class_name=class_name)
    for row in rows:
        if row["ok"]:
            click.echo(f"{files.display_name(row['path'])}\t{row['predicted']} {row['score']:.3f}\t-> "
                       f"{files.display_name(row['overlay'])}")
        else:
            log.warning("Skipped %s: %s", files.display_name(row["path"]), row["error"])
    click.echo(f"Wrote {sum(r['ok'] for r in rows)} Grad-CAM overlays to {output}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False),
                metavar="RUN_DIR...")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), required=True,
              help="Folder for metrics.json, predictions.csv and skipped.csv.")
@click.option("--image-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Labelled folder to score on. Default: the runs' common test split (same photos, same split).")
@_batch_size_option
@_tta_option
@click.option("--overwrite", is_flag=True, help="Write into a non-empty output folder.")
@_quiet_option
@_handle_errors
def ensemble(run_dirs, output_dir, image_dir, batch_size, tta, overwrite, quiet) -> None:
    """Average the class probabilities of several runs and score each run and the ensemble.

    The runs must predict the same classes; backbones and strategies may differ.
    """
    from transferkit.ensemble import ensemble_runs
    from transferkit.runs import check_run_dir

    if len(run_dirs) < 2:
        raise click.BadParameter(f"give at least two run folders (received {len(run_dirs)})", param_hint="RUN_DIR")
    for run_dir in run_dirs:
        check_run_dir(run_dir)
    runtime.start_tensorflow()
    metrics = ensemble_runs(run_dirs, output_dir, image_dir, batch_size=batch_size, overwrite=overwrite, tta=tta,
                            verbose=0 if quiet else 1)
    for item in metrics["skipped"]:
        log.warning("Skipped %s: %s", item["path"], item["reason"])
    for member in metrics["members"]:
        click.echo(f"  {member['accuracy']:.3f}  {member['run_dir']} ({member['backbone']})")
    click.echo(f"ensemble accuracy: {metrics['accuracy']:.3f} ({metrics['gain_over_best_member']:+.3f} over the best "
               f"run)  macro-F1: {metrics['macro_f1']:.3f}  ({metrics['num_examples']} images, {metrics['image_dir']})"
               f"\nMetrics: {Path(metrics['output_dir']) / 'metrics.json'}")


# ----------------------------------------------------------------------------- demo

@main.command()
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), default="transferkit-demo", show_default=True,
              help="Run folder; a previous demo run there is replaced, anything else is refused.")
@_cache_dir_option
@_quiet_option
@_handle_errors
def demo(output_dir, cache_dir, quiet) -> None:
    """Train and evaluate on the bundled sign-language digits photos, fully offline.

    Uses the bundled MobileNetV2 (alpha 0.35) ImageNet weights; takes about a minute on a laptop.
    """
    from transferkit.config import TrainConfig, load_settings
    from transferkit.runs import CONFIG_FILE

    out = Path(output_dir)
    previous_demo = (out / CONFIG_FILE).is_file() and load_settings(out / CONFIG_FILE).get("image_dir") == str(DEMO_DIR)
    click.echo(f"Demo: {DEMO_BACKBONE} (ImageNet weights, bundled) on {DEMO_DIR.name} ({DEMO_DIR}).")
    config = TrainConfig(image_dir=str(DEMO_DIR), output_dir=str(out), backbone=DEMO_BACKBONE,
                         cache_dir=cache_dir, overwrite=previous_demo)
    _run_training(config, verbose=0 if quiet else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
