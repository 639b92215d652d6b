"""Grad-CAM: heat maps at the image's size that find the one region deciding the class."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from transferkit.cli import main
from transferkit.errors import InputError
from transferkit.evaluation.explain import explain_files, gradcam, last_conv_layer, overlay
from transferkit.serving import runs

SIZE, SQUARE = 32, 10
COLOURS = ((230, 40, 40), (40, 60, 230))  # class 0: a red square, class 1: a blue one


def square_images(n: int, seed: int):
    """Grey noise with one coloured square at a random place; the square's colour is the class."""
    rng = np.random.default_rng(seed)
    images = rng.normal(128, 25, (n, SIZE, SIZE, 3)).clip(0, 255)
    labels = rng.integers(0, 2, n)
    corners = rng.integers(0, SIZE - SQUARE + 1, (n, 2))
    for image, label, (y, x) in zip(images, labels, corners, strict=True):
        image[y:y + SQUARE, x:x + SQUARE] = COLOURS[label]
    return images.astype(np.float32), labels, corners


@pytest.fixture(scope="module")
def square_model():
    """A tiny_test backbone + softmax head, built like a run's model and trained on the square images."""
    import keras

    from transferkit.models.build import build_backbone
    from transferkit.models.registry import get_backbone

    keras.utils.set_random_seed(0)
    backbone = build_backbone(get_backbone("tiny_test"), image_size=SIZE)
    x = keras.layers.Dropout(0.0, name="head_dropout")(backbone.output)
    model = keras.Model(backbone.input, keras.layers.Dense(2, activation="softmax", name="predictions")(x))
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"])
    images, labels, _ = square_images(256, seed=0)
    model.fit(images, labels, epochs=12, batch_size=32, verbose=0)
    return model


def test_the_last_convolutional_block_is_found(square_model):
    assert last_conv_layer(square_model).name == "block3_relu"


def test_heat_maps_have_the_image_size_and_find_the_square(square_model):
    images, labels, corners = square_images(24, seed=1)
    assert (square_model.predict(images, verbose=0).argmax(axis=1) == labels).mean() >= 0.9
    heatmaps = gradcam(square_model, images)
    assert heatmaps.shape == (24, SIZE, SIZE) and heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1
    ratios = []
    for heat, (y, x) in zip(heatmaps, corners, strict=True):
        assert heat.std() > 0.05  # not uniform
        inside = np.zeros_like(heat, dtype=bool)
        inside[y:y + SQUARE, x:x + SQUARE] = True
        ratios.append(heat[inside].mean() / max(heat[~inside].mean(), 1e-6))
    assert np.median(ratios) > 2.0, ratios


def test_explaining_the_other_class_gives_another_map(square_model):
    images, labels, _ = square_images(4, seed=2)
    own = gradcam(square_model, images)
    other = gradcam(square_model, images, class_index=(1 - labels).tolist())
    assert own.shape == other.shape and not np.allclose(own, other)


def test_overlay_is_an_rgb_image_of_the_photo_size():
    photo = np.full((60, 90, 3), 200, np.uint8)
    heat = np.zeros((32, 32), np.float32)
    heat[:, 16:] = 1.0
    blended = overlay(photo, heat)
    assert blended.shape == (60, 90, 3) and blended.dtype == np.uint8
    assert not np.array_equal(blended[:, :30], blended[:, -30:])  # hot half coloured differently


def test_explain_cli_writes_one_titled_overlay_per_image(square_model, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    runs.save_model(square_model, run_dir / runs.MODEL_FILE)
    runs.write_labels(run_dir / runs.LABELS_FILE, ["red", "blue"])
    photos = tmp_path / "photos"
    photos.mkdir()
    images, _, _ = square_images(3, seed=3)
    for i, image in enumerate(images):
        Image.fromarray(image.astype(np.uint8)).resize((64, 48)).save(photos / f"p{i}.png")
    (photos / "broken.jpg").write_bytes(b"not an image")
    result = CliRunner().invoke(main, ["explain", str(run_dir), str(photos), "-o", str(tmp_path / "cams")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # The overlays, and transferkit's marker and lock of the folder it wrote.
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == [".transferkit-lock", ".transferkit-run", "p0.png",
                                                                      "p1.png", "p2.png"]
    assert "Skipped" in result.output and "broken.jpg" in result.output
    with Image.open(tmp_path / "cams" / "p0.png") as png:
        assert png.mode in ("RGB", "RGBA") and png.width > png.height

    with pytest.raises(InputError, match="Unknown class 'green'.*red, blue"):
        explain_files(runs.load_run(run_dir), [photos / "p0.png"], tmp_path / "x", class_name="green")
