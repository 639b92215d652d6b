"""Building a registered backbone as one flat Keras model: raw RGB pixels in, pooled features out.

Keras is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import importlib
import re

from transferkit.models.registry import FAMILIES, INCLUDE_PREPROCESSING, BackboneSpec, check_image_size


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
    if spec.family in INCLUDE_PREPROCESSING:
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
        >>> from transferkit.models.registry import get_backbone
        >>> spec = get_backbone("vgg16")
        >>> [name for name, _ in block_boundaries(spec, build_backbone(spec))]  # doctest: +SKIP
        ['block1', 'block2', 'block3', 'block4', 'block5']
    """
    if spec.family not in FAMILIES:
        raise ValueError(
            f"Backbone '{spec.name}' has family '{spec.family}' with no block rule; "
            f"known families: {', '.join(FAMILIES)}."
        )
    _, _, mode, pattern, template = FAMILIES[spec.family]
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
