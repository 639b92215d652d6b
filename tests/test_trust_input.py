"""Trust, input: hostile files and file names get a clear answer at once, and every name leads back to its file.

Four classes of fault, each with its root fix:

* one safe opener (:func:`transferkit.data.images.open_image_file`) for every reader of an image: FIFOs, sockets,
  devices and folders named ``*.jpg`` are refused with a reason (opened the ordinary way, a FIFO blocks
  forever), so are files over the size limit, and thumbnails refuse decompression bombs like decoding does;
* file names that are not UTF-8 round-trip through every file transferkit writes (one representation, in
  :mod:`transferkit.files`), in a UTF-8 and in the ASCII C locale, and the console never crashes on them;
* the "everything awkward" folder of :func:`transferkit.testing.make_awkward_folder` is scanned, trained on,
  predicted, explained and reported with exactly the right files used, skipped and ignored;
* a run folder's ``predictions.csv`` pointing outside the image folder, at a FIFO or at a bomb gives a
  skipped entry in the report, never a hang or a picture of a file from elsewhere.

Commands that could hang run in a thread under :func:`_finishes`, which fails the test (and releases the
FIFO) instead of hanging the suite.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageFile

import transferkit
from transferkit import files
from transferkit.cache import hash_file
from transferkit.cli import main
from transferkit.data import images
from transferkit.data.scan import scan_folder
from transferkit.errors import InputError
from transferkit.testing import REASON_SPECIAL, make_awkward_folder, make_image_folder

TINY = ["--backbone", "tiny_test", "--weights", "none", "--image-size", "32", "-q"]
#: Far beyond what any command here takes: reaching it means a hang, not slowness.
HANG_SECONDS = 240
LATIN1 = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name from an old archive: not valid UTF-8


def _finishes(func, *, fifos=(), seconds=HANG_SECONDS):
    """``func()``'s result, or a failed test if it does not return within ``seconds`` (a hang).

    On a hang, opening the FIFOs' write ends releases a reader blocked in ``open``, so the thread ends.
    """
    box = {}

    def target():
        try:
            box["value"] = func()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(10)
        pytest.fail(f"{getattr(func, '__name__', func)} hung (still running after {seconds} s)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def run(*args, fifos=()):
    """The CLI in this process, in a thread that cannot hang the suite."""
    return _finishes(lambda: CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False),
                     fifos=fifos)


def _rows(path: Path) -> list[dict]:
    with files.open_text(path) as handle:
        return list(csv.DictReader(handle))


def _special_files(folder: Path) -> dict[str, Path]:
    """A FIFO, a socket, a device and a folder, each named like an image (those this OS can make)."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {"folder": folder / "album.jpg"}
    made["folder"].mkdir()
    if hasattr(os, "mkfifo"):
        os.mkfifo(folder / "fifo.jpg")
        made["FIFO"] = folder / "fifo.jpg"
    if Path("/dev/zero").exists():
        (folder / "zero.jpg").symlink_to("/dev/zero")
        made["device"] = folder / "zero.jpg"
    try:
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(folder / "socket.png"))
        made["socket"] = folder / "socket.png"
    except (AttributeError, OSError):
        pass
    return made


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    return make_awkward_folder(tmp_path_factory.mktemp("awkward") / "photos")


@pytest.fixture(scope="module")
def trained(awkward, tmp_path_factory):
    """A tiny run trained on the awkward folder (module-wide: training is the slow part)."""
    base = tmp_path_factory.mktemp("trained")
    result = run("train", awkward.root, "-o", base / "run", *TINY, "--epochs", "2", "--cache-dir", base / "cache",
                 fifos=[awkward.root / p for p in awkward.special_files if "fifo" in p])
    assert result.exit_code == 0, result.output
    return base / "run", result, base / "cache"


# ------------------------------------------------------------------------------ 1. one safe opener


def test_every_image_reader_refuses_special_files_at_once_with_the_reason(tmp_path):
    from transferkit.evaluation.explain import display_image as explain_display
    from transferkit.report.writer import _thumbnail_png

    made = _special_files(tmp_path)
    assert {"folder", "FIFO", "device"} <= set(made), "this OS can make the files the test is about"
    readers = {"scan check": images.unreadable_reason, "load_image": lambda p: images.load_image(p, 8),
               "explain": explain_display, "report thumbnail": _thumbnail_png,
               "read_image_bytes": lambda p: images.read_image_bytes(p),
               "display_image": lambda p: images.display_image(p, 8)}
    fifos = [p for kind, p in made.items() if kind == "FIFO"]
    for kind, path in made.items():
        for name, reader in readers.items():
            def attempt(reader=reader, path=path):
                try:
                    return reader(path)
                except ValueError as exc:
                    return exc
            outcome = _finishes(attempt, fifos=fifos)
            message = outcome if isinstance(outcome, str) else str(getattr(outcome, "__cause__", None) or outcome)
            assert isinstance(outcome, (str, ValueError)), f"{name} read the {kind} {path.name}: {outcome!r}"
            assert message.startswith(REASON_SPECIAL), (kind, name, message)


def test_files_over_the_size_limit_are_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
    monkeypatch.setattr(images, "MAX_FILE_BYTES", path.stat().st_size - 1)
    assert images.unreadable_reason(path).startswith("file too large")
    with pytest.raises(ValueError, match=r"Cannot decode image '.*big\.png': file too large: .* bytes, more than"):
        images.load_image(path, 8)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_thumbnails_and_overlays_refuse_decompression_bombs_from_their_header(awkward, monkeypatch):
    from transferkit.report.writer import _thumbnail_png

    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    for reader in (_thumbnail_png, lambda p: images.display_image(p, 64)):
        with pytest.raises(ValueError, match="decompression-bomb limit"):
            reader(awkward.root / "cat/bomb.png")  # 100 million pixels: Pillow itself only warns
    assert loads == [], "no pixel of a bomb is decoded"


# ---------------------------------------------------------------- 2. names that are not UTF-8, any locale


def test_text_files_keep_name_bytes_and_json_escapes_them(tmp_path):
    names = [LATIN1, "café 猫.png", 'comma, "quote"\nline.png']
    files.write_csv(tmp_path / "names.csv", ["path"], [[n] for n in names])
    assert b"caf\xe9.png" in (tmp_path / "names.csv").read_bytes(), "the name's own bytes"
    assert [r["path"] for r in _rows(tmp_path / "names.csv")] == names
    files.write_json(tmp_path / "names.json", {"paths": names})
    text = (tmp_path / "names.json").read_text(encoding="utf-8")  # valid UTF-8 JSON
    assert "caf\\udce9.png" in text and "café 猫.png" in text
    assert json.loads(text)["paths"] == names
    assert files.display_name(LATIN1) == "caf\\xe9.png"


def _c_locale_script(root: Path, out: Path) -> str:
    return textwrap.dedent(f"""
        import json, os, sys
        from transferkit.cli import main
        root, out = {str(root)!r}, {str(out)!r}
        tiny = {TINY!r} + ["--cache-dir", os.path.join(out, "cache")]
        commands = {{
            "train": ["train", root, "-o", os.path.join(out, "run"), *tiny, "--epochs", "2"],
            "extract": ["extract", root, *tiny],
            **{{f"export {{fmt}}": ["features", "export", root, "-o", os.path.join(out, "f." + fmt), *tiny]
               for fmt in ("npz", "parquet", "csv")}},
            "predict csv": ["predict", os.path.join(out, "run"), root, "--output", os.path.join(out, "p.csv")],
            "predict json": ["predict", os.path.join(out, "run"), root, "--output", os.path.join(out, "p.json")],
        }}
        codes = {{}}
        for name, args in commands.items():
            try:
                codes[name] = main.main(args, prog_name="transferkit", standalone_mode=False) or 0
            except SystemExit as exc:
                codes[name] = exc.code
        print("encoding", sys.getfilesystemencoding(), file=sys.stderr)
        with open(os.path.join(out, "codes.json"), "w") as handle:
            json.dump(codes, handle)
    """)


def test_every_file_written_keeps_names_that_are_not_utf8_in_the_c_locale(tmp_path):
    """In the ASCII C locale every non-ASCII name is undecodable; the awkward-folder tests below cover a
    UTF-8 locale (and names that are not UTF-8 there)."""
    root = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=6, class_prefix="clé_")
    Image.new("RGB", (30, 30), (250, 10, 10)).save(root / "clé_0" / LATIN1)
    Image.new("RGB", (30, 30), (10, 10, 250)).save(root / "clé_1" / "ñandú 猫.png")
    expected = sorted(os.path.relpath(p, root) for p in root.rglob("*.png"))  # Python's names, this process
    out = tmp_path / "out"
    out.mkdir()
    # LC_ALL=C with PYTHONUTF8=0: the file system encoding is ASCII, so every non-ASCII name is undecodable.
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "",
           "PYTHONPATH": str(Path(transferkit.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", _c_locale_script(root, out)], env=env, capture_output=True,
                          timeout=HANG_SECONDS)
    log = (done.stdout + done.stderr).decode("utf-8", "replace")
    assert done.returncode == 0 and "Traceback" not in log, log
    assert "encoding ascii" in log
    codes = json.loads((out / "codes.json").read_text())
    assert set(codes.values()) == {0}, (codes, log)

    run_dir = out / "run"
    assert (run_dir / "labels.txt").read_text(encoding="utf-8").split() == ["clé_0", "clé_1"], "class names are text"
    assert sorted(r["path"] for r in _rows(run_dir / "splits.csv")) == expected
    assert sorted(r["path"] for r in _rows(run_dir / "predictions.csv")) == \
        sorted(r["path"] for r in _rows(run_dir / "splits.csv") if r["split"] == "test")
    assert _rows(run_dir / "skipped.csv") == []
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["image_dir"] == str(root)
    with np.load(out / "f.npz") as data:
        assert sorted(data["paths"].tolist()) == expected
    import pyarrow.parquet as pq

    table = pq.read_table(out / "f.parquet").to_pydict()
    assert sorted(os.fsdecode(b) for b in table["path_bytes"]) == expected, "Parquet: the exact bytes"
    assert "clé_0/caf\\xe9.png" in table["path"], "Parquet strings are UTF-8: undecodable bytes as \\xNN"
    assert sorted(r["path"] for r in _rows(out / "f.csv")) == expected
    for rows in (_rows(out / "p.csv"), json.loads((out / "p.json").read_text(encoding="utf-8"))):
        assert sorted(os.path.relpath(r["path"], root) for r in rows) == expected
        assert all(str(r["ok"]) == "True" for r in rows), rows
    for rel in expected:  # each name written leads back to its file
        assert (root / rel).is_file()


def test_a_class_folder_whose_name_is_not_utf8_is_refused_with_the_fix(tmp_path):
    from transferkit.errors import DataError

    root = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=3)
    (root / "class_1").rename(root / os.fsdecode(b"cl\xe9ss"))  # class names are saved and drawn as text
    with pytest.raises(DataError, match=r"Class folder 'cl\\xe9ss' .* not valid UTF-8 .*'convmv -f latin1"):
        scan_folder(root)


# ------------------------------------------------------------------ 3. the everything-awkward folder


def test_awkward_folder_holds_every_hostile_kind_this_os_allows(awkward):
    assert {"cat/fifo.jpg", "dog/zero.jpg"} <= set(awkward.special_files)
    assert awkward.undecodable_names, "this file system takes names that are not UTF-8"
    folder = _finishes(lambda: scan_folder(awkward.root))
    assert sorted(folder.paths) == sorted([*awkward.used, *awkward.skipped_at_decode])
    assert dict(folder.skipped).keys() == awkward.skipped_at_scan.keys()
    for path, reason in folder.skipped:
        assert reason.startswith(awkward.skipped_at_scan[path]), (path, reason)
    assert folder.num_ignored == awkward.num_ignored


def test_awkward_folder_is_trained_on_with_exactly_the_right_files(awkward, trained):
    run_dir, result, _ = trained
    assert sorted(r["path"] for r in _rows(run_dir / "splits.csv")) == list(awkward.used)
    skipped = {r["path"]: r["reason"] for r in _rows(run_dir / "skipped.csv")}
    assert skipped.keys() == awkward.skipped.keys()
    for path, reason in skipped.items():
        assert reason.startswith(awkward.skipped[path]), (path, reason)
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert sorted(s["path"] for s in metrics["skipped"]) == sorted(awkward.skipped)
    assert metrics["num_ignored"] == awkward.num_ignored
    for path in awkward.skipped:
        assert f"Skipped {files.display_name(path)}: " in result.output


def test_awkward_folder_features_export_keeps_every_name_in_every_format(awkward, trained, tmp_path):
    import pyarrow.parquet as pq

    *_, cache_dir = trained
    for fmt in ("npz", "parquet", "csv"):
        result = run("features", "export", awkward.root, "-o", tmp_path / f"f.{fmt}", *TINY, "--cache-dir", cache_dir,
                     fifos=[awkward.root / p for p in awkward.special_files if "fifo" in p])
        assert result.exit_code == 0, result.output
    with np.load(tmp_path / "f.npz") as data:
        assert sorted(data["paths"].tolist()) == list(awkward.used)
    table = pq.read_table(tmp_path / "f.parquet").to_pydict()
    assert sorted(os.fsdecode(b) for b in table["path_bytes"]) == list(awkward.used)
    assert sorted(r["path"] for r in _rows(tmp_path / "f.csv")) == list(awkward.used)


def test_awkward_folder_is_predicted_with_exactly_the_right_files(awkward, trained, tmp_path):
    run_dir, *_ = trained
    fifos = [awkward.root / p for p in awkward.special_files if "fifo" in p]
    for output in (tmp_path / "p.csv", tmp_path / "p.json"):
        result = run("predict", run_dir, awkward.root, "--output", output, fifos=fifos)
        assert result.exit_code == 0, result.output
        shown = [line.split("\t")[0] for line in result.output.splitlines() if "\t" in line]
        assert sorted(shown) == sorted(files.display_name(str(awkward.root / p)) for p in [*awkward.used,
                                                                                            *awkward.skipped]), \
            "one line per image, a line break in a name shown as \\n"
        rows = _rows(output) if output.suffix == ".csv" else json.loads(output.read_text(encoding="utf-8"))
        by_path = {os.path.relpath(r["path"], awkward.root): r for r in rows}
        assert sorted(p for p, r in by_path.items() if str(r["ok"]) == "True") == list(awkward.used)
        refused = {p: r["error"] for p, r in by_path.items() if str(r["ok"]) != "True"}
        assert refused.keys() == awkward.skipped.keys()
        for path, error in refused.items():
            # Scan refusals read "<reason>"; predict decodes without a scan, so all read "cannot decode image: ...".
            reason = awkward.skipped[path]
            assert reason in error or error.startswith("cannot decode image"), (path, error)
        for path in awkward.special_files:
            assert REASON_SPECIAL in refused[path], (path, refused[path])


@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")  # the CJK name in a caption
def test_awkward_folder_is_explained_with_exactly_the_right_files(awkward, trained, tmp_path):
    run_dir, *_ = trained
    fifos = [awkward.root / p for p in awkward.special_files if "fifo" in p]
    result = run("explain", run_dir, awkward.root, "-o", tmp_path / "cams", fifos=fifos)
    assert result.exit_code == 0, result.output
    assert f"Wrote {len(awkward.used)} Grad-CAM overlays" in result.output
    assert len(list((tmp_path / "cams").glob("*.png"))) == len(awkward.used)
    lines = result.output.splitlines()
    assert sum(line.startswith("Skipped ") for line in lines) == len(awkward.skipped)
    for path in awkward.skipped:
        assert f"Skipped {files.display_name(str(awkward.root / path))}: " in result.output


def test_awkward_folder_is_reported_with_its_skipped_files(awkward, trained):
    run_dir, *_ = trained
    result = run("report", run_dir, fifos=[awkward.root / p for p in awkward.special_files if "fifo" in p])
    assert result.exit_code == 0, result.output
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert f"Skipped (unreadable) files: {len(awkward.skipped)}." in report
    for path in awkward.special_files:
        assert path in report


# ---------------------------------------------------------------- 4. hostile files in a run folder


def test_hostile_predictions_csv_gives_skipped_entries_never_a_hang_or_an_outside_file(awkward, trained, tmp_path):
    run_dir, *_ = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    outside = tmp_path / "private.png"  # a real image the run has nothing to do with
    Image.new("RGB", (40, 40), (255, 0, 255)).save(outside)
    targets = {
        "dog/bitmap.bmp": None,  # the only one that may be shown
        "../../private.png": "outside the run's image folder",
        "cat/../../../private.png": "outside the run's image folder",
        str(outside): "outside the run's image folder",
        "cat/fifo.jpg": "not a regular file",
        "dog/zero.jpg": "not a regular file",
        "cat/bomb.png": images.BOMB_REASON,
        "": "no usable path",
    }
    rows = [[path, "cat", "dog", f"{0.99 - i / 100:.2f}", 0] for i, path in enumerate(targets)]
    files.write_csv(copy / "predictions.csv", ["path", "label", "predicted", "confidence", "correct"], rows)
    with open(copy / "predictions.csv", "a", encoding="utf-8") as handle:
        handle.write("dog/short_row.png\n")  # a damaged row: no label, prediction or confidence
    (copy / "feature_map.json").unlink(missing_ok=True)
    os.mkfifo(copy / "feature_map.json")  # another run-folder file that would block
    (copy / "history.csv").write_bytes(bytes(range(256)) * 4)  # damaged: not UTF-8, not CSV

    result = run("report", copy, fifos=[awkward.root / "cat/fifo.jpg", copy / "feature_map.json"])

    assert result.exit_code == 0, result.output
    report = (copy / "report.md").read_text(encoding="utf-8").replace("\\", "")  # Markdown escapes
    for path, reason in targets.items():
        if reason:
            assert f"image not available: {reason}" in report, (path, report)
    thumbnails = list((copy / "plots" / "errors").glob("*.png"))
    assert len(thumbnails) == 1, "only the image inside the image folder is shown"
    assert not any(Image.open(t).getpixel((5, 5)) == (255, 0, 255) for t in thumbnails)


@pytest.mark.parametrize("content", ["[]", '{"test": {"class_names": [1, 2]}, "confusion_matrix": []}'])
def test_a_metrics_json_of_the_wrong_shape_is_a_clear_error(trained, tmp_path, content):
    run_dir, *_ = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    (copy / "metrics.json").write_text(content, encoding="utf-8")
    result = run("report", copy)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "metrics.json" in result.output and "run the command again" in result.output


# ------------------------------------------------- 5. one safe reader for every file transferkit reads
#
# files.open_regular: opened non-blocking, fstat of what was opened, regular files only. A check by name
# (is_file, stat) followed by a plain open blocks forever on a FIFO swapped in between, and a plain open of
# a FIFO blocks at once.

QUICK = 60  # seconds: each call below takes well under one; reaching this means a hang


def test_open_regular_refuses_every_special_file_with_its_kind_and_enforces_the_limit(tmp_path):
    reasons = {"FIFO": "a named pipe (FIFO)", "socket": "a socket", "device": "a character device",
               "folder": "a folder"}
    for kind, path in _special_files(tmp_path / "special").items():
        with pytest.raises(files.NotRegularFileError, match=re.escape(f"not a regular file: {reasons[kind]}")):
            _finishes(lambda path=path: files.open_regular(path), fifos=[path], seconds=QUICK)
    small = tmp_path / "small.json"
    small.write_bytes(b"0123456789")
    with files.open_regular(small) as handle:
        assert os.get_blocking(handle.fileno()), "O_NONBLOCK is cleared once the file is known to be regular"
        assert handle.read() == b"0123456789"
    assert files.read_regular_bytes(small, max_bytes=10) == b"0123456789"
    with pytest.raises(files.FileTooLargeError, match="larger than 9 bytes"):
        files.read_regular_bytes(small, max_bytes=9)
    link = tmp_path / "link.json"
    link.symlink_to(small)
    assert files.read_regular_bytes(link) == b"0123456789"
    with pytest.raises(OSError):
        files.open_regular(link, follow_symlinks=False)


def test_a_fifo_named_status_json_is_an_unknown_state_and_resume_says_so(tmp_path):
    from transferkit.serving import runs

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("image_dir: photos\noutput_dir: run\n", encoding="utf-8")
    status = run_dir / "status.json"
    os.mkfifo(status)
    assert _finishes(lambda: runs.read_status(run_dir), fifos=[status], seconds=QUICK) == {}
    result = _finishes(lambda: CliRunner().invoke(main, ["train", "--resume", str(run_dir)]), fifos=[status],
                       seconds=QUICK)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "status.json" in result.output and "named pipe (FIFO)" in result.output
    assert status.is_fifo(), "a file transferkit did not write is left alone"
    # The failure path of a run reads the stage it reached from status.json before writing it.
    _finishes(lambda: runs.write_failure(run_dir, RuntimeError("boom")), fifos=[status], seconds=QUICK)
    assert runs.read_status(run_dir)["state"] == "failed"


def test_a_fifo_named_state_json_in_a_fine_tune_backup_is_no_backup(tmp_path):
    from transferkit.training.finetune import atomic_callbacks

    backup = tmp_path / "backup"
    backup.mkdir()
    os.mkfifo(backup / "state.json")
    callback = atomic_callbacks().BackupAndRestore(str(backup))
    assert _finishes(callback.restore, fifos=[backup / "state.json"], seconds=QUICK) == 0


def _swap_for_fifo_after_first_stat(monkeypatch, target: Path) -> None:
    """Another program replaces ``target`` with a FIFO just after transferkit first looks at it: a reader
    that checks by name, then opens the plain way, waits forever for a writer."""
    real_stat = os.stat
    swapped = []

    def stat(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        if not swapped and os.path.abspath(os.fsdecode(os.fspath(path))) == str(target):
            swapped.append(True)
            target.unlink()
            os.mkfifo(target)
        return result

    monkeypatch.setattr(os, "stat", stat)


def _read_config(path):
    from transferkit.config import read_yaml

    return read_yaml(path, "Run settings")


def _read_feature_map(path):
    from transferkit.report.sections import PlotFolder, feature_map_section

    section = feature_map_section(path.parent, PlotFolder(path.parent), ["a", "b"], "no feature map")
    return "no feature map" if [block.text for block in section.blocks] == ["no feature map"] else "drawn"


@pytest.mark.parametrize(("name", "content", "reader", "outcome"), [
    ("config.yaml", b"epochs: 3\n", _read_config, "not a regular file: a named pipe (FIFO)"),
    ("feature_map.json", b'{"projections": []}', _read_feature_map, "no feature map"),
    ("photo.png", b"\x89PNG not really", images.read_image_bytes, "not a regular file: a named pipe (FIFO)"),
    ("photo.jpg", b"bytes", hash_file, "not a regular file: a named pipe (FIFO)"),
])
def test_a_fifo_swapped_in_after_the_check_is_refused_not_waited_on(tmp_path, monkeypatch, name, content, reader,
                                                                   outcome):
    path = tmp_path / "run" / name
    path.parent.mkdir()
    path.write_bytes(content)
    _swap_for_fifo_after_first_stat(monkeypatch, path)
    try:
        got = _finishes(lambda: reader(path), fifos=[path], seconds=QUICK)
    except (ValueError, OSError, InputError) as exc:
        assert isinstance(outcome, str) and outcome in str(exc), exc
    else:
        assert got == outcome
    assert path.is_fifo()
