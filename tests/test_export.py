import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from street2shop import contract
from street2shop.contract import read_card, resolve_export
from street2shop.data.image import Box, prepare_image
from street2shop.embedders import LocalEmbedder
from street2shop.errors import ModelError
from street2shop.export import export_tower, load_checkpoint, weights_fingerprint


@pytest.fixture(scope="module")
def tower():
    import keras

    from street2shop.model.tower import build_tower

    keras.utils.set_random_seed(0)
    return build_tower("inception_v3", image_size=(75, 75), embedding_dim=16, weights=None)


@pytest.fixture(scope="module")
def small_tower():
    """For the tests where the backbone does not matter: its exports take seconds, InceptionV3's half a minute."""
    import keras

    from street2shop.model.tower import build_tower

    keras.utils.set_random_seed(0)
    return build_tower("tiny_cnn", image_size=(75, 75), embedding_dim=16, weights=None)


@pytest.fixture(scope="module")
def exported(tower, tmp_path_factory):
    base = tmp_path_factory.mktemp("exports") / "street2shop"
    return export_tower(tower, base)


def jpeg(seed, size=(90, 120)):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def test_signatures_contract(exported):
    model = tf.saved_model.load(str(exported))
    assert set(model.signatures) == {"serving_default", "embed_boxes", "embed_pixels"}
    default = model.signatures["serving_default"]
    (_, inputs) = default.structured_input_signature
    assert set(inputs) == {"image_bytes"}
    assert inputs["image_bytes"].dtype == tf.string and inputs["image_bytes"].shape.as_list() == [None]
    out = default.structured_outputs
    assert set(out) == {"embedding", "model_fingerprint"} and out["embedding"].dtype == tf.float32
    assert out["embedding"].shape.as_list() == [None, 16]
    assert out["model_fingerprint"].dtype == tf.string and out["model_fingerprint"].shape.as_list() == [None]
    (_, inputs) = model.signatures["embed_boxes"].structured_input_signature
    assert inputs["boxes"].shape.as_list() == [None, 4] and inputs["boxes"].dtype == tf.float32
    (_, inputs) = model.signatures["embed_pixels"].structured_input_signature
    assert inputs["pixels"].shape.as_list() == [None, 75, 75, 3]


def test_method_name_is_predict(exported):
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((exported / "saved_model.pb").read_bytes())
    sigs = sm.meta_graphs[0].signature_def
    assert sigs["serving_default"].method_name == "tensorflow/serving/predict"
    assert set(sigs["serving_default"].inputs) == {"image_bytes"}
    assert set(sigs["serving_default"].outputs) == {"embedding", "model_fingerprint"}


def test_reloaded_savedmodel_equals_keras_tower(tower, exported):
    images = [jpeg(s) for s in range(3)]
    pixels = tf.stack([prepare_image(tf.constant(b), image_size=75)[0] for b in images])
    expected = tower(pixels, training=False).numpy()
    model = tf.saved_model.load(str(exported))
    got = model.signatures["serving_default"](image_bytes=tf.constant(images))["embedding"].numpy()
    assert np.abs(got - expected).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    got_pixels = model.signatures["embed_pixels"](pixels=pixels)["embedding"].numpy()
    assert np.abs(got_pixels - expected).max() <= 1e-5


def test_box_signature_crops(tower, exported):
    image = jpeg(7, size=(100, 100))
    box = Box(left=20, top=10, width=70, height=50)  # normalised [0.1, 0.2, 0.6, 0.9] on 100x100
    pixels, _ = prepare_image(tf.constant(image), tf.constant([0.1, 0.2, 0.6, 0.9]), image_size=75)
    expected = tower(pixels[None], training=False).numpy()
    embedder = LocalEmbedder(exported.parent)
    got = embedder.embed([image], boxes=[box]).require()
    assert np.abs(got - expected).max() <= 1e-5
    whole = embedder.embed([image]).require()
    assert np.abs(whole - got).max() > 1e-3  # the crop changed the answer
    outside = embedder.embed([image, image], boxes=[Box(150, 150, 50, 50), None])
    assert "lies outside the 100x100 image" in outside.errors[0] and outside.errors[1] is None
    assert "not a JPEG, PNG, GIF or BMP" in embedder.embed([b"not an image"]).errors[0]


def test_card_and_warmup(tower, exported):
    card = read_card(exported)
    assert card["dimension"] == 16 and card["image_size"] == [75, 75]
    assert card["backbone"] == "inception_v3"
    assert card["fingerprint"] == weights_fingerprint(tower)
    assert set(card["signatures"]) == {"serving_default", "embed_boxes", "embed_pixels"}
    assert card["version"] == int(exported.name)
    from tensorflow_serving.apis import prediction_log_pb2

    records = list(tf.data.TFRecordDataset(str(exported / "assets.extra" / "tf_serving_warmup_requests")))
    assert len(records) >= 2
    model = tf.saved_model.load(str(exported))
    for raw in records:
        log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        request = log.predict_log.request
        assert request.model_spec.signature_name == "serving_default"
        batch = tf.make_ndarray(request.inputs["image_bytes"])
        out = model.signatures["serving_default"](image_bytes=tf.constant(batch))
        assert out["embedding"].shape == (len(batch), 16)  # each warm-up request is a real, valid request
        assert set(out["model_fingerprint"].numpy()) == {card["fingerprint"].encode()}


def test_versions_are_never_overwritten(small_tower, tmp_path):
    base = tmp_path / "exports"
    first = export_tower(small_tower, base)
    with pytest.raises(ModelError, match="already exists"):
        export_tower(small_tower, base, version=int(first.name))
    second = export_tower(small_tower, base)
    assert int(second.name) == int(first.name) + 1
    assert resolve_export(base) == second
    assert not [p for p in base.iterdir() if p.name.startswith(".tmp")]


def test_checkpoint_round_trip_to_export(small_tower, tmp_path):
    from street2shop.model.siamese import build_siamese

    siamese = build_siamese(small_tower)
    path = tmp_path / "model.keras"
    siamese.save(path)
    loaded = load_checkpoint(path)
    version = export_tower(loaded, tmp_path / "exports")
    assert read_card(version)["fingerprint"] == weights_fingerprint(small_tower)
    with pytest.raises(ModelError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "absent.keras")
    (tmp_path / "bad.keras").write_bytes(b"junk")
    with pytest.raises(ModelError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "bad.keras")


def test_card_content_is_json(exported):
    text = (exported / "assets.extra" / "street2shop.json").read_text()
    assert json.loads(text)["package_version"]
    assert contract.card_path(exported).read_text() == text


def test_real_export_served_by_the_stand_in_and_read_by_the_client(small_tower, tmp_path):
    """export_tower → StandInServer → EmbeddingClient over loopback gRPC: the in-process vectors, and the card's identity."""
    from street2shop.embedders import GrpcEmbedder
    from street2shop.serving.server import StandInServer

    exported = export_tower(small_tower, tmp_path / "exports")
    images = [jpeg(s, size=(60 + 10 * s, 90)) for s in range(5)]
    boxes = [None, Box(5, 5, 40, 30), None, Box(0, 0, 90, 60), None]
    local = LocalEmbedder(exported)
    expected = local.embed(images, boxes)
    with StandInServer(exported.parent, port=0, max_batch_size=4) as server:
        with GrpcEmbedder(f"127.0.0.1:{server.port}", batch_size=2) as remote:
            got = remote.embed(images, boxes)
            assert remote.identity() == local.identity()
    assert got.errors == [None] * 5
    np.testing.assert_allclose(got.vectors, expected.vectors, rtol=0, atol=1e-6)
    card = read_card(exported)
    assert got.identity == contract.ModelIdentity(card["fingerprint"], int(exported.name), 16) == expected.identity
    assert card["fingerprint"] == weights_fingerprint(small_tower)


def test_export_with_flip_tta_averages_the_image_and_its_mirror(small_tower, tmp_path):
    # Reference by hand: the tower on the pixels and on their mirror image, mean of the two, unit length.
    images = [jpeg(s) for s in range(3)]
    pixels = tf.stack([prepare_image(tf.constant(b), image_size=75)[0] for b in images]).numpy()
    mean = (small_tower(pixels, training=False).numpy() + small_tower(pixels[:, :, ::-1, :].copy(), training=False).numpy()) / 2
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    path = export_tower(small_tower, tmp_path / "tta", tta="flip")
    card = read_card(path)
    assert card["tta"] == "flip"
    assert card["fingerprint"] not in (weights_fingerprint(small_tower), "")  # other vectors, so another model
    model = tf.saved_model.load(str(path))
    out = model.signatures["serving_default"](image_bytes=tf.constant(images))
    assert np.abs(out["embedding"].numpy() - expected).max() <= 1e-5
    assert {f.decode() for f in out["model_fingerprint"].numpy()} == {card["fingerprint"]}
    got_pixels = model.signatures["embed_pixels"](pixels=tf.constant(pixels))["embedding"].numpy()
    assert np.abs(got_pixels - expected).max() <= 1e-5
    assert LocalEmbedder(path).identity().fingerprint == card["fingerprint"]
    with pytest.raises(Exception, match="tta must be one of none, flip, flip-crops"):
        export_tower(small_tower, tmp_path / "bad", tta="rotate")
