"""The search service's HTTP API through FastAPI's test client, against a real small export and a real index."""

from __future__ import annotations

import base64
import io
import re
import threading

import numpy as np
import pytest

from tests.service.conftest import make_jpeg, swap_under_load

pytest.importorskip("fastapi")


def street_photos(manifest):
    from street2shop.data.records import read_manifest_csv

    return [r for r in read_manifest_csv(manifest) if r.domain == "street"]


@pytest.fixture
def service(export_dir, index_base):
    from street2shop.service.app import Service
    from street2shop.service.config import ServiceConfig

    return Service(ServiceConfig(index=str(index_base), model=str(export_dir), poll_seconds=3600))


@pytest.fixture
def client(service):
    from fastapi.testclient import TestClient

    from street2shop.service.app import create_app

    with TestClient(create_app(service)) as test_client:
        yield test_client


def reference(export_dir, index_base, data, box=None, k=20, category=None):
    """The same search in process: the library's Searcher over the same model and index."""
    from street2shop.embedders import LocalEmbedder
    from street2shop.index import load_index
    from street2shop.search import Searcher

    with LocalEmbedder(export_dir) as embedder:
        return Searcher(load_index(index_base), embedder).search([data], [box] if box else None, k=k, category=category)[0].results


@pytest.fixture
def search_client(client):
    """The typed client, over the same app (FastAPI's TestClient is an httpx.Client)."""
    from street2shop.service.client import SearchClient

    return SearchClient(http=client, retries=0)


def test_search_answers_what_the_library_answers_with_labels_images_and_versions(search_client, client, export_dir, index_base, labelled_catalogue):
    from street2shop.contract import read_card
    from street2shop.data.records import read_manifest_csv

    record = street_photos(labelled_catalogue)[0]
    data = open(record.image_path, "rb").read()
    answer = search_client.search(record.image_path, box=record.box, k=4)
    expected = reference(export_dir, index_base, data, record.box, k=4)
    assert [(h.rank, h.product_id) for h in answer.results] == [(r.rank, r.product_id) for r in expected]
    np.testing.assert_allclose([h.similarity for h in answer.results], [r.similarity for r in expected], atol=1e-5)
    first = answer.results[0]
    assert first.labels == {"product_name": f"Product {first.product_id}"}
    assert answer.index_version == 1 and answer.model_version == int(export_dir.name)
    assert answer.model_fingerprint == read_card(export_dir)["fingerprint"]
    assert set(answer.timings.model_dump()) == {"embed_ms", "search_ms", "total_ms"}
    shop = [r for r in read_manifest_csv(labelled_catalogue) if r.domain == "shop" and r.product_id == first.product_id][0]
    image = client.get(first.image_url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert search_client.image(first) == image.content == open(shop.image_path, "rb").read()
    assert search_client.image_url(first) == f"http://testserver/v1/catalogue/images/{first.image_id}"
    assert search_client.ready() and search_client.healthy()


def test_json_with_base64_answers_as_the_upload_does(client):
    data = make_jpeg(1)
    upload = client.post("/v1/search", files={"image": ("p.jpg", data, "image/jpeg")}, data={"k": "3"}).json()
    as_json = client.post("/v1/search", json={"image": {"b64": base64.b64encode(data).decode()}, "k": 3}).json()
    assert [h["product_id"] for h in as_json["results"]] == [h["product_id"] for h in upload["results"]]
    assert len(upload["results"]) == 3
    # The three forms of a box the JSON body documents (OpenAPI's anyOf), and the multipart text, give one answer.
    photo = base64.b64encode(data).decode()
    answers = [client.post("/v1/search", json={"image": {"b64": photo}, "k": 5, "box": box}) for box in
               ({"left": 10, "top": 5, "width": 40, "height": 30}, [10, 5, 40, 30], "10,5,40,30")]
    answers.append(client.post("/v1/search", files={"image": ("p.jpg", data, "image/jpeg")}, data={"k": "5", "box": "10,5,40,30"}))
    assert [a.status_code for a in answers] == [200, 200, 200, 200]
    assert answers[0].json()["results"] == answers[1].json()["results"] == answers[2].json()["results"] == answers[3].json()["results"]


def test_category_filter_and_an_unknown_category_is_refused_naming_the_known_ones(search_client, labelled_catalogue):
    from street2shop.data.records import read_manifest_csv
    from street2shop.service.models import ServiceError

    categories = sorted({r.category for r in read_manifest_csv(labelled_catalogue) if r.domain == "shop"})
    answer = search_client.search(make_jpeg(2), category=categories[0])
    assert answer.results and {h.category for h in answer.results} == {categories[0]}
    with pytest.raises(ServiceError) as refused:
        search_client.search(make_jpeg(2), category=categories[0].upper() + "S")
    assert refused.value.status == 422
    assert refused.value.detail == (f"the index being served (version 1) has no category {categories[0].upper() + 'S'!r}; "
                                    f"its categories: {', '.join(repr(c) for c in categories)}")


def bomb() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (40000, 40000)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make, status, reason",
    [
        (lambda: b"this is not an image", 400, "not a JPEG, PNG, GIF or BMP"),
        (lambda: make_jpeg(3, size=(200, 200))[:1500], 400, "cannot read the JPEG image"),  # truncated
        (bomb, 400, "too large|larger than the limit"),
        (lambda: b"", 400, "empty file"),
    ],
)
def test_bad_photos_are_400_naming_the_reason(client, make, status, reason):
    import re

    response = client.post("/v1/search", files={"image": ("p.jpg", make(), "image/jpeg")})
    assert response.status_code == status
    assert re.search(reason, response.json()["detail"]), response.json()
    assert client.get("/healthz").status_code == 200  # and it keeps serving
    assert client.post("/v1/search", files={"image": ("p.jpg", make_jpeg(0), "image/jpeg")}).status_code == 200


@pytest.mark.parametrize(
    "fields, detail",
    [
        ({"k": "0"}, "k must be from 1 to 100"),
        ({"k": "101"}, "k must be from 1 to 100"),
        ({"k": "many"}, "k must be a whole number"),
        ({"box": "1,2,3"}, "box must be"),
        ({"box": "10,10,0,5"}, "width and height"),
        ({"box": "500,500,20,20"}, "lies outside the 80x60 photo"),
    ],
)
def test_bad_parameters_are_422(client, fields, detail):
    response = client.post("/v1/search", files={"image": ("p.jpg", make_jpeg(0), "image/jpeg")}, data=fields)
    assert response.status_code == 422 and detail in response.json()["detail"]


def test_a_box_on_the_edge_is_inside():
    """Up to float error, a box ending on the photo's edge is the box itself (kept, not refused)."""
    from street2shop.data.image import Box

    box = Box(0.6 * 100, 0, 0.4 * 100, 60)  # 60.00000000000001 + 40.0 > 100 in floats
    assert box.clipped(100, 60) is box
    assert Box(60, 0, 41, 60).clipped(100, 60) == Box(60, 0, 40, 60)
    assert Box(100, 0, 5, 5).clipped(100, 60) is None


def test_nothing_is_changed_or_ignored_without_a_word_it_is_refused(client):
    """A box reaching outside the photo, parameters in the query string, unknown or repeated: 422, saying what would do."""
    photo = {"image": ("p.jpg", make_jpeg(0), "image/jpeg")}  # 80 x 60
    # From left 60 only 20 px of the 80 are inside, from top 50 only 10 of the 60.
    response = client.post("/v1/search", files=photo, data={"box": "60,50,40,20"})
    assert response.status_code == 422
    assert response.json()["detail"] == "the box [60, 50, 40, 20] reaches outside the 80x60 photo; the part inside it is [60, 50, 20, 10]"
    assert client.post("/v1/search", files=photo, data={"box": "60,50,20,10"}).status_code == 200  # that part is searched
    response = client.post("/v1/search", files=photo, data={"top_k": "5"})
    assert response.status_code == 422 and response.json()["detail"] == "'top_k' is not a search parameter; a search takes image, k, box, category"
    response = client.post("/v1/search?k=0", files=photo)
    assert response.status_code == 422
    assert response.json()["detail"] == ("POST /v1/search takes k, box and category in its body (multipart fields or JSON), "
                                         "not in the query string. Received: ?k=0")
    response = client.post("/v1/search", files=photo, data={"k": ["3", "5"]})
    assert response.status_code == 422 and response.json()["detail"] == "the field 'k' is given twice; give each once"
    response = client.post("/v1/search", json={"image": {"b64": base64.b64encode(make_jpeg(0)).decode()}, "k": 3, "categroy": "x"})
    assert response.status_code == 422 and "'categroy' is not a search parameter" in response.json()["detail"]


def test_malformed_requests(client):
    assert client.post("/v1/search", content=b"raw", headers={"content-type": "image/jpeg"}).status_code == 415
    assert client.post("/v1/search", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/v1/search", json={"photo": "x"}).status_code == 422
    assert client.post("/v1/search", json={"image": {"b64": "***"}}).status_code == 400
    assert client.post("/v1/search", data={"k": "3"}, files={"other": ("x", b"x")}).status_code == 422


def test_uploads_over_the_limit_are_413(export_dir, index_base):
    from fastapi.testclient import TestClient

    from street2shop.service.app import Service, create_app
    from street2shop.service.config import ServiceConfig

    service = Service(ServiceConfig(index=str(index_base), model=str(export_dir), max_upload_mb=0.002, poll_seconds=3600))  # 2,097 bytes
    with TestClient(create_app(service)) as client:
        big = make_jpeg(4, size=(120, 120))
        assert len(big) > 2100
        response = client.post("/v1/search", files={"image": ("p.jpg", big, "image/jpeg")})
        assert response.status_code == 413 and "limit" in response.json()["detail"]
        # A body sent in chunks (no Content-Length) is refused as it streams in, past the body limit
        # (the base64 of the largest photo and some slack: 2,796 + 65,536 bytes here).
        chunks = iter([b"x" * 4096] * 20)
        response = client.post("/v1/search", content=chunks, headers={"content-type": "application/json"})
        assert response.status_code == 413 and "larger than the limit of 68,332 bytes" in response.json()["detail"]
        small = make_jpeg(5, size=(16, 16))
        assert len(small) < 2000
        assert client.post("/v1/search", files={"image": ("p.jpg", small, "image/jpeg")}).status_code == 200


def test_unknown_image_is_404_and_paths_are_never_taken_from_the_request(client):
    assert client.get("/v1/catalogue/images/0123456789abcdef").status_code == 404
    huge = client.get("/v1/catalogue/images/" + "a" * 60_000)  # the answer does not echo it back whole (httpx sends up to 64 kB)
    assert huge.status_code == 404 and len(huge.content) < 300
    assert huge.json()["detail"] == "no catalogue image 'aaaaaaaaaaaaaaaa... (60,000 characters)' in the index being served (an image id is 16 hex digits)"
    assert client.get("/v1/catalogue/images/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert client.get("/v1/catalogue/images/%2Fetc%2Fpasswd").status_code == 404


def test_health_readiness_metrics_page_and_docs(client, service):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert ready.json()["index"]["version"] == 1
    client.post("/v1/search", files={"image": ("p.jpg", make_jpeg(0), "image/jpeg")})
    client.post("/v1/search", files={"image": ("p.jpg", b"junk", "image/jpeg")})
    metrics = client.get("/metrics").text
    assert 'street2shop_requests_total{route="/v1/search",status="200"} 1.0' in metrics
    assert 'street2shop_requests_total{route="/v1/search",status="400"} 1.0' in metrics
    assert "street2shop_embed_seconds_count 1.0" in metrics and "street2shop_search_seconds_count 1.0" in metrics
    assert "street2shop_index_version 1.0" in metrics and f"street2shop_index_items {len(service.watcher.current)}.0" in metrics
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text and "//cdn" not in page.text and "http" not in page.text.split("<body>")[1]
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200
    docs = client.get("/docs").text  # what the page loads is served from here (its rendering: a test in Chromium)
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs)
    assert assets and all(a.startswith("/") and not a.startswith("//") for a in assets), assets
    assert all(client.get(a).status_code == 200 for a in assets)
    favicon = client.get("/favicon.ico")
    assert favicon.status_code == 200 and favicon.headers["content-type"] == "image/x-icon"
    from PIL import Image

    assert Image.open(io.BytesIO(favicon.content)).format == "ICO"


class NoEmbedder:
    """An embedder for an app that is never started (its OpenAPI document needs none)."""

    def identity(self):
        raise AssertionError("not used")

    def close(self):
        pass


def test_the_openapi_request_bodies_are_the_parsers_models(tmp_path):
    """The documented bodies come from the models that parse them: every documented form is accepted (tests above), every $ref resolves."""
    from fastapi.testclient import TestClient

    from street2shop.service.app import Service, create_app
    from street2shop.service.config import ServiceConfig
    from street2shop.service.models import DEFAULT_K, MAX_K

    app = create_app(Service(ServiceConfig(index=str(tmp_path), model="unused"), embedder=NoEmbedder()))
    spec = TestClient(app).get("/openapi.json").json()  # not started: no lifespan, no model
    assert spec["openapi"].startswith("3.1")
    body = spec["paths"]["/v1/search"]["post"]["requestBody"]
    assert body["required"] is True and set(body["content"]) == {"multipart/form-data", "application/json"}

    def resolve(node):
        ref = node.get("$ref")
        return resolve(spec["components"]["schemas"][ref.rsplit("/", 1)[1]]) if ref else node

    def refs(node):
        if isinstance(node, dict):
            yield from ([node["$ref"]] if "$ref" in node else [])
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(spec):  # no dangling reference
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in spec["components"]["schemas"], ref
    multipart = resolve(body["content"]["multipart/form-data"]["schema"])
    as_json = resolve(body["content"]["application/json"]["schema"])
    for schema in (multipart, as_json):
        assert list(schema["properties"]) == ["image", "k", "box", "category"] and schema["required"] == ["image"]
        assert schema["additionalProperties"] is False  # an unknown field is refused, and documented so
        assert (schema["properties"]["k"]["minimum"], schema["properties"]["k"]["maximum"], schema["properties"]["k"]["default"]) == (1, MAX_K, DEFAULT_K)
    assert multipart["properties"]["image"]["format"] == "binary"
    assert resolve(as_json["properties"]["image"])["properties"]["b64"]["type"] == "string"
    forms = [resolve(f) for f in as_json["properties"]["box"]["anyOf"]]
    assert [f.get("type") for f in forms] == ["array", "object", "string", "null"]
    assert forms[0]["minItems"] == forms[0]["maxItems"] == 4 and list(forms[1]["properties"]) == ["left", "top", "width", "height"]
    answer = resolve(spec["paths"]["/v1/search"]["post"]["responses"]["200"]["content"]["application/json"]["schema"])
    assert {"results", "index_version", "model_version", "model_fingerprint", "timings"} <= set(answer["properties"])


class SlowEmbedder:
    """Wraps an embedder; once armed, each embed waits until released (to hold requests in flight)."""

    def __init__(self, inner):
        self.inner = inner
        self.armed = False
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed(self, images, boxes=None):
        if self.armed:
            self.entered.release()
            self.release.wait(30)
        return self.inner.embed(images, boxes)


def test_at_the_concurrency_limit_more_work_is_turned_away_with_retry_after(export_dir, index_base):
    from fastapi.testclient import TestClient

    from street2shop.embedders import LocalEmbedder
    from street2shop.service.app import Service, create_app
    from street2shop.service.config import ServiceConfig

    slow = SlowEmbedder(LocalEmbedder(export_dir))
    service = Service(ServiceConfig(index=str(index_base), model=str(export_dir), max_concurrency=2, poll_seconds=3600), embedder=slow)
    with TestClient(create_app(service)) as client:
        slow.armed = True  # after the service's warm-up
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(client.post("/v1/search", files={"image": ("p.jpg", make_jpeg(0), "image/jpeg")})))
                   for _ in range(2)]
        for t in threads:
            t.start()
        assert slow.entered.acquire(timeout=30) and slow.entered.acquire(timeout=30)  # both are being embedded
        third = client.post("/v1/search", files={"image": ("p.jpg", make_jpeg(0), "image/jpeg")})
        assert third.status_code == 503 and third.headers["retry-after"] == "1" and "limit of 2" in third.json()["detail"]
        slow.release.set()
        for t in threads:
            t.join(30)
        assert [a.status_code for a in answers] == [200, 200]
        assert "street2shop_rejected_total 1.0" in client.get("/metrics").text


def test_a_new_index_version_is_swapped_in_with_no_request_failing(client, service, embeddings_dir, index_base):
    from street2shop.index.build import build_index

    swap_under_load(service, lambda: build_index([embeddings_dir], index_base, kind="annoy"),
                    lambda: client.post("/v1/search", files={"image": ("p.jpg", make_jpeg(0), "image/jpeg")}, data={"k": "2"}))
    assert client.get("/readyz").json()["index"]["version"] == 2


def test_an_index_of_another_model_is_refused_and_the_old_one_keeps_serving(client, service, embeddings_dir, index_base, tmp_path):
    import json

    import shutil

    from street2shop.index.build import build_index

    other = tmp_path / "other-embeddings"
    shutil.copytree(embeddings_dir, other)
    summary = json.loads((other / "embed.json").read_text())
    (other / "embed.json").write_text(json.dumps({**summary, "fingerprint": "another-model"}))
    build_index([other], index_base, kind="exact")  # version 2, of another model
    assert service.watcher.check() is False
    readiness = client.get("/readyz").json()
    assert readiness["ready"] is True and readiness["index"]["version"] == 1
    refused = readiness["index"]["refused"]["2"]
    assert refused.startswith("index version 2 holds vectors of model another-model")
    assert refused.endswith("Received: fingerprint='another-model'")  # the refused index's model, not the service's
    answer = client.post("/v1/search", files={"image": ("p.jpg", make_jpeg(0), "image/jpeg")})
    assert answer.status_code == 200 and answer.json()["index_version"] == 1
    assert "street2shop_index_refused_total 1.0" in client.get("/metrics").text
    assert service.watcher.check() is False  # not tried again while the model is the same
    assert "street2shop_index_refused_total 1.0" in client.get("/metrics").text


def test_catalogue_updates_reach_the_service_without_a_restart(client, service, export_dir, index_base, labelled_catalogue, tmp_path):
    """An added product is found and a removed one is gone, through the service, on the next poll."""
    from street2shop.data.records import Record, read_manifest_csv
    from street2shop.embed import embed_catalog
    from street2shop.embedders import LocalEmbedder
    from street2shop.index.updates import update_index

    new_photo = tmp_path / "new-product.jpg"
    new_photo.write_bytes(make_jpeg(42, size=(90, 90)))
    with LocalEmbedder(export_dir) as embedder:
        embed_catalog([Record(str(new_photo), "brand-new", "shop", "catalog", None, None, {"product_name": "Brand new"})],
                      embedder, tmp_path / "added")
    shop = [r for r in read_manifest_csv(labelled_catalogue) if r.domain == "shop"]
    removed = shop[0].product_id
    (tmp_path / "remove.txt").write_text(removed + "\n")

    def top(photo: bytes, k: int = 20) -> list[str]:
        answer = client.post("/v1/search", files={"image": ("p.jpg", photo, "image/jpeg")}, data={"k": str(k)})
        assert answer.status_code == 200, answer.text
        return [h["product_id"] for h in answer.json()["results"]]

    removed_photo = open(shop[0].image_path, "rb").read()
    assert top(removed_photo, 1) == [removed] and "brand-new" not in top(new_photo.read_bytes())
    update_index(index_base, add=[tmp_path / "added"], remove=tmp_path / "remove.txt")
    assert service.watcher.check() is True
    found = client.post("/v1/search", files={"image": ("p.jpg", new_photo.read_bytes(), "image/jpeg")}, data={"k": "1"}).json()
    assert found["index_version"] == 2 and found["results"][0]["product_id"] == "brand-new"
    assert found["results"][0]["labels"] == {"product_name": "Brand new"} and found["results"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert client.get(found["results"][0]["image_url"]).content == new_photo.read_bytes()
    assert removed not in top(removed_photo, 100)


def test_a_match_at_a_customer_photo_shows_the_products_catalogue_photo_and_says_so(client, search_client, service, index_base,
                                                                                     labelled_catalogue, tmp_path):
    """Two customer photos added as references: one of a product with a catalogue photo, one of a product with none."""
    from street2shop.data.records import Record, read_manifest_csv
    from street2shop.embed import embed_catalog
    from street2shop.errors import DataError
    from street2shop.index.updates import update_index

    shop = [r for r in read_manifest_csv(labelled_catalogue) if r.domain == "shop"][1]
    photos = {name: tmp_path / f"{name}.jpg" for name in ("review", "orphan")}
    for seed, path in enumerate(photos.values(), 43):
        path.write_bytes(make_jpeg(seed, size=(90, 90)))
    embed_catalog([Record(str(photos["review"]), shop.product_id, "street", "train", shop.category, None, {"stars": "5"}),
                   Record(str(photos["orphan"]), "only-customers", "street", "train", None, None, {"stars": "4"})],
                  service.embedder, tmp_path / "customer-photos")  # the service's own embedder: the export, in process
    update_index(index_base, add=[tmp_path / "customer-photos"])
    assert service.watcher.check() is True

    def first(name):
        answer = client.post("/v1/search", files={"image": ("p.jpg", photos[name].read_bytes(), "image/jpeg")}, data={"k": "3"})
        assert answer.status_code == 200, answer.text
        return answer.json()["results"][0]

    review = first("review")
    assert review["product_id"] == shop.product_id and review["similarity"] == pytest.approx(1.0, abs=1e-5)
    customer_id = review["matched"]["image_id"]
    assert review["matched"] == {"image_id": customer_id, "domain": "street"} and review["image_id"] != customer_id
    # What is shown is the product's catalogue photo, with its labels, not the customer photo's.
    assert client.get(review["image_url"]).content == open(shop.image_path, "rb").read()
    assert review["labels"] == {"product_name": f"Product {shop.product_id}"} and review["category"] == shop.category
    # Customer photos are not served.
    refused = client.get(f"/v1/catalogue/images/{customer_id}")
    assert refused.status_code == 404 and "is a customer photo" in refused.json()["detail"]
    # A product the index holds customer photos of only: no photo to show, and the answer says so.
    orphan = first("orphan")
    assert orphan["product_id"] == "only-customers" and orphan["matched"]["domain"] == "street"
    assert orphan["image_id"] is None and orphan["image_url"] is None and orphan["labels"] == {"stars": "4"}
    # A catalogue photo's match says so too, and the typed client reads both.
    hits = search_client.search(shop.image_path, k=1).results
    assert hits[0].matched.domain == "shop" and hits[0].matched.image_id == hits[0].image_id
    typed = search_client.search(photos["orphan"], k=1).results[0]
    assert typed.image_url is None and search_client.image_url(typed) is None
    with pytest.raises(DataError, match="has no catalogue photo in the index"):
        search_client.image(typed)
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert schema["Matched"]["properties"]["domain"]["enum"] == ["shop", "street"] and "matched" in schema["Hit"]["required"]
