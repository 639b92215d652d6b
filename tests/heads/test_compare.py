"""transferkit compare: every head on the same cached features and test images, compared honestly."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from transferkit.errors import DataError, InputError
from transferkit.evaluation.metrics import expected_calibration_error
from transferkit.heads.compare import (
    CompareConfig,
    prepare_comparison,
    resolve_heads,
    run_comparison,
)
from transferkit.heads.stats import mcnemar, paired_mcnemar, pick_winner
from transferkit.testing import run_cli as run


@pytest.fixture
def four_classes(tmp_path):
    """4 classes x 15 images: enough test images per class, and a top-3 column (k below the classes)."""
    from transferkit.testing import make_image_folder

    return make_image_folder(tmp_path / "photos", num_classes=4, images_per_class=15, image_size=32)


HEADS = ["softmax", "linear-svm", "logreg", "knn"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One tiny comparison through the CLI, shared by the tests of its outputs: (image folder, output, CLI result)."""
    from transferkit.testing import make_image_folder

    root = tmp_path_factory.mktemp("compare")
    photos = make_image_folder(root / "photos", num_classes=4, images_per_class=15, image_size=32)
    out = root / "cmp"
    result = run("compare", photos, "-o", out, "--backbone", "tiny_test", "--weights", "none",
                 "--heads", ",".join(HEADS), "--cache-dir", root / "cache", "-q")
    assert result.exit_code == 0, result.output
    return photos, out, result


def test_compare_end_to_end_through_the_cli(compared):
    photos, out, result = compared
    heads = HEADS
    plots = ["accuracy.png"] + [f"confusion_{h}_{kind}.png" for h in heads for kind in ("counts", "normalized")]
    for name in ["comparison.md", "comparison.csv", "comparison.json", "splits.csv", "skipped.csv", "config.yaml",
                 "report.html", "report.md"] + [f"plots/{p}" for p in plots]:
        assert (out / name).is_file(), name
    for name in plots:
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The terminal table: every head, the McNemar column, the verdict.
    assert "McNemar p vs softmax" in result.output and "ms/image (head on features)" in result.output
    table_lines = [line for line in result.output.splitlines() if line.startswith("| ")]
    assert sorted(line.split("|")[1].strip() for line in table_lines[1:]) == sorted(heads)
    assert "Verdict: " in result.output and f"Report: {out / 'report.html'}" in result.output

    summary = json.loads((out / "comparison.json").read_text())
    assert [row["head"] for row in summary["heads"]] == sorted(heads, key=lambda h: -next(
        r["accuracy"] for r in summary["heads"] if r["head"] == h))
    num_test = summary["num_images"]["test"]
    assert num_test >= 8 and summary["reference"] == "softmax"
    for row in summary["heads"]:
        for key in ("accuracy", "macro_f1", "balanced_accuracy"):
            assert 0 <= row[key] <= 1, (row["head"], key)
        low, high = row["accuracy_ci"]
        assert 0 <= low <= row["accuracy"] <= high <= 1
        assert 0 <= row["top_k_accuracy"]["3"] <= 1 and row["top_k_accuracy"]["3"] >= row["accuracy"]
        assert row["fit_seconds"] > 0 and row["latency_ms_per_image"] > 0
        assert (row["mcnemar_p"] is None) == (row["head"] == "softmax")
        assert row["mcnemar_p"] is None or 0 < row["mcnemar_p"] <= 1
        # Probabilities give log-loss and calibration; the linear SVM's decision scores do not.
        assert (row["log_loss"] is None) == (row["head"] == "linear-svm")
        assert row["ece"] is None or 0 <= row["ece"] <= 1
        assert np.sum(row["runs"][0]["confusion_matrix"]) == num_test
    with open(out / "splits.csv", newline="") as handle:
        roles = [r["split"] for r in csv.DictReader(handle)]
    assert roles.count("test") == num_test and roles.count("train") > roles.count("val") > 0
    with open(out / "comparison.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["head"] for r in rows} == set(heads) and "mcnemar_p_vs_softmax" in rows[0]
    assert "**Verdict:**" in (out / "comparison.md").read_text()

    # The same folder again is refused without --overwrite, before any work.
    again = run("compare", photos, "-o", out, "--backbone", "tiny_test", "--weights", "none")
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_train_and_compare_fit_the_same_freeze_all_head(compared, tmp_path):
    """compare's softmax arm is train's freeze-all head: the same split, C and probabilities."""
    from transferkit.config import TrainConfig
    from transferkit.training.run import train

    photos, out, _ = compared
    result = train(TrainConfig(str(photos), str(tmp_path / "run"), backbone="tiny_test", weights="none",
                               cache_dir=str(out.parent / "cache")), verbose=0)
    summary = json.loads((out / "comparison.json").read_text())
    softmax = next(row for row in summary["heads"] if row["head"] == "softmax")
    arm = softmax["runs"][0]
    assert arm["solver"] == "exact" and arm["C"] == result.metrics["head_fit"]["C"]
    assert arm["cv_curve"] == result.metrics["head_fit"]["cv_curve"]
    assert arm["confusion_matrix"] == result.metrics["test"]["confusion_matrix"]


COMPARE_SECTIONS = {"summary": "Summary", "config": "Configuration and versions", "dataset": "Dataset",
                    "table": "Comparison table", "verdict": "Verdict", "accuracy": "Accuracy per head",
                    "confusion": "Confusion matrices", "feature-map": "Feature map"}


def test_compare_writes_a_self_contained_report(compared):
    from tests.report.test_report import check_report

    _, out, _ = compared
    html, images = check_report(out, COMPARE_SECTIONS)
    summary = json.loads((out / "comparison.json").read_text())
    # The accuracy plot, counts and shares per head, the feature map.
    assert len(images) == 1 + 2 * len(HEADS) + 1
    assert 'alt="Feature map (PCA)"' in html and "--method both" in html
    for text in ["95% CI", "top-3", "macro-F1", "bal. acc.", "log-loss", "fit s", "ms/image (head on features)",
                 "McNemar p vs softmax", "(reference)", summary["verdict"]["text"].replace("'", "&#x27;"),
                 "Versions the run was made with", "tensorflow", "scikit-learn", "Skipped (unreadable) files: 0",
                 "transferkit compare --config"]:
        assert text in html, text
    for head in HEADS:
        assert f"<td class=nw>{head}</td>" in html and f'alt="{head}, share of each true class"' in html
    # Counts per class and split, as in comparison.json.
    for split in ("train", "val", "test"):
        assert sum(summary["counts"][split].values()) == summary["num_images"][split]
    assert f"<td>class_0</td><td class=n>{summary['counts']['train']['class_0']}</td>" in html


def test_seeds_vary_the_heads_not_the_split(tmp_path, four_classes):
    # Without softmax the first head is the reference; two seeds give mean, std and per-seed runs.
    config = CompareConfig(str(four_classes), str(tmp_path / "cmp"), backbone="tiny_test", weights="none",
                           heads=("logreg", "random-forest"), num_seeds=2, search=False)
    result = run_comparison(prepare_comparison(config), verbose=0)
    summary = result.summary
    assert summary["reference"] == "logreg" and summary["seeds"] == [0, 1]
    forest = next(row for row in summary["heads"] if row["head"] == "random-forest")
    assert [run["seed"] for run in forest["runs"]] == [0, 1]
    assert forest["accuracy"] == pytest.approx(np.mean([run["accuracy"] for run in forest["runs"]]))
    assert forest["accuracy_std"] is not None and forest["mcnemar_p"] is not None
    assert "accuracy (mean ± sd)" in result.table
    assert "Seeds 0 to 1" in (result.output_dir / "comparison.md").read_text()


# ----------------------------------------------------------------------------- checks before any work


def test_bad_head_name_suggests_and_exits_2_before_tensorflow(tmp_path, four_classes, monkeypatch):
    def no_tensorflow():
        raise AssertionError("TensorFlow started before the options were checked")

    monkeypatch.setattr("transferkit.runtime.start_tensorflow", no_tensorflow)
    result = run("compare", four_classes, "-o", tmp_path / "cmp", "--backbone", "tiny_test", "--weights", "none",
                 "--heads", "softmax,lin-svm")
    assert result.exit_code == 2
    assert "Invalid --heads: expected head names from softmax" in result.output
    assert "(did you mean linear-svm or rbf-svm?), received 'lin-svm'" in result.output
    assert not (tmp_path / "cmp").exists()

    result = run("compare", four_classes, "-o", tmp_path / "cmp", "--backbone", "tiny_test", "--weights", "none",
                 "--test-fraction", "0")
    assert result.exit_code == 2 and "no test images" in result.output


def test_resolve_heads():
    assert resolve_heads("Softmax, linear_svm,,knn,knn") == ("softmax", "linear-svm", "knn")
    assert resolve_heads(["all"])[:2] == ("softmax", "linear-svm") and len(resolve_heads("all")) == 8
    with pytest.raises(InputError, match="--with-fine-tune"):
        resolve_heads("fine-tune-top")
    with pytest.raises(InputError, match=r"`heads` must be at least one head name .* Received: heads=' , '"):
        resolve_heads(" , ")
    with pytest.raises(InputError, match=r"`num_seeds` must be an integer >= 1\. Received: num_seeds=0"):
        CompareConfig("photos", "out", num_seeds=0)


def test_a_folder_without_test_images_is_refused(tmp_path):
    from transferkit.testing import make_image_folder

    root = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=8, image_size=32)
    config = CompareConfig(str(root), str(tmp_path / "cmp"), backbone="tiny_test", weights="none", test_fraction=0.0)
    with pytest.raises(DataError, match="no test images.*--test-fraction"):
        prepare_comparison(config)


# ----------------------------------------------------------------------------- the winner rule


def correct(num_right: int, n: int = 100, offset: int = 0) -> np.ndarray:
    """Right on ``num_right`` images starting at ``offset`` (wrapping), wrong elsewhere."""
    values = np.zeros(n, bool)
    values[(offset + np.arange(num_right)) % n] = True
    return values


def test_winner_named_when_significant():
    # best wrong on 5 images, runner-up on 20 others: b = 20, c = 5, chi-square p = 0.005.
    best = correct(95)
    runner = np.ones(100, bool)
    runner[75:95] = False
    softmax = np.ones(100, bool)
    softmax[60:95] = False
    assert mcnemar(best, runner)[1] < 0.05
    verdict = pick_winner({"softmax": [softmax], "logreg": [best], "knn": [runner]})
    assert verdict.winner == "logreg" and verdict.runner_up == "knn"
    assert verdict.p_runner_up == pytest.approx(mcnemar(best, runner)[1])
    assert verdict.p_reference == pytest.approx(mcnemar(best, softmax)[1])
    assert "logreg is significantly the best head" in verdict.text


def test_no_winner_when_the_difference_may_be_chance():
    best = correct(95)
    runner = correct(93, offset=1)  # wrong on 7 images, 5 of them where best is wrong too
    verdict = pick_winner({"softmax": [runner], "linear-svm": [best]})
    assert mcnemar(best, runner)[1] >= 0.05
    assert verdict.winner is None and verdict.best == "linear-svm"
    assert verdict.text.startswith("No head is significantly better")
    assert pick_winner({"softmax": [best], "knn": [best.copy()]}).winner is None  # a tie
    assert pick_winner({"softmax": [best]}).runner_up is None


def test_with_seeds_a_winner_must_be_significant_in_every_seed():
    best, runner, close = correct(95), np.ones(100, bool), correct(94)
    runner[75:95] = False
    assert pick_winner({"softmax": [runner, runner], "mlp": [best, best]}).winner == "mlp"
    # Significant with seed 0, not with seed 1: no winner, and the p reported is the larger one.
    verdict = pick_winner({"softmax": [runner, close], "mlp": [best, best]})
    assert verdict.winner is None
    assert verdict.p_runner_up == pytest.approx(max(mcnemar(best, runner)[1], mcnemar(best, close)[1]))
    # A single run (fine-tune-top) pairs with every seed of the other head.
    assert paired_mcnemar([best], [runner, close]) == pytest.approx(mcnemar(best, close)[1])


def test_expected_calibration_error_by_hand():
    # Both right: |1 - 0.9| and |1 - 0.8| in two bins of one image each -> 0.15.
    assert expected_calibration_error([0, 1], [[0.9, 0.1], [0.2, 0.8]]) == pytest.approx(0.15)
    # One bin (0.6-0.67), half right: |0.5 - 0.6| = 0.1.
    assert expected_calibration_error([0, 0], [[0.6, 0.4], [0.4, 0.6]]) == pytest.approx(0.1)


@pytest.mark.slow
def test_fine_tune_arm_is_scored_on_the_same_test_images(tmp_path, four_classes):
    config = CompareConfig(str(four_classes), str(tmp_path / "cmp"), backbone="tiny_test", weights="none",
                           heads=("knn",), search=False, with_fine_tune=True)
    result = run_comparison(prepare_comparison(config), verbose=0)
    rows = {row["head"]: row for row in result.summary["heads"]}
    assert set(rows) == {"knn", "fine-tune-top"}
    tuned = rows["fine-tune-top"]
    assert tuned["latency_ms_per_image"] is None and tuned["mcnemar_p"] is not None
    assert np.sum(tuned["runs"][0]["confusion_matrix"]) == result.summary["num_images"]["test"]
    assert (result.output_dir / "fine-tune-top" / "model.keras").is_file()
    assert (result.output_dir / "plots" / "confusion_fine-tune-top_normalized.png").is_file()
    assert "n/a for fine-tune-top" in (result.output_dir / "comparison.md").read_text()
    assert "fine-tune-top/report.html" in (result.output_dir / "report.html").read_text()
