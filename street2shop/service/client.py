"""A typed Python client of the search service's HTTP API, for app developers: ``pip install 'street2shop[client]'``.

It needs httpx and pydantic only (no FastAPI, no TensorFlow). httpx rather
than the standard library's urllib: it keeps connections alive and pools them
(a search is one round trip, not a TCP handshake and one), is safe to share
between threads, and has explicit timeouts; pydantic reads the answers into
the very models the service answers with (:mod:`street2shop.service.models`).

Example:
    >>> from street2shop.service.client import SearchClient
    >>> with SearchClient("http://127.0.0.1:8080") as client:  # doctest: +SKIP
    ...     answer = client.search("photo.jpg", box=(30, 89, 124, 71), k=5)
    ...     for hit in answer.results:
    ...         print(hit.rank, hit.product_id, hit.similarity, client.image_url(hit))

A search answered with anything but 200 raises
:class:`~street2shop.service.models.ServiceError` (its ``status`` and the
service's ``detail``); a 503 (the service busy, or its model server down) is
first retried, waiting what the answer's ``Retry-After`` says. A service that
cannot be reached raises :class:`~street2shop.errors.ServerUnavailableError`.
"""

from __future__ import annotations

import email.utils
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from street2shop.data.image import Box
from street2shop.errors import DataError, ServerUnavailableError
from street2shop.service.models import Hit, SearchResponse, ServiceError

logger = logging.getLogger(__name__)

Photo = bytes | str | os.PathLike[str]


class SearchClient:
    """The search API of one service: :meth:`search`, catalogue images, health and readiness.

    Args:
        base_url: str. Where the service listens, e.g. ``"http://127.0.0.1:8080"``.
        timeout: float. Seconds one request may take.
        retries: int. How many times a search answered with 503 is tried
            again (each after the answer's ``Retry-After``), and a connection
            refused (after 0.5, 1, 2 ... s). 0: never.
        max_wait: float. The longest one wait may be, whatever ``Retry-After`` says.
        http: an ``httpx.Client`` to send with instead of the client's own
            (its ``base_url`` is used; FastAPI's ``TestClient`` is one).
        sleep: how to wait (tests pass their own).
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8080", *, timeout: float = 30.0, retries: int = 3, max_wait: float = 30.0,
                 http: Any = None, sleep: Callable[[float], None] = time.sleep) -> None:
        import httpx

        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a whole number >= 0. Received: retries={retries!r}")
        self._owned = http is None
        self.http = http if http is not None else httpx.Client(base_url=base_url, timeout=timeout)
        self.base_url = str(self.http.base_url).rstrip("/")
        self.retries = retries
        self.max_wait = float(max_wait)
        self.sleep = sleep

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connections (only the client's own: an ``http`` given to it stays open)."""
        if self._owned:
            self.http.close()

    # ------------------------------------------------------------------ searching

    def search(self, photo: Photo, *, box: Box | Sequence[float] | None = None, k: int = 20, category: str | None = None) -> SearchResponse:
        """The products in ``photo`` (its bytes, or a path), best first.

        Args:
            photo: the photo's bytes, or the path of a JPEG, PNG, GIF or BMP file.
            box: the product's box, ``(left, top, width, height)`` in pixels of the photo (a
                :class:`~street2shop.data.image.Box` too); it must lie inside the photo.
            k: how many products (1 to 100).
            category: search only this category of the catalogue.

        Raises:
            ServiceError: the service refused (400 a photo it cannot read, 413 too large, 422 a bad
                parameter, such as a box reaching outside the photo or a category the index does not
                have), or was still busy (503) after the retries.
            ServerUnavailableError: no service answers at ``base_url``.
            DataError: ``photo`` is a path that cannot be read.
        """
        data = _photo_bytes(photo)
        name = os.path.basename(os.fspath(photo)) if not isinstance(photo, (bytes, bytearray, memoryview)) else "photo"
        fields: dict[str, str] = {"k": str(k)}
        if box is not None:
            values = box.as_ltwh() if isinstance(box, Box) else tuple(box)
            fields["box"] = ",".join(f"{float(v):g}" for v in values)
        if category is not None:
            fields["category"] = category
        # Multipart, not JSON: the photo travels as its own bytes (base64 would add a third and a decode).
        response = self._send("POST", "/v1/search", files={"image": (name, data, "application/octet-stream")}, data=fields)
        return SearchResponse.model_validate(response.json())

    # ------------------------------------------------------------------ the catalogue

    def image_url(self, hit: Hit | str) -> str | None:
        """The absolute URL of a hit's catalogue image (or of an image id's); None for a product the index holds customer photos of only."""
        path = hit.image_url if isinstance(hit, Hit) else f"/v1/catalogue/images/{hit}"
        return self.base_url + path if path is not None else None

    def image(self, hit: Hit | str) -> bytes:
        """A hit's catalogue image (or an image id's), as the service stores it (ServiceError 404 if the index has no such image).

        Raises:
            DataError: the hit's product has no catalogue photo in the index (only customer photos; ``hit.image_url`` is None).
        """
        path = hit.image_url if isinstance(hit, Hit) else f"/v1/catalogue/images/{hit}"
        if path is None:
            raise DataError(f"product {hit.product_id!r} has no catalogue photo in the index (it matched at one of its customer "
                            f"photos, {hit.matched.image_id}, which the service does not serve). Received: image_url=None")
        return self._send("GET", path).content

    # ------------------------------------------------------------------ health

    def healthy(self) -> bool:
        """Whether the service's process answers (``/healthz``)."""
        try:
            return self._send("GET", "/healthz", retry=False).status_code == 200
        except (ServiceError, ServerUnavailableError):
            return False

    def readiness(self) -> dict[str, Any]:
        """``/readyz``'s detail (``ready``, ``problems``, the index, the embedder), whether ready or not."""
        return self._send("GET", "/readyz", retry=False, accept=(200, 503)).json()

    def ready(self) -> bool:
        """Whether the service can search now: an index is loaded, and the embedder answers with the index's model."""
        try:
            return bool(self.readiness().get("ready"))
        except ServerUnavailableError:
            return False

    # ------------------------------------------------------------------ sending

    def _send(self, method: str, path: str, *, retry: bool = True, accept: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        import httpx

        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.ConnectError as e:
                if last:
                    raise ServerUnavailableError(f"the search service at {self.base_url} does not answer: {e}") from None
                wait = min(self.max_wait, 0.5 * 2 ** attempt)
                logger.info("the search service at %s does not answer (%s); trying again in %.1f s", self.base_url, e, wait)
                self.sleep(wait)
                continue
            except httpx.TimeoutException as e:
                raise ServerUnavailableError(f"the search service at {self.base_url} did not answer in time: {e!r}") from None
            except httpx.TransportError as e:
                raise ServerUnavailableError(f"the search service at {self.base_url} failed to answer: {e!r}") from None
            if response.status_code in accept:
                return response
            retry_after = _seconds(response.headers.get("retry-after"))
            if response.status_code == 503 and not last:
                wait = min(self.max_wait, retry_after if retry_after is not None else 1.0)
                logger.info("the search service is busy (%s); trying again in %.1f s", _detail(response), wait)
                self.sleep(wait)
                continue
            raise ServiceError(response.status_code, _detail(response), retry_after)
        raise AssertionError("unreachable")  # pragma: no cover


def _photo_bytes(photo: Photo) -> bytes:
    if isinstance(photo, (bytes, bytearray, memoryview)):
        return bytes(photo)
    try:
        with open(photo, "rb") as handle:
            return handle.read()
    except OSError as e:
        raise DataError(f"cannot read the photo {os.fspath(photo)}: {e.strerror or e}") from None


def _detail(response: Any) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else (response.text[:200] or response.reason_phrase)


def _seconds(retry_after: str | None) -> float | None:
    """``Retry-After`` in seconds: a number of seconds, or an HTTP date."""
    if not retry_after:
        return None
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
