#!/usr/bin/env python3
"""Many tenants on few warm VMs: registration, calls, memory and disk per tenant.

Question: with N tenants (N = 100, 1,000, 10,000) served by a 2-worker Pool, what do
registration, a call (p50/p99, calls/s) and a tenant (resident memory, disk) cost,
and how does that compare with the alternatives?

Tenants:
- ``js``: a JavaScript script each (``Pool.script``), a layer on the QuickJS base:
  ``let calls = 0; function who(x) { calls += 1; return [ID, calls, x]; }``.
- ``c``: a child of one C base each (a sandbox of the base runs ``set(ID)``, which
  writes the id and a few pages of tenant data, captured with ``Sandbox.snapshot``
  and registered with ``Pool.snapshot``); ``who(x)`` returns ``[ID, calls, x]``.

Every answer is checked: ``[ID, 1, x]`` (its own id; ``calls`` is 1 because every
call starts from the tenant's snapshot). Wrong answers are counted (must be 0).

Modes, side by side in one run:
- ``pool``: ``Pool(workers=2)`` as it is (tenants switched on warm VMs if the Pool
  does that: ``switch_tenants`` default);
- ``pool-noswitch``: ``Pool(switch_tenants=False)``, a VM per tenant (only if the
  Pool has that option);
- ``wasmtime``: wasmtime-py in this process, one Store+Instance per tenant (a
  module with the tenant's id in a global; its state is NOT reset between calls, so
  its expected ``calls`` count goes up);
- ``fresh-vm``: a Sandbox created from the tenant's snapshot file, called once and
  closed, in this process, for a sample of calls (``js`` only).

Access: ``uniform`` or ``zipf`` (s = 1.1) over the tenants. Latency: one call at a
time (submit -> result); calls/s: a window of 16 outstanding calls.

Memory ("resident growth per tenant"): measured after the warm-up tenant and after
all N tenants were registered and called, divided by N, three ways: the memory
cgroup's charge minus its page cache (memory.current - memory.stat file), the
machine's MemAvailable drop, and the Pss of the pool's processes (anon + shmem: no
page cache). The cgroup and MemAvailable include whatever else runs on the machine
(other jobs); the Pss figure does not include kernel memory (VMs). Disk per tenant:
the store's bytes (file sizes) / N.

Also (``--layers``): the size of script layers (pages) over ~50 varied JS and Lua
scripts, and which layout areas (and image symbols) a one-line script's layer holds.

    .venv/bin/python bench/tenants.py --quick      # N = 100, 1000; < 3 min
    .venv/bin/python bench/tenants.py              # N = 100, 1000, 10000
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gc
import inspect
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, file_create_us, percentiles, print_table, status, write_results  # noqa: E402

from hlpool import Pool, Sandbox, Snapshot  # noqa: E402
from hlpool.guest.build import build_guest  # noqa: E402

PAGE = 4096
WINDOW = 16

JS_TENANT = "let calls = 0; function who(x) {{ calls += 1; return [{id}, calls, x]; }}"

C_GUEST = r"""
#include <hlpool.h>
#include <string.h>
static long long tenant_id = -1, calls;
static char data[3 * 4096];  /* a few pages of tenant state, written by set() */
static hl_value set(const hl_args *a) {
    tenant_id = hl_arg_int(a, 0);
    memset(data, (int)(tenant_id & 0x7f) | 1, sizeof data);
    return hl_int(tenant_id);
}
static hl_value who(const hl_args *a) {
    calls += 1;
    hl_value items[3] = {hl_int(tenant_id + (data[4096] == 0)), hl_int(calls), hl_int(hl_arg_int(a, 0))};
    return hl_list(3, items);
}
int hl_main(void) { hl_export("set", set); hl_export("who", who); return 0; }
"""

WASM_TENANT = """(module
  (memory 1)
  (global $id (mut i64) (i64.const 0))
  (global $calls (mut i64) (i64.const 0))
  (func (export "set") (param $v i64) (global.set $id (local.get $v)))
  (func (export "who") (param $x i64) (result i64)
    (global.set $calls (i64.add (global.get $calls) (i64.const 1)))
    (i64.add (i64.mul (global.get $id) (i64.const 1000000))
             (i64.add (i64.mul (global.get $calls) (i64.const 1000)) (local.get $x)))))
"""


# ---- memory ---------------------------------------------------------------------------------------


def _cgroup_memory() -> tuple[Path, str, str] | None:
    """(directory, charge file, page-cache key of memory.stat) of this process's memory cgroup (v2 or v1)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            d = Path("/sys/fs/cgroup") / path.lstrip("/")
            if (d / "memory.current").exists():
                return d, "memory.current", "file"
        elif "memory" in controllers.split(","):
            d = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (d / "memory.usage_in_bytes").exists():
                return d, "memory.usage_in_bytes", "total_cache"
    return None


def _cgroup_resident() -> int | None:
    """The cgroup's memory charge minus its page cache (file pages: reclaimable)."""
    found = _cgroup_memory()
    if found is None:
        return None
    d, charge, cache = found
    try:
        current = int((d / charge).read_text())
        stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines())
        return current - int(stat.get(cache, stat.get("cache", 0)))
    except (OSError, ValueError):
        return None


def _cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` (and of their waited-for children), in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15])
        except (OSError, ValueError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def _map_count(pid: int) -> int:
    """Mappings of ``pid`` (vm.max_map_count bounds them; 65530 by default)."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return -1


def _builders() -> list[int]:
    out = []
    for pid in _descendants(os.getpid()):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "hlpool-builder":
                out.append(pid)
        except OSError:
            pass
    return out


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _pss_anon(pids: list[int]) -> int:
    """Pss_Anon + Pss_Shmem of ``pids`` (bytes): what they pay for, page cache excluded."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
    return total


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children[ppid].append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def memory_now() -> dict[str, int | None]:
    gc.collect()
    return {"cgroup": _cgroup_resident(), "available": _mem_available(), "pss": _pss_anon(_descendants(os.getpid()))}


def memory_growth(before: dict, after: dict, n: int) -> dict[str, float | None]:
    def per(key: str, sign: int = 1) -> float | None:
        if before[key] is None or after[key] is None:
            return None
        return sign * (after[key] - before[key]) / n / 1024

    return {"cgroup_kib_per_tenant": per("cgroup"), "memavailable_kib_per_tenant": per("available", -1),
            "pss_kib_per_tenant": per("pss")}


# ---- access patterns --------------------------------------------------------------------------------


def picker(n: int, dist: str, rng: random.Random) -> Callable[[], int]:
    if dist == "uniform":
        return lambda: rng.randrange(n)
    weights = [1.0 / (k + 1) ** 1.1 for k in range(n)]  # Zipf(1.1): tenant k by popularity rank
    total = sum(weights)
    cumulative, acc = [], 0.0
    for w in weights:
        acc += w / total
        cumulative.append(acc)
    order = list(range(n))
    rng.shuffle(order)  # popular tenants are not the first registered
    return lambda: order[min(bisect.bisect_left(cumulative, rng.random()), n - 1)]


# ---- the pool modes -----------------------------------------------------------------------------------


def has_switch_option() -> bool:
    return "switch_tenants" in inspect.signature(Pool).parameters


def build_c_guest(work: Path) -> Path:
    src = work / "tenant_guest.c"
    src.write_text(C_GUEST)
    return build_guest([src], work / "tenant_guest.elf")


def register_js(pool: Pool, n: int, first: int = 0) -> tuple[list[Any], list[float]]:
    handles, times = [], []
    for i in range(first, first + n):
        t = time.perf_counter()
        handles.append(pool.script("js", JS_TENANT.format(id=i)))
        times.append(time.perf_counter() - t)
    return handles, times


def register_c(pool: Pool, base_handle: Any, n: int, first: int = 0) -> tuple[list[Any], list[float]]:
    """Children of the C base: made in this process (one sandbox, restored between), stored by the pool."""
    handles, times = [], []
    with Sandbox(Snapshot.open(base_handle.path)) as sb:
        for i in range(first, first + n):
            t = time.perf_counter()
            sb.call("set", i, restore=False)
            child = sb.snapshot()
            sb.restore()
            handles.append(pool.snapshot(child))
            times.append(time.perf_counter() - t)
            del child
    return handles, times


def serve(pool: Pool, handles: list[Any], dist: str, calls: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    pick = picker(len(handles), dist, rng)
    wrong = 0
    latencies = []
    for k in range(calls):  # latency: one call at a time
        i = pick()
        t = time.perf_counter_ns()
        result = pool.submit(handles[i], "who", (k,)).result(timeout=60)
        latencies.append(time.perf_counter_ns() - t)
        wrong += result != [i, 1, k]
    expected: dict[int, tuple[int, int]] = {}
    futures: collections.deque = collections.deque()
    t0 = time.perf_counter()
    for k in range(calls):  # throughput: a window of outstanding calls
        i = pick()
        futures.append((i, k, pool.submit(handles[i], "who", (k,))))
        if len(futures) >= WINDOW:
            j, x, f = futures.popleft()
            wrong += f.result(timeout=60) != [j, 1, x]
    while futures:
        j, x, f = futures.popleft()
        wrong += f.result(timeout=60) != [j, 1, x]
    elapsed = time.perf_counter() - t0
    del expected
    return {"latency": percentiles(latencies), "calls_per_s": calls / elapsed, "wrong": wrong, "calls": 2 * calls}


def vm_counters(pool: Pool) -> dict[str, int]:
    """Sums over workers of every numeric counter pool.stats() has (vms, and any VM counters it adds)."""
    out: dict[str, int] = collections.Counter()
    skip = {"index", "pid", "rss_kib", "pss_kib", "queued", "in_flight", "alive"}
    for w in pool.stats():
        for key, value in w.items():
            if key not in skip and isinstance(value, int) and not isinstance(value, bool):
                out[key] += value
    return dict(out)


def run_pool(kind: str, n: int, mode: str, dists: list[str], calls: int, work: Path,
             c_elf: Path | None, fresh_sample: int) -> dict[str, Any]:
    store = Path(tempfile.mkdtemp(prefix=f"store-{kind}-{n}-", dir=work))  # removed with ``work``, at the end
    options: dict[str, Any] = {}
    if mode == "pool-noswitch":
        options["switch_tenants"] = False
    out: dict[str, Any] = {"kind": kind, "n": n, "mode": mode}
    with Pool(workers=2, snapshot_dir=store, call_timeout=30, max_pending=4096, **options, **json.loads(os.environ.get("HLPOOL_BENCH_POOL_OPTIONS", "{}"))) as pool:
        if kind == "js":
            warm, _ = register_js(pool, 1, first=10 ** 6)
        else:
            base = pool.snapshot(str(c_elf))
            warm, _ = register_c(pool, base, 1, first=10 ** 6)
        for _ in range(4):
            assert pool.submit(warm[0], "who", (0,)).result(timeout=60)[0] == 10 ** 6
        usage0 = pool.store.usage()
        before = memory_now()
        fds0 = len(os.listdir("/proc/self/fd"))
        roles = [os.getpid()] + _builders()
        out["file_create_us"] = file_create_us(store)
        cpu0 = _cpu_seconds(roles)
        t0 = time.perf_counter()
        handles, times = register_js(pool, n) if kind == "js" else register_c(pool, base, n)
        out["register_s"] = time.perf_counter() - t0
        # CPU time of this process (supervisor; for C also the capture) and the script builder, per tenant:
        # what a registration costs the machine, less sensitive than wall time to other jobs on it
        out["register_cpu_us"] = (_cpu_seconds(roles) - cpu0) / n * 1e6
        out["load_average"] = os.getloadavg()[0]
        out["register"] = percentiles([t * 1e9 for t in times])
        for dist in dists:
            status(f"  {mode} {kind} N={n} {dist}")
            out[dist] = serve(pool, handles, dist, calls, seed=n)
        after = memory_now()
        out["memory"] = memory_growth(before, after, n)
        out["disk_bytes_per_tenant"] = (pool.store.usage() - usage0) / n
        out["supervisor_fds"] = {"before": fds0, "after": len(os.listdir("/proc/self/fd"))}
        out["vm_counters"] = vm_counters(pool)
        out["worker_fds"] = [len(os.listdir(f"/proc/{w['pid']}/fd")) for w in pool.stats() if w["alive"]]
        out["worker_maps"] = [_map_count(w["pid"]) for w in pool.stats() if w["alive"]]
        if fresh_sample and mode == "pool":
            out["fresh_vm"] = fresh_vm_calls(handles, fresh_sample, dists[0], seed=n)
    return out


def fresh_vm_calls(handles: list[Any], sample: int, dist: str, seed: int) -> dict[str, Any]:
    """A Sandbox created from the tenant's file, called once and closed, per call (in this process)."""
    rng = random.Random(seed + 1)
    pick = picker(len(handles), dist, rng)
    latencies, wrong = [], 0
    for k in range(sample):
        i = pick()
        t = time.perf_counter_ns()
        snap = Snapshot.open(handles[i].path)
        with Sandbox(snap) as sb:
            result = sb.call("call", "who", [k]) if handles[i].language else sb.call("who", k)
        latencies.append(time.perf_counter_ns() - t)
        wrong += result != [i, 1, k]
        for layer in snap.layers:
            layer.close()
    return {"latency": percentiles(latencies), "calls_per_s": sample / (sum(latencies) / 1e9), "wrong": wrong,
            "calls": sample}


def run_wasmtime(n: int, dists: list[str], calls: int) -> dict[str, Any] | None:
    try:
        import wasmtime
    except ImportError:
        return None
    engine = wasmtime.Engine()
    module = wasmtime.Module(engine, WASM_TENANT)
    before = memory_now()
    t0 = time.perf_counter()
    tenants = []
    for i in range(n):
        store = wasmtime.Store(engine)
        instance = wasmtime.Instance(store, module, [])
        instance.exports(store)["set"](store, i)
        tenants.append((store, instance.exports(store)["who"]))
    register_s = time.perf_counter() - t0
    out: dict[str, Any] = {"kind": "wasm", "n": n, "mode": "wasmtime", "register_s": register_s,
                           "register": {"mean_us": register_s / n * 1e6}}
    counts = [0] * n
    for dist in dists:
        rng = random.Random(n)
        pick = picker(n, dist, rng)
        latencies, wrong = [], 0
        for k in range(calls):
            i = pick()
            store, who = tenants[i]
            t = time.perf_counter_ns()
            result = who(store, k % 1000)
            latencies.append(time.perf_counter_ns() - t)
            counts[i] += 1  # a wasm instance keeps its state between calls
            wrong += result != i * 1000000 + counts[i] * 1000 + k % 1000
        out[dist] = {"latency": percentiles(latencies), "calls_per_s": calls / (sum(latencies) / 1e9),
                     "wrong": wrong, "calls": calls}
    out["memory"] = memory_growth(before, memory_now(), n)
    out["disk_bytes_per_tenant"] = 0
    del tenants
    return out


# ---- script layers (part of the question: what does a tenant's layer hold?) ---------------------------


JS_VARIETY = [
    "function f() { return 1; }",
    "function add(a, b) { return a + b; }",
    "let n = 0; function inc() { return ++n; }",
    "const greet = (name) => 'hello ' + name;",
    "function fib(n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }",
    "const table = {}; for (let i = 0; i < 100; i++) table['k' + i] = i * i; function get(k) { return table[k]; }",
    "class Counter { constructor() { this.n = 0; } inc() { return ++this.n; } } const c = new Counter();",
    "function handler(e) { return {greeting: 'hi ' + e.name, n: e.n * 2}; }",
    "const words = 'the quick brown fox jumps over the lazy dog'.split(' '); function pick(i) { return words[i % 9]; }",
    "function sum(xs) { return xs.reduce((a, b) => a + b, 0); }",
    "const re = /([a-z]+)@([a-z]+)\\.com/; function parse(s) { const m = re.exec(s); return m ? [m[1], m[2]] : null; }",
    "const big = new Array(1000).fill(0).map((_, i) => i); function at(i) { return big[i]; }",
    "function json(s) { return JSON.parse(s); } function str(v) { return JSON.stringify(v); }",
    "const m = new Map(); function put(k, v) { m.set(k, v); return m.size; }",
    "function sort(xs) { return xs.slice().sort((a, b) => a - b); }",
]
LUA_VARIETY = [
    "function f() return 1 end",
    "function add(a, b) return a + b end",
    "local n = 0\nfunction inc() n = n + 1 return n end",
    "function greet(name) return 'hello ' .. name end",
    "function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end",
    "local t = {} for i = 1, 100 do t['k' .. i] = i * i end\nfunction get(k) return t[k] end",
    "Counter = {}\nCounter.__index = Counter\nfunction Counter.new() return setmetatable({n = 0}, Counter) end",
    "function handler(e) return {greeting = 'hi ' .. e.name, n = e.n * 2} end",
    "local words = {'the', 'quick', 'brown', 'fox'}\nfunction pick(i) return words[i % 4 + 1] end",
    "function sum(xs) local s = 0 for _, x in ipairs(xs) do s = s + x end return s end",
    "function parse(s) return string.match(s, '(%a+)@(%a+)%.com') end",
    "local big = {} for i = 1, 1000 do big[i] = i end\nfunction at(i) return big[i] end",
    "function upper(s) return string.upper(s) end\nfunction rev(s) return string.reverse(s) end",
    "local m = {}\nfunction put(k, v) m[k] = v local c = 0 for _ in pairs(m) do c = c + 1 end return c end",
    "function sort(xs) table.sort(xs) return xs end",
]


def varied_scripts(language: str, count: int) -> list[str]:
    base = JS_VARIETY if language == "js" else LUA_VARIETY
    out = []
    for k in range(count):
        src = base[k % len(base)]
        # the same shapes with different constants and names (as tenants' scripts differ)
        out.append(src + (f"\nconst tag{k} = {k};" if language == "js" else f"\ntag{k} = {k}"))
    return out


def layer_sizes(count: int) -> dict[str, Any]:
    from hlpool.sandbox import scripts
    from hlpool.snapshot.regions import regions_of

    out: dict[str, Any] = {}
    for language in ("js", "lua"):
        base = scripts.base_snapshot(language)
        pages = []
        areas: collections.Counter = collections.Counter()
        with Sandbox(base) as sb:
            for k, src in enumerate(varied_scripts(language, count)):
                sb.call("load", src, restore=False)
                child = sb.snapshot()
                sb.restore()
                pages.append(child.layers[-1].size // PAGE)
                if k == 0:  # the one-line script: which areas its pages are in
                    top = len(child.layers) - 1
                    for r in regions_of(child):
                        if r.layer == top:
                            areas[r.area] += r.size // PAGE
                for layer in child.layers[-1:]:
                    layer.close()
        out[language] = {"scripts": count, "base_pages": base.layers[-1].size // PAGE,
                         "min": min(pages), "median": statistics.median(pages), "max": max(pages),
                         "one_line_areas": dict(areas)}
    return out


# ---- output -----------------------------------------------------------------------------------------------


def report(results: list[dict[str, Any]], dists: list[str]) -> None:
    rows = []
    for r in results:
        for dist in dists:
            d = r.get(dist)
            if d is None:
                continue
            mem = r.get("memory", {})
            rows.append([r["mode"], r["kind"], r["n"], dist, d["calls_per_s"], d["latency"]["p50_us"],
                         d["latency"]["p99_us"], d["wrong"], r.get("register", {}).get("mean_us"),
                         r.get("register", {}).get("p99_us"), r.get("register_cpu_us"),
                         mem.get("cgroup_kib_per_tenant"),
                         mem.get("memavailable_kib_per_tenant"), mem.get("pss_kib_per_tenant"),
                         (r.get("disk_bytes_per_tenant") or 0) / 1024, r.get("vm_counters", {}).get("vms"),
                         r.get("file_create_us")])
            fresh = r.get("fresh_vm")
            if fresh and dist == dists[0]:
                rows.append(["fresh-vm", r["kind"], r["n"], dist, fresh["calls_per_s"], fresh["latency"]["p50_us"],
                             fresh["latency"]["p99_us"], fresh["wrong"], None, None, None, None, None, None, None,
                             None, None])
    print_table("Tenants: 2 workers (latency: one call at a time; calls/s: 16 outstanding)",
                ["mode", "kind", "N", "access", "calls/s", "p50 us", "p99 us", "wrong", "reg mean us",
                 "reg p99 us", "reg CPU us", "cgroup KiB/t", "MemAvail KiB/t", "Pss KiB/t", "disk KiB/t", "VMs",
                 "fs create us"], rows)
    print("fs create us: median time to create a file in the store's directory before registering (ext4 is far "
          "slower for minutes after many deletions; each row's store is kept until the end of the run)")


def plot(results: list[dict[str, Any]], dists: list[str], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[tuple[str, str], list[tuple[int, float, float | None]]] = collections.defaultdict(list)
    for r in results:
        d = r.get(dists[0])
        if d is None:
            continue
        mem = r.get("memory", {}).get("cgroup_kib_per_tenant")
        if mem is None:
            mem = r.get("memory", {}).get("pss_kib_per_tenant")
        series[(r["mode"], r["kind"])].append((r["n"], d["latency"]["p99_us"], mem))
    for (mode, kind), points in sorted(series.items()):
        points.sort()
        xs = [p[0] for p in points]
        left.plot(xs, [p[1] for p in points], marker="o", label=f"{mode} {kind}")
        if any(p[2] is not None for p in points):
            right.plot(xs, [p[2] if p[2] is not None else float("nan") for p in points], marker="o",
                       label=f"{mode} {kind}")
    for ax, title, ylabel in ((left, f"p99 call latency ({dists[0]} access)", "p99 (us)"),
                              (right, "resident growth per tenant", "KiB per tenant")):
        ax.set_xscale("log")
        ax.set_xlabel("tenants")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    left.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 100 and 1000, few calls (< 3 min)")
    parser.add_argument("--sizes", type=int, nargs="+", help="tenant counts (default 100 1000 10000)")
    parser.add_argument("--calls", type=int, help="calls per (N, access) and pass (default 2000; quick 500)")
    parser.add_argument("--kinds", nargs="+", default=["js", "c"], choices=["js", "c"])
    parser.add_argument("--modes", nargs="+", default=["pool", "pool-noswitch", "wasmtime"],
                        choices=["pool", "pool-noswitch", "wasmtime"])
    parser.add_argument("--fresh-sample", type=int, help="fresh-VM calls per JS run (default 200; quick 50)")
    parser.add_argument("--layers", type=int, default=50, help="scripts per language for the layer sizes (0: skip)")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([100, 1000] if args.quick else [100, 1000, 10000])
    calls = args.calls or (500 if args.quick else 2000)
    fresh = args.fresh_sample if args.fresh_sample is not None else (50 if args.quick else 200)
    dists = ["uniform", "zipf"]
    modes = [m for m in args.modes if m != "pool-noswitch" or has_switch_option()]
    if "pool-noswitch" in args.modes and "pool-noswitch" not in modes:
        status("Pool has no switch_tenants option (yet): pool-noswitch skipped; 'pool' is a VM per tenant then")
    work = Path(tempfile.mkdtemp(prefix="hlpool-tenants-"))
    data: dict[str, Any] = {"sizes": sizes, "calls": calls, "window": WINDOW, "dists": dists, "modes": modes,
                            "switch_option": has_switch_option(), "results": []}
    started = time.monotonic()
    try:
        if args.layers:
            status("script layer sizes ...")
            data["layers"] = layer_sizes(args.layers)
        c_elf = build_c_guest(work) if "c" in args.kinds else None
        for n in sizes:
            for kind in args.kinds:
                for mode in modes:
                    if mode == "wasmtime":
                        continue
                    status(f"{mode} {kind} N={n} ...")
                    data["results"].append(run_pool(kind, n, mode, dists, calls, work, c_elf,
                                                    fresh if kind == "js" else 0))
            if "wasmtime" in modes:
                status(f"wasmtime N={n} ...")
                result = run_wasmtime(n, dists, calls)
                if result is not None:
                    data["results"].append(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    data["elapsed_s"] = time.monotonic() - started
    if "layers" in data:
        rows = [[lang, v["scripts"], v["base_pages"], v["min"], v["median"], v["max"],
                 ", ".join(f"{a} {p}" for a, p in sorted(v["one_line_areas"].items()))]
                for lang, v in data["layers"].items()]
        print_table("Script layers (pages of 4 KiB) over varied scripts", ["language", "scripts", "base pages",
                    "min", "median", "max", "one-line script's pages by area"], rows)
    report(data["results"], dists)
    path = write_results("tenants", data)
    print(f"\nresults: {path}")
    png = plot(data["results"], dists, RESULTS_DIR / "tenants.png")
    if png:
        print(f"plot: {png}")
    wrong = sum(r.get(d, {}).get("wrong", 0) for r in data["results"] for d in dists) + sum(
        r.get("fresh_vm", {}).get("wrong", 0) for r in data["results"])
    print(f"wrong results: {wrong}; elapsed {data['elapsed_s']:.0f} s")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
