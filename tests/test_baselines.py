import math

import numpy as np
import pytest
from PIL import Image

from street2shop.baselines import colour_histogram, colour_histogram_embeddings, top_k_accuracy
from street2shop.data.image import Box
from street2shop.data.records import Record
from street2shop.errors import ConfigError, DataError

# With bins (8, 4, 4) bin (h, s, v) is at index (h * 4 + s) * 4 + v.
RED = (0 * 4 + 3) * 4 + 3  # PIL hue 0, saturation 255, value 255
BLUE = (5 * 4 + 3) * 4 + 3  # PIL hue 170 (240 degrees): 170 * 8 // 256 = 5
BLACK = 0
GREY = 2  # hue 0, saturation 0, value 128: 128 * 4 // 256 = 2


def _solid(colour, h=10, w=10):
    return np.full((h, w, 3), colour, dtype=np.uint8)


def _one_hot(index, size=128):
    v = np.zeros(size, np.float32)
    v[index] = 1.0
    return v


@pytest.mark.parametrize("colour, index", [((255, 0, 0), RED), ((0, 0, 255), BLUE), ((0, 0, 0), BLACK),
                                           ((128, 128, 128), GREY)])  # fmt: skip
def test_pure_colours_fall_in_one_bin(colour, index):
    h = colour_histogram(_solid(colour))
    assert h.dtype == np.float32 and h.shape == (128,)
    np.testing.assert_allclose(h, _one_hot(index), atol=1e-6)


def test_mixture_is_l1_then_l2_normalised():
    image = np.concatenate([_solid((255, 0, 0), 4, 4), _solid((0, 0, 0), 4, 12)], axis=1)  # 1/4 red, 3/4 black
    expected = np.zeros(128)
    expected[RED], expected[BLACK] = 1, 3
    expected /= math.sqrt(1 + 9)
    np.testing.assert_allclose(colour_histogram(image), expected, atol=1e-6)


def test_bins_set_the_size():
    h = colour_histogram(_solid((0, 0, 255)), bins=(2, 2, 2))
    # hue 170 * 2 // 256 = 1, s = 1, v = 1 -> (1 * 2 + 1) * 2 + 1 = 7
    np.testing.assert_allclose(h, _one_hot(7, 8), atol=1e-6)


@pytest.mark.parametrize("image", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                                   np.zeros((0, 4, 3), np.uint8), np.zeros((4, 4, 4), np.uint8)])  # fmt: skip
def test_bad_images(image):
    with pytest.raises(DataError, match="Received"):
        colour_histogram(image)


@pytest.mark.parametrize("bins", [(0, 4, 4), (8, 4), (8, 4, 300), (8.0, 4, 4)])
def test_bad_bins(bins):
    with pytest.raises(ConfigError, match="Received: bins="):
        colour_histogram(_solid((1, 2, 3)), bins=bins)


def _record(path, box=None):
    return Record(str(path), "p", "street", "val", None, box)


def test_embeddings_crop_to_box(tmp_path):
    pixels = np.concatenate([_solid((255, 0, 0), 10, 10), _solid((0, 0, 255), 10, 10)], axis=1)  # red | blue
    path = tmp_path / "half.png"
    Image.fromarray(pixels).save(path)
    records = [
        _record(path, Box(0, 0, 10, 10)),  # the red half
        _record(path, Box(10.4, 2, 30, 30)),  # the blue half, clamped to the image
        _record(path),  # no box: the whole image
    ]
    cropped = colour_histogram_embeddings(records)
    assert cropped.shape == (3, 128) and cropped.dtype == np.float32
    both = np.zeros(128)
    both[RED] = both[BLUE] = 1 / math.sqrt(2)
    np.testing.assert_allclose(cropped, np.stack([_one_hot(RED), _one_hot(BLUE), both]), atol=1e-6)
    whole = colour_histogram_embeddings(records, crop_to_box=False)
    np.testing.assert_allclose(whole, np.stack([both] * 3), atol=1e-6)


def test_embeddings_errors(tmp_path):
    path = tmp_path / "red.png"
    Image.fromarray(_solid((255, 0, 0))).save(path)
    with pytest.raises(DataError, match="outside"):
        colour_histogram_embeddings([_record(path, Box(50, 50, 5, 5))])
    with pytest.raises(DataError, match="missing.png"):
        colour_histogram_embeddings([_record(tmp_path / "missing.png")])
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="junk.jpg"):
        colour_histogram_embeddings([_record(tmp_path / "junk.jpg")])
    assert colour_histogram_embeddings([]).shape == (0, 128)


def test_top_k_ranks_by_cosine():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # A, B, C
    queries = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # q0 (A): A 1, C .71, B 0 -> rank 1. q1 (B): A, C, B -> rank 3. q2 (D): not in the gallery.
    acc = top_k_accuracy(queries, ["A", "B", "D"], gallery, ["A", "B", "C"], ks=(1, 2, 3, 20))
    assert acc == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: pytest.approx(2 / 3), 20: pytest.approx(2 / 3)}


def test_top_k_uses_cosine_not_dot_product():
    gallery = np.array([[10.0, 10.0], [1.0, 0.1]])  # dot product prefers A, cosine prefers B
    assert top_k_accuracy(np.array([[3.0, 0.0]]), ["B"], gallery, ["A", "B"], ks=(1,)) == {1: 1.0}


def test_top_k_deduplicates_products():
    gallery = np.array([[1.0, 0.0], [0.98, 0.2], [0.7, 0.71], [0.0, 1.0]])  # A, A, B, C
    # Sorted: A, A, B, C. B is third item but second distinct product.
    acc = top_k_accuracy(np.array([[1.0, 0.0]]), ["B"], gallery, ["A", "A", "B", "C"], ks=(1, 2))
    assert acc == {1: 0.0, 2: 1.0}


def test_top_k_ties_keep_gallery_order():
    query = np.array([[1.0, 0.0]])
    # [2, 0] and [1, 0] both have cosine exactly 1 with the query.
    assert top_k_accuracy(query, ["B"], np.array([[1.0, 0.0], [2.0, 0.0]]), ["A", "B"], ks=(1, 2)) == {1: 0.0, 2: 1.0}
    assert top_k_accuracy(query, ["B"], np.array([[2.0, 0.0], [1.0, 0.0]]), ["B", "A"], ks=(1, 2)) == {1: 1.0, 2: 1.0}
    # A zero query is equally (un)like everything: gallery order again.
    zero = np.zeros((1, 2))
    assert top_k_accuracy(zero, ["B"], np.eye(2), ["A", "B"], ks=(1, 2)) == {1: 0.0, 2: 1.0}


@pytest.mark.parametrize(
    "args, error",
    [
        ((np.ones((2, 3)), ["a", "b"], np.ones((2, 4)), ["a", "b"]), DataError),
        ((np.ones((2, 3)), ["a"], np.ones((2, 3)), ["a", "b"]), DataError),
        ((np.ones((2, 3)), ["a", "b"], np.ones((2, 3)), ["a"]), DataError),
        ((np.ones((0, 3)), [], np.ones((2, 3)), ["a", "b"]), DataError),
    ],
)
def test_top_k_bad_shapes(args, error):
    with pytest.raises(error, match="Received"):
        top_k_accuracy(*args)


@pytest.mark.parametrize("ks", [(0,), (1, -5), (), (1.5,)])
def test_top_k_bad_ks(ks):
    with pytest.raises(ConfigError, match="Received: ks="):
        top_k_accuracy(np.ones((1, 2)), ["a"], np.ones((1, 2)), ["a"], ks=ks)
