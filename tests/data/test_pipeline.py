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
