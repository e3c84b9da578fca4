"""Pool throughput (calls/s) for 1..W workers, next to Sandbox.call in one process and the bare KVM floor.

    python bench/throughput.py [--quick] [--workers W] [--calls N] [--window-calls M]

In one run: the bare KVM_RUN + out floor (bench/floor.py), Sandbox.call("noop")
in this process, and one :class:`hlpool.Pool` per size 1..W (default W = the
CPU count), all alive at once and measured in interleaved rounds (each round
visits every pool and function), for ``noop()``, ``echo(i)`` (also with the
caller waiting on ``result()`` in order instead of callbacks) and ``sha256`` of 4 KiB:

- latency: ``Pool.submit(...).result()`` one call at a time (p50/p99), and
  ``Sandbox.call`` in this process in every round too (the isolated ratio
  compares the two);
- throughput: calls/s with up to ``WINDOW`` calls outstanding (the median of
  the rounds' rates; the pooled rate, all calls / all time, is in the JSON), and
  the CPU per call of each role over those calls: ``M`` calls per row in all
  (default 20,000). The CPU of other processes is read from /proc in clock ticks
  (10 ms), and each round starts with a full window and ends with a drain: in one
  period, six runs of 1,200 calls (a round of the earlier default) gave 26.4-35.8 µs
  of supervisor CPU per call for ``echo(i)``, six of 20,000 gave 28.2-30.5 µs.

Prints a table and writes bench/results/throughput.json (``data.workers[W][function]``
holds ``latency`` and ``calls_per_s``; bench/plot.py draws calls/s vs workers).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import concurrent.futures
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

try:
    from . import floor as floor_mod
    from .common import Progress, percentiles, print_table, status, write_results
except ImportError:  # run as a script, or imported with bench/ on sys.path
    import floor as floor_mod  # type: ignore[no-redef]
    from common import Progress, percentiles, print_table, status, write_results  # type: ignore[no-redef]

WINDOW = 64
DEFAULT_CALLS = 3000
QUICK_CALLS = 400
DEFAULT_WINDOW_CALLS = 20_000
QUICK_WINDOW_CALLS = 2_000
DEFAULT_ROUNDS = 5
QUICK_ROUNDS = 2
FUNCTIONS = ("noop", "echo(i)", "sha256(4 KiB)", "echo(i) in order")
IN_ORDER = "echo(i) in order"  # the caller waits on its calls' result() in turn (as Pool.map does), no callbacks
PROJECTED_CORES = (16, 64)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pool_threads_cpu() -> float:
    """CPU seconds of this process's pool threads (``hlpool-pool-N``: they move queued calls into the
    channels and take answers that no caller collects), from /proc/self/task."""
    total = 0.0
    for t in threading.enumerate():
        if t.name.startswith("hlpool-pool-") and t.native_id is not None:
            try:
                with open(f"/proc/self/task/{t.native_id}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def worker_pids(pool) -> list[int]:
    return [s["pid"] for s in pool.stats() if s["alive"]]


def projected_calls_per_s(supervisor_us: float, worker_us: float, cores: int) -> float:
    """Calls/s a host with ``cores`` cores saturates at, from the CPU each call costs by role.

    Workers scale with cores; one Pool's supervisor is one Python process whose per-call
    work holds the GIL, so it saturates one core: min(cores / (supervisor + worker), 1 / supervisor).
    An upper bound for one Pool: the supervisor's CPU per call, measured here with 1-2 workers,
    grows with a Pool's worker count at a fixed number of calls outstanding (README, Known limits).
    """
    per_call = (supervisor_us + worker_us) / 1e6
    return min(cores / per_call, 1e6 / supervisor_us) if supervisor_us > 0 else cores / per_call


def latency(fn, n: int) -> list[int]:
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return samples


def throughput(pool, handle, function: str, args: tuple, total: int, window: int,
               bar: Progress | None = None, cpu: dict[str, float] | None = None,
               in_order: bool = False) -> tuple[float, float]:
    """(calls per second, seconds) for ``total`` calls with up to ``window`` outstanding.

    ``cpu``: adds the CPU seconds spent by this process (the supervisor, caller included)
    and by the pool's workers under "supervisor" and "worker". ``in_order``: the caller
    waits on the oldest call's ``result()`` before it submits the next one once the window
    is full (no done-callbacks), as ``Pool.map`` and most ``concurrent.futures`` code do."""
    if callable(args):
        make_args = args
    else:
        def make_args(_i: int, fixed: tuple = args) -> tuple:
            return fixed
    # The caller's window: tokens in a SimpleQueue (C: put and get take no Python-level lock or
    # Condition), one given back by each call's done-callback; the window is whole again once
    # every call has ended.
    tokens: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(window):
        tokens.put(None)
    errors: list[BaseException] = []

    def finished(future: concurrent.futures.Future) -> None:
        exc = future.exception()
        if exc is not None:
            errors.append(exc)
        tokens.put(None)

    pids = worker_pids(pool) if cpu is not None else []
    workers_before = sum(cpu_seconds(p) for p in pids)
    threads_before = pool_threads_cpu() if cpu is not None else 0.0
    own_before = time.process_time()
    start = time.perf_counter()
    if in_order:
        outstanding: collections.deque = collections.deque()
        for i in range(total):
            if len(outstanding) >= window:
                finished(outstanding.popleft())
            outstanding.append(pool.submit(handle, function, make_args(i)))
            if bar is not None:
                bar.update()
        while outstanding:
            finished(outstanding.popleft())
    else:
        for i in range(total):
            tokens.get()
            pool.submit(handle, function, make_args(i)).add_done_callback(finished)
            if bar is not None:
                bar.update()
        for _ in range(window):
            tokens.get()
    elapsed = time.perf_counter() - start
    if cpu is not None:
        cpu["supervisor"] = cpu.get("supervisor", 0.0) + time.process_time() - own_before
        cpu["pool_threads"] = cpu.get("pool_threads", 0.0) + pool_threads_cpu() - threads_before
        cpu["worker"] = cpu.get("worker", 0.0) + sum(cpu_seconds(p) for p in pids) - workers_before
        cpu["calls"] = cpu.get("calls", 0) + total
    if errors:
        raise RuntimeError(f"{len(errors)} calls failed; first: {errors[0]!r}")
    return total / elapsed, elapsed


def run(calls: int, max_workers: int, rounds: int, window_calls: int = DEFAULT_WINDOW_CALLS) -> dict[str, Any]:
    import hashlib

    import hlpool
    from hlpool.guest.examples import example_path

    data = os.urandom(4096)
    digest = hashlib.sha256(data).hexdigest()
    results: dict[str, Any] = {"calls": calls, "rounds": rounds, "window": WINDOW, "max_workers": max_workers,
                               "functions": list(FUNCTIONS), "workers": {}}
    with tempfile.TemporaryDirectory(prefix="hlpool-bench-throughput-") as store, contextlib.ExitStack() as stack:
        # Pools first, while this process has no VMs (each forks its spawner at creation).
        pools = {}
        try:
            for w in range(1, max_workers + 1):
                status(f"starting a pool with {w} worker(s) ...")
                pools[w] = hlpool.Pool(workers=w, snapshot_dir=store)
            status("floor ...")
            floor = percentiles(floor_mod.measure_floor(calls))
            results["floor"] = {"latency": floor, "calls_per_s_at_p50": 1e6 / floor["p50_us"]}

            status("Sandbox.call in this process ...")
            snap = hlpool.Snapshot.from_elf(example_path("echo"))
            # Kept open: its latency is measured in every round next to the pools' (the isolated
            # ratio compares the two; measured once before the rounds, the machine's period could
            # move one and not the other: a run had echo 77 us against noop 89 us).
            sb = stack.enter_context(hlpool.Sandbox(snap))
            for _ in range(200):
                sb.call("noop")
            start = time.perf_counter()
            for _ in range(calls):
                sb.call("noop")
            local_rate = calls / (time.perf_counter() - start)
            local_lat: dict[str, list[int]] = {"noop": [], "echo": []}

            handles = {}
            for w, pool in pools.items():
                echo = pool.snapshot(example_path("echo"))
                sha = pool.snapshot(example_path("sha256"))
                if pool.submit(sha, "sha256", (data,)).result() not in (digest, bytes.fromhex(digest)):
                    raise RuntimeError("sha256 guest returned a wrong digest")
                handles[w] = {"noop": (echo, "noop", ()), "echo(i)": (echo, "echo", lambda i: (i,)),
                              "sha256(4 KiB)": (sha, "sha256", (data,)), IN_ORDER: (echo, "echo", lambda i: (i,))}
                # Warm every worker: enough concurrent calls that each one gets some.
                for label, (h, fn, fargs) in handles[w].items():
                    throughput(pool, h, fn, fargs, 200 * w, WINDOW)

            lat: dict[tuple[int, str], list[int]] = {(w, f): [] for w in pools for f in FUNCTIONS}
            rates: dict[tuple[int, str], list[float]] = {(w, f): [] for w in pools for f in FUNCTIONS}
            spent: dict[tuple[int, str], list[float]] = {(w, f): [] for w in pools for f in FUNCTIONS}
            cpu: dict[tuple[int, str], dict[str, float]] = {}
            per_round_lat = max(1, calls // rounds)
            per_round_tp = max(WINDOW, window_calls // rounds)
            total = rounds * (len(pools) * len(FUNCTIONS) * (per_round_lat + per_round_tp) + 2 * per_round_lat)
            with Progress(total, "throughput") as bar:
                for r in range(rounds):
                    local_lat["noop"].extend(latency(lambda: sb.call("noop"), per_round_lat))
                    local_lat["echo"].extend(latency(lambda: sb.call("echo", 1), per_round_lat))
                    bar.update(2 * per_round_lat)
                    order = list(pools) if r % 2 == 0 else list(pools)[::-1]
                    for w in order:
                        pool = pools[w]
                        for label in FUNCTIONS:
                            h, fn, fargs = handles[w][label]
                            one = fargs(0) if callable(fargs) else fargs
                            lat[(w, label)].extend(
                                latency(lambda: pool.submit(h, fn, one).result(), per_round_lat))
                            bar.update(per_round_lat)
                            rate, secs = throughput(pool, h, fn, fargs, per_round_tp, WINDOW, bar,
                                                    cpu=cpu.setdefault((w, label), {}), in_order=label == IN_ORDER)
                            rates[(w, label)].append(rate)
                            spent[(w, label)].append(secs)
            results["sandbox_call"] = {"latency": percentiles(local_lat["noop"]), "calls_per_s": local_rate,
                                       "echo_latency": percentiles(local_lat["echo"])}
            for w, pool in pools.items():
                entry: dict[str, Any] = {}
                for label in FUNCTIONS:
                    key = (w, label)
                    used = cpu[key]
                    supervisor_us = 1e6 * used["supervisor"] / used["calls"]
                    worker_us = 1e6 * used["worker"] / used["calls"]
                    threads_us = 1e6 * used["pool_threads"] / used["calls"]
                    entry[label] = {
                        "cpu_us_per_call": {"supervisor": supervisor_us, "worker": worker_us,
                                            "supervisor_pool_threads": threads_us,
                                            "supervisor_callers": supervisor_us - threads_us,
                                            "worker_over_supervisor": worker_us / supervisor_us if supervisor_us else None},
                        "projected_calls_per_s": {str(c): projected_calls_per_s(supervisor_us, worker_us, c)
                                                  for c in PROJECTED_CORES},
                        "latency": percentiles(lat[key]),
                        "calls_per_s": statistics.median(rates[key]),
                        "calls_per_s_rounds": rates[key],
                        "calls_per_s_pooled": per_round_tp * len(spent[key]) / sum(spent[key]),
                    }
                entry["stats"] = pool.stats()
                results["workers"][str(w)] = entry
        finally:
            for pool in pools.values():
                pool.shutdown()
    base = results["workers"]["1"]
    for w, entry in results["workers"].items():
        for label in FUNCTIONS:
            entry[label]["speedup_vs_1_worker"] = entry[label]["calls_per_s"] / base[label]["calls_per_s"]
    return results


def print_report(results: dict[str, Any]) -> None:
    floor = results["floor"]["latency"]
    local = results["sandbox_call"]
    rows = [["bare KVM_RUN + out (floor)", "-", floor["p50_us"], floor["p99_us"],
             results["floor"]["calls_per_s_at_p50"], "-", 1.0],
            ["Sandbox.call(noop), 1 process", "-", local["latency"]["p50_us"], local["latency"]["p99_us"],
             local["calls_per_s"], "-", local["latency"]["p50_us"] / floor["p50_us"]]]
    cpu_rows = []
    echo_p50 = local.get("echo_latency", local["latency"])["p50_us"]
    local_p50 = {"noop": local["latency"]["p50_us"], "echo(i)": echo_p50, IN_ORDER: echo_p50}
    for label in results["functions"]:
        for w, entry in results["workers"].items():
            e = entry[label]
            rows.append([f"Pool.submit({label})", w, e["latency"]["p50_us"], e["latency"]["p99_us"],
                         e["calls_per_s"], e["speedup_vs_1_worker"], e["latency"]["p50_us"] / floor["p50_us"]])
            c = e.get("cpu_us_per_call")
            if c:
                ratio = e["latency"]["p50_us"] / local_p50[label] if label in local_p50 else None
                cpu_rows.append([label, w, c["supervisor"], c.get("supervisor_pool_threads", "-"), c["worker"],
                                 c["worker_over_supervisor"], ratio if ratio is not None else "-"]
                                + [e["projected_calls_per_s"][str(n)] for n in PROJECTED_CORES])
    print_table(f"Pool throughput and latency ({results['calls']} calls per latency row, "
                f"{results['rounds']} interleaved rounds; throughput with {results['window']} outstanding; "
                f"{os.cpu_count()} CPUs)",
                ["what", "workers", "p50 us", "p99 us", "calls/s", "x 1 worker", "p50 x floor"], rows)
    print("floor calls/s = 1e6 / p50 (one exit at a time); calls/s = median over rounds.")
    if cpu_rows:
        print_table(f"CPU per call by role ({results['window']} outstanding) and projected saturation",
                    ["function", "workers", "supervisor us", "of it pool threads", "worker us", "worker / supervisor",
                     "isolated p50 x Sandbox.call"] + [f"{n} cores calls/s" for n in PROJECTED_CORES], cpu_rows)
        print("supervisor = this process (the caller's submit loop included: submit() and this benchmark's "
              "window, a SimpleQueue of tokens and a done-callback per call, or for 'in order' result() on the "
              "oldest call in turn, where the caller takes the answers itself); of it pool threads = the pool's "
              "hlpool-pool-N threads (dispatch, answers); worker = all workers' CPU. "
              "Projection: min(cores / (supervisor + worker), 1 / supervisor): workers scale with cores, one "
              "Pool's supervisor is one Python process and saturates one core.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (under a minute)")
    parser.add_argument("--workers", type=int, default=None, help="largest pool size (default: CPU count)")
    parser.add_argument("--calls", type=int, default=None, help=f"calls per latency row (default {DEFAULT_CALLS})")
    parser.add_argument("--rounds", type=int, default=None, help=f"interleaved rounds (default {DEFAULT_ROUNDS})")
    parser.add_argument("--window-calls", type=int, default=None,
                        help=f"calls per throughput/CPU row, {WINDOW} outstanding (default {DEFAULT_WINDOW_CALLS})")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/throughput.json")
    args = parser.parse_args(argv)
    calls = args.calls or (QUICK_CALLS if args.quick else DEFAULT_CALLS)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    window_calls = args.window_calls or (QUICK_WINDOW_CALLS if args.quick else DEFAULT_WINDOW_CALLS)
    max_workers = args.workers or max(1, os.cpu_count() or 1)
    if calls < 1 or rounds < 1 or max_workers < 1 or window_calls < 1:
        parser.error("--calls, --window-calls, --rounds and --workers must be >= 1")
    t0 = time.monotonic()
    results = run(calls, max_workers, rounds, window_calls)
    results["window_calls"] = window_calls
    results["quick"] = bool(args.quick)
    results["elapsed_s"] = time.monotonic() - t0
    print_report(results)
    if not args.no_write:
        path = write_results("throughput", results)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
