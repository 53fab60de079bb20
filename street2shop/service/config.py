"""The search service's settings: the flags of ``street2shop service``."""

from __future__ import annotations

import dataclasses

from street2shop.config import setting
from street2shop.contract import DEFAULT_MODEL_NAME
from street2shop.errors import ConfigError, check_positive_int

MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """How the service runs: each field is the ``street2shop service`` flag of the same name, its help in the field."""

    index: str = dataclasses.field(metadata={"help": "index base: its newest complete version is served, and a newer one swapped in live"})
    server: str = setting("", "TF Serving gRPC address HOST:PORT")
    model: str = setting("", "an export base or version folder, to embed in this process instead of --server")
    model_name: str = setting(DEFAULT_MODEL_NAME, "model name on the server")
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = setting(8080, "HTTP port")
    max_upload_mb: float = setting(10.0, "largest photo accepted (413 beyond)")
    max_concurrency: int = setting(8, "searches worked on at once; more are turned away with 503 and Retry-After")
    poll_seconds: float = setting(2.0, "how often the index base is looked at for a new version")
    timeout: float = setting(10.0, "seconds TF Serving gets per request, its retries included (503 beyond)")
    max_pixels: int = setting(50_000_000, "largest image decoded, in pixels (a decompression bomb is a 400)")
    readiness_seconds: float = setting(2.0, "how long one probe of the embedder answers /readyz")

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
