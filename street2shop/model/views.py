"""Several views of one photo, one embedding: test-time augmentation (TTA).

The tower embeds each photo and its mirror image (``"flip"``), or those and a
central crop of each (``"flip-crops"``), and the views' embeddings are
averaged and normalised again (:func:`embed_views`). It costs one tower pass
per view. An export made with ``tta`` does it inside the SavedModel, for
every signature, so catalogue and queries get the same treatment and gRPC
clients need nothing new (the card and the fingerprint say so:
:func:`tta_fingerprint`). Measured in BENCHMARKS.md ("Round 4"), with the
other ideas of more views that were not kept (augmented catalogue references,
labelled street photos as references: ``tools/bench_views.py``).
"""

from __future__ import annotations

import hashlib
from typing import Any

from street2shop.errors import ConfigError

TTA_MODES = ("none", "flip", "flip-crops")
CROP_FRACTION = 0.8  # the central crop of "flip-crops": 80% of each side, resized back to the input size


def check_tta(mode: str) -> str:
    if mode not in TTA_MODES:
        raise ConfigError(f"tta must be one of {', '.join(TTA_MODES)}. Received: tta={mode!r}")
    return mode


def view_count(mode: str) -> int:
    """Tower passes per photo."""
    return {"none": 1, "flip": 2, "flip-crops": 4}[check_tta(mode)]


def tta_fingerprint(weights_fingerprint: str, mode: str) -> str:
    """The model's fingerprint with test-time augmentation: the weights' own without it, else a digest of both
    (the same weights with and without TTA give other vectors, so they are other models)."""
    if check_tta(mode) == "none":
        return weights_fingerprint
    return hashlib.sha256(f"{weights_fingerprint}:tta={mode}".encode()).hexdigest()[:16]


def _views(pixels: Any, mode: str) -> list[Any]:
    import tensorflow as tf

    views = [pixels, tf.reverse(pixels, axis=[2])]
    if mode == "flip-crops":
        n = tf.shape(pixels)[0]
        margin = (1.0 - CROP_FRACTION) / 2
        boxes = tf.tile(tf.constant([[margin, margin, 1.0 - margin, 1.0 - margin]], tf.float32), [n, 1])
        crop = tf.image.crop_and_resize(pixels, boxes, tf.range(n), tf.shape(pixels)[1:3], method="bilinear")
        views += [crop, tf.reverse(crop, axis=[2])]
    return views


def embed_views(tower: Any, pixels: Any, mode: str = "none") -> Any:
    """``[B, D]`` unit embeddings of ``[B, H, W, 3]`` float pixels in ``[0, 255]``: the tower's own
    (``"none"``), or the normalised mean over the views of ``mode`` (one batched tower pass)."""
    import tensorflow as tf

    if check_tta(mode) == "none":
        return tower(pixels, training=False)
    views = _views(tf.convert_to_tensor(pixels, tf.float32), mode)
    n = tf.shape(views[0])[0]
    embedded = tower(tf.concat(views, axis=0), training=False)
    mean = tf.reduce_mean(tf.reshape(embedded, [len(views), n, -1]), axis=0)
    return tf.math.l2_normalize(mean, axis=-1)
