"""Backbone registry: name -> Keras constructor, input size, preprocessing, feature size, blocks.

Every ImageNet-pretrained model of ``keras.applications`` (Keras 3.15) is registered here, under a
lowercase snake_case name. The numbers in the table (sizes, feature dims, parameter and block
counts, weight file names and hashes) were read from the Keras sources or measured by building
each model once; ``tests/test_backbones.py`` checks them against Keras.

This module imports no TensorFlow or Keras at import time (``transferkit backbones`` lists the
registry instantly); Keras is imported inside the functions that build models.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from transferkit.config import PREPROCESSING_MODES
from transferkit.errors import InputError, UnknownBackboneError


class _Kwargs(Mapping):
    """A read-only, hashable, picklable dict, so a frozen BackboneSpec stays hashable."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._data = dict(data or {})

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._data.items())))

    def __repr__(self) -> str:
        return repr(self._data)

    def __reduce__(self):
        return (_Kwargs, (self._data,))


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry: everything needed to build a backbone and use it correctly.

    Attributes:
        name: lowercase snake_case registry name, e.g. ``"mobilenet_v2_035"``.
        family: architecture family; selects the block rule and the Keras weight-file naming.
        constructor: ``"keras.applications.MobileNetV2"`` or ``"package.module:function"``.
        kwargs: extra constructor arguments, e.g. ``{"alpha": 0.35}`` (read-only).
        input_size: native square input size in pixels.
        feature_dim: channels of the globally average-pooled output.
        preprocessing: ``"tf"`` ([-1, 1]), ``"caffe"`` (BGR, mean subtraction), ``"torch"``
            (/255, ImageNet mean/std) or ``"none"`` (the model rescales inside).
        num_params: parameters of the no-top model (measured).
        num_blocks: blocks :func:`block_boundaries` finds (measured).
        min_input_size: smallest input size Keras accepts.
        pretrained: whether Keras has ImageNet weights (False only for test backbones).
    """

    name: str
    family: str
    constructor: str
    kwargs: Mapping[str, Any]
    input_size: int
    feature_dim: int
    preprocessing: str
    num_params: int
    num_blocks: int
    min_input_size: int
    pretrained: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", _Kwargs(self.kwargs))


# Per family: preprocessing mode, minimum input size (Keras' ``min_size``), and the block rule
# (see block_boundaries). ``follow``: a layer not named after a block belongs to the block before
# it (Keras-named ``add``/``activation`` layers inside a block). ``precede``: it belongs to the
# block after it, for families whose blocks start with Keras-named layers (Inception branches,
# NASNet cells) or with a transition that feeds the next stage (DenseNet, ConvNeXt downsampling,
# like the strided first block of a ResNet stage).
_FAMILIES: dict[str, tuple[str, int, str, str, str]] = {
    # Keras names no MobileNet v1 block; "block_i" spans conv_pad_i/conv_dw_i/conv_pw_i, as in V2.
    "mobilenet": ("tf", 32, "follow", r"conv_(?:pad|dw|pw)_(\d+)(?:_|$)", r"block_\1"),
    "mobilenet_v2": ("tf", 32, "follow", r"(expanded_conv|block_\d+|Conv_1)(?:_|$)", r"\1"),
    "mobilenet_v3": ("none", 32, "follow", r"(expanded_conv(?:_\d+)?|conv_1)(?:_|$)", r"\1"),
    "efficientnet": ("none", 32, "follow", r"(block\d+[a-z]|top)_", r"\1"),
    "efficientnet_v2": ("none", 32, "follow", r"(block\d+[a-z]|top)_", r"\1"),
    "resnet": ("caffe", 32, "follow", r"(conv\d_block\d+)_", r"\1"),
    "resnet_v2": ("tf", 32, "follow", r"(conv\d_block\d+)_", r"\1"),
    "vgg": ("caffe", 32, "follow", r"(block\d+)_", r"\1"),
    "inception_v3": ("tf", 75, "precede", r"(mixed\d+)$", r"\1"),
    # block8_10 has no activation: its Keras-named scale layer goes with conv_7b (no weights).
    "inception_resnet_v2": (
        "tf", 75, "precede", r"(mixed_\d[a-z]|block(?:35|17|8)_\d+|conv_7b)(?:_|$)", r"\1"),
    "xception": ("tf", 71, "follow", r"(block\d+)_", r"\1"),
    # One block per dense layer (the same convK_blockJ unit as ResNet), so "top N" stays a
    # fine-grained choice; a transition (poolK_*) counts with the first dense layer it feeds.
    "densenet": ("torch", 32, "precede", r"(conv\d_block\d+)_", r"\1"),
    # A cell ends at its concat layer; the next cell's "adjust" layers interleave before it.
    "nasnet": ("tf", 32, "precede", r"(normal|reduction)_concat_(?:reduce_)?(\w+)$", r"\1_\2"),
    "convnext": ("none", 32, "precede", r"convnext_[a-z]+_(stage_\d+_block_\d+)_", r"\1"),
    # Test and plug-in backbones name their layers "block<i>_...".
    "test": ("tf", 8, "follow", r"(block\d+)_", r"\1"),
}

# Families whose Keras constructor has ``include_preprocessing`` (True = "none" mode is right).
_INCLUDE_PREPROCESSING = {"mobilenet_v3", "efficientnet_v2", "convnext"}

# name, family, keras.applications constructor, kwargs, input size, feature dim, params, blocks.
_TABLE: list[tuple[str, str, str, dict[str, Any], int, int, int, int]] = [
    ("mobilenet_025", "mobilenet", "MobileNet", {"alpha": 0.25}, 224, 256, 218544, 13),
    ("mobilenet_050", "mobilenet", "MobileNet", {"alpha": 0.5}, 224, 512, 829536, 13),
    ("mobilenet_075", "mobilenet", "MobileNet", {"alpha": 0.75}, 224, 768, 1832976, 13),
    ("mobilenet", "mobilenet", "MobileNet", {"alpha": 1.0}, 224, 1024, 3228864, 13),
    ("mobilenet_v2_035", "mobilenet_v2", "MobileNetV2", {"alpha": 0.35}, 224, 1280, 410208, 18),
    ("mobilenet_v2_050", "mobilenet_v2", "MobileNetV2", {"alpha": 0.5}, 224, 1280, 706224, 18),
    ("mobilenet_v2_075", "mobilenet_v2", "MobileNetV2", {"alpha": 0.75}, 224, 1280, 1382064, 18),
    ("mobilenet_v2", "mobilenet_v2", "MobileNetV2", {"alpha": 1.0}, 224, 1280, 2257984, 18),
    ("mobilenet_v2_130", "mobilenet_v2", "MobileNetV2", {"alpha": 1.3}, 224, 1664, 3766048, 18),
    ("mobilenet_v2_140", "mobilenet_v2", "MobileNetV2", {"alpha": 1.4}, 224, 1792, 4363712, 18),
    ("mobilenet_v3_small_minimalistic", "mobilenet_v3", "MobileNetV3Small",
     {"alpha": 1.0, "minimalistic": True}, 224, 576, 441000, 12),
    ("mobilenet_v3_small_075", "mobilenet_v3", "MobileNetV3Small", {"alpha": 0.75}, 224, 432, 583160, 12),
    ("mobilenet_v3_small", "mobilenet_v3", "MobileNetV3Small", {"alpha": 1.0}, 224, 576, 939120, 12),
    ("mobilenet_v3_large_minimalistic", "mobilenet_v3", "MobileNetV3Large",
     {"alpha": 1.0, "minimalistic": True}, 224, 960, 1437608, 16),
    ("mobilenet_v3_large_075", "mobilenet_v3", "MobileNetV3Large", {"alpha": 0.75}, 224, 720, 1808736, 16),
    ("mobilenet_v3_large", "mobilenet_v3", "MobileNetV3Large", {"alpha": 1.0}, 224, 960, 2996352, 16),
    ("efficientnet_b0", "efficientnet", "EfficientNetB0", {}, 224, 1280, 4049571, 17),
    ("efficientnet_b1", "efficientnet", "EfficientNetB1", {}, 240, 1280, 6575239, 24),
    ("efficientnet_b2", "efficientnet", "EfficientNetB2", {}, 260, 1408, 7768569, 24),
    ("efficientnet_b3", "efficientnet", "EfficientNetB3", {}, 300, 1536, 10783535, 27),
    ("efficientnet_b4", "efficientnet", "EfficientNetB4", {}, 380, 1792, 17673823, 33),
    ("efficientnet_b5", "efficientnet", "EfficientNetB5", {}, 456, 2048, 28513527, 40),
    ("efficientnet_b6", "efficientnet", "EfficientNetB6", {}, 528, 2304, 40960143, 46),
    ("efficientnet_b7", "efficientnet", "EfficientNetB7", {}, 600, 2560, 64097687, 56),
    ("efficientnet_v2_b0", "efficientnet_v2", "EfficientNetV2B0", {}, 224, 1280, 5919312, 22),
    ("efficientnet_v2_b1", "efficientnet_v2", "EfficientNetV2B1", {}, 240, 1280, 6931124, 28),
    ("efficientnet_v2_b2", "efficientnet_v2", "EfficientNetV2B2", {}, 260, 1408, 8769374, 29),
    ("efficientnet_v2_b3", "efficientnet_v2", "EfficientNetV2B3", {}, 300, 1536, 12930622, 33),
    ("efficientnet_v2_s", "efficientnet_v2", "EfficientNetV2S", {}, 384, 1280, 20331360, 41),
    ("efficientnet_v2_m", "efficientnet_v2", "EfficientNetV2M", {}, 480, 1280, 53150388, 58),
    ("efficientnet_v2_l", "efficientnet_v2", "EfficientNetV2L", {}, 480, 1280, 117746848, 80),
    ("resnet50", "resnet", "ResNet50", {}, 224, 2048, 23587712, 16),
    ("resnet101", "resnet", "ResNet101", {}, 224, 2048, 42658176, 33),
    ("resnet152", "resnet", "ResNet152", {}, 224, 2048, 58370944, 50),
    ("resnet50_v2", "resnet_v2", "ResNet50V2", {}, 224, 2048, 23564800, 16),
    ("resnet101_v2", "resnet_v2", "ResNet101V2", {}, 224, 2048, 42626560, 33),
    ("resnet152_v2", "resnet_v2", "ResNet152V2", {}, 224, 2048, 58331648, 50),
    ("vgg16", "vgg", "VGG16", {}, 224, 512, 14714688, 5),
    ("vgg19", "vgg", "VGG19", {}, 224, 512, 20024384, 5),
    ("inception_v3", "inception_v3", "InceptionV3", {}, 299, 2048, 21802784, 11),
    ("inception_resnet_v2", "inception_resnet_v2", "InceptionResNetV2", {}, 299, 1536, 54336736, 44),
    ("xception", "xception", "Xception", {}, 299, 2048, 20861480, 14),
    ("densenet121", "densenet", "DenseNet121", {}, 224, 1024, 7037504, 58),
    ("densenet169", "densenet", "DenseNet169", {}, 224, 1664, 12642880, 82),
    ("densenet201", "densenet", "DenseNet201", {}, 224, 1920, 18321984, 98),
    ("nasnet_mobile", "nasnet", "NASNetMobile", {}, 224, 1056, 4269716, 16),
    ("nasnet_large", "nasnet", "NASNetLarge", {}, 331, 4032, 84916818, 22),
    ("convnext_tiny", "convnext", "ConvNeXtTiny", {}, 224, 768, 27820128, 18),
    ("convnext_small", "convnext", "ConvNeXtSmall", {}, 224, 768, 49454688, 36),
    ("convnext_base", "convnext", "ConvNeXtBase", {}, 224, 1024, 87566464, 36),
    ("convnext_large", "convnext", "ConvNeXtLarge", {}, 224, 1536, 196230336, 36),
    ("convnext_xlarge", "convnext", "ConvNeXtXLarge", {}, 224, 2048, 348147968, 36),
]

_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"

# The file_hash Keras passes to get_file for each no-top file (md5, or sha256 for ConvNeXt).
# MobileNet v1/v2 files are absent: Keras checks no hash for them.
_NO_TOP_HASHES = {
    "weights_mobilenet_v3_small_minimalistic_224_1.0_float_no_top_v2.h5":
        "cde8136e733e811080d9fcd8a252f7e4",
    "weights_mobilenet_v3_small_224_0.75_float_no_top_v2.h5": "ebdb5cc8e0b497cd13a7c275d475c819",
    "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5": "d3e8ec802a04aa4fc771ee12a9a9b836",
    "weights_mobilenet_v3_large_minimalistic_224_1.0_float_no_top_v2.h5":
        "ec5221f64a2f6d1ef965a614bdae7973",
    "weights_mobilenet_v3_large_224_0.75_float_no_top_v2.h5": "40af19a13ebea4e2ee0c676887f69a2e",
    "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5": "07fb09a5933dd0c8eaafa16978110389",
    "efficientnetb0_notop.h5": "50bc09e76180e00e4465e1a485ddc09d",
    "efficientnetb1_notop.h5": "74c4e6b3e1f6a1eea24c589628592432",
    "efficientnetb2_notop.h5": "111f8e2ac8aa800a7a99e3239f7bfb39",
    "efficientnetb3_notop.h5": "af6d107764bb5b1abb91932881670226",
    "efficientnetb4_notop.h5": "ebc24e6d6c33eaebbd558eafbeedf1ba",
    "efficientnetb5_notop.h5": "38879255a25d3c92d5e44e04ae6cec6f",
    "efficientnetb6_notop.h5": "9ecce42647a20130c1f39a5d4cb75743",
    "efficientnetb7_notop.h5": "cbcfe4450ddf6f3ad90b1b398090fe4a",
    "efficientnetv2-b0_notop.h5": "893217f2bb855e2983157299931e43ff",
    "efficientnetv2-b1_notop.h5": "0e80663031ca32d657f9caa404b6ec37",
    "efficientnetv2-b2_notop.h5": "1dfe2e7a5d45b6632553a8961ea609eb",
    "efficientnetv2-b3_notop.h5": "f6abf7b5849ac99a89b50dd3fd532856",
    "efficientnetv2-s_notop.h5": "af0682fb74e8c54910f2d4393339c070",
    "efficientnetv2-m_notop.h5": "1b8dc055df72dde80d614482840fe342",
    "efficientnetv2-l_notop.h5": "b0b66b5c863aef5b46e8608fe1711615",
    "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5": "4d473c1dd8becc155b73f8504c6f6626",
    "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5": "88cf7a10940856eca736dc7b7e228a21",
    "resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5": "ee4c566cf9a93f14d82f913c2dc6dd0c",
    "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5": "fac2f116257151a9d068a22e544a4917",
    "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5": "c0ed64b8031c3730f411d2eb4eea35b5",
    "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5": "ed17cf2e0169df9d443503ef94b23b33",
    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5": "6d6bbae143d832006294945121d1f1fc",
    "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5": "253f8cb515780f3b799900260a226db6",
    "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5": "bcbd6486424b2319ff4ef7d526e38f63",
    "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5":
        "d19885ff4a710c122648d3b5c3b684e4",
    "xception_weights_tf_dim_ordering_tf_kernels_notop.h5": "b0042744bf5b25fce3cb969f33bebb97",
    "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5": "30ee3e1110167f948a6b9946edeeb738",
    "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5": "b8c4d4c20dd625c148057b9ff1c1176b",
    "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5": "c13680b51ded0fb44dff2d8f86ac8bb1",
    "nasnet_mobile_no_top.h5": "1ed92395b5b598bdda52abe5c0dbfd63",
    "nasnet_large_no_top.h5": "d81d89dc07e6e56530c4e77faddd61b5",
    "convnext_tiny_notop.h5": "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1",
    "convnext_small_notop.h5": "6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab",
    "convnext_base_notop.h5": "40a20c5548a5e9202f69735ecc06c990e6b7c9d2de39f0361e27baeb24cb7c45",
    "convnext_large_notop.h5": "96f02b6f0753d4f543261bc9d09bed650f24dd6bc02ddde3066135b63d23a1cd",
    "convnext_xlarge_notop.h5": "de3f8a54174130e0cecdc71583354753d557fcf1f4487331558e2a16ba0cfe05",
}

_REGISTRY: dict[str, BackboneSpec] = {}


def list_backbones() -> list[BackboneSpec]:
    """All registered backbones, grouped by family, small to large, plug-ins last.

    Example:
        >>> [spec.name for spec in list_backbones()][:2]
        ['mobilenet_025', 'mobilenet_050']
    """
    return list(_REGISTRY.values())


def _normalize(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def get_backbone(name: str) -> BackboneSpec:
    """The registry entry for a name, ignoring case and accepting ``-`` for ``_``.

    Keras class names work too (``"MobileNetV2"`` finds ``mobilenet_v2``).

    Raises:
        UnknownBackboneError: no such backbone; the message suggests the closest names.

    Example:
        >>> get_backbone("MobileNet-V2-035").input_size
        224
    """
    key = _normalize(name)
    if key in _REGISTRY:
        return _REGISTRY[key]
    squashed = {spec.name.replace("_", ""): spec for spec in _REGISTRY.values()}
    if key.replace("_", "") in squashed:
        return squashed[key.replace("_", "")]
    close = difflib.get_close_matches(key, _REGISTRY, n=3, cutoff=0.6)
    # Offer only the suggestions about as close as the best one ("resnet5" -> resnet50 only).
    best = difflib.SequenceMatcher(None, key, close[0]).ratio() if close else 0.0
    close = [c for c in close if difflib.SequenceMatcher(None, key, c).ratio() >= best - 0.05]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownBackboneError(
        f"Unknown backbone '{name}'.{hint} Run 'transferkit backbones' to list them."
    )


def register_backbone(spec: BackboneSpec) -> None:
    """Add a backbone (a plug-in or a test backbone) to the registry.

    Non-Keras constructors are ``"package.module:function"`` with the signature of a
    ``keras.applications`` constructor (``include_top``, ``weights``, ``input_tensor``,
    ``input_shape``, ``pooling`` and the spec's kwargs). Their layers should be named
    ``block<i>_...`` when the family is ``"test"``, so block_boundaries finds the blocks.

    Raises:
        ValueError: the name is taken by a different spec, or a field is invalid.

    Example:
        >>> register_backbone(get_backbone("vgg16"))  # the same spec again: no-op
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", spec.name):
        raise ValueError(f"Backbone name '{spec.name}' must be lowercase snake_case.")
    if spec.preprocessing not in PREPROCESSING_MODES:
        raise ValueError(
            f"Backbone '{spec.name}' has preprocessing '{spec.preprocessing}'; "
            f"allowed: {', '.join(PREPROCESSING_MODES)}."
        )
    old = _REGISTRY.get(spec.name)
    if old is not None and old != spec:
        raise ValueError(f"Backbone '{spec.name}' is already registered with a different spec.")
    _REGISTRY[spec.name] = spec


for _name, _family, _ctor, _kwargs, _size, _dim, _params, _blocks in _TABLE:
    register_backbone(BackboneSpec(
        _name, _family, f"keras.applications.{_ctor}", _kwargs, _size, _dim,
        _FAMILIES[_family][0], _params, _blocks, _FAMILIES[_family][1]))
del _name, _family, _ctor, _kwargs, _size, _dim, _params, _blocks
# The tiny CNN of transferkit.testing, for fast tests (random initialisation only).
register_backbone(BackboneSpec(
    "tiny_test", "test", "transferkit.testing:tiny_backbone", {}, 32, 32, "tf", 6200, 3, 8, pretrained=False))


def keras_weights_file(spec: BackboneSpec, image_size: int | None = None) -> tuple[str, str, str | None] | None:
    """The ``(file_name, origin_url, file_hash)`` Keras fetches for ``weights="imagenet"``.

    Mirrors each ``keras.applications`` constructor called with ``include_top=False`` at
    ``image_size`` (None = native), so the file can be found in ``$KERAS_HOME/models/`` or
    fetched with ``keras.utils.get_file(file_name, origin_url, cache_subdir="models",
    file_hash=file_hash)``. MobileNet v1/v2 pick the file by input size and fall back to 224
    for other sizes, as Keras does; ``file_hash`` is None where Keras checks none.

    Returns:
        The triple, or None for backbones without Keras ImageNet weights (test, plug-ins).

    Example:
        >>> keras_weights_file(get_backbone("mobilenet"), 160)[0]
        'mobilenet_1_0_160_tf_no_top.h5'
    """
    prefix = "keras.applications."
    if not spec.pretrained or not spec.constructor.startswith(prefix):
        return None
    rows = spec.input_size if image_size is None else int(image_size)
    family, ctor = spec.family, spec.constructor[len(prefix):]
    alpha = spec.kwargs.get("alpha", 1.0)
    url_dir = _KERAS_URL + family + "/"  # the folder is the family name, except where set below
    if family == "mobilenet":
        rows = rows if rows in (128, 160, 192, 224) else 224
        alpha_text = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0"}.get(alpha, "2_5")
        file_name = f"mobilenet_{alpha_text}_{rows}_tf_no_top.h5"
    elif family == "mobilenet_v2":
        rows = rows if rows in (96, 128, 160, 192, 224) else 224
        file_name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"
    elif family == "mobilenet_v3":  # always the 224 file; Keras only warns for other sizes
        minimal = "_minimalistic" if spec.kwargs.get("minimalistic") else ""
        model_type = ctor[len("MobileNetV3"):].lower()
        file_name = f"weights_mobilenet_v3_{model_type}{minimal}_224_{alpha}_float_no_top_v2.h5"
    elif family == "efficientnet":  # file = the model's default name; this one base URL lacks "tensorflow/"
        file_name = f"{ctor.lower()}_notop.h5"
        url_dir = "https://storage.googleapis.com/keras-applications/"
    elif family == "efficientnet_v2":
        file_name = f"efficientnetv2-{ctor[len('EfficientNetV2'):].lower()}_notop.h5"
    elif family == "convnext":
        file_name = f"convnext_{ctor[len('ConvNeXt'):].lower()}_notop.h5"
    elif family in ("resnet", "resnet_v2"):
        file_name = f"{ctor.lower()}_weights_tf_dim_ordering_tf_kernels_notop.h5"
        url_dir = _KERAS_URL + "resnet/"
    elif family in ("vgg", "densenet", "inception_v3", "inception_resnet_v2", "xception"):
        base = ctor.lower() if family in ("vgg", "densenet") else family  # vgg16, densenet121, xception
        file_name = f"{base}_weights_tf_dim_ordering_tf_kernels_notop.h5"
        url_dir = _KERAS_URL + ("densenet" if family == "densenet" else base) + "/"
    elif family == "nasnet":  # cached as nasnet_mobile_no_top.h5, served as NASNet-mobile-no-top.h5
        size_name = ctor[len("NASNet"):].lower()
        file_name = f"nasnet_{size_name}_no_top.h5"
        return file_name, f"{url_dir}NASNet-{size_name}-no-top.h5", _NO_TOP_HASHES[file_name]
    else:
        return None
    return file_name, url_dir + file_name, _NO_TOP_HASHES.get(file_name)


def backbone_constructor(spec: BackboneSpec):
    """The callable that builds the backbone, imported on first use.

    Example:
        >>> backbone_constructor(get_backbone("resnet50")).__name__  # doctest: +SKIP
        'ResNet50'
    """
    if ":" in spec.constructor:
        module_name, attr = spec.constructor.split(":", 1)
    else:
        module_name, _, attr = spec.constructor.rpartition(".")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            f"Backbone '{spec.name}': cannot import constructor '{spec.constructor}' ({exc})."
        ) from exc
    return obj


def check_image_size(spec: BackboneSpec, image_size: int | None) -> int:
    """The input size to use (None = native), refused when below the backbone's minimum.

    Example:
        >>> check_image_size(get_backbone("inception_v3"), None)
        299
    """
    size = spec.input_size if image_size is None else int(image_size)
    if size < spec.min_input_size:
        raise InputError(
            f"Image size {size} is too small for backbone '{spec.name}' (allowed: "
            f"{spec.min_input_size} px and up; native size {spec.input_size}). "
            f"Pass --image-size {spec.min_input_size} or more."
        )
    return size


def build_backbone(spec: BackboneSpec, weights: str | None = None, image_size: int | None = None, *,
                   mirror: bool = False):
    """Build a backbone as one flat Keras model: raw RGB pixels in, pooled features out.

    The graph is ``Input((size, size, 3), name="image")`` (floats in 0-255) ->
    ``transferkit.models.layers.Preprocess(spec.preprocessing)`` -> the Keras application (no top,
    ``pooling="avg"``). Nested models (ConvNeXt's stem and downsampling blocks) are expanded,
    so every layer is in ``model.layers`` and block_boundaries indexes them.

    Args:
        spec: the registry entry.
        weights: None (random), ``"imagenet"`` or a weights file path, passed to Keras.
            EfficientNet (v1) adds a rescaling layer only when weights == "imagenet"; a file
            path gets the same graph, since ImageNet-derived weights need it.
        image_size: square input size; None = the native size.
        mirror: test-time flip averaging: ``MirrorBatch`` after the preprocessing and
            ``MirrorMean`` after the pooling (see :mod:`transferkit.models.layers`), so the features
            are the mean of each image's and its mirror's, in one flat graph.

    Raises:
        InputError: image_size is below the backbone's minimum.

    Example:
        >>> model = build_backbone(get_backbone("mobilenet_v2_035"), image_size=96)  # doctest: +SKIP
        >>> model.output.shape  # doctest: +SKIP
        (None, 1280)
    """
    size = check_image_size(spec, image_size)
    import keras

    from transferkit.models.layers import MirrorBatch, MirrorMean, Preprocess

    constructor = backbone_constructor(spec)
    image = keras.Input((size, size, 3), name="image")
    pixels = Preprocess(mode=spec.preprocessing, name="preprocess")(image)
    if mirror:
        pixels = MirrorBatch(name="mirror_batch")(pixels)
    kwargs = dict(spec.kwargs)
    if spec.family in _INCLUDE_PREPROCESSING:
        kwargs["include_preprocessing"] = True
    # input_shape as well as input_tensor: MobileNet v1/v2 choose their weights file from
    # input_shape and would load the 224 file for any input_tensor size without it.
    kwargs.update(include_top=False, input_tensor=pixels, input_shape=(size, size, 3), pooling="avg")
    if spec.family == "efficientnet" and weights not in (None, "imagenet"):
        with _keras_loads(weights):
            app = constructor(weights="imagenet", **kwargs)
    else:
        app = constructor(weights=weights, **kwargs)
    # A new Model on the same tensors: single (not list) input, named after the registry entry.
    features = MirrorMean(name="mirror_mean")(app.output) if mirror else app.output
    model = keras.Model(image, features, name=spec.name)
    if any(isinstance(layer, keras.Model) for layer in model.layers):
        model = _flatten(model)
    return model


def _keras_loads(path: str):
    """Make Keras' get_file return ``path``, so Keras builds its "imagenet" graph from a file."""
    from unittest import mock

    from keras.src.utils import file_utils

    return mock.patch.object(file_utils, "get_file", lambda *args, **kwargs: str(path))


def _flatten(model):
    """Rebuild a functional model with the layers of nested Sequential models inlined.

    Layers are copied rather than reused: a reused layer would have two call sites and its
    ``.output`` would still point into the old graph (breaking Grad-CAM-style sub-models).
    """
    import keras

    copies = []

    def clone(layer):
        if isinstance(layer, keras.Model) or not isinstance(layer, keras.layers.Layer):
            return layer  # nested models are inlined by call(); plain ops carry no weights
        new = layer.__class__.from_config(layer.get_config())
        copies.append((layer, new))
        return new

    def call(layer, *args, **kwargs):
        if isinstance(layer, keras.Sequential):
            x = args[0]
            for inner in layer.layers:
                x = call(clone(inner), x)
            return x
        return layer(*args, **kwargs)

    flat = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for old, new in copies:
        new.set_weights(old.get_weights())
    return flat


def block_boundaries(spec: BackboneSpec, model) -> list[tuple[str, int]]:
    """The blocks of a backbone built by build_backbone, as ``(name, last layer index)``.

    Blocks are the units "fine-tune the top N blocks" unfreezes (a ResNet residual block, an
    EfficientNet block, a MobileNet inverted residual, ...), ordered from input to output;
    the index points into ``model.layers``. Unfreezing the top N blocks means unfreezing the
    layers after index ``boundaries[-N - 1][1]``. The stem belongs to no block; the layers
    after the last block (pooling) count with it, so it ends at the model's last layer.

    Example:
        >>> spec = get_backbone("vgg16")
        >>> [name for name, _ in block_boundaries(spec, build_backbone(spec))]  # doctest: +SKIP
        ['block1', 'block2', 'block3', 'block4', 'block5']
    """
    if spec.family not in _FAMILIES:
        raise ValueError(
            f"Backbone '{spec.name}' has family '{spec.family}' with no block rule; "
            f"known families: {', '.join(_FAMILIES)}."
        )
    _, _, mode, pattern, template = _FAMILIES[spec.family]
    regex = re.compile(pattern)
    ends: dict[str, int] = {}  # block name -> index of its last layer, in order of appearance
    current = None
    for index, layer in enumerate(model.layers):
        match = regex.match(layer.name)
        if match:
            current = match.expand(template)
            ends[current] = index
        elif mode == "follow" and current is not None:
            ends[current] = index
    if ends:
        ends[next(reversed(ends))] = len(model.layers) - 1
    return list(ends.items())
