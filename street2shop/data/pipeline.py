"""Photos on disk to the batches the siamese model trains on, as tf.data.

The one function that turns encoded image bytes into model pixels is
:func:`prepare_image` (decode → crop to a box → resize). Training calls it
here, and :mod:`street2shop.export` puts the very same function inside the
SavedModel, so training, local embedding and TF Serving cannot disagree about
how a photo becomes a tensor.

Pixels leave the pipeline as float32 RGB in ``[0, 255]``. The backbone's own
preprocessing (InceptionV3 scales to ``[-1, 1]``, ResNet50 subtracts means...)
is a layer inside the tower, so it happens exactly once whoever feeds the
tower. (DESIGN.md put it in the pipeline; keeping it in the model means the
exported ``embed_pixels`` signature and users' own code cannot forget it.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from street2shop.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

    from street2shop.data.pairs import PairPlan
    from street2shop.data.records import Record

logger = logging.getLogger(__name__)

# A box given as all -1 means "no box": use the whole image.
NO_BOX = (-1.0, -1.0, -1.0, -1.0)


def _tf():
    import tensorflow as tf

    return tf


def image_size_2d(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``96`` or ``(96, 128)`` → ``(height, width)``, validated."""
    if isinstance(image_size, (int, np.integer)):
        size = (int(image_size), int(image_size))
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"image_size must be an int or (height, width) of positive ints. Received: image_size={image_size!r}")
    return size  # type: ignore[return-value]


def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF (first frame)/BMP bytes → uint8 RGB ``[H, W, 3]``.

    Raises ``tf.errors.InvalidArgumentError`` for bytes that are not an image.
    """
    tf = _tf()
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


def ltwh_to_normalized(box_ltwh: tf.Tensor, image_shape: tf.Tensor) -> tf.Tensor:
    """A pixel box ``[left, top, width, height]`` → normalised ``[ymin, xmin, ymax, xmax]``.

    ``NO_BOX`` (all ``-1``) becomes the whole image ``[0, 0, 1, 1]``.
    """
    tf = _tf()
    box_ltwh = tf.cast(box_ltwh, tf.float32)
    h = tf.cast(image_shape[0], tf.float32)
    w = tf.cast(image_shape[1], tf.float32)
    left, top, width, height = tf.unstack(box_ltwh)
    normalized = tf.stack([top / h, left / w, (top + height) / h, (left + width) / w])
    has_box = tf.reduce_any(tf.not_equal(box_ltwh, -1.0))
    return tf.where(has_box, normalized, tf.constant([0.0, 0.0, 1.0, 1.0]))


def crop_and_resize(
    image: tf.Tensor, box: tf.Tensor, image_size: tuple[int, int]
) -> tuple[tf.Tensor, tf.Tensor]:
    """Crops ``image`` to a normalised box and resizes it to ``image_size``.

    The box ``[ymin, xmin, ymax, xmax]`` is clamped to the image and rounded
    outwards to whole pixels. A box that is empty after clamping cannot be
    cropped: the whole image is used and ``valid`` is False, so callers can
    drop it (training) or refuse it (serving).

    Returns:
        ``(pixels, valid)``: float32 ``[height, width, 3]`` in ``[0, 255]`` and a
        bool scalar.
    """
    tf = _tf()
    shape = tf.shape(image)
    h = tf.cast(shape[0], tf.float32)
    w = tf.cast(shape[1], tf.float32)
    box = tf.clip_by_value(tf.cast(box, tf.float32), 0.0, 1.0)
    # Round outwards to whole pixels, forgiving float error (0.6 * 100 = 60.0000024
    # must give 60, not 61): a box from whole pixel coordinates crops exactly them.
    eps = 1e-3
    y0 = tf.cast(tf.floor(box[0] * h + eps), tf.int32)
    x0 = tf.cast(tf.floor(box[1] * w + eps), tf.int32)
    y1 = tf.cast(tf.math.ceil(box[2] * h - eps), tf.int32)
    x1 = tf.cast(tf.math.ceil(box[3] * w - eps), tf.int32)
    valid = tf.logical_and(y1 > y0, x1 > x0)
    y0, x0 = tf.where(valid, y0, 0), tf.where(valid, x0, 0)
    y1, x1 = tf.where(valid, y1, shape[0]), tf.where(valid, x1, shape[1])
    crop = image[y0:y1, x0:x1, :]
    pixels = tf.image.resize(tf.cast(crop, tf.float32), image_size, method="bilinear", antialias=True)
    pixels = tf.clip_by_value(pixels, 0.0, 255.0)
    pixels.set_shape([image_size[0], image_size[1], 3])
    return pixels, valid


def prepare_image(
    image_bytes: tf.Tensor, box: tf.Tensor | None = None, *, image_size: int | Sequence[int]
) -> tuple[tf.Tensor, tf.Tensor]:
    """Encoded bytes (+ optional normalised box) → model pixels. The one preprocessing function.

    Args:
        image_bytes: scalar tf.string. JPEG, PNG, GIF or BMP.
        box: optional float32 ``[4]``, normalised ``[ymin, xmin, ymax, xmax]``.
        image_size: int or (height, width). The tower's input size.

    A JPEG whose crop is at least 2, 4 or 8 times ``image_size`` is decoded
    at that fraction of its size (libjpeg's DCT-domain scaling, see
    :func:`jpeg_ratio`) before the crop and the antialiased resize: about the
    same pixels (mean difference ~1 level of 255 on smooth images) for a
    fraction of the work.

    Returns:
        ``(pixels, valid)`` as :func:`crop_and_resize`.
    """
    tf = _tf()
    size = image_size_2d(image_size)
    if box is None:
        box = tf.constant([0.0, 0.0, 1.0, 1.0])
    image, box = _decode_for_crop(image_bytes, box, size, pixel_box=False)
    return crop_and_resize(image, box, size)


# libjpeg can decode straight to 1/2, 1/4 or 1/8 of the size by scaling in the
# DCT domain, which is much cheaper than a full decode followed by an
# antialiased resize of all those pixels.
JPEG_RATIOS = (1, 2, 4, 8)


def jpeg_ratio(image_shape: tf.Tensor, box: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """The largest libjpeg scale-down ratio in :data:`JPEG_RATIOS` that still leaves enough pixels.

    A ratio ``r`` is allowed when the box's crop, measured in pixels of the
    full image, is at least ``r`` times the target size in both dimensions, so
    the crop of the scaled-down image still has at least ``image_size``
    pixels and the antialiased resize only ever shrinks it.

    Args:
        image_shape: int ``[2+]``, height and width of the full image.
        box: float32 ``[4]``, normalised ``[ymin, xmin, ymax, xmax]``.
        image_size: (height, width).

    Returns:
        int32 scalar: the index into :data:`JPEG_RATIOS` (0 = full decode).
    """
    tf = _tf()
    box = tf.clip_by_value(tf.cast(box, tf.float32), 0.0, 1.0)
    crop_h = (box[2] - box[0]) * tf.cast(image_shape[0], tf.float32)
    crop_w = (box[3] - box[1]) * tf.cast(image_shape[1], tf.float32)
    # How many times larger than the target the crop is, in its tighter dimension.
    scale = tf.minimum(crop_h / float(image_size[0]), crop_w / float(image_size[1]))
    index = tf.constant(0, tf.int32)
    for i, r in enumerate(JPEG_RATIOS[1:], start=1):
        # The small slack forgives float error: 0.5 * 512 must count as 256 px.
        index = tf.where(scale >= float(r) - 1e-3, tf.constant(i, tf.int32), index)
    return index


def _decode_for_crop(
    image_bytes: tf.Tensor, box: tf.Tensor, image_size: tuple[int, int], *, pixel_box: bool
) -> tuple[tf.Tensor, tf.Tensor]:
    """Decodes only as many pixels as cropping ``box`` to ``image_size`` needs.

    A JPEG is decoded at 1/2, 1/4 or 1/8 scale when its crop stays at least
    ``image_size`` (:func:`jpeg_ratio`); its size comes from the header, so
    this costs no extra decode. Other formats go through :func:`decode_image`.
    A normalised box means the same region of the scaled image, so it is
    returned unchanged; a pixel box ``[left, top, width, height]``
    (``pixel_box=True``) is normalised against the full-size image.

    Returns:
        ``(image, normalised_box)``: uint8 ``[H, W, 3]`` and float32 ``[4]``.
    """
    tf = _tf()

    def normalise(shape):
        return ltwh_to_normalized(box, shape) if pixel_box else tf.cast(box, tf.float32)

    def jpeg():
        full_shape = tf.image.extract_jpeg_shape(image_bytes)
        norm_box = normalise(full_shape)
        index = jpeg_ratio(full_shape, norm_box, image_size)
        branches = [
            (lambda r=r: tf.io.decode_jpeg(image_bytes, channels=3, ratio=r)) for r in JPEG_RATIOS
        ]
        image = tf.switch_case(index, branches)
        image.set_shape([None, None, 3])
        return image, norm_box

    def other():
        image = decode_image(image_bytes)
        return image, normalise(tf.shape(image))

    image, norm_box = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
    image.set_shape([None, None, 3])
    norm_box.set_shape([4])
    return image, norm_box


# --------------------------------------------------------------------------- checking


@dataclasses.dataclass
class ImageCheck:
    """What :func:`check_images` found: unreadable images and boxes that crop to nothing."""

    bad_images: dict[str, str] = dataclasses.field(default_factory=dict)
    empty_boxes: list[tuple[str, tuple[float, float, float, float]]] = dataclasses.field(default_factory=list)
    checked: int = 0

    def summary(self) -> str:
        return (
            f"checked {self.checked} images: {len(self.bad_images)} unreadable, "
            f"{len(self.empty_boxes)} boxes empty after clamping to the image"
        )


def check_images(records: Sequence[Record], *, workers: int | None = None) -> tuple[list[Record], ImageCheck]:
    """Decodes every distinct image once, with the same decoder training uses.

    A corrupt, truncated or non-image file, and a box that lies outside its
    image, are dropped here, counted, and each named once in the log, so
    training never stops on them.

    Returns:
        ``(good_records, report)``.
    """
    tf = _tf()
    paths = sorted({r.image_path for r in records})
    shapes: dict[str, tuple[int, int] | None] = {}
    report = ImageCheck()

    def shape_of(path: str) -> tuple[str, tuple[int, int] | None, str]:
        try:
            data = tf.io.read_file(path)
            shape = decode_image(data).shape
            return path, (int(shape[0]), int(shape[1])), ""
        except (tf.errors.OpError, OSError) as e:
            message = getattr(e, "message", None) or str(e)
            return path, None, message.strip().splitlines()[0] if message.strip() else type(e).__name__

    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) * 2)) as pool:
        for path, shape, error in pool.map(shape_of, paths):
            shapes[path] = shape
            if shape is None:
                report.bad_images[path] = error
                logger.warning("skipping unreadable image %s: %s", path, error)
    report.checked = len(paths)
    good = []
    for r in records:
        shape = shapes[r.image_path]
        if shape is None:
            continue
        if r.box is not None and not _box_overlaps(r.box.as_ltwh(), shape):
            report.empty_boxes.append((r.image_path, r.box.as_ltwh()))
            logger.warning("skipping %s: box %s is empty after clamping to %dx%d", r.image_path, r.box.as_ltwh(), shape[1], shape[0])
            continue
        good.append(r)
    log = logger.warning if (report.bad_images or report.empty_boxes) else logger.info
    log("%s", report.summary())
    return good, report


def _box_overlaps(box: tuple[float, float, float, float], shape: tuple[int, int]) -> bool:
    left, top, width, height = box
    h, w = shape
    # Same rounding as crop_and_resize: floor of the start, ceil of the end, clamped.
    eps = 1e-3
    x0, y0 = np.floor(np.clip(left / w, 0, 1) * w + eps), np.floor(np.clip(top / h, 0, 1) * h + eps)
    x1 = np.ceil(np.clip((left + width) / w, 0, 1) * w - eps)
    y1 = np.ceil(np.clip((top + height) / h, 0, 1) * h - eps)
    return bool(x1 > x0 and y1 > y0)


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
    image, box = _decode_for_crop(tf.io.read_file(path), box_ltwh, image_size, pixel_box=True)
    return crop_and_resize(image, box, image_size)


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
    from street2shop.data.pairs import PairPlan

    size = image_size_2d(image_size)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1. Received: batch_size={batch_size}")
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
