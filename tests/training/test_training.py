"""End to end on a synthetic folder with the tiny backbone: train, the run folder, evaluate, predict."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from transferkit.config import TrainConfig, load_config
from transferkit.evaluation.evaluate import evaluate_run
from transferkit.serving import predictors, runs
from transferkit.serving.schema import METRICS_VERSION
from transferkit.testing import make_image_folder
from transferkit.training.run import train

RUN_FILES = {"model.keras", "labels.txt", "config.yaml", "splits.csv", "history.csv", "metrics.json", "skipped.csv",
             "predictions.csv", "status.json", "report.html", "report.md"}


def tiny_config(image_dir, output_dir, **changes) -> TrainConfig:
    base = TrainConfig(image_dir=str(image_dir), output_dir=str(output_dir), backbone="tiny_test",
                       weights="none", batch_size=8)
    return base.replace(**changes)


@pytest.fixture
def trained_run(tiny_run):
    """The session's tiny run (tests/conftest.py): 3 classes x 20 images, exact head."""
    return tiny_run


def test_run_folder_holds_everything(trained_run):
    folder, result = trained_run
    assert RUN_FILES <= {p.name for p in result.run_dir.iterdir()}
    assert (result.run_dir / "labels.txt").read_text().split() == ["class_0", "class_1", "class_2"]
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["version"] == METRICS_VERSION  # the layout of serving/schema.py
    test = metrics["test"]
    assert set(test) >= {"accuracy", "macro_f1", "top_k_accuracy", "per_class", "confusion_matrix"}
    assert np.array(test["confusion_matrix"]).sum() == test["num_examples"] > 0
    assert metrics["extraction"]["computed"] == 60
    assert sum(sum(c.values()) for c in metrics["counts"].values()) == 60
    with open(result.run_dir / "splits.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 60 and {r["split"] for r in rows} == {"train", "val", "test"}
    history = (result.run_dir / "history.csv").read_text().splitlines()
    assert history == ["phase,epoch"], "the exact head has no epochs"
    head_fit = metrics["head_fit"]
    assert head_fit["solver"] == "exact" and head_fit["chosen_by"] == "cross-validation"
    assert head_fit["C"] in [point["C"] for point in head_fit["cv_curve"]]
    assert min(head_fit["cv_curve"], key=lambda point: point["log_loss"])["C"] == head_fit["C"]
    report = (result.run_dir / "report.md").read_text()
    assert "Head regularisation: cross-validated log-loss against C" in report and "Training curves" not in report
    assert load_config(result.run_dir / "config.yaml") == tiny_config(folder, result.run_dir,
                                                                         cache_dir=metrics["extraction"]["cache_dir"]
                                                                         .rsplit("/", 1)[0])


def test_head_learns_the_synthetic_classes(trained_run):
    # Random-init tiny CNN features separate the colour/stripe classes well above chance (1/3).
    assert trained_run[1].test_accuracy >= 0.7


def test_saved_model_is_flat_takes_raw_pixels_and_matches_cached_features(trained_run):
    """The saved model on raw files gives what the trained head gave on the cached training features."""
    import keras

    from transferkit.cache import extract_features, hash_file

    folder, result = trained_run
    run = runs.load_run(result.run_dir)
    assert not any(isinstance(layer, keras.Model) for layer in run.model.layers), "one flat graph"
    assert run.model.input_shape == (None, 32, 32, 3)
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    probs = extract_features(run.model, paths, None, verbose=0).vectors
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    # The vectors training used, straight from the cache shards, by content hash.
    import h5py

    cached = {}
    for shard in Path(result.metrics["extraction"]["cache_dir"]).glob("shard-*.h5"):
        with h5py.File(shard, "r") as data:
            cached.update(zip((k.decode() for k in data["keys"][:]), data["vectors"][:], strict=True))
    features = np.stack([cached[hash_file(p)] for p in paths])
    head_probs = run.model.get_layer("predictions")(features).numpy()
    np.testing.assert_allclose(probs, head_probs, atol=1e-5)


def test_second_run_reuses_the_cache(trained_run, tmp_path):
    folder, result = trained_run
    cache_dir = json.loads((result.run_dir / "metrics.json").read_text())["extraction"]["cache_dir"]
    again = train(tiny_config(folder, tmp_path / "run2", cache_dir=str(tmp_path / "unused")), verbose=0)
    # A different cache folder computes again; the same folder (and same seed) computes nothing.
    assert again.metrics["extraction"]["computed"] == 60
    third = train(tiny_config(folder, tmp_path / "run3", cache_dir=cache_dir.rsplit("/", 1)[0]), verbose=0)
    assert third.metrics["extraction"]["computed"] == 0 and third.metrics["extraction"]["cached"] == 60


def test_evaluate_and_predict(trained_run, tmp_path):
    folder, result = trained_run
    metrics = evaluate_run(result.run_dir, folder, tmp_path / "eval", verbose=0)
    assert metrics["num_examples"] == 60 and metrics["accuracy"] >= 0.7
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["accuracy"] == metrics["accuracy"] and written["version"] == METRICS_VERSION
    run = runs.load_run(result.run_dir)
    rows = predictors.predict_files(run, [folder / "class_1"], top_k=2)
    assert len(rows) == 20 and all(r["ok"] and len(r["predictions"]) == 2 for r in rows)
    assert sum(r["predictions"][0][0] == "class_1" for r in rows) >= 14


def test_folder_split_val_becomes_test_and_early_stopping_uses_part_of_train(tmp_path):
    folder = make_image_folder(tmp_path / "split", num_classes=2, images_per_class=20, image_size=32,
                               split_dirs=True)
    for extra in folder.glob("test"):
        import shutil

        shutil.rmtree(extra)
    result = train(tiny_config(folder, tmp_path / "run", epochs=5), verbose=0)
    counts = result.metrics["counts"]
    with open(result.run_dir / "splits.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert all(r["split"] == "test" for r in rows if r["path"].startswith("val/"))
    assert sum(counts["val"].values()) > 0 and all(not r["path"].startswith("val/") for r in rows
                                                     if r["split"] == "val")
    assert result.metrics["test"]["num_examples"] == sum(1 for r in rows if r["path"].startswith("val/"))


def test_existing_output_dir_is_refused_before_any_work(trained_run, tmp_path):
    from transferkit.errors import InputError

    folder, result = trained_run
    with pytest.raises(InputError, match="already exists and is not empty.*--overwrite"):
        train(tiny_config(folder, result.run_dir), verbose=0)


def test_config_yaml_reruns_the_same_experiment(trained_run, tmp_path):
    folder, result = trained_run
    data = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert data["backbone"] == "tiny_test" and data["overwrite"] is False
    again = train(load_config(result.run_dir / "config.yaml").replace(output_dir=str(tmp_path / "again")), verbose=0)
    assert again.metrics["test"]["confusion_matrix"] == result.metrics["test"]["confusion_matrix"]
    assert again.metrics["head_fit"]["C"] == result.metrics["head_fit"]["C"]


def test_splits_csv_reads_back(trained_run):
    from transferkit.data.scan import read_splits_csv

    folder, result = trained_run
    back = read_splits_csv(result.run_dir / "splits.csv", root=folder)
    assert len(back.paths) == 60 and set(back.splits) == {"train", "val", "test"}


def test_no_refit_when_val_is_the_reported_split(tmp_path):
    folder = make_image_folder(tmp_path / "p", num_classes=2, images_per_class=10, image_size=32)
    result = train(tiny_config(folder, tmp_path / "run", test_fraction=0.0), verbose=0)
    assert result.metrics["test"]["split"] == "val"
    assert result.metrics["head_fit"]["images"] == sum(result.metrics["counts"]["train"].values()), \
        "fitting on val would test on training data"


def test_refit_uses_train_and_val(trained_run):
    counts = trained_run[1].metrics["counts"]
    assert trained_run[1].metrics["head_fit"]["images"] == sum(counts["train"].values()) + sum(counts["val"].values())


def test_the_model_is_the_exact_logistic_regression_optimum(trained_run):
    """The saved model's probabilities are scikit-learn's LogisticRegression at the chosen C, fitted
    on the same train + val features: the optimum itself, not an epoch count's approximation."""
    import keras
    from sklearn.linear_model import LogisticRegression

    from transferkit.cache import extract_features
    from transferkit.data.scan import scan_folder
    from transferkit.training.run import assign_roles

    folder, result = trained_run
    model = runs.load_run(result.run_dir).model
    backbone = keras.Model(model.input, model.get_layer("predictions").input)
    scanned = scan_folder(folder, seed=0, val_fraction=0.15, test_fraction=0.15)
    features = extract_features(backbone, [scanned.abs_path(p) for p in scanned.paths], None, verbose=0).vectors
    roles = assign_roles(scanned, np.ones(len(scanned.paths), bool), 0)
    fit, test = np.isin(roles, ["train", "val"]), roles == "test"
    reference = LogisticRegression(C=result.metrics["head_fit"]["C"], tol=1e-10, max_iter=10000).fit(
        features[fit].astype(np.float64), scanned.labels[fit])
    ours = model.get_layer("predictions")(features[test]).numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(features[test]), atol=2e-4)


def test_adam_head_solver_trains_for_epochs_and_refits(tmp_path):
    folder = make_image_folder(tmp_path / "p", num_classes=2, images_per_class=10, image_size=32)
    result = train(tiny_config(folder, tmp_path / "run", head_solver="adam", epochs=6, patience=2), verbose=0)
    head_fit = result.metrics["head_fit"]
    assert head_fit["solver"] == "adam" and 1 <= head_fit["best_epoch"] <= head_fit["epochs_run"] <= 6
    assert result.metrics["refit_epochs"] == head_fit["best_epoch"]
    history = (result.run_dir / "history.csv").read_text().splitlines()
    assert len(history) - 1 == head_fit["epochs_run"]


def test_a_class_without_training_images_fails_before_any_work(tmp_path):
    from transferkit.errors import DataError

    folder = make_image_folder(tmp_path / "split", num_classes=2, images_per_class=10, image_size=32, split_dirs=True)
    import shutil

    shutil.rmtree(folder / "train" / "class_1")
    with pytest.raises(DataError, match="No training images for class.*class_1"):
        train(tiny_config(folder, tmp_path / "run"), verbose=0)
    assert not (tmp_path / "run").exists()
