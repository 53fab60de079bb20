"""EmbeddingClient: embed images with the street2shop SavedModel served by TF Serving.

The client speaks TF Serving's gRPC API (``PredictionService.Predict`` and
``GetModelMetadata``, ``ModelService.GetModelStatus``) and only knows the
serving contract (:mod:`street2shop.contract`): ``image_bytes`` (encoded
JPEG/PNG/GIF/BMP), optionally ``boxes``, in; ``embedding`` and
``model_fingerprint`` out. All decoding and preprocessing happens inside the
SavedModel, so the client sends the file bytes as they are.

Every answer names its model: the version in ``PredictResponse.model_spec``
and the weights fingerprint in the ``model_fingerprint`` output. The client
checks both on every response, so one call never returns vectors of two
models (TF Serving loads a new version by itself, in the middle of a job), and
with ``expected_fingerprint`` it refuses any other model at all.

Requests are built and responses decoded with plain protobuf and numpy (the
client never calls TensorFlow). Note that the ``tensorflow_serving.apis``
protobuf modules themselves import the ``tensorflow`` package.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from street2shop import contract
from street2shop.contract import ModelIdentity
from street2shop.errors import (
    BadRequestError,
    ConfigError,
    ModelMismatchError,
    ModelNotFoundError,
    ServerUnavailableError,
    ServingError,
    SignatureMismatchError,
)

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB
# Bytes a request needs besides the image bytes: the model spec and map keys
# (the header), and the length prefix of each string.
_REQUEST_OVERHEAD = 4096
_PER_ITEM_OVERHEAD = 16

# tensorflow.DataType values (tensorflow/core/framework/types.proto).
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_STRING, DT_INT64, DT_HALF = 1, 2, 3, 7, 9, 19
_DTYPE_NAMES = {DT_FLOAT: "float32", DT_DOUBLE: "float64", DT_INT32: "int32", DT_STRING: "string", DT_INT64: "int64", DT_HALF: "float16"}
# dtype -> (numpy dtype of tensor_content, typed repeated field, numpy dtype of that field).
_NUMERIC = {
    DT_FLOAT: ("<f4", "float_val", np.float32),
    DT_DOUBLE: ("<f8", "double_val", np.float64),
    DT_INT32: ("<i4", "int_val", np.int32),
    DT_INT64: ("<i8", "int64_val", np.int64),
    DT_HALF: ("<f2", "half_val", np.uint16),
}


def tensor_proto_to_numpy(proto: Any) -> np.ndarray:
    """A numeric ``tensorflow.TensorProto`` as a numpy array, without TensorFlow.

    Handles both encodings: raw little-endian ``tensor_content`` (what
    ``tf.make_tensor_proto`` writes) and the typed repeated fields such as
    ``float_val`` (what TF Serving answers with). As in TensorFlow, a typed
    field shorter than the shape is padded with its last value (one value
    fills the whole tensor).

    Args:
        proto: tensorflow.TensorProto. Of dtype float, double, half, int32 or int64.

    Returns:
        np.ndarray with the proto's shape.

    Raises:
        ServingError: an unsupported dtype or a size that does not fit the shape.
    """
    if proto.dtype not in _NUMERIC:
        raise ServingError(
            f"cannot decode a TensorProto of dtype {_DTYPE_NAMES.get(proto.dtype, proto.dtype)}: expected one of "
            f"{sorted(_DTYPE_NAMES[d] for d in _NUMERIC)}. Received: dtype={proto.dtype}"
        )
    shape = tuple(int(d.size) for d in proto.tensor_shape.dim)
    size = int(np.prod(shape, dtype=np.int64))
    raw_dtype, field, field_dtype = _NUMERIC[proto.dtype]
    if proto.tensor_content:
        flat = np.frombuffer(proto.tensor_content, dtype=raw_dtype).copy()
    else:
        values = np.asarray(getattr(proto, field), dtype=field_dtype)
        if proto.dtype == DT_HALF:  # half_val holds the float16 bit patterns as int32
            values = values.astype(np.uint16).view(np.float16)
        if 0 < values.size < size:
            values = np.concatenate([values, np.full(size - values.size, values[-1], values.dtype)])
        elif values.size == 0:
            values = np.zeros(size, values.dtype)
        flat = values
    if flat.size != size:
        raise ServingError(f"TensorProto holds {flat.size} values but its shape {list(shape)} needs {size}. Received: shape={list(shape)}")
    return flat.astype(np.dtype(raw_dtype).newbyteorder("="), copy=False).reshape(shape)


def _string_tensor(values: Sequence[bytes]) -> Any:
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

    proto = tensor_pb2.TensorProto(dtype=DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(values))]))
    proto.string_val.extend(values)
    return proto


def _float_tensor(array: np.ndarray) -> Any:
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=int(s)) for s in array.shape]
    return tensor_pb2.TensorProto(
        dtype=DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims),
        tensor_content=np.ascontiguousarray(array, dtype="<f4").tobytes(),
    )


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class EmbeddingClient:
    """Client for the street2shop embedding model served by TF Serving (gRPC).

    Sends encoded images (and optional boxes) to the model's signatures and
    returns L2-normalised embeddings. Long lists are split into requests of at
    most ``batch_size`` images and ``max_message_bytes`` bytes. Calls that fail
    with UNAVAILABLE or DEADLINE_EXCEEDED are retried with exponential backoff
    and jitter; every other failure raises at once. On the first call the
    served signature is checked against the contract with ``GetModelMetadata``.
    Every response's model version and weights fingerprint are checked: one
    call never mixes two models (ModelMismatchError), and :attr:`identity`
    is the model of the last answer. Safe to use from several threads at once.

    Args:
        target: str. TF Serving's gRPC address, ``HOST:PORT``.
        model_name: str. The model name the server serves the SavedModel as.
        signature: str. Signature used for images without boxes
            (``image_bytes`` in, ``embedding`` out); boxes always go to
            ``embed_boxes``.
        version: int or None. Model version to ask for; None = the server's latest.
        expected_dimension: int or None. Embedding size the caller needs; a
            different served size raises SignatureMismatchError.
        batch_size: int. Most images per request.
        timeout: float. Deadline of each gRPC call, in seconds.
        max_retries: int. Retries after the first try (so ``max_retries + 1`` tries).
        backoff: float. First retry delay in seconds; doubles each retry, with jitter.
        max_message_bytes: int. Largest gRPC message sent or received.
        tls: bool. Use TLS (``grpc.ssl_channel_credentials``).
        root_certificates: bytes or None. PEM root certificates for TLS
            (None = the system's).
        check_metadata: bool. Check the served signature before the first request.
        expected_fingerprint: str or None. Refuse answers of any other model
            (the fingerprint of the index or embeddings the vectors must match).

    Example:
        >>> with EmbeddingClient("localhost:8500", expected_dimension=128) as client:  # doctest: +SKIP
        ...     vectors = client.embed([open("photo.jpg", "rb").read()])
        >>> vectors.shape  # doctest: +SKIP
        (1, 128)
    """

    def __init__(
        self,
        target: str,
        model_name: str = contract.DEFAULT_MODEL_NAME,
        *,
        signature: str = contract.SERVING_DEFAULT,
        version: int | None = None,
        expected_dimension: int | None = None,
        batch_size: int = 32,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.2,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: bool = False,
        root_certificates: bytes | None = None,
        check_metadata: bool = True,
        expected_fingerprint: str | None = None,
    ) -> None:
        if not isinstance(target, str) or ":" not in target or not target.rsplit(":", 1)[1].isdigit():
            raise ConfigError(f"target must be a gRPC address HOST:PORT, e.g. localhost:8500. Received: target={target!r}")
        if not model_name:
            raise ConfigError(f"model_name must be a non-empty string. Received: model_name={model_name!r}")
        if version is not None and (not isinstance(version, int) or version < 1):
            raise ConfigError(f"version must be a positive int or None (latest). Received: version={version!r}")
        if expected_dimension is not None and (not isinstance(expected_dimension, int) or expected_dimension < 1):
            raise ConfigError(f"expected_dimension must be a positive int or None. Received: expected_dimension={expected_dimension!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int. Received: batch_size={batch_size!r}")
        if not timeout or timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds. Received: timeout={timeout!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"max_retries must be an int >= 0. Received: max_retries={max_retries!r}")
        if backoff < 0:
            raise ConfigError(f"backoff must be >= 0 seconds. Received: backoff={backoff!r}")
        if not isinstance(max_message_bytes, int) or max_message_bytes < 64 * 1024:
            raise ConfigError(f"max_message_bytes must be an int of at least 65536. Received: max_message_bytes={max_message_bytes!r}")
        self.target = target
        self.model_name = model_name
        self.signature = signature
        self.version = version
        self.expected_dimension = expected_dimension
        self.batch_size = batch_size
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_message_bytes = max_message_bytes
        self.tls = tls
        self.root_certificates = root_certificates
        self.check_metadata = check_metadata
        self.expected_fingerprint = expected_fingerprint or None
        # The model of the last answer (version from model_spec, fingerprint from the model_fingerprint output).
        self.identity: ModelIdentity | None = None
        self.served_version: int | None = None
        self.attempts = 0  # gRPC calls tried, retries included
        self.retries = 0  # of which retries
        self._dimension: int | None = None
        self._signature_defs: dict[str, Any] | None = None
        self._checked: set[str] = set()
        self._channel: Any = None
        self._predict_stub: Any = None
        self._model_stub: Any = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ connection

    def _make_channel(self) -> Any:
        import grpc

        options = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # Reconnect within seconds once a restarted server is back (gRPC's default backoff grows to 2 minutes).
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]
        if self.tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.root_certificates)
            return grpc.secure_channel(self.target, credentials, options=options)
        return grpc.insecure_channel(self.target, options=options)

    def _ensure_channel(self) -> None:
        with self._lock:
            if self._channel is not None:
                return
            from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

            self._channel = self._make_channel()
            self._predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
            self._model_stub = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def connect(self) -> EmbeddingClient:
        """Opens the channel and (with ``check_metadata``) checks the served signature.

        Called by the first :meth:`embed`; call it yourself to fail early.

        Raises:
            ServerUnavailableError, ModelNotFoundError, SignatureMismatchError.
        """
        self._ensure_channel()
        if self.check_metadata:
            self._check_signature(self.signature, contract.SIGNATURES[contract.SERVING_DEFAULT])
        return self

    def close(self) -> None:
        """Closes the channel; the client reconnects if used again."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._predict_stub = self._model_stub = None

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingClient(target={self.target!r}, model_name={self.model_name!r}, signature={self.signature!r}, version={self.version})"

    # ------------------------------------------------------------------ calls and errors

    def _model_spec(self, signature: str | None = None) -> Any:
        from tensorflow_serving.apis import model_pb2

        spec = model_pb2.ModelSpec(name=self.model_name)
        if signature:
            spec.signature_name = signature
        if self.version is not None:
            spec.version.value = self.version
        return spec

    def _what(self, signature: str | None) -> str:
        version = "latest version" if self.version is None else f"version {self.version}"
        return f"model {self.model_name!r} ({version}" + (f", signature {signature!r})" if signature else ")")

    def _call(self, method: str, request: Any, signature: str | None = None) -> Any:
        """One RPC with retries on UNAVAILABLE / DEADLINE_EXCEEDED; other failures mapped to errors."""
        import grpc

        self._ensure_channel()
        stub = self._model_stub if method == "GetModelStatus" else self._predict_stub
        fn: Callable[..., Any] = getattr(stub, method)
        tries = self.max_retries + 1
        for attempt in range(tries):
            with self._lock:
                self.attempts += 1
                if attempt:
                    self.retries += 1
            try:
                return fn(request, timeout=self.timeout)
            except grpc.RpcError as e:
                code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
                details = _one_line((e.details() if callable(getattr(e, "details", None)) else "") or str(code))
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    if attempt + 1 < tries:
                        delay = self.backoff * (2**attempt) * random.uniform(0.5, 1.5)
                        logger.warning("%s to %s failed with %s (try %d of %d), retrying in %.2fs: %s", method, self.target, code.name, attempt + 1, tries, delay, details)
                        time.sleep(delay)
                        continue
                    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise ServerUnavailableError(
                            f"TF Serving at {self.target} did not answer {method} within timeout={self.timeout:g}s after {tries} tries; "
                            f"raise timeout or lower batch_size (now {self.batch_size}). Received: {details}"
                        ) from None
                    raise ServerUnavailableError(
                        f"cannot reach TF Serving at {self.target} after {tries} tries: {details}; "
                        "check that the server is running and the address"
                    ) from None
                raise self._map_error(code, details, method, signature) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _map_error(self, code: Any, details: str, method: str, signature: str | None) -> ServingError:
        import grpc

        what = self._what(signature)
        if code == grpc.StatusCode.NOT_FOUND or (
            code == grpc.StatusCode.FAILED_PRECONDITION and "signature" in details.lower()
        ):  # TF Serving answers FAILED_PRECONDITION for an unknown signature key
            return ModelNotFoundError(
                f"TF Serving at {self.target} does not serve {what}; check the model name (--model-name), "
                f"the version and the signature name. Received: {details}"
            )
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return BadRequestError(
                f"TF Serving at {self.target} rejected the {method} request to {what}; check that every image is a "
                f"readable JPEG/PNG/GIF/BMP file, boxes are [N, 4] in 0..1, and batch_size={self.batch_size} is within "
                f"the server's batch limit. Received: {details}"
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return BadRequestError(
                f"the {method} request to TF Serving at {self.target} is too large; lower batch_size (now "
                f"{self.batch_size}) or max_message_bytes (now {self.max_message_bytes}), or raise the server's "
                f"message limit. Received: {details}"
            )
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return ServingError(
                f"the server at {self.target} does not implement TF Serving's {method}; check that the address is "
                f"TF Serving's gRPC port (8500 by default, not the REST port 8501). Received: {details}"
            )
        return ServingError(f"{method} to TF Serving at {self.target} for {what} failed with {code.name}. Received: {details}")

    # ------------------------------------------------------------------ metadata

    def _signature_map(self) -> dict[str, Any]:
        with self._lock:
            if self._signature_defs is not None:
                return self._signature_defs
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=self._model_spec(), metadata_field=["signature_def"])
        response = self._call("GetModelMetadata", request)
        if "signature_def" not in response.metadata:
            raise SignatureMismatchError(
                f"TF Serving at {self.target} returned no signature_def metadata for {self._what(None)}. "
                f"Received: metadata fields {sorted(response.metadata)}"
            )
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        with self._lock:
            self._signature_defs = dict(signature_map.signature_def)
            if response.model_spec.HasField("version"):
                self.served_version = int(response.model_spec.version.value)
            return self._signature_defs

    def _check_signature(self, name: str, expected: contract.Signature) -> None:
        """Checks the served signature ``name`` has the inputs and outputs of the contract's ``expected``."""
        with self._lock:
            if name in self._checked:
                return
        signatures = self._signature_map()
        if name not in signatures:
            served = sorted(s for s in signatures if not s.startswith("__"))
            raise ModelNotFoundError(
                f"{self._what(None)} at {self.target} has no signature {name!r}; use one of {served}. Received: signature={name!r}"
            )
        sig = signatures[name]
        got_inputs = {k: (_DTYPE_NAMES.get(v.dtype, str(v.dtype)), [int(d.size) for d in v.tensor_shape.dim]) for k, v in sig.inputs.items()}
        got_outputs = {k: (_DTYPE_NAMES.get(v.dtype, str(v.dtype)), [int(d.size) for d in v.tensor_shape.dim]) for k, v in sig.outputs.items()}
        problems = expected.problems({k: (d, len(s)) for k, (d, s) in got_inputs.items()}, {k: (d, len(s)) for k, (d, s) in got_outputs.items()})
        if problems:
            hint = ""
            if contract.FINGERPRINT not in got_outputs and contract.EMBEDDING in got_outputs:
                hint = " (a model exported by street2shop before 0.2 has no model_fingerprint output: export it again)"
            raise SignatureMismatchError(
                f"signature {name!r} of {self._what(None)} at {self.target} does not follow the street2shop contract: "
                f"expected {', '.join(problems)}{hint}. Received: inputs={got_inputs}, outputs={got_outputs}"
            )
        dimension = got_outputs[contract.EMBEDDING][1][1]
        if dimension > 0:
            self._set_dimension(dimension, f"signature {name!r}")
        with self._lock:
            self._checked.add(name)

    def _set_dimension(self, dimension: int, source: str) -> None:
        if self.expected_dimension is not None and dimension != self.expected_dimension:
            raise SignatureMismatchError(
                f"{self._what(None)} at {self.target} returns embeddings of dimension {dimension} ({source}) but "
                f"expected_dimension={self.expected_dimension}; check that the server runs the model this index or "
                f"catalogue was built with. Received: dimension={dimension}"
            )
        with self._lock:
            if self._dimension is not None and self._dimension != dimension:
                raise SignatureMismatchError(
                    f"{self._what(None)} at {self.target} changed its embedding dimension from {self._dimension} "
                    f"to {dimension} ({source}); a new model version was loaded. Received: dimension={dimension}"
                )
            self._dimension = dimension

    @property
    def dimension(self) -> int:
        """The embedding size D (from the served signature; fetched if not known yet)."""
        if self._dimension is None:
            if self.check_metadata:
                self.connect()
            elif self.expected_dimension is not None:
                return self.expected_dimension
            if self._dimension is None:  # metadata had no static D, or was not checked
                self._ensure_channel()
                signatures = self._signature_map()
                sig = signatures.get(self.signature)
                dims = [int(d.size) for d in sig.outputs[contract.EMBEDDING].tensor_shape.dim] if sig and contract.EMBEDDING in sig.outputs else []
                if len(dims) == 2 and dims[1] > 0:
                    self._set_dimension(dims[1], f"signature {self.signature!r}")
                elif self.expected_dimension is not None:
                    return self.expected_dimension
                else:
                    raise SignatureMismatchError(
                        f"cannot tell the embedding dimension of {self._what(self.signature)} at {self.target}: the "
                        f"signature's output has no static size; pass expected_dimension. Received: shape={dims}"
                    )
        return int(self._dimension)  # type: ignore[arg-type]

    def probe(self) -> ModelIdentity:
        """Asks the served model for one small embedding and returns who answered.

        What a readiness check needs: the server is up, serves the model under
        its name, follows the contract, and names its weights fingerprint and
        version (which also becomes :attr:`identity`).
        """
        from street2shop.data.image import pattern_jpeg

        identity = self.predict([pattern_jpeg()])[1]
        assert identity is not None
        return identity

    def model_status(self) -> list[dict[str, Any]]:
        """The served versions and their state, from ``ModelService.GetModelStatus``.

        Returns:
            list of {"version": int, "state": str (e.g. "AVAILABLE"), "error": str}.
        """
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest(model_spec=self._model_spec())
        response = self._call("GetModelStatus", request)
        state_name = get_model_status_pb2.ModelVersionStatus.State.Name
        return [
            {"version": int(s.version), "state": state_name(s.state), "error": s.status.error_message}
            for s in response.model_version_status
        ]

    # ------------------------------------------------------------------ embedding

    def _batches(self, sizes: Sequence[int], per_item: int) -> Iterator[tuple[int, int]]:
        """[start, stop) ranges of at most batch_size items and max_message_bytes bytes."""
        budget = self.max_message_bytes - _REQUEST_OVERHEAD
        start = 0
        while start < len(sizes):
            stop, total = start, 0
            while stop < len(sizes) and stop - start < self.batch_size:
                item = sizes[stop] + per_item
                if stop > start and total + item > budget:
                    break
                total += item
                stop += 1
            if total > budget:
                raise BadRequestError(
                    f"image {start} alone is {sizes[start]} bytes, more than max_message_bytes={self.max_message_bytes} "
                    f"allows in one request; shrink the image or raise max_message_bytes (and the server's limit). "
                    f"Received: {sizes[start]} bytes"
                )
            yield start, stop
            start = stop

    def _predict(self, signature: str, inputs: dict[str, Any], count: int) -> tuple[np.ndarray, ModelIdentity]:
        """One Predict: the vectors and the model that made them (checked against ``expected_fingerprint``)."""
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest(model_spec=self._model_spec(signature))
        for key, tensor in inputs.items():
            request.inputs[key].CopyFrom(tensor)
        request.output_filter.extend([contract.EMBEDDING, contract.FINGERPRINT])
        response = self._call("Predict", request, signature)
        missing = [key for key in (contract.EMBEDDING, contract.FINGERPRINT) if key not in response.outputs]
        if missing:
            raise SignatureMismatchError(
                f"TF Serving's answer from {self._what(signature)} at {self.target} lacks the output(s) {missing}. "
                f"Received: outputs {sorted(response.outputs)}"
            )
        vectors = tensor_proto_to_numpy(response.outputs[contract.EMBEDDING])
        if vectors.ndim != 2 or vectors.shape[0] != count:
            raise SignatureMismatchError(
                f"{self._what(signature)} at {self.target} should return {contract.EMBEDDING!r} of shape [{count}, D] for "
                f"{count} inputs. Received: shape={list(vectors.shape)}"
            )
        self._set_dimension(int(vectors.shape[1]), "a Predict response")
        fingerprints = {bytes(v).decode("utf-8", "replace") for v in response.outputs[contract.FINGERPRINT].string_val}
        if len(fingerprints) != 1:
            raise SignatureMismatchError(
                f"{self._what(signature)} at {self.target} should name one model fingerprint per answer. "
                f"Received: {sorted(fingerprints)[:3]}"
            )
        version = int(response.model_spec.version.value) if response.model_spec.HasField("version") else None
        if self.version is not None and version != self.version:
            raise ModelMismatchError(
                f"asked {self._what(signature)} at {self.target} for version {self.version}, and version {version} answered. "
                f"Received: version={version}"
            )
        identity = ModelIdentity(fingerprints.pop(), version, int(vectors.shape[1]))
        if self.expected_fingerprint is not None and identity.fingerprint != self.expected_fingerprint:
            raise ModelMismatchError(
                f"TF Serving at {self.target} answers with {identity}, not the expected model {self.expected_fingerprint} "
                f"(the one the index or the embeddings come from); serve that model, or embed the catalogue again with this one. "
                f"Received: fingerprint={identity.fingerprint!r}"
            )
        with self._lock:
            self.identity, self.served_version = identity, version
        return vectors.astype(np.float32, copy=False), identity

    def _one_model(self, answers: list[tuple[np.ndarray, ModelIdentity]]) -> tuple[np.ndarray, ModelIdentity | None]:
        """Joins the answers of one call, refusing a mix of models (TF Serving may switch versions meanwhile)."""
        identities = {identity.fingerprint: identity for _, identity in answers}
        if len(identities) > 1:
            seen = ", ".join(str(identity) for identity in identities.values())
            raise ModelMismatchError(
                f"TF Serving at {self.target} switched models in the middle of one call ({seen}); nothing of it was kept. "
                f"Received: {len(identities)} models"
            )
        vectors = np.concatenate([v for v, _ in answers], axis=0) if answers else np.zeros((0, self.dimension), np.float32)
        return vectors, (answers[-1][1] if answers else self.identity)

    def predict(self, images: Sequence[bytes], boxes: np.ndarray | None = None) -> tuple[np.ndarray, ModelIdentity | None]:
        """Like :meth:`embed`, and also the model that answered (its fingerprint and version; None for no images)."""
        images = list(images)
        for i, image in enumerate(images):
            if not isinstance(image, (bytes, bytearray, memoryview)):
                raise BadRequestError(f"images must be encoded image files as bytes; image {i} is not. Received: {type(image).__name__}")
        images = [bytes(image) for image in images]
        signature, expected = self.signature, contract.SIGNATURES[contract.SERVING_DEFAULT]
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=np.float32)
            if boxes.shape != (len(images), 4):
                raise BadRequestError(f"boxes must have shape [{len(images)}, 4] (one [ymin, xmin, ymax, xmax] per image). Received: shape={list(boxes.shape)}")
            signature, expected = contract.EMBED_BOXES, contract.SIGNATURES[contract.EMBED_BOXES]
        if self.check_metadata:
            self.connect()
            self._check_signature(signature, expected)
        else:
            self._ensure_channel()
        per_item = _PER_ITEM_OVERHEAD + (16 if boxes is not None else 0)
        answers = []
        for start, stop in self._batches([len(image) for image in images], per_item):
            inputs = {contract.IMAGE_BYTES: _string_tensor(images[start:stop])}
            if boxes is not None:
                inputs[contract.BOXES] = _float_tensor(boxes[start:stop])
            answers.append(self._predict(signature, inputs, stop - start))
        return self._one_model(answers)

    def embed(self, images: Sequence[bytes], boxes: np.ndarray | None = None) -> np.ndarray:
        """Embeds encoded images; with ``boxes``, each image is cropped to its box first.

        Args:
            images: sequence of bytes. Encoded JPEG/PNG/GIF/BMP files.
            boxes: float array [N, 4] or None. Normalised ``[ymin, xmin, ymax, xmax]``
                per image (sent to the ``embed_boxes`` signature).

        Returns:
            float32 array [N, D] of L2-normalised embeddings, in the order of ``images``.

        Raises:
            BadRequestError: an image the server cannot decode, a batch or image
                too large, malformed boxes.
            ModelMismatchError: the answers came from two models, or not from
                ``expected_fingerprint``.
            ServerUnavailableError, ModelNotFoundError, SignatureMismatchError.
        """
        return self.predict(images, boxes)[0]

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embeds decoded images already at the model's input size (``embed_pixels`` signature).

        Args:
            pixels: float array [N, H, W, 3] with values in 0..255.

        Returns:
            float32 array [N, D] of L2-normalised embeddings.
        """
        pixels = np.asarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise BadRequestError(f"pixels must have shape [N, H, W, 3]. Received: shape={list(pixels.shape)}")
        if self.check_metadata:
            self.connect()
            self._check_signature(contract.EMBED_PIXELS, contract.SIGNATURES[contract.EMBED_PIXELS])
        item_bytes = int(np.prod(pixels.shape[1:])) * 4
        answers = [
            self._predict(contract.EMBED_PIXELS, {contract.PIXELS: _float_tensor(pixels[start:stop])}, stop - start)
            for start, stop in self._batches([item_bytes] * len(pixels), 0)
        ]
        return self._one_model(answers)[0]
