
"""Settings, options and dataset rules a user can trust (issue 14).

YAML files are read by one strict loader (no aliases, a size cap, no duplicate keys, a mapping at the top);
numeric options and recipe settings share bounds; the hash split treats a small class the same whatever the
seed; class names that labels.txt or a file system cannot keep are refused at scan time; ``tfds:NAME``
offline fails in seconds.
"""

from __future__ import annotations

import json
import socket
import unicodedata
from functools import partial

import numpy as np
import pytest

from transferkit.config import TrainConfig, config_from_dict, load_settings, read_yaml
from transferkit.data.scan import SPLITS, scan_folder
from transferkit.data.splits import hash_splits, stable_fraction
from transferkit.errors import DataError, InputError, short_repr
from transferkit.report.data import RunFolder
from transferkit.testing import make_image_folder, run_cli
from transferkit.training.run import assign_roles

TINY = ["--backbone", "tiny_test", "--weights", "none", "--image-size", "32", "-q"]


run = partial(run_cli, catch_exceptions=True)  # the result holds any exception


def _alias_bomb(levels: int = 6) -> str:
    """A "billion laughs" value for a real key: each level repeats the one before 9 times (9**levels strings).

    An old message formatted its repr; 6 levels keep that to a few MB, so the old code fails fast.
    """
    items = ['&l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels + 1):
        items.append(f"&l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "epochs: [\n  " + ",\n  ".join(items) + "]\n"


# ------------------------------------------------------------------------------------------------ YAML


def test_an_alias_bomb_in_a_recipe_is_refused_with_a_short_message(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(_alias_bomb())
    with pytest.raises(InputError, match=r"line 2: YAML anchors and aliases .* are not allowed") as caught:
        load_settings(recipe)
    assert len(str(caught.value)) < 400  # never the expanded value (9**6 strings)
    result = run("train", "--config", recipe, "-o", tmp_path / "run", *TINY)
    assert result.exit_code == 2 and "anchors and aliases" in result.output and len(result.output) < 600
    assert not (tmp_path / "run").exists()


def test_a_run_folders_hostile_config_yaml_is_refused_or_left_out(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(_alias_bomb())
    result = run("train", "--resume", run_dir)
    assert result.exit_code == 2, result.output
    assert "anchors and aliases" in result.output and len(result.output) < 600
    # The report reads the same file with the same loader, and draws without the settings it refuses.
    (run_dir / "metrics.json").write_text(json.dumps({"test": {"class_names": ["a", "b"]}}))
    assert RunFolder(run_dir).config == {}
    (run_dir / "config.yaml").write_text("- image_dir: photos\n- epochs: 3\n")  # a list, not a mapping
    assert RunFolder(run_dir).config == {}
    with pytest.raises(InputError, match=r"must hold a mapping of option: value .* found a list"):
        read_yaml(run_dir / "config.yaml", "Run settings")


def test_duplicate_keys_are_refused_naming_the_key_and_lines(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 3\nbackbone: resnet50\nepochs: 30\n")
    with pytest.raises(InputError, match=r"'.*r\.yaml' line 3: key 'epochs' appears twice \(first on line 1\)"):
        load_settings(recipe)


@pytest.mark.parametrize("text, message", [
    ("backbone: resnet50\n" + "# a comment\n" * 10_000, "larger than 64 KiB"),  # valid YAML, but not settings
    ("a: " + "[" * 100 + "]" * 100 + "\n", "nested more than 32 levels deep"),
    ("epochs: " + "9" * 5000 + "\n", "holds a value transferkit cannot read"),  # int() refuses 4,300+ digits
])
def test_oversized_deep_or_unreadable_yaml_gets_an_input_error(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(InputError, match=message) as caught:
        load_settings(recipe)
    assert len(str(caught.value)) < 600


@pytest.mark.parametrize("data", [
    {"strategy": "x" * 50_000},
    {"epochs": list(range(50_000))},
    {"epochs": 10**5000},
    {"x" * 50_000: 1},
])
def test_messages_never_echo_an_unbounded_value(data):
    with pytest.raises(InputError) as caught:
        config_from_dict({"image_dir": "photos", "output_dir": "runs/a", **data}, source="recipe")
    assert len(str(caught.value)) < 1500  # the list of valid keys is the longest part


def test_short_repr_cuts_any_value():
    assert short_repr("x" * 1000, limit=20) == "'xxxxxxx...xxxxxxxx'"
    assert len(short_repr(list(range(10**5)))) <= 80
    assert short_repr(10**5000).startswith("<an integer of")


# --------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("args, option, allowed, received", [
    (["--seed", str(2**32)], "--seed", "from 0 to 4294967295", "4294967296"),
    (["--seed", "-1"], "--seed", "from 0 to 4294967295", "-1"),
    (["--image-size", "100000"], "--image-size", "from 8 to 1024 pixels", "100000"),
    (["--image-size", "0"], "--image-size", "from 8 to 1024 pixels", "0"),
    (["--epochs", "1000000"], "--epochs", "from 1 to 100000", "1000000"),
    (["--fine-tune-epochs", "0"], "--fine-tune-epochs", "from 1 to 100000", "0"),
    (["--batch-size", "0"], "--batch-size", "from 1 to 4096, or auto", "0"),
    (["--batch-size", "100000"], "--batch-size", "from 1 to 4096, or auto", "100000"),
    (["--augment-views", "1000000"], "--augment-views", "from 0 to 1000", "1000000"),
])
def test_absurd_train_options_are_usage_errors_before_any_work(tmp_path, image_folder, args, option, allowed,
                                                               received):
    result = run("train", image_folder, "-o", tmp_path / "run", *TINY, *args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output
    assert allowed in result.output and f"received {received}." in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["extract"], ["features", "export", "-o", "f.npz"], ["lr-find", "-o", "p.png"],
                                     ["features", "plot", "-o", "p.png"]])
def test_every_command_bounds_seed_image_size_and_batch_size(tmp_path, image_folder, command):
    for args, option in ((["--seed", str(2**40)], "--seed"), (["--image-size", "100000"], "--image-size"),
                         (["--batch-size", "10000000"], "--batch-size")):
        result = run(*command, image_folder, *args)
        assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output


@pytest.mark.parametrize("key, value, option", [
    ("seed", 2**32, "--seed"), ("seed", -5, "--seed"), ("image_size", 100000, "--image-size"),
    ("epochs", 10**9, "--epochs"), ("fine_tune_epochs", 200000, "--fine-tune-epochs"),
    ("batch_size", 100000, "--batch-size"), ("augment_views", 5000, "--augment-views"),
    ("warmup_epochs", "1.0e+300", "--warmup-epochs"),  # YAML 1.1 floats need the dot
])
def test_recipe_settings_get_the_same_bounds_as_the_options(tmp_path, image_folder, key, value, option):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"{key}: {value}\nbackbone: tiny_test\nweights: none\n")
    result = run("train", "--config", recipe, image_folder, "-o", tmp_path / "run", "-q")
    assert result.exit_code == 2, result.output
    assert f"Invalid {option}: expected" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_features_export_recipe_bounds():
    from transferkit.config import FeatureExportConfig

    with pytest.raises(InputError, match=r"`seed` must be an integer from 0 to 4294967295 .*Received: seed=8589934592"):
        config_from_dict({"image_dir": "p", "output": "f.npz", "seed": 2**33}, FeatureExportConfig)
    with pytest.raises(InputError, match=r"`image_size` must be an integer from 8 to 1024.*Received: image_size=4096"):
        config_from_dict({"image_dir": "p", "output": "f.npz", "image_size": 4096}, FeatureExportConfig)


def test_the_largest_allowed_values_are_accepted():
    config = TrainConfig("p", "r", seed=2**32 - 1, image_size=1024, epochs=100_000, batch_size=4096)
    assert config.seed == 2**32 - 1


# ------------------------------------------------------------------------ a class that cannot be split


def _small_class_folder(root):
    """Two classes of 12 images and classes of 1 and 2 images, whose hash falls out of train for some seed."""
    make_image_folder(root, num_classes=2, images_per_class=12, image_size=16)
    make_image_folder(root, num_classes=1, images_per_class=1, image_size=16, class_prefix="one_")
    make_image_folder(root, num_classes=1, images_per_class=2, image_size=16, class_prefix="two_", seed=1)
    return root


def test_a_small_class_is_treated_the_same_whatever_the_seed(tmp_path):
    root = _small_class_folder(tmp_path / "photos")
    small = ["one_0/0000.png", "two_0/0000.png", "two_0/0001.png"]
    # The plain hash holds a whole small class out of train for some seed in 0..5: the case being tested.
    assert any(all(stable_fraction(p, seed) < 0.3 for p in small[1:]) or stable_fraction(small[0], seed) < 0.3
               for seed in range(6))
    outcomes = set()
    for seed in range(6):
        folder = scan_folder(root, seed=seed)
        roles = assign_roles(folder, np.ones(len(folder.paths), dtype=bool), seed)  # raises when refused
        by_path = dict(zip(folder.paths, roles, strict=True))
        outcomes.add(tuple(by_path[p] for p in small))
        for k in (0, 1):  # the big classes still reach every split
            assert {r for r, label in zip(roles, folder.labels, strict=True) if label == k} == set(SPLITS)
    assert outcomes == {("train", "train", "train")}


def test_early_stopping_images_carved_from_train_leave_every_class_some_training_images(tmp_path):
    root = tmp_path / "photos"
    make_image_folder(root / "train", num_classes=2, images_per_class=10, image_size=16)
    make_image_folder(root / "test", num_classes=2, images_per_class=2, image_size=16)
    make_image_folder(root / "train", num_classes=1, images_per_class=1, image_size=16, class_prefix="rare_")
    make_image_folder(root / "test", num_classes=1, images_per_class=1, image_size=16, class_prefix="rare_")
    folder = scan_folder(root)
    assert folder.split_source == "folders"
    for seed in range(20):  # the old rule (a stable 15% of train/) held rare_0's only image out for some seeds
        roles = assign_roles(folder, np.ones(len(folder.paths), dtype=bool), seed)
        assert roles[folder.paths.index("train/rare_0/0000.png")] == "train"
        assert "val" in set(roles)


def test_hash_split_rule_depends_on_the_count_only():
    for seed in range(50):
        paths = ("a/1.png", "a/2.png", "b/1.png", "c/1.png", "c/2.png", "c/3.png")
        splits = hash_splits(paths, np.array([0, 0, 1, 2, 2, 2]), seed, 0.15, 0.15)
        assert splits[:3] == ("train",) * 3
        assert sorted(splits[3:]) == ["test", "train", "val"]


# ----------------------------------------------------------------------------------------- class names


@pytest.mark.parametrize("name", ["two\nlines", "tab\there", "cr\r", "nel\x85", "sep\u2028x", "esc\x1b[31m"])
def test_a_class_name_labels_txt_cannot_hold_is_refused_at_scan_time(tmp_path, name):
    root = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=3, image_size=16)
    make_image_folder(root / "x", num_classes=1, images_per_class=3, image_size=16)
    (root / "x" / "class_0").rename(root / name)
    with pytest.raises(DataError, match=r"has a control character in its name .*Rename the folder"):
        scan_folder(root)
    result = run("train", root, "-o", tmp_path / "run", *TINY)
    assert result.exit_code == 2 and "control character" in result.output, result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("first, second", [
    (unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")),
    (unicodedata.normalize("NFC", "Éclair"), unicodedata.normalize("NFD", "Éclair")),
])
def test_class_names_equal_but_for_unicode_normalisation_are_refused_with_both_names(tmp_path, first, second):
    root = tmp_path / "photos"
    for name in (first, second, "dog"):
        make_image_folder(root / "x", num_classes=1, images_per_class=3, image_size=16)
        (root / "x" / "class_0").rename(root / name)
    with pytest.raises(DataError, match="differ only by Unicode normalisation") as caught:
        scan_folder(root)
    message = str(caught.value)
    assert repr(first) in message and repr(second) in message and "rename one" in message
    assert ascii(first) in message and ascii(second) in message  # the difference made visible


def test_class_names_equal_but_for_case_are_two_classes_with_a_warning(tmp_path):
    """A letters set has 'A' and 'a' on Linux: kept apart, and warned about (one folder on macOS)."""
    from transferkit.data.checks import dataset_warnings

    root = tmp_path / "photos"
    for name in ("A", "a", "b"):
        make_image_folder(root / "x", num_classes=1, images_per_class=3, image_size=16)
        (root / "x" / "class_0").rename(root / name)
    (root / "x").rmdir()
    folder = scan_folder(root)
    assert folder.class_names == ("A", "a", "b")
    assert [m for m in dataset_warnings(folder) if "differ only by case" in m] == [
        "Classes 'A' and 'a' differ only by case: they are two classes here, but one folder on macOS and Windows, "
        "where this dataset cannot be copied whole. If they are one class, merge their folders."]


def test_split_folders_with_one_class_spelled_two_ways_are_warned_and_refused_by_train(tmp_path):
    from transferkit.config import TrainConfig
    from transferkit.data.checks import dataset_warnings
    from transferkit.training.run import check_inputs

    root = tmp_path / "photos"
    make_image_folder(root / "train", num_classes=2, images_per_class=4, image_size=16)
    make_image_folder(root / "val", num_classes=2, images_per_class=2, image_size=16, class_prefix="CLASS_")
    assert any("'CLASS_0' and 'class_0' differ only by case" in m for m in dataset_warnings(scan_folder(root)))
    config = TrainConfig(str(root), str(tmp_path / "run"), backbone="tiny_test", weights="none")
    with pytest.raises(DataError, match="No training images for class.*CLASS_0"):
        check_inputs(config)


def test_tfds_class_names_become_names_a_scan_accepts():
    from transferkit.data.scan import check_class_names
    from transferkit.data.tfds import class_folder_names

    names = class_folder_names(["line\nbreak", "tab\tbed", "caf" + "e\u0301", "ok"])
    assert names == ["line_break", "tab_bed", "café", "ok"]
    check_class_names(names)
    with pytest.raises(DataError, match="same folder name"):
        class_folder_names(["Cat", "cat"])


# ------------------------------------------------------------------------------------------ tfds offline


def test_tfds_offline_fails_at_once_without_tfds_retrying(tmp_path, monkeypatch):
    """No network: the probe fails, so TFDS's download (3.5 minutes of retries) never starts.

    A stand-in for TFDS's builder keeps TensorFlow out of this test; test_tfds.py runs the real one.
    """
    from transferkit.data.tfds import TfdsName, _download

    class Builder:
        data_dir = str(tmp_path / "tensorflow_datasets" / "tf_flowers" / "3.0.1")
        info = type("Info", (), {"full_name": "tf_flowers/3.0.1"})()
        url_infos = {"http://download.tensorflow.org/example_images/flower_photos.tgz": None}

        def download_and_prepare(self):
            raise AssertionError("TFDS's download started although the network is down")

    def no_network(address, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known (test)")

    monkeypatch.setattr(socket, "create_connection", no_network)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DataError) as caught:
        _download(Builder(), TfdsName("tf_flowers"), download=True)
    message = str(caught.value)
    assert f"TensorFlow Datasets 'tf_flowers' is not prepared in '{tmp_path / 'tensorflow_datasets'}'" in message
    assert "could not be downloaded (no network: cannot reach download.tensorflow.org:80: " in message
    assert "Name or service not known (test)" in message and "tfds build tf_flowers" in message


def test_the_network_probe_goes_through_the_proxy_and_reports_success(monkeypatch):
    from transferkit.data.tfds import _unreachable

    probed = []

    class Connection:
        def close(self):
            pass

    def connect(address, timeout=None):
        probed.append((address, timeout))
        return Connection()

    monkeypatch.setattr(socket, "create_connection", connect)
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert _unreachable(["https://storage.googleapis.com/a.gz", "https://storage.googleapis.com/b.gz",
                         "http://download.tensorflow.org/x.tgz"], timeout=1.0) is None
    assert sorted(address for address, _ in probed) == [("download.tensorflow.org", 80), ("proxy.example", 3128)]
    assert all(timeout == 1.0 for _, timeout in probed)
