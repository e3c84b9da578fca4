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

Calls and HTTP requests are tallied in plain dicts as they go by and added to
the prometheus_client metrics in one step per label set by :meth:`Metrics.flush`
(before every render, and by each front end once a second): a histogram
observation and two counter increments cost ~9-11 µs per request through
prometheus_client (its locks, and in multiprocess mode its memory-mapped files),
~7% of a front end's CPU per request. With several front ends another front
end's latest calls may so show up to a second late.

With several front ends (``--frontends K``), the counted metrics use
prometheus_client's multiprocess mode (one set of memory-mapped files per
front end in the server's private ``PROMETHEUS_MULTIPROC_DIR``, summed at
scrape time; calls in flight in :class:`InFlightSlots`), and each front end
publishes its pool's state once a second (:class:`SharedPoolStats`), so any
front end answers ``/metrics`` for the whole server: workers numbered
globally, counters summed. ``hlpool_server_*`` process metrics are those of
the front end that answered.
"""

from __future__ import annotations

import bisect
import json
import logging
import mmap
import os
import struct
from typing import Any, Callable, Iterable

from prometheus_client import values as prometheus_values
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

# From a fast call (tens of µs) to the default maximum call timeout and beyond.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)

log = logging.getLogger("hlpool.service.metrics")


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


class _InFlightCollector(Collector):
    def __init__(self, count: Callable[[], int]) -> None:
        self._count = count

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        yield _gauge("hlpool_calls_in_flight", "Calls received and not answered yet.", self._count())


class InFlightSlots:
    """Calls in flight per front end: one int64 per front end in a shared memory-mapped file, written by
    its front end on every change (a few hundred ns), summed by whichever front end is scraped."""

    SLOT = struct.Struct("<q")

    @classmethod
    def create(cls, path: str, count: int) -> None:
        with open(path, "wb") as f:
            f.write(bytes(cls.SLOT.size * count))

    @classmethod
    def clear(cls, path: str, index: int) -> None:
        """Zero a dead front end's slot (its calls have no answer any more)."""
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, bytes(cls.SLOT.size), cls.SLOT.size * index)
        finally:
            os.close(fd)

    def __init__(self, path: str, index: int) -> None:
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        self._count = len(self._map) // self.SLOT.size
        self._offset = self.SLOT.size * index
        self.set(0)

    def set(self, value: int) -> None:
        self.SLOT.pack_into(self._map, self._offset, value)

    def total(self) -> int:
        return sum(struct.unpack_from(f"<{self._count}q", self._map))

    def close(self) -> None:
        self._map.close()


class SharedPoolStats:
    """The pools of all front ends, as the front ends publish them: one JSON file per front end in
    ``directory`` (``<index>.json``, replaced atomically), worker indices made global with ``offset``."""

    def __init__(self, directory: str, index: int, offset: int, pool: Any) -> None:
        self.directory = directory
        self.index = index
        self.offset = offset
        self.pool = pool

    def publish(self, shutting_down: bool = False) -> None:
        """Write this front end's pool state (blocking: reads the workers' /proc memory files)."""
        state = {"pid": os.getpid(), "offset": self.offset, "restarts": self.pool.restarts,
                 "shutting_down": shutting_down, "workers": self.pool.stats()}
        path = os.path.join(self.directory, f"{self.index}.json")
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(state, f)
            os.replace(tmp, path)
        except FileNotFoundError:  # the server's directory is gone: it is stopping
            pass

    def _states(self) -> list[dict[str, Any]]:
        states = []
        try:
            files = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        for file in files:
            if not file.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.directory, file)) as f:
                    states.append(json.load(f))
            except (OSError, ValueError):
                continue
        return states

    def stats(self) -> list[dict[str, Any]]:
        """Every front end's workers (this one's read now), numbered globally."""
        out = []
        for state in self._states():
            if state.get("pid") == os.getpid():
                continue
            out.extend({**s, "index": state["offset"] + s["index"]} for s in state["workers"])
        out.extend({**s, "index": self.offset + s["index"]} for s in self.pool.stats())
        return sorted(out, key=lambda s: s["index"])

    def restarts(self) -> int:
        others = sum(s["restarts"] for s in self._states() if s.get("pid") != os.getpid())
        return others + self.pool.restarts


class Metrics:
    """The server's metrics and their registry (``multiprocess_dir``: shared by the front ends)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if multiprocess_dir is not None:
            from prometheus_client.multiprocess import MultiProcessCollector

            if os.environ.get("PROMETHEUS_MULTIPROC_DIR") != multiprocess_dir:
                raise ValueError("PROMETHEUS_MULTIPROC_DIR must name the multiprocess directory")
            # prometheus_client picks its value class when first imported; this process may have imported
            # it before the variable was set (the supervisor forks the front ends).
            if prometheus_values.ValueClass.__name__ != "MmapedValue":
                prometheus_values.ValueClass = prometheus_values.MultiProcessValue()
            MultiProcessCollector(self.registry, path=multiprocess_dir)
            r = CollectorRegistry()  # the values live in the files; this registry is never rendered
        self.calls = Counter("hlpool_calls", "Calls of guest functions, by snapshot, function and outcome "
                             "('ok' or the error code).", ["snapshot", "function", "outcome"], registry=r)
        self.call_seconds = Histogram("hlpool_call_duration_seconds", "Latency of calls as the server sees it "
                                      "(queueing in the pool included), by snapshot.", ["snapshot"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("hlpool_errors", "Error responses, by stable error code.", ["code"], registry=r)
        self.http_requests = Counter("hlpool_http_requests", "HTTP requests, by method, route and status.",
                                     ["method", "route", "status"], registry=r)
        self.registrations = Counter("hlpool_snapshot_registrations", "Snapshots registered through the API, "
                                     "by outcome.", ["outcome"], registry=r)
        ProcessCollector(namespace="hlpool_server", registry=self.registry)
        self._call_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._request_children: dict[tuple[str, str, int], Any] = {}
        # Not yet added to the metrics (see flush): per label set [calls, seconds, per-bucket counts]
        # (the last bucket is +Inf), and per request label set a count.
        self._call_tally: dict[tuple[str, str, str], list] = {}
        self._request_tally: dict[tuple[str, str, int], int] = {}

    def attach_in_flight(self, count: Callable[[], int]) -> None:
        """``hlpool_calls_in_flight``, read at scrape time (the handlers count calls anyway: no metric
        update per call)."""
        self.registry.register(_InFlightCollector(count))

    def attach_pool(self, stats: Callable[[], list[dict[str, Any]]], restarts: Callable[[], int],
                    snapshots: Callable[[], int], ready: Callable[[], bool]) -> None:
        self.registry.register(PoolCollector(stats, restarts, snapshots, ready))

    def observe_call(self, snapshot: str, function: str, outcome: str, seconds: float) -> None:
        """One call ended (in the event loop's thread, as every other tally and :meth:`flush`)."""
        key = (snapshot, function, outcome)
        tally = self._call_tally.get(key)
        if tally is None:
            if len(self._call_tally) >= 10_000:  # many label sets and nobody scraping: bound the tallies
                self.flush()
            tally = self._call_tally[key] = [0, 0.0, [0] * (len(LATENCY_BUCKETS) + 1)]
        tally[0] += 1
        tally[1] += seconds
        tally[2][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the first bucket with seconds <= le

    def count_request(self, method: str, route: str, status: int) -> None:
        """One HTTP request answered (labels bounded by the caller: known methods and routes)."""
        key = (method, route, status)  # bounded by the caller (known methods, routes and statuses)
        self._request_tally[key] = self._request_tally.get(key, 0) + 1

    def flush(self) -> None:
        """Add what was tallied since the last flush to the metrics (one update per label set)."""
        calls, self._call_tally = self._call_tally, {}
        requests, self._request_tally = self._request_tally, {}
        for key, (count, seconds, buckets) in calls.items():
            counter, histogram = self._children(key)
            counter.inc(count)
            _add_observations(histogram, seconds, buckets)
        for key, count in requests.items():
            child = self._request_children.get(key)
            if child is None:
                child = self._request_children[key] = self.http_requests.labels(key[0], key[1], str(key[2]))
            child.inc(count)

    def _children(self, key: tuple[str, str, str]) -> tuple[Any, Any]:
        """The counter and histogram children of a call label set (labels() takes a lock and builds
        a key: once per label set)."""
        children = self._call_children.get(key)
        if children is None:
            if len(self._call_children) > 10_000:  # removed snapshots' label sets: start over
                self._call_children.clear()
            children = self._call_children[key] = (self.calls.labels(*key), self.call_seconds.labels(key[0]))
        return children

    def render(self) -> bytes:
        self.flush()
        return generate_latest(self.registry)


def _add_observations(histogram: Any, seconds: float, buckets: list[int]) -> None:
    """Add tallied observations to a prometheus_client Histogram child: to its per-bucket values
    and its sum, the attributes its own ``observe`` updates. Should a version of the library lay
    them out otherwise, each observation is replayed at its bucket's bound (counts exact, the sum
    approximate) with a warning."""
    parts, total = getattr(histogram, "_buckets", None), getattr(histogram, "_sum", None)
    if isinstance(parts, list) and len(parts) == len(buckets) and hasattr(total, "inc"):
        total.inc(seconds)
        for part, n in zip(parts, buckets):
            if n:
                part.inc(n)
        return
    log.warning("prometheus_client's Histogram is not laid out as expected: replaying tallied calls")
    for bound, n in zip((*LATENCY_BUCKETS, 2 * LATENCY_BUCKETS[-1]), buckets):
        for _ in range(n):
            histogram.observe(bound)
