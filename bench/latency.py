"""Latency of hlpool operations next to the bare-KVM floor and wasmtime-py, all measured in one run.

Rows (p50 / p99 in microseconds, and ratios to the floor):

- the floor, from bench/floor.py: a minimal VM whose every KVM_RUN is one
  ``out`` exit (bare, and with registers reloaded through sync regs as hlpool
  does per call);
- ``Sandbox.call``: ``noop()``, ``echo(1)``, ``echo(b"x"*4096)``, and
  ``touch(n)`` dirtying n = 1, 16, 256 pages (restore included: every call
  starts from the snapshot); ``noop()`` with ``restore=False`` for reference;
  ``touch(16)`` with the restore working set off (``max_wholesale_pages=0``:
  every written page write-protected again, one fault per page per call);
  the JavaScript guest's ``call("add", [1, 2])`` on a loaded script's snapshot
  (skipped with a note if the interpreter guest cannot be built);
- restore alone: ``touch(n, restore=False)`` (untimed), then ``sandbox.restore()``
  timed by itself, n = 1, 16, 256;
- sandbox creation from a persisted snapshot: ``Sandbox(Snapshot.open(path))``
  (opened once) + its first ``call("noop")`` (the close is timed apart);
- ``Pool.submit(...).result()`` round trips on a 1-worker :class:`hlpool.Pool`
  (``noop()`` and ``echo(1)``; the worker keeps a warm sandbox);
- wasmtime-py (PyPI ``wasmtime``, bench/wasm_guest.py's small module with
  ``noop()`` and ``echo(i64)``): a fresh ``Store`` + ``Instance`` per call
  (fresh state per call, like a restored sandbox), and a reused instance for
  reference.

All cases are measured interleaved, in rounds (``ROUND`` calls of each cheap
case, fewer of the expensive ones), so machine noise and drift hit them
alike. Every result is checked (echo returns its argument, touch its
checksum, which is wrong if a restore missed a page).

Ratios printed at the end (p50 / p50, targets from issue 12): ``touch(16)``
(the same 16 pages every call) / ``noop()`` <= 1.5, JS ``add`` / ``noop()`` <= 1.3.

Also reported per sandbox-call row: the pages each call dirtied
(``sandbox.last_restore``), and from a separate instrumented pass the
userspace exits per call and the time spent inside KVM_RUN per call.

Usage: ``python bench/latency.py [--quick] [--iterations N]``; writes
bench/results/latency.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

try:
    from . import floor as floor_mod
    from . import wasm_guest
    from .common import percentiles, print_table, progress, status, write_results
except ImportError:  # run as a script, or imported with bench/ on sys.path
    import floor as floor_mod  # type: ignore[no-redef]
    import wasm_guest  # type: ignore[no-redef]
    from common import percentiles, print_table, progress, status, write_results  # type: ignore[no-redef]

FLOOR_MODES = ("run", "sync_regs")
DEFAULT_ITERATIONS = 5000
QUICK_ITERATIONS = 300
ROUND = 100  # calls of each (weight 1) case per interleaved round
TOUCH_NS = (1, 16, 256)
JS_ADD_SCRIPT = "function add(a, b) { return a + b; }"
# (numerator row, denominator row, target): printed and stored as "ratios".
RATIO_TARGETS = (("touch(16)", "noop()", 1.5), ('JS call("add", [1, 2])', "noop()", 1.3))

GROUPS = {
    "floor": "bare KVM floor",
    "call": "Sandbox.call",
    "restore": "restore alone",
    "create": "sandbox creation",
    "pool": "Pool.submit round trip",
    "wasm": "wasmtime-py",
}


@dataclass
class Case:
    """One latency row: ``step(n)`` performs n timed iterations, appending to ``samples``."""

    label: str
    group: str
    weight: float = 1.0  # iterations per round = ROUND * weight (at least 1)
    samples: list[int] = field(default_factory=list)
    parts: dict[str, list[int]] = field(default_factory=dict)  # other timings of the same iterations
    dirty: list[int] = field(default_factory=list)
    copied: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    resident: int = 0
    exits_per_call: float | None = None
    in_kvm_run: list[int] = field(default_factory=list)
    step: Callable[[int], None] | None = None
    # Sandbox.call rows:
    sandbox: Any = None
    function: str = ""
    args: tuple = ()
    expected: Any = None
    restore: bool = True

    def per_round(self) -> int:
        return max(1, int(ROUND * self.weight))

    def reset(self) -> None:
        for lst in (self.samples, self.dirty, self.copied, self.dropped, *self.parts.values()):
            lst.clear()


def _touch_checksum(n: int, seed: int = 1) -> int:
    # touch(n) reads each word (0 after a correct restore), writes seed+i, adds both.
    return sum(seed + i for i in range(n))


# ---- the case kinds ------------------------------------------------------------------------------

def call_case(label: str, sandbox: Any, function: str, args: tuple, expected: Any, restore: bool = True) -> Case:
    case = Case(label, "call", sandbox=sandbox, function=function, args=args, expected=expected, restore=restore)

    def step(n: int) -> None:
        sb, fn, a, exp, rs = case.sandbox, case.function, case.args, case.expected, case.restore
        call = sb.call
        clock = time.perf_counter_ns
        samples, dirty, copied, dropped = case.samples, case.dirty, case.copied, case.dropped
        for _ in range(n):
            t0 = clock()
            result = call(fn, *a, restore=rs)
            t1 = clock()
            samples.append(t1 - t0)
            if result != exp:
                raise RuntimeError(f"{case.label}: returned {result!r:.60}, expected {exp!r:.60}")
            stats = sb.last_restore
            dirty.append(stats.dirty)
            copied.append(stats.copied)
            dropped.append(stats.dropped)
        case.resident = sb.last_restore.resident

    case.step = step
    return case


def restore_case(sandbox: Any, pages: int) -> Case:
    """``touch(pages, restore=False)`` untimed, then ``restore()`` timed alone."""
    case = Case(f"restore() after touch({pages})", "restore", sandbox=sandbox)
    expected = _touch_checksum(pages)
    case.parts["touch_call"] = []

    def step(n: int) -> None:
        sb = case.sandbox
        clock = time.perf_counter_ns
        for _ in range(n):
            t0 = clock()
            result = sb.call("touch", pages, restore=False)
            t1 = clock()
            if result != expected:
                raise RuntimeError(f"touch({pages}) returned {result}, expected {expected} (a restore missed a page)")
            stats = sb.restore()
            t2 = clock()
            case.samples.append(t2 - t1)
            case.parts["touch_call"].append(t1 - t0)
            case.dirty.append(stats.dirty)
            case.copied.append(stats.copied)
            case.dropped.append(stats.dropped)
        case.resident = sb.last_restore.resident

    case.step = step
    return case


def create_case(snapshot: Any) -> Case:
    """``Sandbox(snapshot)`` + first ``call("noop")``, timed; ``close()`` timed apart."""
    import hlpool

    case = Case("Sandbox(snapshot) + first call", "create", weight=0.05)
    case.parts.update(create=[], first_call=[], close=[])

    def step(n: int) -> None:
        clock = time.perf_counter_ns
        for _ in range(n):
            t0 = clock()
            sb = hlpool.Sandbox(snapshot)
            t1 = clock()
            try:
                result = sb.call("noop")
                t2 = clock()
            finally:
                sb.close()
                t3 = clock()
            if result is not None:
                raise RuntimeError(f"noop returned {result!r}")
            case.samples.append(t2 - t0)
            case.parts["create"].append(t1 - t0)
            case.parts["first_call"].append(t2 - t1)
            case.parts["close"].append(t3 - t2)

    case.step = step
    return case


def pool_case(pool: Any, handle: Any, label: str, function: str, args: tuple, expected: Any) -> Case:
    case = Case(label, "pool", weight=0.5)

    def step(n: int) -> None:
        clock = time.perf_counter_ns
        submit = pool.submit
        for _ in range(n):
            t0 = clock()
            result = submit(handle, function, args).result()
            t1 = clock()
            if result != expected:
                raise RuntimeError(f"{label}: returned {result!r:.60}, expected {expected!r:.60}")
            case.samples.append(t1 - t0)

    case.step = step
    return case


def wasm_cases() -> list[Case]:
    """wasmtime-py rows: a fresh Store + Instance per call, and a reused instance."""
    import wasmtime

    engine = wasm_guest.make_engine()
    module = wasmtime.Module(engine, wasm_guest.small_module_wat())
    fresh = Case("wasmtime: new Store+Instance, noop()", "wasm")
    fresh_echo = Case("wasmtime: new Store+Instance, echo(1)", "wasm")
    store = wasmtime.Store(engine)
    instance = wasmtime.Instance(store, module, [])
    exports = instance.exports(store)
    reused_noop = Case("wasmtime: reused instance, noop()", "wasm")
    reused_echo = Case("wasmtime: reused instance, echo(1)", "wasm")

    def fresh_step(case: Case, name: str, args: tuple, expected: Any) -> Callable[[int], None]:
        def step(n: int) -> None:
            clock = time.perf_counter_ns
            Store, Instance = wasmtime.Store, wasmtime.Instance
            for _ in range(n):
                t0 = clock()
                st = Store(engine)
                inst = Instance(st, module, [])
                result = inst.exports(st)[name](st, *args)
                t1 = clock()
                if result != expected:
                    raise RuntimeError(f"{case.label}: returned {result!r}, expected {expected!r}")
                case.samples.append(t1 - t0)
        return step

    def reused_step(case: Case, name: str, args: tuple, expected: Any) -> Callable[[int], None]:
        fn = exports[name]

        def step(n: int) -> None:
            clock = time.perf_counter_ns
            for _ in range(n):
                t0 = clock()
                result = fn(store, *args)
                t1 = clock()
                if result != expected:
                    raise RuntimeError(f"{case.label}: returned {result!r}, expected {expected!r}")
                case.samples.append(t1 - t0)
        return step

    fresh.step = fresh_step(fresh, "noop", (), None)
    fresh_echo.step = fresh_step(fresh_echo, "echo", (1,), 1)
    reused_noop.step = reused_step(reused_noop, "noop", (), None)
    reused_echo.step = reused_step(reused_echo, "echo", (1,), 1)
    return [fresh, fresh_echo, reused_noop, reused_echo]


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


# ---- the run ------------------------------------------------------------------------------------------

def run_benchmark(iterations: int, warmup: int, with_pool: bool = True, with_wasm: bool = True) -> dict[str, Any]:
    import hlpool
    from hlpool.guest.examples import example_path

    notes: list[str] = []
    tmp = tempfile.mkdtemp(prefix="hlpool-bench-latency-")
    pool = None
    sandboxes: list[Any] = []
    floor_vm = None
    try:
        cases: list[Case] = []
        if with_pool:
            # First, while this process has no threads and no VMs: the pool forks its spawner now.
            status("starting a 1-worker pool ...")
            pool = hlpool.Pool(workers=1, snapshot_dir=tmp)
            echo_handle = pool.snapshot(example_path("echo"))
        status("building snapshots ...")
        echo_path = os.path.join(tmp, "echo-persisted.hlsnap")
        hlpool.Snapshot.from_elf(example_path("echo")).persist(echo_path)
        echo = hlpool.Snapshot.open(echo_path)
        touch = hlpool.Snapshot.from_elf(example_path("touch"))

        def sandbox(snap: Any, name: str) -> Any:
            sb = hlpool.Sandbox(snap, name=f"bench-{name}")
            sandboxes.append(sb)
            return sb

        echo_sb, touch_sb = sandbox(echo, "echo"), sandbox(touch, "touch")
        big = b"x" * 4096
        cases += [
            call_case("noop()", echo_sb, "noop", (), None),
            call_case("echo(1)", echo_sb, "echo", (1,), 1),
            call_case('echo(b"x"*4096)', echo_sb, "echo", (big,), big),
        ]
        cases += [call_case(f"touch({n})", touch_sb, "touch", (n,), _touch_checksum(n)) for n in TOUCH_NS]
        no_ws = hlpool.Sandbox(touch, name="bench-touch-no-ws",
                               restore_policy=hlpool.RestorePolicy(max_wholesale_pages=0))
        sandboxes.append(no_ws)
        cases.append(call_case("touch(16), no working set", no_ws, "touch", (16,), _touch_checksum(16)))
        try:
            from hlpool.sandbox.scripts import base_snapshot, load_script

            js = load_script(base_snapshot("js"), JS_ADD_SCRIPT)
            cases.append(call_case('JS call("add", [1, 2])', sandbox(js, "js"), "call", ("add", [1, 2]), 3))
        except Exception as exc:  # noqa: BLE001 - the interpreter guest needs a download and a build
            notes.append(f"JS add row skipped: {exc}")
            status(notes[-1])
        # The same noop without restoring memory or reloading registers afterwards (the guest simply
        # serves the next call): what restore + dirty tracking cost. On its own sandbox.
        cases.append(call_case("noop(), restore=False", sandbox(echo, "echo-norestore"), "noop", (), None,
                               restore=False))
        restore_sb = sandbox(touch, "touch-restore")
        cases += [restore_case(restore_sb, n) for n in TOUCH_NS]
        cases.append(create_case(echo))
        if pool is not None:
            cases.append(pool_case(pool, echo_handle, "Pool.submit(noop).result()", "noop", (), None))
            cases.append(pool_case(pool, echo_handle, "Pool.submit(echo, 1).result()", "echo", (1,), 1))
        if with_wasm:
            try:
                cases += wasm_cases()
            except ImportError as exc:
                notes.append(f"wasmtime rows skipped: {exc} (pip install wasmtime)")
                status(notes[-1])

        floor_vm = floor_mod.FloorVm()
        spin = floor_vm.spin_ns_per_iteration()
        status(f"floor VM: dec/jnz loop {spin:.2f} ns/iteration ({'native' if spin < 20 else 'EMULATED?'})")
        status(f"warming up ({warmup} calls per case) ...")
        for c in cases:
            c.step(max(1, int(warmup * min(1.0, c.weight * 4))))
            c.reset()
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
                c.step(max(1, int(n * c.weight)))

        status("instrumented pass (exits, time in KVM_RUN) ...")
        diag_n = min(iterations, 500)
        for c in cases:
            if c.group == "call":
                _instrumented_pass(c, diag_n)
        pool_stats = pool.stats() if pool is not None else None
    finally:
        if floor_vm is not None:
            floor_vm.close()
        for sb in sandboxes:
            sb.close()
        if pool is not None:
            pool.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    floor_stats = {m: percentiles(floors[m]) for m in FLOOR_MODES}
    base = floor_stats["run"]
    out_cases = []
    for c in cases:
        p = percentiles(c.samples)
        entry: dict[str, Any] = {
            "label": c.label,
            "group": c.group,
            "latency": p,
            "ratio_to_floor_p50": p["p50_us"] / base["p50_us"],
            "ratio_to_floor_p99": p["p99_us"] / base["p99_us"],
            "restore_stats": None,
            "exits_per_call": c.exits_per_call,
            "in_kvm_run": percentiles(c.in_kvm_run) if c.in_kvm_run else None,
            "parts": {k: percentiles(v) for k, v in c.parts.items() if v},
        }
        if c.group == "call":
            entry.update(function=c.function, restore=c.restore)
        if c.dirty and (c.group != "call" or c.restore):
            entry["restore_stats"] = {
                "dirty_pages_p50": statistics.median(c.dirty),
                "dirty_pages_min": min(c.dirty),
                "dirty_pages_max": max(c.dirty),
                "copied_pages_p50": statistics.median(c.copied),
                "dropped_pages_p50": statistics.median(c.dropped),
                "sandbox_resident_pages": c.resident,
            }
        out_cases.append(entry)
    p50 = {c["label"]: c["latency"]["p50_us"] for c in out_cases}
    ratios = [{"what": f"{num} / {den}", "ratio_p50": p50[num] / p50[den], "target": target,
               "met": p50[num] / p50[den] <= target}
              for num, den, target in RATIO_TARGETS if num in p50 and den in p50]
    return {
        "iterations": iterations,
        "warmup": warmup,
        "round": ROUND,
        "groups": GROUPS,
        "floor_spin_ns_per_iteration": spin,
        "floor": {m: {"label": floor_mod.MODE_LABELS[m], "latency": s,
                      "ratio_to_floor_p50": s["p50_us"] / base["p50_us"],
                      "ratio_to_floor_p99": s["p99_us"] / base["p99_us"]}
                  for m, s in floor_stats.items()},
        "cases": out_cases,
        "wasmtime": {"version": wasm_guest.wasmtime_version(), "config": wasm_guest.ENGINE_CONFIG}
        if with_wasm else None,
        "pool_stats": pool_stats,
        "ratios": ratios,
        "notes": notes,
    }


def print_report(data: dict[str, Any]) -> None:
    headers = ["what", "n", "p50 us", "p99 us", "p50 x floor", "p99 x floor", "dirty pg", "exits",
               "in KVM_RUN p50 us"]
    rows = []
    for m, f in data["floor"].items():
        s = f["latency"]
        rows.append([f"[floor] {f['label']}", s["n"], s["p50_us"], s["p99_us"], f["ratio_to_floor_p50"],
                     f["ratio_to_floor_p99"], "-", 1, s["p50_us"]])
    for c in data["cases"]:
        s, r = c["latency"], c["restore_stats"]
        if r is None:
            dirty: Any = "-"
        elif r["dirty_pages_min"] != r["dirty_pages_max"]:
            dirty = f"{r['dirty_pages_min']}-{r['dirty_pages_max']}"
        else:
            dirty = int(r["dirty_pages_p50"])
        kvm = c["in_kvm_run"]["p50_us"] if c.get("in_kvm_run") else None
        prefix = "" if c["group"] == "call" else f"[{c['group']}] "
        rows.append([prefix + c["label"], s["n"], s["p50_us"], s["p99_us"], c["ratio_to_floor_p50"],
                     c["ratio_to_floor_p99"], dirty, _fmt_exits(c["exits_per_call"]), kvm])
    print_table(f"Latency, us ({data['iterations']} per cheap row, interleaved in rounds; "
                f"x floor = / bare KVM_RUN p50, p99)", headers, rows)
    for c in data["cases"]:
        if c["group"] == "create":
            p = c["parts"]
            print(f"{c['label']}: Sandbox() {p['create']['p50_us']:,.0f} us + first call "
                  f"{p['first_call']['p50_us']:,.0f} us (p50); close {p['close']['p50_us']:,.0f} us.")
    print("dirty pg = pages restore put back per call (the n touched + the pages every call writes); "
          "exits = userspace exits per call; restore rows time sandbox.restore() alone.")
    ratios = data.get("ratios") or []
    if ratios:
        print_table("Ratios of p50 latencies (targets: issue 12)", ["what", "ratio", "target", "met"],
                    [[r["what"], r["ratio_p50"], f"<= {r['target']}", "yes" if r["met"] else "NO"] for r in ratios])
    for note in data.get("notes", []):
        print(note)


def _fmt_exits(x: float | None) -> str:
    if x is None:
        return "-"
    return str(int(x)) if x == int(x) else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="hlpool latency vs the bare-KVM floor and wasmtime-py")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ITERATIONS} calls per case (< 1 minute)")
    parser.add_argument("--iterations", type=int, default=None,
                        help=f"timed calls per cheap case (default {DEFAULT_ITERATIONS})")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per case first")
    parser.add_argument("--no-pool", action="store_true", help="skip the Pool.submit rows")
    parser.add_argument("--no-wasm", action="store_true", help="skip the wasmtime rows")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/latency.json")
    args = parser.parse_args(argv)
    iterations = args.iterations or (QUICK_ITERATIONS if args.quick else DEFAULT_ITERATIONS)
    if iterations <= 0:
        parser.error("--iterations must be positive")
    warmup = args.warmup if args.warmup is not None else (50 if args.quick else 200)
    t0 = time.monotonic()
    data = run_benchmark(iterations, warmup, with_pool=not args.no_pool, with_wasm=not args.no_wasm)
    data["quick"] = bool(args.quick)
    data["elapsed_s"] = time.monotonic() - t0
    print_report(data)
    if not args.no_write:
        path = write_results("latency", data)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
