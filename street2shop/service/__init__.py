"""The search service: ``street2shop service`` (an optional extra: ``pip install 'street2shop[service]'``).

- :mod:`~street2shop.service.config`: :class:`ServiceConfig`, the flags;
- :mod:`~street2shop.service.app`: the HTTP API and the web page (FastAPI);
- :mod:`~street2shop.service.models`: the API's requests, answers and refusals (pydantic), which parse and document it;
- :mod:`~street2shop.service.client`: :class:`~street2shop.service.client.SearchClient`, a typed client of the API
  for app developers (httpx and pydantic only: ``pip install 'street2shop[client]'``);
- :mod:`~street2shop.service.indexes`: the index version being served, swapped live;
- :mod:`~street2shop.service.metrics`: Prometheus metrics;
- :func:`serve_http`: runs it with uvicorn.

Nothing is imported here, so the package imports without its extra installed.
"""

from __future__ import annotations

from typing import Any


def serve_http(config: Any) -> None:
    """Runs the service with uvicorn until Ctrl-C or SIGTERM (``street2shop service``)."""
    from street2shop.errors import ConfigError

    try:
        import fastapi  # noqa: F401
        import fastapi_offline  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ConfigError(f"the search service needs its extra: pip install 'street2shop[service]'. Received: {e}") from None
    from street2shop.service.app import Service, create_app  # imports FastAPI

    service = Service(config)
    uvicorn.run(create_app(service), host=config.host, port=config.port, log_level="info", access_log=False)
