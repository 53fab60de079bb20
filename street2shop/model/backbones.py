"""Backbone name → a ``keras.applications`` convolutional base without its top.

``build_backbone("inception_v3", image_size=(96, 96), weights=None)`` returns
the Keras model named ``"backbone"`` that the tower wraps. ``weights`` is
``None`` (random initialisation), ``"imagenet"`` (downloaded once by Keras
into ``~/.keras/models``) or the path of a weights file on disk: a Keras 3
``.weights.h5`` (or ``.keras``) file saved from the same backbone, or the
``*_notop.h5`` file ``keras.applications`` would download — handy where the
machine has no internet.

One backbone is not from ``keras.applications``: ``tiny_cnn`` (:func:`tiny_cnn`),
four convolution blocks for smoke runs and the CI of a pipeline. Its graph is
built in seconds where the smallest application's takes tens of seconds on a CPU;
it learns little, and has no ImageNet weights.

:func:`set_trainable` freezes the lower part of a backbone for fine-tuning.
In Keras 3, a ``BatchNormalization`` layer with ``trainable=False`` also runs
in inference mode (moving statistics, never updated), so frozen blocks stay
exactly as pre-trained.

Keras imports happen inside the functions, so the registry (``BACKBONES``,
:func:`backbone_spec`) is cheap to import.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from street2shop.data.image import image_size_2d
from street2shop.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".hdf5", ".keras")

# EfficientNet's Keras 3 ImageNet files store the per-channel *standard
# deviations* in the Normalization layer's "variance"; the model built with
# weights="imagenet" corrects for that with an extra Rescaling layer that is
# missing when the same file is loaded by path (see load_backbone_weights).
_EFFICIENTNET_STDDEV_RGB = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone.

    Args:
        name: str. The street2shop name (``"inception_v3"``).
        application: str. The ``keras.applications`` constructor (``"InceptionV3"``),
            or, with ``family="street2shop"``, a constructor of this module with the same arguments.
        family: str. The ``keras.applications`` module whose ``preprocess_input``
            the tower's ``BackbonePreprocess`` layer reproduces (``"street2shop"``: none; ``preprocess`` says how
            its input is scaled).
        preprocess: str. ``"tf"``, ``"caffe"``, ``"torch"`` or ``"none"`` (the
            model rescales its input itself).
        min_size: int. Smallest input height and width Keras accepts.
        kwargs: tuple of (key, value). Extra constructor arguments.
    """

    name: str
    application: str
    family: str
    preprocess: str
    min_size: int = 32
    kwargs: tuple[tuple[str, Any], ...] = ()


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("inception_v3", "InceptionV3", "inception_v3", "tf", min_size=75),
        BackboneSpec("resnet50", "ResNet50", "resnet50", "caffe"),
        BackboneSpec("resnet50_v2", "ResNet50V2", "resnet_v2", "tf"),
        BackboneSpec("mobilenet_v2", "MobileNetV2", "mobilenet_v2", "tf"),
        BackboneSpec("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", "none", kwargs=(("include_preprocessing", True),)),
        BackboneSpec("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", "none", kwargs=(("include_preprocessing", True),)),
        BackboneSpec("efficientnet_b0", "EfficientNetB0", "efficientnet", "none"),
        BackboneSpec("densenet121", "DenseNet121", "densenet", "torch"),
        BackboneSpec("xception", "Xception", "xception", "tf", min_size=71),
        BackboneSpec("tiny_cnn", "tiny_cnn", "street2shop", "tf"),
    )
}

DEFAULT_BACKBONE = "inception_v3"


def backbone_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` of ``name``; a ConfigError listing the known names otherwise."""
    spec = BACKBONES.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ConfigError(f"backbone must be one of {', '.join(BACKBONES)}. Received: backbone={name!r}")
    return spec


def build_backbone(
    name: str = DEFAULT_BACKBONE,
    image_size: int | Sequence[int] = (96, 96),
    weights: str | os.PathLike[str] | None = None,
) -> Any:
    """A ``keras.applications`` backbone (or ``tiny_cnn``) without its top, as a model named ``"backbone"``.

    The model takes the backbone's *preprocessed* input (see
    ``BackbonePreprocess``) of shape ``[B, H, W, 3]`` and returns the last
    feature map ``[B, h, w, C]`` (no pooling).

    Args:
        name: str. One of ``BACKBONES``. Defaults to ``"inception_v3"``.
        image_size: int or (height, width). At least 75 for InceptionV3, 71
            for Xception, 32 for the others.
        weights: None, ``"imagenet"`` or a path to a weights file (see
            :func:`load_backbone_weights`).

    Raises:
        ConfigError: unknown name, input too small, bad ``weights`` value.
        ModelError: the weights file is missing, unreadable or does not fit,
            or the ImageNet weights cannot be downloaded.

    Example:
    >>> backbone = build_backbone("mobilenet_v3_small", image_size=(32, 32))
    >>> backbone.output.shape  # -> (None, 1, 1, 576)
    """
    import keras

    spec = backbone_spec(name)
    size = image_size_2d(image_size, spec.min_size)
    path = _weights_path(weights)
    if spec.family == "street2shop":
        if weights == "imagenet":
            raise ConfigError(f"backbone {name} has no ImageNet weights: use weights=None or the path of a weights file. "
                              "Received: weights='imagenet'")
        constructor = globals()[spec.application]
    else:
        constructor = getattr(keras.applications, spec.application)
    kwargs = dict(
        include_top=False,
        weights="imagenet" if weights == "imagenet" else None,
        input_shape=(size[0], size[1], 3),
        pooling=None,
        name="backbone",
        **dict(spec.kwargs),
    )
    if kwargs["weights"] == "imagenet":
        try:
            model = constructor(**kwargs)
        except Exception as e:  # noqa: BLE001 - download failures come as plain Exception
            raise ModelError(
                f"cannot get the ImageNet weights of {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
                "Without internet, download keras.applications' '*_notop.h5' file elsewhere and pass its path. "
                "Received: weights='imagenet'"
            ) from e
    else:
        model = constructor(**kwargs)
    if path is not None:
        load_backbone_weights(model, path, name)
    logger.debug("built backbone %s at %dx%d (weights=%s)", name, size[0], size[1], weights)
    return model


def tiny_cnn(include_top: bool = False, weights: None = None, input_shape: tuple[int, int, int] = (32, 32, 3),
             pooling: None = None, name: str = "tiny_cnn") -> Any:
    """Four blocks of a strided 3x3 convolution, BatchNormalization and ReLU (16, 32, 64, 128 filters; 0.1 M
    parameters), taking inputs scaled to [-1, 1]: the backbone ``"tiny_cnn"``.

    For smoke runs and the CI of a pipeline built on street2shop, where what is tested is the plumbing, not what
    the model learns: the first training step, graph and all, takes seconds where MobileNetV3-Small's takes tens
    of seconds on 2 CPU cores (BENCHMARKS.md, "The test suite's time"). Not a model to deploy. The arguments are those
    of a ``keras.applications`` constructor, so :func:`build_backbone` calls it as one; only ``include_top=False``
    and ``pooling=None`` exist.
    """
    import keras

    if include_top or weights is not None or pooling is not None:
        raise ConfigError(f"tiny_cnn has no top, no pooling and no ImageNet weights. Received: include_top={include_top!r}, "
                          f"weights={weights!r}, pooling={pooling!r}")
    inputs = keras.Input(input_shape)
    x = inputs
    for block, filters in enumerate((16, 32, 64, 128), start=1):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name=f"block{block}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"block{block}_bn")(x)
        x = keras.layers.ReLU(name=f"block{block}_relu")(x)
    return keras.Model(inputs, x, name=name)


def _weights_path(weights: Any) -> Path | None:
    if weights is None or weights == "imagenet":
        return None
    if not isinstance(weights, (str, os.PathLike)) or not str(weights):
        raise ConfigError(f"weights must be None, 'imagenet' or the path of a weights file. Received: weights={weights!r}")
    return Path(weights)


def load_backbone_weights(backbone: Any, path: str | os.PathLike[str], name: str | None = None) -> None:
    """Loads a weights file into a backbone built with ``weights=None``.

    Accepted files: a Keras 3 ``.weights.h5`` or ``.keras`` file saved from
    the same backbone (layers matched by name), or a legacy ``.h5`` file such
    as keras.applications' ``*_notop.h5`` (layers matched in order). The
    input size does not matter: the backbones without top are fully
    convolutional.

    For EfficientNet, a file holding the ImageNet statistics (where Keras
    stores standard deviations as variances) gets its variances squared after
    loading, so the backbone computes what ``weights="imagenet"`` computes.

    Args:
        backbone: keras.Model. The backbone to fill.
        path: str or PathLike. The weights file.
        name: str or None. The backbone name, for messages and the EfficientNet fix.

    Raises:
        ModelError: the file is missing, has an unknown suffix, or does not
            fit the backbone (the message names the file).
    """
    path = Path(path)
    label = name or getattr(backbone, "name", "backbone")
    if not path.is_file():
        raise ModelError(f"backbone weights file not found: expected an existing weights file for {label}. Received: weights={str(path)!r}")
    if not str(path).endswith(WEIGHT_SUFFIXES):
        raise ModelError(
            f"backbone weights file must end with one of {', '.join(WEIGHT_SUFFIXES)}. Received: weights={str(path)!r}"
        )
    try:
        backbone.load_weights(str(path))
    except Exception as e:  # noqa: BLE001 - h5py/Keras raise ValueError, OSError, KeyError, TypeError...
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ModelError(
            f"cannot load backbone weights from {path} into {label}: {first} "
            f"Expected weights of a {label} backbone without top (include_top=False). Received: weights={str(path)!r}"
        ) from e
    if name is not None and name.startswith("efficientnet"):
        _fix_efficientnet_variance(backbone, path)
    logger.info("loaded backbone weights from %s", path)


def _fix_efficientnet_variance(backbone: Any, path: Path) -> None:
    import keras
    import numpy as np

    for layer in backbone.layers:
        if isinstance(layer, keras.layers.Normalization) and getattr(layer, "adapt_variance", None) is not None:
            variance = np.asarray(layer.adapt_variance.numpy(), dtype=np.float64).reshape(-1)
            if variance.shape == (3,) and np.allclose(variance, _EFFICIENTNET_STDDEV_RGB, rtol=0, atol=1e-6):
                layer.adapt_variance.assign(np.square(variance).astype("float32").reshape(layer.adapt_variance.shape))
                layer.finalize_state()
                logger.info("%s holds EfficientNet ImageNet statistics: squared the stored standard deviations", path)
            return


def set_trainable(backbone: Any, trainable_layers: int | None = None, trainable_from: str | None = None) -> int:
    """Freezes the lower layers of a backbone; returns how many layers stay trainable.

    - both None: every layer is trainable (training from scratch, full fine-tuning);
    - ``trainable_layers=N``: only the top ``N`` layers (the last ``N`` of
      ``backbone.layers``, the input layer not counted) are trainable; 0
      freezes the whole backbone;
    - ``trainable_from="name"``: that layer and every layer after it are
      trainable. For InceptionV3, ``"mixedK"`` is the concatenation that ends
      block K, so ``trainable_from="mixed8"`` trains blocks 9 and 10 (the
      "top two inception blocks" of the classic Keras fine-tuning recipe).

    Frozen ``BatchNormalization`` layers run in inference mode. Setting
    ``tower.trainable = True`` later unfreezes everything again.

    Args:
        backbone: keras.Model.
        trainable_layers: int or None.
        trainable_from: str or None. Not together with ``trainable_layers``.
    """
    import keras

    layers = [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
    if trainable_layers is not None and trainable_from is not None:
        raise ConfigError(
            "set at most one of trainable_layers and trainable_from. "
            f"Received: trainable_layers={trainable_layers!r}, trainable_from={trainable_from!r}"
        )
    if trainable_from is not None:
        names = [layer.name for layer in layers]
        if trainable_from not in names:
            blocks = [n for n in names if re.fullmatch(r"mixed\d+", n)]
            hint = f" (block ends: {', '.join(blocks)})" if blocks else ""
            raise ConfigError(f"trainable_from must name a layer of backbone {backbone.name!r}{hint}. Received: trainable_from={trainable_from!r}")
        first = names.index(trainable_from)
    elif trainable_layers is not None:
        if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= len(layers):
            raise ConfigError(f"trainable_layers must be None or an int in [0, {len(layers)}]. Received: trainable_layers={trainable_layers!r}")
        first = len(layers) - trainable_layers
    else:
        first = 0
    for i, layer in enumerate(layers):
        layer.trainable = i >= first
    return len(layers) - first
