"""The search service's settings: the flags of ``street2shop service``."""

from __future__ import annotations

import dataclasses

from street2shop.errors import ConfigError, check_positive_int

MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """How the service runs (``street2shop service`` flags of the same names).

    Args:
        index: the index base (``INDEX_BASE/<n>/``); the newest complete version is served and swapped live.
        server: TF Serving's gRPC address ``HOST:PORT`` (or ``model``).
        model: an export base or version folder, to embed in this process (or ``server``).
        model_name: the name TF Serving serves the model under.
        host, port: where to listen (127.0.0.1 unless told otherwise).
        max_upload_mb: the largest photo accepted (413 beyond).
        max_concurrency: searches worked on at once; more get 503 with Retry-After.
        poll_seconds: how often the index base is looked at for a new version.
        timeout: seconds TF Serving gets per request (503 beyond).
        max_pixels: the largest image decoded (a decompression bomb is a 400).
        readiness_seconds: how long one probe of the embedder answers ``/readyz``.
    """

    index: str
    server: str = ""
    model: str = ""
    model_name: str = "street2shop"
    host: str = "127.0.0.1"
    port: int = 8080
    max_upload_mb: float = 10.0
    max_concurrency: int = 8
    poll_seconds: float = 2.0
    timeout: float = 10.0
    max_pixels: int = 50_000_000
    readiness_seconds: float = 2.0

    def __post_init__(self) -> None:
        if bool(self.server) == bool(self.model):
            raise ConfigError(f"give exactly one of --server HOST:PORT or --model EXPORT. Received: server={self.server!r}, model={self.model!r}")
        for name in ("max_upload_mb", "poll_seconds", "timeout", "readiness_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0. Received: {name}={getattr(self, name)!r}")
        check_positive_int("max_concurrency", self.max_concurrency)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MiB)
