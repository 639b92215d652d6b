"""Photos without classes: extract, features export and features plot read them; train refuses them."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from transferkit.data.scan import scan_folder
from transferkit.errors import ArgumentError, DataError
from transferkit.testing import make_image_folder, run_cli

TINY = ["--backbone", "tiny_test", "--weights", "none", "--image-size", "32", "--batch-size", "8", "-q"]


@pytest.fixture
def labelled_and_flat(tmp_path):
    """A class-per-folder set and the same files (same bytes) in one flat folder, renamed."""
    labelled = make_image_folder(tmp_path / "labelled", num_classes=2, images_per_class=5, formats=("png", "jpg"))
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(labelled.rglob("*.*")):
        shutil.copyfile(path, flat / f"{path.parent.name}-{path.name}")
    return labelled, flat


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_a_flat_folder_and_a_single_sub_folder_scan_as_unlabelled_photos(labelled_and_flat, tmp_path):
    _, flat = labelled_and_flat
    (flat / "notes.txt").write_text("not an image")
    (flat / "broken.jpg").write_bytes(b"not a jpeg")
    folder = scan_folder(flat, labels="optional")
    assert not folder.labelled and folder.class_names == () and folder.split_source == "none"
    assert len(folder.paths) == 10 and set(folder.labels.tolist()) == {-1} and set(folder.splits) == {""}
    assert folder.skipped == (("broken.jpg", folder.skipped[0][1]),) and folder.num_ignored == 1

    nested = tmp_path / "one"
    shutil.copytree(flat, nested / "all" / "2024")
    deep = scan_folder(nested, labels="optional")
    assert not deep.labelled and deep.paths[0].startswith("all/2024/") and len(deep.paths) == 10


def test_labels_required_is_the_default_and_says_which_commands_take_unlabelled_photos(labelled_and_flat):
    labelled, flat = labelled_and_flat
    with pytest.raises(DataError, match=r"has no class sub-folders.*'transferkit extract', 'features export'"):
        scan_folder(flat)
    assert scan_folder(labelled, labels="optional").labelled  # two classes: labelled as ever
    with pytest.raises(ArgumentError, match=r"`labels` must be 'required' or 'optional'\. Received: labels='maybe'"):
        scan_folder(labelled, labels="maybe")


def test_empty_unlabelled_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match=r"holds no readable images \(allowed: "):
        scan_folder(tmp_path / "empty", labels="optional")


def test_flat_folder_features_are_the_labelled_runs_vectors_from_the_same_cache_keys(labelled_and_flat, tmp_path):
    labelled, flat = labelled_and_flat
    cache = ["--cache-dir", tmp_path / "cache"]
    first = run_cli("extract", labelled, *TINY, *cache)
    assert first.exit_code == 0, first.output
    again = run_cli("extract", flat, *TINY, *cache)
    assert again.exit_code == 0, again.output
    assert "computed: 0; already cached: 10" in again.output and "Unlabelled photos" in again.output

    for name, folder in (("labelled", labelled), ("flat", flat)):
        result = run_cli("features", "export", folder, "-o", tmp_path / f"{name}.csv", *TINY, *cache)
        assert result.exit_code == 0, result.output
    with_labels, without = _rows(tmp_path / "labelled.csv"), _rows(tmp_path / "flat.csv")
    assert list(with_labels[0])[:4] == ["path", "label", "class_name", "split"]
    assert list(without[0])[:2] == ["path", "f0"], "no label, class or split is invented"
    vector = {row["path"].replace("/", "-"): [row[k] for k in row if k.startswith("f")] for row in with_labels}
    assert {row["path"]: [row[k] for k in row if k.startswith("f")] for row in without} == vector

    npz = run_cli("features", "export", flat, "-o", tmp_path / "flat.npz", *TINY, *cache)
    assert npz.exit_code == 0 and "Unlabelled photos" in npz.output and "Wrote 10 rows" in npz.output
    with np.load(tmp_path / "flat.npz") as data:
        assert sorted(data.files) == ["features", "paths"]
        assert data["features"].shape[0] == 10


def test_features_plot_draws_unlabelled_photos_in_one_colour(labelled_and_flat, tmp_path):
    _, flat = labelled_and_flat
    result = run_cli("features", "plot", flat, "-o", tmp_path / "map.png", *TINY, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert "pca: 10 of 10 images; unlabelled" in result.output
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_commands_that_need_labels_refuse_unlabelled_photos_and_say_what_to_add(labelled_and_flat, tmp_path):
    _, flat = labelled_and_flat
    result = run_cli("train", flat, "-o", tmp_path / "run", *TINY)
    assert result.exit_code == 2 and "no class sub-folders" in result.output and "Traceback" not in result.output
    assert "photos/cat/*.jpg" in result.output and not (tmp_path / "run").exists()
    single = tmp_path / "single"
    shutil.copytree(flat, single / "cats")
    refused = run_cli("compare", single, "-o", tmp_path / "cmp", *TINY)
    assert refused.exit_code == 2 and "needs at least 2 classes" in refused.output
