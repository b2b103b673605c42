"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Latency buckets in seconds: from a short answer to a long generation.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """``openbagel_*`` series: queue depth, requests in the engine, requests
    by route and outcome, latency per route, images and tokens produced."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("openbagel_queue_depth", "Requests waiting for the engine", registry=r)
        self.in_flight = Gauge("openbagel_requests_in_flight", "Requests running in the engine", registry=r)
        self.requests = Counter(
            "openbagel_requests",
            "Requests by route and outcome (ok, client_error, rejected, cancelled, not_ready, error)",
            ["route", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "openbagel_request_duration_seconds",
            "Time from request to response, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("openbagel_images_generated", "Images produced", registry=r)
        self.tokens = Counter("openbagel_tokens_generated", "Text tokens produced (reasoning included)", registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every series."""
        return generate_latest(self.registry)
