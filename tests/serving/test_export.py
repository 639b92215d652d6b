"""Export: every format round-trips with parity, int8 holds int8 kernels, predict reads artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from transferkit.errors import ExportError, InputError
from transferkit.serving import export, predictors, runs
from transferkit.testing import run_cli


@pytest.fixture
def trained(tiny_run):
    """The session's tiny run (tests/conftest.py): its run folder and photo folder."""
    folder, result = tiny_run
    return result.run_dir, folder


def test_keras_and_saved_model_round_trip_with_exact_parity(trained, tmp_path):
    run_dir, folder = trained
    run = runs.load_run(run_dir)
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    expected = run.model.predict(images.astype(np.float32), verbose=0)
    for fmt in ("keras", "saved-model"):
        card = export.export_run(run_dir, tmp_path / fmt, fmt)
        assert card["parity"]["top1_agreement"] == 1.0 and card["parity"]["max_abs_diff"] <= 1e-4
        assert card["parity"]["source"].startswith("test split")
        written = json.loads((tmp_path / fmt / "model_card.json").read_text())
        assert written["class_names"] == ["class_0", "class_1", "class_2"]
        assert written["input"]["shape"][1:] == [32, 32, 3] and written["backbone"] == "tiny_test"
        assert "accuracy" in written["metrics"] and written["versions"]["keras"]
        assert (tmp_path / fmt / "labels.txt").read_text().split() == written["class_names"]
        predictor = predictors.load_predictor(tmp_path / fmt)
        assert predictor.kind == fmt and predictor.image_size == 32
        np.testing.assert_allclose(predictor.predict(images), expected, atol=1e-5)  # uint8 in
        np.testing.assert_allclose(predictor.predict(images.astype(np.float32)), expected, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_tflite_float_round_trips_and_int8_holds_int8_kernels(trained, tmp_path):
    run_dir, folder = trained
    card = export.export_run(run_dir, tmp_path / "fp32", "tflite")
    assert card["parity"]["top1_agreement"] == 1.0 and card["parity"]["max_abs_diff"] <= 1e-4
    card = export.export_run(run_dir, tmp_path / "int8", "tflite", quantize="int8")
    assert card["int8_kernels"]["ops"] == card["int8_kernels"]["int8"] == 4  # 3 convolutions + the dense head
    assert card["calibration"]["source"].startswith("train split")
    assert {"keras_accuracy", "export_accuracy", "accuracy_drop"} <= set(card["parity"])
    interpreter = predictors.tflite_interpreter(model_path=str(tmp_path / "int8" / "model.tflite"))
    dtypes = {np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    assert "int8" in dtypes
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8

    # predict gives the same top-1 on the float artifact as on the run folder
    expected = run_cli("predict", run_dir, folder)
    for artifact in (tmp_path / "fp32", tmp_path / "fp32" / "model.tflite"):
        got = run_cli("predict", artifact, folder)
        assert got.exit_code == 0, got.output
        assert [line.split("\t")[1].split()[0] for line in got.output.splitlines()] == \
            [line.split("\t")[1].split()[0] for line in expected.output.splitlines()]


def test_export_cli_prints_parity_and_refuses_an_existing_folder(trained, tmp_path):
    run_dir, folder = trained
    out = tmp_path / "out"
    result = run_cli("export", run_dir, "--format", "keras", "-o", out)
    assert result.exit_code == 0, result.output
    assert "top-1 agreement 100.0%" in result.output and "model.keras" in result.output
    again = run_cli("export", run_dir, "--format", "keras", "-o", out)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert run_cli("export", run_dir, "--format", "keras", "-o", out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [".transferkit-run", "labels.txt", "model.keras", "model_card.json"]
    mixed = run_cli("export", run_dir, "--format", "saved-model", "--quantize", "int8", "-o", tmp_path / "x")
    assert mixed.exit_code == 2 and "--quantize int8 applies to --format tflite only" in mixed.output


def test_a_float_export_that_disagrees_fails_and_writes_nothing(trained, tmp_path, monkeypatch):
    run_dir, _ = trained
    real = export.load_predictor

    def drifting(*args, **kwargs):
        predictor = real(*args, **kwargs)
        original = predictor._predict
        predictor._predict = lambda images: original(images) + 1e-3
        return predictor

    monkeypatch.setattr(export, "load_predictor", drifting)
    with pytest.raises(ExportError, match=r"does not predict like the trained one.*allowed: 100% and 0.0001"):
        export.export_run(run_dir, tmp_path / "out", "keras")
    assert list(tmp_path.iterdir()) == []


def test_without_the_photos_parity_uses_random_pixels_and_int8_asks_for_images(trained, tmp_path):
    run_dir, folder = trained
    moved = tmp_path / "copy"
    import shutil

    shutil.copytree(run_dir, moved)
    for name in ("config.yaml", "metrics.json"):  # the run's photos are not on this machine
        text = (moved / name).read_text().replace(str(folder.resolve()), str(tmp_path / "gone"))
        (moved / name).write_text(text.replace(str(folder), str(tmp_path / "gone")))
    card = export.export_run(moved, tmp_path / "k", "keras")
    assert card["parity"]["source"] == "random pixels" and card["parity"]["top1_agreement"] == 1.0
    with pytest.raises(InputError, match="int8 quantisation needs calibration images.*--image-dir"):
        export.export_run(moved, tmp_path / "q", "tflite", quantize="int8")
    card = export.export_run(moved, tmp_path / "k2", "keras", image_dir=folder)
    assert card["parity"]["source"] == f"images in {folder}"


def test_artifacts_without_labels_are_refused_with_a_fix(trained, tmp_path):
    run_dir, _ = trained
    export.export_run(run_dir, tmp_path / "k", "keras")
    (tmp_path / "k" / "model.keras").rename(tmp_path / "alone.keras")
    with pytest.raises(InputError, match=r"No labels.txt beside .*alone.keras"):
        predictors.load_predictor(tmp_path / "alone.keras")


def test_help_of_the_new_commands_does_not_import_tensorflow():
    import subprocess
    import sys

    code = ("import sys\nfrom click.testing import CliRunner\nfrom transferkit.cli import main\n"
            "for name in ('export', 'explain', 'ensemble', 'predict'):\n"
            "    r = CliRunner().invoke(main, [name, '--help'])\n"
            "    assert r.exit_code == 0 and 'Usage:' in r.output, r.output\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
