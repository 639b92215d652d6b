"""Backbone registry: name -> family, Keras constructor, input size, preprocessing, feature size, blocks.

Every ImageNet-pretrained model of ``keras.applications`` (Keras 3.15) is registered here, under a
lowercase snake_case name. The numbers in the table (sizes, feature dims, parameter and block
counts) were read from the Keras sources or measured by building each model once;
``tests/models/test_backbones.py`` checks them against Keras. Building a model is
:mod:`transferkit.models.build`; its weight files are :mod:`transferkit.models.weights`.

This module imports no TensorFlow or Keras (``transferkit backbones`` lists the registry instantly).
"""

from __future__ import annotations

import difflib
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
        num_blocks: blocks :func:`transferkit.models.build.block_boundaries` finds (measured).
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
FAMILIES: dict[str, tuple[str, int, str, str, str]] = {
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
INCLUDE_PREPROCESSING = {"mobilenet_v3", "efficientnet_v2", "convnext"}

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
        FAMILIES[_family][0], _params, _blocks, FAMILIES[_family][1]))
del _name, _family, _ctor, _kwargs, _size, _dim, _params, _blocks
# The tiny CNN of transferkit.testing, for fast tests (random initialisation only).
register_backbone(BackboneSpec(
    "tiny_test", "test", "transferkit.testing:tiny_backbone", {}, 32, 32, "tf", 6200, 3, 8, pretrained=False))


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
