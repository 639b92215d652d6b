"""``transferkit train``, ``compare``, ``lr-find`` and ``demo``: the commands that fit models."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from transferkit import DEMO_DIR, runtime
from transferkit.cli.app import handle_errors, main
from transferkit.cli.options import (
    AUGMENT_VIEWS,
    DEMO_BACKBONE,
    EPOCHS,
    IMAGE_DIR_TYPE,
    BatchSize,
    ImageDir,
    allow_outside_option,
    backbone_option,
    cache_dir_option,
    cache_dtype_option,
    default,
    extraction_options,
    image_dir_argument,
    image_size_option,
    merge_config,
    overwrite_file_option,
    quiet_option,
    seed_option,
    strict_option,
    weights_option,
)
from transferkit.config import DISTRIBUTE, HEAD_SOLVERS, SCHEDULES
from transferkit.training.strategies import STRATEGIES


@main.command("lr-find")
@image_dir_argument
@backbone_option()
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), required=True,
              help="PNG file for the loss-against-rate plot.")
@extraction_options
@seed_option("Seed of the split and the sweep.")
@overwrite_file_option
@allow_outside_option
@quiet_option
@handle_errors
def lr_find(image_dir, backbone, output_path, weights, image_size, batch_size, cache_dir, cache_dtype, seed, overwrite,
            allow_outside, quiet) -> None:
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
    from transferkit.training.lr_find import find_learning_rate, plot_sweep

    output = Path(output_path)
    if output.suffix.lower() != ".png":
        raise click.BadParameter(f"must end in .png, received '{output.name}'", param_hint="-o/--output")
    if output.exists() and not overwrite:
        raise click.BadParameter(f"'{output}' exists; pass --overwrite to replace it", param_hint="-o/--output")
    from transferkit.serving.outputs import check_outside_inputs

    check_outside_inputs(output, "-o/--output", [image_dir])  # never write into the image folder
    from transferkit.cache.folder import extract_folder

    folder, paths, result, _ = extract_folder(image_dir, backbone, weights, image_size, batch_size, cache_dir,
                                               cache_dtype, seed, quiet, allow_outside=allow_outside)
    train = result.ok & (np.array(folder.splits) == "train")
    sweep = find_learning_rate(result.vectors[train], folder.labels[train],
                               TrainConfig(str(image_dir), "", batch_size=batch_size, seed=seed))
    files.write_bytes(output, plot_sweep(sweep, f"{Path(image_dir).resolve().name}: {backbone} head"))
    click.echo(f"Swept {len(sweep.rates)} rates on {int(train.sum())} training images; lowest loss at "
               f"{sweep.min_loss_rate:.1e}.")
    click.echo(f"Suggested learning rate: {sweep.suggestion:.1e} for --head-solver adam (steepest fall of the loss; "
               f"a suggestion, check the plot: {output}).")




# ----------------------------------------------------------------------------- train

@main.command()
# Not checked for existence here: the library's message says where a relative path is looked for.
@click.argument("image_dir", type=ImageDir(exists=False), required=False, metavar="IMAGE_DIR")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), help="Run folder to write (required).")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="YAML file of options (e.g. a previous RUN_DIR/config.yaml); flags override it.")
@backbone_option()
@weights_option
@click.option("--strategy", type=click.Choice(STRATEGIES), default="freeze-all", show_default=True,
              help="freeze-all: a head on the frozen backbone's cached features. fine-tune-top: then train the top "
                   "blocks too. full-retrain: then train every layer. auto: pick from the images per class.")
@click.option("--head", default="softmax", show_default=True,
              help="softmax, or a scikit-learn head on the cached features (freeze-all only): "
                   "linear-svm, rbf-svm, logreg, knn, ridge, random-forest, mlp.")
@click.option("--search/--no-search", default=True, show_default=True,
              help="scikit-learn heads: search their small hyper-parameter grid by cross-validation.")
@image_size_option
@click.option("--head-solver", type=click.Choice(HEAD_SOLVERS), default="exact", show_default=True,
              help="How the softmax head is fitted on cached features. exact: the L2-regularised optimum (L-BFGS), "
                   "its strength chosen by cross-validation. adam: Keras with --epochs, --learning-rate, --patience.")
@click.option("--flip-average/--no-flip-average", default=True, show_default=True,
              help="freeze-all: each image's features are the mean of its own and its left-right mirror's, in "
                   "training and in the saved model (+1.3 points measured on both dev sets; twice the extraction "
                   "time). Turn it off where mirroring changes the class (text, some symbols).")
@click.option("--epochs", type=EPOCHS, default=500, show_default=True,
              help="--head-solver adam: maximum epochs; early stopping usually ends sooner.")
@click.option("--batch-size", type=BatchSize(), default=32, show_default=True,
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
@click.option("--fine-tune-epochs", type=EPOCHS, default=default("fine_tune_epochs"),
              show_default=True, help="Epochs of the fine-tune phase (best epoch kept, early stopping on val).")
@click.option("--fine-tune-learning-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak rate of the head in the fine-tune phase; the top block gets 1/10, deeper blocks 1/100. "
                   "[default: 1e-3, scaled down in proportion below 1,000 training images]")
@click.option("--fine-tune-patience", type=click.IntRange(min=0), default=default("fine_tune_patience"),
              show_default=True, help="Stop fine-tuning after this many epochs without improvement (0 = never).")
@click.option("--fine-tune-views", type=AUGMENT_VIEWS, default=default("fine_tune_views"),
              show_default=True,
              help="fine-tune-top: run the frozen blocks once on this many augmented views of each training image "
                   "and train the top blocks on their output, epoch after epoch (0 = live images every epoch).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=default("schedule"), show_default=True,
              help="Fine-tune learning-rate schedule: warm-up then cosine decay, one-cycle, or constant.")
@click.option("--train-bn", is_flag=True, help="Let BatchNormalization layers train while fine-tuning "
                                               "(default: frozen, in inference mode).")
@click.option("--augment/--no-augment", default=default("augment"), show_default=True,
              help="Augment training images while fine-tuning (random crop, flip, rotation, brightness, contrast, "
                   "PCA colour; strengths in a recipe). freeze-all is unaffected (see --augment-views).")
@click.option("--augment-views", type=AUGMENT_VIEWS, default=0, show_default=True,
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
@seed_option("Seed for the split and the training.")
@click.option("--val-fraction", type=float, default=0.15, show_default=True,
              help="Share of images for validation when IMAGE_DIR is not split into folders.")
@click.option("--test-fraction", type=float, default=0.15, show_default=True,
              help="Share of images for the test when IMAGE_DIR is not split into folders.")
@cache_dir_option
@cache_dtype_option
@click.option("--min-accuracy", type=click.FloatRange(0, 1), default=None,
              help="Exit with code 1 (after writing everything) if test accuracy is below this. Default: no gate.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty output folder.")
@strict_option
@allow_outside_option
@click.option("--resume", "resume_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Continue an interrupted run from its checkpoints (its config.yaml; other flags are ignored).")
@click.option("-v", "--verbose", count=True, help="-v: one line per head epoch, progress bars when fine-tuning.")
@quiet_option
@handle_errors
def train(image_dir, output_dir, config_path, resume_dir, quiet, verbose, **options) -> None:
    """Train a classifier on IMAGE_DIR (one sub-folder per class) and write RUN_DIR.

    \b
    IMAGE_DIR may be split into train/ val/ (or validation/) [test/] folders; otherwise a
    stable stratified split is made and written to RUN_DIR/splits.csv.  A train/ + val/
    folder without test/ reports its accuracy on val/.  IMAGE_DIR may also be a TensorFlow
    Datasets name, tfds:NAME[:SPLIT] (e.g. tfds:tf_flowers, tfds:mnist), written out once as
    a folder under $TRANSFERKIT_DATA_DIR; TFDS's own train/test splits are kept.  Or a
    manifest, a .csv or .jsonl file of path,label[,split] rows (paths relative to its folder).
    """
    from transferkit.config import TrainConfig, config_from_dict, load_config, load_settings

    if resume_dir:
        from transferkit.serving import runs

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
        raise click.UsageError("Missing argument 'IMAGE_DIR' (a folder with one sub-folder per class, or a "
                               ".csv or .jsonl manifest).")
    if not settings.get("output_dir"):
        raise click.UsageError("Missing option '-o' / '--output-dir' (the run folder to write).")
    config = config_from_dict(settings, TrainConfig, source="the options")
    _run_training(config, verbose=0 if quiet else 1 + verbose)


def _run_training(config, verbose: int, resume: bool = False) -> None:
    from transferkit.training.run import prepare_training, run_training

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
@extraction_options
@seed_option("Seed of the split and of the first run.")
@click.option("--val-fraction", type=float, default=0.15, show_default=True,
              help="Share of images for validation when IMAGE_DIR is not split into folders.")
@click.option("--test-fraction", type=float, default=0.15, show_default=True,
              help="Share of images for the test when IMAGE_DIR is not split into folders.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty output folder.")
@allow_outside_option
@quiet_option
@handle_errors
def compare(image_dir, output_dir, config_path, quiet, **options) -> None:
    """Compare heads on IMAGE_DIR: softmax versus scikit-learn heads (and fine-tuning), honestly.

    \b
    The backbone runs once (features are cached); every head trains on the same images and
    seed and is scored on the same test images, with bootstrap 95% intervals and McNemar's
    test against softmax. A winner is named only when the difference is significant.
    """
    from transferkit.config import config_from_dict
    from transferkit.heads.compare import CompareConfig, prepare_comparison, run_comparison

    settings = merge_config(config_path, options, CompareConfig, image_dir=image_dir, output_dir=output_dir)
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




# ----------------------------------------------------------------------------- demo

@main.command()
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), default="transferkit-demo", show_default=True,
              help="Run folder; a previous demo run there is replaced, anything else is refused.")
@cache_dir_option
@quiet_option
@handle_errors
def demo(output_dir, cache_dir, quiet) -> None:
    """Train and evaluate on the bundled sign-language digits photos, fully offline.

    Uses the bundled MobileNetV2 (alpha 0.35) ImageNet weights; takes about a minute on a laptop.
    """
    from transferkit.config import TrainConfig, load_settings
    from transferkit.serving.runs import CONFIG_FILE

    out = Path(output_dir)
    previous_demo = (out / CONFIG_FILE).is_file() and load_settings(out / CONFIG_FILE).get("image_dir") == str(DEMO_DIR)
    click.echo(f"Demo: {DEMO_BACKBONE} (ImageNet weights, bundled) on {DEMO_DIR.name} ({DEMO_DIR}).")
    config = TrainConfig(image_dir=str(DEMO_DIR), output_dir=str(out), backbone=DEMO_BACKBONE,
                         cache_dir=cache_dir, overwrite=previous_demo)
    _run_training(config, verbose=0 if quiet else 1)
