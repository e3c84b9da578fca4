"""Restore cost vs dirty pages, for 16 MiB and 1 GiB of guest heap: does it follow the pages or the size?

The ``touch`` example guest writes one word into each of ``n`` distinct heap
pages (its area is most of the heap, allocated at init, zero in the snapshot).
For each memory size (heap 16 MiB and 1 GiB, via ``MemoryConfig``), each
restore policy (copy-back: ``keep_resident_pages=1<<20``; drop:
``keep_resident_pages=0``) and each n, one sandbox repeats::

    touch(n, restore=False)   # timed: the guest-side cost (write-protect faults,
                              # or page faults after a drop, + the call itself)
    sandbox.restore()         # timed alone: perf_counter_ns around it

The four sandboxes (2 sizes x 2 policies) take turns call by call, so machine
noise hits them alike. Every touch result is checked: it is the sum of
seed+i, and any word a restore missed would add to it.

n = 4096 exceeds the 16 MiB heap's touch area (``pages()``, ~3700): there n is
capped and the table says so (the ratio of that row compares different n; a
per-dirty-page ratio is given beside it).

A second, separate pass splits restore into parts to show what (if anything)
grows with memory size: ``KVM_GET_DIRTY_LOG`` with the n pages dirty (+ OR into
the pending bitmap), an empty ``KVM_GET_DIRTY_LOG`` right after (the part that
depends only on the slot size: the bitmap KVM scans and copies out), and the
rest of ``restore()`` (the copy/drop loop, the hot pages, Python) estimated as
``restore() - empty GET`` since restore() itself starts with a GET that then
finds nothing new. It calls ``sandbox.memory.collect_dirty()``, which moves
the dirty log into the pending set exactly as restore() does. (In the default
bitmap mode, ``RestorePolicy.dirty_log``, KVM_GET_DIRTY_LOG only reads the
log, so the second GET sees the same bits and costs the same bitmap copy;
restore() clears the bits itself, KVM_CLEAR_DIRTY_LOG, counted in "rest".)

Usage: ``python bench/restore.py [--quick]``; writes bench/results/restore.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from typing import Any

try:
    from .common import percentiles, print_table, progress, status, write_results
except ImportError:  # run as a script, or imported with bench/ on sys.path
    from common import percentiles, print_table, progress, status, write_results  # type: ignore[no-redef]

MIB = 1 << 20
GIB = 1 << 30
SIZES = (("16MiB", 16 * MIB), ("1GiB", 1 * GIB))
POLICIES = (("copy", 1 << 20), ("drop", 0))
POLICY_LABELS = {"copy": "copy-back (keep_resident_pages=1<<20)", "drop": "drop (keep_resident_pages=0)"}
NS = (0, 1, 4, 16, 64, 256, 1024, 4096)  # 0: only the pages every call writes (hot slot, OUT)

# Timed repetitions per n (full mode); --quick divides by QUICK_DIVISOR (at least QUICK_MIN).
REPS = {0: 2000, 1: 2000, 4: 2000, 16: 1500, 64: 1000, 256: 400, 1024: 120, 4096: 40}
BREAKDOWN_REPS = {0: 500, 1: 500, 4: 500, 16: 400, 64: 300, 256: 150, 1024: 50, 4096: 20}
QUICK_DIVISOR = 10
QUICK_MIN = 8
WARMUP = 3  # untimed touch+restore per sandbox whenever n changes


def _checksum(n: int, seed: int = 1) -> int:
    return sum(seed + i for i in range(n))


class Case:
    """One sandbox: a memory size x a restore policy."""

    def __init__(self, size_label: str, policy: str, sandbox: Any, pages: int) -> None:
        self.size_label = size_label
        self.policy = policy
        self.sandbox = sandbox
        self.pages = pages
        self.restore_ns: dict[int, list[int]] = {}
        self.touch_ns: dict[int, list[int]] = {}
        self.stats: dict[int, Any] = {}
        self.effective_n: dict[int, int] = {}
        self.get_dirty_ns: dict[int, list[int]] = {}
        self.get_empty_ns: dict[int, list[int]] = {}
        self.rest_ns: dict[int, list[int]] = {}

    @property
    def key(self) -> str:
        return f"{self.size_label}/{self.policy}"

    def n_for(self, n: int) -> int:
        return min(n, self.pages)


def _touch(case: Case, n: int) -> int:
    sb = case.sandbox
    t0 = time.perf_counter_ns()
    result = sb.call("touch", n, restore=False)
    t1 = time.perf_counter_ns()
    if result != _checksum(n):
        raise RuntimeError(f"{case.key}: touch({n}) returned {result}, expected {_checksum(n)} "
                           "(a restore missed a page)")
    return t1 - t0


def _step(case: Case, n: int, record: bool) -> None:
    """touch(n) without restore (n capped at the touch area), then restore() alone; both timed."""
    sb = case.sandbox
    touch_ns = _touch(case, case.n_for(n))
    t0 = time.perf_counter_ns()
    stats = sb.restore()
    t1 = time.perf_counter_ns()
    if record:
        case.touch_ns[n].append(touch_ns)
        case.restore_ns[n].append(t1 - t0)
        case.stats[n] = stats


def _breakdown_step(case: Case, n: int, record: bool) -> None:
    """touch(n); collect n dirty pages; collect again (nothing new); restore() (whose own collection is empty)."""
    sb = case.sandbox
    _touch(case, case.n_for(n))
    collect = sb.memory.collect_dirty
    clock = time.perf_counter_ns
    t0 = clock()
    collect()
    t1 = clock()
    collect()
    t2 = clock()
    sb.restore()
    t3 = clock()
    if record:
        case.get_dirty_ns[n].append(t1 - t0)
        case.get_empty_ns[n].append(t2 - t1)
        case.rest_ns[n].append((t3 - t2) - (t2 - t1))


def _reps(table: dict[int, int], n: int, quick: bool) -> int:
    r = table[n]
    return max(QUICK_MIN, r // QUICK_DIVISOR) if quick else r


def _interleaved(cases: list[Case], n: int, reps: int, step, label: str) -> None:
    for c in cases:
        for _ in range(WARMUP):
            step(c, n, record=False)
    gc.collect()
    gc.disable()
    try:
        order = list(cases)
        for i in progress(range(reps), label):
            for c in order:
                step(c, n, record=True)
            order.append(order.pop(0))  # rotate who goes first
    finally:
        gc.enable()


def run_benchmark(quick: bool, ns: tuple[int, ...] = NS, breakdown: bool = True) -> dict[str, Any]:
    import hlpool
    from hlpool.guest.examples import example_path

    elf = example_path("touch")
    tmp = tempfile.mkdtemp(prefix="hlpool-bench-restore-")
    cases: list[Case] = []
    try:
        snapshots = {}
        for label, heap in SIZES:
            status(f"snapshot of touch with heap {label} ...")
            snap = hlpool.Snapshot.from_elf(elf, config=hlpool.MemoryConfig(heap_size=heap))
            path = os.path.join(tmp, f"touch-{label}.snap")
            snap.persist(path)
            snapshots[label] = hlpool.Snapshot.open(path)
        for label, _heap in SIZES:
            for policy, keep in POLICIES:
                sb = hlpool.Sandbox(snapshots[label], restore_policy=hlpool.RestorePolicy(keep_resident_pages=keep),
                                    name=f"restore-{label}-{policy}")
                pages = sb.call("pages")
                cases.append(Case(label, policy, sb, pages))
        for c in cases:
            for n in ns:
                for d in (c.restore_ns, c.touch_ns, c.get_dirty_ns, c.get_empty_ns, c.rest_ns):
                    d[n] = []
                c.effective_n[n] = c.n_for(n)
        for n in ns:
            reps = _reps(REPS, n, quick)
            status(f"n={n}: {reps} touch+restore per sandbox, 4 sandboxes interleaved ...")
            _interleaved(cases, n, reps, _step, f"n={n}")
        if breakdown:
            for n in ns:
                reps = _reps(BREAKDOWN_REPS, n, quick)
                status(f"breakdown n={n}: {reps} per sandbox ...")
                _interleaved(cases, n, reps, _breakdown_step, f"breakdown n={n}")
        layouts = {label: {"main_slot_bytes": snapshots[label].layout.main.size,
                           "logged_slot_bytes": snapshots[label].layout.logged.size,
                           "heap_bytes": snapshots[label].layout.heap.size}
                   for label, _ in SIZES}
    finally:
        for c in cases:
            c.sandbox.close()
        shutil.rmtree(tmp, ignore_errors=True)

    results: dict[str, Any] = {"quick": quick, "ns": list(ns), "layouts": layouts,
                               "touch_area_pages": {c.size_label: c.pages for c in cases},
                               "cases": {}}
    for c in cases:
        rows = {}
        for n in ns:
            st = c.stats.get(n)
            row = {
                "n_requested": n,
                "n_effective": c.effective_n[n],
                "capped": c.effective_n[n] != n,
                "restore": percentiles(c.restore_ns[n]),
                "touch_call": percentiles(c.touch_ns[n]),
                "restore_stats": None if st is None else
                {"dirty": st.dirty, "copied": st.copied, "dropped": st.dropped, "resident": st.resident},
            }
            if c.get_dirty_ns[n]:
                row["breakdown"] = {
                    "get_dirty_log": percentiles(c.get_dirty_ns[n]),
                    "get_dirty_log_empty": percentiles(c.get_empty_ns[n]),
                    "restore_minus_empty_get": percentiles([max(0, v) for v in c.rest_ns[n]]),
                }
            rows[str(n)] = row
        results["cases"][c.key] = {"size": c.size_label, "policy": c.policy,
                                   "keep_resident_pages": dict(POLICIES)[c.policy], "by_n": rows}
    # Ratios 1GiB / 16MiB, per policy and n.
    ratios: dict[str, Any] = {}
    for policy, _ in POLICIES:
        small, big = results["cases"][f"16MiB/{policy}"]["by_n"], results["cases"][f"1GiB/{policy}"]["by_n"]
        per = {}
        for n in ns:
            s, b = small[str(n)], big[str(n)]
            ds, db = (s["restore_stats"] or {}).get("dirty", 0), (b["restore_stats"] or {}).get("dirty", 0)
            per[str(n)] = {
                "restore_p50": b["restore"]["p50_us"] / s["restore"]["p50_us"],
                "restore_p90": b["restore"]["p90_us"] / s["restore"]["p90_us"],
                "restore_per_dirty_page_p50": (b["restore"]["p50_us"] / db) / (s["restore"]["p50_us"] / ds)
                if ds and db else None,
                "touch_p50": b["touch_call"]["p50_us"] / s["touch_call"]["p50_us"],
            }
        ratios[policy] = per
    results["ratios_1GiB_over_16MiB"] = ratios
    return results


def print_report(data: dict[str, Any]) -> None:
    ns = data["ns"]
    cases = data["cases"]
    capped_any = False
    for policy, _ in POLICIES:
        small, big = cases[f"16MiB/{policy}"]["by_n"], cases[f"1GiB/{policy}"]["by_n"]
        ratios = data["ratios_1GiB_over_16MiB"][policy]
        rows = []
        for n in ns:
            s, b, r = small[str(n)], big[str(n)], ratios[str(n)]
            n_label = str(n)
            if s["capped"] or b["capped"]:
                capped_any = True
                n_label = f"{n} (16MiB: {s['n_effective']}*)"
            rows.append([
                n_label,
                s["restore_stats"]["dirty"], b["restore_stats"]["dirty"],
                s["restore"]["p50_us"], s["restore"]["p90_us"],
                b["restore"]["p50_us"], b["restore"]["p90_us"],
                r["restore_p50"], r["restore_per_dirty_page_p50"] if (s["capped"] or b["capped"]) else None,
                s["touch_call"]["p50_us"], b["touch_call"]["p50_us"], r["touch_p50"],
            ])
        print_table(
            f"restore() vs dirty pages, policy {POLICY_LABELS[policy]}; us (median / p90); "
            f"ratio = 1GiB / 16MiB",
            ["n touched", "dirty 16M", "dirty 1G", "16M p50", "16M p90", "1G p50", "1G p90", "ratio p50",
             "ratio/page", "touch 16M p50", "touch 1G p50", "touch ratio"], rows)
    if capped_any:
        pages = data["touch_area_pages"]
        print(f"* n capped at the touch area: pages() = {pages['16MiB']} for the 16 MiB heap "
              f"({pages['1GiB']} for 1 GiB); 'ratio/page' compares restore time per dirty page there.")
    print("dirty = pages restore() put back: the n touched + the pages every call writes "
          "(hot slot: call page, top of stack; OUT).")
    print("touch = the touch(n, restore=False) call after a restore: includes the guest's first-write faults "
          "(write-protect faults after copy-back, page faults after drop).")

    if any("breakdown" in cases[c]["by_n"][str(ns[0])] for c in cases):
        for policy, _ in POLICIES:
            small, big = cases[f"16MiB/{policy}"]["by_n"], cases[f"1GiB/{policy}"]["by_n"]
            rows = []
            for n in ns:
                s, b = small[str(n)]["breakdown"], big[str(n)]["breakdown"]
                rows.append([
                    str(n) + ("*" if small[str(n)]["capped"] else ""),
                    s["get_dirty_log"]["p50_us"], b["get_dirty_log"]["p50_us"],
                    s["get_dirty_log_empty"]["p50_us"], b["get_dirty_log_empty"]["p50_us"],
                    s["restore_minus_empty_get"]["p50_us"], b["restore_minus_empty_get"]["p50_us"],
                    b["get_dirty_log_empty"]["p50_us"] - s["get_dirty_log_empty"]["p50_us"],
                ])
            print_table(
                f"restore() split into parts, policy {policy}; us, medians (separate pass)",
                ["n", "GET(n dirty) 16M", "GET(n dirty) 1G", "GET(empty) 16M", "GET(empty) 1G",
                 "rest 16M", "rest 1G", "GET(empty) 1G-16M"], rows)
        lay = data["layouts"]
        print("GET = collecting dirty pages (KVM_GET_DIRTY_LOG in bitmap mode, the default here; harvesting "
              "KVM's dirty ring in ring mode) "
              f"(logged slot: {lay['16MiB']['logged_slot_bytes'] / MIB:.1f} MiB vs "
              f"{lay['1GiB']['logged_slot_bytes'] / MIB:.1f} MiB); rest = restore() - empty GET "
              "(copy/drop loop incl. bitmap scan, hot pages, Python).")



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="restore time vs dirty pages for 16 MiB and 1 GiB guests")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (well under a minute)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the GET_DIRTY_LOG / rest split")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/restore.json")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    data = run_benchmark(args.quick, breakdown=not args.no_breakdown)
    data["elapsed_s"] = time.monotonic() - t0
    print_report(data)
    if not args.no_write:
        path = write_results("restore", data)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
