"""Phase plans (pure), which layers train in each phase, BatchNorm statistics, per-layer rates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from transferkit.config import TrainConfig
from transferkit.errors import InputError
from transferkit.models.build import block_boundaries, build_backbone
from transferkit.models.registry import get_backbone
from transferkit.training.strategies import Phase, choose_strategy, default_unfreeze_blocks, layer_rates, plan_phases

# ----------------------------------------------------------------------------- plans (no TensorFlow)


def test_plans_per_strategy():
    assert [(p.name, p.unfreeze_blocks, p.on_features) for p in plan_phases("freeze-all", num_blocks=17)] == [
        ("head", 0, True)]
    assert [(p.name, p.unfreeze_blocks, p.on_features) for p in plan_phases("fine-tune-top", num_blocks=17)] == [
        ("head", 0, True), ("fine-tune", 3, False)]
    assert plan_phases("fine-tune-top", num_blocks=17, unfreeze_blocks=5)[1].unfreeze_blocks == 5
    assert plan_phases("full-retrain", num_blocks=16)[1].unfreeze_blocks == 16


@pytest.mark.parametrize(("num_blocks", "expected"), [(1, 1), (3, 1), (5, 1), (11, 2), (16, 3), (17, 3), (40, 8)])
def test_default_unfreeze_blocks(num_blocks, expected):
    assert default_unfreeze_blocks(num_blocks) == expected


def test_plan_rejects_bad_values():
    with pytest.raises(InputError, match=r"--unfreeze-blocks: expected 1 to 5 .* received 9"):
        plan_phases("fine-tune-top", num_blocks=5, unfreeze_blocks=9)
    with pytest.raises(InputError, match="--strategy"):
        plan_phases("fine-tune-everything", num_blocks=5)


def _evidence(accuracy: float, rise: float):
    from transferkit.training.strategies import AutoEvidence

    curve = ((0.25, accuracy - 2 * rise), (0.5, accuracy - rise), (1.0, accuracy))
    return AutoEvidence(accuracy, curve, rise, seconds_per_epoch=90.0, fine_tune_epochs=20)


def test_auto_fine_tunes_only_with_data_and_something_to_gain():
    rising, flat, poor = _evidence(0.94, 0.026), _evidence(0.96, 0.004), _evidence(0.85, 0.0)
    assert choose_strategy([40, 500], rising)[0] == "freeze-all", "too few images to fine-tune"
    strategy, why = choose_strategy([120, 130], flat)
    assert strategy == "freeze-all" and "saturated" in why and "about 30 min" in why
    strategy, why = choose_strategy([120, 130], rising)
    assert strategy == "fine-tune-top" and "+2.6 points per doubling" in why and "up to 6.0 points" in why
    assert "about 30 min" in why
    assert choose_strategy([120, 130], poor)[0] == "fine-tune-top", "a 15% error leaves room even when flat"
    assert choose_strategy([1000, 1200], rising)[0] == "full-retrain"
    strategy, why = choose_strategy([30, 30], rising, fine_tune_from=20, full_retrain_from=25)
    assert strategy == "full-retrain" and "30 training images" in why


def test_the_estimate_counts_the_frozen_views_before_the_epochs():
    from transferkit.training.strategies import AutoEvidence

    evidence = AutoEvidence(0.94, ((0.5, 0.92), (1.0, 0.94)), 0.02, seconds_per_epoch=10.0, fine_tune_epochs=20,
                            setup_seconds=150.0)
    assert evidence.fine_tune_seconds == 350.0
    assert evidence.as_dict()["estimated_fine_tune_seconds"] == 350.0 and evidence.as_dict()["setup_seconds"] == 150.0
    assert "about 6 min" in choose_strategy([120, 130], evidence)[1]


def test_layer_rates_top_block_and_deeper():
    bounds = [("b1", 2), ("b2", 4), ("b3", 6)]
    assert layer_rates(bounds, 7, Phase("head", 0, True)) == [None] * 7
    assert layer_rates(bounds, 7, Phase("fine-tune", 1, False, top_blocks=1)) == [None] * 5 + [0.1, 0.1]
    assert layer_rates(bounds, 7, Phase("fine-tune", 3, False, top_blocks=1)) == [0.01] * 5 + [0.1, 0.1]  # stem too
    assert layer_rates(bounds, 7, Phase("fine-tune", 2, False, top_blocks=2)) == [None] * 3 + [0.1] * 4
    assert plan_phases("full-retrain", num_blocks=16)[1].top_blocks == 3


def test_config_refuses_sklearn_head_with_fine_tuning():
    with pytest.raises(InputError, match=r"`head` must be softmax with --strategy fine-tune-top.*Received: head="):
        TrainConfig("a", "b", strategy="fine-tune-top", head="logreg")


# ----------------------------------------------------------------------------- trainable layers per family


@pytest.mark.parametrize(("name", "size"), [("mobilenet_v2_035", 32), ("resnet50", 32), ("efficientnetb0", 32)])
def test_fine_tune_top_trains_only_top_blocks_and_never_batchnorm(name, size):
    import keras

    from transferkit.training.finetune import set_trainable

    spec = get_backbone(name)
    backbone = build_backbone(spec, weights=None, image_size=size)
    bounds = block_boundaries(spec, backbone)
    phase = dataclasses.replace(plan_phases("fine-tune-top", num_blocks=len(bounds), unfreeze_blocks=2)[1],
                                top_blocks=1)
    rates = set_trainable(backbone, spec, phase)
    first_trained = bounds[-3][1] + 1  # the layer after the third block from the top
    for index, layer in enumerate(backbone.layers):
        if isinstance(layer, keras.layers.BatchNormalization) or index < first_trained:
            assert not layer.trainable, f"{name}: {layer.name} should be frozen"
        elif layer.weights:
            assert layer.trainable, f"{name}: {layer.name} should train"
    top_block = {layer.name for layer in backbone.layers[bounds[-2][1] + 1:] if layer.weights}
    assert {n for n, r in rates.items() if r == 0.1} == top_block - {
        layer.name for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)}
    assert set(rates.values()) == {0.1, 0.01}
    full = set_trainable(backbone, spec, plan_phases("full-retrain", num_blocks=len(bounds))[1])
    frozen = [layer.name for layer in backbone.layers if layer.weights and not layer.trainable]
    assert all(isinstance(backbone.get_layer(n), keras.layers.BatchNormalization) for n in frozen)
    assert len(full) == sum(1 for layer in backbone.layers if layer.weights and layer.trainable)


# ----------------------------------------------------------------------------- the fine-tune phase itself


def _tiny_model(seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    spec = get_backbone("tiny_test")
    backbone = build_backbone(spec, weights=None, image_size=32)
    head = keras.layers.Dense(3, activation="softmax", name="predictions")
    return spec, backbone, keras.Model(backbone.input, head(backbone.output))


def _fit_once(train_bn: bool, tmp_path, rate=1e-2, baseline=None):
    import tensorflow as tf

    from transferkit.training.finetune import fine_tune, set_trainable

    spec, backbone, model = _tiny_model()
    phase = plan_phases("fine-tune-top", num_blocks=3, unfreeze_blocks=1)[1]
    rates = set_trainable(backbone, spec, phase, train_bn=train_bn)
    rates["predictions"] = 1.0
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (24, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 3, 24)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    before = {w.path: w.numpy() for w in model.weights}
    config = TrainConfig("a", "b", fine_tune_epochs=1, fine_tune_learning_rate=rate, schedule="constant",
                         train_bn=train_bn, fine_tune_patience=0)
    _, improved = fine_tune(model, config, rates, data, data, steps_per_epoch=3, checkpoint_dir=tmp_path / "ckpt",
                            baseline=baseline, verbose=0)
    after = {w.path: w.numpy() for w in model.weights}
    assert improved == (baseline is None)
    return model, before, after


def test_fine_tuning_must_beat_the_head_phase_on_validation(tmp_path):
    # A validation loss of 0 cannot be beaten: no best checkpoint, and fine_tune says so (the
    # fine-tune phase then keeps the head phase's weights).
    _fit_once(train_bn=False, tmp_path=tmp_path, baseline=0.0)
    assert not (tmp_path / "ckpt" / "best.weights.h5").exists()


def test_batchnorm_statistics_do_not_move_while_fine_tuning(tmp_path):
    model, before, after = _fit_once(train_bn=False, tmp_path=tmp_path)
    stats = [p for p in before if "moving_" in p]
    assert stats and all(np.array_equal(before[p], after[p]) for p in stats)
    assert not np.array_equal(before["block3_conv/kernel"], after["block3_conv/kernel"])  # top block trained
    assert np.array_equal(before["block2_conv/kernel"], after["block2_conv/kernel"])  # below it: frozen
    assert model.optimizer.built and len(model.optimizer._trainable_variables) == len(model.trainable_weights)


def test_train_bn_lets_the_statistics_move(tmp_path):
    # The same run with --train-bn: proves the test above could fail.
    _, before, after = _fit_once(train_bn=True, tmp_path=tmp_path)
    assert not np.array_equal(before["block3_bn/moving_mean"], after["block3_bn/moving_mean"])
    assert np.array_equal(before["block2_bn/moving_mean"], after["block2_bn/moving_mean"])


def test_layer_rates_scale_adams_first_step():
    # Adam's first step moves each weight by about its learning rate (m/sqrt(v) = sign(g)), so the
    # largest change of a layer's weights measures the rate it was given.
    import keras

    from transferkit.training.finetune import _layer_rate_adam

    inputs = keras.Input((4,))
    top = keras.layers.Dense(4, name="top")
    deep = keras.layers.Dense(4, name="deep")
    model = keras.Model(inputs, top(deep(inputs)))
    optimizer = _layer_rate_adam()({"top": 1.0, "deep": 0.01}, learning_rate=0.1)
    model.compile(optimizer=optimizer, loss="mse")
    before = [w.numpy() for w in model.weights]
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.normal(size=(16, 4)).astype("float32"), rng.normal(size=(16, 4)).astype("float32"))
    changes = {w.path: np.abs(w.numpy() - b).max() for w, b in zip(model.weights, before, strict=True)}
    assert changes["top/kernel"] == pytest.approx(0.1, rel=0.05)
    assert changes["deep/kernel"] == pytest.approx(0.001, rel=0.05)


def test_schedule_warms_up_then_decays():
    from transferkit.training.finetune import make_schedule

    config = TrainConfig("a", "b", fine_tune_learning_rate=1e-3, warmup_epochs=1, schedule="cosine")
    schedule = make_schedule(config, steps_per_epoch=10, epochs=5)
    rates = [float(schedule(step)) for step in (0, 5, 10, 30, 50)]
    assert rates[0] < rates[1] < rates[2] == pytest.approx(1e-3)
    assert rates[2] > rates[3] > rates[4] >= 0
    one_cycle = make_schedule(config.replace(schedule="one-cycle"), steps_per_epoch=10, epochs=8)
    assert float(one_cycle(19)) < float(one_cycle(20)) == pytest.approx(1e-3)  # peak after 25% of 80 steps
    assert make_schedule(config.replace(schedule="constant"), 10, 5) == pytest.approx(1e-3)


def test_class_weights_balance_counts():
    from transferkit.training.finetune import class_weights

    weights = class_weights(np.array([0] * 30 + [1] * 10), 3)
    assert weights[1] == pytest.approx(3 * weights[0]) and weights[2] == 1.0


def test_the_fine_tune_rate_follows_the_amount_of_data_unless_given():
    from transferkit.training.strategies import fine_tune_rate

    assert fine_tune_rate(5000) == (1e-3, "5000 training images (>= 1000)")
    rate, why = fine_tune_rate(206)
    assert rate == pytest.approx(2.06e-4) and "scaled down in proportion" in why
    assert fine_tune_rate(206, 5e-4) == (5e-4, "--fine-tune-learning-rate")
