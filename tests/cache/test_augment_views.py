"""Augmented views in the feature cache (``--augment-views K``): deterministic, cached, resumable."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from transferkit.cache import FeatureCache, FeatureSpec, extract_features
from transferkit.cache.views import augmentation_id, training_rows, with_view_rows
from transferkit.cli import main
from transferkit.config import TrainConfig
from transferkit.data.augment import augmented_view, view_seed
from transferkit.testing import make_image_folder

VIEWS = 3
CONFIG = TrainConfig(image_dir="photos", output_dir="run")
TINY = ["--backbone", "tiny_test", "--weights", "none", "--image-size", "32"]

_MODEL = """\
import keras
from transferkit.models.registry import get_backbone
from transferkit.models.weights import load_backbone, resolve_weights
keras.utils.set_random_seed(0)
spec = get_backbone("tiny_test")
model = load_backbone(spec, resolve_weights(spec, "none"), 32)
"""


@pytest.fixture
def tiny_model():
    """The backbone `transferkit extract --backbone tiny_test --weights none --seed 0` builds."""
    namespace: dict = {}
    exec(_MODEL, namespace)  # the very code the other process of the determinism test runs
    return namespace["model"]


@pytest.fixture
def photos(tmp_path):
    return make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=3, image_size=32)


def _paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _cache(root: Path, model) -> FeatureCache:
    from transferkit.models.registry import get_backbone

    return FeatureCache(root, FeatureSpec.for_model(get_backbone("tiny_test"), model))


def _extract(model, paths, cache_dir, config=CONFIG, **kwargs):
    cache = _cache(cache_dir, model) if cache_dir is not None else None
    return extract_features(model, paths, cache, batch_size=4, verbose=0, views=VIEWS, augmentation=config, **kwargs)


def test_view_zero_keeps_the_key_caches_had_before_views_and_each_view_has_its_own():
    spec = FeatureSpec("tiny_test", "w1", 32, "tf")
    assert spec.key() == "d48273e55be1e9e0", "the un-augmented key must not change: existing caches stay valid"
    settings = augmentation_id(CONFIG)
    keys = {spec.key(), spec.for_view(settings, 1).key(), spec.for_view(settings, 2).key(),
            spec.for_view(augmentation_id(CONFIG.replace(augment_pca=0.2)), 1).key(),
            spec.for_view(augmentation_id(CONFIG.replace(seed=1)), 1).key()}
    assert len(keys) == 5
    with pytest.raises(ValueError, match="needs both settings and a view >= 1"):
        dataclasses.replace(spec, view=1)


def test_a_view_is_a_function_of_its_seed():
    image = np.random.default_rng(0).uniform(0, 255, (32, 32, 3)).astype("float32")
    first = augmented_view(image, view_seed("ab" * 32, 1, 0), CONFIG).numpy()
    np.testing.assert_array_equal(first, augmented_view(image, view_seed("ab" * 32, 1, 0), CONFIG).numpy())
    assert first.shape == image.shape and 0 <= first.min() and first.max() <= 255
    assert not np.allclose(first, image)
    assert not np.allclose(first, augmented_view(image, view_seed("ab" * 32, 2, 0), CONFIG).numpy())
    assert not np.allclose(first, augmented_view(image, view_seed("ab" * 32, 1, 1), CONFIG).numpy())


def test_views_are_cached_by_content_and_a_second_run_computes_nothing(tmp_path, photos, tiny_model):
    paths = _paths(photos)
    first = _extract(tiny_model, paths, tmp_path / "cache")
    assert first.view_vectors.shape == (len(paths), VIEWS, 32)
    assert first.num_views_computed == len(paths) * VIEWS and first.num_views_cached == 0
    for i in range(len(paths)):
        rows = np.concatenate([first.vectors[i:i + 1], first.view_vectors[i]])
        gaps = np.abs(rows[:, None] - rows[None]).max(axis=2)
        assert (gaps + np.eye(VIEWS + 1) > 1e-4).all(), f"views of image {i} equal the image or each other"

    # A renamed image keeps its views (keyed by content); nothing is computed again.
    renamed = paths[0].with_name("renamed.png")
    shutil.move(paths[0], renamed)
    again = _extract(tiny_model, [renamed, *paths[1:]], tmp_path / "cache")
    assert (again.num_computed, again.num_views_computed) == (0, 0)
    assert again.num_views_cached == len(paths) * VIEWS
    np.testing.assert_array_equal(again.view_vectors, first.view_vectors)
    assert "augmented views: 0 computed, 18 from cache" in again.summary()

    # Fill-only (the CLI's extract) finds them too, without reading a vector.
    filled = _extract(tiny_model, paths[1:] + [renamed], tmp_path / "cache", keep_vectors=False)
    assert filled.view_vectors is None and filled.num_views_computed == 0


def test_changing_an_augmentation_setting_or_the_seed_is_a_miss(tmp_path, photos, tiny_model):
    paths = _paths(photos)
    base = _extract(tiny_model, paths, tmp_path / "cache")
    for changed in (CONFIG.replace(augment_contrast=0.3), CONFIG.replace(augment_flip=False), CONFIG.replace(seed=7)):
        other = _extract(tiny_model, paths, tmp_path / "cache", changed)
        assert other.num_computed == 0, "the images' own vectors do not depend on augmentation"
        assert other.num_views_computed == len(paths) * VIEWS and other.num_views_cached == 0
        assert not np.allclose(other.view_vectors, base.view_vectors)


def test_view_vectors_are_the_same_in_another_process(tmp_path, photos, tiny_model):
    paths = _paths(photos)
    here = _extract(tiny_model, paths, None)  # no cache: computed, seeded from each file's hash
    script = _MODEL + f"""
import sys, numpy as np
from pathlib import Path
from transferkit.cache import extract_features
from transferkit.config import TrainConfig
paths = sorted(p for p in Path(sys.argv[1]).rglob("*") if p.is_file())
result = extract_features(model, paths, None, batch_size=4, verbose=0, views={VIEWS},
                          augmentation=TrainConfig(image_dir="photos", output_dir="run"))
np.save(sys.argv[2], result.view_vectors)
"""
    done = subprocess.run([sys.executable, "-c", script, str(photos), str(tmp_path / "views.npy")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "views.npy"), here.view_vectors, rtol=1e-5, atol=1e-6)


def test_interrupted_view_extraction_keeps_finished_views_and_resumes(tmp_path, photos, tiny_model, monkeypatch):
    from transferkit.cache import compute

    paths = _paths(photos)
    expected = _extract(tiny_model, paths, None)
    real = compute.compiled_predict
    calls = []

    def interrupted_after_two_view_batches(model):
        predict = real(model)

        def run(images):
            calls.append(len(images))
            if len(calls) == 2 + 3:  # 2 batches of images' own vectors, then 2 batches of views
                raise KeyboardInterrupt
            return predict(images)

        return run

    monkeypatch.setattr(compute, "compiled_predict", interrupted_after_two_view_batches)
    with pytest.raises(KeyboardInterrupt):
        _extract(tiny_model, paths, tmp_path / "cache", flush_every=100)
    monkeypatch.undo()

    resumed = _extract(tiny_model, paths, tmp_path / "cache")
    assert resumed.num_views_cached == 8, "the 2 finished batches of 4 views were written on the interruption"
    assert resumed.num_views_computed == len(paths) * VIEWS - 8
    np.testing.assert_allclose(resumed.view_vectors, expected.view_vectors, rtol=1e-5, atol=1e-6)
    settings = augmentation_id(CONFIG)
    assert all(FeatureCache(tmp_path / "cache", _cache(tmp_path / "cache", tiny_model).spec.for_view(settings, k))
               .verify() == [] for k in range(1, VIEWS + 1))


def test_training_rows_append_the_views_of_training_images_only(tmp_path, photos, tiny_model):
    result = _extract(tiny_model, _paths(photos), None)
    labels = np.array([0, 0, 0, 1, 1, 1])
    train_idx, val_idx = np.array([0, 4]), np.array([1, 5])
    features, all_labels, rows = with_view_rows(result, labels, train_idx)
    np.testing.assert_array_equal(features[val_idx], result.vectors[val_idx])  # other indices stay valid
    assert len(rows) == 2 * (VIEWS + 1) and all_labels[rows].tolist() == [0, 1] + [0] * VIEWS + [1] * VIEWS
    np.testing.assert_array_equal(features[rows[2:2 + VIEWS]], result.view_vectors[0])
    X, y = training_rows(result, labels, train_idx)
    np.testing.assert_array_equal(X, features[rows])
    assert y.tolist() == all_labels[rows].tolist()
    plain = dataclasses.replace(result, view_vectors=None)
    assert training_rows(plain, labels, train_idx)[0].shape == (2, 32)


def test_cli_extract_then_export_one_row_per_view(tmp_path, photos):
    import csv

    cache = ["--cache-dir", str(tmp_path / "cache")]
    first = CliRunner().invoke(main, ["extract", str(photos), *TINY, *cache, "--augment-views", "2", "-q"])
    assert first.exit_code == 0, first.output
    assert "Augmented views (2 per image): computed: 12; already cached: 0" in first.output
    out = tmp_path / "features.csv"
    export = CliRunner().invoke(main, ["features", "export", str(photos), *TINY, *cache, "--augment-views", "2",
                                       "-o", str(out), "-q"])
    assert export.exit_code == 0, export.output
    assert "Wrote 18 rows x 32 features" in export.output
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["view"] for r in rows[:3]] == ["0", "1", "2"] and len({r["path"] for r in rows[:3]}) == 1
    info = CliRunner().invoke(main, ["cache", "info", *cache])
    assert info.output.count("augmented view") == 2, info.output
