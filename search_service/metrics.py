"""Prometheus metrics of the service, on an HTTP port of their own (`--metrics-port`; off by default).

    curl -s http://127.0.0.1:9464/metrics

One registry per service (never prometheus_client's global one: two services in one process, as in
the tests, keep separate counts). What is exported:

* coca_search_request_duration_seconds{method,code}: every SearchService call, by RPC and final status
  code (its _count is the request count);
* coca_search_triton_request_duration_seconds{model,outcome}: every Triton infer call, by model;
* coca_search_inflight{class} and coca_search_inflight_limit{class}: requests in flight per admission
  class (search, ingest, caption) and caption_sequences (decoder sequences), with their bounds;
* coca_search_shed_total{bound}: requests refused by load shedding, by the bound that refused them;
* coca_search_items, coca_search_indexed_items, coca_search_captioned_items, coca_search_index_info
  {configured,active}: the store and index, read at scrape time;
* coca_search_query_cache_{hits,misses}_total, coca_search_query_cache_entries: the query-text cache.
"""
from __future__ import annotations

import logging
import threading
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .admission import CAPTION_SEQUENCES, CLASSES, Admission
from .collection import Collection

log = logging.getLogger("search_service.metrics")

# 1 ms .. 60 s: a cached search answers in ~1 ms, a caption takes seconds, deadlines reach a minute
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServiceMetrics:
    """The service's counters and histograms; `watch` adds what is read at scrape time."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Histogram("coca_search_request_duration_seconds",
                                  "SearchService calls by RPC and final status code, seconds from arrival to status",
                                  ["method", "code"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.triton = Histogram("coca_search_triton_request_duration_seconds",
                                "Triton infer calls by model (a caption makes one per generated token)",
                                ["model", "outcome"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.shed = Counter("coca_search_shed", "Requests refused by load shedding, by the bound that refused them",
                            ["bound"], registry=self.registry)

    def record_request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).observe(seconds)

    def record_triton(self, model: str, seconds: float, ok: bool) -> None:
        self.triton.labels(model, "ok" if ok else "error").observe(seconds)

    def count_shed(self, bound: str) -> None:
        self.shed.labels(bound).inc()

    def watch(self, admission: Admission, collection: Collection, text_cache, models=None) -> None:
        """Export the admission counts, the store's state and the served precision, read at each scrape."""
        inflight = Gauge("coca_search_inflight", "Requests in flight per admission class; caption_sequences: "
                         "decoder sequences", ["class"], registry=self.registry)
        limit = Gauge("coca_search_inflight_limit", "The bound of each admission class (0: none)", ["class"],
                      registry=self.registry)
        for kind in (*CLASSES, CAPTION_SEQUENCES):
            inflight.labels(kind).set_function(lambda kind=kind: admission.inflight(kind))
            limit.labels(kind).set_function(lambda kind=kind: admission.bound(kind))
        self.registry.register(_StoreCollector(collection, text_cache))
        if models is not None:
            self.registry.register(_PrecisionCollector(models))

    def serve(self, host: str, port: int) -> "MetricsServer":
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(server, thread)


class MetricsServer:
    """The /metrics HTTP server (a thread); `port` is the bound one (0 asked for a free port)."""

    def __init__(self, server, thread: threading.Thread):
        self._server, self._thread = server, thread
        self.port = server.server_address[1]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


class _StoreCollector:
    """Items, index and query-cache figures, asked of the collection when scraped (in the HTTP thread)."""

    def __init__(self, collection: Collection, text_cache):
        self.collection = collection
        self.text_cache = text_cache

    def describe(self):
        return []  # collected at scrape time only (no registration-time call into the store)

    def collect(self):
        cache = self.text_cache.stats()
        yield _counter("coca_search_query_cache_hits", "Query texts answered from the cache", cache["query_cache_hits"])
        yield _counter("coca_search_query_cache_misses", "Query texts embedded by Triton", cache["query_cache_misses"])
        yield _gauge("coca_search_query_cache_entries", "Query-text embeddings cached", cache["query_cache_entries"])
        stats: Optional[dict] = None
        try:
            stats = self.collection.stats()
            captioned = self.collection.captioned()
        except Exception as exc:  # a remote store that is down: its figures are left out of this scrape
            log.debug("store figures left out of the scrape: %s", exc)
            return
        yield _gauge("coca_search_items", "Items in the store", stats["count"])
        yield _gauge("coca_search_indexed_items", "Vectors the index answers from", stats["indexed"])
        if captioned is not None:
            yield _gauge("coca_search_captioned_items", "Items with a stored caption", captioned)
        info = GaugeMetricFamily("coca_search_index_info", "The index: configured type and what serves now",
                                 labels=["configured", "active"])
        info.add_metric([stats["index_type"], stats["index_active"]], 1)
        yield info


class _PrecisionCollector:
    """What the served export computes in (search_service.models.Models.precision), as last heard."""

    def __init__(self, models):
        self.models = models

    def describe(self):
        return []

    def collect(self):
        info = GaugeMetricFamily("coca_search_model_precision_info", "The served export's precision as `coca export` "
                                 "recorded it (\"\" before Triton first answered)", labels=["precision"])
        info.add_metric([self.models.precision], 1)
        yield info


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
