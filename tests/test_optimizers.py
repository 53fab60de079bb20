import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from street2shop.errors import ConfigError
from street2shop.optimizers import BackboneAdamW, BackboneSGD, WarmupCosine


def two_layer_model():
    inputs = keras.Input((2,))
    hidden = keras.layers.Dense(2, use_bias=False, kernel_initializer="ones", name="backbone")(inputs)
    outputs = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones", name="head")(hidden)
    return keras.Model(inputs, outputs)


def step(optimizer):
    model = two_layer_model()
    optimizer.set_backbone_variables(model.get_layer("backbone").trainable_variables)
    model.compile(optimizer=optimizer, loss="mse")
    x, y = np.array([[1.0, 2.0]]), np.array([[0.0]])
    model.train_on_batch(x, y)
    return model.get_layer("backbone").get_weights()[0], model.get_layer("head").get_weights()[0]


def test_sgd_backbone_step_is_scaled():
    # forward: hidden = [3, 3], out = 6; loss = out^2, dL/dout = 12
    # dL/dhead = 12 * hidden = [36, 36]; dL/dbackbone[i, j] = 12 * x_i * head_j = [[12, 12], [24, 24]]
    backbone, head = step(BackboneSGD(learning_rate=0.01, backbone_lr_multiplier=0.1))
    np.testing.assert_allclose(head[:, 0], 1 - 0.01 * 36, rtol=1e-5)
    np.testing.assert_allclose(backbone, 1 - 0.001 * np.array([[12, 12], [24, 24]]), rtol=1e-5)


def test_adamw_first_step_moves_backbone_by_multiplied_lr():
    # Adam's first step moves every parameter by lr * sign(grad) (bias-corrected m / sqrt(v) = 1)
    backbone, head = step(BackboneAdamW(learning_rate=0.01, weight_decay=0.0, backbone_lr_multiplier=0.25, epsilon=1e-12))
    np.testing.assert_allclose(head, 1 - 0.01, rtol=1e-5)
    np.testing.assert_allclose(backbone, 1 - 0.0025, rtol=1e-5)


def test_config_round_trip_and_validation():
    opt = BackboneAdamW(learning_rate=0.1, backbone_lr_multiplier=0.5)
    again = BackboneAdamW.from_config(opt.get_config())
    assert again.backbone_lr_multiplier == 0.5 and float(again.learning_rate) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="Received: backbone_lr_multiplier=-1"):
        BackboneSGD(backbone_lr_multiplier=-1)


def test_warmup_cosine_by_hand():
    # 2 warm-up steps of 10: (s + 1)/2 of the peak, then peak·(1 + cos(π·(s − 2)/8))/2.
    schedule = WarmupCosine(0.1, total_steps=10, warmup_steps=2)
    expected = [0.05, 0.1, 0.1, 0.1 * (1 + np.cos(np.pi / 8)) / 2, 0.05 * (1 + np.cos(np.pi / 4)), 0.05 * (1 + np.cos(3 * np.pi / 8)),
                0.05, 0.05 * (1 + np.cos(5 * np.pi / 8)), 0.05 * (1 + np.cos(3 * np.pi / 4)), 0.05 * (1 + np.cos(7 * np.pi / 8)), 0.0, 0.0]
    assert [float(schedule(s)) for s in range(12)] == pytest.approx(expected, abs=1e-7)
    constant = WarmupCosine(0.1, total_steps=10, warmup_steps=4, kind="constant")
    assert [float(constant(s)) for s in (0, 3, 4, 9)] == pytest.approx([0.025, 0.1, 0.1, 0.1])
    assert float(WarmupCosine(0.1, total_steps=4)(0)) == pytest.approx(0.1)  # no warm-up: the first step at the peak


def test_warmup_cosine_travels_with_the_optimizer_config():
    opt = BackboneAdamW(learning_rate=WarmupCosine(0.1, total_steps=10, warmup_steps=2), backbone_lr_multiplier=0.5)
    again = BackboneAdamW.from_config(opt.get_config())
    assert again._learning_rate.get_config() == {"peak": 0.1, "total_steps": 10, "warmup_steps": 2, "kind": "cosine"}
    with pytest.raises(ConfigError, match="kind must be 'constant' or 'cosine'"):
        WarmupCosine(0.1, total_steps=10, kind="linear")
    with pytest.raises(ConfigError, match="warmup_steps=10, total_steps=10"):
        WarmupCosine(0.1, total_steps=10, warmup_steps=10)
