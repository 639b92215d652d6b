"""Shared fixtures: an isolated Keras home and feature cache per test, and the ../shared data."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite runs in pytest-xdist workers, one per core (setup.cfg's addopts). TensorFlow would give
# each worker thread pools as wide as the machine, and the pools of two workers then fight over the
# same cores; one thread each keeps every core busy with one worker's work. Set before TensorFlow
# loads (conftest is imported first); processes a test starts inherit it. A developer's value wins.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(_name, "1")

#: The team's shared folder (real ImageNet weights and photos), beside the checkout in CI.
SHARED_DIR = Path(os.environ.get("TRANSFERKIT_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
SHARED_WEIGHTS = SHARED_DIR / "imagenet-weights"
SHARED_DATASETS = SHARED_DIR / "datasets"


_frozen = False  # whether this process has frozen its objects (see pytest_runtest_setup)


def pytest_runtest_setup(item):
    """Once TensorFlow is imported, move every object alive to the garbage collector's permanent
    generation (gc.freeze): TensorFlow and Keras hold hundreds of thousands of objects that every
    full collection would otherwise walk again (Keras' clear_session collects after each build)."""
    global _frozen
    if "tensorflow" in sys.modules and not _frozen:
        gc.collect()
        gc.freeze()
        _frozen = True


def pytest_collection_modifyitems(items):
    """The slow tests first: the workers then end together, not one waiting on a late long test."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise


@pytest.fixture(autouse=True)
def isolated_homes(tmp_path_factory, monkeypatch):
    """Every test gets an empty Keras home, feature cache and data folder (TFDS images): no test sees
    the developer's files."""
    base = tmp_path_factory.mktemp("homes")
    monkeypatch.setenv("KERAS_HOME", str(base / "keras"))
    monkeypatch.setenv("TRANSFERKIT_CACHE_DIR", str(base / "cache"))
    monkeypatch.setenv("TRANSFERKIT_DATA_DIR", str(base / "data"))
    return base


@pytest.fixture
def no_downloads(monkeypatch):
    """Make Keras' download fail at once, as on a machine without a network."""

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr("transferkit.models.weights._download", refuse)


@pytest.fixture
def shared_keras_home(tmp_path, monkeypatch):
    """A Keras home whose ``models`` folder is ../shared/imagenet-weights (real ImageNet files)."""
    if not SHARED_WEIGHTS.is_dir():
        pytest.skip(f"real ImageNet weights not found at {SHARED_WEIGHTS} (set TRANSFERKIT_SHARED_DIR)")
    home = tmp_path / "keras-shared"
    home.mkdir()
    (home / "models").symlink_to(SHARED_WEIGHTS, target_is_directory=True)
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


def shared_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"real photo set {name} not found at {path} (set TRANSFERKIT_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished run shared by the session's tests that only read a run: ``(image folder,
    TrainResult)``. tiny_test backbone (random weights), 3 classes x 20 images (PNG and JPEG, 32 px),
    the default exact softmax head; the folder's feature cache is ``<root>/cache``. Tests must not
    change its files: copy the run folder first."""
    from transferkit.config import TrainConfig
    from transferkit.testing import make_image_folder
    from transferkit.training.run import train

    root = tmp_path_factory.mktemp("tiny-run")
    folder = make_image_folder(root / "photos", num_classes=3, images_per_class=20, image_size=32,
                               formats=("png", "jpg"))
    config = TrainConfig(image_dir=str(folder), output_dir=str(root / "run"), backbone="tiny_test", weights="none",
                         batch_size=8, cache_dir=str(root / "cache"))
    return folder, train(config, verbose=0)


@pytest.fixture
def image_folder(tmp_path):
    """A small learnable synthetic folder: 3 classes x 12 images, 32 px, mixed formats."""
    from transferkit.testing import make_image_folder

    return make_image_folder(tmp_path / "photos", num_classes=3, images_per_class=12, image_size=32,
                             formats=("png", "jpg", "bmp"))
