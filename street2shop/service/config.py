"""The search service's settings: the flags of ``street2shop service``, and their environment variables."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from street2shop.config import setting
from street2shop.contract import DEFAULT_MODEL_NAME
from street2shop.errors import ConfigError, check_positive_int

MiB = 1024 * 1024

#: A setting's environment variable is this prefix and its field's name in capitals:
#: ``STREET2SHOP_INDEX``, ``STREET2SHOP_SERVER``, ``STREET2SHOP_MAX_CONCURRENCY``...
ENV_PREFIX = "STREET2SHOP_"


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """How the service runs: each field is the ``street2shop service`` flag of the same name, its help in the field.

    Each setting can also be given as an environment variable (:func:`environment_settings`);
    a number given as text (as a variable gives it) is read as the field's type.
    """

    index: str = setting("", "index base: its newest complete version is served, and a newer one swapped in live; "
                             "or a Milvus index milvus:URI#NAME: the version its alias names (its token in MILVUS_TOKEN)")
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
        check_positive_int("max_concurrency", self.max_concurrency)

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
