"""``transferkit extract`` and ``transferkit features``: bottleneck features into the cache and out to files."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from transferkit.cli.app import handle_errors, main
from transferkit.cli.options import (
    IMAGE_DIR_TYPE,
    allow_outside_option,
    augment_views_option,
    backbone_option,
    extraction_options,
    image_dir_argument,
    merge_config,
    overwrite_file_option,
    quiet_option,
    seed_option,
    strict_option,
)

log = logging.getLogger("transferkit")


# ----------------------------------------------------------------------------- extract

@main.command()
@image_dir_argument
@backbone_option()
@extraction_options
@seed_option("Seed of the random initialisation with --weights none (so re-runs hit the cache).")
@click.option("--num-shards", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the images across this many workers (e.g. jobs of a cluster scheduler).")
@click.option("--shard-index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which part this worker extracts (0 .. num-shards - 1).")
@augment_views_option
@strict_option
@allow_outside_option
@quiet_option
@handle_errors
def extract(image_dir, backbone, weights, image_size, batch_size, cache_dir, cache_dtype, seed, num_shards,
            shard_index, augment_views, strict, allow_outside, quiet) -> None:
    """Compute the pooled bottleneck features of every image in IMAGE_DIR into the cache.

    IMAGE_DIR may hold one sub-folder per class, or photos without classes (a flat folder, or
    one sub-folder): every image under it is extracted, with the same cache keys either way.
    Images already in the cache (same bytes, same settings) are not computed again. With
    --num-shards N, N workers (--shard-index 0 .. N-1) each extract a fixed part, chosen by a
    hash of each file's relative path; 'transferkit cache merge' then joins their caches.
    """
    from transferkit.data.scan import stable_fraction

    if shard_index >= num_shards:
        raise click.BadParameter(f"must be below --num-shards ({num_shards}), received {shard_index}",
                                 param_hint="--shard-index")
    from transferkit.cache.folder import extract_folder

    folder, paths, result, cache = extract_folder(
        image_dir, backbone, weights, image_size, batch_size, cache_dir, cache_dtype, seed, quiet,
        select=lambda rel: int(stable_fraction(rel, 0) * num_shards) == shard_index, keep_vectors=False,
        strict=strict, views=augment_views, labels="optional", allow_outside=allow_outside)
    skipped = list(folder.skipped) + result.skipped_files(paths)
    rate = f"; {result.images_per_second:.1f} images/s" if result.num_computed else ""
    part = f" (part {shard_index + 1} of {num_shards}: {len(paths)} images)" if num_shards > 1 else ""
    click.echo(
        f"Images seen: {len(folder.paths) + len(folder.skipped)}{part}; computed: {result.num_computed}; "
        f"already cached: {result.num_cached}; skipped: {len(skipped)}; ignored: {folder.num_ignored} "
        f"(hidden, system and non-image files){rate}.\n{_kind(folder)}Cache: {cache.dir}"
    )
    if augment_views:
        rate = f"; {result.views_per_second:.1f} views/s" if result.num_views_computed else ""
        click.echo(f"Augmented views ({augment_views} per image): computed: {result.num_views_computed}; "
                   f"already cached: {result.num_views_cached}{rate}.")


def _kind(folder) -> str:
    """A line saying that a folder was read without classes, or nothing."""
    return "" if folder.labelled else "Unlabelled photos (no classes to read): no labels, no splits.\n"


# ----------------------------------------------------------------------------- features

@main.group()
def features() -> None:
    """Bottleneck features for use in other tools."""


@features.command("export")
@click.argument("image_dir", type=IMAGE_DIR_TYPE, required=False, metavar="IMAGE_DIR")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="YAML recipe of these options (e.g. recipes/ants-bees-export-features.yaml); flags override it.")
@backbone_option()
@click.option("--format", "format", type=click.Choice(["npz", "parquet", "csv"]), default=None,
              help="File format. Default: from the -o file's extension.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False),
              help="File to write (required, here or in --config): one row per image (relative path, label, split, "
                   "feature vector).")
@extraction_options
@seed_option("Seed of the split (and of --weights none).")
@overwrite_file_option
@augment_views_option
@strict_option
@allow_outside_option
@quiet_option
@handle_errors
def features_export(image_dir, output, config_path, quiet, **options) -> None:
    """Write the features of every image in IMAGE_DIR to one npz, parquet or CSV file.

    Features come from the cache where present. Rows: path (relative to IMAGE_DIR), label
    (class index), class_name, split (as train would make it with the same --seed), then the
    vector (columns f0, f1, ... in parquet and CSV; an array 'features' in npz). Photos without
    class folders (a flat folder, or one sub-folder) give rows without label, class_name and
    split. With
    --augment-views K, K + 1 rows per image and a column 'view' after split: 0 is the image
    itself, 1..K its augmented views. IMAGE_DIR may be tfds:NAME[:SPLIT] (TensorFlow Datasets).
    """
    from transferkit.cache.folder import export_folder_features, extract_folder
    from transferkit.config import FeatureExportConfig, config_from_dict

    settings = merge_config(config_path, options, FeatureExportConfig, image_dir=image_dir, output=output)
    config = config_from_dict(settings, FeatureExportConfig, source="the options")
    output, file_format, augment_views = Path(config.output), config.file_format, config.augment_views
    if output.exists() and not config.overwrite:
        raise click.BadParameter(f"'{output}' exists; pass --overwrite to replace it", param_hint="-o/--output")
    from transferkit.serving.outputs import check_outside_inputs, check_writable_dir

    check_outside_inputs(output, "-o/--output", [config.image_dir])  # never write into the image folder
    output.resolve().parent.mkdir(parents=True, exist_ok=True)  # as train makes its run folder

    check_writable_dir(output.resolve().parent, "-o/--output")  # a read-only folder fails now, not at the end
    folder, paths, result, cache = extract_folder(
        config.image_dir, config.backbone, config.weights, config.image_size, config.batch_size, config.cache_dir,
        config.cache_dtype, config.seed, quiet, strict=config.strict, views=augment_views, labels="optional",
        allow_outside=config.allow_outside)
    rows, dim = export_folder_features(folder, paths, result, cache, output, file_format, config.seed,
                                       augment_views)
    click.echo(f"{_kind(folder)}Wrote {rows} rows x {dim} features to {output} ({file_format}).")


@features.command("plot")
@image_dir_argument
@backbone_option()
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), required=True,
              help="PNG file to write.")
@click.option("--method", type=click.Choice(["pca", "tsne", "both"]), default="pca", show_default=True,
              help="pca: linear, fast; tsne: keeps neighbourhoods (slower, sampled); both: side by side.")
@click.option("--max-points", type=click.IntRange(min=3), default=None,
              help="Images drawn (a stratified sample). Default: 2,000 for t-SNE, 10,000 for PCA.")
@extraction_options
@seed_option("Seed of the sample and of t-SNE.")
@overwrite_file_option
@allow_outside_option
@quiet_option
@handle_errors
def features_plot(image_dir, backbone, output_path, method, max_points, weights, image_size, batch_size, cache_dir,
                  cache_dtype, seed, overwrite, allow_outside, quiet) -> None:
    """Draw the features of IMAGE_DIR in 2-D, coloured by class: how separable are the classes?

    Features come from the cache (computed where missing). Well separated clusters mean a
    head on the frozen backbone (freeze-all) can tell the classes apart; overlapping ones
    suggest fine-tuning, a bigger backbone or cleaner labels. Photos without class folders are
    drawn in one colour (clusters then show groups of similar images).
    """
    from transferkit import files
    from transferkit.report import plots

    output = Path(output_path)
    if output.suffix.lower() != ".png":
        raise click.BadParameter(f"must end in .png, received '{output.name}'", param_hint="-o/--output")
    if output.exists() and not overwrite:
        raise click.BadParameter(f"'{output}' exists; pass --overwrite to replace it", param_hint="-o/--output")
    if not output.resolve().parent.is_dir():
        raise click.BadParameter(f"folder '{output.parent}' does not exist", param_hint="-o/--output")
    from transferkit.serving.outputs import check_outside_inputs

    check_outside_inputs(output, "-o/--output", [image_dir])  # never write into the image folder
    from transferkit.cache.folder import extract_folder

    folder, _, result, _ = extract_folder(image_dir, backbone, weights, image_size, batch_size, cache_dir,
                                           cache_dtype, seed, quiet, labels="optional",
                                           allow_outside=allow_outside)
    vectors = result.vectors[result.ok]
    labels = folder.labels[result.ok] if folder.labelled else None  # unlabelled: one group, one colour
    names = folder.class_names if folder.labelled else ("photos (no classes)",)
    methods = ["pca", "tsne"] if method == "both" else [method]
    projections = [plots.project_features(vectors, labels, m, max_points=max_points, seed=seed) for m in methods]
    title = f"{Path(image_dir).resolve().name}: {backbone} features"
    files.write_bytes(output, plots.feature_map_png(projections, names, title))
    drawn = ", ".join(f"{info['method']}: {info['num_points']} of {info['num_total']} images"
                      for _, _, info in projections)
    shown = f"{len(folder.class_names)} classes" if folder.labelled else "unlabelled"
    click.echo(f"Wrote {output} ({drawn}; {shown}).")
