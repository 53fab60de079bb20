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

The pieces: :mod:`~street2shop.serving.transport` (the channel, gRPC's
retries, what a failed call becomes), :mod:`~street2shop.serving.signatures`
(the served signatures against the contract),
:mod:`~street2shop.serving.codec` (requests, answers, how many images one
request holds); this module puts them together. The ``tensorflow_serving.apis``
protobuf modules import the ``tensorflow`` package, so the client does too.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from street2shop import contract
from street2shop.contract import ModelIdentity
from street2shop.errors import BadRequestError, ConfigError, ModelMismatchError, SignatureMismatchError, check_positive_int
from street2shop.serving import codec
from street2shop.serving.signatures import ServedSignatures
from street2shop.serving.transport import Transport, call_error


class EmbeddingClient:
    """Client for the street2shop embedding model served by TF Serving (gRPC).

    Sends encoded images (and optional boxes) to the model's signatures and
    returns L2-normalised embeddings. Long lists are split into requests of at
    most ``batch_size`` images and ``max_message_bytes`` bytes. Calls that fail
    with UNAVAILABLE or DEADLINE_EXCEEDED are retried by gRPC with exponential
    backoff and jitter, within the call's ``timeout``; every other failure
    raises at once. On the first call the served signature is checked against
    the contract with ``GetModelMetadata``. Every response's model version and
    weights fingerprint are checked: one call never mixes two models
    (ModelMismatchError), and :attr:`identity` is the model of the last
    answer. Safe to use from several threads at once.

    Args:
        target: str. TF Serving's gRPC address, ``HOST:PORT``.
        model_name: str. The model name the server serves the SavedModel as.
        signature: str. Signature used for images without boxes
            (``image_bytes`` in, ``embedding`` out); boxes always go to
            ``embed_boxes``.
        version: int or None. Model version to ask for; None = the server's latest.
        expected_dimension: int or None. Embedding size the caller needs; a
            different served size raises SignatureMismatchError.
        expected_fingerprint: str or None. Refuse answers of any other model
            (the fingerprint of the index or embeddings the vectors must match).
        batch_size: int. Most images per request.
        check_metadata: bool. Check the served signature before the first request.
        **channel: the channel's settings (:class:`~street2shop.serving.transport.Transport`):
            ``timeout`` (float, 30: seconds per call, retries included),
            ``max_retries`` (int, 3; at most 4), ``backoff`` (float, 0.2: the
            first retry's delay), ``max_message_bytes`` (64 MiB), ``tls``
            (bool), ``root_certificates`` (PEM bytes or None).

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
        expected_fingerprint: str | None = None,
        batch_size: int = 32,
        check_metadata: bool = True,
        **channel: Any,
    ) -> None:
        self.transport = Transport(target, **channel)
        if not model_name:
            raise ConfigError(f"model_name must be a non-empty string. Received: model_name={model_name!r}")
        self.model_name = model_name
        self.signature = signature
        self.version = check_positive_int("version", version, allow_none=True)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.check_metadata = check_metadata
        self.expected_fingerprint = expected_fingerprint or None
        self.served = ServedSignatures(f"{self._what(None)} at {target}",
                                       check_positive_int("expected_dimension", expected_dimension, allow_none=True))
        # The model of the last answer (version from model_spec, fingerprint from the model_fingerprint output).
        self.identity: ModelIdentity | None = None
        self.served_version: int | None = None
        self._lock = threading.Lock()

    @property
    def target(self) -> str:
        return self.transport.target

    @property
    def calls(self) -> int:
        """RPCs this client made (each tried up to ``max_retries + 1`` times by gRPC)."""
        return self.transport.calls

    @property
    def max_message_bytes(self) -> int:
        return self.transport.max_message_bytes

    @property
    def expected_dimension(self) -> int | None:
        return self.served.expected_dimension

    # ------------------------------------------------------------------ connection

    def connect(self) -> EmbeddingClient:
        """Checks the served signature (with ``check_metadata``: one ``GetModelMetadata``).

        Called by the first :meth:`embed`; call it yourself to fail early.

        Raises:
            ServerUnavailableError, ModelNotFoundError, SignatureMismatchError.
        """
        if self.check_metadata:
            self._check_signature(self.signature, contract.SIGNATURES[contract.SERVING_DEFAULT])
        return self

    def close(self) -> None:
        """Closes the channel; the client reconnects if used again."""
        self.transport.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingClient(target={self.target!r}, model_name={self.model_name!r}, signature={self.signature!r}, version={self.version})"

    def _what(self, signature: str | None) -> str:
        version = "latest version" if self.version is None else f"version {self.version}"
        return f"model {self.model_name!r} ({version}" + (f", signature {signature!r})" if signature else ")")

    def _call(self, method: str, request: Any, signature: str | None = None) -> Any:
        import grpc

        try:
            return self.transport.call(method, request)
        except grpc.RpcError as e:
            raise call_error(e, method=method, transport=self.transport, what=self._what(signature), batch_size=self.batch_size) from None

    # ------------------------------------------------------------------ metadata

    def _read_signatures(self) -> ServedSignatures:
        if self.served.defs is None:
            from tensorflow_serving.apis import get_model_metadata_pb2

            request = get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec=codec.model_spec(self.model_name, self.version), metadata_field=["signature_def"])
            self.served.read(self._call("GetModelMetadata", request))
            with self._lock:
                self.served_version = self.served.version
        return self.served

    def _check_signature(self, name: str, expected: contract.Signature) -> None:
        self._read_signatures().check(name, expected)

    @property
    def dimension(self) -> int | None:
        """The embedding size D, if known (no RPC): from the checked signature, an answer, or ``expected_dimension``.

        :meth:`fetch_dimension` asks the server when it is not known yet.
        """
        return self.served.dimension if self.served.dimension is not None else self.served.expected_dimension

    def fetch_dimension(self) -> int:
        """The embedding size D; asks the server for the signature (``GetModelMetadata``) if no answer told it yet.

        Raises:
            SignatureMismatchError: the signature has no static size and no ``expected_dimension`` was given.
        """
        if self.dimension is None:
            self.connect()
        if self.dimension is None:  # metadata not checked, or D not static in it
            dimension = self._read_signatures().static_dimension(self.signature)
            if dimension is None:
                raise SignatureMismatchError(
                    f"cannot tell the embedding dimension of {self._what(self.signature)} at {self.target}: the "
                    "signature's output has no static size; pass expected_dimension"
                )
            self.served.note_dimension(dimension, f"signature {self.signature!r}")
        return int(self.dimension)  # type: ignore[arg-type]

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

        request = get_model_status_pb2.GetModelStatusRequest(model_spec=codec.model_spec(self.model_name, self.version))
        response = self._call("GetModelStatus", request)
        state_name = get_model_status_pb2.ModelVersionStatus.State.Name
        return [
            {"version": int(s.version), "state": state_name(s.state), "error": s.status.error_message}
            for s in response.model_version_status
        ]

    # ------------------------------------------------------------------ embedding

    def _predict(self, signature: str, inputs: dict[str, Any], count: int) -> tuple[np.ndarray, ModelIdentity]:
        """One Predict: the vectors and the model that made them (checked against ``version`` and ``expected_fingerprint``)."""
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest(model_spec=codec.model_spec(self.model_name, self.version, signature))
        for key, tensor in inputs.items():
            request.inputs[key].CopyFrom(tensor)
        request.output_filter.extend([contract.EMBEDDING, contract.FINGERPRINT])
        where = f"{self._what(signature)} at {self.target}"
        vectors, fingerprint, version = codec.read_answer(self._call("Predict", request, signature), count, where)
        self.served.note_dimension(int(vectors.shape[1]), "a Predict response")
        if self.version is not None and version != self.version:
            raise ModelMismatchError(f"asked {where} for version {self.version}, and version {version} answered. Received: version={version}")
        identity = ModelIdentity(fingerprint, version, int(vectors.shape[1]))
        if self.expected_fingerprint is not None and identity.fingerprint != self.expected_fingerprint:
            raise ModelMismatchError(
                f"TF Serving at {self.target} answers with {identity}, not the expected model {self.expected_fingerprint} "
                f"(the one the index or the embeddings come from); serve that model, or embed the catalogue again with this one. "
                f"Received: fingerprint={identity.fingerprint!r}"
            )
        with self._lock:
            self.identity, self.served_version = identity, version
        return vectors, identity

    def _one_model(self, answers: list[tuple[np.ndarray, ModelIdentity]]) -> tuple[np.ndarray, ModelIdentity | None]:
        """Joins the answers of one call, refusing a mix of models (TF Serving may switch versions meanwhile)."""
        identities = {identity.fingerprint: identity for _, identity in answers}
        if len(identities) > 1:
            seen = ", ".join(str(identity) for identity in identities.values())
            raise ModelMismatchError(
                f"TF Serving at {self.target} switched models in the middle of one call ({seen}); nothing of it was kept. "
                f"Received: {len(identities)} models"
            )
        if not answers:
            return np.zeros((0, self.fetch_dimension()), np.float32), self.identity
        return np.concatenate([v for v, _ in answers], axis=0), answers[-1][1]

    def _requests(self, sizes: Sequence[int], per_item: int) -> Any:
        return codec.split_requests(sizes, per_item, self.batch_size, self.max_message_bytes)

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
        per_item = codec.PER_ITEM_OVERHEAD + (16 if boxes is not None else 0)
        answers = []
        for start, stop in self._requests([len(image) for image in images], per_item):
            inputs = {contract.IMAGE_BYTES: codec.string_tensor(images[start:stop])}
            if boxes is not None:
                inputs[contract.BOXES] = codec.float_tensor(boxes[start:stop])
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
            self._predict(contract.EMBED_PIXELS, {contract.PIXELS: codec.float_tensor(pixels[start:stop])}, stop - start)
            for start, stop in self._requests([item_bytes] * len(pixels), 0)
        ]
        return self._one_model(answers)[0]
