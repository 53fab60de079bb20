"""The two-input training model: one shared tower, a distance, an optional class head.

::

    image_a ─┐                ┌─ embedding_a ─┬─ PairDistance ──────────── "distance"  [B]
             ├─ tower (shared) ┤               │
    image_b ─┘                └─ embedding_b ─┴─ classifier (shared) ─────── "logits_a", "logits_b"  [B, C]

The outputs are a dict, so ``model.fit`` takes ``y`` (and ``sample_weight``)
as dicts with the same keys, as ``street2shop.data.pipeline.pair_dataset``
produces them: ``y["distance"]`` is float ``[B]`` (1 = same product) and
``y["logits_a"]``/``y["logits_b"]`` are int ``[B]`` class indices (-1 for
images without a class, to be masked by the loss).

The classifier sits on the L2-normalised embeddings (not on the pooled
backbone features), so the softmax task of multi-task fine-tuning shapes the
very space the retrieval uses. Training builds it as a cosine classifier with
a fixed scale (``classifier_scale``; see ``CosineClassifier``), since a plain
``Dense`` on unit vectors learns slowly.

:func:`tower_of` finds the tower in a siamese model; :func:`load_tower_weights`
copies a checkpoint's tower into a model's (a run's ``init_checkpoint``), the
head left out.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from street2shop.errors import ConfigError, ModelError
from street2shop.model.layers import CosineClassifier, PairDistance

logger = logging.getLogger(__name__)

OUTPUT_KEYS = ("distance", "logits_a", "logits_b")


def build_siamese(tower: Any, *, num_classes: int | None = None, classifier_scale: float | None = None, name: str = "siamese") -> Any:
    """The siamese training model around one shared tower.

    Args:
        tower: keras.Model. From ``build_tower``: one image input, one
            embedding output. Both inputs go through this same object (one
            set of weights).
        num_classes: int or None. With a number (>= 2), a shared head
            named ``"classifier"`` on both embeddings adds the ``logits_a``
            and ``logits_b`` outputs (unnormalised logits).
        classifier_scale: float or None. With a positive number, the head
            is a ``CosineClassifier`` with that scale (logits ``s·cos``);
            with None or 0, a plain ``Dense(num_classes)``.
        name: str. The model's name.

    Returns:
        keras.Model with inputs ``{"image_a", "image_b"}`` (the tower's input
        shape, pixels in ``[0, 255]``) and outputs ``{"distance": [B]}``, plus
        ``"logits_a"``, ``"logits_b"`` (``[B, num_classes]``) with classes.

    Example:
    >>> tower = build_tower("mobilenet_v3_small", image_size=(32, 32), embedding_dim=16)
    >>> model = build_siamese(tower, num_classes=10)
    >>> sorted(model.output)  # -> ['distance', 'logits_a', 'logits_b']
    """
    import keras

    if not isinstance(tower, keras.Model) or len(tower.inputs) != 1 or len(tower.outputs) != 1:
        raise ModelError(f"tower must be a keras.Model with one input and one output (see build_tower). Received: {tower!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2):
        raise ConfigError(f"num_classes must be None or an int >= 2. Received: num_classes={num_classes!r}")
    shape = tuple(tower.inputs[0].shape[1:])
    image_a = keras.Input(shape=shape, dtype="float32", name="image_a")
    image_b = keras.Input(shape=shape, dtype="float32", name="image_b")
    embedding_a = tower(image_a)
    embedding_b = tower(image_b)
    outputs = {"distance": PairDistance(name="distance")([embedding_a, embedding_b])}
    if num_classes is not None:
        if not classifier_scale:
            classifier = keras.layers.Dense(num_classes, name="classifier")
        else:
            classifier = CosineClassifier(num_classes, scale=classifier_scale, name="classifier")
        outputs["logits_a"] = keras.layers.Identity(name="logits_a")(classifier(embedding_a))
        outputs["logits_b"] = keras.layers.Identity(name="logits_b")(classifier(embedding_b))
    model = keras.Model({"image_a": image_a, "image_b": image_b}, outputs, name=name)
    logger.debug("siamese model %s: tower %s, num_classes=%s", name, tower.name, num_classes)
    return model


def tower_of(model: Any) -> Any:
    """The embedding tower: the layer named ``"tower"`` of a siamese model, or
    ``model`` itself when it is a tower (one input, one output).

    Raises:
        ModelError: neither.
    """
    import keras

    for layer in model.layers:
        if layer.name == "tower" and isinstance(layer, keras.Model):
            return layer
    if len(model.inputs) == 1 and len(model.outputs) == 1:
        return model
    raise ModelError(
        f"cannot find the embedding tower in model {model.name!r}: expected a layer named 'tower' "
        f"or a single-input, single-output model. Received: layers={[layer.name for layer in model.layers][:10]}"
    )


# --------------------------------------------------------------------------- moving a tower's weights


def load_tower_weights(model: Any, checkpoint: str | os.PathLike[str]) -> None:
    """Copies the tower weights of a ``.keras`` checkpoint (a siamese model or a tower) into ``model``'s tower.

    Only the tower: a classifier head, its classes and the optimizer state
    are not taken. The two towers must have the same architecture (backbone,
    image size, embedding dimension).

    Raises:
        ConfigError: the file is missing, or its tower does not fit.
    """
    set_tower_weights(model, read_tower_weights(checkpoint), checkpoint)


def read_tower_weights(checkpoint: str | os.PathLike[str]) -> list[Any]:
    """The tower weights of a ``.keras`` checkpoint (a siamese model or a tower), as arrays.

    Raises:
        ConfigError: the file is missing.
    """
    import keras

    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"init_checkpoint not found. Received: init_checkpoint={str(checkpoint)!r}")
    return tower_of(keras.saving.load_model(path, compile=False)).get_weights()


def set_tower_weights(model: Any, weights: list[Any], source: str | os.PathLike[str]) -> None:
    """Sets ``model``'s tower to ``weights`` (read from ``source``, named in errors and the log).

    Raises:
        ConfigError: the weights do not fit the tower.
    """
    try:
        tower_of(model).set_weights(weights)
    except ValueError as e:
        raise ConfigError(f"the tower of {source} does not fit this model's tower (backbone, image_size, embedding_dim must match): {e}") from None
    logger.info("tower weights from %s", source)
