"""EmbeddingClient against a real TensorFlow Serving (skipped unless one is given).

Start TF Serving with an exported model (see serving/README.md), then:

    STREET2SHOP_TFS_ADDR=localhost:8500 STREET2SHOP_TFS_MODEL=street2shop \\
        python -m pytest -q tests/serving/test_tfs_integration.py
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

ADDRESS = os.environ.get("STREET2SHOP_TFS_ADDR", "")
MODEL = os.environ.get("STREET2SHOP_TFS_MODEL", "street2shop")

pytestmark = pytest.mark.skipif(not ADDRESS, reason="set STREET2SHOP_TFS_ADDR=host:port to test against a running TF Serving")


def jpeg(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client():
    from street2shop.serving.client import EmbeddingClient

    with EmbeddingClient(ADDRESS, MODEL, timeout=60, backoff=0.5) as c:
        yield c


def test_model_is_available(client):
    states = {s["version"]: s["state"] for s in client.model_status()}
    assert "AVAILABLE" in states.values(), states


def test_embeds_a_jpeg_to_a_unit_vector(client):
    vectors = client.embed([jpeg(64, 48, seed=0)])
    assert vectors.shape == (1, client.dimension) and vectors.dtype == np.float32
    assert abs(float(np.linalg.norm(vectors[0])) - 1.0) < 1e-4


def test_every_answer_names_the_model_and_version(client):
    """The identity comes through real TF Serving: the fingerprint output and the version in model_spec."""
    identity = client.probe()
    assert identity.fingerprint and identity.version is not None
    available = [s["version"] for s in client.model_status() if s["state"] == "AVAILABLE"]
    assert identity.version in available


def test_batch_with_boxes_and_a_bad_image(client):
    from street2shop.errors import BadRequestError

    images = [jpeg(40 + 8 * i, 30 + 4 * i, seed=i) for i in range(3)]
    plain = client.embed(images)
    boxed = client.embed(images, boxes=np.array([[0.0, 0.0, 1.0, 1.0]] * 3, np.float32))
    assert plain.shape == boxed.shape == (3, client.dimension)
    np.testing.assert_allclose(np.linalg.norm(boxed, axis=1), 1.0, atol=1e-4)
    with pytest.raises(BadRequestError):
        client.embed([b"not an image"])
    assert client.embed(images[:1]).shape == (1, client.dimension)  # still serving
