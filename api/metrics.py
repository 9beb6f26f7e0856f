"""Prometheus metrics of one app: request latency per route, encode / search timings, ingest counts.

Each app gets its own :class:`CollectorRegistry` (tests build many apps in one process). Ingest
figures come from the jobs table at scrape time, because workers are other processes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.service import SpaceService
from retrieval.storage.jobs import JobQueue

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ArchiveCollector(Collector):
    """Gauges and counters read from the database when Prometheus scrapes."""

    def __init__(self, service: SpaceService) -> None:
        self.service = service

    def collect(self) -> Iterable[Any]:
        queue = JobQueue(self.service.store)
        jobs = GaugeMetricFamily("medvae_ingest_jobs", "Ingest jobs by state.", labels=["state"])
        by_state = queue.counts_by_state()
        for state in ("queued", "running", "succeeded", "failed", "cancelled"):
            jobs.add_metric([state], by_state.get(state, 0))
        yield jobs
        images = CounterMetricFamily(
            "medvae_ingest_images", "Images handled by ingest jobs, by outcome.", labels=["outcome"]
        )
        for outcome, value in queue.totals().items():
            images.add_metric([outcome], value)
        yield images
        stored = GaugeMetricFamily("medvae_archive_rows", "Rows stored in the archive, by table.", labels=["table"])
        for table, value in self.service.store.counts().items():
            stored.add_metric([table], value)
        yield stored
        if self.service.encoder_loaded:
            yield GaugeMetricFamily(
                "medvae_index_vectors", "Vectors in the served index.", value=self.service.index.count
            )


class Metrics:
    """The registry and instruments of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._archive: ArchiveCollector | None = None
        self.requests = Histogram(
            "medvae_http_request_duration_seconds",
            "HTTP request latency by route template, method and status.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.timings = {
            "encode_seconds": Histogram(
                "medvae_encode_seconds", "Encoder calls (one batch).", buckets=LATENCY_BUCKETS, registry=self.registry
            ),
            "search_seconds": Histogram(
                "medvae_index_search_seconds", "FAISS searches.", buckets=LATENCY_BUCKETS, registry=self.registry
            ),
            "query_batch_size": Histogram(
                "medvae_query_batch_size", "Queries sharing one encoder call.", buckets=BATCH_BUCKETS,
                registry=self.registry,
            ),
        }

    def attach(self, service: SpaceService) -> None:
        """Feed the service's timing hook into the histograms and read archive figures at scrape."""
        service.observe = self.observe
        if self._archive is not None:  # the app started again (a new lifespan): follow its service
            self.registry.unregister(self._archive)
        self._archive = ArchiveCollector(service)
        self.registry.register(self._archive)

    def observe(self, name: str, value: float) -> None:
        histogram = self.timings.get(name)
        if histogram is not None:
            histogram.observe(value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimingMiddleware:
    """Times every HTTP request under its route template (``/v1/images/{image_id}``), not its URL."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        tick = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(template, scope.get("method", ""), str(status["code"])).observe(
                time.perf_counter() - tick
            )
