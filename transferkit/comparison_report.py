"""What ``transferkit compare`` writes: the table (Markdown, CSV, JSON), the plots and the split.

OUTPUT_DIR::

    comparison.md        the table, the verdict and how to read them
    comparison.csv       one row per head
    comparison.json      everything, per head and per seed
    accuracy.png         accuracy with its bootstrap 95% interval per head
    confusion-HEAD.png   per head: counts and share of each true class
    splits.csv           every image with its role (train / val / test)
    skipped.csv          images that could not be used, with the reason
    config.yaml          the resolved settings
    history-softmax.csv  the softmax head's epochs (first seed)

Figures are drawn on matplotlib's Agg canvas (no GUI, no global figure state) and stay legible
from 2 to a few hundred classes.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from transferkit import files, runs
from transferkit.data import write_splits_csv

#: Above this many classes a confusion matrix shows colours only, no number per cell.
MAX_ANNOTATED_CLASSES = 30
#: Class names longer than this are cut with an ellipsis in figures (full names are in the JSON).
MAX_LABEL_CHARS = 24

FINE_TUNE_NAME = "fine-tune-top"
_MEAN_KEYS = ("accuracy", "macro_f1", "balanced_accuracy", "log_loss", "ece", "fit_seconds", "latency_ms_per_image")


def summarise(per_head: Mapping[str, Sequence[dict]], mcnemar_p: Mapping[str, float], reference: str, verdict,
              *, plan, extraction, roles: np.ndarray, skipped, total_seconds: float) -> dict[str, Any]:
    """The content of ``comparison.json``: per head the mean over seeds and every seed's run.

    Heads are listed best first (mean accuracy). ``accuracy_ci`` is the bootstrap interval of the
    first seed's run; ``mcnemar_p`` is against ``reference``, the largest over seeds.
    """
    from transferkit.compare import ALPHA

    config, folder = plan.config, plan.folder
    heads = []
    for name, seeded in per_head.items():
        row: dict[str, Any] = {"head": name, "num_runs": len(seeded), "score_kind": seeded[0]["score_kind"]}
        for key in _MEAN_KEYS:
            values = [run[key] for run in seeded if run[key] is not None]
            row[key] = float(np.mean(values)) if values else None
        accuracies = [run["accuracy"] for run in seeded]
        row["accuracy_std"] = float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else None
        row["accuracy_ci"] = seeded[0]["accuracy_ci"]
        row["top_k_accuracy"] = {k: float(np.mean([run["top_k_accuracy"][k] for run in seeded]))
                                 for k in seeded[0]["top_k_accuracy"]}
        row["mcnemar_p"] = None if name == reference else mcnemar_p[name]
        row["runs"] = list(seeded)
        heads.append(row)
    heads.sort(key=lambda row: -row["accuracy"])
    test = roles == "test"
    return {
        "image_dir": str(folder.root),
        "backbone": plan.spec.name,
        "image_size": plan.image_size,
        "weights": plan.weights.source,
        "split_source": folder.split_source,
        "class_names": list(folder.class_names),
        "num_images": {role: int((roles == role).sum()) for role in ("train", "val", "test", "skipped")},
        "test_class_counts": {folder.class_names[c]: int(n) for c, n in
                              enumerate(np.bincount(folder.labels[test], minlength=len(folder.class_names)))},
        "seeds": list(config.seeds),
        "search": config.search,
        "calibrate": config.calibrate,
        "reference": reference,
        "alpha": ALPHA,
        "heads": heads,
        "verdict": dataclasses.asdict(verdict),
        "extraction": {"computed": extraction.num_computed, "cached": extraction.num_cached,
                       "images_per_second": round(extraction.images_per_second, 2),
                       "seconds": round(extraction.seconds, 2)},
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "total_seconds": round(total_seconds, 2),
    }


# ----------------------------------------------------------------------------- the table


def table_rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table, numbers formatted for people."""
    many = len(summary["seeds"]) > 1
    num_classes = len(summary["class_names"])
    top_k = next((str(k) for k in (3, 5) if k < num_classes), None)
    reference = summary["reference"]
    header = ["head", "accuracy (mean ± sd)" if many else "accuracy", "95% CI"]
    header += [f"top-{top_k}"] if top_k else []
    header += ["macro-F1", "bal. acc.", "log-loss", "ECE", "fit s", "ms/image (head on features)",
               f"McNemar p vs {reference}"]
    rows = []
    for row in summary["heads"]:
        accuracy = f"{row['accuracy']:.3f}"
        if row["accuracy_std"] is not None:
            accuracy += f" ± {row['accuracy_std']:.3f}"
        low, high = row["accuracy_ci"]
        cells = [row["head"], accuracy, f"{low:.3f}–{high:.3f}"]
        cells += [_number(row["top_k_accuracy"].get(top_k))] if top_k else []
        cells += [_number(row["macro_f1"]), _number(row["balanced_accuracy"]), _number(row["log_loss"]),
                  _number(row["ece"]), _number(row["fit_seconds"], 1), _number(row["latency_ms_per_image"], 4),
                  "(reference)" if row["head"] == reference else _p_value(row["mcnemar_p"])]
        rows.append(cells)
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table padded into columns, so it reads as well in a terminal as rendered."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    numeric = [i > 0 for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).rjust(w) if num else str(c).ljust(w)
                                 for c, w, num in zip(cells, widths, numeric, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if num else ":" + "-" * (w + 1)
                          for w, num in zip(widths, numeric, strict=True)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _number(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _p_value(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def markdown_report(summary: Mapping[str, Any], table: str) -> str:
    """``comparison.md``: what was compared, the table, the verdict and how the numbers were made."""
    counts = summary["num_images"]
    seeds = summary["seeds"]
    lines = [
        f"# Head comparison: {summary['backbone']} features of {summary['image_dir']}",
        "",
        f"{len(summary['class_names'])} classes; {counts['train']} train, {counts['val']} val, "
        f"{counts['test']} test images ({summary['split_source']} split); {counts['skipped']} skipped. "
        f"Backbone {summary['backbone']} at {summary['image_size']} px, weights: {summary['weights']}.",
        "",
        table,
        "",
        f"**Verdict:** {summary['verdict']['text']}",
        "",
        "How to read it:",
        "",
        f"- Every head was trained on the same cached features and scored on the same {counts['test']} test "
        "images. scikit-learn heads train on train + val (their cross-validated grid search "
        f"{'is on' if summary['search'] else 'is off (--no-search)'}); the softmax head early-stops on val, then "
        "retrains on train + val for the best epoch count.",
        "- bal. acc.: balanced accuracy (mean recall per class). 95% CI: percentile bootstrap of the test images. "
        "McNemar p: exact or chi-square McNemar test of "
        f"each head against {summary['reference']} on the same images; below 0.05 the difference is unlikely "
        "to be chance.",
        "- Log-loss and ECE (expected calibration error, 15 bins) need probabilities: n/a for heads that give "
        "decision scores (top-k accuracy uses those scores)"
        + (", SVMs and ridge were calibrated (--calibrate)." if summary["calibrate"] else
           "; --calibrate adds calibrated probabilities to SVMs and ridge (slower)."),
        "- fit s: wall time of training, search included. ms/image: time to score cached features per image "
        "(all test images in one call, fastest of 3), the backbone excluded"
        + (f"; n/a for {FINE_TUNE_NAME}, which runs the whole network on images." if any(
            row["head"] == FINE_TUNE_NAME for row in summary["heads"]) else "."),
    ]
    if len(seeds) > 1:
        lines.append(f"- Seeds {seeds[0]} to {seeds[-1]}: the split stays fixed; each seed changes the heads' "
                     "initialisation, shuffling, cross-validation folds and the bootstrap. Metrics are means over "
                     f"seeds (± sample standard deviation); the 95% CI is seed {seeds[0]}'s; the McNemar p is the "
                     "largest over seeds, so a difference counts as significant only if it is in every seed.")
    lines += ["", "![accuracy per head](accuracy.png)", ""]
    lines += [f"- [{row['head']}: confusion matrix](confusion-{row['head']}.png)" for row in summary["heads"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def accuracy_png(summary: Mapping[str, Any]) -> bytes:
    """Accuracy per head (best at the top) with its bootstrap 95% interval; seeds as small dots."""
    heads = summary["heads"]
    n = len(heads)
    fig = _figure(7.5, 1.2 + 0.45 * n)
    ax = fig.add_subplot()
    positions = np.arange(n)[::-1]
    for y, row in zip(positions, heads, strict=True):
        first = row["runs"][0]["accuracy"]
        low, high = row["accuracy_ci"]
        colour = "tab:blue" if row["head"] != summary["reference"] else "tab:orange"
        ax.errorbar(first, y, xerr=[[first - low], [high - first]], fmt="o", color=colour, capsize=4)
        if len(row["runs"]) > 1:
            ax.plot([run["accuracy"] for run in row["runs"]], [y] * len(row["runs"]), "|", color="0.4", ms=9)
        ax.annotate(f"{first:.3f}", (high, y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=9)
    reference = next(row for row in heads if row["head"] == summary["reference"])
    ax.axvline(reference["runs"][0]["accuracy"], color="tab:orange", linestyle=":", linewidth=1)
    ax.set_yticks(positions, [_short(row["head"]) for row in heads])
    lows = [row["accuracy_ci"][0] for row in heads] + [run["accuracy"] for row in heads for run in row["runs"]]
    left = max(0.0, min(lows) - 0.05)
    ax.set_xlim(left, 1.0 + 0.12 * (1.0 - left))  # room for the value written right of each interval
    ax.set_xlabel(f"test accuracy ({summary['num_images']['test']} images); bars: bootstrap 95% interval"
                  + ("; ticks: each seed" if len(summary["seeds"]) > 1 else ""))
    ax.set_title(f"Heads on {summary['backbone']} features (dotted: {summary['reference']})", fontsize=11)
    ax.grid(axis="x", color="0.9")
    return _png(fig)


def confusion_png(matrix, class_names: Sequence[str], title: str) -> bytes:
    """Counts and share of each true class side by side, via scikit-learn's ConfusionMatrixDisplay."""
    from sklearn.metrics import ConfusionMatrixDisplay

    counts = np.asarray(matrix)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    n = len(class_names)
    names = [_short(c) for c in class_names]
    cell = float(np.clip(4.0 / max(n, 1), 0.16, 0.9))
    label_room = 0.07 * max(map(len, names)) + 0.6
    side = n * cell + label_room + 1.0
    fig = _figure(2 * side + 0.6, side + 0.6)
    font = float(np.clip(cell * 72 * 0.3, 5, 10))
    tick_font = float(np.clip(cell * 72 * 0.6, 5, 10))
    for ax_index, (values, fmt, subtitle) in enumerate(
            ((counts, "d", "counts"), (shares, ".2f", "share of each true class"))):
        ax = fig.add_subplot(1, 2, ax_index + 1)
        display = ConfusionMatrixDisplay(values, display_labels=names)
        display.plot(ax=ax, cmap="Blues", include_values=n <= MAX_ANNOTATED_CLASSES, values_format=fmt,
                     xticks_rotation="vertical" if n > 4 else "horizontal", colorbar=False,
                     text_kw={"fontsize": font})
        ax.tick_params(labelsize=tick_font)
        ax.set_title(subtitle, fontsize=10)
    fig.suptitle(title, fontsize=11)
    return _png(fig)


def _short(name: str) -> str:
    """A long class name cut in the middle, so names that differ only at the end stay distinct.

    Example:
        >>> _short("golden_retriever_puppy_number_11")
        'golden_retr…py_number_11'
    """
    name = " ".join(str(name).split())
    if len(name) <= MAX_LABEL_CHARS:
        return name
    head = (MAX_LABEL_CHARS - 1) // 2
    return name[:head] + "…" + name[len(name) - (MAX_LABEL_CHARS - 1 - head):]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(min(width, 60), min(height, 60)), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- writing


def write_outputs(plan, summary: dict[str, Any], roles: np.ndarray, skipped) -> str:
    """Write every file of OUTPUT_DIR (see the module docstring); returns the Markdown table."""
    import yaml

    from transferkit.heads import HEADS

    out, folder, config = plan.output_dir, plan.folder, plan.config
    header, rows = table_rows(summary)
    table = markdown_table(header, rows)
    files.write_text(out / "comparison.md", markdown_report(summary, table))
    files.write_json(out / "comparison.json", summary)
    files.write_csv(out / "comparison.csv", ["head", "accuracy", "accuracy_std", "accuracy_ci_low",
                                             "accuracy_ci_high", *(f"top_{k}_accuracy" for k in (3, 5)),
                                             "macro_f1", "balanced_accuracy", "log_loss", "ece", "fit_seconds",
                                             "latency_ms_per_image", f"mcnemar_p_vs_{summary['reference']}",
                                             "score_kind", "num_runs"], [
        [row["head"], row["accuracy"], row["accuracy_std"], *row["accuracy_ci"],
         *(row["top_k_accuracy"].get(str(k)) for k in (3, 5)), row["macro_f1"], row["balanced_accuracy"],
         row["log_loss"], row["ece"], row["fit_seconds"], row["latency_ms_per_image"], row["mcnemar_p"],
         row["score_kind"], row["num_runs"]]
        for row in summary["heads"]])
    files.write_bytes(out / "accuracy.png", accuracy_png(summary))
    for row in summary["heads"]:
        first = row["runs"][0]
        title = (f"{row['head']} (seed {first['seed']}): accuracy {first['accuracy']:.3f} on "
                 f"{summary['num_images']['test']} test images")
        files.write_bytes(out / f"confusion-{row['head']}.png",
                          confusion_png(first["confusion_matrix"], folder.class_names, title))
    keep = roles != "skipped"
    write_splits_csv(dataclasses.replace(
        folder, paths=tuple(p for p, k in zip(folder.paths, keep, strict=True) if k), labels=folder.labels[keep],
        splits=tuple(str(r) for r in roles[keep])), out / runs.SPLITS_FILE)
    files.write_csv(out / runs.SKIPPED_FILE, ["path", "reason"], skipped)
    settings = config.to_dict()
    settings["resolved"] = {
        "image_size": plan.image_size,
        "weights": plan.weights.source,
        "seeds": list(config.seeds),
        "softmax": {key: value for key, value in config.train_config().to_dict().items()
                    if key in ("epochs", "learning_rate", "patience", "dropout", "regularization", "refit")},
        "grids": {name: {key: list(values) for key, values in HEADS[name].grid.items()}
                  for name in config.heads if name in HEADS} if config.search else {},
    }
    files.write_text(out / runs.CONFIG_FILE, yaml.safe_dump(settings, sort_keys=False, allow_unicode=True))
    return table
