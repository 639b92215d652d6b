"""Preprocessing inside the model equals each family's own keras.applications preprocess_input."""

from __future__ import annotations

import numpy as np
import pytest

from transferkit.backbones import get_backbone


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

    from transferkit.layers import Preprocess

    spec = get_backbone(name)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = importlib.import_module(f"keras.applications.{module}").preprocess_input(pixels.copy())
    got = keras.ops.convert_to_numpy(Preprocess(mode=spec.preprocessing)(pixels))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_preprocess_layer_survives_save_and_safe_load(tmp_path):
    import keras

    from transferkit.layers import Preprocess

    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, Preprocess(mode="caffe")(inputs))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    x = np.full((1, 4, 4, 3), 200.0, dtype="float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_unknown_mode_is_refused():
    from transferkit.layers import Preprocess

    with pytest.raises(ValueError, match="Unknown preprocessing mode 'bgr'"):
        Preprocess(mode="bgr")
