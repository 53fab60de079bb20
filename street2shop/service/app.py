"""The search service: an HTTP API and a web page over an embedder (TF Serving, or in process) and an index base.

:class:`Service` does the work (check the photo, embed it, search the index
version current when the request started) and knows its health;
:func:`create_app` puts FastAPI in front of it:

- ``POST /v1/search``: one photo, as a multipart upload (``image`` file, and
  ``k``, ``box``, ``category`` fields) or as JSON ``{"image": {"b64": ...},
  "k": 20, "box": [left, top, width, height], "category": ...}`` (TF Serving's
  REST convention for bytes) → ranked products with their labels, similarity
  and catalogue image URL, the index and model versions, the fingerprint and
  timings;
- ``GET /v1/catalogue/images/{image_id}``: a catalogue image, by the index's
  stable image id only (never by a path taken from a request);
- ``GET /healthz`` (the process lives), ``GET /readyz`` (an index is loaded, the
  embedder answers, and they are the same model; a JSON detail of why not),
  ``GET /metrics`` (Prometheus);
- ``GET /``: the web page (every asset served from here: no CDN); ``/docs``:
  the OpenAPI page, with Swagger UI served from here too.

Errors are JSON ``{"detail": ...}``: 400 an image that cannot be used, 413 too
large, 415 neither multipart nor JSON, 422 bad parameters, 404 unknown image,
503 (with ``Retry-After``) when TF Serving is down or slow, the index and the
served model disagree, or the service is at its concurrency limit (it turns
work away at once rather than queueing it without bound).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from street2shop import __version__
from street2shop.contract import ModelIdentity
from street2shop.data.image import Box, image_format, inspect_image
from street2shop.errors import (
    BadRequestError,
    ImageError,
    ModelMismatchError,
    ServerUnavailableError,
    ServingError,
    Street2ShopError,
)
from street2shop.index.base import image_id as make_image_id
from street2shop.service import models
from street2shop.service.config import ServiceConfig

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MAX_K = 100


class ServiceError(Exception):
    """An answer other than 200: the status, a one-line detail, and headers (Retry-After)."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else {}


class Service:
    """The embedder, the index watcher and the metrics, and one search.

    Args:
        config: ServiceConfig.
        embedder: an Embedder to use instead of the one ``config`` names (tests).
    """

    def __init__(self, config: ServiceConfig, embedder: Any = None) -> None:
        from street2shop.embedders import open_embedder
        from street2shop.service.indexes import IndexWatcher
        from street2shop.service.metrics import ServiceMetrics

        self.config = config
        self.metrics = ServiceMetrics()
        if embedder is None:
            extra = {"timeout": config.timeout, "max_retries": 1, "backoff": 0.1} if config.server else {}
            embedder = open_embedder(config.model or None, config.server or None, model_name=config.model_name,
                                     batch_size=1, max_pixels=config.max_pixels, **extra)
        self.embedder = embedder
        self.watcher = IndexWatcher(config.index, self.embedder.identity, poll_seconds=config.poll_seconds, on_change=self.metrics.index_event)
        self.in_flight = 0  # changed only on the event loop's thread
        self._probe: tuple[float, dict[str, Any]] | None = None
        self._probe_lock = threading.Lock()

    def start(self) -> None:
        """Warms the embedder up (the first call traces the model's graph) and starts watching the index base."""
        from street2shop.data.image import pattern_jpeg

        try:
            self.embedder.embed([pattern_jpeg()])
        except Street2ShopError as e:  # TF Serving may not be up yet: /readyz says so until it is
            logger.warning("the embedder did not answer the warm-up: %s", e)
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()
        self.embedder.close()

    # ------------------------------------------------------------------ searching

    def search(self, data: bytes, box: Box | None = None, k: int = 20, category: str | None = None) -> dict[str, Any]:
        """One photo → the answer of ``POST /v1/search`` (blocking; ServiceError for anything but 200)."""
        started = time.perf_counter()
        index = self.watcher.current  # this request finishes on this version, whatever is swapped in meanwhile
        if index is None:
            raise ServiceError(503, f"no index is loaded yet: {self.watcher.status()['error'] or 'waiting for one'}", retry_after=self.config.poll_seconds)
        if len(data) > self.config.max_upload_bytes:
            raise ServiceError(413, f"the photo is {len(data):,} bytes; the limit is {self.config.max_upload_bytes:,} (--max-upload-mb {self.config.max_upload_mb:g})")
        try:
            info = inspect_image(data, max_pixels=self.config.max_pixels, decode=True)
        except ImageError as e:
            raise ServiceError(400, f"not a usable photo: {e}") from None
        if box is not None and box.pixel_bounds(info.width, info.height) is None:
            raise ServiceError(422, f"the box {list(box.as_ltwh())} lies outside the {info.width}x{info.height} photo")
        try:
            embedded = self.embedder.embed([data], None if box is None else [box])
        except ServerUnavailableError as e:
            raise ServiceError(503, f"the model server does not answer: {e}", retry_after=5) from None
        except BadRequestError as e:
            raise ServiceError(400, f"the model could not read the photo: {e}") from None
        except ServingError as e:
            raise ServiceError(503, f"the model server cannot embed: {e}", retry_after=5) from None
        embed_done = time.perf_counter()
        if embedded.errors[0] is not None:
            raise ServiceError(400, f"the model could not read the photo: {embedded.errors[0]}")
        identity = embedded.identity
        try:
            index.check_model(identity, "the served model")
        except ModelMismatchError as e:
            raise ServiceError(503, f"the served model and the index disagree; waiting for an index of the served model: {e}",
                               retry_after=self.config.poll_seconds) from None
        results = index.query(embedded.vectors[0], k=k, category=category)
        done = time.perf_counter()
        self.metrics.embed_seconds.observe(embed_done - started)
        self.metrics.search_seconds.observe(done - embed_done)
        return {
            "results": [
                {
                    "rank": r.rank,
                    "product_id": r.product_id,
                    "similarity": round(r.similarity, 6),
                    "category": r.category,
                    "labels": dict(r.labels),
                    "image_id": make_image_id(r.image_path or r.product_id),
                    "image_url": f"/v1/catalogue/images/{make_image_id(r.image_path or r.product_id)}",
                }
                for r in results
            ],
            "index_version": index.version,
            "model_version": identity.version if identity else None,
            "model_fingerprint": identity.fingerprint if identity else None,
            "timings": {
                "embed_ms": round(1000 * (embed_done - started), 2),
                "search_ms": round(1000 * (done - embed_done), 2),
                "total_ms": round(1000 * (done - started), 2),
            },
        }

    def catalogue_image(self, image_id: str) -> tuple[str, str]:
        """``(path, media type)`` of a catalogue image of the served index; ServiceError 404 otherwise."""
        index = self.watcher.current
        path = index.image_path(image_id) if index is not None and len(image_id) == 16 else None
        if path is None:
            raise ServiceError(404, f"no catalogue image {image_id!r} in the index being served")
        try:
            with open(path, "rb") as handle:
                head = handle.read(16)
        except OSError as e:
            raise ServiceError(404, f"catalogue image {image_id!r} is in the index but its file cannot be read: {e.strerror or e}") from None
        media = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "BMP": "image/bmp"}.get(image_format(head) or "", "application/octet-stream")
        return path, media

    # ------------------------------------------------------------------ health

    def embedder_status(self) -> dict[str, Any]:
        """Whether the embedder answers, and with which model (one probe per ``readiness_seconds``)."""
        with self._probe_lock:
            now = time.monotonic()
            if self._probe is not None and now - self._probe[0] < self.config.readiness_seconds:
                return self._probe[1]
            try:
                probe = getattr(getattr(self.embedder, "client", None), "probe", None)
                identity: ModelIdentity = probe() if probe is not None else self.embedder.identity()
                status: dict[str, Any] = {"ok": True, "model": identity.to_dict()}
            except Street2ShopError as e:
                status = {"ok": False, "error": str(e)}
            self._probe = (now, status)
            return status

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        embedder = self.embedder_status()
        index = self.watcher.current
        detail: dict[str, Any] = {"index": self.watcher.status(), "embedder": embedder}
        problems = []
        if index is None:
            problems.append("no index is loaded")
        if not embedder["ok"]:
            problems.append("the embedder does not answer")
        elif index is not None and index.identity is not None and embedder["model"]["fingerprint"] != index.identity.fingerprint:
            problems.append(f"the served model {embedder['model']['fingerprint']} is not the index's {index.identity.fingerprint}")
        detail["ready"] = not problems
        detail["problems"] = problems
        return not problems, detail


# --------------------------------------------------------------------------- HTTP


def _parse_k(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        k = value
    elif isinstance(value, str) and value.strip().isdigit():
        k = int(value)
    else:
        raise ServiceError(422, f"k must be a whole number from 1 to {MAX_K}. Received: k={value!r}")
    if not 1 <= k <= MAX_K:
        raise ServiceError(422, f"k must be from 1 to {MAX_K}. Received: k={k}")
    return k


def _parse_box(value: Any) -> Box | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, str):
            return Box.parse(value)
        if isinstance(value, dict):
            return Box(*(float(value[key]) for key in ("left", "top", "width", "height")))
        if isinstance(value, (list, tuple)) and len(value) == 4:
            return Box(*(float(v) for v in value))
    except (ValueError, TypeError, KeyError) as e:
        raise ServiceError(422, f"box must be [left, top, width, height] in pixels of the photo, width and height > 0: {e}") from None
    raise ServiceError(422, f"box must be [left, top, width, height] in pixels of the photo. Received: box={value!r}")


def _route_label(path: str) -> str:
    for prefix in ("/v1/search", "/v1/catalogue/images", "/healthz", "/readyz", "/metrics", "/static", "/docs", "/openapi.json"):
        if path == prefix or path.startswith(prefix + "/"):
            return prefix
    return "/" if path == "/" else "other"


class _TooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware: refuses bodies over the limit (413, also when sent in chunks) and counts requests by route and status."""

    def __init__(self, app: Any, limit: int, metrics: Any) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route, status = _route_label(scope.get("path", "")), {"code": 500}

        async def counted_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and length.isdigit() and int(length) > self.limit:
                await _send_json(counted_send, 413, f"the request body is {int(length):,} bytes; the limit is {self.limit:,}")
                return
            received = 0

            async def limited_receive() -> Any:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.limit:
                        raise _TooLarge()
                return message

            await self.app(scope, limited_receive, counted_send)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()


async def _send_json(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "the photo: JPEG, PNG, GIF or BMP"},
                        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 20},
                        "box": {"type": "string", "description": "LEFT,TOP,WIDTH,HEIGHT in pixels of the photo"},
                        "category": {"type": "string", "description": "search only this category"},
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "object", "required": ["b64"], "properties": {"b64": {"type": "string", "description": "the photo's bytes, base64"}}},
                        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 20},
                        "box": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4, "description": "[left, top, width, height] in pixels"},
                        "category": {"type": "string"},
                    },
                }
            },
        },
    }
}


def create_app(service: Service) -> Any:
    """The FastAPI app around a :class:`Service` (started and stopped with the app)."""

    @asynccontextmanager
    async def lifespan(app: Any):
        await run_in_threadpool(service.start)
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(title="street2shop search", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Find the exact product in the catalogue from a customer's photo.")
    # JSON bodies carry the photo in base64: a third larger than the photo itself.
    app.add_middleware(_Guard, limit=service.config.max_upload_bytes * 4 // 3 + 64 * 1024, metrics=service.metrics)
    app.state.service = service

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, e: ServiceError) -> Any:
        return JSONResponse({"detail": e.detail}, status_code=e.status, headers=e.headers)

    @app.exception_handler(_TooLarge)
    async def too_large(request: Request, e: _TooLarge) -> Any:
        return JSONResponse({"detail": f"the request body is larger than the limit of {service.config.max_upload_bytes * 4 // 3 + 64 * 1024:,} bytes"}, status_code=413)

    @app.post("/v1/search", response_model=models.SearchResponse, openapi_extra=SEARCH_BODY,
              responses={code: {"model": models.ErrorResponse} for code in (400, 413, 415, 422, 503)},
              summary="Find the products in a photo")
    async def search(request: Request) -> Any:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=8)
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise ServiceError(422, "a multipart search needs the photo as a file field named 'image'")
            data = await upload.read()
            fields = {key: form.get(key) for key in ("k", "box", "category")}
        elif content_type.startswith("application/json"):
            try:
                body = await request.json()
            except ValueError:
                raise ServiceError(400, "the body is not valid JSON") from None
            image = body.get("image") if isinstance(body, dict) else None
            if not isinstance(image, dict) or not isinstance(image.get("b64"), str):
                raise ServiceError(422, 'a JSON search needs {"image": {"b64": "<the photo, base64>"}}')
            try:
                data = base64.b64decode(image["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise ServiceError(400, "image.b64 is not valid base64") from None
            fields = {key: body.get(key) for key in ("k", "box", "category")}
        else:
            raise ServiceError(415, f"send the photo as multipart/form-data (field 'image') or as JSON. Received: Content-Type {content_type or 'none'!r}")
        k = _parse_k(20 if fields["k"] in (None, "") else fields["k"])
        box = _parse_box(fields["box"])
        category = fields["category"] or None
        if category is not None and not isinstance(category, str):
            raise ServiceError(422, f"category must be a string. Received: {category!r}")
        if service.in_flight >= service.config.max_concurrency:
            service.metrics.rejected.inc()
            raise ServiceError(503, f"the service is at its limit of {service.config.max_concurrency} searches at once; try again shortly", retry_after=1)
        service.in_flight += 1
        service.metrics.in_flight.inc()
        started = time.perf_counter()
        try:
            answer = await run_in_threadpool(service.search, data, box, k, category)
        finally:
            service.in_flight -= 1
            service.metrics.in_flight.dec()
            service.metrics.total_seconds.observe(time.perf_counter() - started)
        return answer

    @app.get("/v1/catalogue/images/{image_id}", responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": models.ErrorResponse}},
             summary="A catalogue image, by its id in the index")
    async def catalogue_image(image_id: str) -> Any:
        path, media = service.catalogue_image(image_id)
        return FileResponse(path, media_type=media, headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/healthz", summary="The process lives")
    async def healthz() -> Any:
        return {"status": "ok"}

    @app.get("/readyz", summary="An index is loaded and the embedder answers with the index's model")
    async def readyz() -> Any:
        ready, detail = await run_in_threadpool(service.readiness)
        return JSONResponse(detail, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Any:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    swagger = _swagger_assets()
    if swagger is not None:
        app.mount("/docs-assets", StaticFiles(directory=swagger), name="docs-assets")

        @app.get("/docs", include_in_schema=False)
        async def docs() -> Any:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="street2shop search: API",
                                       swagger_js_url="/docs-assets/swagger-ui-bundle.js", swagger_css_url="/docs-assets/swagger-ui.css",
                                       swagger_favicon_url="/docs-assets/favicon-32x32.png")
    return app


def _swagger_assets() -> str | None:
    """Swagger UI's files from the swagger-ui-bundle package (served locally: no CDN), if installed."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    path = getattr(swagger_ui_bundle, "swagger_ui_path", None)
    return str(path) if path and os.path.isdir(path) else None
