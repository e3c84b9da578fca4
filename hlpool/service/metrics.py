"""Prometheus metrics of ``hlpool serve``.

Everything lives in a private :class:`prometheus_client.CollectorRegistry`
(nothing is registered globally, so several servers or tests in one process
do not collide). Two kinds of metrics:

- counted by the server as requests go by: calls by snapshot, function and
  outcome, error responses by code, a latency histogram, HTTP requests by
  route and status, calls in flight;
- read from the pool when ``/metrics`` is scraped (:class:`PoolCollector`):
  workers configured and alive, restarts, and per worker its memory (RSS,
  PSS), live VMs, queue, calls, errors and crashes.

Label values are bounded: a call is labelled with its snapshot and function
only once both are known to exist, errors only with their stable code.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

# From a fast call (tens of µs) to the default maximum call timeout and beyond.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)


class PoolCollector(Collector):
    """Pool state read at scrape time: ``stats()`` gives one dict per worker."""

    def __init__(self, stats: Callable[[], list[dict[str, Any]]], restarts: Callable[[], int],
                 snapshots: Callable[[], int], ready: Callable[[], bool]) -> None:
        self._stats = stats
        self._restarts = restarts
        self._snapshots = snapshots
        self._ready = ready

    def describe(self) -> Iterable:
        return []  # computed at scrape time only

    def collect(self) -> Iterable:
        stats = self._stats()
        alive = [s for s in stats if s["alive"]]
        yield _gauge("hlpool_workers", "Worker processes configured.", len(stats))
        yield _gauge("hlpool_workers_alive", "Worker processes alive.", len(alive))
        yield _gauge("hlpool_ready", "1 when every worker is alive and the server is not shutting down.",
                     1 if self._ready() else 0)
        yield _gauge("hlpool_snapshots", "Snapshots the server serves.", self._snapshots())
        yield _gauge("hlpool_live_vms", "VMs held by all workers (warm sandboxes).", sum(s["vms"] for s in alive))
        restarts = CounterMetricFamily("hlpool_worker_restarts", "Workers replaced after they died.")
        restarts.add_metric([], self._restarts())
        yield restarts

        per_worker = {
            "hlpool_worker_rss_bytes": ("Resident memory of a worker process.", lambda s: s["rss_kib"] * 1024),
            "hlpool_worker_pss_bytes": ("Proportional set size of a worker process (shared pages split "
                                        "between the processes sharing them).", lambda s: s["pss_kib"] * 1024),
            "hlpool_worker_vms": ("VMs (warm sandboxes) a worker holds.", lambda s: s["vms"]),
            "hlpool_worker_queued": ("Calls queued for a worker.", lambda s: s["queued"]),
            "hlpool_worker_in_flight": ("Calls sent to a worker and not answered yet.", lambda s: s["in_flight"]),
            "hlpool_worker_up": ("1 if the worker process is alive.", lambda s: 1 if s["alive"] else 0),
            "hlpool_worker_pid": ("Process id of the worker.", lambda s: s["pid"]),
        }
        for name, (text, value) in per_worker.items():
            family = GaugeMetricFamily(name, text, labels=["worker"])
            for s in stats:
                family.add_metric([str(s["index"])], value(s))
            yield family
        counters = {
            "hlpool_worker_calls": ("Calls a worker slot has answered (across restarts).", "calls"),
            "hlpool_worker_errors": ("Calls a worker slot answered with an error.", "errors"),
            "hlpool_worker_crashes": ("Times a worker slot's process died.", "crashes"),
        }
        for name, (text, key) in counters.items():
            family = CounterMetricFamily(name, text, labels=["worker"])
            for s in stats:
                family.add_metric([str(s["index"])], s[key])
            yield family


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text)
    family.add_metric([], value)
    return family


class Metrics:
    """The server's metrics and their registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Counter("hlpool_calls", "Calls of guest functions, by snapshot, function and outcome "
                             "('ok' or the error code).", ["snapshot", "function", "outcome"], registry=r)
        self.call_seconds = Histogram("hlpool_call_duration_seconds", "Latency of calls as the server sees it "
                                      "(queueing in the pool included), by snapshot.", ["snapshot"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("hlpool_errors", "Error responses, by stable error code.", ["code"], registry=r)
        self.http_requests = Counter("hlpool_http_requests", "HTTP requests, by method, route and status.",
                                     ["method", "route", "status"], registry=r)
        self.calls_in_flight = Gauge("hlpool_calls_in_flight", "Calls received and not answered yet.", registry=r)
        self.registrations = Counter("hlpool_snapshot_registrations", "Snapshots registered through the API, "
                                     "by outcome.", ["outcome"], registry=r)
        ProcessCollector(namespace="hlpool_server", registry=r)

    def attach_pool(self, stats: Callable[[], list[dict[str, Any]]], restarts: Callable[[], int],
                    snapshots: Callable[[], int], ready: Callable[[], bool]) -> None:
        self.registry.register(PoolCollector(stats, restarts, snapshots, ready))

    def observe_call(self, snapshot: str, function: str, outcome: str, seconds: float) -> None:
        self.calls.labels(snapshot, function, outcome).inc()
        self.call_seconds.labels(snapshot).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
