"""The small custom layers of the tower and the siamese model.

All are registered serialisable (package ``street2shop``), so ``.keras``
files that contain them load with ``safe_mode=True`` once
``street2shop.model`` is imported.
"""

from __future__ import annotations

import logging
import numbers
from typing import Any

import keras
from keras import ops

from street2shop.errors import ConfigError

logger = logging.getLogger(__name__)

# ImageNet statistics used by keras.applications' preprocess_input.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)


def _l2_normalize(x: Any, axis: int, epsilon: float) -> Any:
    """``x / sqrt(max(sum(x²), epsilon))`` along ``axis``: a zero vector stays zero."""
    return x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x), axis=axis, keepdims=True), epsilon))


def _check_epsilon(epsilon: Any) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ConfigError(f"epsilon must be a positive number. Received: epsilon={epsilon!r}")
    return float(epsilon)


@keras.saving.register_keras_serializable(package="street2shop")
class BackbonePreprocess(keras.layers.Layer):
    """A backbone's own input preprocessing, as a layer at the bottom of the tower.

    Takes float RGB pixels in ``[0, 255]`` (``[B, H, W, 3]``, channels last)
    and computes exactly what ``keras.applications.<family>.preprocess_input``
    computes for that backbone:

    - ``"tf"`` mode (InceptionV3, Xception, ResNet50V2, MobileNetV2, and ``tiny_cnn``): ``x / 127.5 - 1``;
    - ``"caffe"`` mode (ResNet50): RGB → BGR, then subtract the ImageNet BGR means;
    - ``"torch"`` mode (DenseNet121): ``(x / 255 - mean) / std`` per RGB channel;
    - ``"none"`` (MobileNetV3, EfficientNet): identity, because in Keras 3 these
      models rescale their input inside the model themselves.

    Keeping it inside the tower means training, the exported SavedModel and any
    user code feed the same ``[0, 255]`` pixels and preprocessing happens once.
    The layer also records which backbone the tower was built with (see
    ``street2shop.model.tower.tower_spec``).

    Args:
        backbone: str. A name from ``street2shop.model.backbones.BACKBONES``.

    Example:
    >>> layer = BackbonePreprocess("inception_v3")
    >>> layer(np.full((1, 2, 2, 3), 255.0, "float32"))[0, 0, 0]  # -> [1., 1., 1.]
    """

    def __init__(self, backbone: str = "inception_v3", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from street2shop.model.backbones import backbone_spec

        self.backbone = backbone
        self._mode = backbone_spec(backbone).preprocess
        self.supports_masking = True

    def call(self, inputs: Any) -> Any:
        x = ops.cast(inputs, self.compute_dtype)
        if self._mode == "tf":
            return x / 127.5 - 1.0
        if self._mode == "caffe":
            bgr = ops.flip(x, axis=-1)
            return bgr - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        if self._mode == "torch":
            mean = ops.convert_to_tensor(TORCH_MEAN_RGB, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(TORCH_STD_RGB, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        return x

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(backbone=self.backbone)
        return config


@keras.saving.register_keras_serializable(package="street2shop")
class L2Normalize(keras.layers.Layer):
    """Scales each vector to unit Euclidean length: ``x / sqrt(max(sum(x²), epsilon))``.

    Computes in float32 by default (also under a mixed-precision policy), so
    the norm and the tiny ``epsilon`` do not underflow.

    Args:
        axis: int. The axis holding the vector. Defaults to -1.
        epsilon: float. Lower bound on the squared norm; a zero vector stays
            zero instead of becoming NaN. Defaults to 1e-12.

    Example:
    >>> L2Normalize()(np.array([[3.0, 4.0]], "float32"))  # -> [[0.6, 0.8]]
    """

    def __init__(self, axis: int = -1, epsilon: float = 1e-12, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ConfigError(f"axis must be an int. Received: axis={axis!r}")
        self.axis = axis
        self.epsilon = _check_epsilon(epsilon)
        self.supports_masking = True

    def call(self, inputs: Any) -> Any:
        return _l2_normalize(ops.cast(inputs, self.compute_dtype), self.axis, self.epsilon)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(axis=self.axis, epsilon=self.epsilon)
        return config


@keras.saving.register_keras_serializable(package="street2shop")
class PairDistance(keras.layers.Layer):
    """Euclidean distance between two batches of embeddings, one number per pair.

    Called on ``[a, b]`` with ``a``, ``b`` of shape ``[B, D]``; returns
    ``sqrt(max(sum((a - b)², axis=-1), epsilon))`` of shape ``[B]`` (rank 1,
    so a Keras loss on this output receives ``y_pred`` and ``y_true`` both
    ``[B]``). The ``max`` keeps the gradient finite when ``a == b``, where the
    plain square root's derivative is infinite; the distance there is
    ``sqrt(epsilon)`` (1e-6 by default) instead of 0. Computes in float32.

    Args:
        epsilon: float. Lower bound on the squared distance. Defaults to 1e-12.

    Example:
    >>> a = np.array([[0.0, 0.0]], "float32"); b = np.array([[3.0, 4.0]], "float32")
    >>> PairDistance()([a, b])  # -> [5.]
    """

    def __init__(self, epsilon: float = 1e-12, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.epsilon = _check_epsilon(epsilon)

    def call(self, inputs: Any) -> Any:
        a, b = inputs
        a = ops.cast(a, self.compute_dtype)
        b = ops.cast(b, self.compute_dtype)
        squared = ops.sum(ops.square(a - b), axis=-1)
        return ops.sqrt(ops.maximum(squared, self.epsilon))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return tuple(input_shape[0][:-1])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(epsilon=self.epsilon)
        return config


@keras.saving.register_keras_serializable(package="street2shop")
class CosineClassifier(keras.layers.Layer):
    """Class logits ``scale · cos(x, w_c)``: a softmax head for unit embeddings.

    A plain ``Dense`` on L2-normalised embeddings cannot give confident
    logits until its weights have grown large, since ``|w·x| ≤ ‖w‖`` when
    ``‖x‖ = 1``. At initialisation every logit is close to 0 and the softmax
    loss sits at ``log(C)`` for many steps (measured: 4.57 → 3.99 over 256
    steps with 99 classes). Normalising both sides and multiplying by a fixed
    ``scale`` (NormFace, Wang et al. 2017) makes the logits range
    ``[-scale, scale]`` from the first step, so the loss can reach a small
    value whatever the weight norm. A target probability ``p`` over ``C``
    classes needs ``scale ≳ log(p (C − 1) / (1 − p))``: about 7.4 for
    p = 0.9 and C = 180; the default 16 leaves room.

    Computes in float32 (like ``L2Normalize``), also under a mixed-precision
    policy, so the softmax sees full-precision logits.

    Args:
        units: int. Number of classes (>= 2).
        scale: float. The logits' bound (> 0). Defaults to 16.
        epsilon: float. Guards the normalisation of a zero vector.

    Example:
    >>> layer = CosineClassifier(3, scale=10.0)
    >>> layer(np.eye(4, dtype="float32")[:1]).shape  # -> (1, 3), each in [-10, 10]
    """

    def __init__(self, units: int, scale: float = 16.0, epsilon: float = 1e-12, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if isinstance(units, bool) or not isinstance(units, numbers.Integral) or units < 2:
            raise ConfigError(f"units must be an int >= 2. Received: units={units!r}")
        units = int(units)
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < float("inf"):
            raise ConfigError(f"scale must be a positive number. Received: scale={scale!r}")
        self.units = units
        self.scale = float(scale)
        self.epsilon = _check_epsilon(epsilon)

    def build(self, input_shape: Any) -> None:
        self.kernel = self.add_weight(
            name="kernel", shape=(int(input_shape[-1]), self.units), initializer="glorot_uniform", trainable=True
        )

    def call(self, inputs: Any) -> Any:
        x = _l2_normalize(ops.cast(inputs, self.compute_dtype), -1, self.epsilon)
        w = _l2_normalize(self.kernel, 0, self.epsilon)
        return self.scale * ops.matmul(x, w)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(units=self.units, scale=self.scale, epsilon=self.epsilon)
        return config
