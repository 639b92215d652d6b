"""Flags do what they say (or are refused before any work), and what a run prints is true (issue 14):
--deterministic, --tensorboard, --xla, phase lines and metrics.json, progress output, help texts,
one meaning for -o."""

from __future__ import annotations

import json
import re
import sys

import click
import numpy as np
import pytest
from click.testing import CliRunner

from transferkit.cli import main
from transferkit.testing import make_image_folder

TINY = ["--backbone", "tiny_test", "--weights", "none", "--image-size", "32", "--batch-size", "8",
        "--learning-rate", "0.01", "--epochs", "5"]
#: What a live progress bar writes: colour codes, carriage returns, backspaces.
TERMINAL_CONTROL = re.compile(r"[\x1b\r\b]")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("flags") / "photos", num_classes=3, images_per_class=10,
                             image_size=32, formats=("png",))


def _train(tmp_path, folder, *args):
    result = CliRunner().invoke(main, ["train", str(folder), "-o", str(tmp_path / "run"), "--cache-dir",
                                       str(tmp_path / "cache"), *TINY, *args])
    return result, tmp_path / "run"


def _metrics(run):
    return json.loads((run / "metrics.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- --deterministic, --xla


@pytest.fixture
def op_determinism_off_afterwards():
    """--deterministic turns TensorFlow's op determinism on for the whole process: off for the next tests."""
    yield
    from tensorflow.python.framework import config as tf_config  # the public API has only enable_op_determinism

    tf_config.disable_op_determinism()


def test_deterministic_fine_tuning_runs_at_the_default_seed(tmp_path, folder, op_determinism_off_afterwards):
    from transferkit.runtime import xla_device

    result, run = _train(tmp_path, folder, "--strategy", "fine-tune-top", "--fine-tune-epochs", "1",
                         "--deterministic", "--xla", "-v")
    assert result.exit_code == 0, result.output
    fine_tune = _metrics(run)["fine_tune"]
    assert fine_tune["epochs_run"] == 1 and fine_tune["device"] == xla_device()
    # Keras compiles without XLA under op determinism: the run says so and records what was used.
    assert fine_tune["xla"] is False and "--xla: Keras compiled the fine-tune step without XLA" in result.output
    assert not TERMINAL_CONTROL.search(result.output), "a redirected log gets no live progress bar"


def test_xla_on_a_cpu_is_honoured_with_a_warning(caplog):
    from types import SimpleNamespace

    from transferkit.config import TrainConfig
    from transferkit.runtime import xla_device
    from transferkit.training.finetune import _say_xla

    with caplog.at_level("WARNING", logger="transferkit"):
        _say_xla(TrainConfig("photos", "run", xla=True), SimpleNamespace(jit_compile=True))
        _say_xla(TrainConfig("photos", "run"), SimpleNamespace(jit_compile=False))
    warned = [r.getMessage() for r in caplog.records]
    if xla_device() != "CPU":
        assert warned == []
    else:
        assert len(warned) == 1 and "--xla on a machine without a GPU or TPU" in warned[0]
        assert "12x slower" in warned[0] and "Going on with XLA as asked; drop --xla" in warned[0]


def test_augmentation_crops_repeat_at_seed_0_and_change_every_epoch(folder):
    """The crop was a stateful op whose seed 0 meant "unseeded": never the same twice (and refused
    under op determinism)."""
    from transferkit.config import TrainConfig
    from transferkit.data.augment import training_images

    config = TrainConfig(str(folder), "run", augment_flip=False, augment_rotation=0, augment_brightness=0,
                         augment_contrast=0, augment_pca=0)
    path = str(next((folder / "class_0").iterdir()))

    def epochs(dataset, n=2):
        return [next(iter(dataset))[0].numpy() for _ in range(n)]

    first, second = (epochs(training_images([path], np.array([0]), 32, 1, config=config, shuffle=True, seed=0))
                     for _ in range(2))
    np.testing.assert_array_equal(first[0], second[0])  # the same run again: the same crop
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], first[1]), "every epoch draws new crops"


# ----------------------------------------------------------------------------- --tensorboard


def test_tensorboard_without_the_package_fails_before_any_work(tmp_path, folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what "not installed" looks like to an import
    result, run = _train(tmp_path, folder, "--tensorboard")
    assert result.exit_code == 2, result.output
    assert "pip install 'transferkit[tensorboard]'" in result.output and "Traceback" not in result.output
    assert not run.exists() and not (tmp_path / "cache").exists()


def test_tensorboard_with_a_scikit_learn_head_is_refused(tmp_path, folder):
    result, run = _train(tmp_path, folder, "--tensorboard", "--head", "logreg")
    assert result.exit_code == 2 and "--head logreg" in result.output and "--tensorboard" in result.output
    assert not run.exists()


def test_freeze_all_logs_its_head_to_tensorboard_and_says_what_it_trained_on(tmp_path, folder):
    result, run = _train(tmp_path, folder, "--tensorboard", "--augment-views", "1", "--xla", "--head-solver", "adam")
    assert result.exit_code == 0, result.output
    logs = run / "checkpoints" / "logs" / "head"
    assert list((logs / "train").glob("events.out.tfevents.*")) and list((logs / "validation").glob("events.*"))
    # The views the head trained on, in the phase line and in metrics.json (was: augmentation "none").
    assert "trains on each training image and 1 cached augmented view of it" in result.output
    assert _metrics(run)["augmentation"].startswith("head: each training image and 1 cached augmented view")
    assert "--xla only shapes the fine-tune phase; freeze-all has none, so it is not used" in result.output
    assert not TERMINAL_CONTROL.search(result.output), "the extraction bar wrote terminal codes into a log"


def test_the_exact_head_says_which_flags_it_does_not_use(tmp_path, folder):
    result, run = _train(tmp_path, folder, "--tensorboard", "--epochs", "7", "--dropout", "0.2")
    assert result.exit_code == 0, result.output
    assert ("--epochs, --learning-rate, --dropout and --tensorboard only shape the Keras-trained head "
            "(--head-solver adam)" in result.output)
    assert not (run / "checkpoints" / "logs").exists()


def test_a_fresh_phase_drops_the_tensorboard_events_of_an_earlier_run_only(tmp_path):
    from transferkit.config import TrainConfig
    from transferkit.training.finetune import tensorboard_callbacks

    config = TrainConfig("photos", "run", tensorboard=True)
    old = tmp_path / "logs" / "head" / "train" / "events.out.tfevents.1.host"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"old run")
    notes = old.parent / "notes.txt"  # not Keras' file: left alone
    notes.write_text("mine")
    assert len(tensorboard_callbacks(config, tmp_path, "head", resumed=True)) == 1 and old.exists()
    tensorboard_callbacks(config, tmp_path, "head")  # --overwrite: a new run's curves must not mix with these
    assert not old.exists() and notes.read_text() == "mine"
    assert tensorboard_callbacks(TrainConfig("photos", "run"), tmp_path, "head") == []


# ----------------------------------------------------------------------------- scikit-learn heads


def test_phase_lines_describe_the_head_that_trains():
    from transferkit.config import TrainConfig
    from transferkit.training.choice import describe_phase
    from transferkit.training.strategies import plan_phases

    head = plan_phases("freeze-all", num_blocks=3)[0]
    sklearn = describe_phase(head, TrainConfig("photos", "run", head="logreg"))
    assert sklearn.startswith("scikit-learn head logreg on the cached features of train + val (grid search")
    assert not re.search(r"epochs|rate \d", sklearn), "a scikit-learn head has no epochs or learning rate"
    assert "default hyper-parameters" in describe_phase(head, TrainConfig("photos", "run", head="ridge", search=False))
    exact = describe_phase(head, TrainConfig("photos", "run"), mirrored=True)
    assert exact == ("exact softmax head on cached features (L2 strength chosen by cross-validation, "
                     "flip-averaged features)")
    assert not re.search(r"epochs|rate \d", exact), "the exact head has no epochs or learning rate"
    adam = describe_phase(head, TrainConfig("photos", "run", head_solver="adam"))
    assert adam == "head on cached features (up to 500 epochs, rate 0.001)"


def test_grid_searches_report_each_candidate(caplog):
    from sklearn.datasets import make_classification

    from transferkit.heads.registry import fit_head

    X, y = make_classification(60, 8, n_informative=4, n_classes=3, random_state=0)
    with caplog.at_level("INFO", logger="transferkit"):
        fitted = fit_head("logreg", X, y)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "logreg: grid search of 3 candidates x 5 folds (15 fits) on 60 images, then a refit of the " \
                       "best on all of them."
    assert [line.split(":")[1].strip() for line in lines[1:]] == [f"candidate {i} of 3 (C={c})"
                                                                  for i, c in ((1, 0.01), (2, 0.1), (3, 1.0))]
    best = lines[1 + [0.01, 0.1, 1.0].index(fitted.best_params_["clf__C"])]
    assert f"cross-validated accuracy {fitted.cv_score_:.3f}" in best, "the progress score is the search's score"


# ----------------------------------------------------------------------------- help texts and -o


def _commands(command=main, path=()):
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))
    yield path, command


def _option_names(command) -> set[str]:
    return {name for p in command.params for name in (*p.opts, *p.secondary_opts) if name.startswith("-")}


def test_help_names_only_options_that_exist():
    """A command's help may name its own options, or another command's as 'COMMAND --option'."""
    by_name: dict[str, set[str]] = {}
    for path, command in _commands():
        if path:
            by_name.setdefault(path[-1], set()).update(_option_names(command))
    for path, command in _commands():
        # Its own texts, as written (Click's rendering wraps lines at hyphens: --num-|shards).
        text = " ".join([command.help or "", command.short_help or ""]
                        + [getattr(p, "help", None) or "" for p in command.params])
        for before, option in re.findall(r"(?:([\w-]+)\s+)?(?<![\w-])(--[a-z][a-z0-9-]*)", text):
            known = _option_names(command) | {"--help"} | by_name.get(before, set())
            assert option in known, f"'transferkit {' '.join(path)} --help' names {option}, which it does not have"


def test_o_means_output_dir_for_folders_and_output_for_files_on_every_command():
    """-o is '-o/--output-dir' where a command writes a folder and '-o/--output' where it writes a
    file; either long name always has -o, and a file an -o names is only replaced with --overwrite."""
    seen = 0
    for path, command in _commands():
        for param in command.params:
            names = set(getattr(param, "opts", ())) | set(getattr(param, "secondary_opts", ()))
            if not names & {"-o", "--output", "--output-dir"}:
                continue
            seen += 1
            where = f"transferkit {' '.join(path)} {sorted(names)}"
            assert isinstance(param.type, click.Path), where
            if param.type.file_okay:  # a file
                assert names == {"-o", "--output"} and not param.type.dir_okay, where
                assert "--overwrite" in _option_names(command), f"{where}: no --overwrite"
            else:
                assert names == {"-o", "--output-dir"}, where
    assert seen >= 10


def test_predict_o_writes_and_refuses_to_replace_a_file_without_overwrite(tmp_path):
    existing = tmp_path / "mine.csv"
    existing.write_text("not transferkit's\n")
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    result = CliRunner().invoke(main, ["predict", str(tmp_path), str(image), "-o", str(existing)])
    assert result.exit_code == 2 and "Invalid value for -o/--output" in result.output
    assert "exists; pass --overwrite to replace it" in result.output  # before the run folder is even read
    assert existing.read_text() == "not transferkit's\n"


def test_readme_default_unfrozen_blocks_match_the_registry():
    from pathlib import Path

    from transferkit.models.registry import get_backbone
    from transferkit.training.strategies import default_unfreeze_blocks

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for name, claim, unfrozen, total in (("mobilenet_v2", "4 of MobileNetV2's 18", 4, 18),
                                         ("resnet50", "ResNet50's last stage, 3 of 16", 3, 16),
                                         ("vgg16", "VGG's `block5`, 1 of 5", 1, 5)):
        spec = get_backbone(name)
        assert claim in " ".join(readme.split()), f"README: {claim!r}"
        assert (default_unfreeze_blocks(spec.num_blocks), spec.num_blocks) == (unfrozen, total), name


def test_a_redirected_bar_prints_plain_lines_while_it_runs(capsys, monkeypatch):
    """On a pipe the bar is alive (a line per 5%, as a log of a long extraction needs) and plain."""
    from transferkit.progress import progress_bar

    monkeypatch.setattr("sys.stdout.isatty", lambda: False, raising=False)
    bar = progress_bar(400, "image", verbose=1)
    for _ in range(20):
        bar.add(20)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" - ")[0] for line in lines] == [f"{n}/400 images" for n in range(20, 400, 20)] + ["400/400"]
    assert not any(TERMINAL_CONTROL.search(line) for line in lines)
