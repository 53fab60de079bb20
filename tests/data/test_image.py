import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from street2shop.data import image as im
from tests.data.test_pipeline import BLUE, RED, encode, square_image, write_images


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF", "JPEG"])
def test_decode_formats_give_rgb_uint8(fmt):
    img = square_image()
    decoded = im.decode_image(tf.constant(encode(img, fmt))).numpy()
    assert decoded.shape == (80, 100, 3) and decoded.dtype == np.uint8
    tol = 40 if fmt == "JPEG" else 0
    assert np.abs(decoded[40, 40].astype(int) - RED).max() <= tol
    assert np.abs(decoded[5, 5].astype(int) - BLUE).max() <= tol


def test_animated_gif_uses_first_frame():
    frames = [Image.fromarray(np.full((10, 12, 3), c, np.uint8)) for c in (RED, BLUE)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    decoded = im.decode_image(tf.constant(buf.getvalue())).numpy()
    assert decoded.shape == (10, 12, 3)
    assert tuple(decoded[0, 0]) == RED


def test_crop_to_pixel_box_keeps_exactly_the_square():
    img = square_image(box=(20, 30, 40, 20))
    image = tf.constant(img)
    box = im.ltwh_to_normalized(tf.constant([20.0, 30.0, 40.0, 20.0]), tf.shape(image))
    # hand calculation: ymin=30/80, xmin=20/100, ymax=50/80, xmax=60/100
    np.testing.assert_allclose(box.numpy(), [0.375, 0.2, 0.625, 0.6], atol=1e-7)
    pixels, valid = im.crop_and_resize(image, box, (75, 75))
    assert bool(valid)
    assert pixels.shape == (75, 75, 3) and pixels.dtype == tf.float32
    np.testing.assert_allclose(pixels.numpy().reshape(-1, 3), np.tile(RED, (75 * 75, 1)), atol=0.5)


def test_no_box_means_whole_image_and_resize_range():
    img = square_image()
    pixels, valid = im.prepare_image(tf.constant(encode(img, "PNG")), image_size=(16, 20))
    assert bool(valid) and pixels.shape == (16, 20, 3)
    p = pixels.numpy()
    assert p.min() >= 0 and p.max() <= 255
    assert np.allclose(p[0, 0], BLUE, atol=0.5)  # corner is background
    none_box = im.ltwh_to_normalized(tf.constant(im.NO_BOX), tf.constant([80, 100, 3]))
    np.testing.assert_array_equal(none_box.numpy(), [0, 0, 1, 1])


def test_box_partly_outside_is_clamped_and_empty_box_is_invalid():
    image = tf.constant(square_image(box=(80, 60, 20, 20)))  # red in the bottom-right corner
    # box reaches past the image: clamped to the red corner
    box = im.ltwh_to_normalized(tf.constant([80.0, 60.0, 500.0, 500.0]), tf.shape(image))
    pixels, valid = im.crop_and_resize(image, box, (8, 8))
    assert bool(valid)
    np.testing.assert_allclose(pixels.numpy().reshape(-1, 3), np.tile(RED, (64, 1)), atol=0.5)
    # box entirely outside: nothing to crop
    box = im.ltwh_to_normalized(tf.constant([150.0, 10.0, 20.0, 20.0]), tf.shape(image))
    _, valid = im.crop_and_resize(image, box, (8, 8))
    assert not bool(valid)


def test_check_images_skips_and_counts_corrupt_files_and_empty_boxes(tmp_path, caplog):
    records = write_images(tmp_path, corrupt=True)
    good, report = im.check_images(records, workers=2)
    assert len(good) == len(records) - 2
    assert list(report.bad_images) == [str(tmp_path / "broken.jpg")]
    assert [p for p, _ in report.empty_boxes] == [str(tmp_path / "outside.jpg")]
    assert report.checked == len(records)
    assert "broken.jpg" in caplog.text


def smooth_image(h, w):
    """Slow colour gradients and waves (periods of 100+ pixels): nothing a 1/8 scale loses."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(2 * np.pi * x / 160)
    g = 40 + 180 * y / h
    b = 128 + 90 * np.cos(2 * np.pi * (x + y) / 230)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def reference(data: bytes, box, size):
    """The plain path: full decode, crop, antialiased resize."""
    image = im.decode_image(tf.constant(data))
    return im.crop_and_resize(image, tf.constant(box, tf.float32), size)


@pytest.mark.parametrize(
    "shape, box, size, expected",
    [
        ((400, 520), [0, 0, 1, 1], (64, 64), 2),        # min(400, 520) / 64 = 6.25 -> ratio 4
        ((400, 520), [0, 0, 0.5, 0.5], (64, 64), 1),    # crop 200 x 260: 3.125 -> ratio 2
        ((128, 300), [0, 0, 1, 1], (64, 64), 1),        # exactly 2x in height -> ratio 2
        ((127, 300), [0, 0, 1, 1], (64, 64), 0),        # just under 2x -> full decode
        ((100, 100), [0, 0, 1, 1], (64, 64), 0),        # small image -> full decode
        ((1024, 2048), [0, 0, 1, 1], (64, 64), 3),      # 16x -> capped at 8
        ((1024, 2048), [0.1, 0.1, 0.1, 0.9], (64, 64), 0),  # empty box: nothing to scale
        ((400, 800), [0, 0, 1, 1], (50, 200), 2),       # min(400/50, 800/200) = min(8, 4) -> ratio 4
    ],
)
def test_jpeg_ratio_hand_cases(shape, box, size, expected):
    index = im.jpeg_ratio(tf.constant(shape), tf.constant(box, tf.float32), size)
    assert int(index) == expected


def test_large_jpeg_is_decoded_scaled_down():
    data = encode(smooth_image(400, 520), "JPEG")
    image, box = im._decode_for_crop(tf.constant(data), tf.constant([0.0, 0.0, 1.0, 1.0]), (64, 64), pixel_box=False)
    # ratio 4: libjpeg gives ceil(400 / 4) x ceil(520 / 4)
    assert image.shape == (100, 130, 3) and image.dtype == tf.uint8
    np.testing.assert_array_equal(box.numpy(), [0, 0, 1, 1])


@pytest.mark.parametrize("box", [[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.85, 0.7]])
def test_jpeg_fast_path_matches_full_decode(box):
    # Tolerance: both paths low-pass the image before sampling it at 64 px; the
    # DCT-domain scaling (a block-wise IDCT at 1/4 size) and the antialiased
    # bilinear resize are different filters, but on content this smooth both
    # pass it almost unchanged, so what is left is rounding to uint8 at the
    # intermediate size (<= 0.5) and filter differences along the gradients.
    # A mean of 3 levels (about 1 %) is below JPEG's own error at quality 90;
    # a wrong crop or scale shows up as tens of levels.
    data = encode(smooth_image(400, 520), "JPEG")
    fast, valid = im.prepare_image(tf.constant(data), tf.constant(box), image_size=(64, 64))
    plain, plain_valid = reference(data, box, (64, 64))
    assert bool(valid) and bool(plain_valid) and fast.shape == (64, 64, 3)
    diff = np.abs(fast.numpy() - plain.numpy())
    assert diff.mean() < 3.0, diff.mean()
    assert diff.max() < 10.0, diff.max()


def test_small_jpeg_takes_the_full_decode_path():
    # 100 x 110 is less than twice 64: decoded at full size, so the result is
    # exactly the plain path's, noise and all.
    rng = np.random.default_rng(1)
    data = encode(rng.integers(0, 256, (100, 110, 3), dtype=np.uint8), "JPEG")
    index = im.jpeg_ratio(tf.image.extract_jpeg_shape(tf.constant(data)), tf.constant([0.0, 0.0, 1.0, 1.0]), (64, 64))
    assert int(index) == 0
    pixels, _ = im.prepare_image(tf.constant(data), image_size=(64, 64))
    expected, _ = reference(data, [0, 0, 1, 1], (64, 64))
    np.testing.assert_array_equal(pixels.numpy(), expected.numpy())


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF"])
def test_large_non_jpeg_crop_to_square_is_exact(fmt):
    # Not a JPEG: full decode_image, so a box on whole pixels crops exactly the red square.
    img = square_image(h=400, w=500, box=(100, 120, 200, 160))
    box = tf.constant([120 / 400, 100 / 500, 280 / 400, 300 / 500])
    pixels, valid = im.prepare_image(tf.constant(encode(img, fmt)), box, image_size=(32, 32))
    assert bool(valid)
    np.testing.assert_allclose(pixels.numpy().reshape(-1, 3), np.tile(RED, (32 * 32, 1)), atol=0.5)


def test_pixel_box_on_scaled_jpeg_is_normalised_against_the_full_image(tmp_path):
    # Red square on 8-pixel-block boundaries (so JPEG blurs nothing into it) in
    # a 400 x 512 photo; the 192 x 256 box is 6x the 32 px target: ratio 4.
    img = square_image(h=400, w=512, box=(128, 96, 256, 192))
    path = tmp_path / "big.jpg"
    Image.fromarray(img).save(path, quality=95)
    pixels, valid = im.prepare_image(tf.io.read_file(str(path)), tf.constant([128.0, 96.0, 256.0, 192.0]), image_size=(32, 32), pixel_box=True)
    assert bool(valid)
    # JPEG (chroma at half resolution) leaves a few levels of error, as in test_decode_formats_give_rgb_uint8.
    assert np.abs(pixels.numpy()[2:-2, 2:-2] - np.array(RED)).max() <= 40
    assert np.abs(pixels.numpy().mean(axis=(0, 1)) - np.array(RED)).max() <= 20


def test_corrupt_jpeg_header_raises():
    with pytest.raises(tf.errors.InvalidArgumentError):
        im.prepare_image(tf.constant(b"\xff\xd8\xff\xe0 not really a jpeg"), image_size=8)


def test_prepare_image_in_tf_function_map_fn_and_tf_data():
    big = encode(smooth_image(400, 520), "JPEG")
    small = encode(smooth_image(60, 70), "JPEG")
    png = encode(smooth_image(300, 200), "PNG")
    batch = [big, small, png]
    eager = np.stack([im.prepare_image(tf.constant(b), image_size=(48, 40))[0].numpy() for b in batch])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def decode_batch(image_bytes):  # as street2shop.export does
        fn = lambda b: im.prepare_image(b, image_size=(48, 40))[0]  # noqa: E731
        return tf.map_fn(fn, image_bytes, fn_output_signature=tf.TensorSpec([48, 40, 3], tf.float32))

    np.testing.assert_allclose(decode_batch(tf.constant(batch)).numpy(), eager, atol=1e-4)
    ds = tf.data.Dataset.from_tensor_slices(batch).map(lambda b: im.prepare_image(b, image_size=(48, 40))[0], num_parallel_calls=2)
    np.testing.assert_allclose(np.stack(list(ds.as_numpy_iterator())), eager, atol=1e-4)


# --------------------------------------------------------------------------- boxes, checks, formats (no TensorFlow)


def test_box_geometry_by_hand():
    box = im.Box(10, 20, 30, 40)
    assert box.normalized(width=100, height=200) == pytest.approx((0.1, 0.1, 0.3, 0.4))
    assert box.pixel_bounds(100, 200) == (10, 20, 40, 60)
    # fractional edges round outwards: 10.5 -> 10, 40.2 -> 41
    assert im.Box(10.5, 20, 29.7, 40).pixel_bounds(100, 200) == (10, 20, 41, 60)
    # clamped to the image, and None when nothing is left
    assert im.Box(90, 190, 50, 50).pixel_bounds(100, 200) == (90, 190, 100, 200)
    assert im.Box(150, 10, 20, 20).pixel_bounds(100, 200) is None
    assert im.Box.parse("1,2,3.5,4") == im.Box(1, 2, 3.5, 4)
    for bad in ("1,2,3", "a,b,c,d", "1,2,0,4", "-1,2,3,4"):
        with pytest.raises(ValueError):
            im.Box.parse(bad)


@pytest.mark.parametrize("ltwh", [(20, 30, 40, 20), (80, 60, 500, 500), (0.5, 0.25, 10.2, 7.7), (99, 79, 1, 1)])
def test_box_pixel_bounds_are_the_pixels_the_graph_crops(ltwh):
    # Every pixel holds its own x, y: the crop's corner pixels say which pixels the graph kept.
    h, w = 80, 100
    y, x = np.mgrid[0:h, 0:w]
    image = tf.constant(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))
    bounds = im.Box(*ltwh).pixel_bounds(w, h)
    norm = tf.constant(im.Box(*ltwh).normalized(w, h), tf.float32)
    x0, y0, x1, y1 = bounds
    pixels, valid = im.crop_and_resize(image, norm, (y1 - y0, x1 - x0))  # same size: the resize copies
    assert bool(valid)
    p = pixels.numpy()
    assert (p[0, 0, 0], p[0, 0, 1]) == (x0, y0)
    assert (p[-1, -1, 0], p[-1, -1, 1]) == (x1 - 1, y1 - 1)


def test_inspect_image_names_each_kind_of_bad_file():
    good = encode(square_image(), "PNG")
    assert im.inspect_image(good) == im.ImageInfo("PNG", 100, 80)
    assert im.inspect_image(encode(square_image(), "JPEG")).format == "JPEG"
    cases = {
        b"": "empty file",
        b"hello, this is text": "not a JPEG, PNG, GIF or BMP",
        b"<!doctype html><html></html>": "not a JPEG, PNG, GIF or BMP",
        bytes(1024): "not a JPEG, PNG, GIF or BMP",  # a zero-filled "BMP"
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 10: "cannot read the PNG image",
    }
    for data, reason in cases.items():
        with pytest.raises(im.ImageError, match=reason):
            im.inspect_image(data)
    # a decompression bomb: a tiny PNG whose header says 40000 x 40000
    bomb = io.BytesIO()
    Image.new("1", (40000, 40000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 1_000_000
    with pytest.raises(im.ImageError, match="too large|larger than the limit"):
        im.inspect_image(bomb.getvalue())
    with pytest.raises(im.ImageError, match="larger than the limit of 7,999 pixels"):
        im.inspect_image(good, max_pixels=7999)
    # a truncated JPEG passes the header check, and is caught by the decoding one
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    full = encode(noise, "JPEG")
    truncated = full[: len(full) // 2]
    assert im.inspect_image(truncated).format == "JPEG"
    with pytest.raises(im.ImageError, match="cannot read the JPEG image"):
        im.inspect_image(truncated, decode=True)


def test_image_files_and_sizes():
    assert [im.is_image_file(n) for n in ("a.JPG", "b.jpeg", "c.png", "d.gif", "e.bmp", "f.webp", ".hidden.jpg", "g.txt")] == [
        True, True, True, True, True, False, False, False]
    assert im.image_size_2d(96) == (96, 96) and im.image_size_2d((64, 80)) == (64, 80)
    with pytest.raises(im.ConfigError, match="at least 75x75"):
        im.image_size_2d(64, min_size=75)
    with pytest.raises(im.ConfigError, match="int or \\(height, width\\)"):
        im.image_size_2d((1, 2, 3))
    jpeg = im.pattern_jpeg(24, 16)
    assert im.inspect_image(jpeg, decode=True) == im.ImageInfo("JPEG", 24, 16)


def test_check_photo_normalises_the_box_or_refuses_it():
    png = encode(square_image(), "PNG")  # 100 x 80
    assert im.check_photo(png) is None
    assert im.check_photo(png, im.Box(10, 20, 50, 40)) == pytest.approx((0.25, 0.1, 0.75, 0.6))
    with pytest.raises(im.ImageError, match="box .* lies outside the 100x80 image"):
        im.check_photo(png, im.Box(150, 10, 5, 5))
    with pytest.raises(im.ImageError, match="empty file"):
        im.check_photo(b"", im.Box(0, 0, 1, 1))
