import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from street2shop.errors import ConfigError, ModelError
from street2shop.model.layers import BackbonePreprocess, L2Normalize
from street2shop.model.tower import build_tower, tower_spec
from tests.keras_helpers import assert_config_round_trip, assert_keras_file_round_trip


def _pixels(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, size=shape).astype("float32")


def _non_input_layers(model):
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


# --- L2Normalize -------------------------------------------------------------------------


def test_l2_normalize_by_hand_and_unit_norms():
    np.testing.assert_allclose(np.asarray(L2Normalize()(np.array([[3.0, 4.0]], "float32"))), [[0.6, 0.8]], rtol=1e-6)
    x = np.random.default_rng(1).normal(size=(5, 7)).astype("float32") * 10
    y = np.asarray(L2Normalize()(x))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.ones(5), rtol=1e-6)
    np.testing.assert_allclose(y, x / np.linalg.norm(x, axis=-1, keepdims=True), rtol=1e-5)
    columns = np.asarray(L2Normalize(axis=0)(x))
    np.testing.assert_allclose(np.linalg.norm(columns, axis=0), np.ones(7), rtol=1e-6)


def test_l2_normalize_zero_vector_stays_finite():
    y = np.asarray(L2Normalize()(np.zeros((2, 4), "float32")))
    assert np.all(np.isfinite(y)) and np.all(y == 0)


def test_l2_normalize_config_and_arguments():
    clone = assert_config_round_trip(L2Normalize(axis=1, epsilon=1e-6, name="embedding"))
    assert (clone.axis, clone.epsilon, clone.name) == (1, 1e-6, "embedding")
    with pytest.raises(ConfigError, match="Received: epsilon=0"):
        L2Normalize(epsilon=0)
    with pytest.raises(ConfigError, match="Received: axis='x'"):
        L2Normalize(axis="x")


# --- build_tower -------------------------------------------------------------------------


def test_tower_shape_names_and_unit_embeddings():
    # (resnet50: randomly initialised MobileNets give near-zero features in inference mode)
    tower = build_tower("resnet50", image_size=(32, 40), embedding_dim=8)
    assert tower.name == "tower"
    assert tower.inputs[0].name == "pixels" and tuple(tower.inputs[0].shape) == (None, 32, 40, 3)
    assert [layer.name for layer in tower.layers] == ["pixels", "preprocess", "backbone", "pool", "projection", "embedding"]
    y = np.asarray(tower(_pixels((3, 32, 40, 3))))
    assert y.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.ones(3), rtol=1e-5)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_inception_tower_preprocesses_exactly_once(pooling):
    """tower(pixels) == normalize(dense(pool(backbone(keras preprocess_input(pixels)))))."""
    tower = build_tower("inception_v3", image_size=(75, 75), embedding_dim=6, pooling=pooling)
    x = _pixels((2, 75, 75, 3))
    preprocessed = keras.applications.inception_v3.preprocess_input(x.copy())
    features = np.asarray(tower.get_layer("backbone")(preprocessed, training=False))
    pooled = features.mean(axis=(1, 2)) if pooling == "avg" else features.max(axis=(1, 2))
    kernel, bias = (np.asarray(w) for w in tower.get_layer("projection").weights)
    projected = pooled @ kernel + bias
    expected = projected / np.linalg.norm(projected, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(tower(x, training=False)), expected, rtol=1e-4, atol=1e-5)


def test_dropout_layer_only_when_asked_and_inactive_at_inference():
    plain = build_tower("mobilenet_v3_small", image_size=32, embedding_dim=4)
    assert "dropout" not in [layer.name for layer in plain.layers]
    tower = build_tower("resnet50", image_size=32, embedding_dim=4, dropout=0.5)
    assert tower.get_layer("dropout").rate == 0.5
    x = _pixels((2, 32, 32, 3))
    pooled = np.asarray(keras.Model(tower.input, tower.get_layer("pool").output)(x, training=False))
    kernel, bias = (np.asarray(w) for w in tower.get_layer("projection").weights)

    def head(features):
        projected = features @ kernel + bias
        return projected / np.linalg.norm(projected, axis=-1, keepdims=True)

    np.testing.assert_allclose(np.asarray(tower(x, training=False)), head(pooled), rtol=1e-4, atol=1e-5)
    # in training mode half the pooled features are dropped (and the rest doubled)
    assert not np.allclose(np.asarray(tower.get_layer("dropout")(pooled, training=True)), pooled)


def test_tower_freezing_keeps_head_trainable():
    tower = build_tower("mobilenet_v3_small", image_size=32, embedding_dim=4, trainable_layers=3)
    layers = _non_input_layers(tower.get_layer("backbone"))
    assert [layer.trainable for layer in layers] == [False] * (len(layers) - 3) + [True] * 3
    assert tower.get_layer("projection").trainable
    projection_weights = {id(w) for w in tower.get_layer("projection").trainable_weights}
    assert projection_weights <= {id(w) for w in tower.trainable_weights}


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"embedding_dim": 1}, "Received: embedding_dim=1"),
        ({"dropout": 1.0}, "Received: dropout=1.0"),
        ({"pooling": "gem"}, "Received: pooling='gem'"),
        ({"image_size": 16}, "Received: image_size=(16, 16)"),
    ],
)
def test_tower_argument_errors(kwargs, expected):
    with pytest.raises(ConfigError) as info:
        build_tower("mobilenet_v3_small", **{"image_size": 32, **kwargs})
    assert str(info.value).endswith(expected)


def test_tower_spec_survives_keras_file(tmp_path):
    tower = build_tower("inception_v3", image_size=(75, 75), embedding_dim=16, dropout=0.2, pooling="max", trainable_layers=20)
    expected = {"backbone": "inception_v3", "image_size": [75, 75], "embedding_dim": 16, "pooling": "max", "dropout": 0.2}
    assert tower_spec(tower) == expected
    loaded = assert_keras_file_round_trip(tower, _pixels((2, 75, 75, 3)), tmp_path)
    assert tower_spec(loaded) == expected
    assert isinstance(loaded.get_layer("preprocess"), BackbonePreprocess)
    flags = [layer.trainable for layer in _non_input_layers(loaded.get_layer("backbone"))]
    assert flags == [False] * (len(flags) - 20) + [True] * 20


def test_tower_spec_rejects_other_models():
    inputs = keras.Input((4,))
    with pytest.raises(ModelError, match="not a street2shop tower"):
        tower_spec(keras.Model(inputs, keras.layers.Dense(2)(inputs)))


def test_bn_momentum_is_set_and_survives_keras_file(tmp_path):
    import keras

    from street2shop.model.tower import build_tower

    tower = build_tower("resnet50", image_size=(32, 32), embedding_dim=4, bn_momentum=0.9)
    bns = [layer for layer in tower.get_layer("backbone").layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(layer.momentum == 0.9 for layer in bns)
    tower.save(tmp_path / "t.keras")
    again = keras.saving.load_model(tmp_path / "t.keras", safe_mode=True)
    bns = [layer for layer in again.get_layer("backbone").layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert all(layer.momentum == 0.9 for layer in bns)
    default = build_tower("resnet50", image_size=(32, 32), embedding_dim=4)
    assert {layer.momentum for layer in default.get_layer("backbone").layers if isinstance(layer, keras.layers.BatchNormalization)} == {0.99}
