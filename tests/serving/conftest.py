"""Fixtures: a tiny SavedModel with the street2shop serving contract, and a stand-in server for it.

The model decodes each image (``tf.io.decode_image``, 3 channels), resizes it
to 8x8, flattens it, projects it with a fixed random matrix to D=16 and
L2-normalises: the signatures, inputs and outputs of the contract
(:mod:`street2shop.contract`, names read from it), at a fraction of the cost
of a real export. Its fingerprint is ``tiny-seed-<seed>``.

Set ``STREET2SHOP_TEST_EXPORT_BASE`` to an export base written by
``street2shop export`` to run the same tests against a real export instead.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

SIZE = 8
DIMENSION = 16
MODEL_NAME = "tiny"


def build_tiny_savedmodel(path: Path, seed: int = 0, warmup_model_name: str = MODEL_NAME, with_fingerprint: bool = True) -> Path:
    """Writes the tiny contract model to ``path`` (a version folder) with its card and warm-up file.

    ``with_fingerprint=False`` leaves out the ``model_fingerprint`` output, as
    street2shop exports before 0.2 did.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    from street2shop import contract

    fingerprint = f"tiny-seed-{seed}"
    projection = np.random.default_rng(seed).normal(size=(SIZE * SIZE * 3, DIMENSION)).astype(np.float32)

    class Tiny(tf.Module):
        def __init__(self):
            super().__init__()
            self.projection = tf.Variable(projection, trainable=False, name="projection")

        def _embed(self, pixels):
            flat = tf.reshape(pixels / 255.0, [-1, SIZE * SIZE * 3])
            out = {contract.EMBEDDING: tf.math.l2_normalize(tf.matmul(flat, self.projection), axis=1)}
            if with_fingerprint:
                out[contract.FINGERPRINT] = tf.fill(tf.shape(flat)[:1], fingerprint)
            return out

        @staticmethod
        def _decode(data):
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
            image.set_shape([None, None, 3])
            return tf.cast(image, tf.float32)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=contract.IMAGE_BYTES)])
        def serving_default(self, image_bytes):
            pixels = tf.map_fn(
                lambda b: tf.image.resize(self._decode(b), [SIZE, SIZE]),
                image_bytes,
                fn_output_signature=tf.TensorSpec([SIZE, SIZE, 3], tf.float32),
            )
            return self._embed(pixels)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=contract.IMAGE_BYTES), tf.TensorSpec([None, 4], tf.float32, name=contract.BOXES)])
        def embed_boxes(self, image_bytes, boxes):
            pixels = tf.map_fn(
                lambda args: tf.image.crop_and_resize(self._decode(args[0])[None], args[1][None], [0], [SIZE, SIZE])[0],
                (image_bytes, boxes),
                fn_output_signature=tf.TensorSpec([SIZE, SIZE, 3], tf.float32),
            )
            return self._embed(pixels)

        @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32, name=contract.PIXELS)])
        def embed_pixels(self, pixels):
            return self._embed(pixels)

    module = Tiny()
    tf.saved_model.save(
        module,
        str(path),
        signatures={
            contract.SERVING_DEFAULT: module.serving_default,
            contract.EMBED_BOXES: module.embed_boxes,
            contract.EMBED_PIXELS: module.embed_pixels,
        },
    )
    card = {
        "dimension": DIMENSION,
        "image_size": [SIZE, SIZE],
        "backbone": "tiny-random-projection",
        "fingerprint": fingerprint,
        "version": int(path.name) if path.name.isdigit() else None,
        "package_version": "test",
        "created_at": "2000-01-01T00:00:00Z",
        "signatures": {name: sig.describe() for name, sig in contract.SIGNATURES.items()},
    }
    contract.card_path(path).parent.mkdir(exist_ok=True)
    contract.card_path(path).write_text(json.dumps(card))
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=warmup_model_name, signature_name=contract.SERVING_DEFAULT))
    request.inputs[contract.IMAGE_BYTES].CopyFrom(tf.make_tensor_proto([make_image(5, 7, seed=1)], dtype=tf.string))
    with tf.io.TFRecordWriter(str(contract.warmup_path(path))) as writer:
        log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
        writer.write(log.SerializeToString())
    return path


def make_image(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    """An encoded image of random colours."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def export_base(tmp_path_factory) -> Path:
    """An export base: versions 1 (another projection) and 2 (the served one), plus folders TF Serving ignores."""
    override = os.environ.get("STREET2SHOP_TEST_EXPORT_BASE")
    if override:
        return Path(override)
    base = tmp_path_factory.mktemp("exports") / "tiny"
    build_tiny_savedmodel(base / "1", seed=1)
    build_tiny_savedmodel(base / "2", seed=0)
    (base / ".tmp-3").mkdir()  # an unfinished export
    (base / "notes").mkdir()
    return base


@pytest.fixture(scope="session")
def is_tiny_model() -> bool:
    return not os.environ.get("STREET2SHOP_TEST_EXPORT_BASE")


@pytest.fixture(scope="session")
def served_version(export_base) -> int:
    return max(int(p.name) for p in export_base.iterdir() if p.name.isdigit())


@pytest.fixture(scope="session")
def card(export_base, served_version) -> dict:
    from street2shop import contract

    return contract.read_card(export_base / str(served_version))


@pytest.fixture(scope="session")
def model_name(is_tiny_model) -> str:
    return MODEL_NAME if is_tiny_model else "street2shop"


@pytest.fixture(scope="session")
def loaded_model(export_base, served_version):
    """The served version loaded in this process: the reference the answers are compared with."""
    import tensorflow as tf

    return tf.saved_model.load(str(export_base / str(served_version)))


@pytest.fixture(scope="session")
def server(export_base, model_name):
    """A stand-in server over the export base on a free loopback port (max_batch_size=8)."""
    from street2shop.serving.server import StandInServer

    with StandInServer(export_base, model_name=model_name, port=0, max_batch_size=8, workers=4) as running:
        yield running


@pytest.fixture(scope="session")
def images() -> list[bytes]:
    """Eleven small images of different sizes and formats."""
    formats = ["PNG", "JPEG", "BMP", "GIF"]
    return [make_image(6 + i, 5 + 2 * i, seed=10 + i, fmt=formats[i % len(formats)]) for i in range(11)]
