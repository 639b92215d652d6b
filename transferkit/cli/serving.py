"""``transferkit evaluate``, ``predict``, ``report``, ``export``, ``explain`` and ``ensemble``: using a run."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from transferkit import runtime
from transferkit.cli.app import handle_errors, main
from transferkit.cli.options import IMAGE_DIR_TYPE, allow_outside_option, batch_size_option, quiet_option, tta_option

log = logging.getLogger("transferkit")


# ----------------------------------------------------------------------------- evaluate / predict

@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("image_dir", type=IMAGE_DIR_TYPE)
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), default=None,
              help="Where to write metrics.json. Default: RUN_DIR/evaluations/<IMAGE_DIR name>.")
@batch_size_option
@tta_option
@allow_outside_option
@quiet_option
@handle_errors
def evaluate(run_dir, image_dir, output_dir, batch_size, tta, allow_outside, quiet) -> None:
    """Evaluate the model of RUN_DIR on every image of a labelled IMAGE_DIR."""
    from transferkit.evaluation.evaluate import evaluate_run
    from transferkit.serving.runs import check_run_dir

    check_run_dir(run_dir)
    runtime.start_tensorflow()

    metrics = evaluate_run(run_dir, image_dir, output_dir, batch_size=batch_size, verbose=0 if quiet else 1,
                           tta=tta, allow_outside=allow_outside)
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
@batch_size_option
@tta_option
@handle_errors
def predict(run_dir, paths, top_k, output_path, overwrite, batch_size, tta) -> None:
    """Classify image files and folders (searched recursively) with a run's model or an exported one.

    RUN_DIR|MODEL is a run folder, a 'transferkit export' folder, or a .keras file, .tflite
    file or SavedModel folder with its labels.txt beside it. Keras files load in Keras' safe
    mode, which refuses code inside a model file: keep it that way for files you did not make.
    """
    from transferkit import files
    from transferkit.serving import predictors, runs

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
    rows = predictors.predict_files(run, paths, top_k=top_k, batch_size=batch_size, tta=tta)
    for row in rows:
        if row["ok"]:
            shown = "  ".join(f"{name} {prob:.3f}" for name, prob in row["predictions"])
        else:
            shown = click.style(f"skipped: {row['error']}", fg="yellow")
        click.echo(f"{files.display_name(row['path'])}\t{shown}")  # one line per image, whatever its name
    if output_path:
        predictors.write_prediction_rows(output_path, rows, min(top_k, len(run.class_names)))
        click.echo(f"Wrote {len(rows)} predictions to {output_path}")


# ----------------------------------------------------------------------------- report

@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--feature-map", is_flag=True,
              help="Add the feature map: the backbone's features of the run's images, from the cache (computed "
                   "where missing; needs the image folder).")
@click.option("--gradcam", is_flag=True, help="Add Grad-CAM overlays of the worst mistakes (loads the model).")
@batch_size_option
@quiet_option
@handle_errors
def report(run_dir, feature_map, gradcam, batch_size, quiet) -> None:
    """Draw RUN_DIR/report.html, report.md and plots/ again from a train or evaluate folder.

    Reads only the folder's files (metrics, predictions, history, settings), so it takes
    seconds and needs neither the images (except for the thumbnails of mistakes) nor TensorFlow,
    unless --feature-map or --gradcam ask for the backbone or the model.
    """
    from transferkit.report.data import feature_settings
    from transferkit.report.writer import gradcam_explainer, write_report

    features = labels = None
    settings = feature_settings(run_dir) if feature_map else None  # fails before any TensorFlow work
    if settings:
        import numpy as np

        from transferkit.cache.folder import extract_folder

        folder, _, result, _ = extract_folder(
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
@handle_errors
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
    from transferkit.serving.export import export_run
    from transferkit.serving.runs import check_run_dir

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
@handle_errors
def explain(run_dir, images, output_dir, class_name, overwrite) -> None:
    """Grad-CAM: show which part of each image made the model of RUN_DIR choose its class.

    IMAGE may be files or folders (searched recursively). Each PNG shows the photo and the heat
    map of the last convolutional block over it, titled with the predicted class and score.
    """
    from transferkit import files
    from transferkit.data.scan import find_images
    from transferkit.evaluation.explain import explain_files
    from transferkit.serving import outputs, runs

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
    with outputs.claimed_output_dir(output_dir, overwrite, inputs=inputs, command="explain") as output:
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
@click.option("--image-dir", type=IMAGE_DIR_TYPE, default=None,
              help="Labelled folder (or manifest) to score on. Default: the runs' common test split (same photos, "
                   "same split).")
@batch_size_option
@tta_option
@click.option("--overwrite", is_flag=True, help="Write into a non-empty output folder.")
@quiet_option
@handle_errors
def ensemble(run_dirs, output_dir, image_dir, batch_size, tta, overwrite, quiet) -> None:
    """Average the class probabilities of several runs and score each run and the ensemble.

    The runs must predict the same classes; backbones and strategies may differ.
    """
    from transferkit.evaluation.ensemble import ensemble_runs
    from transferkit.serving.runs import check_run_dir

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
