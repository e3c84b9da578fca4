"""Switching a warm sandbox between tenants of one family vs creating a sandbox per tenant.

1. JS tenants: scripts loaded on the QuickJS base (``hlpool.sandbox.scripts``). One sandbox
   switches between two tenants, call after call::

       sb.switch(tenant[i % 2])     # timed (perf_counter_ns around it)
       sb.call("call", "f", [i])    # timed: the first call after a switch (checked result)
       sb.call("call", "f", [i])    # every 4th round, timed: a call after a call, for comparison

   and, in the same run (after the switches), the alternative: ``Sandbox(tenant)`` created
   (timed) and its first call. The table gives p50/p99 (also of a switch plus the call after it:
   work can move from one to the other, e.g. a reset done by the entry stub instead of an
   ioctl) and the pages copied / re-mapped per switch. Target (issue 11): switch() p50 <= 50 us.

2. The copy/re-map threshold (``hlpool.memory.switch.COPY_MAX_PAGES``): for a span of n
   differing pages, the host cost of copying them (``_mapping.switch_slot`` with every span
   copied) vs re-mapping them (one mmap), on two memfd layers; and the guest's cost of then
   reading them: the C test guest (tests/guests/tenant.c) ``digest`` reads 48 data pages and
   a heap block, of which the tenant's own pages differ from the other tenant's; the first
   ``digest`` after a switch is timed with every span copied and with every span re-mapped,
   and the difference divided by the pages re-mapped is the guest's cost per re-mapped page.

Usage: ``python bench/switch.py [--quick]``; writes bench/results/switch.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from array import array
from pathlib import Path
from typing import Any

try:
    from .common import percentiles, print_table, status, write_results
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import percentiles, print_table, status, write_results  # type: ignore[no-redef]

SPANS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def bench_js(reps: int) -> dict[str, Any]:
    from hlpool import Sandbox
    from hlpool.sandbox.scripts import base_snapshot, load_script

    base = base_snapshot("js")
    tenants = [
        load_script(base, "var n = 1; function f(x) { return x + n }"),
        load_script(base, "var t = []; for (var i = 0; i < 500; i++) t.push('s' + i);"
                          " function f(x) { return x + t.length }"),
    ]
    expect = (lambda x: x + 1, lambda x: x + 500)
    switch_ns, first_ns, fresh_ns, fresh_first_ns, copied, remapped, runs = [], [], [], [], [], [], []
    steady_ns: list[int] = []
    with Sandbox(tenants[0], timeout=10) as sb:
        for i in range(20):  # warm: caches per snapshot, page cache, resident pages
            sb.switch(tenants[i % 2])
            sb.call("call", "f", [i])
        gc.disable()
        try:
            for i in range(reps):
                k = (i + 1) % 2
                t0 = time.perf_counter_ns()
                stats = sb.switch(tenants[k])
                t1 = time.perf_counter_ns()
                got = sb.call("call", "f", [i])
                t2 = time.perf_counter_ns()
                assert got == expect[k](i), (got, k, i)
                if i % 4 == 0:  # a call that follows a call, for comparison
                    sb.call("call", "f", [i])
                    steady_ns.append(time.perf_counter_ns() - t2)
                switch_ns.append(t1 - t0)
                first_ns.append(t2 - t1)
                copied.append(stats.pages_copied)
                remapped.append(stats.pages_remapped)
                runs.append(stats.runs_remapped)
            for i in range(max(10, reps // 10)):  # the alternative, same run: a fresh sandbox per tenant
                k = (i + 1) % 2
                t0 = time.perf_counter_ns()
                fresh = Sandbox(tenants[k], timeout=10)
                t1 = time.perf_counter_ns()
                got = fresh.call("call", "f", [i])
                t2 = time.perf_counter_ns()
                fresh.close()
                assert got == expect[k](i)
                fresh_ns.append(t1 - t0)
                fresh_first_ns.append(t2 - t1)
        finally:
            gc.enable()
    return {
        "switch": percentiles(switch_ns),
        "first_call_after_switch": percentiles(first_ns),
        "switch_and_first_call": percentiles([a + b for a, b in zip(switch_ns, first_ns)]),
        "call_after_a_call": percentiles(steady_ns),
        "fresh_sandbox": percentiles(fresh_ns),
        "first_call_of_fresh_sandbox": percentiles(fresh_first_ns),
        "pages_copied_p50": _median(copied),
        "pages_remapped_p50": _median(remapped),
        "runs_remapped_p50": _median(runs),
        "tenant_own_pages": [sum(r.count for r in t.runs["main"] if r.layer == len(t.layers) - 1) for t in tenants],
    }


def bench_spans(reps: int) -> list[dict[str, Any]]:
    """Host cost of putting back an n-page span: copy (switch_slot copies) vs re-map (one mmap)."""
    from hlpool import _mapping
    from hlpool.memory.layers import Layer

    pages = max(SPANS)
    layers = [Layer.from_pages([bytes([k + 1]) * (pages * 4096)]) for k in range(2)]
    rows = []
    for n in SPANS:
        result: dict[str, Any] = {"pages": n}
        for mode, copy_max in (("copy", 1 << 40), ("remap", 0)):
            host = _mapping.reserve(pages * 4096)
            try:
                _mapping.map_file_fixed(host, pages * 4096, layers[0].fd, 0)
                resident = bytearray(pages)
                count = 0
                mapped = array("q", (0, pages, 0, 0))

                def runs(k: int) -> tuple[array, array, array, array]:
                    # pages [0, n) from layer k, the rest from layer 0
                    flat = array("q", (0, n, k, 0))
                    src, fd, off = array("q", (layers[k].view(),)), array("q", (layers[k].fd,)), array("q", (0,))
                    if n < pages:
                        flat.extend((n, pages - n, 0, 0))
                        src.append(layers[0].view() + n * 4096)
                        fd.append(layers[0].fd)
                        off.append(n * 4096)
                    return flat, src, fd, off

                ns = []
                for i in range(reps):
                    cur, tgt = runs(i % 2), runs((i + 1) % 2)
                    t0 = time.perf_counter_ns()
                    _c, _d, _r, _calls, count, out = _mapping.switch_slot(
                        host, pages, mapped, cur[0], tgt[0], tgt[1], tgt[2], tgt[3], resident, count, copy_max)
                    ns.append(time.perf_counter_ns() - t0)
                    mapped = array("q", out)
                    if i % 2 == 0:
                        for p in range(n):  # touch the pages as a guest would (faults after a re-map)
                            _mapping.read_bytes(host + p * 4096, 1)
                result[f"{mode}_us"] = percentiles(ns[2:] or ns)["p50_us"]
            finally:
                _mapping.unmap(host, pages * 4096)
        rows.append(result)
    return rows


def bench_guest_touch(reps: int) -> dict[str, Any]:
    """The guest's cost of reading re-mapped pages vs copied ones (first call after a switch)."""
    from hlpool import Sandbox, Snapshot
    from hlpool.guest.build import build_guest
    from hlpool.guest.layout import MemoryConfig
    from hlpool.memory import switch as switch_module

    tenant_c = Path(__file__).resolve().parent.parent / "tests" / "guests" / "tenant.c"
    elf = build_guest([tenant_c], Path(os.environ.get("TMPDIR", "/tmp")) / "hlpool-bench-tenant.elf")
    config = MemoryConfig(heap_size=1 << 20, stack_size=256 << 10)
    base = Snapshot.from_elf(elf, config=config)
    tenants = []
    for k in range(2):
        with Sandbox(base, timeout=10) as sb:
            sb.call("plant", 7 + k, 40, restore=False)
            tenants.append(sb.snapshot())
    out: dict[str, Any] = {}
    for mode, copy_max in (("copy", 1 << 40), ("remap", 0)):
        old = switch_module.COPY_MAX_PAGES
        switch_module.COPY_MAX_PAGES = copy_max
        try:
            with Sandbox(tenants[0], timeout=10) as sb:
                first, steady, moved = [], [], []
                for i in range(reps):
                    stats = sb.switch(tenants[(i + 1) % 2])
                    t0 = time.perf_counter_ns()
                    sb.call("digest")
                    t1 = time.perf_counter_ns()
                    sb.call("digest")
                    t2 = time.perf_counter_ns()
                    first.append(t1 - t0)
                    steady.append(t2 - t1)
                    moved.append(stats.pages_copied + stats.pages_remapped)
        finally:
            switch_module.COPY_MAX_PAGES = old
        out[mode] = {"first_digest_us": percentiles(first[2:])["p50_us"],
                     "steady_digest_us": percentiles(steady[2:])["p50_us"], "pages": _median(moved)}
    extra = out["remap"]["first_digest_us"] - out["copy"]["first_digest_us"]
    out["guest_us_per_remapped_page"] = extra / max(out["remap"]["pages"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a trial run)")
    args = parser.parse_args()
    reps = 200 if args.quick else 2000
    status("JS tenants: switch vs fresh sandbox")
    js = bench_js(reps)
    print_table("Switch between two JS tenants (one warm sandbox) vs a fresh Sandbox per tenant",
                ["operation", "p50 us", "p99 us", "n"],
                [[name, js[key]["p50_us"], js[key]["p99_us"], js[key]["n"]] for name, key in (
                    ("switch()", "switch"), ("first call after switch()", "first_call_after_switch"),
                    ("switch() + that first call", "switch_and_first_call"),
                    ("a call after a call (same tenant)", "call_after_a_call"),
                    ("Sandbox(target)", "fresh_sandbox"),
                    ("first call of a fresh sandbox", "first_call_of_fresh_sandbox"))])
    print(f"pages copied per switch (p50): {js['pages_copied_p50']}, re-mapped: {js['pages_remapped_p50']} "
          f"in {js['runs_remapped_p50']} mmaps; tenants' own main pages: {js['tenant_own_pages']}")
    status("copy vs re-map of an n-page span")
    spans = bench_spans(max(20, reps // 10))
    print_table("Host cost of putting back one span of n differing pages", ["pages", "copy us", "re-map us"],
                [[r["pages"], r["copy_us"], r["remap_us"]] for r in spans])
    status("guest cost of re-mapped pages")
    touch = bench_guest_touch(max(20, reps // 20))
    print_table("First guest call after a switch reading the tenant's pages",
                ["mode", "pages", "first us", "steady us"],
                [[m, touch[m]["pages"], touch[m]["first_digest_us"], touch[m]["steady_digest_us"]]
                 for m in ("copy", "remap")])
    print(f"guest cost per re-mapped page it reads: {touch['guest_us_per_remapped_page']:.2f} us")
    path = write_results("switch", {"js": js, "spans": spans, "guest_touch": touch})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
