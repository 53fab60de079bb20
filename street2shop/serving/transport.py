"""The gRPC channel to TF Serving: its options, gRPC's own retries, and what a failed call becomes.

Retries are gRPC's (a ``retryPolicy`` in the channel's service config, gRFC
A6): UNAVAILABLE and DEADLINE_EXCEEDED answers are tried again with
exponential backoff and jitter, up to ``max_retries`` times, inside the call's
deadline; every other status fails at once. gRPC keeps a copy of the request
for its retries (``grpc.per_rpc_retry_buffer_size``, sized here to the largest
message), so a request of any allowed size is retried.

The deadline (``timeout``) is of the whole call, its retries included: a
server that does not answer in time is not asked again (gRPC never retries past
the deadline), which keeps a slow server from getting the same work twice.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from street2shop.errors import (
    BadRequestError,
    ConfigError,
    ModelNotFoundError,
    ServerUnavailableError,
    ServingError,
    check_positive_int,
)

MiB = 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB
RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED")
MAX_TRIES = 5  # gRPC's ceiling on retryPolicy.maxAttempts (it clamps larger values)
MIN_BACKOFF = 0.01  # seconds
_SERVICES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")


def retry_service_config(max_retries: int, backoff: float) -> dict[str, Any]:
    """The channel's service config: gRPC's retry policy for TF Serving's services (none for ``max_retries=0``).

    The first retry waits about ``backoff`` seconds (at least 10 ms), each
    later one twice the one before (gRPC adds ±20 % jitter).
    """
    if max_retries == 0:
        return {}
    # gRPC refuses an initialBackoff of 0, and with one of 1 ms a retry against a server that is down sometimes
    # waited for the whole deadline instead of failing (grpcio 1.85); 10 ms never did in 80 tries.
    first = max(backoff, MIN_BACKOFF)
    policy = {
        "maxAttempts": max_retries + 1,
        "initialBackoff": f"{first:.6f}s",
        "maxBackoff": f"{first * 2 ** (max_retries - 1):.6f}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": list(RETRYABLE),
    }
    return {"methodConfig": [{"name": [{"service": s} for s in _SERVICES], "retryPolicy": policy}]}


class Transport:
    """One gRPC channel to TF Serving and the stubs on it, opened on first use; safe to share between threads.

    Args:
        target: str. ``HOST:PORT``.
        timeout: float. Deadline of each call, its retries included, in seconds.
        max_retries: int. Retries after the first try (0..4: gRPC makes at most 5 tries).
        backoff: float. First retry delay in seconds; doubles each retry, with jitter.
        max_message_bytes: int. Largest gRPC message sent or received.
        tls: bool. Use TLS (``grpc.ssl_channel_credentials``).
        root_certificates: bytes or None. PEM root certificates for TLS (None = the system's).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.2,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: bool = False,
        root_certificates: bytes | None = None,
    ) -> None:
        if not isinstance(target, str) or ":" not in target or not target.rsplit(":", 1)[1].isdigit():
            raise ConfigError(f"target must be a gRPC address HOST:PORT, e.g. localhost:8500. Received: target={target!r}")
        if not timeout or timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds. Received: timeout={timeout!r}")
        check_positive_int("max_retries", max_retries, minimum=0)
        if max_retries >= MAX_TRIES:
            raise ConfigError(f"max_retries must be at most {MAX_TRIES - 1} (gRPC makes at most {MAX_TRIES} tries of a call). "
                              f"Received: max_retries={max_retries!r}")
        if backoff < 0:
            raise ConfigError(f"backoff must be >= 0 seconds. Received: backoff={backoff!r}")
        check_positive_int("max_message_bytes", max_message_bytes, minimum=64 * 1024)
        self.target = target
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_message_bytes = max_message_bytes
        self.tls = tls
        self.root_certificates = root_certificates
        self.calls = 0  # RPCs made (gRPC's retries of one are not seen here)
        self._stubs: dict[str, Any] = {}
        self._channel: Any = None
        self._lock = threading.Lock()

    @property
    def tries(self) -> int:
        return self.max_retries + 1

    def options(self) -> list[tuple[str, Any]]:
        """The channel's options: message limits, the retry policy, quick reconnection."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(retry_service_config(self.max_retries, self.backoff))),
            ("grpc.service_config_disable_resolution", 1),  # ours, never one from DNS
            ("grpc.per_rpc_retry_buffer_size", self.max_message_bytes),  # gRPC retries only what it kept (256 KiB by default)
            # Reconnect within seconds once a restarted server is back (gRPC's default backoff grows to 2 minutes).
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]

    def _open(self) -> dict[str, Any]:
        with self._lock:
            if self._channel is None:
                import grpc
                from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

                if self.tls:
                    credentials = grpc.ssl_channel_credentials(root_certificates=self.root_certificates)
                    self._channel = grpc.secure_channel(self.target, credentials, options=self.options())
                else:
                    self._channel = grpc.insecure_channel(self.target, options=self.options())
                predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
                self._stubs = {"Predict": predict.Predict, "GetModelMetadata": predict.GetModelMetadata,
                               "GetModelStatus": model_service_pb2_grpc.ModelServiceStub(self._channel).GetModelStatus}
            return self._stubs

    def call(self, method: str, request: Any) -> Any:
        """One RPC (``Predict``, ``GetModelMetadata`` or ``GetModelStatus``), retried by gRPC; raises ``grpc.RpcError``."""
        stub = self._open()[method]
        with self._lock:
            self.calls += 1
        return stub(request, timeout=self.timeout)

    def close(self) -> None:
        """Closes the channel; the next call opens a new one."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel, self._stubs = None, {}


def call_error(error: Any, *, method: str, transport: Transport, what: str, batch_size: int) -> ServingError:
    """The street2shop error a failed gRPC call (``grpc.RpcError``) becomes, with what to do about it.

    Args:
        error: the grpc.RpcError.
        method: the RPC's name.
        transport: the channel it went over (target, limits, tries).
        what: the model, version and signature asked for, in words.
        batch_size: the client's most images per request (named in the advice).
    """
    import grpc

    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = " ".join(str((error.details() if callable(getattr(error, "details", None)) else "") or code).split())
    details = details if len(details) <= 300 else details[:297] + "..."
    target = transport.target
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServerUnavailableError(
            f"TF Serving at {target} did not answer {method} within timeout={transport.timeout:g}s (retries included); "
            f"raise timeout or lower batch_size (now {batch_size}). Received: {details}"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailableError(
            f"cannot reach TF Serving at {target} after {transport.tries} tries: {details}; "
            "check that the server is running and the address"
        )
    if code == grpc.StatusCode.NOT_FOUND or (
        code == grpc.StatusCode.FAILED_PRECONDITION and "signature" in details.lower()
    ):  # TF Serving answers FAILED_PRECONDITION for an unknown signature key
        return ModelNotFoundError(
            f"TF Serving at {target} does not serve {what}; check the model name (--model-name), "
            f"the version and the signature name. Received: {details}"
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return BadRequestError(
            f"TF Serving at {target} rejected the {method} request to {what}; check that every image is a "
            f"readable JPEG/PNG/GIF/BMP file, boxes are [N, 4] in 0..1, and batch_size={batch_size} is within "
            f"the server's batch limit. Received: {details}"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return BadRequestError(
            f"the {method} request to TF Serving at {target} is too large; lower batch_size (now "
            f"{batch_size}) or max_message_bytes (now {transport.max_message_bytes}), or raise the server's "
            f"message limit. Received: {details}"
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return ServingError(
            f"the server at {target} does not implement TF Serving's {method}; check that the address is "
            f"TF Serving's gRPC port (8500 by default, not the REST port 8501). Received: {details}"
        )
    return ServingError(f"{method} to TF Serving at {target} for {what} failed with {code.name}. Received: {details}")
