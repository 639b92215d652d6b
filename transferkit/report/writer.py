"""The run report: ``report.html`` (one self-contained file) and ``report.md`` with PNG plots in ``plots/``.

Made from the files of a run folder only (``metrics.json``, ``config.yaml``, ``history.csv``,
``predictions.csv``, ``skipped.csv``, ``labels.txt``), so ``transferkit report RUN_DIR`` redraws
it at any time and works on ``train`` and ``evaluate`` folders alike. Sections: summary,
configuration and versions, dataset, training curves, metrics, per-class metrics, confusion
matrix (counts and shares), most-confused pairs, the worst mistakes (highest-confidence wrong
test images, as thumbnails), the feature map and Grad-CAM when given.

Every report is written by :func:`write_document`, with plots saved through :class:`PlotFolder`;
the sections any run has (:func:`dataset_section`, :func:`versions_blocks`, :func:`confusion_blocks`,
:func:`feature_map_section`) are built here for ``transferkit compare``'s report too
(:mod:`transferkit.report.comparison`). Nothing here imports TensorFlow.

Example:
    >>> html_path, md_path = write_report("runs/first")  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from transferkit import files
from transferkit.report import plots
from transferkit.report.data import RunFolder, collect_versions, to_float
from transferkit.report.render import (
    Cards,
    Gallery,
    Image,
    Paragraph,
    Row,
    Section,
    Table,
    render_html,
    render_markdown,
)
from transferkit.serving import runs

log = logging.getLogger("transferkit")

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
PLOTS_DIR = "plots"
#: The feature map's 2-D points and labels, so a report redrawn without features keeps its map.
FEATURE_MAP_FILE = "feature_map.json"

#: Thumbnails in the gallery of worst mistakes, and how many of them get a Grad-CAM overlay.
NUM_WORST_ERRORS = 12
NUM_GRADCAM = 4
_THUMBNAIL_PX = 200
_MAX_LISTED_SKIPPED = 50

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


def write_document(report_dir: Path, title: str, sections: Sequence[Section], subtitle: str = "") -> tuple[Path, Path]:
    """Write ``report.html`` (images embedded) and ``report.md`` of ``sections`` into ``report_dir``.

    The one writer of every report (train, evaluate, compare): images are given relative to
    ``report_dir`` (see :class:`PlotFolder`); the subtitle gets the time the report was made.

    Example:
        >>> doc = [Section("verdict", "Verdict", [Paragraph("A tie.")])]
        >>> write_document(Path("cmp"), "Heads", doc)  # doctest: +SKIP
        (PosixPath('cmp/report.html'), PosixPath('cmp/report.md'))
    """
    html_path, md_path = report_dir / REPORT_HTML, report_dir / REPORT_MD
    made = f"report made {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    subtitle = f"{subtitle}; {made}" if subtitle else made
    files.write_text(html_path, render_html(title, sections, report_dir, subtitle))
    files.write_text(md_path, render_markdown(title, sections, subtitle))
    return html_path, md_path


class PlotFolder:
    """The ``plots/`` folder of a report: saves PNGs, returns their paths relative to the report.

    Example:
        >>> PlotFolder(Path("runs/first")).save("curves.png", png)  # doctest: +SKIP
        'plots/curves.png'
    """

    def __init__(self, report_dir: Path):
        self.dir = Path(report_dir) / PLOTS_DIR
        self.dir.mkdir(exist_ok=True)

    def save(self, name: str, png: bytes) -> str:
        files.write_bytes(self.dir / name, png)
        return f"{PLOTS_DIR}/{name}"


# ----------------------------------------------------------------------------- sections shared by every report


def versions_blocks(versions: dict | None, source: str) -> list:
    """The versions table: those recorded in ``source``, else those installed now (and say so)."""
    if versions:
        return [Paragraph("Versions the run was made with:"), Table(["package", "version"], versions.items())]
    return [Paragraph("Versions installed when this report was made:"),
            Table(["package", "version"], collect_versions().items()),
            Paragraph(f"{source} does not record the versions of the run itself.", muted=True)]


def dataset_section(class_names: Sequence[str], counts: dict[str, dict[str, int]], skipped: Sequence[dict], *,
                    split_source: str | None = None, num_ignored: int | None = None) -> Section:
    """Images per class and split, and the skipped files (``path``, ``reason``) with their reasons."""
    splits = [s for s in counts if any(counts[s].values())] or list(counts)
    rows = [[name] + [counts[s].get(name, 0) for s in splits] + [sum(counts[s].get(name, 0) for s in splits)]
            for name in class_names]
    rows.append(["total"] + [sum(counts[s].values()) for s in splits] + [sum(r[-1] for r in rows)])
    blocks = [Paragraph(f"{len(class_names)} classes; images per class and split"
                        + (f" (split from {split_source})" if split_source else "") + "."),
              Table(["class"] + splits + ["all"], rows, numeric=range(1, len(splits) + 2), scroll=len(rows) > 16)]
    blocks.append(Paragraph(f"Skipped (unreadable) files: {len(skipped)}."
                            + (f" Ignored entries (hidden, system or non-image files): {num_ignored}."
                               if num_ignored is not None else "")))
    if skipped:
        shown = skipped[:_MAX_LISTED_SKIPPED]
        blocks.append(Table(["file", "reason"], [[files.display_name(str(s.get("path") or "")),
                                                   files.display_name(str(s.get("reason") or ""))] for s in shown],
                            scroll=len(shown) > 12))
        if len(skipped) > len(shown):
            blocks.append(Paragraph(f"... and {len(skipped) - len(shown)} more in {runs.SKIPPED_FILE}.", muted=True))
    return Section("dataset", "Dataset", blocks)


def confusion_blocks(plot_folder: PlotFolder, matrix, class_names: Sequence[str], *, stem: str = "confusion",
                     title: str = "Confusion matrix") -> list:
    """The confusion matrix as counts and as shares of each true class (``plots/STEM_counts.png``, ``_normalized``)."""
    counts = plot_folder.save(f"{stem}_counts.png", plots.confusion_matrix_png(
        matrix, class_names, title=f"{title}, counts"))
    shares = plot_folder.save(f"{stem}_normalized.png", plots.confusion_matrix_png(
        matrix, class_names, normalize=True, title=f"{title}, share of each true class"))
    big = len(class_names) > 40
    images = [Image(counts, f"{title}, counts", full_size=big),
              Image(shares, f"{title}, share of each true class", "Each row divided by its total: the "
                    "diagonal is each class's recall.", full_size=big)]
    # Small matrices fit side by side; big ones need the page's whole width each.
    return [Row(images, equal=True)] if len(class_names) <= 12 else images


def confusion_note(class_names: Sequence[str]) -> Paragraph:
    return Paragraph("Rows: true class; columns: predicted class." + (
        " Too many classes to print numbers in cells; the tables hold them."
        if len(class_names) > plots.MAX_ANNOTATED_CLASSES else "") + (
        " Long class names are shortened with '…'." if any(len(n) > 18 for n in class_names) else ""))


def compute_feature_map(report_dir: Path, features: np.ndarray, labels: np.ndarray, seed: int,
                        methods: Sequence[str] = ("pca", "tsne")) -> None:
    """Project ``features`` with each of ``methods`` and store the points in ``report_dir/feature_map.json``."""
    projections = []
    for method in methods:
        points, y, info = plots.project_features(features, labels, method, seed=seed)
        projections.append({"info": info, "labels": y.tolist(), "points": np.round(points, 4).tolist()})
    files.write_json(Path(report_dir) / FEATURE_MAP_FILE, {"projections": projections})


_PROJECTION_NOTES = {"pca": ("PCA", "PCA keeps the directions of largest variance (linear)"),
                     "tsne": ("t-SNE", "t-SNE keeps neighbourhoods (distances between far clusters mean little)")}


def feature_map_section(report_dir: Path, plot_folder: PlotFolder, class_names: Sequence[str], missing: str,
                        note: str = "") -> Section:
    """The feature map stored by :func:`compute_feature_map`, or ``missing`` (how to get one) without it."""
    title = "Feature map"
    try:
        # open_regular: a FIFO or device under that name would block or never end.
        stored = json.loads(files.read_regular_bytes(Path(report_dir) / FEATURE_MAP_FILE))["projections"]
        projections = [(np.asarray(p["points"], dtype=float).reshape(-1, 2), np.asarray(p["labels"], dtype=int),
                        p["info"]) for p in stored]
        notes = [_PROJECTION_NOTES[info["method"]] for _, _, info in projections]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or damaged: draw without it
        projections = []
    if not projections:
        return Section("feature-map", title, [Paragraph(missing, muted=True)])
    path = plot_folder.save("feature_map.png", plots.feature_map_png(projections, class_names))
    return Section("feature-map", title, [
        Paragraph("The pretrained backbone's features of the images (as cached, before any fine-tuning), "
                  "projected to 2-D and coloured by class: well separated clusters mean a head on the frozen "
                  "backbone can tell the classes apart."),
        Image(path, f"Feature map ({' and '.join(name for name, _ in notes)})",
              "; ".join(text for _, text in notes) + "." + (f" {note}" if note else ""))])


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


def settings_table(header: Sequence[str], data: dict, *, depth: int = 0, skip: Sequence[str] = ()) -> Table:
    """Two columns of ``data``: nested keys joined with dots down to ``depth`` levels, values made readable.

    Example:
        >>> settings_table(["setting", "value"], {"a": {"b": 1.5}}, depth=1).rows
        [['a.b', '1.5']]
    """
    flat = _flatten(data, depth=depth)
    return Table(header, [[k, _plain(v)] for k, v in flat.items() if k.split(".")[0] not in skip])


def _flatten(data: dict, prefix: str = "", depth: int = 1) -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and depth > 0:
            out.update(_flatten(value, f"{prefix}{key}.", depth - 1))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) if len(value) <= 12 else f"{len(value)} items"
    return "" if value is None else str(value)

