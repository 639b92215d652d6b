"""Test-time augmentation (10-crop) and ensembles of runs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from transferkit.config import TrainConfig
from transferkit.errors import InputError
from transferkit.evaluation import tta
from transferkit.evaluation.ensemble import ensemble_runs, evaluation_images
from transferkit.evaluation.evaluate import evaluate_run
from transferkit.serving import runs
from transferkit.testing import make_image_folder, run_cli
from transferkit.training.run import train


def test_ten_crop_views_are_the_centre_the_corners_and_their_mirrors():
    image = np.arange(16 * 16 * 3, dtype=np.float32).reshape(1, 16, 16, 3)
    views = tta.ten_crop(np.concatenate([image, 255 - image]), crop_fraction=0.5).numpy()
    assert views.shape == (20, 16, 16, 3)
    np.testing.assert_allclose(views[5], views[0][:, ::-1], atol=1e-4)  # mirror of the centre crop
    assert views[1, 0, 0, 0] == image[0, 0, 0, 0]  # top-left crop starts at the image's corner
    assert views[4, -1, -1, 0] == image[0, -1, -1, 0]  # bottom-right crop ends at the other corner
    assert views[11, 0, 0, 0] == 255 - image[0, 0, 0, 0]  # image 2's views (centre, top left, ...) follow
    probabilities = np.repeat(np.eye(2, dtype=np.float32), 10, axis=0)
    np.testing.assert_allclose(tta.average_views(probabilities), np.eye(2))


@pytest.fixture(scope="module")
def two_runs(tiny_run, tmp_path_factory):
    """The session's tiny run (exact head) and a second run on the same photos and split with
    another head (Adam, 30 epochs; its features all come from the first run's cache)."""
    folder, first = tiny_run
    config = TrainConfig(image_dir=str(folder), output_dir=str(tmp_path_factory.mktemp("ensemble") / "b"),
                         backbone="tiny_test", weights="none", head_solver="adam", epochs=30, learning_rate=0.03,
                         batch_size=8, cache_dir=str(first.run_dir.parent / "cache"))
    return [first.run_dir, train(config, verbose=0).run_dir], folder


def test_evaluate_with_tta_reports_accuracy_with_and_without(two_runs, tmp_path):
    (run_dir, _), folder = two_runs
    metrics = evaluate_run(run_dir, folder, tmp_path / "plain", verbose=0)
    with_tta = evaluate_run(run_dir, folder, tmp_path / "tta", verbose=0, tta=True)
    assert with_tta["tta"]["accuracy_without"] == metrics["accuracy"]
    assert with_tta["tta"]["accuracy_with"] == with_tta["accuracy"]
    assert with_tta["tta"]["accuracy_gain"] == pytest.approx(with_tta["accuracy"] - metrics["accuracy"])
    assert "10-crop" in json.loads((tmp_path / "tta" / "metrics.json").read_text())["tta"]["method"]

    shown = run_cli("predict", run_dir, folder / "class_0", "--tta")
    assert shown.exit_code == 0 and len(shown.output.splitlines()) == 20


def test_ensemble_of_two_runs_scores_members_and_average(two_runs, tmp_path):
    run_dirs, folder = two_runs
    result = run_cli("ensemble", *run_dirs, "-o", tmp_path / "ens", "-q")
    assert result.exit_code == 0, result.output
    assert "ensemble accuracy:" in result.output and "over the best run" in result.output
    metrics = json.loads((tmp_path / "ens" / "metrics.json").read_text())
    assert [m["run_dir"] for m in metrics["members"]] == [str(d) for d in run_dirs]
    assert metrics["image_dir"].startswith("test split of")
    with open(tmp_path / "ens" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == metrics["num_examples"] > 0
    assert metrics["gain_over_best_member"] == pytest.approx(
        metrics["accuracy"] - max(m["accuracy"] for m in metrics["members"]))

    on_folder = ensemble_runs(run_dirs, tmp_path / "all", image_dir=folder)
    assert on_folder["num_examples"] == 60


def test_ensemble_refuses_different_classes_and_different_splits(two_runs, tmp_path):
    run_dirs, folder = two_runs
    other = make_image_folder(tmp_path / "other", num_classes=2, images_per_class=8, image_size=32,
                              class_prefix="kind_")
    config = TrainConfig(image_dir=str(other), output_dir=str(tmp_path / "c"), backbone="tiny_test", weights="none",
                         epochs=3, batch_size=8, cache_dir=str(tmp_path / "cache"))
    odd = train(config, verbose=0).run_dir
    with pytest.raises(InputError, match=r"predict different classes \(only in the first: \['class_0'"):
        ensemble_runs([run_dirs[0], odd], tmp_path / "x")
    with pytest.raises(InputError, match="trained on different image folders.*--image-dir"):
        evaluation_images([runs.load_run(run_dirs[0]), runs.load_run(odd)])
    single = run_cli("ensemble", run_dirs[0], "-o", tmp_path / "z")
    assert single.exit_code == 2 and "at least two run folders" in single.output
