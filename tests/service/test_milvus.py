"""The search service over a Milvus index (Milvus Lite): it follows the alias, a request finishes on its version, updates in
place reach it, and a Milvus that does not answer is a 503 while the old version keeps serving.

The embedder is a stand-in that knows each catalogue photo's vector (the model is not what is tested here), so an answer's
first product is known by hand: the photo's own.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.service.conftest import make_jpeg, swap_under_load

pytest.importorskip("fastapi")
pytest.importorskip("milvus_lite")

from street2shop.contract import ModelIdentity  # noqa: E402
from street2shop.embedders import Embedder  # noqa: E402
from street2shop.items import Item  # noqa: E402

MODEL = ModelIdentity("stand-in", 1, 8)


class KnownPhotos(Embedder):
    """Embeds a photo it was shown with its vector; any other photo as a fixed vector."""

    def __init__(self, known: dict[bytes, np.ndarray]) -> None:
        super().__init__(batch_size=8)
        self.known = known

    @property
    def dimension(self) -> int:
        return 8

    def identity(self) -> ModelIdentity:
        return MODEL

    def _embed_batch(self, images, boxes):
        other = np.ones(8, np.float32) / np.sqrt(8)
        return np.stack([self.known.get(image, other) for image in images]), MODEL


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """12 catalogue photos on disk, their vectors and items, as an embeddings folder; and a Milvus Lite file."""
    from street2shop.embeddings import write_embeddings

    folder = tmp_path_factory.mktemp("milvus-service")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((12, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    photos, items = [], []
    for i in range(12):
        path = folder / f"p{i}.jpg"
        path.write_bytes(make_jpeg(i, size=(40, 40)))
        photos.append(path.read_bytes())
        items.append(Item(f"p{i}", str(path), "bags" if i % 2 else "shoes", {"product_name": f"Product {i}"}))
    write_embeddings(folder / "emb", vectors, items, MODEL, {})
    yield {"folder": folder, "emb": folder / "emb", "photos": photos, "vectors": vectors, "db": str(folder / "catalogue.db")}
    from street2shop.index import milvus

    milvus.release(milvus.parse_target(str(folder / "catalogue.db")))


def service_for(spec: str, shop):
    from street2shop.service.app import Service
    from street2shop.service.config import ServiceConfig

    known = dict(zip(shop["photos"], shop["vectors"]))
    return Service(ServiceConfig(index=spec, model="unused", poll_seconds=3600), embedder=KnownPhotos(known)), known


def post(client, photo: bytes, **fields):
    return client.post("/v1/search", files={"image": ("p.jpg", photo, "image/jpeg")}, data={k: str(v) for k, v in fields.items()})


def test_the_service_follows_the_alias_with_no_request_failing_and_sees_updates_in_place(shop, tmp_path):
    from fastapi.testclient import TestClient

    from street2shop.embeddings import write_embeddings
    from street2shop.index.milvus_write import build_milvus, update_milvus
    from street2shop.service.app import create_app

    spec = f"milvus:{shop['db']}#served"
    build_milvus([shop["emb"]], spec, index_type="FLAT")
    service, known = service_for(spec, shop)
    with TestClient(create_app(service)) as client:
        first = post(client, shop["photos"][3], k=2).json()
        assert first["index_version"] == 1 and [h["product_id"] for h in first["results"]][0] == "p3"
        assert first["results"][0]["labels"] == {"product_name": "Product 3"}
        assert client.get(first["results"][0]["image_url"]).content == shop["photos"][3]
        ready = client.get("/readyz").json()
        assert ready["ready"] is True and ready["index"]["base"] == spec and ready["index"]["version"] == 1

        swap_under_load(service, lambda: build_milvus([shop["emb"]], spec, index_type="FLAT"),
                        lambda: post(client, shop["photos"][5], k=3))

        # An update in place: no new version; the next poll reads the new count and categories.
        new_photo = make_jpeg(99, size=(40, 40))
        (tmp_path / "new.jpg").write_bytes(new_photo)
        vector = np.eye(8, dtype=np.float32)[0]
        known[new_photo] = vector
        write_embeddings(tmp_path / "added", vector[None], [Item("brand-new", str(tmp_path / "new.jpg"), "hats")], MODEL, {})
        (tmp_path / "remove.txt").write_text("p5\n")
        update_milvus(spec, add=[tmp_path / "added"], remove=tmp_path / "remove.txt")
        assert service.watcher.check() is False
        found = post(client, new_photo, k=1, category="hats").json()
        assert found["index_version"] == 2 and found["results"][0]["product_id"] == "brand-new"
        assert "p5" not in {h["product_id"] for h in post(client, shop["photos"][5], k=20).json()["results"]}
        assert client.get("/readyz").json()["index"]["items"] == 12


def test_a_milvus_that_does_not_answer_is_503_and_readyz_says_why(shop):
    from fastapi.testclient import TestClient

    from street2shop.service.app import create_app

    service, _ = service_for("milvus:http://127.0.0.1:1#served", shop)
    with TestClient(create_app(service)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "cannot reach Milvus at http://127.0.0.1:1" in ready.json()["index"]["error"]
        answer = post(client, shop["photos"][0])
        assert answer.status_code == 503 and "no index is loaded yet: cannot reach Milvus" in answer.json()["detail"]


def test_readyz_turns_503_while_a_loaded_milvus_index_stops_answering_and_ready_again_after(shop, monkeypatch):
    from fastapi.testclient import TestClient

    from street2shop.errors import ServerUnavailableError
    from street2shop.index.milvus_write import build_milvus
    from street2shop.service.app import create_app

    spec = f"milvus:{shop['db']}#goes_away"
    build_milvus([shop["emb"]], spec, index_type="FLAT")
    service, _ = service_for(spec, shop)
    with TestClient(create_app(service)) as client:
        assert client.get("/readyz").status_code == 200

        def down(current):
            raise ServerUnavailableError("cannot reach Milvus at http://milvus:19530 (stand-in)")

        with monkeypatch.context() as patched:
            patched.setattr(service.watcher.source, "candidates", down)
            service.watcher.check()
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["problems"] == [
                "the index does not answer: cannot reach Milvus at http://milvus:19530 (stand-in)"]
        service.watcher.check()
        assert client.get("/readyz").status_code == 200
