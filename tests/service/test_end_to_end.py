"""End to end, as processes on loopback: the stand-in TF Serving and the search service, a failure of the former and its recovery.

And the web page in headless Chromium (Debian's chromium, driven by Playwright
pointed at the system browser): a photo uploaded, a box dragged, the results
rendered with their images loaded, and an error shown in the page.
"""

from __future__ import annotations

import json
import os
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


def search(port: int, photo: bytes, k: int = 3, box: str = "") -> tuple[int, dict, dict]:
    body = {"image": {"b64": __import__("base64").b64encode(photo).decode()}, "k": k}
    if box:
        body["box"] = [float(v) for v in box.split(",")]
    return http(f"http://127.0.0.1:{port}/v1/search", json.dumps(body).encode(), {"Content-Type": "application/json"})


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


def reference_top(export_base, index_base, photo: bytes, box):
    from street2shop.embedders import LocalEmbedder
    from street2shop.index import load_index
    from street2shop.search import Searcher

    with LocalEmbedder(export_base) as embedder:
        return [r.product_id for r in Searcher(load_index(index_base), embedder).search([photo], [box] if box else None, k=3)[0].results]


def test_service_over_the_stand_in_fails_with_503_and_recovers_without_a_restart(deployment, synth_dataset, tmp_path):
    from street2shop.data.records import read_manifest_csv

    root, export_base = deployment
    grpc_port, http_port = free_port(), free_port()
    serve_args = ["serve", str(export_base), "--port", str(grpc_port)]
    stand_in = start(serve_args, tmp_path / "stand-in.log")
    service = start(["service", "--index", str(root / "index"), "--server", f"127.0.0.1:{grpc_port}", "--port", str(http_port),
                     "--poll-seconds", "0.5", "--timeout", "5"], tmp_path / "service.log")
    try:
        until(lambda: http(f"http://127.0.0.1:{http_port}/readyz", timeout=10)[0] == 200 if _up(http_port) else False,
              "the service to be ready", tmp_path / "service.log")
        street = [r for r in read_manifest_csv(synth_dataset) if r.domain == "street" and r.split == "val"][0]
        photo = Path(street.image_path).read_bytes()
        box = ",".join(str(v) for v in street.box.as_ltwh())
        status, answer, _ = search(http_port, photo, k=3, box=box)
        assert status == 200, answer
        assert [h["product_id"] for h in answer["results"]] == reference_top(export_base, root / "index", photo, street.box)
        assert answer["model_fingerprint"] == "tiny-seed-0" and answer["model_version"] == 1 and answer["index_version"] == 1

        stand_in.kill()
        stand_in.wait(30)
        status, answer, headers = search(http_port, photo)
        assert status == 503 and "model server does not answer" in answer["detail"] and headers["retry-after"] == "5"
        status, ready = until(lambda: (lambda r: r[:2] if r[0] == 503 else None)(http(f"http://127.0.0.1:{http_port}/readyz")),
                              "/readyz to turn false")
        assert ready["ready"] is False and ready["embedder"]["ok"] is False

        stand_in = start(serve_args, tmp_path / "stand-in.log")  # back, on the same port
        until(lambda: http(f"http://127.0.0.1:{http_port}/readyz")[0] == 200, "recovery", tmp_path / "service.log")
        status, answer, _ = search(http_port, photo, k=3, box=box)
        assert status == 200 and answer["results"][0]["product_id"] == reference_top(export_base, root / "index", photo, street.box)[0]
        assert service.poll() is None  # never restarted
    finally:
        stop(service, stand_in)


def _up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@needs_chromium
def test_the_web_page_in_headless_chromium(deployment, synth_dataset, tmp_path):
    from playwright.sync_api import sync_playwright

    from street2shop.data.records import read_manifest_csv

    root, export_base = deployment
    port = free_port()
    service = start(["service", "--index", str(root / "index"), "--model", str(export_base), "--port", str(port)], tmp_path / "service.log")
    street = [r for r in read_manifest_csv(synth_dataset) if r.domain == "street"][0]
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_text("these are notes, not a photo")
    try:
        until(lambda: _up(port) and http(f"http://127.0.0.1:{port}/readyz")[0] == 200, "the service", tmp_path / "service.log")
        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#file", street.image_path)
            page.wait_for_function("document.getElementById('photo').naturalWidth > 0")
            frame = page.locator("#photo").bounding_box()
            page.mouse.move(frame["x"] + 10, frame["y"] + 10)
            page.mouse.down()
            page.mouse.move(frame["x"] + frame["width"] * 0.8, frame["y"] + frame["height"] * 0.7, steps=5)
            page.mouse.up()
            assert page.locator("#box").is_visible() and "Box: left" in page.locator("#box-text").inner_text()
            page.select_option("#k", "5")
            page.click("#search")
            page.wait_for_selector(".card img")
            page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)")
            cards = page.locator(".card")
            assert cards.count() == 5
            assert "similarity" in cards.first.inner_text()
            assert "index version 1" in page.locator("#status").inner_text()
            assert page.locator("#error").is_hidden()
            page.screenshot(path=str(tmp_path / "page.png"))
            # A file that is no photo: the error shows in the page, not as a blank.
            page.set_input_files("#file", str(not_a_photo))
            page.click("#search")
            page.wait_for_selector("#error:not([hidden])")
            assert "400" in page.locator("#error").inner_text() and "not a JPEG, PNG, GIF or BMP" in page.locator("#error").inner_text()
            browser.close()
    finally:
        stop(service)
