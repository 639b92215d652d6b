"""Grad-CAM: which part of the photo made the model choose its class (Selvaraju et al., 2017).

The class score's gradient with respect to the last convolutional feature map, averaged over
space, weights that map's channels; their weighted sum, rectified and upsampled, is the heat
map. Every transferkit model is one flat functional graph (raw pixels -> preprocessing ->
backbone layers -> pooling -> head), so the last 4-D layer output before pooling is reachable
for every registry backbone and every training strategy.

The score is the class logit (the input of the final softmax), as in the paper: probabilities
saturate near 1 and would blur the map.

Example:
    >>> heatmaps = gradcam(model, images)                     # doctest: +SKIP
    >>> save_overlay("cam.png", photo, heatmaps[0], "bees 0.97")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transferkit import files
from transferkit.errors import InputError

#: Opacity of the heat map over the photo.
OVERLAY_ALPHA = 0.45
#: Longest side of the photo in a saved overlay, in pixels.
DISPLAY_SIZE = 448


def last_conv_layer(model):
    """The last layer of a flat model whose output is a 4-D feature map (batch, H, W, channels).

    Raises:
        InputError: the model has no such layer (not a convolutional image model).
    """
    import keras

    from transferkit.models.layers import Preprocess

    calls = _calls_in(model)
    for layer in reversed(model.layers):
        if isinstance(layer, (keras.layers.InputLayer, Preprocess)):
            break  # reached the pixels: no convolution after them
        node = calls.get(id(layer))
        outputs = node.output_tensors if node is not None else []
        if len(outputs) == 1 and len(outputs[0].shape) == 4:
            return layer
    raise InputError(f"Model '{model.name}' has no convolutional feature map for Grad-CAM.")


def _calls_in(model) -> dict:
    """Each layer's call (Keras node) inside ``model``'s own graph, by ``id(layer)``.

    ``layer.input`` and ``layer.output`` are those of the layer's *first* call. A layer called in
    two graphs has two calls: a run's head layers are trained on cached features (first call, a
    graph whose input is a feature vector) and then applied to the backbone's output (the call
    ``model`` holds). Building a sub-model from the first call fails with "Output ... is not
    connected to inputs"; walking back from ``model.outputs`` finds the right call for any model,
    in memory or reloaded.
    """
    calls: dict = {}
    pending, seen = list(model.outputs), set()
    while pending:
        operation, node_index, _ = pending.pop()._keras_history
        node = operation._inbound_nodes[node_index]
        if id(node) in seen:
            continue
        seen.add(id(node))
        calls.setdefault(id(operation), node)
        pending.extend(node.input_tensors)
    return calls


def _score_model(model):
    """A model: pixels -> (last feature map, class logits)."""
    import keras

    conv = last_conv_layer(model)
    final = model.layers[-1]
    calls = _calls_in(model)
    feature_map = calls[id(conv)].output_tensors[0]
    if isinstance(final, keras.layers.Dense) and final.get_config().get("activation") == "softmax":
        inner = keras.Model(model.inputs, [feature_map, calls[id(final)].input_tensors[0]])

        def scores(images):
            feature_map, features = inner(images, training=False)
            return feature_map, keras.ops.matmul(features, final.kernel) + final.bias
    else:  # any other head: log-probabilities differ from logits by a per-image constant only
        inner = keras.Model(model.inputs, [feature_map, model.outputs[0]])

        def scores(images):
            feature_map, probabilities = inner(images, training=False)
            return feature_map, keras.ops.log(keras.ops.maximum(probabilities, 1e-12))
    return scores


def gradcam(model, images, class_index: int | Sequence[int] | None = None) -> np.ndarray:
    """Grad-CAM heat maps for a batch of raw images.

    Args:
        model: a transferkit model (raw RGB pixels in, probabilities out), e.g. ``load_run(...).model``.
        images: ``(n, size, size, 3)`` pixels in 0-255 at the model's input size.
        class_index: the class to explain, per image or one for all; default the predicted class.

    Returns:
        ``(n, size, size)`` float32 heat maps in [0, 1] (1 = most evidence for the class; all
        zeros when nothing in the image supports it).
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
    size = images.shape[1:3]
    scores_of = _score_model(model)
    with tf.GradientTape() as tape:
        feature_map, scores = scores_of(images)
        tape.watch(feature_map)
        if class_index is None:
            target = tf.argmax(scores, axis=1, output_type=tf.int32)
        else:
            target = tf.broadcast_to(tf.constant(class_index, tf.int32), [tf.shape(scores)[0]])
        chosen = tf.gather(scores, target, axis=1, batch_dims=1)
    grads = tape.gradient(chosen, feature_map)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1, keepdims=True))
    cam = tf.image.resize(cam, size, method="bilinear")[..., 0]
    if cam.shape[0] == 2 * images.shape[0]:
        # A flip-averaged model (transferkit.models.layers.MirrorBatch) ran each image and its mirror:
        # the evidence is both views', the mirror's map flipped back onto the image.
        cam = (cam[: images.shape[0]] + tf.reverse(cam[images.shape[0]:], axis=[2])) / 2
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    cam = tf.math.divide_no_nan(cam, peak)
    return cam.numpy().astype(np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA, colormap: str = "jet") -> np.ndarray:
    """Blend a heat map onto a photo.

    Args:
        image: ``(H, W, 3)`` uint8 (or 0-255 float) RGB.
        heatmap: ``(h, w)`` values in [0, 1]; resized to the image's size.
        alpha: opacity of the colours where the heat map is highest; cold areas stay clearer, so
            the photo shows through where the model did not look.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    import matplotlib
    from PIL import Image

    image = np.asarray(image, dtype=np.float32)
    height, width = image.shape[:2]
    heat = np.asarray(Image.fromarray(np.asarray(heatmap, np.float32), mode="F").resize((width, height),
                                                                                        Image.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)
    colours = matplotlib.colormaps[colormap](heat)[..., :3] * 255.0
    weight = (alpha * (0.35 + 0.65 * heat))[..., None]
    return np.clip(image * (1 - weight) + colours * weight, 0, 255).round().astype(np.uint8)


def save_overlay(path: str | os.PathLike, image: np.ndarray, heatmap: np.ndarray, title: str,
                 caption: str = "photo") -> None:
    """Write a PNG: the photo and its Grad-CAM overlay side by side, with a title (matplotlib, headless).

    Example:
        >>> save_overlay("out/cat.png", photo, heatmap, "cat 0.93")  # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    blended = overlay(image, heatmap)
    height, width = blended.shape[:2]
    fig = Figure(figsize=(2 * 3.6 * width / max(height, width) + 0.3, 3.6 * height / max(height, width) + 0.8),
                 dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    labels = (caption, "Grad-CAM (red: most evidence for the class)")
    for ax, picture, label in zip(axes, (np.asarray(image, np.uint8), blended), labels, strict=True):
        ax.imshow(picture)
        ax.set_xlabel(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=12, fontweight="bold")
    with files.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def display_image(path: str | os.PathLike, max_side: int = DISPLAY_SIZE) -> np.ndarray:
    """The photo as the user sees it (EXIF orientation applied, RGB), longest side ``max_side``.

    Read through the one safe opener (:func:`transferkit.data.images.display_image`); raises ``ValueError``
    with the reason for a file that is not a readable image.
    """
    from transferkit.data.images import display_image as read_display_image

    return read_display_image(path, max_side)


def explain_files(run, paths: Sequence[str | os.PathLike], output_dir: str | os.PathLike, *,
                  class_name: str | None = None, batch_size: int = 8) -> list[dict]:
    """Write a Grad-CAM overlay PNG for each image file, named after it, into ``output_dir``.

    The heat map is computed on the image as the model sees it (squashed to its input size) and
    drawn on the photo at its own aspect ratio, which maps back exactly.

    Args:
        run: a loaded run (:func:`transferkit.serving.runs.load_run`).
        paths: image files.
        class_name: explain this class instead of the predicted one.

    Returns:
        One row per image: ``{"path", "ok", "error", "predicted", "score", "explained", "overlay"}``.
    """
    from transferkit.data.images import decode_image, display_image_bytes, read_image_bytes

    if class_name is not None and class_name not in run.class_names:
        raise InputError(f"Unknown class '{class_name}' (--class); the model's classes: "
                         f"{', '.join(run.class_names)}.")
    output_dir = Path(output_dir)
    size = run.image_size
    rows, used = [], set()
    for start in range(0, len(paths), batch_size):
        batch_paths = [Path(p) for p in paths[start:start + batch_size]]
        images, photos, good = [], [], []
        for path in batch_paths:
            try:
                # One read per file: the model's input and the photo shown come from the same bytes.
                data = read_image_bytes(path)
                images.append(decode_image(data, size))
                photos.append(data)
                good.append(path)
            except ValueError as exc:
                rows.append({"path": str(path), "ok": False, "error": str(exc)})
        if not images:
            continue
        pixels = np.stack(images).astype(np.float32)
        probabilities = np.asarray(run.model(pixels, training=False))
        target = None if class_name is None else run.class_names.index(class_name)
        heatmaps = gradcam(run.model, pixels, target)
        for path, data, probs, heatmap in zip(good, photos, probabilities, heatmaps, strict=True):
            predicted = int(probs.argmax())
            explained = predicted if target is None else target
            name = _unique_name(path.stem, used)
            title = f"predicted: {run.class_names[predicted]} ({probs[predicted]:.2f})"
            if explained != predicted:
                title += f"; explaining: {run.class_names[explained]} ({probs[explained]:.2f})"
            out = output_dir / f"{name}.png"
            save_overlay(out, display_image_bytes(data, DISPLAY_SIZE), heatmap, title,
                         caption=files.display_name(path.name))  # matplotlib draws no undecodable byte
            rows.append({"path": str(path), "ok": True, "error": "", "predicted": run.class_names[predicted],
                         "score": float(probs[predicted]), "explained": run.class_names[explained],
                         "overlay": str(out)})
    return rows


def _unique_name(stem: str, used: set[str]) -> str:
    name, k = stem, 2
    while name in used:
        name, k = f"{stem}-{k}", k + 1
    used.add(name)
    return name
