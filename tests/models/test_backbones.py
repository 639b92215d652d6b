"""Tests for the backbone registry: names, Keras weight files, flat models and block boundaries.

Every registry entry is built as Keras builds it for ImageNet weights (the weights file Keras asks
for is recorded, nothing is downloaded or loaded), with symbolic variables at a small input size
(the parameter count does not depend on the input size), so the whole file runs in about a minute.
"""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import subprocess
import sys

import numpy as np
import pytest

from transferkit.errors import InputError, UnknownBackboneError
from transferkit.models import build, registry
from transferkit.models.build import backbone_constructor, block_boundaries, build_backbone
from transferkit.models.registry import BackboneSpec, get_backbone, list_backbones, register_backbone
from transferkit.models.weights import keras_weights_file

KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
SPECS = list_backbones()
PRETRAINED = [spec for spec in SPECS if spec.pretrained]
BIG = 25_000_000  # parameters; entries above are marked slow (still run by default)


def small_size(spec: BackboneSpec) -> int:
    return max(spec.min_input_size, 32)


def by_size(specs):
    """Parametrize over specs, marking the big ones (they still run by default)."""
    return [pytest.param(spec, id=spec.name, marks=[pytest.mark.slow] if spec.num_params > BIG else [])
            for spec in specs]


@pytest.fixture
def symbolic_weights():
    """Variables get shapes but no values (Keras' StatelessScope defers them). For tests of graphs,
    shapes, parameter counts and weight file names, never of values: creating the TensorFlow
    variables is about 40% of a build."""
    import keras

    with keras.StatelessScope():
        yield


@pytest.fixture
def fresh_keras_session():
    """For tests that build: Keras' global name counters and graph state would otherwise grow
    across 50 builds. (Not autouse: clear_session's garbage collection costs ~0.2 s a test.)"""
    yield
    sys.modules["keras"].backend.clear_session()


# ------------------------------------------------------------------------------ registry


def test_importing_backbones_does_not_import_tensorflow_or_keras():
    code = "import sys, transferkit.models.registry; print(sorted({'tensorflow', 'keras'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_registry_has_every_imagenet_model_of_keras_applications():
    import keras

    keras_models = {name for name in dir(keras.applications) if name[0].isupper()}
    registered = {spec.constructor.rpartition(".")[2] for spec in SPECS if spec.pretrained}
    assert registered == keras_models


def test_registry_is_grouped_by_family_with_unique_names():
    families = [spec.family for spec in SPECS]
    # Each family is one contiguous run.
    runs = [f for i, f in enumerate(families) if i == 0 or families[i - 1] != f]
    assert len(runs) == len(set(runs))
    assert len({spec.name for spec in SPECS}) == len(SPECS)
    assert [spec.name for spec in SPECS if not spec.pretrained] == ["tiny_test"]
    for spec in SPECS:
        assert spec.preprocessing in registry.PREPROCESSING_MODES


def test_well_known_entries_come_from_the_keras_sources():
    assert (get_backbone("inception_v3").input_size, get_backbone("inception_v3").min_input_size) == (299, 75)
    assert get_backbone("xception").min_input_size == 71
    assert get_backbone("nasnet_large").input_size == 331
    assert get_backbone("efficientnet_b7").input_size == 600
    assert get_backbone("efficientnet_v2_s").input_size == 384
    assert get_backbone("resnet50").preprocessing == "caffe"
    assert get_backbone("resnet50_v2").preprocessing == "tf"
    assert get_backbone("densenet121").preprocessing == "torch"
    assert get_backbone("efficientnet_b0").preprocessing == "none"
    assert get_backbone("mobilenet_v3_small").feature_dim == 576  # conv_1 output, not the 1024 of the top
    assert get_backbone("mobilenet_v2_140").feature_dim == 1792


@pytest.mark.parametrize(
    "given, expected",
    [("ResNet50", "resnet50"), (" mobilenet-v2-035 ", "mobilenet_v2_035"), ("MobileNetV2", "mobilenet_v2"),
     ("EfficientNetV2B0", "efficientnet_v2_b0"), ("CONVNEXT_TINY", "convnext_tiny")],
)
def test_names_are_case_insensitive_and_accept_dashes_and_keras_names(given, expected):
    assert get_backbone(given).name == expected


def test_unknown_backbone_suggests_the_closest_name():
    with pytest.raises(UnknownBackboneError, match=r"^Unknown backbone 'resnet5'\. Did you mean: resnet50\? "
                                                   r"Run 'transferkit backbones' to list them\.$"):
        get_backbone("resnet5")
    with pytest.raises(InputError, match=r"^Unknown backbone 'zzz'\. Run 'transferkit backbones'"):
        get_backbone("zzz")


def test_specs_are_frozen_hashable_and_picklable():
    spec = get_backbone("mobilenet_v2_035")
    assert spec.kwargs["alpha"] == 0.35 and dict(spec.kwargs) == {"alpha": 0.35}
    with pytest.raises(TypeError):
        spec.kwargs["alpha"] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"
    assert {spec: 1}[dataclasses.replace(spec)] == 1
    assert pickle.loads(pickle.dumps(spec)) == spec


def test_register_backbone_is_idempotent_and_refuses_conflicts(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    spec = get_backbone("vgg16")
    register_backbone(dataclasses.replace(spec))  # equal spec: no-op
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(dataclasses.replace(spec, feature_dim=1))
    with pytest.raises(ValueError, match="snake_case"):
        register_backbone(dataclasses.replace(spec, name="My-Net"))
    plugin = dataclasses.replace(get_backbone("tiny_test"), name="my_plugin")
    register_backbone(plugin)
    assert get_backbone("My-Plugin") is plugin and list_backbones()[-1] is plugin


def test_backbone_constructor_imports_lazily():
    import keras

    from transferkit.testing import tiny_backbone

    assert backbone_constructor(get_backbone("mobilenet_v2")) is keras.applications.MobileNetV2
    assert backbone_constructor(get_backbone("tiny_test")) is tiny_backbone
    bad = dataclasses.replace(get_backbone("tiny_test"), constructor="transferkit.testing:nope")
    with pytest.raises(ImportError, match="cannot import constructor 'transferkit.testing:nope'"):
        backbone_constructor(bad)


def test_too_small_image_size_is_an_input_error():
    with pytest.raises(InputError, match=r"Image size 64 is too small for backbone 'xception' \(allowed: 71 px"):
        build_backbone(get_backbone("xception"), image_size=64)


# ------------------------------------------------------------------------------ Keras weight files


@pytest.mark.parametrize(
    "name, size, file_name",
    [
        ("mobilenet_v2_035", None, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"),
        ("mobilenet_v2_050", 96, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_96_no_top.h5"),
        ("mobilenet_v2", 200, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
        ("mobilenet_075", None, "mobilenet_7_5_224_tf_no_top.h5"),
        ("mobilenet", 160, "mobilenet_1_0_160_tf_no_top.h5"),
        ("mobilenet_025", 96, "mobilenet_2_5_224_tf_no_top.h5"),  # v1 has no 96 px file
        ("mobilenet_v3_large", 160, "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"),
        ("mobilenet_v3_small_minimalistic", None, "weights_mobilenet_v3_small_minimalistic_224_1.0_float_no_top_v2.h5"),
        ("efficientnet_b3", None, "efficientnetb3_notop.h5"),
        ("efficientnet_v2_s", None, "efficientnetv2-s_notop.h5"),
        ("resnet101_v2", None, "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ("densenet169", None, "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ("nasnet_large", None, "nasnet_large_no_top.h5"),
        ("convnext_xlarge", None, "convnext_xlarge_notop.h5"),
    ],
)
def test_keras_weights_file_names(name, size, file_name):
    assert keras_weights_file(get_backbone(name), size)[0] == file_name


def test_keras_weights_file_urls_and_hashes():
    assert keras_weights_file(get_backbone("mobilenet_075")) == (
        "mobilenet_7_5_224_tf_no_top.h5", KERAS_URL + "mobilenet/mobilenet_7_5_224_tf_no_top.h5", None)
    assert keras_weights_file(get_backbone("resnet50")) == (
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        KERAS_URL + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "4d473c1dd8becc155b73f8504c6f6626")
    # EfficientNet (v1) is the one family served from outside .../tensorflow/.
    assert keras_weights_file(get_backbone("efficientnet_b0"))[1] == (
        "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5")
    # NASNet is cached under another name than it is served.
    assert keras_weights_file(get_backbone("nasnet_mobile"))[:2] == (
        "nasnet_mobile_no_top.h5", KERAS_URL + "nasnet/NASNet-mobile-no-top.h5")
    assert keras_weights_file(get_backbone("nasnet_large"))[2] == "d81d89dc07e6e56530c4e77faddd61b5"
    assert len(keras_weights_file(get_backbone("convnext_tiny"))[2]) == 64  # sha256, not md5
    assert keras_weights_file(get_backbone("tiny_test")) is None


def test_every_pretrained_entry_has_a_weights_file_and_a_hash_where_keras_checks_one():
    for spec in PRETRAINED:
        file_name, url, file_hash = keras_weights_file(spec)
        assert url.startswith("https://storage.googleapis.com/") and file_name.endswith(".h5")
        assert (file_hash is None) == (spec.family in ("mobilenet", "mobilenet_v2")), spec.name


WEIGHTS_PATH = "/nowhere/requested-weights.h5"


@pytest.fixture
def keras_request(monkeypatch):
    """Replace Keras' get_file and Model.load_weights: record each (fname, origin, file_hash) Keras
    asks for, download and load nothing (the graph is the one Keras builds for ImageNet weights)."""
    import keras
    from keras.src.utils import file_utils

    signature = inspect.signature(file_utils.get_file)
    calls = []

    def fake_get_file(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        calls.append((bound["fname"], bound["origin"], bound.get("file_hash")))
        return WEIGHTS_PATH

    def fake_load_weights(model, path, *args, **kwargs):
        assert path == WEIGHTS_PATH, f"Keras loaded {path}, not the file it asked for"

    monkeypatch.setattr(file_utils, "get_file", fake_get_file)
    monkeypatch.setattr(keras.Model, "load_weights", fake_load_weights)
    return calls


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined or non-square")
@pytest.mark.parametrize("spec, size", [
    pytest.param(get_backbone(name), size, id=f"{name}-{size}") for name, size in
    [("mobilenet", 128), ("mobilenet", 192), ("mobilenet_050", 96), ("mobilenet_v2_035", 96),
     ("mobilenet_v2_130", 160), ("mobilenet_v2", 224), ("mobilenet_v2_075", 100)]])
def test_keras_asks_for_exactly_the_file_we_name_at_other_sizes(spec, size, keras_request, symbolic_weights,
                                                                 fresh_keras_session):
    """MobileNet v1 and v2 choose the file by input size (every entry is observed at its small size
    by the build test below)."""
    build_backbone(spec, weights="imagenet", image_size=size)
    assert keras_request == [keras_weights_file(spec, size)]


# ------------------------------------------------------------------------------ models and blocks

EXPECTED_BLOCKS = {
    "mobilenet": [f"block_{i}" for i in range(1, 14)],
    "mobilenet_v2": ["expanded_conv"] + [f"block_{i}" for i in range(1, 17)] + ["Conv_1"],
    "mobilenet_v3_small": ["expanded_conv"] + [f"expanded_conv_{i}" for i in range(1, 11)] + ["conv_1"],
    "vgg16": ["block1", "block2", "block3", "block4", "block5"],
    "inception_v3": [f"mixed{i}" for i in range(11)],
    "xception": [f"block{i}" for i in range(1, 15)],
    "tiny_test": ["block1", "block2", "block3"],
}
EXPECTED_ENDS = {
    "resnet50": ("conv2_block1", "conv5_block3"),
    "resnet152_v2": ("conv2_block1", "conv5_block3"),
    "efficientnet_b0": ("block1a", "top"),
    "efficientnet_v2_l": ("block1a", "top"),
    "inception_resnet_v2": ("mixed_5b", "conv_7b"),
    "densenet121": ("conv2_block1", "conv5_block16"),
    "nasnet_mobile": ("reduction_stem_1", "normal_12"),
    "convnext_tiny": ("stage_0_block_0", "stage_3_block_2"),
}


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined or non-square")
@pytest.mark.parametrize("spec", by_size(SPECS))
def test_every_backbone_builds_flat_with_its_blocks(spec, keras_request, symbolic_weights, fresh_keras_session):
    """Every entry, built as for ImageNet weights: Keras asks for exactly the file we name, and the
    model is flat, pooled, with the parameters and blocks of the registry."""
    import keras

    weights = "imagenet" if spec.pretrained else None
    model = build_backbone(spec, weights=weights, image_size=small_size(spec))
    assert keras_request == ([keras_weights_file(spec, small_size(spec))] if spec.pretrained else [])
    assert tuple(model.output.shape) == (None, spec.feature_dim)
    assert model.count_params() == spec.num_params
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    assert len(model.inputs) == 1 and model.layers[0].name == "image"
    assert model.layers[1].name == "preprocess" and model.layers[1].mode == spec.preprocessing

    blocks = block_boundaries(spec, model)
    names, ends = [name for name, _ in blocks], [end for _, end in blocks]
    assert len(blocks) == spec.num_blocks
    assert len(set(names)) == len(names)
    assert all(a < b for a, b in zip(ends, ends[1:], strict=False))
    assert ends[0] > 2  # the stem (input, preprocessing, first conv) is in no block
    assert ends[-1] == len(model.layers) - 1  # pooling counts with the last block
    if spec.name in EXPECTED_BLOCKS:
        assert names == EXPECTED_BLOCKS[spec.name]
    if spec.name in EXPECTED_ENDS:
        assert (names[0], names[-1]) == EXPECTED_ENDS[spec.name]


def test_block_boundaries_point_at_each_blocks_last_layer():
    spec = get_backbone("resnet50")
    model = build_backbone(spec, image_size=32)
    layer_names = [layer.name for layer in model.layers]
    blocks = dict(block_boundaries(spec, model))
    assert layer_names[blocks["conv2_block1"]] == "conv2_block1_out"
    assert layer_names[blocks["conv4_block6"]] == "conv4_block6_out"
    assert layer_names[blocks["conv5_block3"]] == "avg_pool"


def test_block_boundaries_needs_a_known_family():
    spec = dataclasses.replace(get_backbone("tiny_test"), family="mystery")
    with pytest.raises(ValueError, match="family 'mystery' with no block rule"):
        block_boundaries(spec, None)


def test_flattening_convnext_keeps_its_weights_and_outputs():
    import keras

    from transferkit.models.layers import Preprocess

    image = keras.Input((32, 32, 3), name="image")
    pixels = Preprocess(mode="none")(image)
    nested = keras.applications.ConvNeXtTiny(include_top=False, weights=None, input_tensor=pixels, pooling="avg")
    nested = keras.Model(image, nested.output)
    flat = build._flatten(nested)
    assert not any(isinstance(layer, keras.Model) for layer in flat.layers)
    assert flat.count_params() == nested.count_params()
    batch = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(flat.predict(batch, verbose=0), nested.predict(batch, verbose=0), atol=1e-5)
    # Each layer is called once, so layer.output belongs to this graph (Grad-CAM sub-models work).
    probe = keras.Model(flat.input, flat.get_layer("convnext_tiny_downsampling_conv_2").output)
    assert probe.output.shape[-1] == 768


def test_efficientnet_weights_from_a_file_get_the_same_graph_as_imagenet(tmp_path):
    """Keras adds a rescaling layer to EfficientNet only for weights="imagenet"; a file must get it too."""
    import keras

    spec = get_backbone("efficientnet_b0")
    plain = build_backbone(spec, weights=None, image_size=32)
    path = tmp_path / "b0.weights.h5"
    plain.save_weights(path)
    keras.backend.clear_session()
    loaded = build_backbone(spec, weights=str(path), image_size=32)
    assert len(loaded.layers) == len(plain.layers) + 1
    rescalings = [layer for layer in loaded.layers if isinstance(layer, keras.layers.Rescaling)]
    assert len(rescalings) == 2
    for a, b in zip(plain.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
