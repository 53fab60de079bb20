"""Requests to and answers from TF Serving, as protobuf: what one request holds, and what an answer says.

Images go as a ``string`` tensor of the encoded files (all decoding happens in
the SavedModel), boxes and pixels as ``float32`` ``tensor_content``. Answers
are read with TensorFlow's own :func:`tf.make_ndarray`, which reads both
encodings a server may use: packed ``tensor_content`` and the typed repeated
fields (``float_val``) that TF Serving answers with.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from street2shop import contract
from street2shop.errors import BadRequestError, ServingError, SignatureMismatchError

# Bytes a request needs besides the image bytes: the model spec and map keys
# (the header), and the length prefix of each string.
REQUEST_OVERHEAD = 4096
PER_ITEM_OVERHEAD = 16
_NUMERIC = ("float16", "float32", "float64", "int32", "int64")


def model_spec(name: str, version: int | None, signature: str | None = None) -> Any:
    """TF Serving's ``ModelSpec``: the model's name, a version (None = the latest) and a signature."""
    from tensorflow_serving.apis import model_pb2

    spec = model_pb2.ModelSpec(name=name)
    if signature:
        spec.signature_name = signature
    if version is not None:
        spec.version.value = version
    return spec


def string_tensor(values: Sequence[bytes]) -> Any:
    """A ``string`` TensorProto ``[N]`` of the given byte strings."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(values))])
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=shape)
    proto.string_val.extend(values)
    return proto


def float_tensor(array: np.ndarray) -> Any:
    """A ``float32`` TensorProto of ``array``, packed in ``tensor_content``."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=int(s)) for s in array.shape]
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims),
        tensor_content=np.ascontiguousarray(array, dtype="<f4").tobytes(),
    )


def decode_tensor(proto: Any) -> np.ndarray:
    """A numeric ``tensorflow.TensorProto`` as a numpy array (``tf.make_ndarray``), or ServingError.

    Both encodings: ``tensor_content`` and the typed fields (``float_val``...);
    as in TensorFlow, a typed field shorter than the shape is padded with its
    last value.

    Raises:
        ServingError: a dtype that is not a number, or a size that does not fit the shape.
    """
    import tensorflow as tf

    try:
        dtype = tf.dtypes.as_dtype(proto.dtype)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in _NUMERIC:
        raise ServingError(f"cannot decode a TensorProto of dtype {dtype.name if dtype else proto.dtype}: expected one of "
                           f"{sorted(_NUMERIC)}. Received: dtype={proto.dtype}")
    try:
        return tf.make_ndarray(proto)
    except ValueError:
        shape = [int(d.size) for d in proto.tensor_shape.dim]
        held = (len(proto.tensor_content) // dtype.size if proto.tensor_content
                else max((len(v) for f, v in proto.ListFields() if f.name.endswith("_val")), default=0))
        raise ServingError(
            f"TensorProto holds {held} values but its shape {shape} needs {int(np.prod(shape))}. Received: shape={shape}"
        ) from None


def split_requests(sizes: Sequence[int], per_item: int, batch_size: int, max_message_bytes: int) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges of at most ``batch_size`` items whose request fits in ``max_message_bytes``.

    Args:
        sizes: the bytes of each item.
        per_item: bytes each item costs on top of its own (length prefixes, a box).

    Raises:
        BadRequestError: one item alone does not fit (nothing is sent).
    """
    budget = max_message_bytes - REQUEST_OVERHEAD
    start = 0
    while start < len(sizes):
        stop, total = start, 0
        while stop < len(sizes) and stop - start < batch_size:
            item = sizes[stop] + per_item
            if stop > start and total + item > budget:
                break
            total += item
            stop += 1
        if total > budget:
            raise BadRequestError(
                f"image {start} alone is {sizes[start]} bytes, more than max_message_bytes={max_message_bytes} "
                f"allows in one request; shrink the image or raise max_message_bytes (and the server's limit). "
                f"Received: {sizes[start]} bytes"
            )
        yield start, stop
        start = stop


def read_answer(response: Any, count: int, where: str) -> tuple[np.ndarray, str, int | None]:
    """A ``PredictResponse`` for ``count`` inputs → (float32 vectors [count, D], the model's fingerprint, its version).

    Args:
        where: the model and server asked, in words (for the errors).

    Raises:
        SignatureMismatchError: an output missing, a wrong shape, not one fingerprint.
    """
    missing = [key for key in (contract.EMBEDDING, contract.FINGERPRINT) if key not in response.outputs]
    if missing:
        raise SignatureMismatchError(f"TF Serving's answer from {where} lacks the output(s) {missing}. Received: outputs {sorted(response.outputs)}")
    vectors = decode_tensor(response.outputs[contract.EMBEDDING])
    if vectors.ndim != 2 or vectors.shape[0] != count:
        raise SignatureMismatchError(
            f"{where} should return {contract.EMBEDDING!r} of shape [{count}, D] for {count} inputs. Received: shape={list(vectors.shape)}"
        )
    fingerprints = {bytes(v).decode("utf-8", "replace") for v in response.outputs[contract.FINGERPRINT].string_val}
    if len(fingerprints) != 1:
        raise SignatureMismatchError(f"{where} should name one model fingerprint per answer. Received: {sorted(fingerprints)[:3]}")
    version = int(response.model_spec.version.value) if response.model_spec.HasField("version") else None
    return vectors.astype(np.float32, copy=False), fingerprints.pop(), version
