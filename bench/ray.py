"""RayPool on a local multi-node Ray cluster next to a local Pool: latency, calls/s, bytes shipped per node.

    python bench/ray.py [--quick] [--nodes N] [--calls N]

Starts a Ray cluster of N nodes on this machine (``ray.cluster_utils.Cluster``, every
process on 127.0.0.1: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; 1 CPU and a 100 MB object
store per node), one :class:`hlpool.ray.RayPool` with one worker per node, and one local
:class:`hlpool.Pool` with as many workers, and measures both in interleaved rounds, for
``noop()`` and ``sha256`` of 4 KiB:

- latency: ``submit(...).result()`` one call at a time (p50/p99);
- throughput: calls/s with up to ``WINDOW`` calls outstanding;
- overhead: RayPool / Pool for both (the cost of the driver -> actor hop, Ray's task
  submission and result objects, on top of the node's own Pool), next to a bare Ray actor
  call (Ray's floor on this machine);
- the driver's CPU per call (this process, all threads): what bounds one driver's calls/s
  on a real cluster, where the nodes have their own cores.

Then, per snapshot (three example guests and a layered child of one), the bytes each node
fetched from the object store the first time a call of it landed there: each node gets the
snapshot's files once (the node that built it, none), a child only its own layer.

All nodes share this machine's cores, so this measures Ray's overhead per call and the
shipping, not a cluster's scale-out (see docs/ray.md). Writes bench/results/ray.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: everything on 127.0.0.1

try:
    from .common import percentiles, print_table, status, write_results
except ImportError:  # run as a script, or imported with bench/ on sys.path
    from common import percentiles, print_table, status, write_results  # type: ignore[no-redef]

WINDOW = 16
DEFAULT_CALLS = 2000
QUICK_CALLS = 300
DEFAULT_ROUNDS = 3
QUICK_ROUNDS = 2
NODE_ARGS = {"num_cpus": 1, "object_store_memory": 100 * 2**20, "node_ip_address": "127.0.0.1"}


def latency_ns(pool: Any, handle: Any, fn: str, args: tuple, n: int) -> list[int]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        pool.submit(handle, fn, args).result(timeout=60)
        samples.append(time.perf_counter_ns() - t0)
    return samples


def calls_per_s(pool: Any, handle: Any, fn: str, args: tuple, n: int, window: int = WINDOW) -> tuple[float, float]:
    """(calls/s, CPU microseconds this process, the driver or supervisor, spent per call)."""
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    outstanding: set[concurrent.futures.Future] = set()
    for _ in range(n):
        if len(outstanding) >= window:
            done, outstanding = concurrent.futures.wait(outstanding, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                f.result()
        outstanding.add(pool.submit(handle, fn, args))
    for f in concurrent.futures.as_completed(outstanding, timeout=120):
        f.result()
    return n / (time.perf_counter() - t0), (time.process_time() - cpu0) / n * 1e6


class _Floor:
    """A bare async Ray actor: the round trip of a Ray actor call with nothing of hlpool in it."""

    async def noop(self) -> None:
        return None


def ray_floor_ns(ray: Any, n: int) -> list[int]:
    """Latency of ``actor.noop.remote()`` + ``ray.get`` on an async actor of another node (Ray's floor)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    me = ray.get_runtime_context().get_node_id()
    other = next((n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != me), me)
    actor = ray.remote(_Floor).options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        other, soft=False)).remote()
    try:
        for _ in range(20):
            ray.get(actor.noop.remote())
        samples = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            ray.get(actor.noop.remote())
            samples.append(time.perf_counter_ns() - t0)
        return samples
    finally:
        ray.kill(actor)


def shipped_per_node(ray_pool: Any, register, fn: str, args: tuple, spread_calls: int) -> dict[str, Any]:
    """Register a snapshot, run calls until every node ran one, and report what each node fetched."""
    before = {s["node_id"]: s for s in ray_pool.stats()}
    handle = register()
    for _attempt in range(10):
        futures = [ray_pool.submit(handle, fn, args) for _ in range(spread_calls)]
        for f in futures:
            f.result(timeout=60)
        after = {s["node_id"]: s for s in ray_pool.stats()}
        if all(after[n]["calls"] > before[n]["calls"] for n in after if n in before):
            break
    fetched = sorted(after[n]["fetched_bytes"] - before[n]["fetched_bytes"] for n in after if n in before)
    fetches = sorted(after[n]["fetches"] - before[n]["fetches"] for n in after if n in before)
    # a second round sends nothing
    for f in [ray_pool.submit(handle, fn, args) for _ in range(spread_calls)]:
        f.result(timeout=60)
    again = {s["node_id"]: s for s in ray_pool.stats()}
    resent = sum(again[n]["fetched_bytes"] - after[n]["fetched_bytes"] for n in again if n in after)
    return {"file_bytes": os.path.getsize(handle.path), "fetched_bytes_per_node": fetched,
            "fetches_per_node": fetches, "bytes_resent_second_round": resent}


def _import_ray() -> Any:
    """The ray package (run as a script, bench/ is on sys.path and ``import ray`` would find this file)."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    if os.path.abspath(getattr(sys.modules.get("ray"), "__file__", None) or "") == os.path.abspath(__file__):
        del sys.modules["ray"]
    import ray

    return ray


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under 2 minutes)")
    parser.add_argument("--nodes", type=int, default=3, help="Ray nodes on this machine (default 3)")
    parser.add_argument("--calls", type=int, help="calls per measurement")
    parser.add_argument("--in-flight", type=int, help="RayPool max_in_flight_per_node (default: the RayPool's)")
    args = parser.parse_args(argv)
    calls = args.calls or (QUICK_CALLS if args.quick else DEFAULT_CALLS)
    rounds = QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS
    latency_calls = max(50, calls // 3)

    ray = _import_ray()
    from ray.cluster_utils import Cluster

    from hlpool import Pool
    from hlpool.guest.examples import example_path
    from hlpool.ray import RayPool

    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="hlpool-bench-ray-")
    status(f"starting a {args.nodes}-node Ray cluster on 127.0.0.1")
    cluster = Cluster(initialize_head=True, head_node_args={**NODE_ARGS, "include_dashboard": False})
    ray_pool = local = None
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(**NODE_ARGS)
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
        ray_pool = RayPool(workers_per_node=1, snapshot_dir=os.path.join(work, "driver"),
                           node_snapshot_dir=os.path.join(work, "nodes", "{node_id}"), min_nodes=args.nodes,
                           max_in_flight_per_node=args.in_flight)
        local = Pool(workers=args.nodes, snapshot_dir=os.path.join(work, "local"))
        status(f"cluster and pools up in {time.monotonic() - started:.1f} s")
        data = os.urandom(4096)
        digest = hashlib.sha256(data).hexdigest()
        pools = {"Pool": local, "RayPool": ray_pool}
        handles = {name: {"noop": p.snapshot(example_path("echo")), "sha256": p.snapshot(example_path("sha256"))}
                   for name, p in pools.items()}
        functions = {"noop()": ("noop", "noop", ()), "sha256(4 KiB)": ("sha256", "sha256", (data,))}
        for name, p in pools.items():  # warm every worker's VMs, and check the answers
            for label, (snap, fn, fargs) in functions.items():
                for f in [p.submit(handles[name][snap], fn, fargs) for _ in range(8 * args.nodes)]:
                    value = f.result(timeout=60)
                    if label.startswith("sha256") and value not in (digest, bytes.fromhex(digest)):
                        raise SystemExit(f"{name}: wrong sha256 {value!r}")
        lat: dict[str, dict[str, list[int]]] = {n: {f: [] for f in functions} for n in pools}
        rates: dict[str, dict[str, list[float]]] = {n: {f: [] for f in functions} for n in pools}
        cpu: dict[str, dict[str, list[float]]] = {n: {f: [] for f in functions} for n in pools}
        for r in range(rounds):
            status(f"round {r + 1}/{rounds}")
            for label, (snap, fn, fargs) in functions.items():
                for name, p in pools.items():
                    lat[name][label] += latency_ns(p, handles[name][snap], fn, fargs, latency_calls // rounds)
                    rate, cpu_us = calls_per_s(p, handles[name][snap], fn, fargs, calls // rounds)
                    rates[name][label].append(rate)
                    cpu[name][label].append(cpu_us)
        floor = percentiles(ray_floor_ns(ray, latency_calls))
        results: dict[str, Any] = {"ray_actor_call_floor": floor, "nodes": args.nodes, "workers_per_node": 1, "window": WINDOW, "calls": calls,
                                   "max_in_flight_per_node": ray_pool.max_in_flight_per_node,
                                   "rounds": rounds, "functions": {}}
        rows = []
        for label in functions:
            entry = {}
            for name in pools:
                entry[name] = {"latency": percentiles(lat[name][label]),
                               "calls_per_s": statistics.median(rates[name][label]),
                               "calls_per_s_rounds": rates[name][label],
                               "driver_cpu_us_per_call": statistics.median(cpu[name][label])}
            entry["overhead"] = {
                "p50_ratio": entry["RayPool"]["latency"]["p50_us"] / entry["Pool"]["latency"]["p50_us"],
                "p99_ratio": entry["RayPool"]["latency"]["p99_us"] / entry["Pool"]["latency"]["p99_us"],
                "calls_per_s_ratio": entry["Pool"]["calls_per_s"] / entry["RayPool"]["calls_per_s"],
            }
            results["functions"][label] = entry
            for name in pools:
                e = entry[name]
                rows.append([f"{label} {name}", e["latency"]["p50_us"], e["latency"]["p99_us"], e["calls_per_s"],
                             e["driver_cpu_us_per_call"]])
            rows.append([f"{label} RayPool/Pool", entry["overhead"]["p50_ratio"], entry["overhead"]["p99_ratio"],
                         1 / entry["overhead"]["calls_per_s_ratio"], None])
        rows.append(["bare Ray actor call (floor)", floor["p50_us"], floor["p99_us"], None, None])
        print_table(f"RayPool ({args.nodes} local nodes x 1 worker) vs Pool ({args.nodes} workers), window "
                    f"{WINDOW}", ["function / pool", "p50 us", "p99 us", "calls/s", "driver CPU us/call"], rows)

        status("shipping: bytes each node fetched per snapshot")
        spread = 6 * args.nodes
        shipping = {
            "fib": shipped_per_node(ray_pool, lambda: ray_pool.snapshot(example_path("fib")), "fib", (10,), spread),
            "touch": shipped_per_node(ray_pool, lambda: ray_pool.snapshot(example_path("touch")), "bump", (), spread),
        }
        touch = ray_pool.snapshot(example_path("touch"))
        shipping["touch child (derived layer)"] = shipped_per_node(
            ray_pool, lambda: ray_pool.derive(touch, [("bump", ())] * 2), "bump", (), spread)
        results["shipping"] = shipping
        print_table("bytes fetched by each node (sorted; 0: the node that built it)",
                    ["snapshot", "file bytes", "fetched per node", "fetches per node", "resent"],
                    [[name, s["file_bytes"], " ".join(str(b) for b in s["fetched_bytes_per_node"]),
                      " ".join(str(b) for b in s["fetches_per_node"]), s["bytes_resent_second_round"]]
                     for name, s in shipping.items()])
        results["elapsed_s"] = time.monotonic() - started
        path = write_results("ray", results)
        status(f"wrote {path} ({results['elapsed_s']:.0f} s)")
    finally:
        if local is not None:
            local.shutdown()
        if ray_pool is not None:
            ray_pool.shutdown()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
