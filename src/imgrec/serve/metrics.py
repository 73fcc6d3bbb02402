"""``GET /metrics`` in Prometheus' text format (``ServeSettings(metrics=True)``; off by default).

What is measured:

    imgrec_http_requests_total{route, status}   requests answered, by route template and status code
    imgrec_http_requests_in_progress            requests being handled now (the scrape itself included)
    imgrec_predict_latency_seconds              /v1/predict from arrival to answer, errors included
    imgrec_batch_size                           images in each forward pass the batcher runs
    imgrec_queue_images                         images waiting for the model now

Each app gets its own ``CollectorRegistry`` rather than prometheus-client's global one: the global one
refuses a second metric of the same name, so two apps in one process (tests, benchmarks) would clash.
With ``--workers N`` every worker process counts its own requests: a scrape reads whichever worker answers.

Routes are labelled by their template (``/static/{name}``), and paths that match no route by ``unmatched``,
so a stranger trying thousands of URLs adds no new time series.
"""
from __future__ import annotations

import time
from typing import Callable

__all__ = ["ServeMetrics", "create_metrics", "MetricsMiddleware", "PREDICT_ROUTE"]

PREDICT_ROUTE = "/v1/predict"
UNMATCHED = "unmatched"


def _batch_buckets(max_batch: int) -> list[float]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself: how full the passes run."""
    edges, b = set(), 1
    while b < max_batch:
        edges.add(b)
        b *= 2
    edges.add(max_batch)
    return sorted(float(e) for e in edges)


class ServeMetrics:
    """One app's metrics, in a registry of its own (see the module's docstring)."""

    def __init__(self, prometheus, max_batch: int):
        self._prometheus = prometheus
        self.registry = prometheus.CollectorRegistry()
        registry = self.registry
        self.requests = prometheus.Counter("imgrec_http_requests", "HTTP requests answered, by route and status "
                                           "code", ["route", "status"], registry=registry)
        self.in_progress = prometheus.Gauge("imgrec_http_requests_in_progress", "HTTP requests being handled",
                                            registry=registry)
        self.predict_latency = prometheus.Histogram("imgrec_predict_latency_seconds", "time from a /v1/predict "
                                                    "request's arrival to its answer", registry=registry)
        self.batch_size = prometheus.Histogram("imgrec_batch_size", "images in each forward pass",
                                               buckets=_batch_buckets(max_batch), registry=registry)
        self.queue_depth = prometheus.Gauge("imgrec_queue_images", "images waiting for the model",
                                            registry=registry)

    def watch_queue(self, queued_images: Callable[[], float]) -> None:
        """Read the queue depth when scraped: nothing to keep up to date on every request."""
        self.queue_depth.set_function(queued_images)

    def render(self) -> tuple[bytes, str]:
        """The text a scrape gets, and its media type."""
        return self._prometheus.generate_latest(self.registry), self._prometheus.CONTENT_TYPE_LATEST


def create_metrics(max_batch: int) -> ServeMetrics | None:
    """The metrics, or None when prometheus-client is not installed (then /metrics says so and all else works)."""
    try:
        import prometheus_client
    except ImportError:
        return None
    return ServeMetrics(prometheus_client, max_batch)


def route_label(scope) -> str:
    """The template of the route that answered (set in the scope by the router), never the raw path."""
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED


class MetricsMiddleware:
    """Plain ASGI middleware that counts every HTTP request by route and status, and times /v1/predict."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # an app that raises before answering gets a 500 from the outermost error middleware, outside this one
        status = 500

        async def send_and_note_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        started = time.perf_counter()
        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            self.metrics.in_progress.dec()
            route = route_label(scope)
            self.metrics.requests.labels(route, str(status)).inc()
            if route == PREDICT_ROUTE:
                self.metrics.predict_latency.observe(time.perf_counter() - started)
