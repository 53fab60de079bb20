"""A local STAND-IN for TF Serving's gRPC API, for development and tests.

:class:`StandInServer` serves the newest version of an export base over the
same gRPC services TF Serving offers (``PredictionService.Predict``,
``PredictionService.GetModelMetadata``, ``ModelService.GetModelStatus``), so
:class:`street2shop.serving.client.EmbeddingClient` can be developed and
tested without Docker or ``tensorflow_model_server``. It copies TF Serving's
wire behaviour where the client can see it: responses carry typed fields
(``float_val``) rather than ``tensor_content``; ``model_spec`` is filled with
the name, version and signature; NOT_FOUND for an unknown model or version,
FAILED_PRECONDITION for an unknown signature key (as TF Serving does),
INVALID_ARGUMENT for undecodable images, wrong inputs or a batch above
``max_batch_size``, RESOURCE_EXHAUSTED for a message above the limit; the
warm-up requests in ``assets.extra`` are replayed at load.

It is NOT a replacement for TF Serving: no request batching across clients,
no version policies or hot reload, no REST API, no monitoring. Production
runs the official ``tensorflow/serving`` image (see ``serving/README.md``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

from street2shop import contract
from street2shop.errors import ConfigError, ModelError, ServingError, check_positive_int, tf_error_text
from street2shop.serving.transport import DEFAULT_MAX_MESSAGE_BYTES

logger = logging.getLogger(__name__)



class _Status(Exception):
    """A gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _ServedModel:
    """One loaded SavedModel version and the Predict logic over it."""

    def __init__(self, path: Path, version: int, max_batch_size: int) -> None:
        self.path = path
        self.version = version
        self.max_batch_size = max_batch_size
        try:
            proto = saved_model_pb2.SavedModel()
            proto.ParseFromString((path / contract.SAVED_MODEL_FILE).read_bytes())
            self.signature_defs = dict(proto.meta_graphs[0].signature_def)
            self.loaded = tf.saved_model.load(str(path))
        except (OSError, ValueError, tf.errors.OpError) as e:
            raise ModelError(f"cannot load the SavedModel at {path}: {tf_error_text(str(e))}. Received: {path}") from e
        self.functions = dict(self.loaded.signatures)

    def signature(self, name: str) -> tuple[Any, Any]:
        name = name or contract.SERVING_DEFAULT
        if name not in self.functions or name not in self.signature_defs:
            raise _Status(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.')
        return self.signature_defs[name], self.functions[name]

    def predict(self, signature_name: str, inputs: Any, output_filter: Sequence[str] = ()) -> dict[str, np.ndarray]:
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        sig, fn = self.signature(signature_name)
        sent, wanted = set(inputs), set(sig.inputs)
        if sent != wanted:
            raise _Status(
                invalid,
                f"input size does not match signature: {len(sent)}!={len(wanted)} len({{{','.join(sorted(sent))}}}) != "
                f"len({{{','.join(sorted(wanted))}}}). Sent extra: {{{','.join(sorted(sent - wanted))}}}. "
                f"Missing but required: {{{','.join(sorted(wanted - sent))}}}.",
            )
        unknown = [k for k in output_filter if k not in sig.outputs]
        if unknown:
            raise _Status(invalid, f"output tensor alias not found in signature: {unknown[0]} Outputs expected to be in the set {{{','.join(sorted(sig.outputs))}}}.")
        arrays, batch = {}, set()
        for key in sorted(wanted):
            proto, info = inputs[key], sig.inputs[key]
            if proto.dtype != info.dtype:
                raise _Status(invalid, f"Expects arg {key!r} to be {tf.dtypes.as_dtype(info.dtype).name} but {_dtype_name(proto.dtype)} is provided")
            try:
                array = tf.make_ndarray(proto)
            except (TypeError, ValueError) as e:
                raise _Status(invalid, f"cannot read input {key!r}: {e}") from None
            if not info.tensor_shape.unknown_rank:
                dims = [int(d.size) for d in info.tensor_shape.dim]
                if array.ndim != len(dims) or any(d >= 0 and d != s for d, s in zip(dims, array.shape)):
                    raise _Status(invalid, f"input {key!r} must have shape {['?' if d < 0 else d for d in dims]}, got {list(array.shape)}")
            if array.ndim == 0:
                raise _Status(invalid, f"input {key!r} must have a batch dimension, got a scalar")
            batch.add(array.shape[0])
            arrays[key] = array
        if len(batch) > 1:
            raise _Status(invalid, f"inputs have different batch sizes: { {k: a.shape[0] for k, a in arrays.items()} }")
        size = batch.pop() if batch else 0
        if size > self.max_batch_size:
            raise _Status(invalid, f"Batch size {size} is larger than max_batch_size {self.max_batch_size}; send smaller batches")
        try:
            outputs = fn(**{k: tf.constant(a) for k, a in arrays.items()})
        except tf.errors.OpError as e:
            raise _Status(_grpc_code(e.error_code), tf_error_text(e.message)) from None
        keys = list(output_filter) or sorted(outputs)
        return {k: outputs[k].numpy() for k in keys}


def _dtype_name(dtype: int) -> str:
    try:
        return tf.dtypes.as_dtype(dtype).name
    except TypeError:
        return str(dtype)


def _grpc_code(tf_code: int) -> Any:
    # TensorFlow's error codes are the gRPC status codes.
    return next((c for c in grpc.StatusCode if c.value[0] == tf_code), grpc.StatusCode.INTERNAL)


def _typed_tensor_proto(array: np.ndarray) -> Any:
    """A TensorProto with the typed repeated field (float_val, ...), as TF Serving answers."""
    array = np.asarray(array)
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(s)) for s in array.shape])
    proto = tensor_pb2.TensorProto(tensor_shape=shape)
    flat = array.ravel()
    if array.dtype == np.float32:
        proto.dtype = types_pb2.DT_FLOAT
        proto.float_val.extend(flat.tolist())
    elif array.dtype == np.float64:
        proto.dtype = types_pb2.DT_DOUBLE
        proto.double_val.extend(flat.tolist())
    elif array.dtype == np.int32:
        proto.dtype = types_pb2.DT_INT32
        proto.int_val.extend(flat.tolist())
    elif array.dtype == np.int64:
        proto.dtype = types_pb2.DT_INT64
        proto.int64_val.extend(flat.tolist())
    elif array.dtype == object or array.dtype.kind == "S":
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend(bytes(v) for v in flat)
    else:
        return tf.make_tensor_proto(array)
    return proto


class StandInServer:
    """A local STAND-IN for TF Serving's gRPC API (development and tests only).

    Serves the newest SavedModel version under ``export_base`` as
    ``model_name`` with TF Serving's wire behaviour (see the module doc). Not
    a replacement for TF Serving: production uses the official
    ``tensorflow/serving`` image with the configs in ``serving/``.

    Args:
        export_base: str or path. Folder of numbered SavedModel versions.
        model_name: str. Name the server answers to.
        host: str. Address to bind.
        port: int. Port to bind; 0 picks a free one (see :attr:`port`).
        max_batch_size: int. Largest batch a Predict may carry.
        max_message_bytes: int. Largest gRPC message received or sent.
        workers: int. Requests served at once.
        warmup: bool. Replay ``assets.extra/tf_serving_warmup_requests`` at start, as TF Serving does.
        interceptors: sequence of grpc.ServerInterceptor. Passed to ``grpc.server`` (tests inject faults this way).

    Example:
        >>> with StandInServer("exports/street2shop") as server:  # doctest: +SKIP
        ...     client = EmbeddingClient(f"127.0.0.1:{server.port}")
    """

    def __init__(
        self,
        export_base: str | os.PathLike[str],
        *,
        model_name: str = contract.DEFAULT_MODEL_NAME,
        host: str = "127.0.0.1",
        port: int = 0,
        max_batch_size: int = 256,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        workers: int = 4,
        warmup: bool = True,
        interceptors: Sequence[Any] = (),
    ) -> None:
        if not model_name:
            raise ConfigError(f"model_name must be a non-empty string. Received: model_name={model_name!r}")
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ConfigError(f"port must be an int in 0..65535 (0 = any free port). Received: port={port!r}")
        for name, value in (("max_batch_size", max_batch_size), ("max_message_bytes", max_message_bytes), ("workers", workers)):
            check_positive_int(name, value)
        self.export_base = Path(export_base)
        self.model_name = model_name
        self.host = host
        self.max_batch_size = max_batch_size
        self.max_message_bytes = max_message_bytes
        self.workers = workers
        self.warmup = warmup
        self.interceptors = list(interceptors)
        self._requested_port = port
        self._port: int | None = None
        self._server: Any = None
        self.model: _ServedModel | None = None

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._port is None:
            raise ServingError(f"the stand-in server for {self.export_base} is not started; call start() first. Received: port=None")
        return self._port

    @property
    def version(self) -> int:
        """The served version (after :meth:`start`)."""
        if self.model is None:
            raise ServingError(f"the stand-in server for {self.export_base} is not started; call start() first. Received: version=None")
        return self.model.version

    def start(self) -> int:
        """Loads the newest version, replays its warm-up requests and starts listening; returns the port."""
        if self._server is not None:
            return self.port
        versions = contract.export_versions(self.export_base)
        version = max(versions)
        self.model = _ServedModel(versions[version], version, self.max_batch_size)
        if self.warmup:
            self._replay_warmup()
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.server(ThreadPoolExecutor(self.workers, thread_name_prefix="standin-grpc"), options=options, interceptors=self.interceptors or None)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_PredictionServicer(self), server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelServicer(self), server)
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        try:
            port = server.add_insecure_port(f"{host}:{self._requested_port}")
        except RuntimeError as e:
            port, reason = 0, str(e)
        else:
            reason = "bind failed"
        if not port:
            raise ServingError(
                f"the stand-in server cannot listen on {self.host}:{self._requested_port} (the port is taken or the "
                f"address is not local); pick another --port or --host. Received: {reason}"
            )
        server.start()
        self._server, self._port = server, port
        logger.info(
            "stand-in TF Serving (development/tests only) started on %s:%d: model %r version %d from %s",
            self.host, port, self.model_name, version, versions[version],
        )
        return port

    def stop(self, grace: float | None = 1.0) -> None:
        """Stops listening; requests in flight get ``grace`` seconds to finish."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stop(grace).wait()
        logger.info("stand-in TF Serving on %s:%d stopped", self.host, self._port)

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the server stops (or ``timeout`` passes); True if it stopped."""
        server = self._server
        if server is None:
            return True
        return bool(server.wait_for_termination(timeout))

    def __enter__(self) -> StandInServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ request handling

    def _replay_warmup(self) -> None:
        assert self.model is not None
        path = contract.warmup_path(self.model.path)
        if not path.is_file():
            logger.info("no warm-up requests at %s", path)
            return
        count = 0
        try:
            for record in tf.data.TFRecordDataset(str(path)).take(contract.MAX_WARMUP_REQUESTS):
                log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
                if log.WhichOneof("log_type") != "predict_log":
                    continue
                request = log.predict_log.request
                self.model.predict(request.model_spec.signature_name, request.inputs, list(request.output_filter))
                count += 1
        except _Status as e:
            raise ModelError(f"warm-up request {count} of {path} failed: {e.message}. Received: {e.code.name}") from None
        except (tf.errors.OpError, ValueError) as e:
            raise ModelError(f"cannot read the warm-up requests {path}: {tf_error_text(str(e))}. Received: {path}") from None
        logger.info("replayed %d warm-up requests from %s", count, path)

    def _resolve(self, spec: Any) -> _ServedModel:
        """The served model for a request's model_spec, or NOT_FOUND like TF Serving."""
        assert self.model is not None
        if spec.WhichOneof("version_choice") == "version_label":
            raise _Status(grpc.StatusCode.NOT_FOUND, f"Unrecognized servable version label: {spec.version_label}")
        if spec.name != self.model_name:
            wanted = f"Specific({spec.name}, {spec.version.value})" if spec.HasField("version") else f"Latest({spec.name})"
            raise _Status(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {wanted}")
        if spec.HasField("version") and spec.version.value != self.model.version:
            raise _Status(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({spec.name}, {spec.version.value})")
        return self.model

    def _fill_spec(self, out: Any, model: _ServedModel, signature_name: str | None) -> None:
        out.name = self.model_name
        out.version.value = model.version
        if signature_name is not None:
            out.signature_name = signature_name or contract.SERVING_DEFAULT


def _abort(context: Any, e: _Status) -> None:
    context.abort(e.code, e.message)


class _PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """PredictionService: Predict and GetModelMetadata (Classify, Regress, MultiInference answer UNIMPLEMENTED)."""

    def __init__(self, owner: StandInServer) -> None:
        self.owner = owner

    def Predict(self, request: Any, context: Any) -> Any:
        try:
            model = self.owner._resolve(request.model_spec)
            outputs = model.predict(request.model_spec.signature_name, request.inputs, list(request.output_filter))
        except _Status as e:
            logger.debug("Predict answered %s: %s", e.code.name, e.message)
            _abort(context, e)
        response = predict_pb2.PredictResponse()
        self.owner._fill_spec(response.model_spec, model, request.model_spec.signature_name)
        for key, array in outputs.items():
            response.outputs[key].CopyFrom(_typed_tensor_proto(array))
        return response

    def GetModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            model = self.owner._resolve(request.model_spec)
            if not request.metadata_field:
                raise _Status(grpc.StatusCode.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field")
            for field in request.metadata_field:
                if field != "signature_def":
                    raise _Status(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported")
        except _Status as e:
            _abort(context, e)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        self.owner._fill_spec(response.model_spec, model, None)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, sig in model.signature_defs.items():
            signature_map.signature_def[name].CopyFrom(sig)
        response.metadata["signature_def"].Pack(signature_map)
        return response


class _ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """ModelService: GetModelStatus (HandleReloadConfigRequest answers UNIMPLEMENTED)."""

    def __init__(self, owner: StandInServer) -> None:
        self.owner = owner

    def GetModelStatus(self, request: Any, context: Any) -> Any:
        try:
            model = self.owner._resolve(request.model_spec)
        except _Status as e:
            _abort(context, e)
        status = get_model_status_pb2.ModelVersionStatus(version=model.version, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE)
        status.status.error_code = 0  # OK
        return get_model_status_pb2.GetModelStatusResponse(model_version_status=[status])


def serve(
    export_base: str | os.PathLike[str],
    port: int = 8500,
    *,
    host: str = "127.0.0.1",
    model_name: str = contract.DEFAULT_MODEL_NAME,
    max_batch_size: int = 256,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    workers: int = 4,
) -> None:
    """Runs the stand-in server until SIGTERM or SIGINT (Ctrl-C); then stops cleanly and returns.

    For ``street2shop serve EXPORT_BASE --port P``. Development and tests only;
    production runs TF Serving (``serving/README.md``).
    """
    server = StandInServer(
        export_base, model_name=model_name, host=host, port=port,
        max_batch_size=max_batch_size, max_message_bytes=max_message_bytes, workers=workers,
    )
    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        logger.info("received %s, stopping the stand-in server", signal.Signals(signum).name)
        grpc_server = server._server
        if grpc_server is not None:
            grpc_server.stop(1.0)  # non-blocking; wait() below returns once stopped

    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        server.start()
        server.wait()
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
