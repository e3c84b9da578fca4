"""Call latency of hlpool sandboxes, next to the bare-KVM floor measured in the same run.

Rows: ``Sandbox.call("noop")``, ``call("echo", 1)``, ``call("echo", b"x"*4096)``,
``call("touch", n)`` for n = 1, 16, 256, plus the floor from bench/floor.py
(a minimal VM whose every KVM_RUN is one ``out`` exit: bare, and with
registers reloaded through sync regs as hlpool does per call). All cases
are measured interleaved, in rounds of a few hundred calls each, so machine
noise and drift hit them alike. Every result is checked (echo returns its
argument, touch its checksum - which is wrong if a restore missed a page).

Also reported per row: the pages each call dirtied (``sandbox.last_restore``),
and from a separate, instrumented pass, the userspace exits per call and
the time spent inside KVM_RUN per call (the guest's share, page faults
included); the rest is host-side work (Python, encode/decode, restore).

Usage: ``python bench/latency.py [--quick] [--iterations N]``; writes
bench/results/latency.json.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

try:
    from . import floor as floor_mod
    from .common import percentiles, print_table, progress, status, write_results
except ImportError:  # run as a script, or imported with bench/ on sys.path
    import floor as floor_mod  # type: ignore[no-redef]
    from common import percentiles, print_table, progress, status, write_results  # type: ignore[no-redef]

FLOOR_MODES = ("run", "sync_regs")
DEFAULT_ITERATIONS = 5000
QUICK_ITERATIONS = 300
ROUND = 100  # calls of each case per interleaved round


@dataclass
class Case:
    label: str
    guest: str
    function: str
    args: tuple
    expected: Any
    restore: bool = True  # False: a diagnostic row, on its own sandbox (no restore, no register reload)
    sandbox: Any = None
    samples: list[int] = field(default_factory=list)
    dirty: list[int] = field(default_factory=list)
    copied: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    resident: int = 0  # the sandbox's resident restored pages after this case's last call
    exits_per_call: float | None = None
    in_kvm_run: list[int] = field(default_factory=list)


def _touch_checksum(n: int, seed: int = 1) -> int:
    # touch(n) reads each word (0 after a correct restore), writes seed+i, adds both.
    return sum(seed + i for i in range(n))


def make_cases() -> list[Case]:
    big = b"x" * 4096
    return [
        Case('noop()', "echo", "noop", (), None),
        Case('echo(1)', "echo", "echo", (1,), 1),
        Case('echo(b"x"*4096)', "echo", "echo", (big,), big),
        Case('touch(1)', "touch", "touch", (1,), _touch_checksum(1)),
        Case('touch(16)', "touch", "touch", (16,), _touch_checksum(16)),
        Case('touch(256)', "touch", "touch", (256,), _touch_checksum(256)),
        # Diagnostic: the same noop without restoring memory or reloading registers afterwards
        # (the guest simply serves the next call): what restore + dirty tracking cost.
        Case('noop(), restore=False', "echo", "noop", (), None, restore=False),
    ]


def _measure_case(case: Case, n: int) -> None:
    """``n`` timed calls of ``case``; results checked and restore stats recorded outside the timing."""
    sb, fn, args, expected, restore = case.sandbox, case.function, case.args, case.expected, case.restore
    call = sb.call
    clock = time.perf_counter_ns
    samples, dirty, copied, dropped = case.samples, case.dirty, case.copied, case.dropped
    for _ in range(n):
        t0 = clock()
        result = call(fn, *args, restore=restore)
        t1 = clock()
        samples.append(t1 - t0)
        if result != expected:
            raise RuntimeError(f"{case.label}: returned {result!r:.60}, expected {expected!r:.60}")
        stats = sb.last_restore
        dirty.append(stats.dirty)
        copied.append(stats.copied)
        dropped.append(stats.dropped)
    case.resident = sb.last_restore.resident


def _instrumented_pass(case: Case, n: int) -> None:
    """Count exits and time KVM_RUN per call by wrapping this sandbox's ``vcpu.run_io`` (not timed)."""
    vcpu = case.sandbox.vcpu
    original: Callable[[], Any] = vcpu.run_io
    clock = time.perf_counter_ns
    state = {"exits": 0, "ns": 0}

    def counting_run() -> Any:
        t0 = clock()
        reason = original()
        state["ns"] += clock() - t0
        state["exits"] += 1
        return reason

    vcpu.run_io = counting_run  # instance attribute shadows the method
    try:
        per_call = []
        for _ in range(n):
            state["ns"] = 0
            case.sandbox.call(case.function, *case.args, restore=case.restore)
            per_call.append(state["ns"])
        case.exits_per_call = state["exits"] / n
        case.in_kvm_run = per_call
    finally:
        del vcpu.run_io


def run_benchmark(iterations: int, warmup: int) -> dict[str, Any]:
    import hlpool
    from hlpool.examples import example_path

    cases = make_cases()
    status("building snapshots ...")
    snapshots = {g: hlpool.Snapshot.from_elf(example_path(g)) for g in sorted({c.guest for c in cases})}
    sandboxes = {}
    for c in cases:
        key = c.guest if c.restore else f"{c.guest}-norestore"
        if key not in sandboxes:
            sandboxes[key] = hlpool.Sandbox(snapshots[c.guest], name=f"bench-{key}")
        c.sandbox = sandboxes[key]
    floor_vm = floor_mod.FloorVm()
    try:
        spin = floor_vm.spin_ns_per_iteration()
        status(f"floor VM: dec/jnz loop {spin:.2f} ns/iteration "
               f"({'native' if spin < 20 else 'EMULATED?'})")
        status(f"warming up ({warmup} calls per case) ...")
        for c in cases:
            _measure_case(c, warmup)
            for samples in (c.samples, c.dirty, c.copied, c.dropped):
                samples.clear()
        for m in FLOOR_MODES:
            floor_vm.measure(m, 0, warmup=max(warmup, 200))

        floors: dict[str, list[int]] = {m: [] for m in FLOOR_MODES}
        rounds = (iterations + ROUND - 1) // ROUND
        gc.collect()
        for r in progress(range(rounds), "latency rounds"):
            n = min(ROUND, iterations - r * ROUND)
            for m in FLOOR_MODES:
                floors[m].extend(floor_vm.measure(m, n, warmup=0))
            for c in cases:
                _measure_case(c, n)

        status("instrumented pass (exits, time in KVM_RUN) ...")
        diag_n = min(iterations, 500)
        for c in cases:
            _instrumented_pass(c, diag_n)
    finally:
        floor_vm.close()
        for sb in sandboxes.values():
            sb.close()

    floor_stats = {m: percentiles(floors[m]) for m in FLOOR_MODES}
    base = floor_stats["run"]
    out_cases = []
    for c in cases:
        p = percentiles(c.samples)
        kvm = percentiles(c.in_kvm_run)
        out_cases.append({
            "label": c.label,
            "guest": c.guest,
            "function": c.function,
            "restore": c.restore,
            "latency": p,
            "ratio_to_floor_p50": p["p50_us"] / base["p50_us"],
            "ratio_to_floor_p99": p["p99_us"] / base["p99_us"],
            "restore_stats": None if not c.restore else {
                "dirty_pages_p50": statistics.median(c.dirty),
                "dirty_pages_min": min(c.dirty),
                "dirty_pages_max": max(c.dirty),
                "copied_pages_p50": statistics.median(c.copied),
                "dropped_pages_p50": statistics.median(c.dropped),
                "sandbox_resident_pages": c.resident,
            },
            "exits_per_call": c.exits_per_call,
            "in_kvm_run": kvm,
        })
    return {
        "iterations": iterations,
        "warmup": warmup,
        "floor_spin_ns_per_iteration": spin,
        "floor": {m: {"label": floor_mod.MODE_LABELS[m], "latency": s,
                      "ratio_to_floor_p50": s["p50_us"] / base["p50_us"],
                      "ratio_to_floor_p99": s["p99_us"] / base["p99_us"]}
                  for m, s in floor_stats.items()},
        "cases": out_cases,
    }


def print_report(data: dict[str, Any]) -> None:
    headers = ["call", "p50 us", "p99 us", "p50 x floor", "p99 x floor", "dirty pg", "exits", "in KVM_RUN p50 us"]
    rows = []
    for m, f in data["floor"].items():
        s = f["latency"]
        rows.append([f"[floor] {f['label']}", s["p50_us"], s["p99_us"], f["ratio_to_floor_p50"],
                     f["ratio_to_floor_p99"], "-", 1, s["p50_us"]])
    for c in data["cases"]:
        s, r = c["latency"], c["restore_stats"]
        if r is None:
            dirty = "-"
        elif r["dirty_pages_min"] != r["dirty_pages_max"]:
            dirty = f"{r['dirty_pages_min']}-{r['dirty_pages_max']}"
        else:
            dirty = r["dirty_pages_p50"]
        rows.append([c["label"], s["p50_us"], s["p99_us"], c["ratio_to_floor_p50"], c["ratio_to_floor_p99"],
                     dirty if isinstance(dirty, str) else int(dirty), _fmt_exits(c["exits_per_call"]),
                     c["in_kvm_run"]["p50_us"]])
    print_table(f"hlpool call latency vs bare-KVM floor ({data['iterations']} calls each, interleaved; "
                f"x floor = / bare KVM_RUN)", headers, rows)


def _fmt_exits(x: float | None) -> str:
    if x is None:
        return "-"
    return str(int(x)) if x == int(x) else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="hlpool call latency vs the bare-KVM floor")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ITERATIONS} calls per case (< 1 minute)")
    parser.add_argument("--iterations", type=int, default=None,
                        help=f"timed calls per case (default {DEFAULT_ITERATIONS})")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per case first")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/latency.json")
    args = parser.parse_args(argv)
    iterations = args.iterations or (QUICK_ITERATIONS if args.quick else DEFAULT_ITERATIONS)
    if iterations <= 0:
        parser.error("--iterations must be positive")
    warmup = args.warmup if args.warmup is not None else (50 if args.quick else 200)
    data = run_benchmark(iterations, warmup)
    data["quick"] = bool(args.quick)
    print_report(data)
    if not args.no_write:
        path = write_results("latency", data)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
