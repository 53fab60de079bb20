"""EmbeddingClient against the stand-in server, over real loopback gRPC."""

from __future__ import annotations

import os
import signal
import struct
import threading
import time

import grpc
import numpy as np
import pytest

from street2shop.errors import (
    BadRequestError,
    ConfigError,
    ModelError,
    ModelNotFoundError,
    ServerUnavailableError,
    ServingError,
    SignatureMismatchError,
)
from street2shop.serving.client import EmbeddingClient
from street2shop.serving.codec import decode_tensor as tensor_proto_to_numpy
from street2shop.contract import export_versions as find_versions
from street2shop.serving.server import StandInServer, serve
from tests.processes import free_port
from tests.serving.conftest import DIMENSION, SIZE, make_image

tf = pytest.importorskip("tensorflow")


def direct(loaded_model, signature: str, batches: list[dict]) -> np.ndarray:
    """Calls the SavedModel in this process, batch by batch."""
    fn = loaded_model.signatures[signature]
    return np.concatenate([fn(**{k: tf.constant(v) for k, v in b.items()})["embedding"].numpy() for b in batches])


def client_for(server, model_name, **kwargs) -> EmbeddingClient:
    kwargs.setdefault("backoff", 0.001)
    return EmbeddingClient(f"127.0.0.1:{server.port}", model_name, **kwargs)


def split(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------------------- round trips


def test_round_trip_equals_direct_call_across_batches(server, model_name, loaded_model, images, card):
    with client_for(server, model_name, batch_size=4) as client:
        got = client.embed(images)
    expected = direct(loaded_model, "serving_default", [{"image_bytes": b} for b in split(images, 4)])
    assert got.shape == (len(images), card["dimension"]) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # different images give different embeddings (the answer is not one row repeated)
    assert np.abs(got[0] - got[1]).max() > 1e-3


def test_round_trip_with_boxes(server, model_name, loaded_model, images):
    rng = np.random.default_rng(3)
    low = rng.uniform(0.0, 0.4, size=(len(images), 2))
    boxes = np.concatenate([low, low + rng.uniform(0.3, 0.6, size=(len(images), 2))], axis=1).astype(np.float32)
    with client_for(server, model_name, batch_size=3) as client:
        got = client.embed(images, boxes=boxes)
        whole = client.embed(images)
    expected = direct(
        loaded_model, "embed_boxes", [{"image_bytes": b, "boxes": x} for b, x in zip(split(images, 3), split(boxes, 3))]
    )
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert np.abs(got - whole).max() > 1e-3  # the boxes were used


def test_round_trip_pixels(server, model_name, loaded_model, card):
    height, width = card["image_size"]
    pixels = np.random.default_rng(4).uniform(0, 255, size=(3, height, width, 3)).astype(np.float32)
    with client_for(server, model_name) as client:
        got = client.embed_pixels(pixels)
    np.testing.assert_allclose(got, direct(loaded_model, "embed_pixels", [{"pixels": pixels}]), rtol=0, atol=1e-6)


def test_tiny_model_matches_hand_computed_embedding(server, model_name, is_tiny_model):
    """Reference written out in numpy: an 8x8 PNG needs no resize, so embedding = l2norm(pixels/255 @ P)."""
    if not is_tiny_model:
        pytest.skip("the hand reference is for the tiny test model")
    from PIL import Image
    import io

    data = make_image(SIZE, SIZE, seed=42, fmt="PNG")
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64).reshape(-1) / 255.0
    projection = np.random.default_rng(0).normal(size=(SIZE * SIZE * 3, DIMENSION)).astype(np.float32)
    raw = pixels @ projection.astype(np.float64)
    expected = raw / np.linalg.norm(raw)
    with client_for(server, model_name) as client:
        got = client.embed([data])
    np.testing.assert_allclose(got[0], expected, rtol=0, atol=1e-5)


def test_empty_list_gives_zero_rows(server, model_name, card):
    with client_for(server, model_name) as client:
        got = client.embed([])
    assert got.shape == (0, card["dimension"]) and got.dtype == np.float32


def test_newest_version_is_served_and_can_be_named(server, model_name, export_base, images, served_version, is_tiny_model):
    with client_for(server, model_name) as latest, client_for(server, model_name, version=served_version) as named:
        a, b = latest.embed(images[:2]), named.embed(images[:2])
        assert latest.served_version == served_version
    np.testing.assert_array_equal(a, b)
    with client_for(server, model_name, version=served_version + 100) as other:
        with pytest.raises(ModelNotFoundError, match=f"version {served_version + 100}"):
            other.embed(images[:1])
    if is_tiny_model:  # the fixture's version 1 is another model: it must not be what answers
        old = tf.saved_model.load(str(export_base / "1")).signatures["serving_default"]
        assert np.abs(old(image_bytes=tf.constant(images[:2]))["embedding"].numpy() - a).max() > 1e-3
        with client_for(server, model_name, version=1) as older, pytest.raises(ModelNotFoundError):
            older.connect()


def test_dimension_makes_no_rpc_and_fetch_dimension_asks_once(server, model_name, card):
    with client_for(server, model_name) as client:
        assert client.dimension is None and client.calls == 0  # nothing known, nothing asked
        assert client.fetch_dimension() == card["dimension"] and client.calls == 1  # GetModelMetadata
        assert client.dimension == card["dimension"] and client.fetch_dimension() == card["dimension"] and client.calls == 1
    with client_for(server, model_name, expected_dimension=card["dimension"]) as client:
        assert client.dimension == card["dimension"] and client.calls == 0


def test_model_status(server, model_name, served_version):
    with client_for(server, model_name) as client:
        assert client.model_status() == [{"version": served_version, "state": "AVAILABLE", "error": ""}]


# ---------------------------------------------------------------------------- errors


def test_bad_image_is_a_bad_request_and_the_server_keeps_serving(server, model_name, images):
    with client_for(server, model_name) as client:
        with pytest.raises(BadRequestError, match="JPEG/PNG/GIF/BMP.*Received: .*image"):
            client.embed([images[0], b"this is not an image", images[1]])
        assert client.embed(images[:2]).shape == (2, client.dimension)
        assert client.calls == 3  # metadata, the failed Predict (not retried), the good Predict


def test_batch_above_server_limit_is_rejected(server, model_name, images):
    # the server fixture accepts at most 8 images per request
    with client_for(server, model_name, batch_size=10) as client:
        with pytest.raises(BadRequestError, match="max_batch_size 8"):
            client.embed(images[:10])
        assert client.embed(images[:8]).shape[0] == 8


def test_message_above_server_limit_is_resource_exhausted(export_base, model_name, loaded_model):
    big = [make_image(90, 90, seed=s) for s in range(3)]  # random noise PNGs barely compress: ~24 KB each
    assert all(20000 < len(b) < 30000 for b in big)  # so 2 fit in 64 KiB and 3 do not
    with StandInServer(export_base, model_name=model_name, max_message_bytes=65536) as small_server:
        with client_for(small_server, model_name) as client, pytest.raises(BadRequestError, match="too large; lower batch_size"):
            client.embed(big)
        # a client told about the limit splits the batch itself and gets every answer
        with client_for(small_server, model_name, max_message_bytes=65536) as client:
            got = client.embed(big)
            assert client.calls == 1 + 2  # metadata, then two Predicts (2 images fit, then 1)
    np.testing.assert_allclose(got, direct(loaded_model, "serving_default", [{"image_bytes": big[:2]}, {"image_bytes": big[2:]}]), atol=1e-6)


def test_single_image_above_client_limit_is_refused_locally(server, model_name):
    with client_for(server, model_name, max_message_bytes=65536) as client:
        client.connect()
        before = client.calls
        with pytest.raises(BadRequestError, match="image 0 alone is"):
            client.embed([b"x" * 70000])
        assert client.calls == before  # nothing was sent


def test_server_not_running_gives_unavailable_after_bounded_retries():
    port = free_port()
    client = EmbeddingClient(f"127.0.0.1:{port}", max_retries=2, backoff=0.001, timeout=5)
    with pytest.raises(ServerUnavailableError, match=rf"cannot reach TF Serving at 127.0.0.1:{port} after 3 tries: .*check that the server is running"):
        client.embed([b"anything"])
    assert client.calls == 1  # one RPC; gRPC made its tries (counted on a server in test_retries_exhausted_is_unavailable)
    client.close()


def test_tls_client_against_a_plaintext_server_is_unavailable(server, model_name):
    client = client_for(server, model_name, tls=True, max_retries=1, timeout=10)
    with pytest.raises(ServerUnavailableError, match="after 2 tries"):
        client.connect()
    assert client.calls == 1
    client.close()


def test_wrong_expected_dimension_is_a_signature_mismatch(server, model_name, card):
    with client_for(server, model_name, expected_dimension=card["dimension"] + 1) as client:
        with pytest.raises(SignatureMismatchError, match=f"dimension {card['dimension']}.*expected_dimension={card['dimension'] + 1}"):
            client.connect()


def test_unknown_signature_is_model_not_found(server, model_name):
    with client_for(server, model_name, signature="no_such_signature") as client:
        with pytest.raises(ModelNotFoundError, match="no signature 'no_such_signature'.*serving_default"):
            client.embed([b"x"])


def test_signature_with_other_inputs_is_a_mismatch(server, model_name):
    with client_for(server, model_name, signature="embed_pixels") as client:
        with pytest.raises(SignatureMismatchError, match=r"expected inputs \['image_bytes'\]"):
            client.connect()


def test_unknown_signature_without_metadata_check_maps_the_predict_error(server, model_name):
    with client_for(server, model_name, signature="no_such_signature", check_metadata=False, expected_dimension=DIMENSION) as client:
        with pytest.raises(ModelNotFoundError, match='signature key "no_such_signature" not found'):
            client.embed([b"x"])


def test_unknown_model_name_is_model_not_found(server):
    with client_for(server, "no-such-model") as client:
        with pytest.raises(ModelNotFoundError, match=r"does not serve model 'no-such-model'.*Latest\(no-such-model\)"):
            client.embed([b"x"])


@pytest.mark.parametrize(
    "kwargs",
    [{"target": "localhost"}, {"target": "host:port"}, {"batch_size": 0}, {"max_retries": -1}, {"max_retries": 5},
     {"timeout": 0}, {"version": 0}],
)
def test_bad_client_arguments(kwargs):
    args = {"target": "127.0.0.1:1", **kwargs}
    with pytest.raises(ConfigError, match="Received"):
        EmbeddingClient(args.pop("target"), **args)


def test_malformed_boxes_and_non_bytes_are_refused(server, model_name):
    with client_for(server, model_name) as client:
        with pytest.raises(BadRequestError, match=r"shape \[2, 4\].*Received: shape=\[2, 3\]"):
            client.embed([b"a", b"b"], boxes=np.zeros((2, 3)))
        with pytest.raises(BadRequestError, match="Received: str"):
            client.embed(["photo.jpg"])


# ---------------------------------------------------------------------------- retries (faults injected on the server)


class FaultInjector(grpc.ServerInterceptor):
    """Fails the next ``failures`` Predict calls with ``code`` (before the servicer runs), or delays them; records batch sizes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.failures = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.predict_calls = 0
        self.batch_sizes: list[int] = []
        self.delay = 0.0

    def arm(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, delay: float = 0.0) -> None:
        """The next ``failures`` calls fail with ``code``; with ``delay``, they answer after ``delay`` seconds instead."""
        with self.lock:
            self.failures, self.code, self.predict_calls, self.batch_sizes, self.delay = failures, code, 0, [], delay

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if not handler_call_details.method.endswith("/Predict"):
            return handler
        with self.lock:
            self.predict_calls += 1
            fail = self.failures > 0
            self.failures -= fail
            code = self.code
        if not fail:

            def record(request, context):
                with self.lock:
                    self.batch_sizes.append(len(request.inputs["image_bytes"].string_val))
                return handler.unary_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                record, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
            )

        delay = self.delay

        def abort(request, context):
            if delay:
                time.sleep(delay)
                return handler.unary_unary(request, context)
            context.abort(code, "injected fault")

        return grpc.unary_unary_rpc_method_handler(
            abort, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


@pytest.fixture(scope="module")
def flaky(export_base, model_name):
    injector = FaultInjector()
    with StandInServer(export_base, model_name=model_name, interceptors=[injector], warmup=False) as running:
        yield running, injector


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_retry_then_success(flaky, model_name, images, loaded_model, code):
    server, injector = flaky
    with client_for(server, model_name, max_retries=3) as client:
        client.connect()
        injector.arm(2, code)
        got = client.embed(images[:2])
    assert injector.predict_calls == 3
    np.testing.assert_allclose(got, direct(loaded_model, "serving_default", [{"image_bytes": images[:2]}]), atol=1e-6)


def test_requests_hold_at_most_batch_size_images(flaky, model_name, images):
    server, injector = flaky
    with client_for(server, model_name, batch_size=4) as client:
        client.connect()
        injector.arm(0)
        client.embed(images)  # 11 images
        assert injector.batch_sizes == [4, 4, 3]
        injector.arm(0)
        client.embed(images[:4], boxes=np.tile(np.float32([0, 0, 1, 1]), (4, 1)))
        assert injector.batch_sizes == [4]


def test_requests_are_split_to_fit_max_message_bytes(flaky, model_name):
    server, injector = flaky
    sizes = [30000, 30000, 20000, 50000, 10000, 10000]  # client budget: 65536 - 4096 header, 16 bytes per image
    blobs = [make_image(4, 4, seed=i) + b"\0" * (n - len(make_image(4, 4, seed=i))) for i, n in enumerate(sizes)]
    assert [len(b) for b in blobs] == sizes
    with client_for(server, model_name, batch_size=32, max_message_bytes=65536) as client:
        client.connect()
        injector.arm(0)
        client.embed(blobs)  # PNG decoders ignore bytes after the image end
    # by hand: 30000+30000 fits (60032 <= 61440), +20000 does not; 20000 alone (+50000 would not);
    # 50000+10000 fits (60032), +10000 does not; 10000
    assert injector.batch_sizes == [2, 1, 2, 1]


def test_retries_exhausted_is_unavailable(flaky, model_name, images):
    server, injector = flaky
    with client_for(server, model_name, max_retries=2) as client:
        client.connect()
        injector.arm(5, grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(ServerUnavailableError, match="after 3 tries: injected fault"):
            client.embed(images[:1])
    assert injector.predict_calls == 3


def test_a_request_larger_than_grpcs_default_retry_buffer_is_retried(flaky, model_name):
    """gRPC retries only a request it kept a copy of (256 KiB by default); the client keeps up to max_message_bytes."""
    server, injector = flaky
    blobs = [make_image(4, 4, seed=i) + b"\0" * 150_000 for i in range(3)]  # 450 KB in one request
    with client_for(server, model_name, max_retries=1) as client:
        client.connect()
        injector.arm(1, grpc.StatusCode.UNAVAILABLE)
        assert client.embed(blobs).shape[0] == 3
    assert injector.predict_calls == 2 and injector.batch_sizes == [3]


def test_the_timeout_covers_the_retries_and_a_late_answer_is_not_asked_again(flaky, model_name, images):
    server, injector = flaky
    with client_for(server, model_name, max_retries=3, timeout=1.0) as client:
        client.connect()
        injector.arm(1, delay=2.0)
        with pytest.raises(ServerUnavailableError, match=r"did not answer Predict within timeout=1s \(retries included\)"):
            client.embed(images[:1])
    assert injector.predict_calls == 1


def test_other_codes_are_not_retried(flaky, model_name, images):
    server, injector = flaky
    with client_for(server, model_name, max_retries=3) as client:
        client.connect()
        injector.arm(1, grpc.StatusCode.INTERNAL)
        with pytest.raises(ServingError, match="failed with INTERNAL. Received: injected fault"):
            client.embed(images[:1])
    assert injector.predict_calls == 1


# ---------------------------------------------------------------------------- concurrency


def test_concurrent_requests_from_several_threads(server, model_name, loaded_model):
    work = {t: [make_image(5 + t, 6 + j, seed=100 * t + j) for j in range(3)] for t in range(6)}
    results, errors = {}, []
    with client_for(server, model_name) as client:
        barrier = threading.Barrier(len(work))

        def run(t):
            try:
                barrier.wait(timeout=30)
                results[t] = client.embed(work[t])
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(t,)) for t in work]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors
    for t, batch in work.items():
        np.testing.assert_allclose(results[t], direct(loaded_model, "serving_default", [{"image_bytes": batch}]), atol=1e-6)


# ---------------------------------------------------------------------------- TensorProto decoding


def _proto(dtype, shape, **fields):
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in shape]
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims))
    for name, value in fields.items():
        if name == "tensor_content":
            proto.tensor_content = value
        else:
            getattr(proto, name).extend(value)
    return proto


def test_decode_float_val():
    got = tensor_proto_to_numpy(_proto(1, [2, 3], float_val=[1, 2, 3, 4, 5, 6.5]))
    np.testing.assert_array_equal(got, np.array([[1, 2, 3], [4, 5, 6.5]], np.float32))
    assert got.dtype == np.float32


def test_decode_tensor_content():
    raw = struct.pack("<6f", 1, -2, 3, 4.25, 5, 6)
    got = tensor_proto_to_numpy(_proto(1, [3, 2], tensor_content=raw))
    np.testing.assert_array_equal(got, np.array([[1, -2], [3, 4.25], [5, 6]], np.float32))


def test_decode_agrees_with_tensorflow_for_both_encodings():
    array = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    packed = tf.make_tensor_proto(array)  # tensor_content
    typed = _proto(1, [4, 5], float_val=array.ravel().tolist())
    assert packed.tensor_content and not typed.tensor_content
    np.testing.assert_array_equal(tensor_proto_to_numpy(packed), array)
    np.testing.assert_array_equal(tensor_proto_to_numpy(typed), tf.make_ndarray(typed))


def test_decode_single_value_fills_the_shape_and_other_dtypes():
    np.testing.assert_array_equal(tensor_proto_to_numpy(_proto(1, [2, 2], float_val=[7])), np.full((2, 2), 7, np.float32))
    np.testing.assert_array_equal(tensor_proto_to_numpy(_proto(2, [2], double_val=[0.1, 0.2])), np.array([0.1, 0.2]))
    np.testing.assert_array_equal(tensor_proto_to_numpy(_proto(9, [3], int64_val=[1, 2, 2**40])), np.array([1, 2, 2**40]))
    half_bits = np.array([1.5, -2.0], np.float16).view(np.uint16).astype(int).tolist()  # 0x3E00, 0xC000
    assert half_bits == [0x3E00, 0xC000]
    np.testing.assert_array_equal(tensor_proto_to_numpy(_proto(19, [2], half_val=half_bits)), np.array([1.5, -2.0], np.float16))


def test_decode_rejects_wrong_size_and_strings():
    with pytest.raises(ServingError, match="holds 3 values but its shape \\[2, 2\\]"):
        tensor_proto_to_numpy(_proto(1, [2, 2], tensor_content=struct.pack("<3f", 1, 2, 3)))
    with pytest.raises(ServingError, match="dtype string"):
        tensor_proto_to_numpy(_proto(7, [1], string_val=[b"a"]))


# ---------------------------------------------------------------------------- the stand-in's wire behaviour (raw stubs)


@pytest.fixture
def stubs(server):
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel), model_service_pb2_grpc.ModelServiceStub(channel)


def _request(model_name, signature="", **inputs):
    from tensorflow_serving.apis import model_pb2, predict_pb2

    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(value)
    return request


def test_response_uses_typed_floats_and_fills_model_spec(stubs, model_name, images, served_version, card):
    predict, _ = stubs
    response = predict.Predict(_request(model_name, image_bytes=tf.make_tensor_proto(images[:2])), timeout=30)
    out = response.outputs["embedding"]
    assert out.tensor_content == b"" and len(out.float_val) == 2 * card["dimension"]
    assert [d.size for d in out.tensor_shape.dim] == [2, card["dimension"]]
    spec = response.model_spec
    assert (spec.name, spec.version.value, spec.signature_name) == (model_name, served_version, "serving_default")


@pytest.mark.parametrize(
    "name, signature, inputs, code, message",
    [
        ("other", "", {"image_bytes": [b"x"]}, grpc.StatusCode.NOT_FOUND, "Servable not found"),
        (None, "nope", {"image_bytes": [b"x"]}, grpc.StatusCode.FAILED_PRECONDITION, 'signature key "nope" not found'),
        (None, "embed_boxes", {"image_bytes": [b"x"]}, grpc.StatusCode.INVALID_ARGUMENT, "Missing but required: {boxes}"),
        (None, "", {"image_bytes": np.zeros(2, np.float32)}, grpc.StatusCode.INVALID_ARGUMENT, "to be string but float32 is provided"),
        (None, "", {"image_bytes": [[b"x"]]}, grpc.StatusCode.INVALID_ARGUMENT, "must have shape"),
        (None, "", {"image_bytes": [b"x"]}, grpc.StatusCode.INVALID_ARGUMENT, "Unknown image file format"),
    ],
)
def test_status_codes(stubs, model_name, name, signature, inputs, code, message):
    predict, _ = stubs
    request = _request(name or model_name, signature, **{k: tf.make_tensor_proto(v) for k, v in inputs.items()})
    with pytest.raises(grpc.RpcError) as info:
        predict.Predict(request, timeout=30)
    assert info.value.code() == code
    assert message in info.value.details()


def test_metadata_lists_the_contract(stubs, model_name, served_version):
    from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2

    predict, _ = stubs
    response = predict.GetModelMetadata(
        get_model_metadata_pb2.GetModelMetadataRequest(model_spec=model_pb2.ModelSpec(name=model_name), metadata_field=["signature_def"]),
        timeout=30,
    )
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    defs = signatures.signature_def
    assert {"serving_default", "embed_boxes", "embed_pixels"} <= set(defs)
    assert set(defs["serving_default"].inputs) == {"image_bytes"}
    assert set(defs["embed_boxes"].inputs) == {"image_bytes", "boxes"}
    assert set(defs["embed_pixels"].inputs) == {"pixels"}
    assert response.model_spec.version.value == served_version


# ---------------------------------------------------------------------------- export base, start/stop, serve()


def test_find_versions_ignores_hidden_and_named_folders(export_base, served_version, is_tiny_model):
    versions = find_versions(export_base)
    assert max(versions) == served_version
    if is_tiny_model:
        assert sorted(versions) == [1, 2]


def test_export_base_errors(tmp_path, export_base, served_version):
    with pytest.raises(ModelError, match="no SavedModel version"):
        find_versions(tmp_path)
    with pytest.raises(ModelError, match="single SavedModel version, not an export base"):
        find_versions(export_base / str(served_version))
    with pytest.raises(ModelError, match="is not a folder"):
        find_versions(tmp_path / "missing")


def test_port_in_use_is_a_clear_error(server, export_base, model_name):
    with pytest.raises(ServingError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        StandInServer(export_base, model_name=model_name, port=server.port, warmup=False).start()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_signal(export_base, model_name, signum, caplog):
    port = free_port()
    original = signal.getsignal(signum)
    seen = {}

    def poke():
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=120)
            seen["handler_installed"] = signal.getsignal(signum) is not original
            with EmbeddingClient(f"127.0.0.1:{port}", model_name) as client:
                seen["status"] = client.model_status()[0]["state"]
        finally:
            # Always stop serve(), even when a step above failed, so the test cannot hang.
            # SIGINT falls back to KeyboardInterrupt if serve() installed no handler.
            os.kill(os.getpid(), signum if seen.get("handler_installed") else signal.SIGINT)

    helper = threading.Thread(target=poke, daemon=True)
    caplog.set_level("INFO", logger="street2shop.serving.server")
    helper.start()
    serve(export_base, port=port, model_name=model_name)
    helper.join(timeout=30)
    assert seen == {"handler_installed": True, "status": "AVAILABLE"}
    assert signal.getsignal(signum) is original
    assert any("stopped" in r.getMessage() for r in caplog.records)
    client = EmbeddingClient(f"127.0.0.1:{port}", model_name, max_retries=0, timeout=5)
    with pytest.raises(ServerUnavailableError):
        client.connect()
    client.close()


# ---------------------------------------------------------------------------- serving/ configs (documentation files)

SERVING_DIR = __import__("pathlib").Path(__file__).resolve().parents[2] / "serving"


def test_models_config_parses_as_model_server_config():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse((SERVING_DIR / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("street2shop", "/models/street2shop", "tensorflow")
    assert model.model_version_policy.latest.num_versions == 1


def test_batching_sizes_are_increasing_and_end_at_max_batch_size():
    import re

    text = (SERVING_DIR / "batching_parameters.txt").read_text()
    lines = [line.split("#")[0] for line in text.splitlines()]
    body = "\n".join(lines)
    max_batch = int(re.search(r"max_batch_size\s*{\s*value:\s*(\d+)\s*}", body).group(1))
    allowed = [int(v) for v in re.findall(r"allowed_batch_sizes:\s*(\d+)", body)]
    assert allowed == sorted(set(allowed)) and allowed[-1] == max_batch
    assert EmbeddingClient("127.0.0.1:1").batch_size <= max_batch  # the client's default fits in one batch


def test_compose_mounts_the_config_files_it_names():
    import re

    compose = (SERVING_DIR.parent / "deploy" / "compose.yaml").read_text()  # the stack's compose file
    named = set(re.findall(r"=/config/([\w.]+)", compose))
    assert named == {"models.config", "batching_parameters.txt", "monitoring.config"}
    assert all((SERVING_DIR / name).is_file() for name in named)
    assert "/models/street2shop" in compose and "8500:8500" in compose


# ---------------------------------------------------------------------------- the model's identity on every answer


def test_every_answer_names_its_model(server, model_name, images, card, served_version):
    from street2shop.contract import ModelIdentity

    with client_for(server, model_name, batch_size=4) as client:
        assert client.identity is None  # nothing answered yet
        vectors, identity = client.predict(images)  # three requests
        assert identity == client.identity == ModelIdentity(card["fingerprint"], served_version, card["dimension"])
        assert client.probe() == identity
        assert vectors.shape == (len(images), card["dimension"])


def test_expected_fingerprint_refuses_another_model(server, model_name, images):
    from street2shop.errors import ModelMismatchError

    with client_for(server, model_name, expected_fingerprint="some-other-model") as client:
        with pytest.raises(ModelMismatchError, match="not the expected model some-other-model"):
            client.embed(images[:1])


def test_a_switch_of_model_between_the_requests_of_one_call_is_refused(export_base, model_name, images, is_tiny_model):
    """TF Serving loads a new version by itself: a call whose requests straddle the switch returns nothing."""
    if not is_tiny_model:
        pytest.skip("needs the fixture's two versions of different weights")
    from street2shop.errors import ModelMismatchError
    from street2shop.serving.server import _ServedModel

    class Switcher(grpc.ServerInterceptor):
        """After the first Predict, the server serves version 1 (other weights) instead of version 2."""

        def __init__(self):
            self.owner = None
            self.predicts = 0

        def intercept_service(self, continuation, details):
            if details.method.endswith("/Predict"):
                self.predicts += 1
                if self.predicts == 2:
                    self.owner.model = _ServedModel(export_base / "1", 1, 8)
            return continuation(details)

    switcher = Switcher()
    with StandInServer(export_base, model_name=model_name, port=0, max_batch_size=8, interceptors=[switcher]) as server:
        switcher.owner = server
        with client_for(server, model_name, batch_size=4) as client:
            with pytest.raises(ModelMismatchError, match="switched models in the middle of one call"):
                client.embed(images)  # 11 images: three requests, the second one answered by version 1
            assert client.identity.version == 1  # the last answer's model, known for what comes next


def test_an_export_without_the_fingerprint_output_is_refused_with_a_hint(tmp_path, images):
    from tests.serving.conftest import build_tiny_savedmodel

    build_tiny_savedmodel(tmp_path / "old" / "1", with_fingerprint=False)
    with StandInServer(tmp_path / "old", model_name="tiny", port=0) as server:
        with client_for(server, "tiny") as client:
            with pytest.raises(SignatureMismatchError, match="model_fingerprint.*export it again"):
                client.embed(images[:1])
