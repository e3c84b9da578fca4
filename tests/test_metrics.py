"""The server's call and request metrics are tallied per label set and added to prometheus_client's
metrics in one step per flush: what /metrics shows must be exactly what observing each call would
have shown (prometheus_client itself is the reference), also in multiprocess mode."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from hlpool.service.metrics import LATENCY_BUCKETS, Metrics

# Durations on both sides of every bound, on the bounds themselves (le: bound included), past the last
DURATIONS = [0.0, 0.00005, *LATENCY_BUCKETS, *(b * 1.001 for b in LATENCY_BUCKETS), 45.0, 1e9]


def samples(text: str, name: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^({name}\S*) (\S+)$", text, re.M)}


def reference(durations: list[float]) -> dict[str, float]:
    registry = CollectorRegistry()
    h = Histogram("hlpool_call_duration_seconds", "x", ["snapshot"], buckets=LATENCY_BUCKETS, registry=registry)
    for d in durations:
        h.labels("echo").observe(d)
    return samples(generate_latest(registry).decode(), "hlpool_call_duration_seconds_(?:bucket|count|sum)")


def test_tallied_calls_render_as_observed_calls():
    metrics = Metrics()
    for d in DURATIONS:
        metrics.observe_call("echo", "echo", "ok", d)
    metrics.observe_call("echo", "echo", "guest_fault", 0.001)
    metrics.count_request("POST", "/v1/snapshots/{name}/calls/{function}", 200)
    metrics.count_request("POST", "/v1/snapshots/{name}/calls/{function}", 200)
    text = metrics.render().decode()  # flushes first
    got = samples(text, "hlpool_call_duration_seconds_(?:bucket|count|sum)")
    want = reference(DURATIONS + [0.001])
    assert got.keys() == want.keys() and all(abs(got[k] - want[k]) <= 1e-9 * max(1.0, want[k]) for k in want), \
        (got, want)
    assert samples(text, "hlpool_calls_total")['hlpool_calls_total{function="echo",outcome="ok",snapshot="echo"}'] \
        == len(DURATIONS)
    assert 'hlpool_http_requests_total{method="POST",route="/v1/snapshots/{name}/calls/{function}",status="200"} 2.0' \
        in text
    # a second flush adds only what came since
    metrics.observe_call("echo", "echo", "ok", 0.002)
    again = samples(metrics.render().decode(), "hlpool_calls_total")
    assert again['hlpool_calls_total{function="echo",outcome="ok",snapshot="echo"}'] == len(DURATIONS) + 1


MULTIPROCESS = """
import os, sys
from hlpool.service.metrics import Metrics
m = Metrics(os.environ["PROMETHEUS_MULTIPROC_DIR"])
for d in [float(x) for x in sys.argv[1:]]:
    m.observe_call("echo", "echo", "ok", d)
m.flush()
"""


def test_tallies_of_several_processes_add_up_in_multiprocess_mode(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    halves = DURATIONS[::2], DURATIONS[1::2]
    for half in halves:  # two front ends, each its own process and files
        subprocess.run([sys.executable, "-c", MULTIPROCESS, *map(repr, half)], env=env, check=True, timeout=60)
    reader = ("import os; from hlpool.service.metrics import Metrics; "
              "print(Metrics(os.environ['PROMETHEUS_MULTIPROC_DIR']).render().decode())")
    text = subprocess.run([sys.executable, "-c", reader], env=env, check=True, timeout=60, capture_output=True,
                          text=True).stdout
    got = samples(text, "hlpool_call_duration_seconds_(?:bucket|count|sum)")
    want = reference(DURATIONS)
    assert got.keys() == want.keys() and all(abs(got[k] - want[k]) <= 1e-9 * max(1.0, want[k]) for k in want), \
        (got, want)


def test_tallies_stay_bounded_without_a_scrape():
    """Label sets beyond 10,000 before any render are flushed into the metrics on the way (nothing lost)."""
    metrics = Metrics()
    for i in range(10_050):
        metrics.observe_call(f"s{i}", "f", "ok", 0.001)
    assert len(metrics._call_tally) <= 10_000
    text = metrics.render().decode()
    assert text.count('hlpool_calls_total{function="f",outcome="ok",snapshot="s') == 10_050
