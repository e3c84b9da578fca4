"""What choosing a worker costs the supervisor per call, by pool size (no KVM needed).

    python bench/routing.py [--quick]

:class:`hlpool.pool.routing.Router` picks the worker of every call under the pool's
lock. It used to cost every worker for every call (~1.2 us of Python per worker on the
development machines: 50 us per call with 64 workers, more than all the rest of a
call's supervisor work). Beyond ``FULL_SCAN_WORKERS`` it now costs the home worker,
two holders of the snapshot and two other workers. For 2..256 workers this prints, per
call, the time of both ways (``every worker``: the router made to cost them all), in
two situations:

- ``one hot snapshot``: every worker holds its VM and has calls outstanding (the
  throughput benchmark's case: all workers are candidates for the full scan);
- ``tenants``: 2,000 snapshots, calls one at a time (each goes to its home worker);

and the balance of the load after ``40 x workers`` calls of one snapshot with none
answered (the most loaded worker against the mean: 1.0 is perfect).
Writes bench/results/routing.json.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from typing import Any

try:
    from .common import print_table, status, write_results
except ImportError:  # run as a script
    from common import print_table, status, write_results  # type: ignore[no-redef]

SIZES = (2, 4, 8, 9, 16, 64, 256)
PER_CALL = 0.0001  # seconds per call the router assumes (100 us)
EVERY_WORKER = 10**9  # Router(full_scan_up_to=...) that costs every worker


def _router(n: int, full_scan_up_to: int | None):
    from hlpool.pool.calls import WorkerLink
    from hlpool.pool.routing import Router

    links = [WorkerLink(index=i, alive=True) for i in range(n)]
    return Router(links) if full_scan_up_to is None else Router(links, full_scan_up_to)


def _handle(name: str):
    from hlpool.pool.registry import SnapshotHandle

    return SnapshotHandle(path=f"/store/{name}.snap", exports=("f",), sha256="0" * 64, input_capacity=4096)


def hot_snapshot_us(n: int, full_scan_up_to: int | None, number: int) -> float:
    """us per choice for one snapshot that every worker holds, each with 4 calls outstanding."""
    router = _router(n, full_scan_up_to)
    handle = _handle("echo")
    for w in router.workers:
        router._hold(w, handle.path, handle.path, 32)  # every worker holds its VM
        w.inflight.extend([None] * 4)
    return min(timeit.repeat(lambda: router.choose(handle, PER_CALL, False, 32), number=number, repeat=7)) / number * 1e6


def tenants_us(n: int, full_scan_up_to: int | None, number: int) -> float:
    """us per choice for calls one at a time over 2,000 snapshots."""
    router = _router(n, full_scan_up_to)
    handles = [_handle(f"t{i}") for i in range(2000)]
    turn = iter(range(10**12))

    def one() -> None:
        router.choose(handles[next(turn) % 2000], PER_CALL, False, 32)

    for _ in range(2000):
        one()
    return min(timeit.repeat(one, number=number, repeat=7)) / number * 1e6


def balance(n: int, full_scan_up_to: int | None) -> float:
    """The most loaded worker's calls over the mean, after 40 x n calls of one snapshot (none answered)."""
    router = _router(n, full_scan_up_to)
    handle = _handle("echo")
    for _ in range(40 * n):
        router.choose(handle, PER_CALL, False, 32).inflight.append(None)
    return max(w.load for w in router.workers) / 40


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (seconds)")
    args = parser.parse_args(argv)
    number = 300 if args.quick else 3000
    rows, data = [], {}
    for n in SIZES:
        status(f"{n} workers ...")
        entry: dict[str, Any] = {
            "hot_us": {"every_worker": hot_snapshot_us(n, EVERY_WORKER, number), "router": hot_snapshot_us(n, None, number)},
            "tenants_us": {"every_worker": tenants_us(n, EVERY_WORKER, number), "router": tenants_us(n, None, number)},
            "max_load_over_mean": {"every_worker": balance(n, EVERY_WORKER), "router": balance(n, None)},
        }
        data[str(n)] = entry
        rows.append([n, entry["hot_us"]["every_worker"], entry["hot_us"]["router"], entry["tenants_us"]["every_worker"],
                     entry["tenants_us"]["router"], entry["max_load_over_mean"]["every_worker"],
                     entry["max_load_over_mean"]["router"]])
    print_table("Choosing a worker, us per call (best of 7) and load balance",
                ["workers", "hot: every worker", "hot: router", "tenants: every worker", "tenants: router",
                 "max/mean load: every worker", "max/mean load: router"], rows)
    path = write_results("routing", {"sizes": list(SIZES), "per_call_s": PER_CALL, "quick": args.quick,
                                     "workers": data})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
