"""Fine-tuning runs end to end with the tiny backbone: run folder, resume after SIGKILL, auto, heads."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from transferkit.cli import main
from transferkit.testing import make_image_folder

TINY = ["--backbone", "tiny_test", "--weights", "none", "--image-size", "32", "--batch-size", "8",
        "--learning-rate", "0.01", "--epochs", "40", "--patience", "10"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ft") / "photos", num_classes=3, images_per_class=20,
                             image_size=32, formats=("png",))


def _train(tmp_path, folder, *args):
    result = CliRunner().invoke(main, ["train", str(folder), "-o", str(tmp_path / "run"), "--cache-dir",
                                       str(tmp_path / "cache"), *TINY, *args])
    return result, tmp_path / "run"


def test_fine_tune_top_writes_a_two_phase_run(tmp_path, folder):
    result, run = _train(tmp_path, folder, "--strategy", "fine-tune-top", "--fine-tune-epochs", "2", "--augment",
                         "--class-weight", "auto")
    assert result.exit_code == 0, result.output
    assert "Strategy fine-tune-top" in result.output and "1 top block(s)" in result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["strategy"] == "fine-tune-top" and metrics["fine_tune"]["epochs_run"] == 2
    assert [p["name"] for p in metrics["phases"]] == ["head", "fine-tune"]
    assert "random resized crop" in metrics["augmentation"]
    # No --fine-tune-learning-rate: 1e-3 scaled to the 60 x 70% training images, and said so.
    train_images = sum(metrics["counts"]["train"].values())
    assert metrics["fine_tune"]["learning_rate"] == pytest.approx(1e-3 * train_images / 1000)
    assert f"{train_images} training images (< 1000)" in result.output
    assert set(metrics["class_weight"]) == {"class_0", "class_1", "class_2"}
    phases = [line.split(",")[0] for line in (run / "history.csv").read_text().splitlines()[1:]]
    assert phases == ["fine-tune", "fine-tune"], "the exact head phase has no epochs"
    with open(run / "history.csv", newline="") as handle:
        epochs = list(csv.DictReader(handle))
    seconds = [float(row["seconds"]) for row in epochs]
    # The epochs trained the top block on 4 cached views of the frozen blocks' output; the time
    # those took counts in the time to accuracy.
    views = metrics["fine_tune"]["frozen_views"]
    assert views["views"] == 4 and views["seconds"] > 0 and views["bytes"] > 0
    assert all(s > 0 for s in seconds)
    assert float(epochs[-1]["elapsed_seconds"]) == pytest.approx(sum(seconds) + views["seconds"], abs=0.03)
    report = (run / "report.md").read_text()
    assert "s into the phase" in report, "time to accuracy in the report"
    assert "trained on 4 augmented views of the frozen blocks' output" in report
    assert metrics["head_fit"]["solver"] == "exact" and metrics["head_fit"]["images"] == train_images
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert not (run / "checkpoints" / "backup").exists()
    # The saved model is one flat float32 graph that evaluate can load (safe mode).
    evaluated = CliRunner().invoke(main, ["evaluate", str(run), str(folder), "-o", str(tmp_path / "eval"), "-q"])
    assert evaluated.exit_code == 0, evaluated.output
    _explains_and_exports(tmp_path, run, folder)


def test_fine_tuned_head_is_refitted_on_train_and_val(tmp_path, folder):
    """The saved model's head is LogisticRegression at the C its cross-validation chose, fitted on
    the fine-tuned backbone's features of train + val, and the reported predictions are that model's.

    Checked by the optimum's own equation: the gradient of scikit-learn's objective (mean log-loss
    + ||W||^2 / (2 C n)) vanishes at the saved weights. That is exact algebra, whatever path a solver
    took; two L-BFGS runs each stopped at the default tol 1e-4 differed by up to 1.6e-4 (flaky).
    Refitting on one image fewer, or with C = 0.5, leaves a gradient above 1e-2 (measured).
    """
    import keras
    from scipy.special import softmax
    from sklearn.linear_model import LogisticRegression

    from transferkit.data.splits import read_splits_csv
    from transferkit.serving.runs import load_run
    from transferkit.training.phases import predict_images

    result, run = _train(tmp_path, folder, "--strategy", "fine-tune-top", "--fine-tune-epochs", "1")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    roles = read_splits_csv(run / "splits.csv", root=folder)
    trval = [i for i, split in enumerate(roles.splits) if split in ("train", "val")]
    test = [i for i, split in enumerate(roles.splits) if split == "test"]
    assert metrics["fine_tune"]["head_refit"]["images"] == len(trval) > sum(metrics["counts"]["train"].values())
    assert "refitted on the fine-tuned features of train + val" in (run / "report.md").read_text()
    model = load_run(run).model
    features = predict_images(keras.Model(model.input, model.get_layer("predictions").input),
                               [str(folder / roles.paths[i]) for i in trval + test], 8).astype(np.float64)
    kernel, bias = (w.astype(np.float64) for w in model.get_layer("predictions").get_weights())
    x, y = features[:len(trval)], roles.labels[trval]
    C = metrics["fine_tune"]["head_refit"]["C"]
    assert metrics["fine_tune"]["head_refit"]["chosen_by"] == "cross-validation"
    residual = softmax(x @ kernel + bias, axis=1) - np.eye(3)[y]
    gradient = np.concatenate([(x.T @ residual / len(y) + kernel / (C * len(y))).ravel(), residual.mean(axis=0)])
    assert np.abs(gradient).max() < 1e-5  # the refit solves to 1e-8; saving as float32 adds ~1e-7
    # The same optimum as scikit-learn's own solver run to convergence on these features.
    expected = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(x, y).predict_proba(features[len(trval):])
    probabilities = predict_images(model, [str(folder / roles.paths[i]) for i in test], 8)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    rows = {r.split(",")[0]: r.split(",") for r in (run / "predictions.csv").read_text().splitlines()[1:]}
    reported = np.array([float(rows[roles.paths[i]][3]) for i in test])
    np.testing.assert_allclose(reported, probabilities.max(1), atol=1e-5)  # 6 decimals in the file

    result, run = _train(tmp_path / "no-refit", folder, "--strategy", "fine-tune-top", "--fine-tune-epochs", "1",
                         "--no-refit")
    assert result.exit_code == 0, result.output
    assert "head_refit" not in json.loads((run / "metrics.json").read_text())["fine_tune"]


def _explains_and_exports(tmp_path, run, folder):
    """Grad-CAM and a parity-checked export work on a fine-tuned model, as on a freeze-all one."""
    image = next((folder / "class_0").iterdir())
    explained = CliRunner().invoke(main, ["explain", str(run), str(image), "-o", str(tmp_path / "cams")])
    assert explained.exit_code == 0, explained.output
    assert (tmp_path / "cams" / image.name).is_file()
    exported = CliRunner().invoke(main, ["export", str(run), "--format", "saved-model", "-o", str(tmp_path / "sm")])
    assert exported.exit_code == 0, exported.output
    card = json.loads((tmp_path / "sm" / "model_card.json").read_text())
    assert card["parity"]["top1_agreement"] == 1.0 and card["parity"]["max_abs_diff"] <= 1e-4


def test_auto_says_what_it_picked_and_why(tmp_path, folder):
    result, run = _train(tmp_path, folder, "--strategy", "auto")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["strategy"] == "freeze-all" and "training images (< 100): too few to fine-tune" in result.output
    evidence = metrics["auto_evidence"]
    assert [point["share"] for point in evidence["learning_curve"]] == [0.25, 0.5, 1.0]
    # The estimate is a timing: a tiny backbone on a fast machine may round it to 0.0.
    assert 0 <= evidence["cv_accuracy"] <= 1 and evidence["estimated_fine_tune_seconds"] >= 0
    said = float(metrics["strategy_reason"].split("cross-validated accuracy is ")[1].split(" ")[0])
    assert said == pytest.approx(evidence["cv_accuracy"], abs=6e-4)


def test_auto_fine_tunes_where_the_evidence_says_it_pays(tmp_path, folder, monkeypatch):
    """Where auto fine-tunes, the head phase trains on plain features (the flip-averaged ones
    served the decision) and the saved model has no mirror."""
    from transferkit.training import strategies

    monkeypatch.setattr(strategies, "AUTO_ERROR_FROM", 0.0)  # any held-out error counts as room to gain
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("auto_fine_tune_from: 1\n")
    result, run = _train(tmp_path, folder, "--strategy", "auto", "--config", recipe, "--fine-tune-epochs", "1")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["strategy"] == "fine-tune-top" and "expected wall time about" in metrics["strategy_reason"]
    assert "extracting the head phase's features without the mirror" in result.output
    from transferkit.serving.runs import load_run

    assert not any(type(layer).__name__ == "MirrorBatch" for layer in load_run(run).model.layers)


def test_the_rebuilt_mixed_precision_model_keeps_the_heads_l2_penalty(tmp_path, folder, monkeypatch):
    """Under --mixed-precision (on a CPU with bfloat16) and --distribute the model is rebuilt; its head
    is the head phase's, penalty included (a rebuilt copy once fine-tuned without it)."""
    from transferkit.training import finetune

    fitted = []
    real = finetune.fine_tune

    def spy(model, *args, **kwargs):
        layer = model.get_layer("predictions")
        fitted.append((layer.kernel_regularizer and layer.kernel_regularizer.get_config(), layer.dtype_policy.name,
                       model.get_layer("block3_conv").dtype_policy.name))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(finetune, "fine_tune", spy)
    for name, extra in (("plain", []), ("mixed", ["--mixed-precision", "--distribute", "mirrored"])):
        result, _ = _train(tmp_path / name, folder, "--strategy", "fine-tune-top", "--fine-tune-epochs", "1", *extra)
        assert result.exit_code == 0, result.output
    (plain_l2, _, _), (mixed_l2, mixed_dtype, block_dtype) = fitted
    assert plain_l2 is not None and mixed_l2 == plain_l2
    assert mixed_dtype == "float32"
    policy, _ = finetune.mixed_precision_policy()
    assert block_dtype == (policy or "float32"), "the backbone runs in the machine's mixed policy"


def test_full_retrain_with_mixed_precision_saves_float32(tmp_path, folder):
    result, run = _train(tmp_path, folder, "--strategy", "full-retrain", "--fine-tune-epochs", "1",
                         "--mixed-precision", "--xla", "--distribute", "mirrored")
    assert result.exit_code == 0, result.output
    assert "--mixed-precision:" in result.output
    import keras

    model = keras.saving.load_model(run / "model.keras")
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    assert json.loads((run / "metrics.json").read_text())["fine_tune"]["distribute"] == "mirrored"
    _explains_and_exports(tmp_path, run, folder)


def test_resume_refuses_finished_and_foreign_folders(tmp_path, folder):
    result, run = _train(tmp_path, folder)
    assert result.exit_code == 0
    again = CliRunner().invoke(main, ["train", "--resume", str(run)])
    assert again.exit_code == 2 and "already finished" in again.output
    empty = tmp_path / "empty"
    empty.mkdir()
    foreign = CliRunner().invoke(main, ["train", "--resume", str(empty)])
    assert foreign.exit_code == 2 and "no config.yaml" in foreign.output


def test_sklearn_head_folds_into_the_saved_model(tmp_path, folder):
    result, run = _train(tmp_path, folder, "--head", "logreg", "--no-search")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["head"] == "logreg" and metrics["fold_agreement"] == 1.0
    assert metrics["head_outputs"] == "probabilities" and metrics["test"]["accuracy"] >= 0.6
    bad = CliRunner().invoke(main, ["train", str(folder), "-o", str(tmp_path / "r2"), "--head", "logreg2"])
    assert bad.exit_code == 2 and "Did you mean: logreg?" in bad.output


def test_resume_after_sigkill_reaches_the_same_epochs(tmp_path):
    # Kill a fine-tuning run once two fine-tune epochs are checkpointed (early stopping replays
    # them on resume), resume it, and compare with the epochs an uninterrupted run would run (all
    # of them: early stopping is off).
    folder = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=60, image_size=32)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "transferkit.cli", "train", str(folder), "-o", str(run), "--cache-dir",
               str(tmp_path / "cache"), *TINY, "--strategy", "fine-tune-top", "--fine-tune-epochs", "12",
               "--fine-tune-patience", "0", "-q"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    history = run / "checkpoints" / "history-fine-tune.csv"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if history.is_file() and len(history.read_text().splitlines()) >= 3:  # header + two epochs
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read().decode()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(history.read_text().splitlines()) - 1
    assert 2 <= done_before < 12
    assert json.loads((run / "status.json").read_text())["state"] == "running"  # killed: never updated
    resumed = subprocess.run([sys.executable, "-m", "transferkit.cli", "train", "--resume", str(run), "-q"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed: head phase restored" in resumed.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["fine_tune"]["epochs_run"] == 12
    epochs = [int(line.split(",")[1]) for line in (run / "history.csv").read_text().splitlines()[1:]
              if line.startswith("fine-tune")]
    assert epochs == list(range(12))  # each epoch once: resumed after the last checkpoint, none repeated
    assert np.isfinite(metrics["test"]["accuracy"])


def test_overwrite_starts_afresh(tmp_path, folder):
    """--overwrite replaces the run in a folder: nothing of the previous run is resumed or loaded."""
    result, run = _train(tmp_path, folder, "--head", "knn")
    assert result.exit_code == 0, result.output
    assert (run / "head.skops").is_file()
    for epochs in ("2", "3"):  # the second replaces a finished fine-tune run, checkpoints and all
        result, run = _train(tmp_path, folder, "--strategy", "fine-tune-top", "--fine-tune-epochs", epochs,
                             "--overwrite")
        assert result.exit_code == 0, result.output
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["fine_tune"]["epochs_run"] == int(epochs)
        assert not (run / "head.skops").exists() and not (run / "head.json").exists()
        rows = (run / "checkpoints" / "history-fine-tune.csv").read_text().splitlines()[1:]
        assert [int(row.split(",")[0]) for row in rows] == list(range(int(epochs)))


def test_lr_find_plots_and_suggests_a_rate_inside_the_sweep(tmp_path, folder):
    plot = tmp_path / "lr.png"
    result = CliRunner().invoke(main, ["lr-find", str(folder), "-o", str(plot), "--backbone", "tiny_test",
                                       "--weights", "none", "--image-size", "32", "--batch-size", "8", "-q",
                                       "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    suggested = float(result.output.split("Suggested learning rate: ")[1].split(" ")[0])
    assert 1e-6 <= suggested <= 1.0 and "a suggestion" in result.output


def test_training_images_balance_and_augment(tmp_path):
    from transferkit.config import TrainConfig
    from transferkit.data.augment import training_images
    from transferkit.data.scan import scan_folder

    folder = scan_folder(make_image_folder(tmp_path / "imb", num_classes=2, images_per_class=12, image_size=32))
    keep = [i for i, label in enumerate(folder.labels) if label == 0 or i % 4 == 0]  # about 12 : 3
    paths = [folder.abs_path(folder.paths[i]) for i in keep]
    labels = folder.labels[keep]
    config = TrainConfig("a", "b", augment=True)
    balanced = training_images(paths, labels, 32, 4, config=config, shuffle=True, seed=0, balanced=True)
    drawn = np.concatenate([np.asarray(y) for _ in range(20) for _, y in balanced])
    assert abs(np.mean(drawn) - 0.5) < 0.1  # the minority class drawn about as often as the majority
    plain = training_images(paths, labels, 32, 64, config=config, shuffle=False, seed=0)
    augmented = training_images(paths, labels, 32, 64, config=config, shuffle=True, seed=0)
    (x_plain, _), (x_aug, _) = next(iter(plain)), next(iter(augmented))
    assert x_plain.shape == x_aug.shape == (len(paths), 32, 32, 3)
    assert float(np.min(x_aug)) >= 0 and float(np.max(x_aug)) <= 255
    # Validation data (shuffle=False) is never augmented: identical on every pass.
    assert np.array_equal(np.asarray(x_plain), np.asarray(next(iter(plain))[0]))
    assert not np.allclose(np.sort(np.asarray(x_plain).ravel()), np.sort(np.asarray(x_aug).ravel()))


def test_nonlinear_sklearn_head_predicts_and_evaluates(tmp_path, folder):
    result, run = _train(tmp_path, folder, "--head", "knn", "--no-search")
    assert result.exit_code == 0, result.output
    assert (run / "head.skops").is_file() and (run / "report.html").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["head"] == "knn" and metrics["test"]["accuracy"] >= 0.6
    predicted = CliRunner().invoke(main, ["predict", str(run), str(folder / "class_1")])
    assert predicted.exit_code == 0, predicted.output
    assert predicted.output.count("class_1") >= 15  # the images of class_1, nearly all recognised
    evaluated = CliRunner().invoke(main, ["evaluate", str(run), str(folder), "-o", str(tmp_path / "eval"), "-q"])
    assert evaluated.exit_code == 0, evaluated.output
    refused = CliRunner().invoke(main, ["export", str(run), "--format", "keras", "-o", str(tmp_path / "exp")])
    assert refused.exit_code == 2 and "scikit-learn model, not a Keras layer" in refused.output


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_two_workers_train_one_model(tmp_path, folder):
    # --distribute multi-worker for real: two worker processes on 127.0.0.1, one shared cache.
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    run = tmp_path / "run"
    command = [sys.executable, "-m", "transferkit.cli", "train", str(folder), "-o", str(run), "--cache-dir",
               str(tmp_path / "cache"), *TINY, "--strategy", "fine-tune-top", "--fine-tune-epochs", "2",
               "--distribute", "multi-worker"]
    processes = []
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(command, env={**os.environ, "TF_CONFIG": tf_config},
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=300)[0])
    finally:
        for process in processes:
            process.kill()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
    assert "chief: writes the run folder" in outputs[0] and "2 replica(s) in sync" in outputs[0]
    assert "This worker's part is done" in outputs[1]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["fine_tune"]["distribute"] == "multi-worker" and metrics["fine_tune"]["replicas"] == 2
    assert metrics["fine_tune"]["epochs_run"] == 2
    # One model, written by the chief; the other worker's scratch folder is gone.
    assert (run / "model.keras").is_file() and not (tmp_path / "run.worker-1").exists()
    # Both workers trained the same model in sync: their last epoch logs the same (all-reduced) losses.
    logs = [[line[line.index("accuracy:"):] for line in out.splitlines() if "val_loss:" in line] for out in outputs]
    assert len(logs[0]) == 2 and logs[0] == logs[1]


def test_multi_worker_needs_tf_config(monkeypatch, tmp_path, folder):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    result, _ = _train(tmp_path, folder, "--strategy", "fine-tune-top", "--distribute", "multi-worker")
    assert result.exit_code == 2 and "needs the TF_CONFIG environment variable" in result.output
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}')
    result, _ = _train(tmp_path, folder, "--strategy", "fine-tune-top", "--distribute", "multi-worker")
    assert result.exit_code == 2 and "task worker:3 is not a chief or worker of its cluster" in result.output


def test_head_trains_on_cached_augmented_views(tmp_path, folder):
    result, run = _train(tmp_path, folder, "--augment-views", "2")
    assert result.exit_code == 0, result.output
    extraction = json.loads((run / "metrics.json").read_text())["extraction"]
    assert extraction["augmented_views"] == 2 and extraction["views_computed"] == 2 * 60
    again, run2 = _train(tmp_path / "again", folder, "--augment-views", "2", "--cache-dir", str(tmp_path / "cache"))
    assert again.exit_code == 0, again.output
    extraction = json.loads((run2 / "metrics.json").read_text())["extraction"]
    assert extraction["views_computed"] == 0 and extraction["views_cached"] == 2 * 60  # the backbone never re-ran


def test_batch_size_auto_backs_off_on_out_of_memory(monkeypatch, tmp_path, folder):
    # No machine here runs out of memory on demand: make batches above a limit fail the way
    # TensorFlow reports it, in extraction (above 16) and in the fine-tune phase (above 8).
    import tensorflow as tf

    from transferkit.training import run as training

    def failing_above(limit, function, size_of):
        def wrapper(*args, **kwargs):
            if size_of(*args, **kwargs) > limit:
                raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(training, "extract_features", failing_above(
        16, training.extract_features, lambda *a, **k: k["batch_size"]))
    monkeypatch.setattr(training, "fine_tune_phase", failing_above(
        8, training.fine_tune_phase, lambda config, *a, **k: config.batch_size))
    result, run = _train(tmp_path, folder, "--strategy", "fine-tune-top", "--fine-tune-epochs", "1",
                         "--batch-size", "auto")
    assert result.exit_code == 0, result.output
    assert "out of memory during extraction; retrying with 16 images per batch" in result.output
    assert "out of memory during the fine-tune phase; retrying with 8 images per batch" in result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["extraction"]["batch_size"] == 16 and metrics["fine_tune"]["batch_size"] == 8
    assert "batch_size: auto" in (run / "config.yaml").read_text()  # a repeat backs off again
    # A fixed batch size is taken as given: the same failure is a clear error, not a retry.
    failed, _ = _train(tmp_path / "fixed", folder, "--batch-size", "64")
    assert failed.exit_code == 2 and "retrying" not in failed.output
    assert "Out of memory during extraction with --batch-size 64" in failed.output
