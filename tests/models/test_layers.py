"""Preprocessing inside the model equals each family's own keras.applications preprocess_input."""

from __future__ import annotations

import numpy as np
import pytest

from transferkit.models.registry import get_backbone


@pytest.mark.parametrize("name, module", [
    ("mobilenet_v2", "mobilenet_v2"),   # tf: [-1, 1]
    ("resnet50", "resnet"),             # caffe: BGR, ImageNet mean subtracted
    ("vgg16", "vgg16"),                 # caffe
    ("densenet121", "densenet"),        # torch: ImageNet mean/std
    ("inception_v3", "inception_v3"),   # tf
    ("efficientnet_b0", "efficientnet"),  # none: rescales inside the model
    ("convnext_tiny", "convnext"),      # none
])
def test_preprocess_layer_matches_the_family_function(name, module):
    import importlib

    import keras

    from transferkit.models.layers import Preprocess

    spec = get_backbone(name)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = importlib.import_module(f"keras.applications.{module}").preprocess_input(pixels.copy())
    got = keras.ops.convert_to_numpy(Preprocess(mode=spec.preprocessing)(pixels))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_preprocess_layer_survives_save_and_safe_load(tmp_path):
    import keras

    from transferkit.models.layers import Preprocess

    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, Preprocess(mode="caffe")(inputs))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    x = np.full((1, 4, 4, 3), 200.0, dtype="float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_unknown_mode_is_refused():
    from transferkit.models.layers import Preprocess

    with pytest.raises(ValueError, match="Unknown preprocessing mode 'bgr'"):
        Preprocess(mode="bgr")


def test_a_mirrored_backbone_averages_each_image_and_its_mirror(tmp_path):
    """--flip-average: one flat graph whose features are (f(x) + f(mirror x)) / 2, saved and
    reloaded as such, under a cache key of its own."""
    import keras

    from transferkit.cache import FeatureSpec
    from transferkit.models.build import build_backbone
    from transferkit.serving.runs import save_model

    spec = get_backbone("tiny_test")
    keras.utils.set_random_seed(0)
    plain = build_backbone(spec, image_size=32)
    mirrored = build_backbone(spec, image_size=32, mirror=True)
    mirrored.set_weights(plain.get_weights())
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    expected = (plain.predict(images, verbose=0) + plain.predict(images[:, :, ::-1], verbose=0)) / 2
    np.testing.assert_allclose(mirrored.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(plain.predict(images, verbose=0), expected, atol=1e-3), "the mirror must differ here"
    assert all(not isinstance(layer, keras.Model) for layer in mirrored.layers), "flat, like every backbone"
    save_model(mirrored, tmp_path / "m.keras")
    import transferkit.models.layers  # noqa: F401 - registers the layers

    reloaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-5)
    keys = {FeatureSpec.for_model(spec, model).key() for model in (plain, mirrored)}
    assert len(keys) == 2 and FeatureSpec.for_model(spec, mirrored).tta == "hflip-mean"
