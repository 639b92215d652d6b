"""What every report is made of: the document writer, the plots folder and the sections any run
has (settings, versions, dataset, confusion matrix, feature map), shared by the run report
(:mod:`transferkit.report.writer`) and ``transferkit compare``'s (:mod:`transferkit.report.comparison`).

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transferkit import files
from transferkit.report import plots
from transferkit.report.data import collect_versions
from transferkit.report.render import (
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
_MAX_LISTED_SKIPPED = 50


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
