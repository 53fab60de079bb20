"""The search service: an HTTP API and a web page over an embedder (TF Serving, or in process) and an index base.

:class:`Service` does the work (check the photo, embed it, search the index
version current when the request started) and knows its health;
:func:`create_app` puts FastAPI in front of it:

- ``POST /v1/search``: one photo, as a multipart upload (``image`` file, and
  ``k``, ``box``, ``category`` fields) or as JSON ``{"image": {"b64": ...},
  "k": 20, "box": [left, top, width, height], "category": ...}`` (TF Serving's
  REST convention for bytes), each body a model of
  :mod:`~street2shop.service.models` that parses it and documents it →
  ranked products with their labels, similarity, catalogue image URL and the
  image matched (a catalogue photo, or a customer photo indexed as a
  reference: the product's catalogue photo is shown either way), the index
  and model versions, the fingerprint and timings;
- ``GET /v1/catalogue/images/{image_id}``: a catalogue image, by the index's
  stable image id only (never by a path taken from a request; customer
  photos are not served);
- ``GET /healthz`` (the process lives), ``GET /readyz`` (an index is loaded, the
  embedder answers, and they are the same model; a JSON detail of why not),
  ``GET /metrics`` (Prometheus);
- ``GET /``: the web page (every asset served from here: no CDN); ``/docs``:
  the OpenAPI page in Swagger UI 5, its files served from here too (the
  ``fastapi-offline`` package).

Errors are JSON ``{"detail": ...}``: 400 an image that cannot be used, 413 too
large, 415 neither multipart nor JSON, 422 bad parameters (and anything the
service would otherwise have to ignore or change: see :func:`read_search`), 404 unknown image,
503 (with ``Retry-After``) when TF Serving is down or slow, the index kept
elsewhere (Milvus) does not answer, the index and the served model disagree,
or the service is at its concurrency limit (it turns
work away at once rather than queueing it without bound).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

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
from street2shop.service.models import ServiceError

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
CATEGORIES_SHOWN = 50  # a refusal of an unknown category lists at most this many of the index's


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
        if category is not None:
            self.check_category(index, category)
        if len(data) > self.config.max_upload_bytes:
            raise ServiceError(413, f"the photo is {len(data):,} bytes; the limit is {self.config.max_upload_bytes:,} (--max-upload-mb {self.config.max_upload_mb:g})")
        try:
            info = inspect_image(data, max_pixels=self.config.max_pixels, decode=True)
        except ImageError as e:
            raise ServiceError(400, f"not a usable photo: {e}") from None
        if box is not None:
            inside = box.clipped(info.width, info.height)
            if inside is None:
                raise ServiceError(422, f"the box {_numbers(box)} lies outside the {info.width}x{info.height} photo")
            if inside is not box:
                raise ServiceError(422, f"the box {_numbers(box)} reaches outside the {info.width}x{info.height} photo; "
                                        f"the part inside it is {_numbers(inside)}")
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
        try:
            results = index.query(embedded.vectors[0], k=k, category=category)
            photos = index.catalogue_photos(r.product_id for r in results if r.domain != "shop")
        except Street2ShopError as e:  # an index kept elsewhere (Milvus) that does not answer
            raise ServiceError(503, f"the index does not answer: {e}", retry_after=self.config.poll_seconds) from None
        done = time.perf_counter()
        self.metrics.embed_seconds.observe(embed_done - started)
        self.metrics.search_seconds.observe(done - embed_done)
        return {
            "results": [_hit(r, photos.get(r.product_id)) for r in results],
            "index_version": index.version,
            "model_version": identity.version if identity else None,
            "model_fingerprint": identity.fingerprint if identity else None,
            "timings": {
                "embed_ms": round(1000 * (embed_done - started), 2),
                "search_ms": round(1000 * (done - embed_done), 2),
                "total_ms": round(1000 * (done - started), 2),
            },
        }

    def check_category(self, index: Any, category: str) -> None:
        """ServiceError 422 unless ``index`` holds items of ``category`` (the refusal lists the categories it has)."""
        known = index.categories()
        if category in known:
            return
        if not known:
            raise ServiceError(422, f"the index being served (version {index.version}) has no categories, so it cannot search one. Received: category={category!r}")
        shown = ", ".join(repr(c) for c in known[:CATEGORIES_SHOWN]) + (f" and {len(known) - CATEGORIES_SHOWN} more" if len(known) > CATEGORIES_SHOWN else "")
        raise ServiceError(422, f"the index being served (version {index.version}) has no category {category!r}; its categories: {shown}")

    def catalogue_image(self, image_id: str) -> tuple[str, str]:
        """``(path, media type)`` of a catalogue image of the served index; ServiceError 404 otherwise."""
        index = self.watcher.current
        try:
            item = index.image_item(image_id) if index is not None and len(image_id) == 16 else None
        except Street2ShopError as e:  # an index kept elsewhere (Milvus) that does not answer
            raise ServiceError(503, f"the index does not answer: {e}", retry_after=self.config.poll_seconds) from None
        shown = image_id if len(image_id) <= 40 else f"{image_id[:16]}... ({len(image_id):,} characters)"
        if item is None or not item.image_path:
            raise ServiceError(404, f"no catalogue image {shown!r} in the index being served (an image id is 16 hex digits)")
        if item.domain != "shop":
            raise ServiceError(404, f"image {shown!r} is a customer photo indexed as a reference; the service serves catalogue photos only")
        path = item.image_path
        try:
            with open(path, "rb") as handle:
                head = handle.read(16)
        except OSError as e:
            raise ServiceError(404, f"catalogue image {shown!r} is in the index but its file cannot be read: {e.strerror or e}") from None
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
        elif self.watcher.unreachable:
            problems.append(f"the index does not answer: {self.watcher.last_error}")
        if not embedder["ok"]:
            problems.append("the embedder does not answer")
        elif index is not None and index.identity is not None and embedder["model"]["fingerprint"] != index.identity.fingerprint:
            problems.append(f"the served model {embedder['model']['fingerprint']} is not the index's {index.identity.fingerprint}")
        detail["ready"] = not problems
        detail["problems"] = problems
        return not problems, detail


def _hit(result: Any, photo: Any) -> dict[str, Any]:
    """A search result as the API answers it: the product's catalogue photo (``photo``, its first) shown when the match was a
    customer photo, and what matched. A product with customer photos only has no image to show (``image_id`` null)."""
    matched = make_image_id(result.image_path or result.product_id)
    shown = result if result.domain == "shop" else photo
    shown_id = matched if result.domain == "shop" else (photo.image_id if photo is not None else None)
    return {
        "rank": result.rank,
        "product_id": result.product_id,
        "similarity": round(result.similarity, 6),
        "category": (shown or result).category,
        "labels": dict((shown or result).labels),
        "image_id": shown_id,
        "image_url": f"/v1/catalogue/images/{shown_id}" if shown_id is not None else None,
        "matched": {"image_id": matched, "domain": result.domain},
    }


def _route_label(path: str) -> str:
    for prefix in ("/v1/search", "/v1/catalogue/images", "/healthz", "/readyz", "/metrics", "/static", "/docs", "/docs-assets",
                   "/openapi.json", "/favicon.ico"):
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


def _numbers(box: Box) -> list[float | int]:
    """A box as ``[left, top, width, height]``, whole numbers shown without ``.0``."""
    return [int(v) if float(v).is_integer() else round(v, 3) for v in box.as_ltwh()]


# --------------------------------------------------------------------------- HTTP


async def read_search(request: Request) -> models.MultipartSearch | models.JsonSearch:
    """``POST /v1/search``'s body, multipart or JSON, validated by its model in :mod:`~street2shop.service.models`.

    The one rule for what a search may not say: nothing is ignored or changed
    without a word. A parameter in the query string (the parameters go in the
    body), an unknown field, or a field given twice is refused with 422, as
    are (later, in :meth:`Service.search`) a box reaching outside the photo and
    a category the index does not have.
    """
    if request.query_params:
        query = request.url.query
        raise ServiceError(422, "POST /v1/search takes k, box and category in its body (multipart fields or JSON), not in the query string. "
                                f"Received: ?{query[:200]}{'...' if len(query) > 200 else ''}")
    content_type = request.headers.get("content-type", "")
    model = models.SEARCH_BODIES.get(content_type.split(";")[0].strip().lower())
    if model is None:
        raise ServiceError(415, f"send the photo as multipart/form-data (field 'image') or as JSON. Received: Content-Type {content_type or 'none'!r}")
    if model is models.MultipartSearch:
        form = await request.form(max_files=1, max_fields=8)
        values: Any = {}
        for key, value in form.multi_items():
            if key in values:
                raise ServiceError(422, f"the field {key!r} is given twice; give each once")
            values[key] = await value.read() if isinstance(value, UploadFile) else value
    else:
        try:
            values = await request.json()
        except ValueError:
            raise ServiceError(400, "the body is not valid JSON") from None
    return models.validate_search(model, values)


def create_app(service: Service) -> Any:
    """The FastAPI app around a :class:`Service` (started and stopped with the app)."""
    from fastapi_offline import FastAPIOffline

    @asynccontextmanager
    async def lifespan(app: Any):
        await run_in_threadpool(service.start)
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    # /docs: Swagger UI 5 (it reads OpenAPI 3.1), its files served from /docs-assets: no CDN. Not ReDoc: its page
    # fetches a logo from Redocly's CDN.
    app = FastAPIOffline(title="street2shop search", version=__version__, lifespan=lifespan, static_url="/docs-assets", redoc_url=None,
                         favicon_url="/favicon.ico", description="Find the exact product in the catalogue from a customer's photo.")
    # JSON bodies carry the photo in base64: a third larger than the photo itself.
    app.add_middleware(_Guard, limit=service.config.max_upload_bytes * 4 // 3 + 64 * 1024, metrics=service.metrics)
    app.state.service = service

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, e: ServiceError) -> Any:
        return JSONResponse({"detail": e.detail}, status_code=e.status, headers=e.headers)

    @app.exception_handler(_TooLarge)
    async def too_large(request: Request, e: _TooLarge) -> Any:
        return JSONResponse({"detail": f"the request body is larger than the limit of {service.config.max_upload_bytes * 4 // 3 + 64 * 1024:,} bytes"}, status_code=413)

    request_body, request_schemas = models.request_schemas()

    @app.post("/v1/search", response_model=models.SearchResponse, openapi_extra={"requestBody": request_body},
              responses={code: {"model": models.ErrorResponse} for code in (400, 413, 415, 422, 503)},
              summary="Find the products in a photo")
    async def search(query: Annotated[models.MultipartSearch | models.JsonSearch, Depends(read_search)]) -> Any:
        """One photo, as a multipart upload or as JSON (two bodies, the same values), and optionally a box and a category.

        Nothing in a search is ignored or changed without a word: a box reaching outside the photo, a category the index
        does not have, an unknown field or a parameter in the query string is refused with 422, saying what would be accepted.
        """
        if service.in_flight >= service.config.max_concurrency:
            service.metrics.rejected.inc()
            raise ServiceError(503, f"the service is at its limit of {service.config.max_concurrency} searches at once; try again shortly", retry_after=1)
        service.in_flight += 1
        service.metrics.in_flight.inc()
        started = time.perf_counter()
        try:
            answer = await run_in_threadpool(service.search, query.image, query.box, query.k, query.category)
        finally:
            service.in_flight -= 1
            service.metrics.in_flight.dec()
            service.metrics.total_seconds.observe(time.perf_counter() - started)
        return answer

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's OpenAPI document, with the named schemas the search bodies refer to."""
        schema = default_openapi()
        schema.setdefault("components", {}).setdefault("schemas", {}).update(request_schemas)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

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

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Any:
        return FileResponse(STATIC / "favicon.ico", media_type="image/x-icon", headers={"Cache-Control": "public, max-age=86400"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
