"""Weights resolution: Keras cache, bundled file, download failure message, bad files, import."""

from __future__ import annotations

import pytest

from transferkit.errors import InputError, WeightsError
from transferkit.models.registry import get_backbone
from transferkit.models.weights import (
    BUNDLED_WEIGHTS_DIR,
    find_offline,
    import_weights,
    keras_models_dir,
    keras_weights_file,
    load_backbone,
    resolve_weights,
)

BUNDLED_NAME = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"


def test_keras_models_dir_follows_keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert keras_models_dir() == tmp_path / "kh" / "models"


def test_bundled_starter_weights_are_found_offline():
    spec = get_backbone("mobilenet_v2_035")
    resolved = resolve_weights(spec, "imagenet", download=False)
    assert resolved.kind == "imagenet"
    assert resolved.path == BUNDLED_WEIGHTS_DIR / BUNDLED_NAME
    assert "bundled" in resolved.source


def test_none_means_random_initialisation():
    resolved = resolve_weights(get_backbone("resnet50"), "none")
    assert resolved.kind == "random" and resolved.keras_arg is None


def test_missing_weights_message_names_file_folder_and_fix(no_downloads, isolated_homes):
    spec = get_backbone("resnet50")
    file_name = keras_weights_file(spec)[0]
    with pytest.raises(WeightsError) as info:
        resolve_weights(spec, "imagenet")
    message = str(info.value)
    assert file_name in message
    assert str(keras_models_dir()) in message
    assert "transferkit weights import" in message and "--weights none" in message
    assert "network is unreachable" in message


def test_missing_weights_path_is_a_usage_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        resolve_weights(get_backbone("resnet50"), str(tmp_path / "nope.h5"))


def test_keras_cache_is_used_before_the_bundled_copy(tmp_path, monkeypatch):
    models = tmp_path / "kh" / "models"
    models.mkdir(parents=True)
    (models / BUNDLED_NAME).write_bytes((BUNDLED_WEIGHTS_DIR / BUNDLED_NAME).read_bytes())
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert find_offline(get_backbone("mobilenet_v2_035")) == models / BUNDLED_NAME


def test_shared_weights_resolve_through_keras_cache(shared_keras_home):
    resolved = resolve_weights(get_backbone("mobilenet_075"), "imagenet", download=False)
    assert resolved.path.name == "mobilenet_7_5_224_tf_no_top.h5"
    assert "Keras cache" in resolved.source


def test_corrupt_weights_file_gives_a_clear_error(tmp_path):
    bad = tmp_path / "broken.h5"
    bad.write_bytes(b"this is not HDF5")
    spec = get_backbone("tiny_test")
    with pytest.raises(WeightsError, match="could not be loaded into backbone 'tiny_test'"):
        load_backbone(spec, resolve_weights(spec, str(bad)), 32)


def test_weights_of_another_backbone_are_refused():
    spec = get_backbone("tiny_test")
    wrong = resolve_weights(spec, str(BUNDLED_WEIGHTS_DIR / BUNDLED_NAME))
    with pytest.raises(WeightsError, match="without the classification top"):
        load_backbone(spec, wrong, 32)


def test_import_verifies_and_places_file_in_keras_cache(tmp_path):
    source = tmp_path / "downloaded.h5"
    source.write_bytes((BUNDLED_WEIGHTS_DIR / BUNDLED_NAME).read_bytes())
    target = import_weights(source, get_backbone("mobilenet_v2_035"))
    assert target == keras_models_dir() / BUNDLED_NAME
    assert target.read_bytes() == source.read_bytes()
    assert find_offline(get_backbone("mobilenet_v2_035")) == target


def test_import_refuses_a_file_for_another_backbone(tmp_path):
    source = tmp_path / "downloaded.h5"
    source.write_bytes((BUNDLED_WEIGHTS_DIR / BUNDLED_NAME).read_bytes())
    with pytest.raises(WeightsError, match="could not be loaded into backbone 'mobilenet_v2'"):
        import_weights(source, get_backbone("mobilenet_v2"))
    assert not (keras_models_dir() / keras_weights_file(get_backbone("mobilenet_v2"))[0]).exists()
