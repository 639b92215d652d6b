"""Robustness, input: a folder holding every awkward kind of file is read, refused and ignored exactly right.

The folder comes from :func:`transferkit.testing.make_awkward_folder`, which also says what must happen
to each file; these tests hold the scanner, the decoder, ``extract``, ``features export`` and ``train``
to it, plus ``--strict`` and the dataset-level warnings.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageFile

from transferkit.data.checks import check_strict, dataset_warnings
from transferkit.data.scan import load_image, scan_folder
from transferkit.errors import DataError
from transferkit.files import display_name, open_text
from transferkit.testing import make_awkward_folder, make_image_folder
from transferkit.testing import run_cli as run

TINY = ["--backbone", "tiny_test", "--weights", "none", "--image-size", "32", "-q"]


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    return make_awkward_folder(tmp_path_factory.mktemp("awkward") / "photos")



def _skipped_lines(output: str) -> list[str]:
    return [line.removeprefix("Skipped ") for line in output.splitlines() if line.startswith("Skipped ")]


def _shown(skipped: dict[str, str]) -> dict[str, str]:
    """Skipped files as the console shows them (bytes of names that are not UTF-8 as \\xNN)."""
    return {display_name(path): reason for path, reason in skipped.items()}


# ---------------------------------------------------------------------------------------------- scan


def test_scan_uses_skips_and_ignores_exactly_the_right_files(awkward):
    folder = scan_folder(awkward.root)

    # The decode-time failure (truncated pixels) has a readable header: the scan keeps it for now.
    assert sorted(folder.paths) == sorted([*awkward.used, *awkward.skipped_at_decode])
    assert [path for path, _ in folder.skipped] == sorted(awkward.skipped_at_scan), "each skipped file once"
    for path, reason in folder.skipped:
        assert reason.startswith(awkward.skipped_at_scan[path]), (path, reason)
    assert folder.num_ignored == awkward.num_ignored
    assert folder.class_names == ("cat", "dog")


def test_symlink_loops_neither_hang_nor_leak_images_into_another_class(awkward):
    folder = scan_folder(awkward.root)
    # dog/nested/up points back at the image folder: following it would label every cat image "dog".
    assert not [p for p in folder.paths if "/up/" in p or "/loop/" in p]
    assert sum(p.startswith("cat/") for p in folder.paths) == sum(p.startswith("cat/") for p in awkward.used) + 1


def test_a_class_folder_linked_to_the_image_folder_is_a_loop_not_a_class(tmp_path):
    root = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=3)
    (root / "everything").symlink_to(root, target_is_directory=True)
    folder = scan_folder(root)
    assert folder.class_names == ("class_0", "class_1") and len(folder.paths) == 6
    assert folder.num_ignored == 1


def test_links_to_folders_elsewhere_are_followed(tmp_path):
    root = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=3)
    elsewhere = make_image_folder(tmp_path / "elsewhere", num_classes=1, images_per_class=2, class_prefix="more_")
    (root / "class_2").symlink_to(elsewhere / "more_0", target_is_directory=True)
    (root / "class_0" / "extra").symlink_to(elsewhere / "more_0", target_is_directory=True)
    folder = scan_folder(root)
    assert folder.counts()["train"] and len(folder.paths) == 10 and folder.num_ignored == 0
    assert {"class_2/0000.png", "class_0/extra/0001.png"} <= set(folder.paths)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: the OS ignores file permissions, so a mode-000 file stays readable "
                           "(test_data.py simulates the refusal instead)")
def test_unreadable_file_is_skipped_as_permission_denied(awkward):
    assert awkward.permissions_enforced
    assert dict(scan_folder(awkward.root).skipped)["cat/locked.jpg"] == "permission denied"


# -------------------------------------------------------------------------------------------- decode


def _decode(awkward, rel: str, size: int = 32) -> np.ndarray:
    return load_image(awkward.root / rel, size).astype(int)


def test_every_readable_file_decodes_to_rgb(awkward):
    for rel in awkward.used:
        if rel == "cat/locked.jpg":
            continue  # readable only as root
        arr = load_image(awkward.root / rel, 32)
        assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8, rel


def test_exif_orientation_is_applied(awkward):
    stored = Image.open(awkward.root / "cat/exif_rotated.jpg")
    assert stored.size == (48, 24), "stored landscape, left half red"
    arr = _decode(awkward, "cat/exif_rotated.jpg")
    # Orientation 6 turns it to portrait: the left (red) half is now on top, the blue half at the bottom.
    assert arr[4, 16, 0] > 200 and arr[4, 16, 2] < 60
    assert arr[27, 16, 2] > 200 and arr[27, 16, 0] < 60
    assert abs(arr[4, 4, 0] - arr[4, 27, 0]) < 30, "top row is one colour: rotated, not mirrored"


def test_modes_and_formats_become_the_documented_rgb(awkward):
    r, g, b = _decode(awkward, "cat/cmyk.jpg")[16, 16]
    assert r > 200 and g < 50 and b < 50, "CMYK (0, 255, 255, 0) is red"
    assert _decode(awkward, "cat/grayscale.png")[16, 16].tolist() == [90, 90, 90]
    assert _decode(awkward, "cat/palette.png")[16, 16].tolist() == [0, 128, 255]
    first = _decode(awkward, "cat/animated.gif")[16, 16]
    assert first[0] > 200 and first[2] < 50, "first frame (red), not the second (blue)"
    alpha = _decode(awkward, "cat/alpha.png")
    assert alpha[16, 2].tolist() == [255, 0, 0] and alpha[16, 29].tolist() == [255, 255, 255], \
        "transparent pixels are composited on white"
    assert _decode(awkward, "cat/deep_16bit.png")[16, 16].tolist() == [round(40000 / 65535 * 255)] * 3
    assert np.abs(_decode(awkward, "cat/photo.webp")[16, 16] - [200, 120, 40]).max() <= 6
    assert _decode(awkward, "dog/one_pixel.png")[0, 0].tolist() == [10, 200, 10]
    assert _decode(awkward, "dog/very_wide.png")[16, 16].tolist() == [10, 10, 200]
    assert _decode(awkward, "dog/scan.tif")[16, 16].tolist() == [90, 20, 160]
    assert _decode(awkward, "dog/café 猫 ñandú.png")[16, 16].tolist() == [200, 60, 60]


def test_a_large_photo_is_decoded_at_reduced_scale(awkward, monkeypatch):
    sizes = []
    real_resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize",
                        lambda self, *a, **k: sizes.append(self.size) or real_resize(self, *a, **k))
    arr = load_image(awkward.root / "dog/large_photo.jpg", 32)
    assert Image.open(awkward.root / "dog/large_photo.jpg").size == (4800, 3200)
    assert sizes == [(600, 400)], "JPEG draft mode decoded 1/8 of each side (still >= 32), not 15 megapixels"
    assert arr[16, 0, 0] < arr[16, 31, 0] or arr[0, 16, 0] < arr[31, 16, 0], "the gradient survived"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_refused_files_raise_value_error_and_bombs_are_never_decoded(awkward, monkeypatch):
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    for rel in ("cat/bomb.png", "dog/huge_bomb.png"):
        with pytest.raises(ValueError, match=r"decompression-bomb limit"):
            load_image(awkward.root / rel, 32)
    assert loads == [], "the pixel data of a bomb is never read"
    with pytest.raises(ValueError, match=r"Cannot decode image '.*truncated\.jpg': image file is truncated"):
        load_image(awkward.root / "cat/truncated.jpg", 32)
    for rel in ("cat/empty.jpg", "dog/page.png", "dog/notes.jpg"):
        with pytest.raises(ValueError, match=r"Cannot decode image"):
            load_image(awkward.root / rel, 32)


# ------------------------------------------------------------------------------------------- the CLI


def test_extract_lists_each_skipped_file_once_and_counts_the_ignored(awkward, tmp_path):
    result = run("extract", awkward.root, *TINY, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    lines = _skipped_lines(result.output)
    assert sorted(line.split(": ", 1)[0] for line in lines) == sorted(_shown(awkward.skipped)), "each once, no other"
    for line in lines:
        path, reason = line.split(": ", 1)
        assert reason.startswith(_shown(awkward.skipped)[path]), line
    seen = len(awkward.used) + len(awkward.skipped)
    assert (f"Images seen: {seen}; computed: {len(awkward.used)}; already cached: 0; "
            f"skipped: {len(awkward.skipped)}; ignored: {awkward.num_ignored} ") in result.output


def test_train_uses_exactly_the_readable_files_and_writes_skipped_csv(awkward, tmp_path):
    run_dir = tmp_path / "run"
    result = run("train", awkward.root, "-o", run_dir, *TINY, "--epochs", "3", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output

    lines = _skipped_lines(result.output)
    assert sorted(line.split(": ", 1)[0] for line in lines) == sorted(_shown(awkward.skipped)), "each listed once"
    with open_text(run_dir / "skipped.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["path"] for row in rows) == sorted(awkward.skipped)
    for row in rows:
        assert row["reason"].startswith(awkward.skipped[row["path"]]), row
    with open_text(run_dir / "splits.csv") as handle:
        used = sorted(row["path"] for row in csv.DictReader(handle))
    assert used == list(awkward.used), "every readable file used, non-ASCII names intact"
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["num_ignored"] == awkward.num_ignored
    assert f"{len(awkward.skipped_at_scan)} skipped, {awkward.num_ignored} ignored" in result.output


# ------------------------------------------------------------------------------------------ --strict


def test_strict_fails_on_scan_skips_before_any_tensorflow_work(awkward, tmp_path):
    for command in (["extract", awkward.root], ["features", "export", awkward.root, "-o", tmp_path / "f.npz"]):
        result = run(*command, *TINY, "--cache-dir", tmp_path / "cache", "--strict")
        assert result.exit_code == 2, result.output
        assert f"{len(awkward.skipped_at_scan)} files could not be used and option --strict is on" in result.output
        for path in awkward.skipped_at_scan:
            assert f"  {display_name(path)}: " in result.output
        assert "run without --strict" in result.output
    assert not (tmp_path / "cache").exists(), "refused before the cache (or TensorFlow) was touched"
    assert not (tmp_path / "f.npz").exists()


def test_strict_fails_on_an_undecodable_file_found_by_extraction_and_keeps_the_rest(awkward, tmp_path):
    root = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=4)
    (root / "class_0" / "truncated.jpg").write_bytes((awkward.root / "cat/truncated.jpg").read_bytes())
    args = ["extract", root, *TINY, "--cache-dir", tmp_path / "cache"]
    strict = run(*args, "--strict")
    assert strict.exit_code == 2
    assert "1 file could not be used and option --strict is on:\n  class_0/truncated.jpg: cannot decode image: " \
           "image file is truncated" in strict.output
    again = run(*args)
    assert again.exit_code == 0 and "computed: 0; already cached: 8; skipped: 1;" in again.output, \
        "the 8 good vectors were kept"



def test_train_strict_fails_on_scan_skips_before_any_tensorflow_work(awkward, tmp_path):
    result = run("train", awkward.root, "-o", tmp_path / "run", *TINY, "--epochs", "2",
                 "--cache-dir", tmp_path / "cache", "--strict")
    assert result.exit_code == 2, result.output
    assert f"{len(awkward.skipped_at_scan)} files could not be used and option --strict is on" in result.output
    assert not (tmp_path / "cache").exists(), "refused before extraction"


def test_train_strict_fails_on_an_undecodable_file_found_by_extraction(awkward, tmp_path):
    root = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=10)
    (root / "class_0" / "truncated.jpg").write_bytes((awkward.root / "cat/truncated.jpg").read_bytes())
    result = run("train", root, "-o", tmp_path / "run", *TINY, "--epochs", "2", "--cache-dir", tmp_path / "cache",
                 "--strict")
    assert result.exit_code == 2, result.output
    assert "1 file could not be used and option --strict is on:\n  class_0/truncated.jpg: cannot decode image" \
           in result.output
    assert not (tmp_path / "run" / "model.keras").exists()


def test_train_warns_about_a_split_missing_a_class_and_duplicates(tmp_path):
    root = tmp_path / "photos"
    make_image_folder(root / "train", num_classes=3, images_per_class=8)
    make_image_folder(root / "val", num_classes=2, images_per_class=3, seed=1)
    (root / "val/class_0/copy.png").write_bytes((root / "train/class_0/0001.png").read_bytes())
    result = run("train", root, "-o", tmp_path / "run", *TINY, "--epochs", "2", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert "has no images of class(es) 'class_2'" in result.output
    assert "Add images of 'class_2' to val/" in result.output
    assert "1 image is in more than one split (same bytes)" in result.output


def test_check_strict():
    check_strict([])
    with pytest.raises(DataError, match=r"^2 files could not be used and option --strict is on:\n  a.jpg: empty "
                                        r"file\n  b.png: permission denied\nFix or remove"):
        check_strict([("a.jpg", "empty file"), ("b.png", "permission denied")])


# ---------------------------------------------------------------------------------- dataset problems


def test_a_split_folder_missing_a_class_is_reported_with_the_fix(tmp_path):
    root = tmp_path / "photos"
    make_image_folder(root / "train", num_classes=3, images_per_class=4)
    make_image_folder(root / "val", num_classes=2, images_per_class=2)
    messages = dataset_warnings(scan_folder(root))
    assert messages == ["The val split has no images of class(es) 'class_2', so their val accuracy cannot be "
                        "measured. Add images of 'class_2' to val/."]


def test_a_class_too_small_for_the_hash_split_is_reported(tmp_path):
    root = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=10)
    make_image_folder(root, num_classes=1, images_per_class=1, class_prefix="rare_")
    messages = dataset_warnings(scan_folder(root, seed=0))
    assert messages and all("'rare_0'" in m and "at least 3 images" in m for m in messages)
    assert dataset_warnings(scan_folder(make_image_folder(tmp_path / "fine", images_per_class=10))) == []


def test_duplicates_across_splits_and_classes_are_found_by_content(tmp_path):
    from transferkit.cache import FileHashes

    root = tmp_path / "photos"
    make_image_folder(root / "train", num_classes=2, images_per_class=6)
    make_image_folder(root / "test", num_classes=2, images_per_class=2, seed=1)
    # A renamed copy of a training image in test/, and the same bytes filed under both classes.
    (root / "test/class_0/copy of 0003.png").write_bytes((root / "train/class_0/0003.png").read_bytes())
    (root / "train/class_1/misfiled.png").write_bytes((root / "train/class_0/0005.png").read_bytes())
    folder = scan_folder(root)
    hashes = FileHashes(tmp_path / "cache").hashes([folder.abs_path(p) for p in folder.paths])

    messages = dataset_warnings(folder, hashes)

    assert messages == [
        "1 image is in more than one split (same bytes), so the test and validation scores are optimistic: "
        "'test/class_0/copy of 0003.png' = 'train/class_0/0003.png'. Delete the copies, keeping each image once "
        "(or in one split only).",
        "1 image is in more than one class (same bytes), so their labels contradict each other: "
        "'train/class_0/0005.png' = 'train/class_1/misfiled.png'. Keep each image only in the folder of its "
        "class.",
    ]


def test_features_export_warns_about_duplicates_across_splits(tmp_path):
    from transferkit.data.scan import stable_fraction

    root = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=12)
    # A copy whose name the hash split sends to val or test, while the original is in train.
    folder = scan_folder(root)
    original = next(p for p, s in zip(folder.paths, folder.splits, strict=True)
                    if s == "train" and p.startswith("class_0/"))
    name = next(f"copy{k}.png" for k in range(100) if stable_fraction(f"class_0/copy{k}.png", 0) < 0.3)
    (root / "class_0" / name).write_bytes((root / original).read_bytes())
    result = run("features", "export", root, "-o", tmp_path / "f.npz", *TINY, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert "1 image is in more than one split (same bytes)" in result.output and "Delete the copies" in result.output
