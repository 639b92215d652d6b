
"""What is shown is true: Grad-CAM in every run's report, a failed report section said aloud, evaluate's
paths, probabilities that are probabilities, and ``features export``'s split being train's split.

One tiny run on a ``train/`` + ``val/`` folder serves most tests (its ``val/`` is train's test split).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import warnings
from functools import partial

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import log_loss

from transferkit.testing import make_image_folder
from transferkit.testing import run_cli as _run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--backbone", "tiny_test", "--weights", "none", "--image-size", "32", "--batch-size", "8"]


run_cli = partial(_run_cli, catch_exceptions=True)  # the result holds any exception


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """``root/photos`` split as ``train/`` + ``val/`` only, and a finished softmax run ``root/run`` on it
    (the Adam head, 3 epochs on plain random-init features: some test images are wrong, so the report
    shows mistakes; the exact head gets these synthetic classes all right)."""
    root = tmp_path_factory.mktemp("shown")
    photos = make_image_folder(root / "photos", num_classes=3, images_per_class=15, image_size=32, split_dirs=True)
    shutil.rmtree(photos / "test")
    result = run_cli("train", photos, "-o", root / "run", "--cache-dir", root / "cache", *TINY, "--head-solver", "adam",
                     "--no-flip-average", "--epochs", "3", "--patience", "2", "--learning-rate", "0.01", "-q")
    assert result.exit_code == 0, result.output
    assert ",0\n" in (root / "run" / "predictions.csv").read_text(), "these tests need test mistakes"
    return root


# ----------------------------------------------------------------------------- Grad-CAM in the run's report


def test_train_report_has_grad_cam_overlays(workspace):
    """The report of a train run explains its worst mistakes with the model in memory, whose head layers
    were first called on cached features (their first graph is not the model's)."""
    run = workspace / "run"
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "not connected" not in md and "no overlay" not in md
    overlays = sorted((run / "plots" / "gradcam").glob("gradcam_*.png"))
    assert overlays and all(p.read_bytes().startswith(PNG_MAGIC) for p in overlays)
    section = md[md.index("## Grad-CAM"):]
    assert all(f"plots/gradcam/{p.name}" in section for p in overlays)


def test_grad_cam_follows_the_models_own_call_of_a_shared_layer(tmp_path):
    import keras

    from transferkit.evaluation.explain import gradcam
    from transferkit.models.build import build_backbone
    from transferkit.models.registry import get_backbone
    from transferkit.serving import runs
    from transferkit.serving.predictors import load_keras_model

    keras.utils.set_random_seed(0)
    backbone = build_backbone(get_backbone("tiny_test"), image_size=32)
    dense = keras.layers.Dense(3, activation="softmax", name="predictions")
    features = keras.Input(backbone.output_shape[1:])
    keras.Model(features, dense(features))  # the head's first call: on features, as training's head phase
    model = keras.Model(backbone.input, dense(backbone.output))
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    in_memory = gradcam(model, images)
    runs.save_model(model, tmp_path / "model.keras")
    np.testing.assert_allclose(in_memory, gradcam(load_keras_model(tmp_path / "model.keras"), images), atol=1e-5)


def test_a_failed_report_section_says_so_on_the_console_and_in_the_report(workspace, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(workspace / "run", run)

    def broken(*args, **kwargs):
        raise ValueError("the model is on fire")

    monkeypatch.setattr("transferkit.evaluation.explain.gradcam", broken)
    result = run_cli("report", run, "--gradcam", "-q")
    assert result.exit_code == 0, result.output
    assert re.search(r"Grad-CAM overlays failed for \d of \d images: the model is on fire", result.output)
    md = (run / "report.md").read_text(encoding="utf-8")
    assert re.search(r"Grad-CAM overlays failed for \d of \d images: the model is on fire", md)

    # Any error of the model (not only a bad file) is said, and costs that section only.
    def crashing(*args, **kwargs):
        raise RuntimeError("graph disconnected")

    monkeypatch.setattr("transferkit.evaluation.explain.gradcam", crashing)
    result = run_cli("report", run, "--gradcam", "-q")
    assert result.exit_code == 0, result.output
    assert "RuntimeError: graph disconnected" in result.output
    assert "## Feature map" in (run / "report.md").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- evaluate with relative paths


def test_evaluate_with_relative_folders_finds_its_images(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    result = run_cli("evaluate", "run", "photos", "-o", "eval-relative", "-q")
    assert result.exit_code == 0, result.output
    out = workspace / "eval-relative"
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "image not available" not in md and "no overlay" not in md and "failed for" not in md
    assert list((out / "plots" / "errors").glob("error_*.png")) and list((out / "plots" / "gradcam").glob("*.png"))
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["image_dir"] == str(workspace / "photos") and metrics["run_dir"] == str(workspace / "run")


# ----------------------------------------------------------------------------- features export uses train's split


def test_features_export_split_is_the_split_train_used(workspace, tmp_path):
    out = tmp_path / "features.csv"
    result = run_cli("features", "export", workspace / "photos", "-o", out, "--cache-dir", workspace / "cache",
                     *TINY, "-q")
    assert result.exit_code == 0, result.output
    exported = _splits(out)
    assert exported == _splits(workspace / "run" / "splits.csv")
    # On a train/ + val/ folder, train tests on val/ and stops early on a share of train/.
    assert {s for p, s in exported.items() if p.startswith("val/")} == {"test"}
    assert {s for p, s in exported.items() if p.startswith("train/")} == {"train", "val"}


def test_features_export_split_follows_the_seed_of_a_hash_split(tmp_path):
    photos = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=12, image_size=32)
    from transferkit.data.scan import scan_folder
    from transferkit.training.run import assign_roles

    for seed in (0, 3):
        out = tmp_path / f"features-{seed}.csv"
        result = run_cli("features", "export", photos, "-o", out, "--cache-dir", tmp_path / "cache", *TINY,
                         "--seed", seed, "-q")
        assert result.exit_code == 0, result.output
        folder = scan_folder(photos, seed=seed)
        roles = assign_roles(folder, np.ones(len(folder.paths), bool), seed)
        assert _splits(out) == dict(zip(folder.paths, roles, strict=True))


def _splits(path) -> dict[str, str]:
    """path -> split of a features CSV or a run's splits.csv."""
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["path"]: row["split"] for row in csv.DictReader(handle)}


# ----------------------------------------------------------------------------- probabilities are probabilities


@pytest.mark.parametrize("head", ["linear-svm", "ridge"])
def test_folded_svm_and_ridge_models_output_probabilities(workspace, tmp_path, head):
    from transferkit.data.splits import read_splits_csv
    from transferkit.serving.runs import load_run

    run = tmp_path / "run"
    result = run_cli("train", workspace / "photos", "-o", run, "--cache-dir", workspace / "cache", *TINY, "--head",
                     head, "--no-search", "-q")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["head_outputs"] == "probabilities" and "softmax temperature" in metrics["head_calibration"]
    assert metrics["fold_agreement"] == 1.0  # the calibrated model decides exactly as the scikit-learn head

    from transferkit.data.scan import load_image

    roles = read_splits_csv(run / "splits.csv", root=workspace / "photos")
    images = np.stack([load_image(workspace / "photos" / p, 32) for p in roles.paths]).astype(np.float32)
    outputs = np.asarray(load_run(run).model(images, training=False))
    assert outputs.min() >= 0 and outputs.max() <= 1
    np.testing.assert_allclose(outputs.sum(axis=1), 1.0, atol=1e-5)

    shown = run_cli("predict", run, workspace / "photos" / "val", "--top-k", "3")
    assert shown.exit_code == 0, shown.output
    values = [[float(v) for v in re.findall(r" (-?\d+\.\d+)", line)] for line in shown.output.splitlines()
              if "\t" in line]
    assert values and all(len(v) == 3 and min(v) >= 0 and abs(sum(v) - 1) < 0.01 for v in values), shown.output


def _features(num_classes: int, seed: int = 0):
    X, y = make_classification(300, 20, n_informative=8, n_classes=num_classes, n_clusters_per_class=1,
                               class_sep=1.0, flip_y=0.05, random_state=seed)
    return X[:200], y[:200], X[200:], y[200:]


@pytest.mark.parametrize("name", ["linear-svm", "ridge"])
@pytest.mark.parametrize("num_classes", [2, 3])
def test_temperature_calibration_keeps_every_decision_and_fits_held_out_images_better(name, num_classes, tmp_path):
    from transferkit.heads.registry import fit_head, keras_head_layer
    from transferkit.heads.saving import load_head, save_head

    X, y, X_test, y_test = _features(num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        plain = fit_head(name, X, y, search=False)
        calibrated = fit_head(name, X, y, search=False, calibrate=True)
    probabilities, kind = calibrated.scores(X_test)
    assert kind == "proba" and calibrated.temperature_ > 0
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), plain.predict(X_test))  # accuracy unchanged
    # Better calibrated than the softmax of the raw margins (temperature 1), on images it never saw.
    plain.temperature_ = 1.0
    assert log_loss(y_test, probabilities) < log_loss(y_test, plain.scores(X_test)[0])
    layer = keras_head_layer(calibrated)  # folded: the Keras layer outputs the same probabilities
    np.testing.assert_allclose(np.asarray(layer(X_test.astype(np.float32))), probabilities, atol=1e-4)
    identity = {"backbone": "tiny_test", "image_size": 32, "weights_id": "0", "class_names": list("abc")[:num_classes]}
    save_head(calibrated, tmp_path / "head.skops", identity)
    np.testing.assert_allclose(load_head(tmp_path / "head.skops")[0].scores(X_test)[0], probabilities)
