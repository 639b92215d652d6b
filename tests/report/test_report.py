"""The run report: every section, every image present (Markdown) or embedded (HTML), names escaped; plots."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from transferkit.config import TrainConfig
from transferkit.evaluation.evaluate import evaluate_run
from transferkit.report import plots
from transferkit.report.data import read_history
from transferkit.report.render import escape_markdown
from transferkit.report.writer import write_report
from transferkit.serving.schema import METRICS_VERSION
from transferkit.testing import make_image_folder, run_cli
from transferkit.training.run import train

SECTIONS = {"summary": "Summary", "config": "Configuration and versions", "dataset": "Dataset",
            "training": "Training curves", "metrics": "Metrics", "per-class": "Per-class metrics",
            "confusion": "Confusion matrix", "confused-pairs": "Most-confused classes", "errors": "Worst mistakes",
            "feature-map": "Feature map", "gradcam": "Grad-CAM of mistakes"}
#: A class folder name a browser or Markdown viewer would otherwise take as markup.
NASTY = "<b>x&y|*z_"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"



@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny run whose class names hold HTML and Markdown specials; some test images are wrong."""
    root = tmp_path_factory.mktemp("report")
    folder = make_image_folder(root / "photos", num_classes=3, images_per_class=14, image_size=32,
                               class_prefix=NASTY, formats=("png", "jpg"))
    config = TrainConfig(image_dir=str(folder), output_dir=str(root / "run"), backbone="tiny_test", weights="none",
                         head_solver="adam", epochs=3, patience=2, learning_rate=0.01, batch_size=8,
                         cache_dir=str(root / "cache"))
    result = train(config, verbose=0)
    # A head trained with Adam for 3 epochs on random-init features is far from perfect (about 1 in 3 right);
    # the exact head gets these synthetic classes all right.
    assert ",0\n" in (result.run_dir / "predictions.csv").read_text(), "the report tests need test mistakes"
    return folder, result.run_dir


def embedded_images(html: str) -> list[bytes]:
    """Every image of a report page, checked to be embedded (a data: URI), decoded."""
    sources = re.findall(r'<img src="([^"]*)"', html)
    assert all(s.startswith("data:image/png;base64,") for s in sources), [s[:40] for s in sources]
    return [base64.b64decode(s.split(",", 1)[1]) for s in sources]


def check_report(report_dir: Path, sections: dict[str, str]) -> tuple[str, list[bytes]]:
    """report.html and report.md hold every section; every image is an embedded PNG / an existing PNG file.

    Returns the HTML and its images.
    """
    html = (report_dir / "report.html").read_text(encoding="utf-8")
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    for section_id, title in sections.items():
        assert f'<section id="{section_id}">' in html
        assert f"## {title}" in md
    images = embedded_images(html)
    assert all(image.startswith(PNG_MAGIC) for image in images)
    assert not re.search(r"<(script|link)\b|src=\"http|url\(", html)  # opens offline, nothing fetched
    references = re.findall(r"!\[[^\]]*\]\(<?([^)>]+)>?\)", md)
    assert len(references) == len(images)
    for ref in references:
        assert (report_dir / ref).is_file() and (report_dir / ref).read_bytes().startswith(PNG_MAGIC), ref
    return html, images


def test_report_has_every_section_and_embeds_every_image(tiny_run):
    _, run_dir = tiny_run
    write_report(run_dir)
    _, images = check_report(run_dir, SECTIONS)
    # Curves, two confusion matrices and at least one thumbnail of a mistake (3 epochs: not perfect).
    assert len(images) >= 4
    assert (run_dir / "plots" / "confusion_normalized.png").is_file()


def test_class_names_are_escaped(tiny_run):
    _, run_dir = tiny_run
    html_path, md_path = write_report(run_dir)
    html, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")
    assert NASTY not in html and "<b>" not in html
    assert "&lt;b&gt;x&amp;y|*z_0" in html
    assert "<b>" not in md and escape_markdown(f"{NASTY}0") in md
    assert escape_markdown(f"{NASTY}0") == "&lt;b&gt;x&amp;y\\|\\*z\\_0"


def test_versions_are_read_at_report_time_when_the_run_lacks_them(tiny_run):
    _, run_dir = tiny_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    html = write_report(run_dir)[0].read_text(encoding="utf-8")
    if "versions" not in metrics:
        assert "Versions installed when this report was made" in html
    assert "tensorflow" in html and "keras" in html and "python" in html


def test_feature_map_from_the_cache_and_redrawn_without_it(tiny_run):
    _, run_dir = tiny_run
    result = run_cli("report", run_dir, "--feature-map", "-q")
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output
    stored = json.loads((run_dir / "feature_map.json").read_text())["projections"]
    assert [p["info"]["method"] for p in stored] == ["pca", "tsne"] and len(stored[0]["points"]) == 42
    # A redraw from the folder's files alone keeps the map.
    html = write_report(run_dir)[0].read_text(encoding="utf-8")
    assert 'alt="Feature map (PCA and t-SNE)"' in html
    assert (run_dir / "plots" / "feature_map.png").read_bytes().startswith(PNG_MAGIC)


def test_evaluate_writes_its_report(tiny_run, tmp_path):
    folder, run_dir = tiny_run
    out = tmp_path / "eval"
    evaluate_run(run_dir, folder, out, verbose=0)
    html = (out / "report.html").read_text(encoding="utf-8")
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "Evaluation in" in html and "No training history" in html
    assert "Where the model looked" in html and (out / "plots" / "gradcam" / "gradcam_01.png").is_file()
    for ref in re.findall(r"!\[[^\]]*\]\(<?([^)>]+)>?\)", md):
        assert (out / ref).is_file(), ref
    assert json.loads((out / "metrics.json").read_text())["versions"]["transferkit"]


def test_grad_cam_hook_adds_overlays(tiny_run):
    _, run_dir = tiny_run
    calls = []

    def explainer(path: Path) -> bytes:  # stands in for transferkit.evaluation.explain's overlay
        calls.append(path)
        return plots.training_curves_png({"loss": [1.0, 0.5]})

    html = write_report(run_dir, explainer=explainer)[0].read_text(encoding="utf-8")
    assert 1 <= len(calls) <= 4 and all(p.is_file() for p in calls)  # the worst mistakes' image files
    assert (run_dir / "plots" / "gradcam" / "gradcam_01.png").is_file()
    assert "Where the model looked" in html
    assert "No Grad-CAM overlays" in write_report(run_dir)[0].read_text(encoding="utf-8")


def test_report_refuses_a_folder_without_metrics(tmp_path):
    result = run_cli("report", tmp_path)
    assert result.exit_code == 2
    assert "holds no metrics.json" in result.output


def test_report_of_a_newer_metrics_layout_says_so_and_still_draws(tiny_run, tmp_path):
    _, run_dir = tiny_run
    copy = shutil.copytree(run_dir, tmp_path / "run")
    metrics = json.loads((copy / "metrics.json").read_text())
    assert metrics["version"] == METRICS_VERSION
    (copy / "metrics.json").write_text(json.dumps({**metrics, "version": METRICS_VERSION + 1}))
    result = run_cli("report", copy, "-q")
    assert result.exit_code == 0, result.output
    assert f"written by a newer transferkit (metrics version {METRICS_VERSION + 1}" in result.output
    assert (copy / "report.html").is_file()


def test_history_phases_from_a_column_a_repeated_header_or_a_restarting_epoch(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss,accuracy,phase\n0,1.0,0.5,head\n1,0.8,0.6,head\n0,0.7,0.7,fine-tune\n")
    columns, phases = read_history(path)
    assert phases == ["head", "head", "fine-tune"] and columns["loss"] == [1.0, 0.8, 0.7]
    path.write_text("epoch,loss\n0,1.0\n1,0.9\nepoch,loss,val_loss\n0,0.5,0.6\n")
    columns, phases = read_history(path)
    assert phases == ["phase 1", "phase 1", "phase 2"]
    assert np.isnan(columns["val_loss"][0]) and columns["val_loss"][2] == 0.6
    path.write_text("epoch,loss\n0,1.0\n1,0.9\n0,0.5\n")
    assert read_history(path)[1] == ["phase 1", "phase 1", "phase 2"]
    path.write_text("epoch,loss\n0,1.0\n1,0.9\n")
    assert read_history(path)[1] is None
    png = plots.training_curves_png({"loss": [1.0, 0.8, 0.7], "val_loss": [1.1, 0.9, 0.8]}, ["a", "a", "b"])
    assert png.startswith(PNG_MAGIC)


def _png_size(png: bytes) -> tuple[int, int]:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        return img.size


def test_plots_for_100_classes_with_long_names_render_within_bounds():
    names = [f"a_rather_long_class_name_number_{i:03d}_with_<markup>" for i in range(100)]
    rng = np.random.default_rng(0)
    matrix = np.diag(rng.integers(5, 20, 100)) + rng.integers(0, 2, (100, 100))
    for normalize in (False, True):
        width, height = _png_size(plots.confusion_matrix_png(matrix, names, normalize=normalize))
        assert 1500 <= width <= 2400 and 1500 <= height <= 2400  # ~16 px per class plus labels
    features = rng.normal(size=(1000, 16)) + np.repeat(np.eye(100, 16) * 4, 10, axis=0)
    labels = np.repeat(np.arange(100), 10)
    pca = plots.project_features(features, labels, "pca")
    assert pca[0].shape == (1000, 2)
    width, _ = _png_size(plots.feature_map_png([pca], names))
    assert width < 1000
    small_width, _ = _png_size(plots.confusion_matrix_png([[3, 1], [0, 4]], ["cat", "dog"]))
    assert small_width < 700


def test_projection_samples_every_class():
    labels = np.repeat(np.arange(5), [1000, 1000, 500, 10, 2])
    features = np.random.default_rng(0).normal(size=(len(labels), 8)).astype(np.float32)
    points, sampled, info = plots.project_features(features, labels, "pca", max_points=200)
    assert info["num_total"] == len(labels) and len(points) == len(sampled) <= 205
    assert set(sampled.tolist()) == {0, 1, 2, 3, 4}


def test_features_plot_command(image_folder, tmp_path):
    args = ["--backbone", "tiny_test", "--weights", "none", "--image-size", "32", "-q"]
    result = run_cli("features", "plot", image_folder, "-o", tmp_path / "map.png", "--method", "pca", *args)
    assert result.exit_code == 0, result.output
    assert "pca: 36 of 36 images" in result.output
    assert (tmp_path / "map.png").read_bytes().startswith(PNG_MAGIC)
    wrong = run_cli("features", "plot", image_folder, "-o", tmp_path / "map.jpg", *args)
    assert wrong.exit_code == 2 and "must end in .png" in wrong.output
