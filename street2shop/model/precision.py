"""Mixed precision: the Keras dtype policy a model computes in, chosen per model, never left behind.

``PRECISIONS`` are Keras dtype policies: ``"float32"``; ``"mixed_float16"``
(float16 compute, float32 variables, with loss scaling: NVIDIA GPUs with
tensor cores); ``"mixed_bfloat16"`` (bfloat16 compute, float32 variables, no
loss scaling needed: TPUs, NVIDIA Ampere and newer, CPUs with AMX or
AVX512-BF16). Under a mixed policy the variables stay float32, so weights,
checkpoints' tensors and the weights fingerprint are the same kind in every
policy; what changes is the arithmetic.

What stays float32 under every policy, on purpose:

- the tower's last layer, :class:`~street2shop.model.layers.L2Normalize`, so
  the embedding is float32 and unit length to float32 accuracy;
- :class:`~street2shop.model.layers.PairDistance` and the cosine class head
  (:class:`~street2shop.model.layers.CosineClassifier`), so the robust loss
  ranks float32 distances (bfloat16 distances near 1 are 2^-7 apart, and
  the batch quantile would drop ties wholesale) and the softmax sees float32
  logits;
- the losses and metrics: Keras computes them in ``floatx`` (float32),
  whatever the layers' policy.

Why a scope and not a per-layer ``dtype=``: ``keras.applications``'
constructors take no ``dtype``, so their layers take Keras' default policy.
:func:`precision_scope` sets that default for the layers built inside it and
puts the caller's back on the way out (also on an error); Keras keeps the
default per thread, so other threads never see it. The library therefore
never leaves the user's global setting changed, and the policy travels with
each layer (it is in every layer's config, so a saved ``.keras`` file
reloads computing as it was trained).

One gap: Keras does not record a functional model's *own* policy, and that
is what ``compile`` reads to wrap the optimizer in a ``LossScaleOptimizer``.
A ``mixed_float16`` checkpoint loaded with ``compile=True`` outside the scope
would lose its loss scaling and its optimizer state; load it inside
``precision_scope("mixed_float16")`` (export and ``init_checkpoint`` load
with ``compile=False``, which needs no scope).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

from street2shop.errors import ConfigError, ModelError

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# The low-precision type each policy computes in, and its unit roundoff (half the spacing of numbers near 1):
# float16 keeps 11 significant bits, bfloat16 8, float32 24.
COMPUTE_DTYPES = {"float32": "float32", "mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def check_precision(precision: Any) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}. Received: precision={precision!r}")
    return str(precision)


@contextlib.contextmanager
def precision_scope(precision: str) -> Iterator[None]:
    """Layers built inside take the dtype policy ``precision``; the caller's default policy is back afterwards.

    Example:
    >>> with precision_scope("mixed_bfloat16"):
    ...     tower = build_tower("mobilenet_v3_small", image_size=32)
    >>> keras.config.dtype_policy().name  # -> whatever it was before, "float32" by default
    """
    import keras

    check_precision(precision)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def leaf_layers(model: Any) -> Iterator[Any]:
    """The layers that compute: those of ``model`` and of its nested models, not the models nor their inputs."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from leaf_layers(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            yield layer


def model_precision(model: Any) -> str:
    """The policy of :data:`PRECISIONS` that ``model``'s layers compute in: the mixed one any layer uses, else float32.

    Raises:
        ModelError: layers of two mixed policies, or of a policy outside :data:`PRECISIONS`.
    """
    names = {layer.dtype_policy.name for layer in leaf_layers(model)}
    mixed = sorted(names & {"mixed_float16", "mixed_bfloat16"})
    unknown = sorted(names - set(PRECISIONS))
    if len(mixed) > 1 or unknown:
        raise ModelError(f"model {model.name!r} mixes dtype policies street2shop does not handle. Received: {sorted(names)}")
    return mixed[0] if mixed else "float32"


def with_precision(model: Any, precision: str) -> Any:
    """``model`` computing under ``precision``: the model itself if it already does, else a copy with its weights.

    The copy is what building the same model inside :func:`precision_scope`
    gives: every layer takes the policy, except those that pin their own
    (``L2Normalize``, ``PairDistance``, ``CosineClassifier`` stay float32).
    Variables are float32 in every policy, so the weights carry over exactly.

    Raises:
        ModelError: the model cannot be rebuilt from its config (a layer that is not serialisable).
    """
    import keras

    if model_precision(model) == check_precision(precision):
        return model

    def rebuild(layer: Any) -> Any:
        if isinstance(layer, keras.Sequential):
            # Not keras' clone: it would copy the input layer Sequential made in the first layer's compute dtype
            # (float16 under mixed_float16), and cast the copy's input to it. Unbuilt, it makes one in the new policy.
            return keras.Sequential([rebuild(inner) for inner in layer.layers], name=layer.name, trainable=layer.trainable)
        if isinstance(layer, keras.Model):
            return keras.models.clone_model(layer, clone_function=rebuild)  # a functional model: its inputs are float32
        config = layer.get_config()
        config.pop("dtype", None)  # the layer takes the scope's policy, unless its class pins one
        return layer.__class__.from_config(config)

    try:
        with precision_scope(precision):
            copy = rebuild(model)
            if not copy.built:  # a Sequential model at the top
                copy.build(tuple(model.inputs[0].shape))
        copy.set_weights(model.get_weights())
    except (ValueError, TypeError, NotImplementedError) as e:
        raise ModelError(f"cannot rebuild model {model.name!r} under {precision}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return copy


def precision_fingerprint(fingerprint: str, precision: str) -> str:
    """The model's fingerprint when it computes under ``precision``: the given one at float32, else a digest of both.

    The same weights give other vectors in another precision (within the
    tolerance BENCHMARKS.md measures), so an export computing in bfloat16 is
    another model than the float32 export of the same weights, as a
    test-time-augmented export is.
    """
    if check_precision(precision) == "float32":
        return fingerprint
    return hashlib.sha256(f"{fingerprint}:precision={precision}".encode()).hexdigest()[:16]
