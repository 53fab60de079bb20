import json

import pytest

from street2shop.config import TrainConfig, load_config, save_config
from street2shop.errors import ConfigError


def test_toml_round_trip(tmp_path):
    config = TrainConfig().replace(manifest="m.csv", image_size=128, margin=0.8, check_images=False, weights="none")
    path = save_config(config, tmp_path / "config.toml")
    assert load_config(path) == config
    jpath = save_config(config, tmp_path / "config.json")
    assert json.loads(jpath.read_text())["loss"]["margin"] == 0.8
    assert load_config(jpath) == config


def test_a_path_with_quotes_backslashes_and_accents_survives_toml(tmp_path):
    awkward = 'C:\\data\\"shop" catalogue\\photos é\tø.csv'
    config = TrainConfig().replace(manifest=awkward, learning_rate=1e-5)
    path = save_config(config, tmp_path / "config.toml")
    assert load_config(path).data.manifest == awkward and load_config(path).fit.learning_rate == 1e-5
    assert path.read_text(encoding="utf-8").startswith("[data]\n")


def test_replace_by_field_name_and_types_coerced_from_strings():
    config = TrainConfig().replace(image_size="75", learning_rate="0.01", check_images="false")
    assert config.data.image_size == 75 and config.fit.learning_rate == 0.01 and config.data.check_images is False


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("margin", -1.0, "margin must be in (0, 2]. Received: margin=-1.0"),
        ("image_size", 8, "image_size must be >= 32. Received: image_size=8"),
        ("backbone", "vgg", "backbone must be one of"),
        ("loss", "triplet", "Received: loss='triplet'"),
        ("positive_quantile", 1.5, "positive_quantile"),
        ("batch_size", "lots", "batch_size must be int. Received: batch_size='lots'"),
        ("classifier_scale", -2.0, "classifier_scale must be finite and >= 0. Received: classifier_scale=-2.0"),
        ("classifier_scale", float("inf"), "classifier_scale must be finite and >= 0. Received: classifier_scale=inf"),
        ("precision", "float16", "precision must be 'float32' or 'mixed_float16' or 'mixed_bfloat16'. Received: precision='float16'"),
        ("jit_compile", "true", "jit_compile must be 'auto' or 'on' or 'off'. Received: jit_compile='true'"),
    ],
)
def test_bad_values_name_the_field(field, value, expected):
    with pytest.raises(ConfigError) as info:
        TrainConfig().replace(**{field: value})
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config field 'marginn'"):
        TrainConfig().replace(marginn=1.0)
    path = tmp_path / "c.toml"
    path.write_text("[loss]\nmargn = 1.0\n")
    with pytest.raises(ConfigError, match=r"c.toml \[loss\]: unknown field\(s\) \['margn'\]"):
        load_config(path)
    path.write_text("[losses]\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(path)
    path.write_text("[loss\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


def test_backbones_and_their_minimum_sizes_come_from_the_model_registry():
    from street2shop.model.backbones import BACKBONES

    for name, spec in BACKBONES.items():
        weights = "none" if name == "tiny_cnn" else "imagenet"
        assert TrainConfig().replace(backbone=name, image_size=max(32, spec.min_size), weights=weights).model.backbone == name
    with pytest.raises(ConfigError, match="weights must be 'none' or the path of a weights file for backbone tiny_cnn, which has no "
                                          "ImageNet weights. Received: weights='imagenet'"):
        TrainConfig().replace(backbone="tiny_cnn")
    with pytest.raises(ConfigError, match="image_size must be >= 71 for backbone xception"):
        TrainConfig().replace(backbone="xception", image_size=70)
    with pytest.raises(ConfigError, match="backbone must be one of inception_v3, resnet50"):
        TrainConfig().replace(backbone="vgg16")


def test_unset_values_read_as_none_where_their_field_says_so():
    config = TrainConfig().replace(trainable_layers=-1, bn_momentum=0.0, positive_quantile=0.0, val_split="", margin=0.5)
    assert config.model.get("trainable_layers") is None and config.model.get("bn_momentum") is None
    assert config.loss.get("positive_quantile") is None and config.data.get("val_split") is None
    assert config.loss.get("margin") == 0.5  # a field without an "unset" value is never None
    assert config.model.tower_kwargs()["trainable_layers"] is None
    assert config.loss.robust_kwargs() == {"margin": 0.5, "positive_threshold": None, "positive_quantile": None, "negative_floor": None}
    pairs = TrainConfig().replace(positive_fraction=0.25).data.pair_config(64, seed=3)
    assert (pairs.positive_fraction, pairs.negative_fraction, pairs.pairs_per_epoch, pairs.seed) == (0.25, None, 64, 3)
    with pytest.raises(ConfigError, match="no field 'nope'"):
        config.model.get("nope")


def test_image_size_must_suit_the_backbone():
    with pytest.raises(ConfigError, match="image_size must be >= 75 for backbone inception_v3. Received: image_size=64"):
        TrainConfig().replace(image_size=64)
    assert TrainConfig().replace(image_size=64, backbone="resnet50").data.image_size == 64
