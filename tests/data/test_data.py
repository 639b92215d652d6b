"""Tests for transferkit.data.scan (scan) and the modules it fronts: transferkit.data.splits (split, splits.csv) and
transferkit.data.images (decode, tf.data); and the synthetic folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferkit.data.scan import (
    IMAGE_EXTENSIONS,
    SPLITS,
    ImageFolder,
    image_dataset,
    load_image,
    read_splits_csv,
    scan_folder,
    write_splits_csv,
)
from transferkit.data.splits import hash_splits
from transferkit.errors import DataError, InputError
from transferkit.testing import make_image_folder


def _png(path: Path, color=(200, 30, 30), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "PNG")
    return path


def _save(path: Path, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (8, 8), (10, 120, 200))
    if fmt == "GIF":
        img = img.convert("P")
    img.save(path, fmt)
    return path


def _flat(root: Path, counts: dict[str, int]) -> Path:
    for name, n in counts.items():
        for i in range(n):
            _png(root / name / f"{i:03d}.png")
    return root


# ------------------------------------------------------------------------------------------ scanning


def test_import_does_not_load_tensorflow():
    code = "import sys, transferkit.data.scan, transferkit.testing; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"


def test_scan_finds_every_format_and_case_and_nested_files(tmp_path):
    root = tmp_path / "photos"
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF",
           ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
    assert set(fmt) == set(IMAGE_EXTENSIONS)
    for i, (ext, pil) in enumerate(fmt.items()):
        _save(root / "cat" / f"c{i}{ext}", pil)
        _save(root / "dog" / f"D{i}{ext.upper()}", pil)
    _save(root / "dog" / "2023" / "summer" / "deep.Jpg", "JPEG")

    folder = scan_folder(root)

    assert folder.class_names == ("cat", "dog")
    assert len(folder.paths) == 17
    assert "dog/2023/summer/deep.Jpg" in folder.paths
    assert list(folder.paths) == sorted(folder.paths)
    assert folder.labels.dtype == np.int64
    assert [folder.class_names[label] for label in folder.labels] == [p.split("/")[0] for p in folder.paths]
    assert folder.skipped == () and folder.num_ignored == 0
    assert folder.abs_path(folder.paths[0]) == root / folder.paths[0]
    with pytest.raises(ValueError):
        folder.labels[0] = 1  # read-only


def test_hidden_system_and_non_image_files_are_ignored_and_counted(tmp_path):
    root = _flat(tmp_path / "photos", {"cat": 2, "dog": 2})
    (root / ".DS_Store").write_bytes(b"x")              # 1
    (root / "README.txt").write_text("hi")               # 2 (loose file next to classes)
    (root / "cat" / "Thumbs.db").write_bytes(b"x")       # 3
    (root / "cat" / "desktop.ini").write_text("x")       # 4
    (root / "cat" / "notes.txt").write_text("x")         # 5
    (root / "cat" / "._000.png").write_bytes(b"junk")    # 6 (macOS resource fork)
    _png(root / "dog" / ".hidden" / "secret.png")        # 7 (hidden folder counts once)
    _png(root / "__MACOSX" / "cat" / "000.png")          # 8 (not a class)
    (root / ".git").mkdir()                              # 9

    folder = scan_folder(root)

    assert folder.class_names == ("cat", "dog")
    assert len(folder.paths) == 4
    assert folder.num_ignored == 9
    assert folder.skipped == ()


def test_empty_and_fake_images_are_skipped_with_reasons(tmp_path):
    root = _flat(tmp_path / "photos", {"cat": 3, "dog": 3})
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "page.jpg").write_text("<html><body>404 Not Found</body></html>")

    folder = scan_folder(root)

    assert len(folder.paths) == 6
    reasons = dict(folder.skipped)
    assert reasons["cat/empty.jpg"] == "empty file"
    assert reasons["dog/page.jpg"].startswith("not an image Pillow can read: ")


def test_unreadable_file_is_skipped_as_permission_denied(tmp_path, monkeypatch):
    root = _flat(tmp_path / "photos", {"cat": 2, "dog": 2})
    locked = _png(root / "cat" / "locked.png")
    real_open = os.open

    def deny(path, *args, **kwargs):  # chmod does not stop root, so simulate the OS refusing
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)  # what transferkit.data.images.open_image_file calls
    folder = scan_folder(root)
    assert dict(folder.skipped) == {"cat/locked.png": "permission denied"}
    assert len(folder.paths) == 4


def test_class_without_readable_images_is_an_error(tmp_path):
    root = _flat(tmp_path / "photos", {"dog": 2})
    (root / "cat").mkdir()
    (root / "cat" / "broken.jpg").write_bytes(b"")
    (root / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"Class folder '.*photos/cat' holds no readable images "
                                        r"\(allowed: \.jpg \.jpeg \.png \.bmp \.gif \.webp \.tif \.tiff\)"):
        scan_folder(root)


def test_single_class_is_an_error(tmp_path):
    root = _flat(tmp_path / "photos", {"cat": 3})
    with pytest.raises(DataError, match=r"at least 2 classes.*found only 'cat'"):
        scan_folder(root)


def test_missing_root_file_root_and_no_class_folders(tmp_path):
    with pytest.raises(DataError, match=r"'.*nowhere' does not exist"):
        scan_folder(tmp_path / "nowhere")
    file_root = _png(tmp_path / "one.png")
    with pytest.raises(DataError, match=r"is not a folder"):
        scan_folder(file_root)
    flat = tmp_path / "flat"
    _png(flat / "a.png")
    with pytest.raises(DataError, match=r"expects one sub-folder per class, e\.g\. photos/cat/\*\.jpg"):
        scan_folder(flat)
    assert issubclass(DataError, InputError)


@pytest.mark.parametrize("val, test", [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0), (float("nan"), 0.1)])
def test_bad_fractions_are_an_error(tmp_path, val, test):
    root = _flat(tmp_path / "photos", {"cat": 2, "dog": 2})
    with pytest.raises(DataError, match=r"(val_fraction|must be below 1)"):
        scan_folder(root, val_fraction=val, test_fraction=test)


def test_given_class_names_set_the_order_and_reject_unknown_classes(tmp_path):
    root = _flat(tmp_path / "photos", {"cat": 2, "dog": 2})
    folder = scan_folder(root, class_names=["dog", "bird", "cat"])
    assert folder.class_names == ("dog", "bird", "cat")
    assert {folder.class_names[label] for label in folder.labels} == {"cat", "dog"}
    assert folder.labels[folder.paths.index("cat/000.png")] == 2

    _png(root / "fox" / "0.png")
    with pytest.raises(DataError, match=r"'fox'.*known classes: dog, bird, cat"):
        scan_folder(root, class_names=["dog", "bird", "cat"])


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlink_loops_end(tmp_path):
    root = _flat(tmp_path / "photos", {"cat": 2, "dog": 2})
    try:
        os.symlink(root / "cat", root / "cat" / "loop", target_is_directory=True)
    except OSError:
        pytest.skip("cannot create symlinks here")
    folder = scan_folder(root)
    assert sum(p.startswith("cat/") for p in folder.paths) == 2


# ------------------------------------------------------------------------------------ split folders


@pytest.mark.parametrize("val_dir", ["val", "validation"])
def test_split_folders_are_detected(tmp_path, val_dir):
    root = tmp_path / "photos"
    for split_dir, n in (("train", 3), (val_dir, 2), ("test", 1)):
        _flat(root / split_dir, {"ants": n, "bees": n})
    _png(root / "train" / "wasps" / "0.png")  # a class only in train is allowed

    folder = scan_folder(root, val_fraction=0.5)

    assert folder.split_source == "folders"
    assert folder.class_names == ("ants", "bees", "wasps")
    assert "train/ants/000.png" in folder.paths
    assert f"{val_dir}/bees/001.png" in folder.paths
    counts = folder.counts()
    assert counts["train"] == {"ants": 3, "bees": 3, "wasps": 1}
    assert counts["val"] == {"ants": 2, "bees": 2, "wasps": 0}
    assert counts["test"] == {"ants": 1, "bees": 1, "wasps": 0}
    paths, labels = folder.subset("val")
    assert all(p.startswith(f"{val_dir}/") for p in paths) and len(labels) == 4


def test_train_and_test_folders_only(tmp_path):
    root = tmp_path / "photos"
    _flat(root / "train", {"a": 2, "b": 2})
    _flat(root / "test", {"a": 1, "b": 1})
    folder = scan_folder(root)
    assert folder.split_source == "folders"
    assert set(folder.splits) == {"train", "test"}


def test_split_folders_mixed_with_class_folders_is_an_error(tmp_path):
    root = tmp_path / "photos"
    _flat(root / "train", {"a": 2, "b": 2})
    _flat(root / "val", {"a": 1, "b": 1})
    _png(root / "c" / "0.png")
    with pytest.raises(DataError, match=r"mixes split folders .* with other folders \(c/\)"):
        scan_folder(root)


def test_make_image_folder_split_dirs(tmp_path):
    root = make_image_folder(tmp_path / "syn", num_classes=2, images_per_class=10, split_dirs=True)
    folder = scan_folder(root)
    assert folder.split_source == "folders"
    assert folder.counts() == {"train": {"class_0": 6, "class_1": 6},
                               "val": {"class_0": 2, "class_1": 2},
                               "test": {"class_0": 2, "class_1": 2}}


# ----------------------------------------------------------------------------------------- hash split


def test_hash_split_is_stable_when_files_are_added(tmp_path):
    root = _flat(tmp_path / "photos", {"cat": 20, "dog": 20})
    before = scan_folder(root, seed=3)
    assert before.split_source == "hash"
    for i in range(20, 60):
        _png(root / "cat" / f"{i:03d}.png")
        _png(root / "dog" / "new" / f"{i:03d}.png")
    _png(root / "emu" / "0.png")
    _png(root / "emu" / "1.png")
    after = scan_folder(root, seed=3)
    old = dict(zip(before.paths, before.splits, strict=True))
    new = dict(zip(after.paths, after.splits, strict=True))
    assert {p: new[p] for p in old} == old


def test_different_seed_gives_different_split(tmp_path):
    root = _flat(tmp_path / "photos", {"cat": 20, "dog": 20})
    assert scan_folder(root, seed=0).splits != scan_folder(root, seed=1).splits
    assert scan_folder(root, seed=1).splits == scan_folder(root, seed=1).splits


def test_hash_split_follows_the_fractions():
    paths = tuple(f"c{i % 2}/{i:05d}.jpg" for i in range(4000))
    labels = np.array([i % 2 for i in range(4000)], dtype=np.int64)
    splits = hash_splits(paths, labels, seed=0, val_fraction=0.2, test_fraction=0.1)
    share = {s: splits.count(s) / len(splits) for s in SPLITS}
    assert share["train"] == pytest.approx(0.7, abs=0.03)
    assert share["val"] == pytest.approx(0.2, abs=0.03)
    assert share["test"] == pytest.approx(0.1, abs=0.03)
    no_val = hash_splits(paths, labels, seed=0, val_fraction=0.0, test_fraction=0.1)
    assert "val" not in no_val


def test_every_class_reaches_every_split_from_three_images():
    for seed in range(40):
        counts = {"a": 3, "b": 4, "c": 5, "d": 2}
        paths = tuple(f"{c}/{i}.png" for c, n in counts.items() for i in range(n))
        labels = np.array([k for k, n in enumerate(counts.values()) for _ in range(n)], dtype=np.int64)
        splits = hash_splits(paths, labels, seed=seed, val_fraction=0.15, test_fraction=0.15)
        for k in range(3):  # classes with >= 3 images
            seen = {s for s, label in zip(splits, labels, strict=True) if label == k}
            assert seen == set(SPLITS), (seed, k)


def test_small_classes_in_a_real_folder_reach_every_split(tmp_path):
    root = _flat(tmp_path / "photos", {"cat": 3, "dog": 4})
    counts = scan_folder(root, seed=7).counts()
    for split in SPLITS:
        assert all(n >= 1 for n in counts[split].values()), counts


# ------------------------------------------------------------------------------------------ splits.csv


def test_splits_csv_round_trip(tmp_path):
    root = make_image_folder(tmp_path / "syn", num_classes=3, images_per_class=6)
    folder = scan_folder(root, class_names=["class_2", "class_0", "class_1"])
    csv_path = tmp_path / "run" / "splits.csv"
    write_splits_csv(folder, csv_path)

    assert csv_path.read_text().splitlines()[0] == "path,label,class_name,split"
    assert [p.name for p in csv_path.parent.iterdir()] == ["splits.csv"]  # no temp file left

    back = read_splits_csv(csv_path, root=root)
    assert isinstance(back, ImageFolder)
    assert back.split_source == "csv"
    assert back.root == root
    assert back.class_names == folder.class_names
    assert back.paths == folder.paths
    assert back.splits == folder.splits
    np.testing.assert_array_equal(back.labels, folder.labels)
    assert back.counts() == folder.counts()


def test_read_splits_csv_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.png,0\n")
    with pytest.raises(DataError, match=r"must start with the header path,label,class_name,split"):
        read_splits_csv(bad)
    gap = tmp_path / "gap.csv"
    gap.write_text("path,label,class_name,split\na/0.png,0,a,train\nc/0.png,2,c,val\n")
    with pytest.raises(DataError, match=r"no row for label\(s\) \[1\].*pass class_names"):
        read_splits_csv(gap)
    assert read_splits_csv(gap, class_names=["a", "b", "c"]).class_names == ("a", "b", "c")
    split = tmp_path / "split.csv"
    split.write_text("path,label,class_name,split\na/0.png,0,a,holdout\n")
    with pytest.raises(DataError, match=r"line 2: split 'holdout'"):
        read_splits_csv(split)


# ------------------------------------------------------------------------------------------ load_image


def test_load_image_shape_and_dtype(tmp_path):
    path = _png(tmp_path / "a.png", color=(10, 20, 30), size=(50, 30))
    arr = load_image(path, 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
    assert tuple(arr[8, 8]) == (10, 20, 30)


def test_load_image_applies_exif_orientation(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)   # left half red
    pixels[:, 20:] = (0, 0, 255)   # right half blue
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": left half becomes the top
    path = tmp_path / "rotated.jpg"
    img.save(path, "JPEG", exif=exif, quality=95)

    arr = load_image(path, 16).astype(int)
    assert arr[2, 8, 0] > 200 and arr[2, 8, 2] < 50      # top is red
    assert arr[13, 8, 2] > 200 and arr[13, 8, 0] < 50    # bottom is blue


def test_load_image_composites_transparency_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)  # opaque red left, fully transparent right
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    arr = load_image(path, 8)
    assert tuple(arr[4, 1]) == (255, 0, 0)
    assert tuple(arr[4, 6]) == (255, 255, 255)

    la = Image.new("LA", (8, 8), (0, 0))
    la.save(tmp_path / "la.png")
    assert tuple(load_image(tmp_path / "la.png", 4)[0, 0]) == (255, 255, 255)


def test_load_image_palette_grayscale_and_cmyk(tmp_path):
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 128, 255] + [0, 0, 0] * 255)
    pal.save(tmp_path / "pal.png")
    assert tuple(load_image(tmp_path / "pal.png", 4)[0, 0]) == (0, 128, 255)

    pal_t = Image.new("P", (8, 8), 1)
    pal_t.putpalette([0, 0, 0, 9, 9, 9] + [0, 0, 0] * 254)
    pal_t.save(tmp_path / "pal_t.gif", transparency=1)
    assert tuple(load_image(tmp_path / "pal_t.gif", 4)[0, 0]) == (255, 255, 255)

    Image.new("L", (8, 8), 77).save(tmp_path / "gray.png")
    assert tuple(load_image(tmp_path / "gray.png", 4)[1, 1]) == (77, 77, 77)

    Image.new("1", (8, 8), 1).save(tmp_path / "bw.bmp")
    assert tuple(load_image(tmp_path / "bw.bmp", 4)[1, 1]) == (255, 255, 255)

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = load_image(tmp_path / "cmyk.jpg", 4)[1, 1].astype(int)
    assert r > 200 and g < 50 and b < 50


def test_load_image_scales_16_bit_png(tmp_path):
    values = np.full((8, 8), 65535, np.uint16)
    values[:, 4:] = 32896  # 128 * 257
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    arr = load_image(path, 8)
    assert tuple(arr[3, 0]) == (255, 255, 255)
    assert tuple(arr[3, 7]) == (128, 128, 128)


def test_load_image_large_jpeg_and_first_frame_of_gif(tmp_path):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (3000, 2000), (0, 200, 0)).save(big, quality=80)
    arr = load_image(big, 64)
    assert arr.shape == (64, 64, 3)
    assert abs(int(arr[32, 32, 1]) - 200) <= 3

    frames = [Image.new("RGB", (8, 8), color).convert("P") for color in ((255, 0, 0), (0, 0, 255))]
    anim = tmp_path / "anim.gif"
    frames[0].save(anim, save_all=True, append_images=frames[1:], duration=100)
    first = load_image(anim, 8)
    assert first[4, 4, 0] > 200 and first[4, 4, 2] < 50


def test_load_image_raises_value_error_on_truncated_or_bad_input(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:600])
    with pytest.raises(ValueError, match=r"Cannot decode image '.*truncated\.jpg'"):
        load_image(truncated, 16)
    with pytest.raises(ValueError, match=r"Cannot decode image"):
        load_image(tmp_path / "missing.png", 16)
    with pytest.raises(ValueError, match=r"size must be a positive integer"):
        load_image(good, 0)


# --------------------------------------------------------------------------------------- image_dataset


def test_image_dataset_shapes_order_and_broken_file(tmp_path):
    root = make_image_folder(tmp_path / "syn", num_classes=2, images_per_class=3,
                             formats=("png", "jpg", "bmp"))
    folder = scan_folder(root)
    paths = [folder.abs_path(p) for p in folder.paths]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(paths[1].read_bytes()[:300])  # valid header, truncated data
    paths.insert(2, broken)

    batches = list(image_dataset(paths, 24, batch_size=4).as_numpy_iterator())

    assert [b[0].shape for b in batches] == [(4, 24, 24, 3), (3, 24, 24, 3)]
    images = np.concatenate([b[0] for b in batches])
    ok = np.concatenate([b[1] for b in batches])
    assert images.dtype == np.float32 and ok.dtype == np.bool_
    assert ok.tolist() == [True, True, False, True, True, True, True]
    assert not images[2].any()
    for i in (0, 1, 3, 6):
        np.testing.assert_array_equal(images[i], load_image(paths[i], 24).astype(np.float32))


def test_make_image_folder_formats_and_determinism(tmp_path):
    formats = ("png", "jpg", "bmp", "gif", "webp", "tiff")
    a = make_image_folder(tmp_path / "a", num_classes=2, images_per_class=6, formats=formats, seed=5)
    b = make_image_folder(tmp_path / "b", num_classes=2, images_per_class=6, formats=formats, seed=5)
    names = sorted(p.name for p in (a / "class_1").iterdir())
    assert names == ["0000.png", "0001.jpg", "0002.bmp", "0003.gif", "0004.webp", "0005.tiff"]
    for name in names:
        assert (a / "class_1" / name).read_bytes() == (b / "class_1" / name).read_bytes()
    folder = scan_folder(a)
    assert folder.skipped == () and len(folder.paths) == 12
    # Classes differ clearly in mean colour, so they are learnable.
    means = [np.mean([load_image(folder.abs_path(p), 16).mean((0, 1)) for p in folder.subset(s)[0]
                      if p.startswith(f"class_{k}/")] or [np.zeros(3)], axis=0)
             for k in range(2) for s in ("train",)]
    assert np.abs(means[0] - means[1]).max() > 40
