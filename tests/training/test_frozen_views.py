"""Fine-tuning on the frozen blocks' activations: the cut is faithful, the epochs read their views,
and the phase falls back to live images where the cut cannot be made or would not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from transferkit.cli import main
from transferkit.models.build import block_boundaries, build_backbone
from transferkit.models.registry import get_backbone
from transferkit.testing import make_image_folder
from transferkit.training import frozen_views

TINY = ["--backbone", "tiny_test", "--weights", "none", "--image-size", "32", "--batch-size", "8"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("fv") / "photos", num_classes=2, images_per_class=16,
                             image_size=32, formats=("png",))


def test_the_top_on_the_frozen_output_is_the_whole_model():
    import keras

    spec = get_backbone("tiny_test")
    backbone = build_backbone(spec, image_size=32)
    model = keras.Model(backbone.input, keras.layers.Dense(3, activation="softmax")(backbone.output))
    cut = backbone.layers[block_boundaries(spec, backbone)[-2][1]]
    frozen, top = frozen_views.split_at(model, cut)
    images = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(top(frozen(images)), model(images), rtol=1e-5, atol=1e-6)
    # One set of layers: what the top trains is the model's.
    assert {id(w) for w in top.trainable_weights} <= {id(w) for w in model.trainable_weights}
    assert frozen_views.store_bytes(cut, num_train=10, num_val=2, views=3) == 4 * 8 * 8 * 16 * 32


def test_a_skip_connection_across_the_cut_falls_back():
    import keras

    image = keras.Input((8, 8, 3))
    low = keras.layers.Conv2D(4, 1, name="low")(image)
    mid = keras.layers.Conv2D(4, 1, name="mid")(low)
    out = keras.layers.GlobalAveragePooling2D()(keras.layers.Add()([low, mid]))
    model = keras.Model(image, out)
    assert frozen_views.split_at(model, model.get_layer("low")) is not None  # only `low` crosses
    assert frozen_views.split_at(model, model.get_layer("mid")) is None  # `low` is read above the cut too


def test_epoch_e_reads_pass_e_mod_k_in_an_order_of_its_own():
    passes = [(np.arange(10) + 100 * k, np.arange(10)) for k in range(3)]
    data = frozen_views.views_dataset(passes, 4, seed=0, shuffle=True)
    assert len(data) == 3

    def epoch(e):
        data.set_epoch(e)
        return np.concatenate([data[i][0] for i in range(len(data))])

    first, second, fourth = epoch(0), epoch(1), epoch(3)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(100, 110))
    assert sorted(fourth) == sorted(first) and not np.array_equal(fourth, first)
    assert np.array_equal(epoch(3), fourth), "a resumed run reads what the first run would have"
    data.set_epoch(1)
    images, labels = data[0]
    assert np.array_equal(images - 100, labels), "rows stay together"
    plain = frozen_views.views_dataset(passes[:1], 4, seed=0, shuffle=False)
    assert np.array_equal(np.concatenate([plain[i][0] for i in range(len(plain))]), np.arange(10))


def _fine_tune(tmp_path, folder, *args):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(folder), "-o", str(run), "--cache-dir", str(tmp_path / "cache"),
                                       *TINY, "--fine-tune-epochs", "2", *args])
    assert result.exit_code == 0, result.output
    return json.loads((run / "metrics.json").read_text())["fine_tune"], result.output


def test_fine_tune_top_trains_on_views_and_keeps_the_frozen_blocks(tmp_path, folder):
    import keras

    info, output = _fine_tune(tmp_path, folder, "--strategy", "fine-tune-top", "--fine-tune-views", "2",
                              "--fine-tune-learning-rate", "0.05")
    assert info["frozen_views"]["views"] == 2 and info["frozen_views"]["cut"] == "block2_pool"
    assert "Frozen blocks: 2 augmented views of" in output
    assert info["kept"] == "fine-tune", "a 0.05 rate moves the top block away from the head phase's optimum"
    trained = keras.saving.load_model(tmp_path / "run" / "model.keras", compile=False)
    keras.utils.set_random_seed(0)  # the run's seed: the same random weights it started from
    start = build_backbone(get_backbone("tiny_test"), image_size=32)
    for name in ("block1_conv", "block2_conv"):
        np.testing.assert_array_equal(trained.get_layer(name).get_weights()[0], start.get_layer(name).get_weights()[0])
    assert not np.array_equal(trained.get_layer("block3_conv").get_weights()[0],
                              start.get_layer("block3_conv").get_weights()[0])


@pytest.mark.parametrize(("args", "note"), [
    (["--strategy", "full-retrain"], None),
    (["--strategy", "fine-tune-top", "--fine-tune-views", "0"], None),
    (["--strategy", "fine-tune-top"], "would take"),
])
def test_live_images_where_views_cannot_pay(tmp_path, folder, monkeypatch, args, note):
    monkeypatch.setattr(frozen_views, "MAX_BYTES", 1000)
    info, output = _fine_tune(tmp_path, folder, *args)
    assert info["frozen_views"] == {"views": 0} and info["epochs_run"] == 2
    assert "Frozen blocks:" not in output
    if note:
        assert note in output
