"""Photos on disk to the batches the siamese model trains on, as tf.data: pairs, augmentation, batches.

Each image of a pair goes through :func:`street2shop.data.image.prepare_image`
(decode → crop to its box → resize), the function the exported SavedModel
runs on request bytes too; then street and shop photos get their own
augmentation, and pairs are batched with their targets and sample weights.

Pixels leave the pipeline as float32 RGB in ``[0, 255]``. The backbone's own
preprocessing is a layer inside the tower. (DESIGN.md put it in the pipeline;
keeping it in the model means the exported ``embed_pixels`` signature and
users' own code cannot forget it.)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from street2shop.data.image import image_size_2d, prepare_image
from street2shop.data.pairs import PairPlan
from street2shop.errors import ConfigError, check_positive_int

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

logger = logging.getLogger(__name__)


def _tf():
    import tensorflow as tf

    return tf


# --------------------------------------------------------------------------- augmentation


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """How strongly to augment street and shop photos during training.

    Street photos are already messy and get the strong setting; clean
    catalogue photos get a mild one. A strength scales every transformation
    at once: 0 turns augmentation off, 1 is the default street setting.

    Args:
        street: float. Strength for street photos (slot of a street image).
        shop: float. Strength for shop and auxiliary photos.
        seed: int or None. Seed of the augmentation layers.
    """

    street: float = 1.0
    shop: float = 0.3
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("street", "shop"):
            value = getattr(self, name)
            if not 0.0 <= value <= 3.0:
                raise ConfigError(f"augmentation strength {name} must be in [0, 3]. Received: {name}={value}")


def make_augmenter(strength: float, seed: int | None = None) -> Callable[[Any], Any] | None:
    """Core Keras preprocessing layers scaled by ``strength`` (None when 0).

    Works on batches of float pixels in ``[0, 255]``; each image draws its own
    transformation.
    """
    if strength <= 0:
        return None
    import keras

    s = float(strength)
    # One seed per layer: layers sharing a seed draw the same random numbers,
    # so flip, rotation, brightness... would all move together.
    seeds = [None] * 7 if seed is None else [int(v) for v in np.random.SeedSequence(seed).generate_state(7)]
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seeds[0]),
            keras.layers.RandomRotation(min(0.5, 0.04 * s), fill_mode="reflect", seed=seeds[1]),
            keras.layers.RandomZoom((-0.25 * s, 0.1 * s), fill_mode="reflect", seed=seeds[2]),
            keras.layers.RandomTranslation(0.08 * s, 0.08 * s, fill_mode="reflect", seed=seeds[3]),
            keras.layers.RandomContrast(min(0.9, 0.25 * s), value_range=(0, 255), seed=seeds[4]),
            keras.layers.RandomBrightness(min(0.9, 0.2 * s), value_range=(0, 255), seed=seeds[5]),
            keras.layers.RandomSaturation((max(0.0, 0.5 - 0.15 * s), min(1.0, 0.5 + 0.15 * s)), value_range=(0, 255), seed=seeds[6]),
        ],
        name=f"augment_{str(s).replace('.', '_')}",
    )


# --------------------------------------------------------------------------- pair datasets


def _load_slot(path: tf.Tensor, box_ltwh: tf.Tensor, image_size: tuple[int, int]):
    tf = _tf()
    return prepare_image(tf.io.read_file(path), box_ltwh, image_size=image_size, pixel_box=True)


def pair_dataset(
    plan_for_epoch: Callable[[int], PairPlan],
    *,
    image_size: int | Sequence[int],
    batch_size: int,
    epochs: int | None = None,
    start_epoch: int = 0,
    augment: AugmentConfig | None = None,
    with_classes: bool = False,
    pair_weights: tuple[float, float] = (1.0, 1.0),
    class_weights: tuple[float, float] = (1.0, 1.0),
    drop_remainder: bool = True,
) -> tf.data.Dataset:
    """The training (or validation) dataset of pair batches.

    Each epoch's pairs come from ``plan_for_epoch(epoch)``, so a plan is
    reshuffled every epoch yet reproducible by seed, and a resumed run picks
    up at ``start_epoch`` with the plans it would have seen.

    Elements are ``(x, y, sample_weight)``::

        x = {"image_a": float32 [B, H, W, 3], "image_b": ...}        # pixels in [0, 255]
        y = {"distance": float32 [B]  (1 = same product),
             "logits_a": int32 [B], "logits_b": int32 [B]}          # class or -1; only with_classes
        sample_weight = {"distance": w_pair or w_aux per pair, ...}  # logits weights are 1

    Args:
        plan_for_epoch: callable(int) -> PairPlan.
        image_size: int or (height, width).
        batch_size: int. Global batch size.
        epochs: int or None. Number of epochs to produce; None repeats forever
            (use ``steps_per_epoch`` in fit).
        start_epoch: int. First epoch number (for resuming).
        augment: AugmentConfig or None (no augmentation, e.g. validation).
        with_classes: bool. Include the ``logits_a``/``logits_b`` targets.
        pair_weights: (w_pair, w_aux). Sample weights of product and
            auxiliary pairs on the ``distance`` output.
        class_weights: (w_product, w_cls). Sample weights of product and
            auxiliary images on the ``logits_a``/``logits_b`` outputs. An
            image whose weight is 0 gets class -1, so it is not counted by the
            masked loss's average either.
        drop_remainder: bool. Whole batches only (what distribution needs).
    """
    tf = _tf()
    size = image_size_2d(image_size)
    check_positive_int("batch_size", batch_size)
    w_pair, w_aux = (float(w) for w in pair_weights)
    w_product, w_cls = (float(w) for w in class_weights)

    def plan_arrays(epoch):
        return plan_for_epoch(int(epoch)).as_arrays()

    def epoch_pairs(epoch):
        arrays = tf.numpy_function(plan_arrays, [epoch], PairPlan.array_dtypes(), stateful=False)
        for array, rank in zip(arrays, PairPlan.array_ranks()):
            array.set_shape([None] + [4] * (rank - 1))
        return tf.data.Dataset.from_tensor_slices(tuple(arrays))

    stop = None if epochs is None else start_epoch + epochs
    epochs_ds = tf.data.Dataset.range(start_epoch, stop) if stop is not None else tf.data.Dataset.range(start_epoch, 2**62)
    ds = epochs_ds.flat_map(epoch_pairs)

    def load(path_a, box_a, path_b, box_b, label, class_a, class_b, kind, street_a, street_b):
        image_a, valid_a = _load_slot(path_a, box_a, size)
        image_b, valid_b = _load_slot(path_b, box_b, size)
        weight = tf.where(tf.equal(kind, 1), w_aux, w_pair)
        class_weight = tf.where(tf.equal(kind, 1), w_cls, w_product)
        no_class = tf.constant(-1, class_a.dtype)
        return {
            "image_a": image_a,
            "image_b": image_b,
            "label": tf.cast(label, tf.float32),
            "class_a": tf.where(class_weight > 0, class_a, no_class),
            "class_b": tf.where(class_weight > 0, class_b, no_class),
            "weight": tf.cast(weight, tf.float32),
            "class_weight": tf.cast(class_weight, tf.float32),
            "street_a": street_a,
            "street_b": street_b,
            "valid": tf.logical_and(valid_a, valid_b),
        }

    options = tf.data.Options()
    options.deterministic = True
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    # Files that turn bad after check_images ran are skipped, not fatal.
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.filter(lambda e: e["valid"])
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)

    augment_street = augment_shop = None
    if augment is not None:
        augment_street = make_augmenter(augment.street, augment.seed)
        augment_shop = make_augmenter(augment.shop, None if augment.seed is None else augment.seed + 1_000_003)

    def augment_slot(images, street):
        if augment_street is None and augment_shop is None:
            return images
        # Each augmenter runs on its own images only: partition, augment, stitch back.
        which = tf.cast(street, tf.int32)
        positions = tf.dynamic_partition(tf.range(tf.shape(images)[0]), which, 2)
        shop, strong = tf.dynamic_partition(images, which, 2)
        if augment_shop is not None:
            shop = augment_shop(shop, training=True)
        if augment_street is not None:
            strong = augment_street(strong, training=True)
        out = tf.clip_by_value(tf.dynamic_stitch(positions, [shop, strong]), 0.0, 255.0)
        out.set_shape(images.shape)
        return out

    def finish(e):
        x = {
            "image_a": augment_slot(e["image_a"], e["street_a"]),
            "image_b": augment_slot(e["image_b"], e["street_b"]),
        }
        y = {"distance": e["label"]}
        sample_weight = {"distance": e["weight"]}
        if with_classes:
            y.update(logits_a=e["class_a"], logits_b=e["class_b"])
            sample_weight.update(logits_a=e["class_weight"], logits_b=e["class_weight"])
        return x, y, sample_weight

    ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)
