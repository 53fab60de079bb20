import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from PIL import Image

from street2shop.data import pipeline
from street2shop.data.pairs import PairConfig, PairPlanner
from street2shop.data.image import Box
from street2shop.data.records import Record

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
