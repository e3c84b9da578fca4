"""Pool throughput and latency, next to Sandbox.call in one process and the bare KVM floor.

    python bench/throughput.py [--quick] [--workers 2] [--calls N]

In one run: the bare KVM_RUN + out floor (bench/floor.py), Sandbox.call("noop")
in this process, and for 1..W workers: Pool.submit(...).result() latency one
call at a time (p50/p99), and throughput with many calls outstanding
(calls/s), for noop() and sha256 of 4 KiB. Prints a table and writes
bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import percentiles, print_table, status, write_results  # noqa: E402


def latency(fn, n: int) -> list[int]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return samples


def throughput(pool, handle, function: str, args: tuple, total: int, window: int) -> float:
    """Calls per second with up to ``window`` calls outstanding."""
    import threading

    slots = threading.Semaphore(window)
    done = threading.Event()
    remaining = [total]
    lock = threading.Lock()

    def finished(future: concurrent.futures.Future) -> None:
        future.result()
        slots.release()
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()

    start = time.perf_counter()
    for _ in range(total):
        slots.acquire()
        pool.submit(handle, function, args).add_done_callback(finished)
    done.wait()
    return total / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import hlpool
    from floor import measure_floor
    from hlpool.examples import example_path

    n = args.calls
    rows = []
    results: dict[str, Any] = {"calls": n, "workers": {}}
    status("floor ...")
    floor = percentiles(measure_floor(n))
    rows.append(["bare KVM_RUN + out (floor)", "-", f"{floor['p50_us']:.1f}", f"{floor['p99_us']:.1f}", "-", "1.00"])
    results["floor"] = floor

    status("Sandbox.call in this process ...")
    snap = hlpool.Snapshot.from_elf(example_path("echo"))
    with hlpool.Sandbox(snap) as sb:
        for _ in range(200):
            sb.call("noop")
        local = percentiles(latency(lambda: sb.call("noop"), n))
        start = time.perf_counter()
        for _ in range(n):
            sb.call("noop")
        local_rate = n / (time.perf_counter() - start)
    rows.append(["Sandbox.call(noop), 1 process", "-", f"{local['p50_us']:.1f}", f"{local['p99_us']:.1f}",
                 f"{local_rate:,.0f}", f"{local['p50_us'] / floor['p50_us']:.2f}"])
    results["sandbox_call"] = {"latency": local, "calls_per_s": local_rate}

    data = os.urandom(4096)
    with tempfile.TemporaryDirectory() as store:
        for workers in range(1, args.workers + 1):
            status(f"pool with {workers} worker(s) ...")
            with hlpool.Pool(workers=workers, snapshot_dir=store) as pool:
                echo = pool.snapshot(example_path("echo"))
                sha = pool.snapshot(example_path("sha256"))
                for _ in range(200):
                    pool.submit(echo, "noop").result()
                    pool.submit(sha, "sha256", (data,)).result()
                entry: dict[str, Any] = {}
                for label, handle, fn, fargs in (("noop", echo, "noop", ()), ("sha256(4 KiB)", sha, "sha256", (data,))):
                    lat = percentiles(latency(lambda: pool.submit(handle, fn, fargs).result(), n))
                    rate = throughput(pool, handle, fn, fargs, n * 2, window=64)
                    entry[label] = {"latency": lat, "calls_per_s": rate}
                    rows.append([f"Pool.submit({label})", workers, f"{lat['p50_us']:.1f}", f"{lat['p99_us']:.1f}",
                                 f"{rate:,.0f}", f"{lat['p50_us'] / floor['p50_us']:.2f}"])
                entry["stats"] = pool.stats()
                results["workers"][workers] = entry
    print_table(f"Pool throughput and latency ({n} calls per latency row; throughput with 64 outstanding)",
                ["what", "workers", "p50 us", "p99 us", "calls/s", "p50 x floor"], rows)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (under a minute)")
    parser.add_argument("--workers", type=int, default=2, help="largest pool size (default 2)")
    parser.add_argument("--calls", type=int, default=None, help="calls per measurement")
    args = parser.parse_args(argv)
    if args.calls is None:
        args.calls = 500 if args.quick else 3000
    results = run(args)
    path = write_results("throughput", results)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
