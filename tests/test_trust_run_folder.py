"""Never lose or damage what the user has: the run folder (issue 14).

--overwrite touches only transferkit's own folders and files; no output inside an image folder;
one writer per run folder; checkpoints written atomically and a damaged one falls back; a run
stopped during its report resumes by writing the report; damaged run files give clear errors.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from transferkit.cli import main
from transferkit.config import TrainConfig
from transferkit.errors import InputError
from transferkit.serving import outputs, runs
from transferkit.testing import make_image_folder

TINY = ["--backbone", "tiny_test", "--weights", "none", "--image-size", "32", "--batch-size", "8"]


def tiny_config(image_dir, output_dir, **changes) -> TrainConfig:
    return TrainConfig(image_dir=str(image_dir), output_dir=str(output_dir), backbone="tiny_test", weights="none",
                       image_size=32, epochs=10, patience=3, batch_size=8, **changes)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("trust") / "photos", num_classes=2, images_per_class=8,
                             image_size=32, formats=("png",))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run folder as load_run sees it (a small model on raw pixels, its labels), without training."""
    import keras

    run = tmp_path_factory.mktemp("trust-run") / "run"
    run.mkdir()
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs))
    runs.save_model(keras.Model(inputs, outputs), run / runs.MODEL_FILE)
    runs.write_labels(run / runs.LABELS_FILE, ["class_0", "class_1"])
    return run


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _foreign(tmp_path) -> Path:
    """Another tool's folder: a checkpoint and notes, no transferkit marker."""
    folder = tmp_path / "elsewhere"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "important.ckpt").write_bytes(b"weeks of training")
    (folder / "notes.txt").write_text("mine")
    return folder


# ------------------------------------------------------------------ 1. --overwrite: only what is ours

@pytest.mark.parametrize("command", ["train", "compare", "explain", "export", "ensemble", "evaluate"])
def test_overwrite_refuses_a_folder_transferkit_did_not_write(tmp_path, photos, finished_run, command):
    out = _foreign(tmp_path)
    before = _listing(out)
    args = {
        "train": ["train", str(photos), "-o", str(out), *TINY, "--overwrite"],
        "compare": ["compare", str(photos), "-o", str(out), *TINY, "--overwrite"],
        "explain": ["explain", str(finished_run), str(photos), "-o", str(out), "--overwrite"],
        "export": ["export", str(finished_run), "-o", str(out), "--overwrite"],
        "ensemble": ["ensemble", str(finished_run), str(finished_run), "-o", str(out), "--overwrite"],
        "evaluate": ["evaluate", str(finished_run), str(photos), "-o", str(out)],  # evaluate always replaces
    }[command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "was not written by transferkit" in result.output and str(out) in result.output
    assert _listing(out) == before  # nothing deleted, nothing added


def test_overwrite_of_a_transferkit_run_removes_only_the_files_it_names(tmp_path):
    run = tmp_path / "run"
    outputs.prepare_output_dir(run)  # marks the folder as transferkit's
    backup = run / "checkpoints" / "backup"
    backup.mkdir(parents=True)
    ours = [run / "head.skops", run / "checkpoints" / "best.weights.h5", run / "checkpoints" / "head.json",
            run / "checkpoints" / "history-fine-tune.csv", backup / "state.json", backup / "epoch-0003.weights.h5"]
    for path in ours:
        path.write_bytes(b"previous run")
    theirs = [run / "checkpoints" / "important.ckpt", backup / "notes.txt", run / "notes.txt"]
    for path in theirs:
        path.write_bytes(b"not transferkit's")
    outputs.clear_previous_run(run)
    assert not any(path.exists() for path in ours)
    assert all(path.read_bytes() == b"not transferkit's" for path in theirs)


def test_clear_previous_run_refuses_an_unmarked_folder(tmp_path):
    folder = _foreign(tmp_path)
    with pytest.raises(InputError, match="not a transferkit output folder"):
        outputs.clear_previous_run(folder)
    assert (folder / "checkpoints" / "important.ckpt").is_file()


# ------------------------------------------------------------------ 2. never inside an image folder

@pytest.mark.parametrize("case", ["train-o-equal", "train-o-inside", "train-o-symlink", "train-cache", "compare-o",
                                  "lr-find-o", "features-export-o", "explain-o", "explain-file-o"])
def test_outputs_inside_the_image_folder_are_refused(tmp_path, case):
    photos = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=4, image_size=32,
                               formats=("png",))
    (tmp_path / "link").symlink_to(photos / "class_0", target_is_directory=True)
    before = _listing(photos)
    args = {
        # The user's folder is passed twice on purpose (the reported loss of 12 photos).
        "train-o-equal": ["train", str(photos), "-o", str(photos), *TINY, "--overwrite"],
        "train-o-inside": ["train", str(photos), "-o", str(photos / "runs" / "a"), *TINY],
        "train-o-symlink": ["train", str(photos), "-o", str(tmp_path / "link" / "run"), *TINY],
        "train-cache": ["train", str(photos), "-o", str(tmp_path / "run"), "--cache-dir", str(photos / "cache"),
                        *TINY],
        "compare-o": ["compare", str(photos), "-o", str(photos / "cmp"), *TINY],
        "lr-find-o": ["lr-find", str(photos), "-o", str(photos / "lr.png"), *TINY],
        "features-export-o": ["features", "export", str(photos), "-o", str(photos / "f.npz"), *TINY],
        "explain-o": ["explain", str(tmp_path / "no-run"), str(photos), "-o", str(photos / "cams")],
        # One photo named, not its folder: the overlays may not land beside it.
        "explain-file-o": ["explain", str(tmp_path / "no-run"), str(sorted((photos / "class_0").iterdir())[0]),
                           "-o", str(photos / "class_0")],
    }[case]
    if case.startswith("explain"):  # a run folder is checked first: give it the two files it looks for
        (tmp_path / "no-run").mkdir()
        (tmp_path / "no-run" / "model.keras").write_bytes(b"")
        (tmp_path / "no-run" / "labels.txt").write_text("class_0\nclass_1\n")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "image folder" in result.output and "choose a path outside it" in result.output
    assert _listing(photos) == before and not (photos / "runs").exists()


# ------------------------------------------------------------------ 3. one writer per run folder

def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".transferkit-run").write_text("{}")  # a transferkit run folder...
    holder = os.open(run / ".transferkit-lock", os.O_RDWR | os.O_CREAT)  # ...another process is writing
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(InputError, match="being written by another transferkit process"):
            outputs.prepare_output_dir(run, overwrite=True)
    finally:
        os.close(holder)
    outputs.prepare_output_dir(run, overwrite=True)  # free again
    outputs.release_output_dir(run)


def test_the_lock_dies_with_a_killed_process_so_the_run_can_be_resumed(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time; from transferkit.serving import outputs; outputs.prepare_output_dir(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=rf"another transferkit process \(pid {process.pid}\)"):
            outputs.prepare_output_dir(run, overwrite=True)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    outputs.prepare_output_dir(run, overwrite=True)  # the system dropped the dead process's lock
    outputs.release_output_dir(run)


# ------------------------------------------------------------------ 4. atomic checkpoints, fallback

def _fine_tune_setup(tmp_path, epochs: int):
    import keras
    import tensorflow as tf

    from transferkit.training.finetune import fine_tune

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="predictions")(inputs))
    config = TrainConfig("unused", "unused", fine_tune_epochs=epochs, fine_tune_patience=0,
                         fine_tune_learning_rate=0.05, schedule="constant")

    def run():
        return fine_tune(model, config, {"predictions": 1.0}, data, data, steps_per_epoch=4,
                         checkpoint_dir=tmp_path / "checkpoints", verbose=0)

    return model, run


@pytest.mark.parametrize("target", ["backup", "best"])
def test_an_interrupt_inside_a_checkpoint_write_leaves_a_resumable_run(tmp_path, monkeypatch, target):
    """Two quick Ctrl-Cs land inside a weights write: the file being written must not be the one resumed."""
    import keras

    model, run = _fine_tune_setup(tmp_path, epochs=3)
    real_save = keras.Model.save_weights
    writes = []

    def interrupted_save(self, filepath, *args, **kwargs):
        if (target == "backup") == ("backup" in str(filepath)):
            writes.append(filepath)
            if len(writes) == 2:  # the second epoch's file: half written, then the interrupt
                Path(filepath).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
                raise KeyboardInterrupt
        return real_save(self, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save_weights", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(keras.Model, "save_weights", real_save)
    rows, improved = run()  # --resume: must neither crash nor repeat a finished epoch
    assert [row["epoch"] for row in rows] == [0, 1, 2] and improved


def test_a_damaged_latest_backup_falls_back_to_the_previous_one_with_a_warning(tmp_path, caplog):
    model, run = _fine_tune_setup(tmp_path, epochs=2)
    run()
    backup = tmp_path / "checkpoints" / "backup"
    latest = max((p for p in backup.glob("*.weights.h5")), key=lambda p: p.stat().st_mtime_ns)
    latest.write_bytes(latest.read_bytes()[:200])  # torn by a crash, or by anything else
    _, run_longer = _fine_tune_setup(tmp_path, epochs=4)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        rows, _ = run_longer()
    assert "damaged" in caplog.text and "falling back to the previous one (epoch 1)" in caplog.text
    assert [row["epoch"] for row in rows] == [0, 1, 2, 3]  # epoch 1 ran again, counted once


@pytest.mark.parametrize("content", [b"\x00\xff\xfe binary", b"not json", b"[1, 2]", b'"finished"',
                                     b'{"state": ["finished"]}', b""])
def test_a_damaged_status_file_is_an_unknown_state_not_a_traceback(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / runs.CONFIG_FILE).write_text("image_dir: photos\n")
    (run / runs.STATUS_FILE).write_bytes(content)
    assert runs.resumable_config(run) == run / runs.CONFIG_FILE
    assert runs.read_status(run) == {}
    (run / runs.STATUS_FILE).write_text('{"state": "finished"}')
    with pytest.raises(InputError, match="already finished"):
        runs.resumable_config(run)


# ------------------------------------------------------------------ 5. stopped during the report

def test_resume_of_a_run_stopped_during_its_report_writes_only_the_report(tmp_path, photos, monkeypatch):
    import transferkit.report.writer
    from transferkit.training import run as training

    config = tiny_config(photos, tmp_path / "run", cache_dir=str(tmp_path / "cache"))
    real_report = transferkit.report.writer.write_report

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transferkit.report.writer, "write_report", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, verbose=0)
    run = tmp_path / "run"
    assert json.loads((run / runs.STATUS_FILE).read_text())["state"] == "interrupted"
    assert not (run / "report.html").exists()
    model_before = (run / runs.MODEL_FILE).read_bytes()

    monkeypatch.setattr(transferkit.report.writer, "write_report", real_report)

    def no_training(*args, **kwargs):
        raise AssertionError("--resume trained again")

    monkeypatch.setattr(training, "_run_phases", no_training)
    result = training.run_training(training.prepare_training(config, resume=True), verbose=0, resume=True)
    assert (run / "report.html").is_file() and json.loads((run / runs.STATUS_FILE).read_text())["state"] == "finished"
    assert (run / runs.MODEL_FILE).read_bytes() == model_before
    assert result.metrics["test"]["accuracy"] == json.loads((run / runs.METRICS_FILE).read_text())["test"]["accuracy"]


# ------------------------------------------------------------------ 6. damaged run files

@pytest.mark.parametrize("name, content, message", [
    (runs.CONFIG_FILE, b"- a\n- b\n", "config.yaml.* mapping"),
    (runs.CONFIG_FILE, b"3\n", "config.yaml.* mapping"),
    (runs.CONFIG_FILE, b"backbone: \xff\xfe\n", "config.yaml.* not UTF-8"),
    (runs.LABELS_FILE, b"class_0\nclass\x00_1\n", "control character"),
])
def test_damaged_run_files_give_a_clear_error(tmp_path, finished_run, name, content, message):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / name).write_bytes(content)
    with pytest.raises(InputError, match=message):
        runs.load_run(run)


# ------------------------------------------------------------------ 7. a failed start, the lock file, releasing

def test_a_start_that_failed_after_claiming_the_folder_does_not_refuse_a_plain_rerun(tmp_path):
    run = tmp_path / "run"
    outputs.prepare_output_dir(run, command="evaluate")  # claimed (marker, lock file), then the command failed
    outputs.release_output_dir(run)
    assert sorted(p.name for p in run.iterdir()) == [runs.LOCK_FILE, runs.MARKER_FILE]
    outputs.prepare_output_dir(run, command="evaluate")  # no --overwrite needed: nothing of a run is there
    outputs.release_output_dir(run)


@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_bad_cache_folder_is_refused_before_the_output_folder_is_claimed(tmp_path, photos, command):
    (tmp_path / "a-file").write_text("not a folder")
    cache = tmp_path / "a-file" / "cache"  # cannot be created
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [command, str(photos), "-o", str(out), *TINY, "--cache-dir", str(cache)])
    assert result.exit_code == 2 and "--cache-dir" in result.output, result.output
    assert not out.exists()  # nothing created, marked or locked there


def _victim(tmp_path) -> Path:
    victim = tmp_path / "thesis.txt"
    victim.write_bytes(b"three years of work")
    run = tmp_path / "run"
    run.mkdir()
    (run / runs.MARKER_FILE).write_text("{}")
    return victim


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_linked_lock_file_is_refused_and_its_target_left_alone(tmp_path, link):
    victim = _victim(tmp_path)
    lock = tmp_path / "run" / runs.LOCK_FILE
    if link == "symlink":
        lock.symlink_to(victim)
    else:
        os.link(victim, lock)
    with pytest.raises(InputError, match=r"\.transferkit-lock is not a lock file transferkit can use \(a "
                                          + ("symbolic link" if link == "symlink" else "file with 2 hard links")):
        outputs.prepare_output_dir(tmp_path / "run", overwrite=True)
    assert victim.read_bytes() == b"three years of work"


def test_a_lock_file_holding_more_than_a_pid_is_locked_but_not_rewritten(tmp_path):
    _victim(tmp_path)
    lock = tmp_path / "run" / runs.LOCK_FILE
    lock.write_bytes(b"notes somebody keeps under that name")
    outputs.prepare_output_dir(tmp_path / "run", overwrite=True)
    outputs.release_output_dir(tmp_path / "run")
    assert lock.read_bytes() == b"notes somebody keeps under that name"
    lock.write_bytes(b"12345")  # a pid transferkit wrote: replaced by this process's
    outputs.prepare_output_dir(tmp_path / "run", overwrite=True)
    outputs.release_output_dir(tmp_path / "run")
    assert lock.read_bytes() == str(os.getpid()).encode()


def _held_elsewhere(folder: Path) -> bool:
    """Whether the folder's lock is held: a new open file description is refused as another process is."""
    fd = os.open(folder / runs.LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_folder_deleted_and_made_again_in_the_same_process_is_locked_again(tmp_path):
    run = tmp_path / "run"
    outputs.prepare_output_dir(run)
    shutil.rmtree(run)
    outputs.prepare_output_dir(run)
    try:
        assert _held_elsewhere(run)
    finally:
        outputs.release_output_dir(run)
    assert not _held_elsewhere(run)


def test_evaluate_and_ensemble_release_their_output_folder_however_they_end(tmp_path, photos, finished_run):
    from transferkit.errors import DataError
    from transferkit.evaluation.ensemble import ensemble_runs
    from transferkit.evaluation.evaluate import evaluate_run

    broken = tmp_path / "broken"  # photos cut short: found by the scan, undecodable during prediction
    for name in ("class_0", "class_1"):
        (broken / name).mkdir(parents=True)
        (broken / name / "a.png").write_bytes(sorted((photos / name).iterdir())[0].read_bytes()[:60])
    with pytest.raises(DataError, match="could be decoded"):
        evaluate_run(finished_run, broken, tmp_path / "eval", verbose=0)
    assert not _held_elsewhere(tmp_path / "eval")
    outputs.prepare_output_dir(tmp_path / "eval")  # and a plain re-run may use it
    outputs.release_output_dir(tmp_path / "eval")

    ensemble_runs([finished_run, finished_run], tmp_path / "ens", photos, verbose=0)
    assert (tmp_path / "ens" / runs.METRICS_FILE).is_file() and not _held_elsewhere(tmp_path / "ens")


# ------------------------------------------------------------------ 8. folders of earlier versions

EARLIER = {  # what each command wrote before the .transferkit-run marker existed
    "train": ["model.keras", "labels.txt", "config.yaml", "splits.csv", "history.csv", "metrics.json",
              "predictions.csv", "skipped.csv", "status.json", "report.html", "report.md"],
    "evaluate": ["metrics.json", "predictions.csv", "skipped.csv", "report.html", "report.md"],
    "compare": ["comparison.json", "comparison.csv", "comparison.md", "splits.csv", "skipped.csv", "accuracy.png"],
}


@pytest.mark.parametrize("command", sorted(EARLIER))
def test_overwrite_accepts_a_folder_an_earlier_version_wrote(tmp_path, command):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in EARLIER[command]:
        (run / name).write_bytes(b"previous run")
    (run / "checkpoints" / "best.weights.h5").write_bytes(b"previous run")
    outputs.prepare_output_dir(run, overwrite=True, command=command)
    outputs.release_output_dir(run)
    outputs.clear_previous_run(run)
    assert (run / runs.MARKER_FILE).is_file() and not (run / "checkpoints").exists()


def test_overwrite_still_refuses_a_folder_with_only_some_of_those_names(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "model.keras").write_bytes(b"my own model")
    (folder / "labels.txt").write_text("cat\ndog\n")
    with pytest.raises(InputError, match="was not written by transferkit"):
        outputs.prepare_output_dir(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["labels.txt", "model.keras"]


# ------------------------------------------------------------------ 9. one labels.txt reader; damaged settings

def test_every_labels_reader_reads_names_alike(tmp_path):
    from transferkit.report.data import RunFolder
    from transferkit.serving.predictors import read_labels

    labels = tmp_path / "labels.txt"
    labels.write_bytes("caf\xe9\nline\u2028sep\nnext\x85line\n".encode("utf-8").replace(b"\xc3\xa9", b"\xe9"))
    expected = ["caf\udce9", "line\u2028sep", "next\x85line"]  # a Latin-1 byte reads back as that byte
    assert runs.read_labels(labels) == expected
    assert read_labels(labels, tmp_path) == expected
    (tmp_path / "metrics.json").write_text(json.dumps({"confusion_matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}))
    assert RunFolder(tmp_path).class_names == expected


def test_a_report_without_readable_settings_says_why(tmp_path, caplog):
    from transferkit.report.data import RunFolder
    from transferkit.report.sections import PlotFolder
    from transferkit.report.writer import _Builder

    (tmp_path / "metrics.json").write_text(json.dumps({"confusion_matrix": [[1, 0], [0, 1]],
                                                       "class_names": ["a", "b"]}))
    (tmp_path / "config.yaml").write_text("- not\n- a mapping\n")
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        run = RunFolder(tmp_path)
    assert run.config == {} and "settings were left out" in caplog.text and "config.yaml" in caplog.text
    section = _Builder(run, PlotFolder(tmp_path)).configuration()
    assert "settings were left out" in repr(section) and "mapping" in repr(section)


def test_explain_of_one_photo_may_write_below_its_folder(tmp_path, monkeypatch):
    """'explain RUN photo.jpg -o cams' beside the photo: a photo named alone does not make its folder a dataset."""
    photos = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=2, image_size=32, formats=("png",))
    (tmp_path / "no-run").mkdir()
    (tmp_path / "no-run" / "model.keras").write_bytes(b"")  # passes the run-folder check, then fails to load
    (tmp_path / "no-run" / "labels.txt").write_text("class_0\nclass_1\n")
    monkeypatch.chdir(photos / "class_0")
    photo = sorted(Path(".").iterdir())[0]
    result = CliRunner().invoke(main, ["explain", str(tmp_path / "no-run"), str(photo), "-o", "cams"])
    assert "image folder" not in result.output
    assert "Cannot load model" in result.output, result.output
