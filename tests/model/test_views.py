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


def central_crop_by_hand(image, fraction=0.8):
    """TF's crop_and_resize, bilinear, of the central ``fraction`` back to the image's size, by numpy: row i of
    the crop samples y = m·(H − 1) + i·fraction·(H − 1)/(H − 1) with m = (1 − fraction)/2, and the same for columns."""
    h, w, _ = image.shape
    margin = (1 - fraction) / 2
    ys = margin * (h - 1) + np.arange(h) * fraction
    xs = margin * (w - 1) + np.arange(w) * fraction
    # bilinear is separable: interpolate along the columns, then along the rows
    along_x = np.stack([[np.interp(xs, np.arange(w), image[r, :, c]) for c in range(3)] for r in range(h)])  # [h, 3, w]
    along_x = along_x.transpose(0, 2, 1)  # [h, w, 3]
    return np.stack([[np.interp(ys, np.arange(h), along_x[:, col, c]) for c in range(3)] for col in range(w)]).transpose(2, 0, 1)


def test_flip_crops_is_the_normalised_mean_of_four_views():
    tower, kernel = linear_tower()
    pixels = np.random.default_rng(3).uniform(0, 255, (2, 6, 6, 3)).astype("float32")
    crops = np.stack([central_crop_by_hand(p) for p in pixels])
    views = [pixels, pixels[:, :, ::-1, :], crops, crops[:, :, ::-1, :]]
    mean = sum(v.reshape(2, -1) @ kernel for v in views) / 4
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(embed_views(tower, pixels, "flip-crops")), expected, rtol=1e-4, atol=1e-5)
    assert [view_count(m) for m in ("none", "flip", "flip-crops")] == [1, 2, 4]


def test_tta_fingerprint_names_the_views():
    from street2shop.embedders import TowerEmbedder
    from street2shop.export import weights_fingerprint

    tower, _ = linear_tower()
    assert TowerEmbedder(tower, tta="flip").identity().fingerprint == tta_fingerprint(weights_fingerprint(tower), "flip")
    assert TowerEmbedder(tower).identity().fingerprint == weights_fingerprint(tower)
    assert tta_fingerprint("abc", "none") == "abc"
    assert len({tta_fingerprint("abc", "flip"), tta_fingerprint("abc", "flip-crops"), tta_fingerprint("abd", "flip"), "abc"}) == 4
    with pytest.raises(ConfigError, match="Received: tta='rotate'"):
        tta_fingerprint("abc", "rotate")

