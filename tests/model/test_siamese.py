import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from street2shop.errors import ConfigError, ModelError
from street2shop.model.layers import CosineClassifier, PairDistance
from street2shop.model.siamese import build_siamese, tower_of
from street2shop.model.tower import build_tower, tower_spec
from tests.keras_helpers import assert_config_round_trip, assert_keras_file_round_trip

SIZE = 32


def _pixels(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, size=shape).astype("float32")


@pytest.fixture(scope="module")
def tower():
    # resnet50 at 32x32: fast, and (unlike the MobileNets) its random init gives
    # features of a sensible size in inference mode, so distances mean something
    return build_tower("resnet50", image_size=SIZE, embedding_dim=8)


# --- PairDistance ------------------------------------------------------------------------


def test_pair_distance_by_hand_and_vs_numpy():
    a = np.array([[0.0, 0.0], [1.0, 1.0]], "float32")
    b = np.array([[3.0, 4.0], [1.0, 2.0]], "float32")
    d = np.asarray(PairDistance()([a, b]))
    assert d.shape == (2,)
    np.testing.assert_allclose(d, [5.0, 1.0], rtol=1e-6)
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 6, 5)).astype("float32")
    np.testing.assert_allclose(np.asarray(PairDistance()([a, b])), np.sqrt(((a - b) ** 2).sum(-1)), rtol=1e-5)


def test_pair_distance_gradient_finite_at_identical_inputs():
    a = tf.constant([[0.6, 0.8], [1.0, 0.0]])
    b = tf.constant([[0.6, 0.8], [0.0, 1.0]])  # first pair identical, second at distance sqrt(2)
    with tf.GradientTape() as tape:
        tape.watch(a)
        d = PairDistance()([a, b])
    grad = tape.gradient(d, a).numpy()
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad[0], [0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(grad[1], np.array([1.0, -1.0]) / np.sqrt(2.0), rtol=1e-5)  # (a - b) / d
    assert float(d[0]) == pytest.approx(1e-6)  # sqrt(epsilon)


def test_pair_distance_config_and_arguments():
    clone = assert_config_round_trip(PairDistance(epsilon=1e-9, name="distance"))
    assert clone.epsilon == 1e-9
    with pytest.raises(ConfigError, match="Received: epsilon=-1"):
        PairDistance(epsilon=-1)


# --- build_siamese -----------------------------------------------------------------------


def test_outputs_without_classes(tower):
    model = build_siamese(tower)
    assert sorted(model.output) == ["distance"]
    assert sorted(model.input) == ["image_a", "image_b"]
    out = model({"image_a": _pixels((3, SIZE, SIZE, 3), 1), "image_b": _pixels((3, SIZE, SIZE, 3), 2)})
    assert sorted(out) == ["distance"] and tuple(out["distance"].shape) == (3,)


def test_outputs_with_classes(tower):
    model = build_siamese(tower, num_classes=5)
    assert sorted(model.output) == ["distance", "logits_a", "logits_b"]
    out = model({"image_a": _pixels((3, SIZE, SIZE, 3), 1), "image_b": _pixels((3, SIZE, SIZE, 3), 2)})
    assert sorted(out) == ["distance", "logits_a", "logits_b"]
    assert tuple(out["logits_a"].shape) == (3, 5) and tuple(out["logits_b"].shape) == (3, 5)
    # one classifier, shared, on the embeddings
    kernel, bias = (np.asarray(w) for w in model.get_layer("classifier").weights)
    a = _pixels((3, SIZE, SIZE, 3), 1)
    np.testing.assert_allclose(np.asarray(model({"image_a": a, "image_b": a})["logits_a"]), np.asarray(tower(a)) @ kernel + bias, rtol=1e-4, atol=1e-5)


def test_cosine_classifier_by_hand_and_vs_numpy():
    layer = CosineClassifier(2, scale=10.0)
    layer.build((None, 2))
    layer.kernel.assign(np.array([[3.0, 0.0], [4.0, -2.0]], "float32"))  # columns (3, 4) and (0, -2)
    x = np.array([[0.0, 5.0], [1.0, 0.0]], "float32")
    # cos((0, 1), (0.6, 0.8)) = 0.8, cos((0, 1), (0, -1)) = -1; cos((1, 0), ·) = 0.6 and 0
    np.testing.assert_allclose(np.asarray(layer(x)), [[8.0, -10.0], [6.0, 0.0]], rtol=1e-6)
    rng = np.random.default_rng(0)
    layer = CosineClassifier(7, scale=16.0)
    x = rng.normal(size=(5, 12)).astype("float32") * 3
    out = np.asarray(layer(x))
    w = np.asarray(layer.kernel)
    expected = 16.0 * (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0, keepdims=True))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(out).max() <= 16.0 + 1e-4


def test_cosine_classifier_config_and_arguments():
    layer = CosineClassifier(4, scale=8.0, name="c")
    again = CosineClassifier.from_config(layer.get_config())
    assert (again.units, again.scale, again.name) == (4, 8.0, "c")
    assert CosineClassifier(np.int64(3)).units == 3
    for bad in (dict(units=1), dict(units=True), dict(units=3.0), dict(units=3, scale=0.0), dict(units=3, scale=-1.0),
                dict(units=3, scale=float("inf"))):
        with pytest.raises(ConfigError):
            CosineClassifier(**bad)


def test_cosine_head_is_shared_and_round_trips(tower, tmp_path):
    model = build_siamese(tower, num_classes=4, classifier_scale=12.0)
    head = model.get_layer("classifier")
    assert isinstance(head, CosineClassifier) and head.scale == 12.0
    assert len(model.weights) == len(tower.weights) + 1  # one kernel, no bias
    a = _pixels((3, SIZE, SIZE, 3), 1)
    out = model({"image_a": a, "image_b": a})
    np.testing.assert_array_equal(np.asarray(out["logits_a"]), np.asarray(out["logits_b"]))
    kernel = np.asarray(head.kernel)
    e = np.asarray(tower(a))
    np.testing.assert_allclose(np.asarray(out["logits_a"]), 12.0 * e @ (kernel / np.linalg.norm(kernel, axis=0)), rtol=1e-4, atol=1e-4)
    loaded = assert_keras_file_round_trip(model, {"image_a": a, "image_b": _pixels((3, SIZE, SIZE, 3), 2)}, tmp_path)
    assert isinstance(loaded.get_layer("classifier"), CosineClassifier)
    assert type(build_siamese(tower, num_classes=4, classifier_scale=0).get_layer("classifier")) is keras.layers.Dense


def test_tower_is_one_shared_object(tower):
    model = build_siamese(tower, num_classes=3)
    assert tower_of(model) is tower
    assert sum(isinstance(layer, keras.Model) for layer in model.layers) == 1
    assert len(model.weights) == len(tower.weights) + 2  # + classifier kernel and bias
    a, b = _pixels((4, SIZE, SIZE, 3), 1), _pixels((4, SIZE, SIZE, 3), 2)
    same = model({"image_a": a, "image_b": a})
    np.testing.assert_allclose(np.asarray(same["distance"]), np.zeros(4), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(same["logits_a"]), np.asarray(same["logits_b"]))
    expected = np.linalg.norm(np.asarray(tower(a)) - np.asarray(tower(b)), axis=-1)
    assert expected.min() > 1e-3  # the check above is not vacuous
    np.testing.assert_allclose(np.asarray(model({"image_a": a, "image_b": b})["distance"]), expected, rtol=1e-4)


def test_keras_file_round_trip_with_safe_mode(tower, tmp_path):
    model = build_siamese(tower, num_classes=4)
    inputs = {"image_a": _pixels((2, SIZE, SIZE, 3), 1), "image_b": _pixels((2, SIZE, SIZE, 3), 2)}
    loaded = assert_keras_file_round_trip(model, inputs, tmp_path)
    assert sorted(loaded.output) == ["distance", "logits_a", "logits_b"]
    assert tower_spec(tower_of(loaded)) == {"backbone": "resnet50", "image_size": [SIZE, SIZE], "embedding_dim": 8, "pooling": "avg", "dropout": 0.0}


def test_fit_takes_dict_targets_with_rank_one_distance():
    tower = build_tower("mobilenet_v3_small", image_size=SIZE, embedding_dim=4, trainable_layers=2)
    model = build_siamese(tower, num_classes=3)
    seen = {}

    def contrastive(y_true, y_pred):
        seen["shapes"] = (tuple(y_true.shape), tuple(y_pred.shape))
        margin = 1.0
        return y_true * y_pred**2 + (1.0 - y_true) * keras.ops.relu(margin - y_pred) ** 2

    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss={"distance": contrastive, "logits_a": ce, "logits_b": ce})
    backbone = tower.get_layer("backbone")
    frozen = [backbone.get_layer("conv"), backbone.get_layer("conv_bn")]  # the bottom conv and its BatchNorm
    frozen_before = [np.asarray(w).copy() for layer in frozen for w in layer.weights]
    assert len(frozen_before) == 5  # kernel; gamma, beta, moving mean, moving variance
    projection_before = np.asarray(tower.get_layer("projection").kernel).copy()
    x = {"image_a": _pixels((4, SIZE, SIZE, 3), 1), "image_b": _pixels((4, SIZE, SIZE, 3), 2)}
    y = {"distance": np.array([1, 0, 1, 0], "float32"), "logits_a": np.array([0, 1, 2, 0]), "logits_b": np.array([0, 2, 2, 1])}
    weights = {"distance": np.array([1, 1, 0.5, 0.5], "float32"), "logits_a": np.ones(4, "float32"), "logits_b": np.ones(4, "float32")}
    history = model.fit(x, y, sample_weight=weights, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert seen["shapes"][1] == (4,) and seen["shapes"][0] in ((4,), (None,))
    assert not np.allclose(np.asarray(tower.get_layer("projection").kernel), projection_before)
    for before, w in zip(frozen_before, [w for layer in frozen for w in layer.weights]):
        np.testing.assert_array_equal(np.asarray(w), before)


def test_argument_errors(tower):
    with pytest.raises(ConfigError, match="Received: num_classes=1"):
        build_siamese(tower, num_classes=1)
    with pytest.raises(ConfigError, match="Received: num_classes='3'"):
        build_siamese(tower, num_classes="3")
    with pytest.raises(ModelError, match="one input and one output"):
        build_siamese(keras.layers.Dense(3))


def test_tower_of_without_a_tower():
    a, b = keras.Input((4,)), keras.Input((4,))
    with pytest.raises(ModelError, match="cannot find the embedding tower"):
        tower_of(keras.Model([a, b], keras.layers.Add()([a, b])))


def test_tower_of_a_tower_is_itself():
    tower = build_tower("mobilenet_v3_small", image_size=SIZE, embedding_dim=4)
    assert tower_of(tower) is tower
