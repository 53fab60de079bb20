"""The service's Prometheus metrics, in a registry of their own (one per app, so tests can make several)."""

from __future__ import annotations

from typing import Any

# Seconds: an embedding takes milliseconds on a GPU and tens to hundreds on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """Requests by route and status, latencies of embed / search / total, the index, work in flight, rejections."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("street2shop_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.embed_seconds = Histogram("street2shop_embed_seconds", "Time to embed a search photo", buckets=LATENCY_BUCKETS, registry=r)
        self.search_seconds = Histogram("street2shop_search_seconds", "Time to search the index", buckets=LATENCY_BUCKETS, registry=r)
        self.total_seconds = Histogram("street2shop_request_seconds", "Time of a whole search request", buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("street2shop_in_flight", "Search requests being worked on", registry=r)
        self.rejected = Counter("street2shop_rejected", "Search requests turned away at the concurrency limit (503)", registry=r)
        self.index_version = Gauge("street2shop_index_version", "Version of the index being served (0: none)", registry=r)
        self.index_items = Gauge("street2shop_index_items", "Catalogue images in the index being served", registry=r)
        self.index_refused = Counter("street2shop_index_refused", "Index versions refused (another model or dimension, unreadable)", registry=r)
        self.index_swaps = Counter("street2shop_index_swaps", "Index versions swapped in", registry=r)

    def index_event(self, event: str, details: dict[str, Any]) -> None:
        if event == "loaded":
            self.index_version.set(details["version"])
            self.index_items.set(details["items"])
            self.index_swaps.inc()
        elif event == "refused":
            self.index_refused.inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
