"""The service's Prometheus metrics, defined here alone and served at `GET /metrics` (text format).

Each app has its own registry (tests build several apps in one process). Requests are timed by
`service.requests` under their route template (`/v1/indexes/{name}/attribute`, never a raw path, so
the label set stays bounded); queries are counted per index, method and estimator with their phases'
seconds from the answer's timings; the query pool's occupancy and the open stores' cache hits and
resident bytes are read when scraped. With `retrac serve --workers N` each process counts its own
and a scrape reaches one of them: for metrics, run one process per container (a query pool gives it
parallel queries) and scale containers (docs/deployment.md).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api_schemas.attribution import AttributionsPublic
from service.query_pool import QueryPool
from storage import OpenStores
from storage.location import index_name

disable_created_metrics()  # `_created` series double every histogram's lines and tell nothing here

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PHASES = ("wait", "gradients", "scan")
"""The phases of a query, as `TimingsPublic` reports them (`wait_s`, `gradient_s`, `scan_s`)."""


class ServiceMetrics:
    """The metrics of one app, in its own registry."""

    def __init__(self, stores: OpenStores, pool: QueryPool | None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "retrac_http_request_duration_seconds",
            "Seconds from a request's first byte to its answer, by route template and status",
            ("method", "route", "status"),
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.queries = Counter(
            "retrac_attribution_queries",
            "Query images attributed, by index, ranking method and estimator",
            ("index", "method", "estimator"),
            registry=self.registry,
        )
        self.phases = Histogram(
            "retrac_query_phase_seconds",
            "Seconds of each phase of an attribution request: wait (for the gradient lock or a pool "
            "process), gradients (query side), scan (over the stored rows)",
            ("phase",),
            buckets=PHASE_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LiveState(stores, pool))

    def observe_query(self, answer: AttributionsPublic) -> None:
        """Count an answered attribution request: its images per method, its phases' seconds."""
        methods = answer.data[0].methods if answer.data else {}
        for method in methods:
            self.queries.labels(answer.index, method, answer.estimator).inc(answer.count)
        timings = answer.timings
        for phase, seconds in zip(PHASES, (timings.wait_s, timings.gradient_s, timings.scan_s), strict=True):
            self.phases.labels(phase).observe(seconds)

    def exposition(self) -> bytes:
        """Every metric in Prometheus's text format."""
        return generate_latest(self.registry)


class _LiveState(Collector):
    """What is read when scraped: the query pool's occupancy, the open stores' cache counts and bytes."""

    def __init__(self, stores: OpenStores, pool: QueryPool | None) -> None:
        self.stores, self.pool = stores, pool

    def collect(self) -> Iterator[Metric]:
        size = self.pool.size if self.pool else 0
        yield GaugeMetricFamily("retrac_query_pool_processes", "Processes of the query pool (0: none)", size)
        busy = self.pool.busy() if self.pool else 0
        yield GaugeMetricFamily("retrac_query_pool_busy", "Query-pool processes computing a query now", busy)
        cache = CounterMetricFamily(
            "retrac_store_cache_lookups",
            "Index lookups answered by an opened store (hit) or by opening it (miss)",
            labels=("result",),
        )
        cache.add_metric(("hit",), self.stores.hits)
        cache.add_metric(("miss",), self.stores.misses)
        yield cache
        opened = self.stores.stores()
        yield GaugeMetricFamily("retrac_stores_open", "Indexes this process keeps opened", len(opened))
        resident = GaugeMetricFamily(
            "retrac_store_resident_bytes",
            "Bytes of stored gradients held in memory for scans",
            labels=("index",),
        )
        for store in opened:
            resident.add_metric((index_name(store.location),), store.resident_nbytes)
        yield resident
