"""Settings: validation messages name the option; recipes are checked by key and type."""

from __future__ import annotations

import pytest

from transferkit.config import TrainConfig, check_settings, config_from_dict, load_config, load_settings, save_config
from transferkit.errors import ArgumentError, InputError


def test_defaults_and_replace():
    cfg = TrainConfig("photos", "runs/a")
    assert cfg.backbone == "mobilenet_v2_035" and cfg.refit and cfg.patience == 20
    assert cfg.replace(seed=3).seed == 3


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, r"`batch_size` must be an integer from 1 to 4096, or auto\. Received: batch_size=0$"),
    ("batch_size", "big", r"`batch_size` must be an integer from 1 to 4096, or auto\. Received: batch_size='big'$"),
    ("val_fraction", 1.5, r"`val_fraction` must be a number in \(0, 1\)\. Received: val_fraction=1\.5"),
    ("test_fraction", 0.9, "leaving images to train on"),
    ("min_accuracy", 2, r"`min_accuracy` must be a number in \[0, 1\]\. Received: min_accuracy=2"),
    ("strategy", "fine-tune-all", "`strategy` must be one of freeze-all"),
])
def test_invalid_values_name_the_argument_and_echo_it(field, value, message):
    """Keras' style in the library (the CLI names its option instead: test_trust_options)."""
    with pytest.raises(ArgumentError, match=message) as caught:
        TrainConfig("photos", "runs/a", **{field: value})
    assert isinstance(caught.value, ValueError) and caught.value.argument == field
    assert caught.value.for_option("--x").startswith("Invalid --x: expected ")


@pytest.mark.parametrize("data, message", [
    ({"epochs": "ten"}, r"Invalid --epochs in recipe: expected an integer, received 'ten'"),
    ({"epochs": 2.5}, "Invalid --epochs"),
    ({"refit": "no"}, "Invalid --refit in recipe: expected true or false"),
    ({"batch-size": True}, "Invalid --batch-size"),
    ({"backbon": "resnet50"}, "Unknown key 'backbon' in recipe. Did you mean 'backbone'?"),
])
def test_recipe_values_are_checked_by_type(data, message):
    with pytest.raises(InputError, match=message):
        check_settings(data, source="recipe")


def test_numbers_and_names_are_normalised():
    assert check_settings({"learning-rate": 1, "image_dir": 123, "image_size": None}) == {
        "learning_rate": 1.0, "image_dir": "123", "image_size": None}


def test_missing_required_settings_are_named():
    with pytest.raises(InputError, match="Missing --output-dir in recipe"):
        config_from_dict({"image_dir": "x"}, source="recipe")


def test_save_and_load_round_trip_without_overwrite(tmp_path):
    cfg = TrainConfig("photos", "runs/a", epochs=7, overwrite=True, min_accuracy=0.5)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg.replace(overwrite=False)


def test_partial_recipe_loads_as_settings(tmp_path):
    (tmp_path / "r.yaml").write_text("backbone: resnet50\nepochs: 3\n")
    assert load_settings(tmp_path / "r.yaml") == {"backbone": "resnet50", "epochs": 3}


@pytest.mark.parametrize("text, message", [("- a\n- b\n", "must hold a mapping"), ("a: [\n", "not valid YAML")])
def test_bad_recipe_files(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(InputError, match=message):
        load_settings(tmp_path / "r.yaml")
