"""The embedding tower: pixels → backbone → pooling → projection → unit vector.

::

    pixels [B, H, W, 3] float32 in [0, 255]
      → BackbonePreprocess(backbone)        ("preprocess")
      → keras.applications backbone         ("backbone", no top; or tiny_cnn)
      → global average or max pooling       ("pool")
      → Dropout (if dropout > 0)            ("dropout")
      → Dense(embedding_dim)                ("projection")
      → L2Normalize                         ("embedding")  [B, D], unit length

The tower is one Keras model named ``"tower"``; the siamese model calls it
on both images, and export takes it out again (``siamese.get_layer("tower")``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from street2shop.errors import ConfigError, ModelError
from street2shop.data.image import image_size_2d
from street2shop.model.backbones import DEFAULT_BACKBONE, backbone_spec, build_backbone, set_trainable
from street2shop.model.layers import BackbonePreprocess, L2Normalize

logger = logging.getLogger(__name__)

POOLINGS = ("avg", "max")


def build_tower(
    backbone: str = DEFAULT_BACKBONE,
    *,
    image_size: int | Sequence[int] = (96, 96),
    embedding_dim: int = 128,
    weights: str | os.PathLike[str] | None = None,
    trainable_layers: int | None = None,
    trainable_from: str | None = None,
    bn_momentum: float | None = None,
    dropout: float = 0.0,
    pooling: str = "avg",
    name: str = "tower",
) -> Any:
    """The embedding tower as a Keras model.

    Input ``"pixels"``: float32 RGB ``[B, H, W, 3]`` in ``[0, 255]`` (the
    backbone's own preprocessing is the tower's first layer). Output: the
    L2-normalised embedding ``[B, embedding_dim]``.

    Args:
        backbone: str. One of ``street2shop.model.backbones.BACKBONES``.
        image_size: int or (height, width). The tower's fixed input size.
        embedding_dim: int. Dimension of the embedding (>= 2).
        weights: None, ``"imagenet"`` or a path to backbone weights (see
            ``build_backbone``).
        trainable_layers: int or None. Train only the top N backbone layers
            (None: all). The pooling, projection and normalisation layers are
            always trainable.
        trainable_from: str or None. Train the backbone from this layer up
            (e.g. ``"mixed8"`` for InceptionV3). Not with ``trainable_layers``.
        bn_momentum: float or None. Momentum of the backbone's BatchNormalization
            moving statistics (None keeps the backbone's, 0.99 for most). A
            from-scratch run of a few hundred steps wants ~0.9: with 0.99 the
            moving statistics, which inference and the export use, lag far
            behind the batch statistics training sees.
        dropout: float in [0, 1). Dropout between pooling and projection.
        pooling: str. ``"avg"`` or ``"max"`` global pooling.
        name: str. The model's name; keep ``"tower"`` so export finds it.

    Example:
    >>> tower = build_tower("mobilenet_v3_small", image_size=(32, 32), embedding_dim=16)
    >>> tower(np.zeros((2, 32, 32, 3), "float32")).shape  # -> (2, 16)
    """
    import keras

    spec = backbone_spec(backbone)
    size = image_size_2d(image_size, spec.min_size)
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 2:
        raise ConfigError(f"embedding_dim must be an int >= 2. Received: embedding_dim={embedding_dim!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1). Received: dropout={dropout!r}")
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}. Received: pooling={pooling!r}")

    base = build_backbone(backbone, size, weights)
    trainable = set_trainable(base, trainable_layers, trainable_from)
    if bn_momentum is not None:
        if isinstance(bn_momentum, bool) or not 0.0 < float(bn_momentum) < 1.0:
            raise ConfigError(f"bn_momentum must be in (0, 1). Received: bn_momentum={bn_momentum!r}")
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = float(bn_momentum)

    pixels = keras.Input(shape=(size[0], size[1], 3), dtype="float32", name="pixels")
    x = BackbonePreprocess(backbone, name="preprocess")(pixels)
    x = base(x)
    if pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    else:
        x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
    if dropout > 0:
        x = keras.layers.Dropout(float(dropout), name="dropout")(x)
    x = keras.layers.Dense(embedding_dim, name="projection")(x)
    embedding = L2Normalize(name="embedding")(x)
    tower = keras.Model(pixels, embedding, name=name)
    logger.info(
        "tower: %s at %dx%d → %d-d embedding; %d of %d backbone layers trainable",
        backbone, size[0], size[1], embedding_dim, trainable, len(base.layers) - 1,
    )
    return tower


def tower_spec(tower: Any) -> dict[str, Any]:
    """What a tower was built with, read from its layers (works on a reloaded ``.keras`` tower).

    Returns:
        dict with ``backbone`` (str), ``image_size`` ([height, width]),
        ``embedding_dim`` (int), ``pooling`` (``"avg"``/``"max"``) and
        ``dropout`` (float).

    Raises:
        ModelError: the model is not a tower built by :func:`build_tower`.
    """
    import keras

    try:
        preprocess = tower.get_layer("preprocess")
        projection = tower.get_layer("projection")
        pool = tower.get_layer("pool")
    except ValueError:
        raise ModelError(
            "not a street2shop tower: expected layers 'preprocess', 'pool' and 'projection'. "
            f"Received: layers={[layer.name for layer in tower.layers][:10]}"
        ) from None
    if not isinstance(preprocess, BackbonePreprocess):
        raise ModelError(f"not a street2shop tower: layer 'preprocess' is not a BackbonePreprocess. Received: {type(preprocess).__name__}")
    shape = tower.inputs[0].shape
    dropout = 0.0
    if any(layer.name == "dropout" for layer in tower.layers):
        dropout = float(tower.get_layer("dropout").rate)
    return {
        "backbone": preprocess.backbone,
        "image_size": [int(shape[1]), int(shape[2])],
        "embedding_dim": int(projection.units),
        "pooling": "max" if isinstance(pool, keras.layers.GlobalMaxPooling2D) else "avg",
        "dropout": dropout,
    }
