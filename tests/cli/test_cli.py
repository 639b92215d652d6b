"""The command line: help without TensorFlow, messages and exit codes, the end-to-end commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from transferkit.cli import main
from transferkit.testing import run_cli as run


def test_help_of_every_command_does_not_import_tensorflow():
    """Every command of the Click tree (walked, not listed by hand) answers --help without TensorFlow or Keras."""
    code = (
        "import sys\nimport click\nfrom click.testing import CliRunner\nfrom transferkit.cli import main\n"
        "def walk(command, path):\n"
        "    yield path\n"
        "    if isinstance(command, click.Group):\n"
        "        for name, sub in command.commands.items():\n"
        "            yield from walk(sub, path + [name])\n"
        "seen = []\n"
        "for args in walk(main, []):\n"
        "    r = CliRunner().invoke(main, args + ['--help'])\n"
        "    assert r.exit_code == 0 and 'Usage:' in r.output, (args, r.output)\n"
        "    seen.append(' '.join(args))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))\n"
        "print(len(seen), '|'.join(seen))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules, commands = out.stdout.strip().splitlines()
    assert modules == "[]"
    count, names = commands.split(" ", 1)
    assert int(count) >= 20 and {"train", "features export", "cache verify", "weights import"} <= set(names.split("|"))


def test_tensorflow_start_up_chatter_is_hidden():
    code = "from transferkit.runtime import start_tensorflow; start_tensorflow(); import tensorflow"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "absl::InitializeLog" not in out.stderr and "oneDNN" not in out.stderr, out.stderr


def test_version():
    from transferkit import __version__

    assert __version__ in run("--version").output


def test_backbones_json_lists_the_registry_and_offline_weights():
    result = run("backbones", "--json")
    assert result.exit_code == 0
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["mobilenet_v2_035"]["weights_offline"] == "bundled"
    assert rows["resnet50"]["weights_offline"] is None
    assert rows["efficientnet_b0"]["input_size"] == 224 and rows["efficientnet_b0"]["feature_dim"] == 1280


def test_backbones_table_is_readable():
    result = run("backbones")
    assert result.exit_code == 0
    assert "mobilenet_v2_035" in result.output and "bundled" in result.output


def test_unknown_backbone_suggests_the_nearest(tmp_path, image_folder):
    result = run("train", image_folder, "-o", tmp_path / "run", "--backbone", "resnet5")
    assert result.exit_code == 2
    assert "Unknown backbone 'resnet5'. Did you mean: resnet50" in result.output
    assert "Traceback" not in result.output


def test_missing_weights_fail_at_once_with_instructions(tmp_path, image_folder, no_downloads):
    result = run("train", image_folder, "-o", tmp_path / "run", "--backbone", "resnet50")
    assert result.exit_code == 1
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in result.output
    assert "transferkit weights import" in result.output
    assert not (tmp_path / "run").exists(), "nothing is written before the inputs are checked"


def test_missing_image_dir_is_a_usage_error(tmp_path):
    result = run("train", tmp_path / "nowhere", "-o", tmp_path / "run")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_empty_class_folder_is_named(tmp_path, image_folder):
    (image_folder / "class_9").mkdir()
    result = run("train", image_folder, "-o", tmp_path / "run", "--backbone", "tiny_test", "--weights", "none")
    assert result.exit_code == 2
    assert "class_9" in result.output and "no readable images" in result.output


def test_debug_shows_the_traceback(tmp_path, image_folder):
    result = CliRunner().invoke(main, ["--debug", "train", str(image_folder), "-o", str(tmp_path / "r"),
                                       "--backbone", "resnet5"])
    assert result.exit_code != 0 and type(result.exception).__name__ == "UnknownBackboneError"


def tiny_train(image_dir, run_dir, *extra):
    return run("train", image_dir, "-o", run_dir, "--backbone", "tiny_test", "--weights", "none",
               "--learning-rate", "0.01", "--batch-size", "8", "-q", *extra)


def test_train_evaluate_predict_through_the_cli(tmp_path, image_folder):
    result = tiny_train(image_folder, tmp_path / "run", "--epochs", "40", "--min-accuracy", "0")
    assert result.exit_code == 0, result.output
    assert "randomly initialised" in result.output
    assert "test accuracy:" in result.output and str(tmp_path / "run") in result.output

    again = tiny_train(image_folder, tmp_path / "run")
    assert again.exit_code == 2 and "--overwrite" in again.output

    evaluated = run("evaluate", tmp_path / "run", image_folder, "-q")
    assert evaluated.exit_code == 0 and "accuracy:" in evaluated.output
    assert (tmp_path / "run" / "evaluations" / "photos" / "metrics.json").is_file()

    out_csv = tmp_path / "pred.csv"
    predicted = run("predict", tmp_path / "run", image_folder / "class_0", "--top-k", "2", "--output", out_csv)
    assert predicted.exit_code == 0
    lines = out_csv.read_text().splitlines()
    assert lines[0] == "path,ok,error,class_1,prob_1,class_2,prob_2" and len(lines) == 13
    out_json = tmp_path / "pred.json"
    assert run("predict", tmp_path / "run", image_folder, "--output", out_json).exit_code == 0
    assert len(json.loads(out_json.read_text())) == 36

    bad = run("predict", tmp_path / "run", image_folder, "--output", tmp_path / "pred.txt")
    assert bad.exit_code == 2 and "--output" in bad.output


def test_train_from_a_saved_config_with_overrides(tmp_path, image_folder):
    assert tiny_train(image_folder, tmp_path / "a", "--head-solver", "adam", "--epochs", "2").exit_code == 0
    result = run("train", "--config", tmp_path / "a" / "config.yaml", "-o", tmp_path / "b", "--epochs", "3", "-q")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["backbone"] == "tiny_test" and metrics["head_fit"]["solver"] == "adam"
    assert metrics["epochs_run"] == 3, "--epochs overrides the saved 2 (patience 20 never stops 3 epochs early)"


def test_unknown_config_key_suggests_the_nearest(tmp_path, image_folder):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"image_dir: {image_folder}\noutput_dir: {tmp_path / 'r'}\nbackbon: resnet50\n")
    result = run("train", "--config", recipe)
    assert result.exit_code == 2 and "Unknown key 'backbon'" in result.output and "'backbone'" in result.output


def test_min_accuracy_gate_exits_1_after_writing_everything(tmp_path):
    # Pure noise images with arbitrary labels: nothing to learn, so accuracy stays far below 0.99.
    folder = tmp_path / "noise"
    rng = __import__("numpy").random.default_rng(0)
    from PIL import Image

    for c in range(2):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(15):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype="uint8")).save(folder / f"c{c}" / f"{i}.png")
    result = tiny_train(folder, tmp_path / "run", "--epochs", "3", "--min-accuracy", "0.99")
    assert result.exit_code == 1
    assert "below --min-accuracy 0.99" in result.output
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "model.keras").is_file()


def test_extract_reports_seen_computed_cached(tmp_path, image_folder):
    args = ["extract", image_folder, "--backbone", "tiny_test", "--weights", "none", "-q",
            "--cache-dir", tmp_path / "cache", "--image-size", "32"]
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert "Images seen: 36; computed: 36; already cached: 0" in first.output
    assert "images/s" in first.output
    second = run(*args)
    assert "computed: 0; already cached: 36; skipped: 0; ignored: 0 " in second.output
    assert "images/s" not in second.output, "no rate when nothing was computed"


def test_weights_import_rejects_a_bad_file(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"junk")
    result = run("weights", "import", bad, "--backbone", "mobilenet_v2_035")
    assert result.exit_code == 1 and "could not be loaded" in result.output


@pytest.mark.slow
def test_demo_runs_offline_and_reaches_the_expected_accuracy(tmp_path, no_downloads):
    result = run("demo", "-o", tmp_path / "demo", "--cache-dir", tmp_path / "cache", "-q")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["weights"].startswith("bundled")
    assert metrics["test"]["accuracy"] >= 0.8
    rerun = run("demo", "-o", tmp_path / "demo", "--cache-dir", tmp_path / "cache", "-q")
    assert rerun.exit_code == 0, "a previous demo run is replaced"
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text())["extraction"]["computed"] == 0


def test_a_recipe_may_hold_only_some_options(tmp_path, image_folder):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("backbone: tiny_test\nweights: none\nhead_solver: adam\nepochs: 2\nlearning_rate: 0.01\n")
    result = run("train", "--config", recipe, image_folder, "-o", tmp_path / "run", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs_run"] == 2


def test_the_environment_overrides_a_recipe_and_the_flags_override_both(tmp_path, image_folder, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("backbone: tiny_test\nweights: none\nhead_solver: adam\nepochs: 2\nlearning_rate: 0.01\n"
                      "patience: 5\n")
    monkeypatch.setenv("TRANSFERKIT_TRAIN_EPOCHS", "3")  # over the recipe's 2
    monkeypatch.setenv("TRANSFERKIT_TRAIN_PATIENCE", "4")  # under the flag's 1
    result = run("train", "--config", recipe, image_folder, "-o", tmp_path / "run", "--patience", "1", "-q")
    assert result.exit_code == 0, result.output
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "epochs: 3\n" in saved and "patience: 1\n" in saved and "learning_rate: 0.01\n" in saved
    monkeypatch.setenv("TRANSFERKIT_TRAIN_EPOCHS", "ten")
    refused = run("train", image_folder, "-o", tmp_path / "run2")
    assert refused.exit_code == 2 and "--epochs" in refused.output and "ten" in refused.output


def test_wrong_type_in_a_recipe_names_the_option(tmp_path, image_folder):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: ten\n")
    result = run("train", "--config", recipe, image_folder, "-o", tmp_path / "run")
    assert result.exit_code == 2 and "Invalid --epochs" in result.output and "'ten'" in result.output


def test_demo_refuses_a_folder_that_is_not_a_demo_run(tmp_path, image_folder):
    assert tiny_train(image_folder, tmp_path / "real", "--epochs", "2").exit_code == 0
    result = run("demo", "-o", tmp_path / "real")
    assert result.exit_code == 2 and "already exists and is not empty" in result.output


def test_predict_checks_the_output_folder_first(tmp_path, image_folder):
    assert tiny_train(image_folder, tmp_path / "run", "--epochs", "2").exit_code == 0
    result = run("predict", tmp_path / "run", image_folder, "--output", tmp_path / "missing" / "p.csv")
    assert result.exit_code == 2 and "does not exist" in result.output and "Traceback" not in result.output


def test_damaged_model_file_is_a_clear_error(tmp_path, image_folder):
    assert tiny_train(image_folder, tmp_path / "run", "--epochs", "2").exit_code == 0
    (tmp_path / "run" / "model.keras").write_bytes(b"not a zip")
    result = run("predict", tmp_path / "run", image_folder)
    assert result.exit_code == 2 and "Cannot load model" in result.output


def test_not_a_run_folder_is_refused_before_tensorflow_work(tmp_path, image_folder):
    result = run("evaluate", tmp_path, image_folder)
    assert result.exit_code == 2
    assert "is not a transferkit run folder (missing model.keras, labels.txt)" in result.output


def extract_args(image_folder, cache_dir, *extra):
    return ["extract", image_folder, "--backbone", "tiny_test", "--weights", "none", "-q",
            "--cache-dir", cache_dir, "--image-size", "32", *extra]


def test_cache_info_verify_and_repair(tmp_path, image_folder):
    cache_dir = tmp_path / "cache"
    assert run(*extract_args(image_folder, cache_dir)).exit_code == 0
    assert run(*extract_args(image_folder, cache_dir)).exit_code == 0
    info = json.loads(run("cache", "info", "--cache-dir", cache_dir, "--json").output)
    (spec,) = info["specs"]
    assert spec["entries"] == 36 and spec["spec"]["backbone"] == "tiny_test"
    assert spec["last_run"]["hit_rate"] == 1.0
    assert "36 vectors" in run("cache", "info", "--cache-dir", cache_dir).output

    assert run("cache", "verify", "--cache-dir", cache_dir).exit_code == 0
    shard = next(cache_dir.rglob("shard-*.h5"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    damaged = run("cache", "verify", "--cache-dir", cache_dir)
    assert damaged.exit_code == 1 and "Damaged:" in damaged.output and "1 damaged" in damaged.output
    repaired = run(*extract_args(image_folder, cache_dir))
    assert repaired.exit_code == 0 and "computed: 36" in repaired.output
    assert run("cache", "verify", "--cache-dir", cache_dir).exit_code == 0


def test_workers_extract_parts_and_their_caches_merge(tmp_path, image_folder):
    outputs = [run(*extract_args(image_folder, tmp_path / f"w{i}", "--num-shards", "2", "--shard-index", str(i)))
               for i in range(2)]
    assert all(o.exit_code == 0 for o in outputs)
    counts = [int(o.output.split("computed: ")[1].split(";")[0]) for o in outputs]
    assert sum(counts) == 36 and min(counts) > 0, "each worker takes a part, together all images"
    merged = run("cache", "merge", tmp_path / "w0", tmp_path / "w1", "--cache-dir", tmp_path / "all")
    assert merged.exit_code == 0 and "2 shards copied" in merged.output
    again = run("cache", "merge", tmp_path / "w0", "--cache-dir", tmp_path / "all")
    assert "already present" in again.output
    final = run(*extract_args(image_folder, tmp_path / "all"))
    assert "computed: 0; already cached: 36" in final.output
    bad = run(*extract_args(image_folder, tmp_path / "x", "--num-shards", "2", "--shard-index", "2"))
    assert bad.exit_code == 2 and "--shard-index" in bad.output


def test_prune_drops_vectors_of_deleted_images_and_compacts(tmp_path, image_folder):
    cache_dir = tmp_path / "cache"
    assert run(*extract_args(image_folder, cache_dir)).exit_code == 0
    for path in sorted((image_folder / "class_0").iterdir())[:5]:
        path.unlink()
    result = run("cache", "prune", "--missing", "--cache-dir", cache_dir)
    assert result.exit_code == 0 and "36 -> 31 vectors" in result.output and "-> 1 shards" in result.output
    assert "computed: 0; already cached: 31" in run(*extract_args(image_folder, cache_dir)).output
    assert run("cache", "verify", "--cache-dir", cache_dir).exit_code == 0


def test_features_export_in_every_format_reads_back(tmp_path, image_folder):
    import csv

    import numpy as np
    import pyarrow.parquet as pq

    cache_dir = tmp_path / "cache"
    args = ["--backbone", "tiny_test", "--weights", "none", "--image-size", "32", "--cache-dir", cache_dir, "-q"]
    assert run("features", "export", image_folder, "-o", tmp_path / "f.npz", *args).exit_code == 0
    with np.load(tmp_path / "f.npz") as data:
        paths, features, splits = data["paths"].tolist(), data["features"], data["splits"].tolist()
        assert features.shape == (36, 32) and data["class_names"].tolist() == ["class_0", "class_1", "class_2"]
    assert paths[0].startswith("class_0/") and set(splits) == {"train", "val", "test"}

    result = run("features", "export", image_folder, "-o", tmp_path / "f.parquet", *args)
    assert result.exit_code == 0 and "Wrote 36 rows x 32 features" in result.output
    table = pq.read_table(tmp_path / "f.parquet").to_pydict()
    assert table["path"] == paths and table["split"] == splits
    np.testing.assert_allclose(np.array([table[f"f{j}"] for j in range(32)]).T, features, rtol=1e-6)

    assert run("features", "export", image_folder, "-o", tmp_path / "f.csv", *args).exit_code == 0
    with open(tmp_path / "f.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"] for r in rows] == paths and rows[0]["class_name"] == "class_0"
    np.testing.assert_allclose([float(r["f3"]) for r in rows], features[:, 3], rtol=1e-6)

    again = run("features", "export", image_folder, "-o", tmp_path / "f.csv", *args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    unknown = run("features", "export", image_folder, "-o", tmp_path / "f.txt", *args)
    assert unknown.exit_code == 2 and "--format" in unknown.output


def test_float16_cache_is_a_separate_smaller_cache(tmp_path, image_folder):
    cache_dir = tmp_path / "cache"
    assert run(*extract_args(image_folder, cache_dir)).exit_code == 0
    half = run(*extract_args(image_folder, cache_dir, "--cache-dtype", "float16"))
    assert half.exit_code == 0 and "computed: 36" in half.output, "another dtype is another key"
    sizes = {row["spec"]["dtype"]: row["bytes"] for row in
             json.loads(run("cache", "info", "--cache-dir", cache_dir, "--json").output)["specs"]}
    assert set(sizes) == {"float32", "float16"} and sizes["float16"] < sizes["float32"]
