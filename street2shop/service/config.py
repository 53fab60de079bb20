"""The search service's settings: the flags of ``street2shop service``, and their environment variables."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from street2shop.errors import ConfigError

MiB = 1024 * 1024

#: A setting's environment variable is this prefix and its field's name in capitals:
#: ``STREET2SHOP_INDEX``, ``STREET2SHOP_SERVER``, ``STREET2SHOP_MAX_CONCURRENCY``...
ENV_PREFIX = "STREET2SHOP_"


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """How the service runs (``street2shop service`` flags of the same names).

    Args:
        index: the index base (``INDEX_BASE/<n>/``); the newest complete version is served and swapped live. Or a
            Milvus index, ``milvus:URI#NAME``: the version its alias names (the token in ``MILVUS_TOKEN``).
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

    Each setting can also be given as an environment variable (:func:`environment_settings`);
    a number given as text (as a variable gives it) is read as the field's type.
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
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", "float") and isinstance(value, str):
                try:
                    object.__setattr__(self, field.name, int(value) if field.type == "int" else float(value))
                except ValueError:
                    raise ConfigError(f"{field.name} ({env_name(field.name)}) must be a number. Received: {field.name}={value!r}") from None
        if not self.index:
            raise ConfigError(f"give the index base: --index INDEX_BASE (or {env_name('index')}). Received: index={self.index!r}")
        if bool(self.server) == bool(self.model):
            raise ConfigError(f"give exactly one of --server HOST:PORT or --model EXPORT (or {env_name('server')} / {env_name('model')}). "
                              f"Received: server={self.server!r}, model={self.model!r}")
        for name in ("max_upload_mb", "poll_seconds", "timeout", "readiness_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0. Received: {name}={getattr(self, name)!r}")
        if self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1. Received: max_concurrency={self.max_concurrency}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MiB)


def env_name(field: str) -> str:
    """The environment variable of a setting: ``max_upload_mb`` → ``STREET2SHOP_MAX_UPLOAD_MB``."""
    return ENV_PREFIX + field.upper()


def environment_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings an environment gives, as ``{field: text}``: ``STREET2SHOP_<FIELD>`` for each field of :class:`ServiceConfig`.

    ``street2shop service`` takes them as its flags' defaults, so a flag on the command line wins over its
    variable, and a variable over the built-in default. An empty variable counts as unset. The texts are read
    as the flags' values are (a number that does not parse is an error naming the setting).

    Args:
        environ: the environment (``os.environ``).

    Example:
        >>> environment_settings({"STREET2SHOP_INDEX": "/index", "STREET2SHOP_MAX_CONCURRENCY": "4", "HOME": "/"})
        {'index': '/index', 'max_concurrency': '4'}
    """
    return {f.name: environ[env_name(f.name)] for f in dataclasses.fields(ServiceConfig) if environ.get(env_name(f.name))}
