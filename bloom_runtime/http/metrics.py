"""Prometheus metrics: one registry per app; engine figures are read at scrape time."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import falcon
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from bloom_runtime.engine.engine import Engine
from bloom_runtime.http.resources.health import membridge_state

log = logging.getLogger("bloom_runtime.http")

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BREAKER_STATES = ("closed", "half-open", "open")


class EngineCollector(Collector):
    """Tasks, leases and workers by status; lease expiries; retries; membridge breaker state."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        try:
            stats = self.engine.stats()
        except Exception as exc:  # a scrape during a store outage still answers, without these
            log.warning("metrics: stats unavailable: %s", exc)
            stats = None
        if stats is not None:
            for name, help_text in (("tasks", "Tasks by status"), ("leases", "Leases by status"), ("workers", "Workers by status")):
                g = GaugeMetricFamily(f"bloom_{name}", help_text, labels=["status"])
                for status, n in sorted(stats.get(name, {}).get("by_status", {}).items()):
                    g.add_metric([status], n)
                yield g
            active = GaugeMetricFamily("bloom_active_leases", "Leases currently active")
            active.add_metric([], stats.get("leases", {}).get("active", 0))
            yield active
            # Counted in the database, so it survives restarts and covers every engine process.
            expired = CounterMetricFamily("bloom_lease_expiries", "Leases that expired (stored)")
            expired.add_metric([], stats.get("leases", {}).get("expired", 0))
            yield expired
        counters = getattr(self.engine, "counters", None)
        if callable(counters):
            # Process-local counters from the actors, when the engine exposes them.
            for key, value in sorted(counters().items()):
                c = CounterMetricFamily(f"bloom_engine_{key.removesuffix('_total')}", f"engine counter {key}")
                c.add_metric([], value)
                yield c
        state = membridge_state(self.engine)
        breaker = GaugeMetricFamily("bloom_membridge_breaker_state", "Membridge circuit breaker (1 = current state)", labels=["state"])
        current = str(state.get("breaker_state", state.get("breaker", ""))).lower() if state.get("configured") else ""
        for s in BREAKER_STATES:
            breaker.add_metric([s], 1 if current == s else 0)
        yield breaker
        configured = GaugeMetricFamily("bloom_membridge_configured", "1 when a membridge client is wired")
        configured.add_metric([], 1 if state.get("configured") else 0)
        yield configured
        sync = state.get("sync")
        if not isinstance(sync, dict):
            sync = {}
        syncs = CounterMetricFamily("bloom_membridge_sync", "Membridge worker syncs by outcome (skipped: one was still running)", labels=["outcome"])
        for outcome, key in (("success", "successes"), ("failure", "failures"), ("skipped", "skipped")):
            syncs.add_metric([outcome], sync.get(key, 0))
        yield syncs
        failing = GaugeMetricFamily("bloom_membridge_consecutive_failures", "Membridge attempts failed since the last answer")
        failing.add_metric([], state.get("consecutiveFailures", 0) or 0)
        yield failing
        dispatch = self.engine.dispatch.state()
        in_flight = GaugeMetricFamily("bloom_dispatch_in_flight", "Deliveries waiting for their worker agent's answer")
        in_flight.add_metric([], dispatch["in_flight"])
        yield in_flight
        outcomes = CounterMetricFamily("bloom_dispatch_deliveries", "Deliveries to worker agents by outcome (this process)", labels=["state"])
        for outcome, n in sorted(dispatch["deliveries"].items()):
            outcomes.add_metric([outcome], n)
        yield outcomes
        open_breakers = GaugeMetricFamily("bloom_dispatch_open_breakers", "Worker agents whose circuit breaker is open")
        open_breakers.add_metric([], dispatch["open_breakers"])
        yield open_breakers


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "bloom_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "bloom_http_request_duration_seconds", "HTTP request latency", ["method", "route", "status"],
            buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )
        self.shed = Counter("bloom_http_shed", "Requests refused by load shedding", registry=self.registry)
        self.throttled = Counter("bloom_http_rate_limited", "Requests refused by the rate limit", registry=self.registry)
        self.registry.register(EngineCollector(engine))
        # Label children by (method, route, status): bounded by the route table.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in KNOWN_METHODS:
            method = "other"  # a client must not be able to mint label values
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            labels = (method, route, str(status))
            children = self._children[key] = (self.requests.labels(*labels), self.latency.labels(*labels))
        children[0].inc()
        children[1].observe(seconds)


class MetricsResource:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = generate_latest(self.metrics.registry)
