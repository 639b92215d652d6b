"""What ``transferkit compare`` writes: the report, the table (Markdown, CSV, JSON), the plots and the split.

OUTPUT_DIR::

    report.html          the whole comparison in one self-contained page (images embedded), and
    report.md            the same in Markdown: configuration and versions, dataset, the table,
                         the verdict, the accuracy plot, every head's confusion matrix, the feature map
    comparison.md        the table, the verdict and how to read them
    comparison.csv       one row per head
    comparison.json      everything, per head and per seed
    plots/accuracy.png   accuracy with its bootstrap 95% interval per head
    plots/confusion_HEAD_counts.png, plots/confusion_HEAD_normalized.png
                         per head: counts and share of each true class
    plots/feature_map.png, feature_map.json
                         the cached features projected to 2-D (PCA), coloured by class
    splits.csv           every image with its role (train / val / test)
    skipped.csv          images that could not be used, with the reason
    config.yaml          the resolved settings
    history-softmax.csv  the softmax head's epochs (first seed)

The report is made by :mod:`transferkit.report.sections` (the same sections, blocks and
writer as a training run's report); the figures are :mod:`transferkit.report.plots`'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transferkit import files
from transferkit.data.scan import write_splits_csv
from transferkit.report import plots
from transferkit.report.data import collect_versions
from transferkit.report.render import Cards, Image, Paragraph, Row, Section, Table
from transferkit.report.sections import (
    FEATURE_MAP_FILE,
    PLOTS_DIR,
    REPORT_HTML,
    REPORT_MD,
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

COMPARISON_JSON = "comparison.json"
ACCURACY_PNG = "accuracy.png"
FINE_TUNE_NAME = "fine-tune-top"
_MEAN_KEYS = ("accuracy", "macro_f1", "balanced_accuracy", "log_loss", "ece", "fit_seconds", "latency_ms_per_image")


def summarise(per_head: Mapping[str, Sequence[dict]], mcnemar_p: Mapping[str, float], reference: str, verdict,
              *, plan, extraction, run_folder, skipped, total_seconds: float) -> dict[str, Any]:
    """The content of ``comparison.json``: per head the mean over seeds and every seed's run.

    Heads are listed best first (mean accuracy). ``accuracy_ci`` is the bootstrap interval of the
    first seed's run; ``mcnemar_p`` is against ``reference``, the largest over seeds.
    """
    from transferkit.heads.stats import ALPHA

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
    roles = np.array(run_folder.splits, dtype=object)
    return {
        "image_dir": str(folder.root),
        "backbone": plan.spec.name,
        "image_size": plan.image_size,
        "weights": plan.weights.source,
        "split_source": folder.split_source,
        "class_names": list(folder.class_names),
        "num_images": {**{role: int((roles == role).sum()) for role in ("train", "val", "test")},
                       "skipped": len(skipped)},
        "counts": run_folder.counts(),
        "num_ignored": folder.num_ignored,
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
        "versions": collect_versions(),
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


def dataset_line(summary: Mapping[str, Any]) -> str:
    """One sentence: classes, images per role, backbone and weights."""
    counts = summary["num_images"]
    return (f"{len(summary['class_names'])} classes; {counts['train']} train, {counts['val']} val, "
            f"{counts['test']} test images ({summary['split_source']} split); {counts['skipped']} skipped. "
            f"Backbone {summary['backbone']} at {summary['image_size']} px, weights: {summary['weights']}.")


def reading_notes(summary: Mapping[str, Any]) -> list[str]:
    """How the table's numbers were made, one note per item (for ``comparison.md`` and the report)."""
    seeds = summary["seeds"]
    notes = [
        f"Every head was trained on the same cached features and scored on the same {summary['num_images']['test']} "
        "test images. scikit-learn heads train on train + val (their cross-validated grid search "
        f"{'is on' if summary['search'] else 'is off (--no-search)'}); the softmax head early-stops on val, then "
        "retrains on train + val for the best epoch count.",
        "bal. acc.: balanced accuracy (mean recall per class). 95% CI: percentile bootstrap of the test images. "
        f"McNemar p: exact or chi-square McNemar test of each head against {summary['reference']} on the same "
        f"images; below {summary['alpha']:g} the difference is unlikely to be chance.",
        "Log-loss and ECE (expected calibration error, 15 bins) need probabilities: n/a for heads that give "
        "decision scores (top-k accuracy uses those scores)"
        + (", SVMs and ridge were calibrated (--calibrate)." if summary["calibrate"] else
           "; --calibrate adds calibrated probabilities to SVMs and ridge (slower)."),
        "fit s: wall time of training, search included. ms/image: time to score cached features per image "
        "(all test images in one call, fastest of 3), the backbone excluded"
        + (f"; n/a for {FINE_TUNE_NAME}, which runs the whole network on images." if any(
            row["head"] == FINE_TUNE_NAME for row in summary["heads"]) else "."),
    ]
    if len(seeds) > 1:
        notes.append(f"Seeds {seeds[0]} to {seeds[-1]}: the split stays fixed; each seed changes the heads' "
                     "initialisation, shuffling, cross-validation folds and the bootstrap. Metrics are means over "
                     f"seeds (± sample standard deviation); the 95% CI is seed {seeds[0]}'s; the McNemar p is the "
                     "largest over seeds, so a difference counts as significant only if it is in every seed.")
    return notes


def markdown_report(summary: Mapping[str, Any], table: str) -> str:
    """``comparison.md``: what was compared, the table, the verdict and how the numbers were made."""
    lines = [f"# Head comparison: {summary['backbone']} features of {summary['image_dir']}", "",
             dataset_line(summary), "", table, "", f"**Verdict:** {summary['verdict']['text']}", "",
             "How to read it:", ""]
    lines += [f"- {note}" for note in reading_notes(summary)]
    lines += ["", f"The whole comparison, with the plots of every head: [{REPORT_HTML}]({REPORT_HTML})"
              f" ([{REPORT_MD}]({REPORT_MD})).", "",
              f"![accuracy per head]({PLOTS_DIR}/{ACCURACY_PNG})"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the report


def report_sections(summary: Mapping[str, Any], settings: Mapping[str, Any], output_dir: Path,
                    plot_folder: PlotFolder) -> list[Section]:
    """The sections of the comparison's ``report.html`` / ``report.md``, drawing their plots into ``plot_folder``."""
    header, rows = table_rows(summary)
    names, heads, verdict = summary["class_names"], summary["heads"], summary["verdict"]
    best = heads[0]
    low, high = best["accuracy_ci"]
    cards = [("best accuracy", f"{best['accuracy']:.3f} ({best['head']})"), ("its 95% CI", f"{low:.3f}–{high:.3f}"),
             ("significant winner", verdict["winner"] or "none"), ("test images", str(summary["num_images"]["test"])),
             ("classes", str(len(names))), ("heads", str(len(heads)))]
    extraction = summary["extraction"]
    summary_section = Section("summary", "Summary", [
        Cards(cards), Paragraph(dataset_line(summary)),
        Paragraph(f"Features: {extraction['computed']} computed, {extraction['cached']} from the cache; features, "
                  f"training and scoring took {summary['total_seconds']:.1f} s."),
        Paragraph(f"Verdict: {verdict['text']}")])

    facts = {key: summary[key] for key in ("image_dir", "backbone", "image_size", "weights", "split_source",
                                           "seeds", "reference", "alpha", "extraction", "total_seconds")}
    config_section = Section("config", "Configuration and versions", [
        Row([[Paragraph(f"Settings ({runs.CONFIG_FILE}):"), settings_table(["setting", "value"], settings,
                                                                                  depth=3)],
             [Paragraph(f"Run facts ({COMPARISON_JSON}):"), settings_table(["item", "value"], facts, depth=1)],
             versions_blocks(summary.get("versions"), COMPARISON_JSON)]),
        Paragraph(f"Repeat the comparison: transferkit compare --config {output_dir / runs.CONFIG_FILE} -o NEW_DIR",
                  muted=True)])

    dataset = dataset_section(names, summary["counts"], summary["skipped"],
                                     split_source=summary["split_source"], num_ignored=summary.get("num_ignored"))

    table_blocks: list = [Paragraph("Best first."), Table(header, rows, numeric=range(1, len(header)), nowrap=[0])]
    table_blocks += [Paragraph(note, muted=True) for note in reading_notes(summary)]
    fine_tuned = [row for row in heads if row["head"] == FINE_TUNE_NAME]
    if fine_tuned:
        table_blocks.append(Paragraph(f"The {FINE_TUNE_NAME} arm is a training run of its own, with its own report: "
                                      f"{FINE_TUNE_NAME}/{REPORT_HTML}."))
    table_section = Section("table", "Comparison table", table_blocks)

    rule = (f"A head is named the winner only when McNemar's test gives p < {summary['alpha']:g} against the "
            f"runner-up and against {summary['reference']}"
            + (", in every seed." if len(summary["seeds"]) > 1 else "."))
    verdict_section = Section("verdict", "Verdict", [Paragraph(verdict["text"]), Paragraph(rule, muted=True)])

    many_seeds = len(summary["seeds"]) > 1
    accuracy = plot_folder.save(ACCURACY_PNG, plots.accuracy_intervals_png(
        heads, summary["reference"],
        f"test accuracy ({summary['num_images']['test']} images); bars: bootstrap 95% interval"
        + ("; ticks: each seed" if many_seeds else ""),
        f"Heads on {summary['backbone']} features (dotted: {summary['reference']})"))
    accuracy_section = Section("accuracy", "Accuracy per head", [Image(
        accuracy, "Accuracy per head with its bootstrap 95% interval",
        "Best at the top; the dot is the accuracy" + (f" of seed {summary['seeds'][0]}" if many_seeds else "")
        + ", the bar its bootstrap 95% interval. Intervals that overlap are no proof of a difference either way: "
        "McNemar's test in the table compares heads on the same images.")])

    confusions: list = [confusion_note(names)]
    for row in heads:
        first = row["runs"][0]
        confusions.append(Paragraph(f"{row['head']}" + (f" (seed {first['seed']})" if many_seeds else "")
                                    + f": accuracy {first['accuracy']:.3f}."))
        confusions += confusion_blocks(plot_folder, first["confusion_matrix"], names,
                                       stem=f"confusion_{row['head']}", title=row["head"])
    confusion_section = Section("confusion", "Confusion matrices", confusions)

    feature_map = feature_map_section(output_dir, plot_folder, names, (
        "No feature map: none of the images' features could be projected. Draw one with 'transferkit features plot "
        "IMAGE_DIR --backbone NAME -o map.png'."), note=(
        "The comparison draws PCA only (t-SNE would take a good share of its time); 'transferkit features plot "
        "IMAGE_DIR --backbone NAME --method both -o map.png' draws both from the same cached features."))
    return [summary_section, config_section, dataset, table_section, verdict_section, accuracy_section,
            confusion_section, feature_map]


# ----------------------------------------------------------------------------- writing


def write_outputs(plan, summary: dict[str, Any], run_folder, skipped, features: np.ndarray,
                  feature_labels: np.ndarray) -> str:
    """Write every file of OUTPUT_DIR (see the module docstring); returns the Markdown table.

    Args:
        plan: the comparison's plan.
        summary: from :func:`summarise`.
        run_folder: the image folder with each usable image's role as its split.
        skipped: ``(path, reason)`` of every image left out.
        features, feature_labels: the usable images' cached features and class indices, for the
            feature map.
    """
    import yaml

    from transferkit.heads.registry import HEADS

    out, config = plan.output_dir, plan.config
    header, rows = table_rows(summary)
    table = markdown_table(header, rows)
    files.write_text(out / "comparison.md", markdown_report(summary, table))
    files.write_json(out / COMPARISON_JSON, summary)
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
    write_splits_csv(run_folder, out / runs.SPLITS_FILE)
    files.write_csv(out / runs.SKIPPED_FILE, ["path", "reason"], skipped)
    settings = config.to_dict()
    settings["resolved"] = {
        "image_size": plan.image_size,
        "weights": plan.weights.source,
        "seeds": list(config.seeds),
        "softmax": {key: value for key, value in config.train_config().to_dict().items()
                    if key in ("head_solver", "regularization", "refit")},
        "grids": {name: {key: list(values) for key, values in HEADS[name].grid.items()}
                  for name in config.heads if name in HEADS} if config.search else {},
    }
    files.write_text(out / runs.CONFIG_FILE, yaml.safe_dump(settings, sort_keys=False, allow_unicode=True))

    if len(features) >= 3:  # PCA only: t-SNE of 2,000 images costs several seconds, up to half a minute
        compute_feature_map(out, features, feature_labels, config.seed, methods=("pca",))
    else:  # never draw the map of an earlier comparison in this folder (--overwrite)
        (out / FEATURE_MAP_FILE).unlink(missing_ok=True)
    sections = report_sections(summary, settings, out, PlotFolder(out))
    write_document(out, f"transferkit compare: {summary['backbone']} features of "
                          f"{Path(summary['image_dir']).name}", sections, f"Head comparison in {out.resolve()}")
    return table
