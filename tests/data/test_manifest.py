"""Manifests: a .csv or .jsonl list of path,label[,split] rows wherever IMAGE_DIR is taken."""

from __future__ import annotations

import json
import shutil

import pytest

from transferkit.data.manifest import read_manifest
from transferkit.data.scan import scan_folder
from transferkit.errors import DataError
from transferkit.testing import make_image_folder, run_cli

TINY = ["--backbone", "tiny_test", "--weights", "none", "--image-size", "32", "--batch-size", "8", "-q"]


@pytest.fixture
def images(tmp_path):
    """``data/images/`` holding 3 classes x 8 PNGs in one flat folder (the class only in the name)."""
    folder = make_image_folder(tmp_path / "made", num_classes=3, images_per_class=8)
    flat = tmp_path / "data" / "images"
    flat.mkdir(parents=True)
    for path in sorted(folder.rglob("*.png")):
        shutil.copyfile(path, flat / f"{path.parent.name}-{path.name}")
    return flat


def _rows(images):
    return [(f"images/{p.name}", p.name.split("-")[0]) for p in sorted(images.iterdir())]


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def test_csv_manifest_scans_like_a_folder_with_a_hashed_split(images):
    manifest = _write(images.parent / "labels.csv",
                      "path,label,source\n" + "".join(f"{p},{label},tool\n" for p, label in _rows(images)))
    folder = scan_folder(manifest, seed=0)
    assert folder.root == images.parent and folder.class_names == ("class_0", "class_1", "class_2")
    assert len(folder.paths) == 24 and folder.paths[0].startswith("images/") and folder.split_source == "hash"
    assert folder.splits == scan_folder(manifest, seed=0).splits and {"train", "val", "test"} <= set(folder.splits)
    assert read_manifest(manifest).notes == ("columns ignored: source",)


def test_a_manifests_split_is_kept_and_jsonl_reads_the_same(images):
    rows = _rows(images)
    rows = [(p, c, s) for (p, c), s in zip(rows, ["train", "validation", "test"] * 8, strict=True)]
    csv_file = _write(images.parent / "m.csv", "\ufeffPath,Class,Split\r\n"  # BOM, Windows line ends, other case
                      + "".join(f"{p.replace('/', chr(92))},{c},{s}\r\n" for p, c, s in rows))
    jsonl_file = _write(images.parent / "m.jsonl", "\n".join(
        json.dumps({"path": p, "label": c, "split": s, "score": 0.5}) for p, c, s in rows) + "\n")
    a, b = scan_folder(csv_file), scan_folder(jsonl_file)
    assert a.split_source == "manifest" and (a.paths, a.splits) == (b.paths, b.splits)
    assert list(a.labels) == list(b.labels)
    assert dict(zip(a.paths, a.splits, strict=True))[rows[1][0]] == "val"  # validation -> val; backslashes read as /


def test_every_bad_row_is_named_by_its_line(images):
    good = _rows(images)[:4]
    text = ("path,label,split\n"
            f"{good[0][0]},{good[0][1]},train\n"
            f"{good[0][0]},{good[0][1]},train\n"        # line 3: listed again
            f"../outside.png,{good[1][1]},train\n"      # line 4: escapes
            f"{good[1][0]};{good[1][1]};train\n"        # line 5: another separator
            f"{good[2][0]},,val\n"                      # line 6: empty label
            f"{good[3][0]},{good[3][1]},trian\n"        # line 7: unknown split
            f"/abs/x.png,a|b,test\n")                   # line 8: absolute path, several labels
    manifest = _write(images.parent / "bad.csv", text)
    with pytest.raises(DataError) as caught:
        read_manifest(manifest)
    message = str(caught.value)
    assert "has 6 problem(s)" in message
    for expected in ["line 3: path 'images/", "is listed again (first on line 2)",
                     "line 4: path '../outside.png' leaves the manifest's folder",
                     "line 5: 1 field(s), expected 3", "line 6: empty label", "line 7: unknown split 'trian'",
                     "line 8: path '/abs/x.png' leaves", "names several classes"]:
        assert expected in message, expected


def test_missing_columns_non_utf8_bytes_and_mixed_splits_are_refused_with_the_line(images):
    (p0, c0), (p1, c1) = _rows(images)[:2]
    with pytest.raises(DataError, match=r"line 1: no path column \(found: file_name, label\)"):
        read_manifest(_write(images.parent / "a.csv", f"file_name,label\n{p0},{c0}\n"))
    with pytest.raises(DataError, match=r"line 3: not UTF-8 text \(byte 0xe9 at column 4\); save the file as UTF-8"):
        read_manifest(_write(images.parent / "b.csv", f"path,label\n{p0},{c0}\n".encode() + b"caf\xe9.png,x\n"))
    with pytest.raises(DataError, match=r"line 3: no split, while other rows have one"):
        read_manifest(_write(images.parent / "c.csv", f"path,label,split\n{p0},{c0},train\n{p1},{c1},\n"))
    with pytest.raises(DataError, match=r"line 2: not JSON"):
        read_manifest(_write(images.parent / "d.jsonl", '{"path": "a.png", "label": "x"}\n{oops\n'))
    with pytest.raises(DataError, match="no image rows"):
        read_manifest(_write(images.parent / "e.csv", "path,label\n\n"))


def test_missing_and_unreadable_files_are_skipped_with_their_line(images):
    rows = _rows(images)
    (images / "broken.png").write_bytes(b"not a png")
    manifest = _write(images.parent / "m.csv", "path,label\n" + "".join(f"{p},{c}\n" for p, c in rows)
                      + "images/gone.png,class_0\nimages/broken.png,class_1\n")
    folder = scan_folder(manifest)
    assert len(folder.paths) == 24
    assert sorted((p, r.split(":")[0]) for p, r in folder.skipped) == [("images/broken.png", "line 27"),
                                                                        ("images/gone.png", "line 26")]


def test_train_evaluate_and_extract_take_a_manifest(images, tmp_path):
    rows = _rows(images)
    manifest = _write(images.parent / "labels.csv", "path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    cache = ["--cache-dir", tmp_path / "cache"]
    result = run_cli("train", manifest, "-o", tmp_path / "run", *TINY, *cache)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["split_source"] == "hash" and metrics["test"]["num_examples"] > 0
    assert (tmp_path / "run" / "report.html").is_file()
    evaluated = run_cli("evaluate", tmp_path / "run", manifest)  # default: RUN/evaluations/<manifest name>
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((tmp_path / "run" / "evaluations" / "labels" / "metrics.json").read_text())["num_examples"] == 24
    extracted = run_cli("extract", manifest, *TINY, *cache)  # train's vectors were flip-averaged: others
    assert extracted.exit_code == 0 and "Images seen: 24; computed: 24" in extracted.output

    unlabelled = _write(images.parent / "paths.csv", "path\n" + "".join(f"{p}\n" for p, _ in rows))
    again = run_cli("extract", unlabelled, *TINY, *cache)
    assert again.exit_code == 0 and "computed: 0; already cached: 24" in again.output and "Unlabelled" in again.output
    exported = run_cli("features", "export", unlabelled, "-o", tmp_path / "f.csv", *TINY, *cache)
    assert exported.exit_code == 0 and "Wrote 24 rows" in exported.output
    refused = run_cli("train", unlabelled, "-o", tmp_path / "run2", *TINY)
    assert refused.exit_code == 2 and "has no label column" in refused.output


def test_a_file_that_is_not_a_manifest_is_refused_by_the_cli(images, tmp_path):
    other = _write(tmp_path / "notes.txt", "hello")
    result = run_cli("extract", other, *TINY)
    assert result.exit_code == 2 and "is a file: give a folder of images, or a manifest ending in .csv or .jsonl" \
        in result.output
    missing = run_cli("extract", tmp_path / "nope.csv", *TINY)
    assert missing.exit_code == 2 and "manifest" in missing.output and "does not exist" in missing.output


def test_allow_outside_takes_paths_that_leave_the_manifests_folder(images, tmp_path):
    """The manifest sits in a sub-folder of its own; ``../images/...`` and absolute paths are refused
    unless allowed, then the images' root is the deepest folder that holds them all."""
    rows = _rows(images)
    lists = images.parent / "lists"
    lists.mkdir()
    text = "path,label\n" + "".join(f"../{p},{c}\n" for p, c in rows[:12])
    text += "".join(f"{images.parent / p},{c}\n" for p, c in rows[12:])  # absolute
    manifest = _write(lists / "labels.csv", text)
    with pytest.raises(DataError, match=r"line 2: path '\.\./images/.*' leaves the manifest's folder.*--allow-outside"):
        scan_folder(manifest)
    folder = scan_folder(manifest, allow_outside=True)
    assert folder.root == images.parent and len(folder.paths) == 24 and folder.paths[0].startswith("images/")
    assert not folder.skipped

    refused = run_cli("extract", manifest, *TINY, "--cache-dir", tmp_path / "cache")
    assert refused.exit_code == 2 and "--allow-outside" in refused.output and "line 2" in refused.output
    result = run_cli("train", manifest, "-o", tmp_path / "run", *TINY, "--cache-dir", tmp_path / "cache",
                     "--allow-outside")
    assert result.exit_code == 0, result.output
    assert "allow_outside: true" in (tmp_path / "run" / "config.yaml").read_text()  # --resume reads it back
    evaluated = run_cli("evaluate", tmp_path / "run", manifest, "--allow-outside", "-q")
    assert evaluated.exit_code == 0 and "(24 images)" in evaluated.output
    twice = _write(lists / "twice.csv", f"path,label\n../{rows[0][0]},{rows[0][1]}\n{images.parent / rows[0][0]},x\n")
    with pytest.raises(DataError, match=r"line 3 lists the image of line 2 again"):
        scan_folder(twice, allow_outside=True)
