"""The typed client of the search API against scripted answers (httpx's MockTransport): retries, errors, what it sends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("pydantic")

ROOT = Path(__file__).resolve().parents[2]
ANSWER = {"results": [{"rank": 1, "product_id": "p1", "similarity": 0.5, "category": None, "labels": {"product_name": "One"},
                       "image_id": "0123456789abcdef", "image_url": "/v1/catalogue/images/0123456789abcdef",
                       "matched": {"image_id": "0123456789abcdef", "domain": "shop"}}],
          "index_version": 3, "model_version": 2, "model_fingerprint": "abc", "timings": {"embed_ms": 1, "search_ms": 2, "total_ms": 3}}


def scripted(*answers):
    """A client whose server gives these ``(status, headers, body)`` in turn; the requests and the waits are kept."""
    from street2shop.service.client import SearchClient

    sent, waits, queue = [], [], list(answers)

    def handler(request):
        sent.append(request)
        status, headers, body = queue.pop(0)
        return httpx.Response(status, headers=headers, json=body)

    http = httpx.Client(base_url="http://shop.test:8080", transport=httpx.MockTransport(handler))
    return SearchClient(http=http, retries=2, max_wait=10, sleep=waits.append), sent, waits


def test_a_search_sends_one_multipart_body_and_reads_a_typed_answer(tmp_path):
    from street2shop.data.image import Box

    client, sent, waits = scripted((200, {}, ANSWER))
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff not really a jpeg")
    answer = client.search(photo, box=Box(1, 2, 30.5, 40), k=7, category="bags")
    assert answer.index_version == 3 and answer.results[0].labels["product_name"] == "One" and waits == []
    request = sent[0]
    assert request.method == "POST" and request.url.path == "/v1/search" and not request.url.query
    body = request.read()
    assert request.headers["content-type"].startswith("multipart/form-data")
    for part in (b'name="k"\r\n\r\n7\r\n', b'name="box"\r\n\r\n1,2,30.5,40\r\n', b'name="category"\r\n\r\nbags\r\n',
                 b'name="image"; filename="photo.jpg"', b"\xff\xd8\xff not really a jpeg"):
        assert part in body
    assert client.image_url(answer.results[0]) == "http://shop.test:8080/v1/catalogue/images/0123456789abcdef"


def test_503_is_retried_after_what_retry_after_says_capped_by_max_wait():
    client, sent, waits = scripted((503, {"Retry-After": "2"}, {"detail": "busy"}), (503, {"Retry-After": "60"}, {"detail": "busy"}),
                                   (200, {}, ANSWER))
    assert client.search(b"photo").results[0].product_id == "p1"
    assert len(sent) == 3 and waits == [2.0, 10.0]


def test_503_after_the_retries_and_other_refusals_raise_service_error_with_the_services_detail():
    from street2shop.service.models import ServiceError

    client, sent, waits = scripted(*[(503, {"Retry-After": "1"}, {"detail": "the service is at its limit"})] * 3)
    with pytest.raises(ServiceError) as e:
        client.search(b"photo")
    assert (e.value.status, e.value.detail, e.value.retry_after) == (503, "the service is at its limit", 1.0)
    assert len(sent) == 3 and waits == [1.0, 1.0]

    client, sent, waits = scripted((422, {}, {"detail": "k must be from 1 to 100. Received: k=0"}))
    with pytest.raises(ServiceError) as e:
        client.search(b"photo", k=0)
    assert (e.value.status, e.value.detail) == (422, "k must be from 1 to 100. Received: k=0") and len(sent) == 1 and waits == []


def test_a_dead_service_and_an_unreadable_photo_are_clear_errors(tmp_path):
    from street2shop.errors import DataError, ServerUnavailableError
    from street2shop.service.client import SearchClient

    waits = []
    with SearchClient("http://127.0.0.1:9", timeout=5, retries=2, sleep=waits.append) as client:  # port 9: discard, nobody listens
        with pytest.raises(ServerUnavailableError, match="does not answer"):
            client.search(b"photo")
        assert waits == [0.5, 1.0]
        assert client.ready() is False and client.healthy() is False
        with pytest.raises(DataError, match="cannot read the photo .*missing.jpg: No such file"):
            client.search(tmp_path / "missing.jpg")


def test_the_client_imports_neither_fastapi_nor_tensorflow():
    code = ("import sys; import street2shop.service.client; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'tensorflow', 'keras', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.replace("'", '"')) == []
