"""Every recipe in recipes/ loads, documents how to run it, and the CI-sized ones run end to end.

A recipe's first line says whether CI runs it (``# ci: true`` or ``# ci: false``); its comment
names the command that runs it (``transferkit train --config recipes/NAME.yaml``, or ``compare`` or
``features export``, run from the repository root, where its relative paths resolve).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from transferkit.cli import main
from transferkit.config import FeatureExportConfig, TrainConfig, config_from_dict, load_settings
from transferkit.data.tfds import parse_tfds_name
from transferkit.errors import InputError
from transferkit.heads.compare import CompareConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
CONFIG_CLASSES = {"train": TrainConfig, "compare": CompareConfig, "features export": FeatureExportConfig}


def _header(recipe: Path) -> tuple[bool, str]:
    """(CI-sized?, the command that runs it) from the recipe's comments."""
    text = recipe.read_text(encoding="utf-8")
    ci = re.match(r"# ci: (true|false)\b", text)
    assert ci, f"{recipe.name}: the first line must be '# ci: true' or '# ci: false'"
    run = re.search(r"^# Run from the repository root:\s+transferkit (\w+(?: \w+)?) --config recipes/(\S+)$", text,
                    re.M)
    assert run, f"{recipe.name}: a comment must say 'Run from the repository root:  transferkit CMD --config ...'"
    assert run.group(2) == recipe.name, f"{recipe.name}: its run line names recipes/{run.group(2)}"
    return ci.group(1) == "true", run.group(1)


def test_the_recipe_library_covers_the_documented_experiments():
    names = {recipe.stem for recipe in RECIPES}
    assert {"demo", "smoke-tiny-backbone", "ants-bees-compare-heads", "ants-bees-multi-gpu", "ants-bees-multi-worker",
            "ants-bees-export-features", "smoke-export-features", "tf-flowers-freeze-all"} <= names
    strategies = {load_settings(r).get("strategy") for r in RECIPES if _header(r)[1] == "train"}
    assert {"freeze-all", "fine-tune-top", "full-retrain"} <= strategies
    listed = (ROOT / "recipes" / "README.md").read_text(encoding="utf-8")
    for recipe in RECIPES:
        assert f"`{recipe.name}`" in listed, f"{recipe.name} is missing from recipes/README.md"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_loads_into_its_command_config(recipe):
    ci, command = _header(recipe)
    cls = CONFIG_CLASSES[command]
    settings = load_settings(recipe, cls)  # unknown keys and wrong types fail here
    config = config_from_dict(settings, cls, source=recipe.name)  # and every value passes its checks
    # Recipes run from the repository root: their paths are relative, never one machine's.
    output = config.output if command == "features export" else config.output_dir
    assert not Path(config.image_dir).is_absolute() and not Path(output).is_absolute()
    assert output.startswith("runs/")
    if config.image_dir.startswith("tfds:"):  # TensorFlow Datasets: a real name, checked without TensorFlow
        parse_tfds_name(config.image_dir)
        assert not ci, "a TFDS recipe downloads its data: not CI-sized"
    elif config.image_dir.startswith("transferkit/"):
        assert (ROOT / config.image_dir).is_dir()
    else:
        assert config.image_dir.startswith("../shared/datasets/")


def test_a_misspelt_recipe_key_fails_with_the_nearest_key(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text((ROOT / "recipes" / "smoke-tiny-backbone.yaml").read_text() + "fine_tune_epoch: 3\n")
    result = CliRunner().invoke(main, ["train", "--config", str(recipe), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "Unknown key 'fine_tune_epoch'" in result.output and "Did you mean 'fine_tune_epochs'?" in result.output


CI_RECIPES = [r for r in RECIPES if _header(r)[0]]


@pytest.mark.parametrize("recipe", CI_RECIPES, ids=[r.stem for r in CI_RECIPES])
def test_ci_sized_recipe_runs_end_to_end(recipe, tmp_path, monkeypatch, no_downloads):
    _, command = _header(recipe)
    monkeypatch.chdir(ROOT)  # as documented: recipes run from the repository root
    run_dir = tmp_path / "run"
    if command == "features export":
        output = tmp_path / f"features{Path(load_settings(recipe, FeatureExportConfig)['output']).suffix}"
        result = CliRunner().invoke(main, [*command.split(), "--config", f"recipes/{recipe.name}", "-o", str(output),
                                           "-q"])
        assert result.exit_code == 0, result.output
        assert output.is_file() and f"to {output}" in result.output
        return
    result = CliRunner().invoke(main, [command, "--config", f"recipes/{recipe.name}", "-o", str(run_dir), "-q"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key, value in load_settings(recipe, CONFIG_CLASSES[command]).items():
        if key != "output_dir":
            assert saved[key] == (list(value) if isinstance(value, tuple) else value), key
    if command == "train":
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["test"]["num_examples"] > 0 and 0 <= metrics["test"]["accuracy"] <= 1
        assert (run_dir / "model.keras").is_file() and (run_dir / "report.html").is_file()


def test_a_saved_compare_config_loads_back_as_a_recipe(tmp_path):
    config = CompareConfig("photos", "cmp", backbone="tiny_test", heads=("softmax", "knn"), num_seeds=2)
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(config.to_dict()))  # what compare writes to OUTPUT_DIR/config.yaml
    assert config_from_dict(load_settings(saved, CompareConfig), CompareConfig) == config
    saved.write_text("image_dir: photos\noutput_dir: cmp\nbackbone: tiny_test\nheads: softmax, knn\n")
    assert load_settings(saved, CompareConfig)["heads"] == ("softmax", "knn")  # a comma-separated string works too
    saved.write_text("image_dir: photos\noutput_dir: cmp\nbackbone: tiny_test\nheads: 3\n")
    with pytest.raises(InputError, match="Invalid --heads .*expected a list of names"):
        load_settings(saved, CompareConfig)


def test_features_export_takes_a_recipe_that_flags_override(tmp_path, image_folder):
    recipe = tmp_path / "export.yaml"
    recipe.write_text(f"image_dir: {image_folder}\noutput: {tmp_path / 'f.csv'}\nbackbone: tiny_test\nweights: none\n"
                      "image_size: 32\nformat: csv\n")
    result = CliRunner().invoke(main, ["features", "export", "--config", str(recipe), "-o", str(tmp_path / "g.npz"),
                                       "--format", "npz", "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "g.npz").is_file() and not (tmp_path / "f.csv").exists(), "-o and --format override the recipe"

    recipe.write_text(recipe.read_text() + "augment_view: 2\n")
    misspelt = CliRunner().invoke(main, ["features", "export", "--config", str(recipe)])
    assert misspelt.exit_code == 2 and "Did you mean 'augment_views'?" in misspelt.output
    recipe.write_text(f"image_dir: {image_folder}\nbackbone: tiny_test\n")
    no_output = CliRunner().invoke(main, ["features", "export", "--config", str(recipe)])
    assert no_output.exit_code == 2 and "Missing option '-o' / '--output'" in no_output.output
