
"""TensorFlow Datasets inputs (``tfds:NAME[:SPLIT]``), offline: TFDS's own mock data with real metadata.

``tfds.testing.mock_data(policy=USE_FILES)`` reads a dataset's real ``dataset_info.json`` (split names,
class names) from a folder and generates random examples of the dataset's real features, so the
whole path runs: builder, splits, ``as_dataset`` with encoded image bytes, the folder written out,
then train / extract / features export on it with the tiny backbone.
"""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import yaml

from transferkit.data.tfds import MANIFEST, TfdsName, class_folder_names, parse_tfds_name, prepare_tfds
from transferkit.errors import DataError, InputError
from transferkit.testing import run_cli

tfds = pytest.importorskip("tensorflow_datasets")

TINY = ["--backbone", "tiny_test", "--weights", "none", "--image-size", "32", "-q"]
FLOWERS = ("dandelion", "daisy", "tulips", "sunflowers", "roses")  # TFDS's label order, not sorted


run = partial(run_cli, catch_exceptions=True)  # the result holds any exception


@pytest.fixture(scope="module")
def tfds_metadata(tmp_path_factory):
    """A TFDS data folder holding only the real metadata of tf_flowers (train) and mnist (train, test)."""
    from tensorflow_datasets.core import splits as splits_lib

    root = tmp_path_factory.mktemp("tfds-metadata")
    for name, splits in (("tf_flowers", {"train": 3670}), ("mnist", {"train": 60000, "test": 10000})):
        builder = tfds.builder(name, data_dir=str(root))
        builder.info.set_splits(splits_lib.SplitDict(
            [splits_lib.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=None)
             for s, n in splits.items()]))
        (root / builder.info.full_name).mkdir(parents=True)
        builder.info.write_to_directory(builder.data_dir)
    return root


@pytest.fixture
def mock_tfds(tfds_metadata):
    def mock(num_examples: int):
        return tfds.testing.mock_data(num_examples=num_examples, data_dir=str(tfds_metadata),
                                      policy=tfds.testing.MockPolicy.USE_FILES)

    return mock


def test_tfds_names_parse_without_tensorflow():
    assert parse_tfds_name("tfds:tf_flowers") == TfdsName("tf_flowers")
    assert parse_tfds_name("tfds:mnist:test") == TfdsName("mnist", None, "test")
    assert parse_tfds_name("tfds:cifar10:3.0.2:train[:10%]") == TfdsName("cifar10", "3.0.2", "train[:10%]")
    assert str(parse_tfds_name("tfds:imagenet2012_subset/1pct:train")) == "tfds:imagenet2012_subset/1pct:train"
    for bad in ("tfds:", "tfds:Flowers", "tfds:mnist:", "tfds:mnist:test:extra"):
        with pytest.raises(InputError, match="expected tfds:NAME"):
            parse_tfds_name(bad)
    assert class_folder_names(["cat", "a/b", ".x"]) == ["cat", "a_b", "_x"]
    with pytest.raises(DataError, match="same folder name"):
        class_folder_names(["a/b", "a_b"])


def test_tf_flowers_trains_and_exports_through_the_cli(mock_tfds, tmp_path, isolated_homes):
    with mock_tfds(40):
        trained = run("train", "tfds:tf_flowers", "-o", tmp_path / "run", *TINY, "--epochs", "3")
        assert trained.exit_code == 0, trained.output
        assert "writing its images" in trained.output
        exported = run("features", "export", "tfds:tf_flowers", "-o", tmp_path / "f.npz", *TINY)
        assert exported.exit_code == 0, exported.output
        assert "reusing the images" in exported.output and "writing its images" not in exported.output
        extracted = run("extract", "tfds:tf_flowers", *TINY)
        evaluated = run("evaluate", tmp_path / "run", "tfds:tf_flowers:train", "-q")

    prepared = isolated_homes / "data" / "tfds" / "tf_flowers" / "3.0.1" / "train"
    manifest = json.loads((prepared / MANIFEST).read_text())
    folder = prepared / "images"
    counts = manifest["counts"][""]
    assert sum(counts.values()) == 40 == manifest["num_images"]
    present = [name for name in FLOWERS if counts[name]]
    assert len(present) >= 4  # 40 random labels over 5 classes

    run_dir = tmp_path / "run"
    assert (run_dir / "labels.txt").read_text().split() == present, "TFDS's label order, not sorted"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["image_dir"] == str(folder.resolve()) and metrics["split_source"] == "hash"
    assert sum(n for split in metrics["counts"].values() for n in split.values()) == 40
    assert metrics["counts"]["test"] and metrics["counts"]["val"], "transferkit's seeded split: train, val, test"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["image_dir"] == "tfds:tf_flowers"
    # Files are named by TFDS's example id, so the hash split is stable from run to run.
    assert all(p.name.startswith("tf_flowers-train.tfrecord-") and p.suffix == ".png"
               for p in folder.glob("*/*") if p.is_file())

    with np.load(tmp_path / "f.npz") as data:
        assert data["class_names"].tolist() == present and data["features"].shape[0] == 40
        splits_csv = {row.split(",")[0]: row.split(",")[3] for row in (run_dir / "splits.csv").read_text().split()[1:]}
        exported_splits = dict(zip(data["paths"].tolist(), data["splits"].tolist(), strict=True))
    # train and export agree on the images (export gives the folder split; train re-labels nothing here)
    assert set(exported_splits) == set(splits_csv)
    assert extracted.exit_code == 0 and "computed: 0; already cached: 40" in extracted.output, extracted.output
    # tfds:NAME:SPLIT names the same TFDS split, so it shares the written folder
    assert evaluated.exit_code == 0 and "(40 images)" in evaluated.output, evaluated.output
    assert "reusing the images" in evaluated.output
    # export's parity check finds the run's test images in the written folder, not in "tfds:..."
    model_export = run("export", run_dir, "--format", "keras", "-o", tmp_path / "exported")
    assert model_export.exit_code == 0, model_export.output
    card = json.loads((tmp_path / "exported" / "model_card.json").read_text())
    assert card["parity"]["source"].startswith("test split of") and str(folder.resolve()) in card["parity"]["source"]


def test_mnist_keeps_tfds_train_and_test_splits(mock_tfds, tmp_path, isolated_homes):
    with mock_tfds(24):
        whole = prepare_tfds("tfds:mnist")
        test_only = prepare_tfds("tfds:mnist:test")
        again = prepare_tfds("tfds:mnist")
        exported = run("features", "export", "tfds:mnist", "-o", tmp_path / "f.csv", *TINY)
    assert exported.exit_code == 0, exported.output

    assert whole.root.parent.name == "splits-train-test" and {p.name for p in whole.root.iterdir()} == {"train", "test"}
    assert {split: sum(c.values()) for split, c in whole.counts.items()} == {"train": 24, "test": 24}
    assert set(whole.class_names) <= {str(d) for d in range(10)}
    assert whole.class_names == tuple(sorted(whole.class_names, key=int)), "TFDS's label order"
    assert test_only.root.parent.name == "test" and sum(test_only.counts[""].values()) == 24
    assert again.reused and not whole.reused and again.root == whole.root

    import csv

    with open(tmp_path / "f.csv") as handle:
        rows = list(csv.DictReader(handle))
    # MNIST's own test split is the test split; train's early-stopping share (val) comes from its train split,
    # exactly as `train` assigns them, not from a hash split of the whole pool.
    tested = {r["path"] for r in rows if r["split"] == "test"}
    assert tested == {r["path"] for r in rows if r["path"].startswith("test/")}
    assert sum(r["split"] == "test" for r in rows) == 24
    assert all(r["path"].startswith("train/") for r in rows if r["split"] in ("train", "val"))
    assert sum(r["split"] == "train" for r in rows) > sum(r["split"] == "val" for r in rows)


def test_a_damaged_folder_is_written_again_and_stale_partials_go(mock_tfds, tmp_path):
    with mock_tfds(12):
        first = prepare_tfds("tfds:tf_flowers", data_dir=tmp_path)
        stale = first.root.parent.with_name(f".{first.root.parent.name}.partial-999999999-dead")
        stale.mkdir()
        next(p for p in first.root.rglob("*.png")).unlink()  # someone deleted an image
        second = prepare_tfds("tfds:tf_flowers", data_dir=tmp_path)
        third = prepare_tfds("tfds:tf_flowers", data_dir=tmp_path)
    assert not second.reused and third.reused
    assert len(list(second.root.rglob("*.png"))) == 12
    assert not stale.exists(), "a killed writer's partial folder is removed"
    assert [p.name for p in tmp_path.joinpath("tfds", "tf_flowers", "3.0.1").iterdir()] == ["train"]


def test_a_split_the_dataset_lacks_is_named(mock_tfds, tmp_path):
    with mock_tfds(4), pytest.raises(InputError, match=r"has no split 'validation'; its splits: train\."):
        prepare_tfds("tfds:tf_flowers:validation", data_dir=tmp_path)
    with mock_tfds(4), pytest.raises(InputError, match=r"has no split 'valid'; its splits: train, test"):
        prepare_tfds("tfds:mnist:train[:50%]+valid", data_dir=tmp_path)


def test_an_unknown_dataset_suggests_the_nearest_name(tmp_path):
    result = run("extract", "tfds:tf_flower", *TINY)
    assert result.exit_code == 2, result.output
    assert "Unknown TensorFlow Datasets name 'tf_flower'" in result.output
    assert "Did you mean: tf_flowers" in result.output
    assert "Traceback" not in result.output


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No mock and no prepared data: TFDS's download fails as it does without a network.

    The quick network probe is told the hosts answer, so TFDS's own download runs and fails (that the
    probe fails fast is tested in test_trust_options.py).
    """
    import requests
    from tensorflow_datasets.core import dataset_builder

    def fail(self, *args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'download.tensorflow.org' (test: no network)")

    monkeypatch.setattr("transferkit.data.tfds._unreachable", lambda urls: None)
    monkeypatch.setattr(dataset_builder.DatasetBuilder, "download_and_prepare", fail)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tensorflow_datasets"))


def test_a_written_folder_is_reused_without_tfds_data(mock_tfds, tmp_path, request):
    with mock_tfds(8):
        first = prepare_tfds("tfds:tf_flowers", data_dir=tmp_path / "data")
    request.getfixturevalue("offline")  # TFDS's copy is gone: the written folder is enough
    again = prepare_tfds("tfds:tf_flowers", data_dir=tmp_path / "data")
    by_split = prepare_tfds("tfds:tf_flowers:train", data_dir=tmp_path / "data")
    assert again.reused and by_split.reused and again.root == by_split.root == first.root
    assert again.class_names == first.class_names


def test_a_dataset_that_is_not_prepared_fails_offline_with_how_to_prepare_it(tmp_path, offline):
    """No mock: the real builder finds no prepared data; the download fails as it does without a network."""
    result = run("train", "tfds:tf_flowers", "-o", tmp_path / "run", *TINY)
    assert result.exit_code == 2, result.output
    message = result.output
    assert f"TensorFlow Datasets 'tf_flowers' is not prepared in '{tmp_path / 'tensorflow_datasets'}'" in message
    assert "could not be downloaded (ConnectionError: Failed to resolve" in message
    assert "tfds build tf_flowers" in message and "TFDS_DATA_DIR" in message
    assert not (tmp_path / "run").exists() and "Traceback" not in message
    with pytest.raises(DataError, match="is not prepared in .*tfds build tf_flowers"):
        prepare_tfds("tfds:tf_flowers", data_dir=tmp_path, download=False)


def test_the_cli_refuses_a_malformed_tfds_name_before_any_work(tmp_path):
    result = run("features", "export", "tfds:Flowers", "-o", tmp_path / "f.npz", *TINY)
    assert result.exit_code == 2 and "expected tfds:NAME" in result.output
