"""Test-time augmentation, against references written by hand."""

import keras
import numpy as np
import pytest

from street2shop.errors import ConfigError
from street2shop.model.views import embed_views, tta_fingerprint, view_count


def linear_tower(size=6, dim=3, seed=0):
    """Flatten + a fixed random Dense: a tower whose answer numpy can compute."""
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(size * size * 3, dim)).astype("float32")
    inputs = keras.Input((size, size, 3))
    dense = keras.layers.Dense(dim, use_bias=False)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.set_weights([kernel])
    return model, kernel


def test_flip_is_the_normalised_mean_of_the_image_and_its_mirror():
    tower, kernel = linear_tower()
    pixels = np.random.default_rng(1).uniform(0, 255, (4, 6, 6, 3)).astype("float32")
    mean = (pixels.reshape(4, -1) @ kernel + pixels[:, :, ::-1, :].reshape(4, -1) @ kernel) / 2
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(embed_views(tower, pixels, "flip")), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(embed_views(tower, pixels, "none")), pixels.reshape(4, -1) @ kernel, rtol=1e-4, atol=1e-3)


def test_flip_crops_of_a_uniform_image_are_the_image_itself():
    # Every view of a one-colour image is that image (mirror and crop alike): the answer is the tower's, normalised.
    tower, kernel = linear_tower()
    pixels = np.full((2, 6, 6, 3), 0.0, "float32")
    pixels[0, ..., 0], pixels[1, ..., 2] = 200.0, 50.0
    out = pixels.reshape(2, -1) @ kernel
    np.testing.assert_allclose(np.asarray(embed_views(tower, pixels, "flip-crops")), out / np.linalg.norm(out, axis=1, keepdims=True), atol=1e-5)
    assert [view_count(m) for m in ("none", "flip", "flip-crops")] == [1, 2, 4]


def test_tta_fingerprint_names_the_views():
    assert tta_fingerprint("abc", "none") == "abc"
    assert len({tta_fingerprint("abc", "flip"), tta_fingerprint("abc", "flip-crops"), tta_fingerprint("abd", "flip"), "abc"}) == 4
    with pytest.raises(ConfigError, match="Received: tta='rotate'"):
        tta_fingerprint("abc", "rotate")

