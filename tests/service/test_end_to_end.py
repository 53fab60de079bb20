"""End to end, as processes on loopback: the stand-in TF Serving and the search service, a failure of the former and its recovery.

And the pages in headless Chromium (Debian's chromium, driven by Playwright
pointed at the system browser), as a person sees them: the search page (a
photo uploaded, a box dragged, the results rendered with their images loaded,
errors shown in the page; a real grocery photo searched as a person would),
and the API's documentation as Swagger UI renders it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.browser import launch, needs_chromium
from tests.processes import free_port, stop
from tests.serving.conftest import build_tiny_savedmodel

pytest.importorskip("fastapi")
ROOT = Path(__file__).resolve().parents[2]
# The real photos beside the repository (../shared/data/grocery); STREET2SHOP_TEST_DATA names another folder holding grocery/.
GROCERY = Path(os.environ.get("STREET2SHOP_TEST_DATA", ROOT.parent / "shared" / "data")) / "grocery" / "manifest.csv"
needs_grocery = pytest.mark.skipif(not GROCERY.exists(), reason=f"no grocery photos at {GROCERY}")


def start(args, log: Path) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "street2shop", *args], cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)


def http(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}"), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), {k.lower(): v for k, v in e.headers.items()}


def until(condition, what: str, log: Path | None = None, timeout: float = 180.0):
    """Polls ``condition`` until it is true; the generous timeout only guards against a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def _up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, synth_dataset):
    """A tiny export, the generated catalogue embedded by it, an index base."""
    from street2shop.embed import embed_source
    from street2shop.index.build import build_index

    root = tmp_path_factory.mktemp("e2e")
    export_base = root / "exports"
    build_tiny_savedmodel(export_base / "1", seed=0, warmup_model_name="street2shop")
    embed_source(synth_dataset, root / "embeddings", model=str(export_base))
    build_index([root / "embeddings"], root / "index")
    return root, export_base


def reference_top(export_base, index_base, photo: bytes, box, k: int = 3, category=None):
    """The same search in process: the library's Searcher over the same model and index."""
    from street2shop.embedders import LocalEmbedder
    from street2shop.index import load_index
    from street2shop.search import Searcher

    with LocalEmbedder(export_base) as embedder:
        answer = Searcher(load_index(index_base), embedder).search([photo], [box] if box else None, k=k, category=category)[0]
    return [r.product_id for r in answer.results]


def test_service_over_the_stand_in_fails_with_503_and_recovers_without_a_restart(deployment, synth_dataset, tmp_path):
    from street2shop.data.records import read_manifest_csv
    from street2shop.service.client import SearchClient
    from street2shop.service.models import ServiceError

    root, export_base = deployment
    grpc_port, http_port = free_port(), free_port()
    serve_args = ["serve", str(export_base), "--port", str(grpc_port)]
    stand_in = start(serve_args, tmp_path / "stand-in.log")
    service = start(["service", "--index", str(root / "index"), "--server", f"127.0.0.1:{grpc_port}", "--port", str(http_port),
                     "--poll-seconds", "0.5", "--timeout", "5"], tmp_path / "service.log")
    client = SearchClient(f"http://127.0.0.1:{http_port}", timeout=60, retries=0)
    try:
        until(lambda: _up(http_port) and client.ready(), "the service to be ready", tmp_path / "service.log")
        street = [r for r in read_manifest_csv(synth_dataset) if r.domain == "street" and r.split == "val"][0]
        photo = Path(street.image_path).read_bytes()
        answer = client.search(photo, box=street.box, k=3)
        assert [h.product_id for h in answer.results] == reference_top(export_base, root / "index", photo, street.box)
        assert answer.model_fingerprint == "tiny-seed-0" and answer.model_version == 1 and answer.index_version == 1

        stand_in.kill()
        stand_in.wait(30)
        with pytest.raises(ServiceError) as down:
            client.search(photo)
        assert down.value.status == 503 and "model server does not answer" in down.value.detail and down.value.retry_after == 5
        ready = until(lambda: (lambda r: r if not r["ready"] else None)(client.readiness()), "/readyz to turn false")
        assert ready["embedder"]["ok"] is False

        stand_in = start(serve_args, tmp_path / "stand-in.log")  # back, on the same port
        until(client.ready, "recovery", tmp_path / "service.log")
        # What an app does: the client waits out the 503s (Retry-After) of a service that is coming back.
        answer = SearchClient(f"http://127.0.0.1:{http_port}", timeout=60, retries=5).search(photo, box=street.box, k=3)
        assert answer.results[0].product_id == reference_top(export_base, root / "index", photo, street.box)[0]
        assert service.poll() is None  # never restarted
    finally:
        client.close()
        stop(service, stand_in)


# --------------------------------------------------------------------------- in Chromium


def grocery_catalogue():
    """Grocery's shop photos, each product's supercategory as its category (Fruit, Packages, Vegetables)."""
    from street2shop.data.records import Record, read_manifest_csv

    return [Record(r.image_path, r.product_id, r.domain, r.split, r.metadata["supercategory"], None, {"product_name": r.metadata["product_name"]})
            for r in read_manifest_csv(GROCERY) if r.domain == "shop"]


def customer_photos(synth_dataset):
    """Two generated street photos as customer photos (whole, no box): one of a product of the catalogue, one of a product
    that has no catalogue photo."""
    from street2shop.data.records import Record, read_manifest_csv

    street = [r for r in read_manifest_csv(synth_dataset) if r.domain == "street" and r.split == "val"]
    return [Record(street[1].image_path, street[1].product_id, "street", "train", street[1].category),
            Record(street[2].image_path, "customer-photos-only", "street", "train", street[2].category)]


@pytest.fixture(scope="module")
def page_service(deployment, synth_dataset, tmp_path_factory):
    """One service (the tiny export, embedding in process) for the browser tests: the generated catalogue with two customer
    photos as references, and, where present, grocery's catalogue."""
    from street2shop.data.records import read_manifest_csv, write_manifest
    from street2shop.embed import embed_source
    from street2shop.index.build import build_index

    _, export_base = deployment
    work = tmp_path_factory.mktemp("page")
    records = ([r for r in read_manifest_csv(synth_dataset) if r.domain == "shop"] + customer_photos(synth_dataset)
               + (grocery_catalogue() if GROCERY.exists() else []))
    embed_source(write_manifest(records, work / "catalogue.csv"), work / "embeddings", model=str(export_base), domains="shop,street")
    build_index([work / "embeddings"], work / "index", kind="exact")
    port = free_port()
    log = work / "service.log"
    service = start(["service", "--index", str(work / "index"), "--model", str(export_base), "--port", str(port)], log)
    try:
        until(lambda: _up(port) and http(f"http://127.0.0.1:{port}/readyz")[0] == 200, "the service", log)
        yield {"url": f"http://127.0.0.1:{port}", "index": work / "index", "export": export_base, "records": records}
    finally:
        stop(service)


def open_page(p, url: str):
    """A headless Chromium page at ``url``, and a list that collects every answer of 400 or more and every failed request."""
    browser = launch(p)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    failures: list[str] = []
    page.on("response", lambda r: failures.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.on("requestfailed", lambda r: failures.append(f"failed {r.url}"))
    page.goto(url)
    page.wait_for_load_state("networkidle")
    return browser, page, failures


def choose_photo(page, path) -> dict:
    """Chooses the photo as a person does (the file input), waits until it is shown; its frame on the page."""
    page.set_input_files("#file", str(path))
    page.wait_for_function("document.getElementById('photo').naturalWidth > 0")
    return page.locator("#photo").bounding_box()


def drag(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A mouse drag from ``start`` to ``end``, in page pixels."""
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=5)
    page.mouse.up()


def search_for_cards(page):
    """Clicks Search and waits for the result cards, their catalogue images loaded; the cards."""
    page.click("#search")
    page.wait_for_selector(".card img")
    page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)")
    return page.locator(".card")


@needs_chromium
def test_the_web_page_in_headless_chromium(page_service, synth_dataset, tmp_path):
    from playwright.sync_api import sync_playwright

    from street2shop.data.records import read_manifest_csv

    street = [r for r in read_manifest_csv(synth_dataset) if r.domain == "street"][0]
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_text("these are notes, not a photo")
    with sync_playwright() as p:
        browser, page, failures = open_page(p, page_service["url"] + "/")
        # Before a photo is chosen: no photo frame (and no broken image), and nothing the page asked for was missing (the icon).
        assert page.locator("#stage").is_hidden() and page.locator("#photo").is_hidden() and page.locator("#drop-hint").is_visible()
        assert failures == []
        frame = choose_photo(page, street.image_path)
        drag(page, (frame["x"] + 10, frame["y"] + 10), (frame["x"] + frame["width"] * 0.8, frame["y"] + frame["height"] * 0.7))
        assert page.locator("#box").is_visible() and "Box: left" in page.locator("#box-text").inner_text()
        page.select_option("#k", "5")
        cards = search_for_cards(page)
        assert cards.count() == 5
        assert "similarity" in cards.first.inner_text()
        assert "index version 1" in page.locator("#status").inner_text()
        assert page.locator("#error").is_hidden()
        # A file that is no photo: the error shows in the page, not as a blank.
        page.set_input_files("#file", str(not_a_photo))
        page.click("#search")
        page.wait_for_selector("#error:not([hidden])")
        assert "400" in page.locator("#error").inner_text() and "not a JPEG, PNG, GIF or BMP" in page.locator("#error").inner_text()
        browser.close()


@needs_chromium
def test_a_match_at_a_customer_photo_is_marked_on_the_card_that_shows_the_catalogue_photo(page_service, synth_dataset):
    from playwright.sync_api import sync_playwright

    from street2shop.items import Item

    review, orphan = customer_photos(synth_dataset)
    shop = next(r for r in page_service["records"] if r.domain == "shop" and r.product_id == review.product_id)
    with sync_playwright() as p:
        browser, page, failures = open_page(p, page_service["url"] + "/")
        choose_photo(page, review.image_path)
        page.select_option("#k", "5")
        first = search_for_cards(page).first
        # The product's catalogue photo, loaded; under it, the mark.
        assert first.inner_text().startswith(f"1. {review.product_id}\n{review.product_id} · {review.category} · similarity 1.000")
        assert first.locator(".matched-customer").inner_text() == "matched a customer photo"
        assert first.locator("img").get_attribute("src") == f"/v1/catalogue/images/{Item(shop.product_id, shop.image_path).image_id}"
        assert page.locator(".matched-customer").count() == 1  # the other four matched catalogue photos
        # A product with customer photos only: no photo to show, said in its place.
        choose_photo(page, orphan.image_path)
        page.click("#search")
        page.wait_for_function("document.querySelector('.card .no-photo') !== null")
        first = page.locator(".card").first
        assert first.locator(".no-photo").inner_text() == "no catalogue photo" and first.locator("img").count() == 0
        assert "customer-photos-only" in first.inner_text() and first.locator(".matched-customer").is_visible()
        assert page.locator("#error").is_hidden() and failures == []
        browser.close()


@needs_chromium
@needs_grocery
def test_a_person_searches_a_real_photo_with_a_box_and_a_category(page_service, tmp_path):
    """A grocery street photo chosen, a box dragged on it, Fruit typed, 5 products asked for; then a misspelt category."""
    from playwright.sync_api import sync_playwright

    from street2shop.data.image import Box

    with open(GROCERY, newline="") as handle:
        rows = list(csv.DictReader(handle))
    street = next(r for r in rows if r["domain"] == "street" and r["split"] == "val" and r["supercategory"] == "Fruit")
    assert (street["width"], street["height"]) == ("348", "348")  # shown at its own size: a page pixel is a photo pixel
    photo = GROCERY.parent / street["image_path"]
    categories = sorted({r.category for r in page_service["records"]})  # the catalogue's: grocery's three and the generated ones
    names = {r["product_id"]: r["product_name"] for r in rows if r["domain"] == "shop"}
    with sync_playwright() as p:
        browser, page, failures = open_page(p, page_service["url"] + "/")
        frame = choose_photo(page, photo)
        assert (round(frame["width"]), round(frame["height"])) == (348, 348)
        # A drag from photo pixel (50, 60) to (250, 300), in whole page pixels (as the mouse reports them) wherever the photo
        # sits: from within [50, 51) of the corner to within (249, 250]; whole pixels rounded outwards give x 50-250, y 60-300.
        x, y = frame["x"], frame["y"]
        drag(page, (math.ceil(x + 50), math.ceil(y + 60)), (math.floor(x + 250), math.floor(y + 300)))
        assert page.locator("#box-text").inner_text() == "Box: left 50, top 60, 200 x 240 pixels."
        box = page.locator("#box").bounding_box()
        assert abs(box["x"] - x - 50) < 1.5 and abs(box["width"] - 200) < 1.5  # the red frame is where the mouse went
        page.select_option("#k", "5")
        page.fill("#category", "Fruit")
        cards = search_for_cards(page)
        assert cards.count() == 5
        expected = reference_top(page_service["export"], page_service["index"], photo.read_bytes(), Box(50, 60, 200, 240), k=5, category="Fruit")
        for rank, (card, product) in enumerate(zip(cards.all(), expected), 1):
            text = card.inner_text()
            assert text.startswith(f"{rank}. {names[product]}\n{product} · Fruit · similarity "), text
        status = page.locator("#status").inner_text()
        assert re.fullmatch(r"5 products · index version 1 · model version 1 \(tiny-seed-0\) · embed [\d.]+ ms, search [\d.]+ ms, total [\d.]+ ms",
                            status), status
        assert page.locator("#error").is_hidden() and failures == []
        page.screenshot(path=str(tmp_path / "service.png"))
        # A misspelt category: refused, and the page says which ones there are.
        page.fill("#category", "Fruits")
        page.click("#search")
        page.wait_for_selector("#error:not([hidden])")
        assert page.locator("#error").inner_text() == (
            "The search failed: 422: the index being served (version 1) has no category 'Fruits'; its categories: "
            + ", ".join(repr(c) for c in categories))
        assert page.locator(".card").count() == 0 and page.locator("#status").inner_text() == ""
        browser.close()


@needs_chromium
def test_the_api_documentation_renders_its_operations_and_schemas(page_service, tmp_path):
    """/docs (Swagger UI) lists the operations of the OpenAPI 3.1 document, the search's two bodies and its answer's schema."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser, page, failures = open_page(p, page_service["url"] + "/docs")
        page.wait_for_selector(".opblock-summary", timeout=60_000)
        text = page.locator("body").inner_text()
        assert "Unable to render this definition" not in text
        operations = [" ".join(s.inner_text().split()) for s in page.locator(".opblock-summary").all()]
        for expected in ("POST /v1/search Find the products in a photo", "GET /v1/catalogue/images/{image_id}", "GET /readyz", "GET /healthz",
                         "GET /metrics"):
            assert any(o.startswith(expected) for o in operations), operations
        page.locator(".opblock-post .opblock-summary").first.click()
        search = page.locator(".opblock-post").first
        body = search.locator(".opblock-section-request-body")
        body.wait_for()
        assert {"multipart/form-data", "application/json"} <= set(body.locator("select option").all_inner_texts())  # its two bodies
        # The answer's schema, as the page shows it when asked (the "Schema" tab of the 200 response).
        search.locator(".responses-wrapper").get_by_text("Schema", exact=True).first.click()
        answer = search.locator(".responses-wrapper .model-box").first.inner_text()
        for field in ("results", "index_version", "model_version", "model_fingerprint", "timings"):
            assert field in answer, answer
        models = page.locator("section.models").inner_text()
        for name in ("SearchResponse", "MultipartSearch", "JsonSearch", "BoxObject", "Base64Image", "ErrorResponse"):
            assert name in models, models
        page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
        assert failures == []  # nothing fetched from elsewhere (there is no elsewhere here), nothing missing
        browser.close()
