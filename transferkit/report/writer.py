"""The run report: ``report.html`` (one self-contained file) and ``report.md`` with PNG plots in ``plots/``.

Made from the files of a run folder only (``metrics.json``, ``config.yaml``, ``history.csv``,
``predictions.csv``, ``skipped.csv``, ``labels.txt``), so ``transferkit report RUN_DIR`` redraws
it at any time and works on ``train`` and ``evaluate`` folders alike. Sections: summary,
configuration and versions, dataset, training curves, metrics, per-class metrics, confusion
matrix (counts and shares), most-confused pairs, the worst mistakes (highest-confidence wrong
test images, as thumbnails), the feature map and Grad-CAM when given.

Every report is written by :func:`transferkit.report.sections.write_document`, with plots saved
through :class:`~transferkit.report.sections.PlotFolder`; the sections any run has (dataset,
versions, confusion matrix, feature map) are :mod:`transferkit.report.sections`, shared with
``transferkit compare``'s report. Nothing here imports TensorFlow.

Example:
    >>> html_path, md_path = write_report("runs/first")  # doctest: +SKIP
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from transferkit import files
from transferkit.report import plots
from transferkit.report.data import RunFolder, to_float
from transferkit.report.render import (
    Cards,
    Gallery,
    Image,
    Paragraph,
    Row,
    Section,
    Table,
)
from transferkit.report.sections import (
    PLOTS_DIR,
    PlotFolder,
    compute_feature_map,
    confusion_blocks,
    confusion_note,
    dataset_section,
    feature_map_section,
    settings_table,
    versions_blocks,
    write_document,
)
from transferkit.serving import runs

log = logging.getLogger("transferkit")

#: Thumbnails in the gallery of worst mistakes, and how many of them get a Grad-CAM overlay.
NUM_WORST_ERRORS = 12
NUM_GRADCAM = 4
_THUMBNAIL_PX = 200

#: Called with an image path, returns a PNG of the Grad-CAM overlay (see :func:`write_report`).
Explainer = Callable[[Path], bytes]


def write_report(run_dir: str | os.PathLike, *, features: np.ndarray | None = None,
                 feature_labels: np.ndarray | None = None, explainer: Explainer | None = None,
                 seed: int = 0) -> tuple[Path, Path]:
    """Write ``report.html``, ``report.md`` and ``plots/*.png`` into a train or evaluate folder.

    Args:
        run_dir: a folder written by ``transferkit train`` or ``transferkit evaluate``.
        features: optional ``(n, d)`` bottleneck features (e.g. the cached ones of the run's
            images) for the feature map; with ``feature_labels`` (class indices). Their 2-D
            projections are saved to ``feature_map.csv``, so a later redraw without features keeps
            the map.
        explainer: optional function image path -> PNG bytes of a Grad-CAM overlay; applied to
            the :data:`NUM_GRADCAM` worst mistakes (:func:`gradcam_explainer` makes one).
        seed: for the feature map's sample and t-SNE.

    Returns:
        ``(html path, markdown path)``.

    Raises:
        InputError: the folder holds no ``metrics.json`` or it is not a report-able run.
    """
    run = RunFolder(Path(run_dir))
    builder = _Builder(run, PlotFolder(run.dir))
    if features is not None and feature_labels is not None:
        compute_feature_map(run.dir, np.asarray(features), np.asarray(feature_labels), seed)
    title = f"transferkit report: {run.dir.resolve().name}"
    subtitle = f"{'Training run' if run.kind == 'train' else 'Evaluation'} in {run.dir.resolve()}"
    return write_document(run.dir, title, builder.sections(explainer), subtitle)


def gradcam_explainer(run) -> Explainer | None:
    """A Grad-CAM explainer for the worst mistakes, from :mod:`transferkit.evaluation.explain`; None without it.

    The hook between the report and Grad-CAM: it needs the model and TensorFlow, so the caller
    (training, ``evaluate``, ``report --gradcam``) decides whether to pay for it.

    Args:
        run: a loaded run (:func:`transferkit.serving.runs.load_run`), or a train or evaluate folder
            (an evaluate folder's ``metrics.json`` names the run it evaluated).

    Returns:
        A function image path -> PNG bytes (the photo with the heat map of the predicted class
        over it), or None if this installation has no ``transferkit.evaluation.explain``.
    """
    try:
        from transferkit.evaluation import explain
    except ImportError:
        return None
    from PIL import Image as PILImage

    from transferkit.data.images import ImageFileError, decode_image, display_image_bytes, read_image_bytes

    if not hasattr(run, "model"):
        folder = RunFolder(Path(run))
        own_model = (folder.dir / runs.MODEL_FILE).is_file()
        run = runs.load_run(folder.dir if own_model else folder.metrics.get("run_dir", ""))
    if getattr(run, "head", None) is not None:
        return None  # a scikit-learn head has no gradient to follow

    def explain_image(path: Path) -> bytes:
        try:
            data = read_image_bytes(path)  # once: the model's input and the photo come from the same bytes
            pixels = decode_image(data, run.image_size)[None].astype(np.float32)
            photo = display_image_bytes(data, _THUMBNAIL_PX * 2)
        except ImageFileError as exc:
            raise ValueError(f"Cannot decode image '{path}': {exc}") from exc
        heatmap = explain.gradcam(run.model, pixels)[0]
        blended = explain.overlay(photo, heatmap)
        buffer = io.BytesIO()
        PILImage.fromarray(blended).save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()

    return explain_image


class _Builder:
    def __init__(self, run: RunFolder, plot_folder: PlotFolder):
        self.run, self.plots = run, plot_folder

    def sections(self, explainer: Explainer | None) -> list[Section]:
        errors = self._worst_errors()
        return [self.summary(), self.configuration(), self.dataset(), self.training(), self.metrics_section(),
                self.per_class(), self.confusion(), self.confused_pairs(), self.gallery(errors),
                self.feature_map(), self.gradcam(errors, explainer)]

    def summary(self) -> Section:
        t, m = self.run.test, self.run.metrics
        split = t.get("split", "evaluated")
        cards = [(f"{split} accuracy", f"{t.get('accuracy', math.nan):.3f}"),
                 ("macro-F1", f"{t.get('macro_f1', math.nan):.3f}"),
                 ("balanced accuracy", f"{t.get('balanced_accuracy', math.nan):.3f}"),
                 (f"{split} images", str(t.get("num_examples", ""))),
                 ("classes", str(len(self.run.class_names)))]
        backbone = m.get("backbone") or self.run.config.get("backbone")
        lines = []
        if backbone:
            lines.append(f"Backbone {backbone}"
                         + (f" at {m['image_size']} px" if m.get("image_size") else "")
                         + (f", strategy {m.get('strategy') or self.run.config.get('strategy')}"
                            if m.get("strategy") or self.run.config.get("strategy") else "") + ".")
        if self.run.kind == "evaluate":
            lines.append(f"Model of run {m.get('run_dir', '?')} evaluated on every image of {m.get('image_dir', '?')}.")
        return Section("summary", "Summary", [Cards(cards)] + [Paragraph(x) for x in lines])

    def configuration(self) -> Section:
        columns: list = []
        config = self.run.config
        if config:
            columns.append([Paragraph(f"Settings ({self.run.config_source}):"),
                            settings_table(["setting", "value"], config)])
        elif self.run.config_error:
            columns.append([Paragraph(self.run.config_error)])
        skip = {"test", "counts", "skipped", "per_class", "confusion_matrix", "class_names", "versions", "tta",
                "top_k_accuracy", "accuracy", "balanced_accuracy", "macro_f1", "num_examples", "split"}
        metrics = dict(self.run.metrics)
        if isinstance(metrics.get("phases"), list):
            metrics["phases"] = "; ".join(_describe_phase(p) for p in metrics["phases"] if isinstance(p, dict))
        facts = settings_table(["item", "value"], metrics, depth=2, skip=skip)
        if facts.rows:
            columns.append([Paragraph(f"Run facts ({runs.METRICS_FILE}):"), facts])
        columns.append(versions_blocks(self.run.metrics.get("versions"), runs.METRICS_FILE))
        blocks: list = [Row(columns)]
        if config and self.run.kind == "train":
            blocks.append(Paragraph(f"Repeat the run: transferkit train --config {self.run.dir / runs.CONFIG_FILE} "
                                    "-o NEW_DIR", muted=True))
        return Section("config", "Configuration and versions", blocks)

    def dataset(self) -> Section:
        counts = self.run.metrics.get("counts")
        if not counts:  # evaluate folders: what was evaluated, from predictions.csv
            evaluated = dict.fromkeys(self.run.class_names, 0)
            for row in self.run.predictions:
                evaluated[row["label"]] = evaluated.get(row["label"], 0) + 1
            counts = {"evaluated": evaluated}
        return dataset_section(self.run.class_names, counts, self.run.skipped,
                               split_source=self.run.metrics.get("split_source"),
                               num_ignored=self.run.metrics.get("num_ignored"))

    def training(self) -> Section:
        history, phases = self.run.history, self.run.phases
        head_fit = self.run.metrics.get("head_fit") or {}
        curve = [] if history else self._cv_curve(head_fit)
        if curve:  # the exact head has no epochs: its cross-validation curve shows how it was chosen
            return Section("training", "Head fit", curve)
        if not history:
            why = "an evaluation has no training" if self.run.kind == "evaluate" else f"no {runs.HISTORY_FILE}"
            return Section("training", "Training curves", [Paragraph(f"No training history ({why}).", muted=True)])
        best = self.run.metrics.get("best_epoch")
        path = self.plots.save("training_curves.png", plots.training_curves_png(history, phases, best))
        notes = [f"{len(next(iter(history.values())))} epochs"]
        if phases:
            notes.append("phases: " + ", ".join(dict.fromkeys(phases)))
        if best:
            notes.append(f"early stopping kept epoch {best}")
        if self.run.metrics.get("refit_epochs"):
            notes.append(f"then the head was retrained on train + val for {self.run.metrics['refit_epochs']} epochs "
                         "(not plotted)")
        notes += _time_to_accuracy(history)
        views = (self.run.metrics.get("fine_tune") or {}).get("frozen_views") or {}
        if isinstance(views.get("views"), int) and views["views"] and isinstance(views.get("seconds"), int | float):
            notes.append(f"the top blocks trained on {views['views']} augmented views of the frozen blocks' output, "
                         f"computed once in {views['seconds']:.0f} s (counted in those times)")
        refit = (self.run.metrics.get("fine_tune") or {}).get("head_refit")
        if refit:
            notes.append(f"then the head was refitted on the fine-tuned features of train + val ({refit['images']} "
                         "images; not plotted)")
        return Section("training", "Training curves", [
            *self._cv_curve(head_fit),
            Image(path, "Loss and accuracy per epoch", "; ".join(notes) + ". Solid: training; dashed: validation.")])

    def _cv_curve(self, head_fit: dict) -> list:
        """The exact head's cross-validation curve (plot and caption), or nothing without a search."""
        curve = head_fit.get("cv_curve")
        if not isinstance(curve, list) or not curve or not isinstance(head_fit.get("C"), int | float):
            return []
        try:
            png = plots.cv_curve_png(curve, float(head_fit["C"]))
        except (KeyError, TypeError, ValueError):
            return []  # a hand-edited metrics.json: the report still renders, without this plot
        path = self.plots.save("head_cv_curve.png", png)
        return [Image(path, "Head regularisation: cross-validated log-loss against C",
                      f"The softmax head is the exact L2-regularised optimum; C = {head_fit['C']:.3g} had the lowest "
                      f"held-out log-loss over {head_fit.get('cv_folds')} stratified folds of its "
                      f"{head_fit.get('images', '?')} training images, then the head was fitted on all of them. "
                      "Shaded: one standard deviation over the folds.")]

    def metrics_section(self) -> Section:
        t = self.run.test
        rows = [["accuracy", t.get("accuracy")], ["balanced accuracy", t.get("balanced_accuracy")],
                ["macro-F1", t.get("macro_f1")]]
        rows += [[f"top-{k} accuracy", v] for k, v in (t.get("top_k_accuracy") or {}).items()]
        rows.append(["images", t.get("num_examples")])
        tta = self.run.metrics.get("tta")
        if isinstance(tta, dict) and "accuracy_without" in tta:
            rows += [["accuracy without test-time augmentation", tta["accuracy_without"]],
                     ["gain from test-time augmentation", f"{tta.get('accuracy_gain', math.nan):+.3f}"]]
        split = t.get("split", "evaluated")
        return Section("metrics", "Metrics", [Paragraph(f"On the {split} images:"),
                                              Table(["metric", "value"], rows, numeric=[1])])

    def per_class(self) -> Section:
        per = self.run.test.get("per_class") or {}
        rows = [[name, v["precision"], v["recall"], v["f1"], v["support"]] for name, v in per.items()]
        note = "Precision, recall and F1 of each class."
        if len(rows) > 20:
            rows.sort(key=lambda r: (r[3], r[0]))
            note += " Sorted by F1, worst first."
        return Section("per-class", "Per-class metrics", [
            Paragraph(note), Table(["class", "precision", "recall", "F1", "images"], rows, numeric=[1, 2, 3, 4],
                                   scroll=len(rows) > 16)])

    def confusion(self) -> Section:
        matrix = self.run.test.get("confusion_matrix")
        if not matrix:
            return Section("confusion", "Confusion matrix", [Paragraph("No confusion matrix recorded.", muted=True)])
        names = self.run.class_names
        return Section("confusion", "Confusion matrix",
                       [confusion_note(names)] + confusion_blocks(self.plots, matrix, names))

    def confused_pairs(self, limit: int = 10) -> Section:
        matrix = np.asarray(self.run.test.get("confusion_matrix") or [[0]])
        names = self.run.class_names
        off = matrix.copy()
        np.fill_diagonal(off, 0)
        order = [tuple(ix) for ix in np.argwhere(off > 0)]
        order.sort(key=lambda ij: (-off[ij], ij))
        rows = [[names[i], names[j], int(off[i, j]), f"{off[i, j] / max(matrix[i].sum(), 1):.0%}"]
                for i, j in order[:limit]]
        if not rows:
            return Section("confused-pairs", "Most-confused classes",
                           [Paragraph("No test image was misclassified.", muted=True)])
        return Section("confused-pairs", "Most-confused classes", [
            Paragraph("True class predicted as another, most frequent first (share: of that true class's images)."),
            Table(["true class", "predicted as", "images", "share"], rows, numeric=[2, 3])])

    def _worst_errors(self) -> list[dict]:
        wrong = [r for r in self.run.predictions if str(r.get("correct")) in ("0", "False", "false")]
        wrong.sort(key=lambda r: -to_float(r.get("confidence")))
        return wrong[:NUM_WORST_ERRORS]

    def gallery(self, errors: list[dict]) -> Section:
        title = "Worst mistakes"
        if not self.run.predictions:
            return Section("errors", title, [Paragraph(f"No {runs.PREDICTIONS_FILE} in this folder.", muted=True)])
        if not errors:
            return Section("errors", title, [Paragraph("No test image was misclassified.", muted=True)])
        items, failed = self._thumbnails(errors, "errors", "error", _thumbnail_png, "image not available")
        wrong = sum(1 for r in self.run.predictions if str(r.get("correct")) in ("0", "False", "false"))
        return Section("errors", title, [
            Paragraph(f"The {len(errors)} misclassified images with the highest confidence in the wrong class "
                      f"({wrong} of {len(self.run.predictions)} images were misclassified).")]
            + _failure_note("thumbnails", failed, len(errors)) + [Gallery(items)])

    def _thumbnails(self, errors: list[dict], subdir: str, prefix: str, make_png: Callable[[Path], bytes],
                    failure: str) -> tuple[list, list[str]]:
        """Gallery items of ``errors``: ``make_png(image path)`` saved as ``plots/SUBDIR/PREFIX_NN.png``.

        Returns:
            ``(items, failures)``: the gallery items, and why each image that got no PNG failed.
        """
        folder = self.plots.dir / subdir
        folder.mkdir(exist_ok=True)
        items, written, failures = [], set(), []
        for rank, row in enumerate(errors, start=1):
            # predictions.csv may be damaged or come from elsewhere: missing cells read as empty.
            path = row.get("path") or ""
            caption = [f"true: {row.get('label') or '?'}",
                       f"predicted: {row.get('predicted') or '?'} ({to_float(row.get('confidence')):.2f})",
                       _short_path(files.display_name(path))]
            try:
                png = make_png(self.run.image_path(path))
            except Exception as exc:  # noqa: BLE001 - one failed picture must not cost the report; said below
                reason = str(exc) if isinstance(exc, (OSError, ValueError)) else f"{type(exc).__name__}: {exc}"
                if isinstance(exc.__cause__, ValueError):  # "Cannot decode image '<path>': <why>": path shown above
                    reason = str(exc.__cause__)
                reason = files.display_name(reason)
                items.append((None, caption + [f"{failure}: {reason}"]))
                failures.append(reason)
                continue
            name = f"{prefix}_{rank:02d}.png"
            files.write_bytes(folder / name, png)
            written.add(name)
            items.append((f"{PLOTS_DIR}/{subdir}/{name}", caption))
        for old in folder.glob(f"{prefix}_*.png"):  # images of an earlier, longer report
            if old.name not in written:
                old.unlink()
        return items, failures

    def feature_map(self) -> Section:
        return feature_map_section(self.run.dir, self.plots, self.run.class_names, (
            "No feature map: it needs the run's bottleneck features. Draw one with "
            "'transferkit features plot IMAGE_DIR --backbone NAME -o map.png', or redraw this report with "
            "'transferkit report RUN_DIR --feature-map' (features come from the cache)."))

    def gradcam(self, errors: list[dict], explainer: Explainer | None) -> Section:
        title = "Grad-CAM of mistakes"
        if explainer is None:
            return Section("gradcam", title, [Paragraph(
                "No Grad-CAM overlays in this report (they need the model; the report was drawn from the run's "
                "files only).", muted=True)])
        items, failed = self._thumbnails(errors[:NUM_GRADCAM], "gradcam", "gradcam", explainer, "no overlay")
        if not items:
            return Section("gradcam", title, [Paragraph("No test image was misclassified.", muted=True)])
        return Section("gradcam", title, [
            Paragraph("Where the model looked for its (wrong) prediction: Grad-CAM on the last convolutional block, "
                      "warm colours weigh most.")] + _failure_note("Grad-CAM overlays", failed, len(items))
            + [Gallery(items)])


def _failure_note(what: str, failures: list[str], total: int) -> list:
    """A section's pictures that failed, said in the report and on the console (never silently)."""
    if not failures:
        return []
    reasons = list(dict.fromkeys(failures))  # the same fault for every image is said once
    message = (f"Report: {what} failed for {len(failures)} of {total} images: {reasons[0]}"
               + (f" (and {len(reasons) - 1} other reason(s))" if len(reasons) > 1 else "") + ".")
    log.warning(message)
    text = message.removeprefix("Report: ")
    return [Paragraph(text[0].upper() + text[1:])]


def _thumbnail_png(path: Path) -> bytes:
    from PIL import Image as PILImage

    from transferkit.data.images import display_image

    buffer = io.BytesIO()
    PILImage.fromarray(display_image(path, _THUMBNAIL_PX)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _time_to_accuracy(history: dict) -> list[str]:
    """The epoch of the best validation accuracy and the wall time it took (``history.csv``'s
    ``elapsed_seconds``, written by fine-tune phases), as a caption note; nothing without them."""
    accuracy = np.asarray(history.get("val_accuracy", []), dtype=float)
    elapsed = np.asarray(history.get("elapsed_seconds", []), dtype=float)
    if not len(accuracy) or len(elapsed) != len(accuracy) or not np.isfinite(accuracy).any():
        return []
    best = int(np.nanargmax(accuracy))
    if not np.isfinite(elapsed[best]):
        return []
    return [f"best validation accuracy {accuracy[best]:.3f} at epoch {best + 1}, {elapsed[best]:.0f} s into the "
            f"phase (of {np.nanmax(elapsed):.0f} s)"]


def _describe_phase(phase: dict) -> str:
    """One ``metrics.json`` phase in words.

    Example:
        >>> _describe_phase({"name": "fine-tune", "unfreeze_blocks": 4, "on_features": False,
        ...                  "rate_multipliers": [1.0, 0.1, 0.01]})
        'fine-tune: 4 top block(s) train, rates x1 head / x0.1 top / x0.01 deeper'
    """
    if phase.get("on_features"):
        return f"{phase.get('name')}: on cached features, backbone frozen"
    head, top, deeper = phase.get("rate_multipliers") or (1, 1, 1)
    return (f"{phase.get('name')}: {phase.get('unfreeze_blocks')} top block(s) train, rates x{head:g} head / "
            f"x{top:g} top / x{deeper:g} deeper")


def _short_path(path: str, keep: int = 2) -> str:
    parts = Path(path).parts
    return ("…/" if len(parts) > keep else "") + "/".join(parts[-keep:])


