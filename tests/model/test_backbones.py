import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format
from keras.src.utils import file_utils

from street2shop.errors import ConfigError, ModelError
from street2shop.model.backbones import BACKBONES, backbone_spec, build_backbone, set_trainable
from street2shop.model.layers import BackbonePreprocess
from tests.keras_helpers import assert_config_round_trip


def _pixels(shape=(2, 5, 4, 3), seed=0):
    return np.random.default_rng(seed).uniform(0, 255, size=shape).astype("float32")


def _save_legacy_h5(model, path):
    """The layout of keras.applications' downloadable '*_notop.h5' files."""
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


def _non_input_layers(model):
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


# --- BackbonePreprocess ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(name for name, spec in BACKBONES.items() if spec.family != "street2shop"))
def test_preprocess_matches_keras_preprocess_input(name):
    x = _pixels()
    reference = getattr(keras.applications, BACKBONES[name].family).preprocess_input(x.copy())
    actual = np.asarray(BackbonePreprocess(name)(x))
    np.testing.assert_allclose(actual, np.asarray(reference), rtol=1e-5, atol=1e-4)


def test_preprocess_by_hand():
    pixel = np.array([[[[10.0, 20.0, 30.0]]]], "float32")  # R, G, B
    for name in ("inception_v3", "tiny_cnn"):
        scaled = np.asarray(BackbonePreprocess(name)(pixel)).ravel()
        np.testing.assert_allclose(scaled, [10 / 127.5 - 1, 20 / 127.5 - 1, 30 / 127.5 - 1], rtol=1e-6)
    caffe = np.asarray(BackbonePreprocess("resnet50")(pixel)).ravel()  # BGR minus the BGR means
    np.testing.assert_allclose(caffe, [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-5)
    identity = np.asarray(BackbonePreprocess("mobilenet_v3_small")(pixel)).ravel()
    np.testing.assert_array_equal(identity, [10.0, 20.0, 30.0])
    torch = np.asarray(BackbonePreprocess("densenet121")(pixel)).ravel()
    np.testing.assert_allclose(torch, [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (30 / 255 - 0.406) / 0.225], rtol=1e-5)


def test_preprocess_config_round_trip():
    clone = assert_config_round_trip(BackbonePreprocess("resnet50", name="preprocess"))
    assert clone.backbone == "resnet50"


def test_preprocess_unknown_backbone():
    with pytest.raises(ConfigError, match=r"Received: backbone='vgg99'"):
        BackbonePreprocess("vgg99")


# --- registry and sizes ------------------------------------------------------------------


def test_unknown_backbone_lists_known_names():
    with pytest.raises(ConfigError) as info:
        build_backbone("vgg99", (96, 96))
    message = str(info.value)
    assert all(name in message for name in ("inception_v3", "resnet50", "mobilenet_v3_small", "efficientnet_b0"))
    assert message.endswith("Received: backbone='vgg99'")


@pytest.mark.parametrize(
    "name, size, expected",
    [
        ("inception_v3", (74, 96), "at least 75x75. Received: image_size=(74, 96)"),
        ("inception_v3", 74, "Received: image_size=(74, 74)"),
        ("mobilenet_v3_small", (32, 31), "at least 32x32. Received: image_size=(32, 31)"),
        ("resnet50", (0, 64), "Received: image_size=(0, 64)"),
        ("resnet50", (64, 64, 3), "Received: image_size=(64, 64, 3)"),
        ("resnet50", "big", "Received: image_size='big'"),
    ],
)
def test_too_small_or_malformed_image_size(name, size, expected):
    with pytest.raises(ConfigError) as info:
        build_backbone(name, size)
    assert str(info.value).endswith(expected)


def test_minimum_sizes_build():
    inception = build_backbone("inception_v3", (75, 80))
    assert inception.name == "backbone"
    assert tuple(inception.input.shape) == (None, 75, 80, 3)
    assert inception.output.shape[-1] == 2048
    assert build_backbone("mobilenet_v3_small", 32).output.shape[-1] == 576


def test_tiny_cnn_halves_the_size_four_times_and_has_no_imagenet_weights():
    tiny = build_backbone("tiny_cnn", (32, 48))
    assert tiny.name == "backbone" and tuple(tiny.output.shape) == (None, 2, 3, 128)  # 32/16, 48/16; 128 filters
    # 3x3 kernels without bias (16·3·9 + 32·16·9 + 64·32·9 + 128·64·9 weights) and 4 numbers per filter in BatchNorm
    assert tiny.count_params() == 9 * (16 * 3 + 32 * 16 + 64 * 32 + 128 * 64) + 4 * (16 + 32 + 64 + 128)
    with pytest.raises(ConfigError, match=r"tiny_cnn has no ImageNet weights.*Received: weights='imagenet'"):
        build_backbone("tiny_cnn", 32, weights="imagenet")


def test_bad_weights_argument():
    with pytest.raises(ConfigError, match=r"Received: weights=123"):
        build_backbone("mobilenet_v3_small", 32, weights=123)


# --- weights files -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "tiny_cnn"])
@pytest.mark.parametrize("suffix", [".weights.h5", ".h5"])
def test_weights_from_local_file(tmp_path, name, suffix):
    source = build_backbone(name, (32, 32))
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".h5":
        _save_legacy_h5(source, path)
    else:
        source.save_weights(path)
    fresh = build_backbone(name, (32, 32))
    assert not all(np.array_equal(a, b) for a, b in zip(source.get_weights(), fresh.get_weights()))

    loaded = build_backbone(name, (32, 32), weights=str(path))
    assert len(loaded.weights) == len(source.weights)
    for a, b in zip(source.weights, loaded.weights):  # (auto-named layers may differ in name)
        assert a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = BackbonePreprocess(name)(_pixels((2, 32, 32, 3)))
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(source(x)), rtol=0, atol=1e-6)

    # the backbones without top are fully convolutional: the same file fits another input size
    bigger = build_backbone(name, (64, 48), weights=path)
    np.testing.assert_array_equal(bigger.get_weights()[-1], source.get_weights()[-1])


def test_inception_weights_from_notop_style_h5(tmp_path):
    source = build_backbone("inception_v3", (75, 75))
    path = _save_legacy_h5(source, tmp_path / "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5")
    loaded = build_backbone("inception_v3", (75, 75), weights=path)
    x = BackbonePreprocess("inception_v3")(_pixels((1, 75, 75, 3)))
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(source(x)), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Keras lists every layer it skipped
@pytest.mark.parametrize("suffix", [".weights.h5", ".h5"])
def test_wrong_shape_weights_file_names_the_file(tmp_path, suffix):
    thinner = keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.75)
    path = tmp_path / f"thin{suffix}"
    if suffix == ".h5":
        _save_legacy_h5(thinner, path)
    else:
        thinner.save_weights(path)
    with pytest.raises(ModelError) as info:
        build_backbone("mobilenet_v3_small", (32, 32), weights=path)
    assert str(path) in str(info.value)
    assert str(info.value).endswith(f"Received: weights={str(path)!r}")


def test_missing_or_oddly_named_weights_file(tmp_path):
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(ModelError, match="not found") as info:
        build_backbone("mobilenet_v3_small", 32, weights=missing)
    assert str(missing) in str(info.value)
    odd = tmp_path / "weights.bin"
    odd.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match=r"\.weights\.h5"):
        build_backbone("mobilenet_v3_small", 32, weights=odd)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file")
    with pytest.raises(ModelError, match="garbage.h5"):
        build_backbone("mobilenet_v3_small", 32, weights=garbage)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_imagenet_download_failure_is_a_model_error(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid/x_notop.h5: None -- no network")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(ModelError, match=r"notop\.h5.*Received: weights='imagenet'"):
        build_backbone("mobilenet_v3_small", 32, weights="imagenet")


def test_efficientnet_imagenet_file_by_path_matches_the_imagenet_topology(tmp_path, monkeypatch):
    """keras' EfficientNet ImageNet files store std devs as "variance" and the
    weights="imagenet" model adds a Rescaling for it; by path we must compute the same."""
    source = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    norm = next(layer for layer in source.layers if isinstance(layer, keras.layers.Normalization))
    norm.adapt_mean.assign(np.array([0.485, 0.456, 0.406], "float32").reshape(norm.adapt_mean.shape))
    norm.adapt_variance.assign(np.array([0.229, 0.224, 0.225], "float32").reshape(norm.adapt_variance.shape))
    norm.finalize_state()
    path = _save_legacy_h5(source, tmp_path / "efficientnetb0_notop.h5")

    monkeypatch.setattr(file_utils, "get_file", lambda *args, **kwargs: str(path))
    reference = keras.applications.EfficientNetB0(include_top=False, weights="imagenet", input_shape=(32, 32, 3))
    ours = build_backbone("efficientnet_b0", (32, 32), weights=path)

    x = _pixels((2, 32, 32, 3))
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(reference(x)), rtol=1e-4, atol=1e-4)
    # and by hand: the stem sees (x / 255 - mean) / std
    stem_ours = keras.Model(ours.input, ours.get_layer("stem_conv_pad").output)
    expected_first = (x[0, 0, 0] / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    padded = np.asarray(stem_ours(x))
    np.testing.assert_allclose(padded[0, 0, 0], expected_first, rtol=1e-4)


# --- freezing ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7])
def test_trainable_layers_leaves_exactly_n_on_top(n):
    backbone = build_backbone("mobilenet_v3_small", 32)
    assert set_trainable(backbone, trainable_layers=n) == n
    flags = [layer.trainable for layer in _non_input_layers(backbone)]
    assert flags == [False] * (len(flags) - n) + [True] * n
    if n == 0:
        assert backbone.trainable_weights == []


def test_all_trainable_by_default_and_range_checked():
    backbone = build_backbone("mobilenet_v3_small", 32)
    set_trainable(backbone, trainable_layers=3)
    count = len(_non_input_layers(backbone))
    assert set_trainable(backbone) == count
    assert all(layer.trainable for layer in backbone.layers)
    with pytest.raises(ConfigError, match=rf"\[0, {count}\]. Received: trainable_layers={count + 1}"):
        set_trainable(backbone, trainable_layers=count + 1)
    with pytest.raises(ConfigError, match="Received: trainable_layers=-1"):
        set_trainable(backbone, trainable_layers=-1)
    with pytest.raises(ConfigError, match="at most one"):
        set_trainable(backbone, trainable_layers=2, trainable_from="conv_1")


def test_inception_trainable_from_mixed8_is_the_classic_top_two_blocks():
    backbone = build_backbone("inception_v3", 75)
    set_trainable(backbone, trainable_from="mixed8")
    # Keras' fine-tuning guide: freeze InceptionV3 layers[:249], train layers[249:]
    reference = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(75, 75, 3))
    # (layer names are auto-numbered per build, so compare by position and shape)
    expected = [(i, tuple(w.shape)) for i, layer in enumerate(reference.layers) if i >= 249 for w in layer.trainable_weights]
    actual = [(i, tuple(w.shape)) for i, layer in enumerate(backbone.layers) for w in layer.trainable_weights]
    assert actual == expected and len(expected) > 0
    assert backbone.layers[249].name.startswith("conv2d") and backbone.layers[248].name == "mixed8"
    with pytest.raises(ConfigError, match=r"block ends: mixed0, .*mixed10\)\. Received: trainable_from='mixed11'"):
        set_trainable(backbone, trainable_from="mixed11")


def test_frozen_batchnorm_runs_in_inference_mode():
    backbone = build_backbone("mobilenet_v3_small", 32)
    x = BackbonePreprocess("mobilenet_v3_small")(_pixels((4, 32, 32, 3)))
    set_trainable(backbone, trainable_layers=0)
    bn = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
    moving_mean = np.asarray(bn.moving_mean).copy()
    np.testing.assert_allclose(np.asarray(backbone(x, training=True)), np.asarray(backbone(x, training=False)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(bn.moving_mean), moving_mean)
    set_trainable(backbone)  # unfrozen: batch statistics in training mode
    assert not np.allclose(np.asarray(backbone(x, training=True)), np.asarray(backbone(x, training=False)), atol=1e-4)


def test_backbone_spec_families_exist():
    from street2shop.model import backbones

    for spec in BACKBONES.values():
        if spec.family == "street2shop":  # a constructor of the package's own
            assert callable(getattr(backbones, spec.application))
            continue
        assert hasattr(keras.applications, spec.application)
        assert hasattr(getattr(keras.applications, spec.family), "preprocess_input")
    assert backbone_spec("inception_v3").min_size == 75
