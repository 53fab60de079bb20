import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from street2shop.data import pipeline
from street2shop.data.pairs import PairConfig, PairPlanner
from street2shop.data.records import Box, Record

RED, BLUE = (255, 0, 0), (0, 0, 255)


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def square_image(h=80, w=100, box=(20, 30, 40, 20)):
    """Blue image with a red rectangle at box = (left, top, width, height)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = BLUE
    left, top, bw, bh = box
    img[top : top + bh, left : left + bw] = RED
    return img


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF", "JPEG"])
def test_decode_formats_give_rgb_uint8(fmt):
    img = square_image()
    decoded = pipeline.decode_image(tf.constant(encode(img, fmt))).numpy()
    assert decoded.shape == (80, 100, 3) and decoded.dtype == np.uint8
    tol = 40 if fmt == "JPEG" else 0
    assert np.abs(decoded[40, 40].astype(int) - RED).max() <= tol
    assert np.abs(decoded[5, 5].astype(int) - BLUE).max() <= tol


def test_animated_gif_uses_first_frame():
    frames = [Image.fromarray(np.full((10, 12, 3), c, np.uint8)) for c in (RED, BLUE)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    decoded = pipeline.decode_image(tf.constant(buf.getvalue())).numpy()
    assert decoded.shape == (10, 12, 3)
    assert tuple(decoded[0, 0]) == RED


def test_crop_to_pixel_box_keeps_exactly_the_square():
    img = square_image(box=(20, 30, 40, 20))
    image = tf.constant(img)
    box = pipeline.ltwh_to_normalized(tf.constant([20.0, 30.0, 40.0, 20.0]), tf.shape(image))
    # hand calculation: ymin=30/80, xmin=20/100, ymax=50/80, xmax=60/100
    np.testing.assert_allclose(box.numpy(), [0.375, 0.2, 0.625, 0.6], atol=1e-7)
    pixels, valid = pipeline.crop_and_resize(image, box, (75, 75))
    assert bool(valid)
    assert pixels.shape == (75, 75, 3) and pixels.dtype == tf.float32
    np.testing.assert_allclose(pixels.numpy().reshape(-1, 3), np.tile(RED, (75 * 75, 1)), atol=0.5)


def test_no_box_means_whole_image_and_resize_range():
    img = square_image()
    pixels, valid = pipeline.prepare_image(tf.constant(encode(img, "PNG")), image_size=(16, 20))
    assert bool(valid) and pixels.shape == (16, 20, 3)
    p = pixels.numpy()
    assert p.min() >= 0 and p.max() <= 255
    assert np.allclose(p[0, 0], BLUE, atol=0.5)  # corner is background
    none_box = pipeline.ltwh_to_normalized(tf.constant(pipeline.NO_BOX), tf.constant([80, 100, 3]))
    np.testing.assert_array_equal(none_box.numpy(), [0, 0, 1, 1])


def test_box_partly_outside_is_clamped_and_empty_box_is_invalid():
    image = tf.constant(square_image(box=(80, 60, 20, 20)))  # red in the bottom-right corner
    # box reaches past the image: clamped to the red corner
    box = pipeline.ltwh_to_normalized(tf.constant([80.0, 60.0, 500.0, 500.0]), tf.shape(image))
    pixels, valid = pipeline.crop_and_resize(image, box, (8, 8))
    assert bool(valid)
    np.testing.assert_allclose(pixels.numpy().reshape(-1, 3), np.tile(RED, (64, 1)), atol=0.5)
    # box entirely outside: nothing to crop
    box = pipeline.ltwh_to_normalized(tf.constant([150.0, 10.0, 20.0, 20.0]), tf.shape(image))
    _, valid = pipeline.crop_and_resize(image, box, (8, 8))
    assert not bool(valid)


def write_images(tmp_path, n_products=3, street_per=2, corrupt=False):
    rng = np.random.default_rng(0)
    records = []
    for p in range(n_products):
        colour = rng.integers(0, 256, 3).astype(np.uint8)
        for k in range(street_per + 1):
            img = np.full((40, 50, 3), colour, np.uint8)
            domain = "shop" if k == 0 else "street"
            path = tmp_path / f"p{p}_{k}.jpg"
            Image.fromarray(img).save(path)
            box = Box(5, 5, 30, 20) if domain == "street" else None
            records.append(Record(str(path), f"p{p}", domain, "train", category="c", box=box))
    if corrupt:
        bad = tmp_path / "broken.jpg"
        bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        records.append(Record(str(bad), "p0", "street", "train"))
        outside = tmp_path / "outside.jpg"
        Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(outside)
        records.append(Record(str(outside), "p1", "street", "train", box=Box(60, 10, 5, 5)))
    return records


def test_check_images_skips_and_counts_corrupt_files_and_empty_boxes(tmp_path, caplog):
    records = write_images(tmp_path, corrupt=True)
    good, report = pipeline.check_images(records, workers=2)
    assert len(good) == len(records) - 2
    assert list(report.bad_images) == [str(tmp_path / "broken.jpg")]
    assert [p for p, _ in report.empty_boxes] == [str(tmp_path / "outside.jpg")]
    assert report.checked == len(records)
    assert "broken.jpg" in caplog.text


def test_pair_dataset_elements(tmp_path):
    records = write_images(tmp_path)
    planner = PairPlanner(records, PairConfig(pairs_per_epoch=8, seed=3))
    ds = pipeline.pair_dataset(planner.plan, image_size=(75, 75), batch_size=4, epochs=1,
                               augment=pipeline.AugmentConfig(street=1.0, shop=0.3, seed=1))
    batches = list(ds)
    assert len(batches) == 2
    x, y, w = batches[0]
    assert set(x) == {"image_a", "image_b"} and set(y) == {"distance"} and set(w) == {"distance"}
    assert x["image_a"].shape == (4, 75, 75, 3) and x["image_a"].dtype == tf.float32
    assert y["distance"].dtype == tf.float32 and y["distance"].shape == (4,)
    for batch in batches:
        for key in ("image_a", "image_b"):
            v = batch[0][key].numpy()
            assert v.min() >= 0.0 and v.max() <= 255.0
    labels = np.concatenate([b[1]["distance"].numpy() for b in batches])
    plan = planner.plan(0)
    np.testing.assert_array_equal(labels, plan.label)  # deterministic order: plan order


def test_pair_dataset_with_classes_and_weights(tmp_path):
    records = write_images(tmp_path)
    aux = [Record(r.image_path, f"class{i % 2}", "shop", "aux") for i, r in enumerate(records)]
    labels = [i % 2 for i in range(len(aux))]
    planner = PairPlanner(records, PairConfig(pairs_per_epoch=12, seed=0), auxiliary=aux, auxiliary_labels=labels)
    ds = pipeline.pair_dataset(planner.plan, image_size=75, batch_size=12, epochs=1, with_classes=True, pair_weights=(1.0, 0.25))
    x, y, w = next(iter(ds))
    plan = planner.plan(0)
    np.testing.assert_array_equal(y["logits_a"].numpy(), plan.class_a)
    np.testing.assert_array_equal(y["logits_b"].numpy(), plan.class_b)
    expected_w = np.where(plan.kind == 1, 0.25, 1.0)
    np.testing.assert_allclose(w["distance"].numpy(), expected_w)
    # product images carry no class label; auxiliary ones do
    assert np.all(plan.class_a[plan.kind == 0] == -1) and np.all(plan.class_a[plan.kind == 1] >= 0)


def test_pair_dataset_class_weights_per_image_and_zero_means_unlabelled(tmp_path):
    records = write_images(tmp_path)
    aux = [Record(r.image_path, f"class{i % 2}", "shop", "aux") for i, r in enumerate(records)]
    labels = [i % 2 for i in range(len(aux))]
    products = sorted({r.product_id for r in records})
    planner = PairPlanner(records, PairConfig(pairs_per_epoch=12, seed=0), auxiliary=aux, auxiliary_labels=labels,
                          product_labels={p: 2 + i for i, p in enumerate(products)})
    plan = planner.plan(0)
    assert np.all(plan.class_a >= 0) and set(plan.kind.tolist()) == {0, 1}  # every image labelled, both kinds
    ds = pipeline.pair_dataset(planner.plan, image_size=75, batch_size=12, epochs=1, with_classes=True, class_weights=(0.5, 0.25))
    _, y, w = next(iter(ds))
    np.testing.assert_array_equal(y["logits_a"].numpy(), plan.class_a)
    for key in ("logits_a", "logits_b"):
        np.testing.assert_allclose(w[key].numpy(), np.where(plan.kind == 1, 0.25, 0.5))
    # A weight of 0 turns the images of that kind into unlabelled ones (class -1).
    ds = pipeline.pair_dataset(planner.plan, image_size=75, batch_size=12, epochs=1, with_classes=True, class_weights=(0.5, 0.0))
    _, y, _ = next(iter(ds))
    np.testing.assert_array_equal(y["logits_b"].numpy(), np.where(plan.kind == 1, -1, plan.class_b))


def test_corrupt_file_in_plan_is_skipped_not_fatal(tmp_path):
    records = write_images(tmp_path)
    # Break an image after planning: the pipeline must skip its pairs, not stop.
    planner = PairPlanner(records, PairConfig(pairs_per_epoch=16, seed=0))
    victim = records[1].image_path
    with open(victim, "wb") as f:
        f.write(b"garbage")
    plan = planner.plan(0)
    touching = int(np.sum((plan.path_a == victim) | (plan.path_b == victim)))
    assert touching > 0
    ds = pipeline.pair_dataset(planner.plan, image_size=75, batch_size=1, epochs=1)
    assert sum(1 for _ in ds) == 16 - touching


def test_resumed_epochs_match(tmp_path):
    records = write_images(tmp_path)
    planner = PairPlanner(records, PairConfig(pairs_per_epoch=4, seed=5))
    full = [b[1]["distance"].numpy() for b in pipeline.pair_dataset(planner.plan, image_size=75, batch_size=4, epochs=3)]
    resumed = [b[1]["distance"].numpy() for b in pipeline.pair_dataset(planner.plan, image_size=75, batch_size=4, epochs=2, start_epoch=1)]
    np.testing.assert_array_equal(np.stack(full[1:]), np.stack(resumed))


# --------------------------------------------------------------------------- JPEG DCT-domain downscaling


def smooth_image(h, w):
    """Slow colour gradients and waves (periods of 100+ pixels): nothing a 1/8 scale loses."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(2 * np.pi * x / 160)
    g = 40 + 180 * y / h
    b = 128 + 90 * np.cos(2 * np.pi * (x + y) / 230)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def reference(data: bytes, box, size):
    """The plain path: full decode, crop, antialiased resize."""
    image = pipeline.decode_image(tf.constant(data))
    return pipeline.crop_and_resize(image, tf.constant(box, tf.float32), size)


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
    index = pipeline.jpeg_ratio(tf.constant(shape), tf.constant(box, tf.float32), size)
    assert int(index) == expected


def test_large_jpeg_is_decoded_scaled_down():
    data = encode(smooth_image(400, 520), "JPEG")
    image, box = pipeline._decode_for_crop(tf.constant(data), tf.constant([0.0, 0.0, 1.0, 1.0]), (64, 64), pixel_box=False)
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
    fast, valid = pipeline.prepare_image(tf.constant(data), tf.constant(box), image_size=(64, 64))
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
    index = pipeline.jpeg_ratio(tf.image.extract_jpeg_shape(tf.constant(data)), tf.constant([0.0, 0.0, 1.0, 1.0]), (64, 64))
    assert int(index) == 0
    pixels, _ = pipeline.prepare_image(tf.constant(data), image_size=(64, 64))
    expected, _ = reference(data, [0, 0, 1, 1], (64, 64))
    np.testing.assert_array_equal(pixels.numpy(), expected.numpy())


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF"])
def test_large_non_jpeg_crop_to_square_is_exact(fmt):
    # Not a JPEG: full decode_image, so a box on whole pixels crops exactly the red square.
    img = square_image(h=400, w=500, box=(100, 120, 200, 160))
    box = tf.constant([120 / 400, 100 / 500, 280 / 400, 300 / 500])
    pixels, valid = pipeline.prepare_image(tf.constant(encode(img, fmt)), box, image_size=(32, 32))
    assert bool(valid)
    np.testing.assert_allclose(pixels.numpy().reshape(-1, 3), np.tile(RED, (32 * 32, 1)), atol=0.5)


def test_pixel_box_on_scaled_jpeg_is_normalised_against_the_full_image(tmp_path):
    # Red square on 8-pixel-block boundaries (so JPEG blurs nothing into it) in
    # a 400 x 512 photo; the 192 x 256 box is 6x the 32 px target: ratio 4.
    img = square_image(h=400, w=512, box=(128, 96, 256, 192))
    path = tmp_path / "big.jpg"
    Image.fromarray(img).save(path, quality=95)
    pixels, valid = pipeline._load_slot(tf.constant(str(path)), tf.constant([128.0, 96.0, 256.0, 192.0]), (32, 32))
    assert bool(valid)
    # JPEG (chroma at half resolution) leaves a few levels of error, as in test_decode_formats_give_rgb_uint8.
    assert np.abs(pixels.numpy()[2:-2, 2:-2] - np.array(RED)).max() <= 40
    assert np.abs(pixels.numpy().mean(axis=(0, 1)) - np.array(RED)).max() <= 20


def test_corrupt_jpeg_header_raises():
    with pytest.raises(tf.errors.InvalidArgumentError):
        pipeline.prepare_image(tf.constant(b"\xff\xd8\xff\xe0 not really a jpeg"), image_size=8)


def test_prepare_image_in_tf_function_map_fn_and_tf_data():
    big = encode(smooth_image(400, 520), "JPEG")
    small = encode(smooth_image(60, 70), "JPEG")
    png = encode(smooth_image(300, 200), "PNG")
    batch = [big, small, png]
    eager = np.stack([pipeline.prepare_image(tf.constant(b), image_size=(48, 40))[0].numpy() for b in batch])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def decode_batch(image_bytes):  # as street2shop.export does
        fn = lambda b: pipeline.prepare_image(b, image_size=(48, 40))[0]  # noqa: E731
        return tf.map_fn(fn, image_bytes, fn_output_signature=tf.TensorSpec([48, 40, 3], tf.float32))

    np.testing.assert_allclose(decode_batch(tf.constant(batch)).numpy(), eager, atol=1e-4)
    ds = tf.data.Dataset.from_tensor_slices(batch).map(lambda b: pipeline.prepare_image(b, image_size=(48, 40))[0], num_parallel_calls=2)
    np.testing.assert_allclose(np.stack(list(ds.as_numpy_iterator())), eager, atol=1e-4)


def test_augmentation_layers_draw_independent_random_numbers():
    aug = pipeline.make_augmenter(1.0, seed=0)
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (64, 16, 16, 3)).astype("float32"))
    layers = {layer.__class__.__name__: layer for layer in aug.layers}
    angle = np.asarray(layers["RandomRotation"].get_random_transformation(images, training=True)["angle"]).ravel()
    brightness = np.asarray(layers["RandomBrightness"].get_random_transformation(images, training=True)["rgb_delta"]).ravel()
    # With one shared seed these were the same draws, rescaled: rank correlation 1.
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert abs(np.corrcoef(ranks(angle), ranks(brightness))[0, 1]) < 0.5


def test_street_and_shop_images_get_their_own_augmentation(tmp_path):
    records = write_images(tmp_path)
    planner = PairPlanner(records, PairConfig(pairs_per_epoch=8, seed=3, street_street_fraction=1.0))
    plain = list(pipeline.pair_dataset(planner.plan, image_size=75, batch_size=8, epochs=1))[0][0]
    # shop strength 0: shop images pass through untouched; street strength > 0 changes them
    augmented = list(pipeline.pair_dataset(planner.plan, image_size=75, batch_size=8, epochs=1,
                                           augment=pipeline.AugmentConfig(street=1.0, shop=0.0, seed=1)))[0][0]
    plan = planner.plan(0)
    for slot, street in (("image_a", plan.street_a), ("image_b", plan.street_b)):
        same = np.all(np.isclose(plain[slot].numpy(), augmented[slot].numpy()), axis=(1, 2, 3))
        np.testing.assert_array_equal(same, ~street)
