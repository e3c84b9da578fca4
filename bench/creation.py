"""Sandbox creation from a persisted snapshot vs the bare cost of a KVM VM + vCPU, in the same run.

Measured per iteration, all kinds interleaved so machine noise hits them alike:

- ``bare VM + vCPU``: ``KVM_CREATE_VM`` + ``KVM_CREATE_VCPU`` ioctls only (raw fds), and
  their teardown (closing both fds);
- ``hlpool Vm + Vcpu``: ``hlpool.kvm.vm.Vm()`` + ``hlpool.kvm.vcpu.Vcpu`` (adds the
  kvm_run mmap and KVM_SET_CPUID2), and closing them;
- ``floor VM``: bench/floor.py's minimal VM (VM, 4 MiB slot, page tables, vCPU,
  registers, PVM VIF page, first KVM_RUN to its first ``out``) - the least a
  runnable VM costs, with its phases;
- ``Snapshot.open`` of the echo guest's snapshot file: cold (the file's content
  hash is computed: the process-wide cache of verified files,
  ``hlpool.snapfile._verified``, is cleared first) and warm (hash cached);
- ``Sandbox(snapshot)`` with the snapshot opened once beforehand (new VM, map the
  snapshot file, slots, vCPU state), then its first ``call("noop")`` (page
  faults of a fresh VM included), a second ``call("noop")`` for reference,
  and ``Sandbox.close()``.

Reported: median and p90 (us) per step, and ratios to the bare VM + vCPU.

A separate pass splits ``Sandbox(snapshot)`` into its parts by wrapping, for the
duration of that pass only, the names ``hlpool.sandbox`` calls (``Vm``,
``GuestMemory``, ``Vcpu``, ``Vcpu.load_state``, ``Vcpu.enable_native_execution``)
and ``Vm.set_memory_slot`` (KVM_SET_USER_MEMORY_REGION, counted and timed) with
timers; the wrappers add ~1 us each.

Usage: ``python bench/creation.py [--quick] [--iterations N]``; writes bench/results/creation.json.
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
    from . import floor as floor_mod
    from .common import percentiles, print_table, progress, status, write_results
except ImportError:  # run as a script, or imported with bench/ on sys.path
    import floor as floor_mod  # type: ignore[no-redef]
    from common import percentiles, print_table, progress, status, write_results  # type: ignore[no-redef]

DEFAULT_ITERATIONS = 1000
QUICK_ITERATIONS = 40
WARMUP = 5

ROWS = (
    ("bare_create", "bare KVM_CREATE_VM + KVM_CREATE_VCPU"),
    ("bare_teardown", "bare: close vCPU + VM fds"),
    ("hl_vm_vcpu_create", "hlpool Vm() + Vcpu() (+ run mmap, SET_CPUID2)"),
    ("hl_vm_vcpu_close", "hlpool Vcpu.close() + Vm.close()"),
    ("floor_total", "floor VM: create..first run (total)"),
    ("floor_create_vm", "  floor: KVM_CREATE_VM"),
    ("floor_memory_slot", "  floor: mmap + page tables + slot"),
    ("floor_vcpu_setup", "  floor: vCPU + CPUID + regs + VIF"),
    ("floor_first_run", "  floor: first KVM_RUN"),
    ("floor_teardown", "floor VM teardown"),
    ("open_cold", "Snapshot.open (validate + hash)"),
    ("open_warm", "Snapshot.open (hash cached)"),
    ("sandbox_create", "Sandbox(snapshot)"),
    ("first_call", "first call('noop')"),
    ("create_plus_first_call", "Sandbox(snapshot) + first call"),
    ("second_call", "second call('noop') (warm)"),
    ("sandbox_close", "Sandbox.close()"),
)


def _bare(kvm: Any, abi: Any) -> tuple[int, int]:
    clock = time.perf_counter_ns
    t0 = clock()
    vm_fd = kvm.create_vm_fd()
    try:
        vcpu_fd = abi.ioctl(vm_fd, abi.KVM_CREATE_VCPU, 0)
    except BaseException:
        os.close(vm_fd)
        raise
    t1 = clock()
    os.close(vcpu_fd)
    os.close(vm_fd)
    t2 = clock()
    return t1 - t0, t2 - t1


def _hl_vm_vcpu() -> tuple[int, int]:
    from hlpool.kvm.vcpu import Vcpu
    from hlpool.kvm.vm import Vm

    clock = time.perf_counter_ns
    t0 = clock()
    vm = Vm()
    try:
        vcpu = Vcpu(vm)
    except BaseException:
        vm.close()
        raise
    t1 = clock()
    vcpu.close()
    vm.close()
    t2 = clock()
    return t1 - t0, t2 - t1


def _open(path: str, cold: bool) -> int:
    import hlpool
    from hlpool.snapshot import snapfile

    if cold:
        with snapfile._verified_lock:
            snapfile._verified.clear()
    t0 = time.perf_counter_ns()
    snap = hlpool.Snapshot.open(path)
    t1 = time.perf_counter_ns()
    for layer in snap.layers:
        layer.close()
    return t1 - t0


def _sandbox(snapshot: Any) -> dict[str, int]:
    import hlpool

    clock = time.perf_counter_ns
    t0 = clock()
    sb = hlpool.Sandbox(snapshot)
    try:
        t1 = clock()
        first = sb.call("noop")
        t2 = clock()
        second = sb.call("noop")
        t3 = clock()
        if first is not None or second is not None:
            raise RuntimeError(f"noop returned {first!r}, {second!r}")
    finally:
        t4 = clock()
        sb.close()
        t5 = clock()
    return {"sandbox_create": t1 - t0, "first_call": t2 - t1, "create_plus_first_call": t2 - t0,
            "second_call": t3 - t2, "sandbox_close": t5 - t4}


BREAKDOWN = (
    ("vm", "Vm() (KVM_CREATE_VM)"),
    ("memory", "GuestMemory (mmaps + memory slots)"),
    ("set_memory_slot", "  of which KVM_SET_USER_MEMORY_REGION (all slots)"),
    ("vcpu", "Vcpu() (KVM_CREATE_VCPU, run mmap, SET_CPUID2)"),
    ("load_state", "Vcpu.load_state (sregs, regs, xsave, MSRs, ...)"),
    ("enable_native", "PVM VIF MSR"),
    ("other", "the rest of Sandbox.__init__"),
    ("total", "Sandbox(snapshot) total (instrumented)"),
)


def creation_breakdown(snapshot: Any, iterations: int) -> dict[str, Any]:
    """Time the parts of ``Sandbox(snapshot)`` by temporarily wrapping what it calls."""
    import hlpool
    from hlpool.kvm import vcpu as vcpu_mod
    from hlpool.kvm import vm as vm_mod
    from hlpool.machine import machine as machine_mod

    clock = time.perf_counter_ns
    acc: dict[str, int] = {}
    slot_calls = [0]

    def timed(key: str, fn: Any) -> Any:
        if isinstance(fn, type):  # a class: a subclass whose __init__ is timed (keeps its static methods)
            def __init__(self: Any, *a: Any, **kw: Any) -> None:
                t0 = clock()
                try:
                    fn.__init__(self, *a, **kw)
                finally:
                    acc[key] = acc.get(key, 0) + clock() - t0
            return type(fn.__name__, (fn,), {"__init__": __init__})

        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = clock()
            try:
                return fn(*a, **kw)
            finally:
                acc[key] = acc.get(key, 0) + clock() - t0
        return wrapper

    originals = {
        (machine_mod, "Vm"): machine_mod.Vm,
        (machine_mod, "GuestMemory"): machine_mod.GuestMemory,
        (machine_mod, "Vcpu"): machine_mod.Vcpu,
        (vcpu_mod.Vcpu, "load_state"): vcpu_mod.Vcpu.load_state,
        (vcpu_mod.Vcpu, "enable_native_execution"): vcpu_mod.Vcpu.enable_native_execution,
        (vm_mod.Vm, "set_memory_slot"): vm_mod.Vm.set_memory_slot,
    }
    orig_slot = vm_mod.Vm.set_memory_slot

    def set_memory_slot(self: Any, slot: Any) -> None:
        slot_calls[0] += 1
        t0 = clock()
        try:
            orig_slot(self, slot)
        finally:
            acc["set_memory_slot"] = acc.get("set_memory_slot", 0) + clock() - t0

    samples: dict[str, list[int]] = {key: [] for key, _ in BREAKDOWN}
    try:
        machine_mod.Vm = timed("vm", originals[(machine_mod, "Vm")])
        machine_mod.GuestMemory = timed("memory", originals[(machine_mod, "GuestMemory")])
        machine_mod.Vcpu = timed("vcpu", originals[(machine_mod, "Vcpu")])
        vcpu_mod.Vcpu.load_state = timed("load_state", originals[(vcpu_mod.Vcpu, "load_state")])
        vcpu_mod.Vcpu.enable_native_execution = timed(
            "enable_native", originals[(vcpu_mod.Vcpu, "enable_native_execution")])
        vm_mod.Vm.set_memory_slot = set_memory_slot
        for i in progress(range(iterations), "creation breakdown"):
            acc.clear()
            slot_calls[0] = 0
            t0 = clock()
            sb = hlpool.Sandbox(snapshot)
            total = clock() - t0
            sb.close()
            parts = {k: acc.get(k, 0) for k in ("vm", "memory", "set_memory_slot", "vcpu", "load_state",
                                                  "enable_native")}
            parts["other"] = total - sum(v for k, v in parts.items() if k != "set_memory_slot")
            parts["total"] = total
            for k, v in parts.items():
                samples[k].append(v)
    finally:
        for (obj, name), value in originals.items():
            setattr(obj, name, value)
    return {"iterations": iterations, "memory_slots_per_sandbox": slot_calls[0],
            "stats": {k: percentiles(v) for k, v in samples.items()}}


def run_benchmark(iterations: int) -> dict[str, Any]:
    import hlpool
    from hlpool.guest.examples import example_path
    from hlpool.kvm import abi
    from hlpool.kvm.system import system

    kvm = system()
    samples: dict[str, list[int]] = {key: [] for key, _ in ROWS}
    tmp = tempfile.mkdtemp(prefix="hlpool-bench-creation-")
    try:
        path = os.path.join(tmp, "echo.snap")
        hlpool.Snapshot.from_elf(example_path("echo")).persist(path)
        file_bytes = os.path.getsize(path)
        snapshot = hlpool.Snapshot.open(path)  # opened once; every Sandbox below maps it

        def one(record: bool) -> None:
            c, t = _bare(kvm, abi)
            hc, ht = _hl_vm_vcpu()
            floor = floor_mod.measure_vm_creation(1)
            cold = _open(path, cold=True)
            warm = _open(path, cold=False)
            sb = _sandbox(snapshot)
            if not record:
                return
            samples["bare_create"].append(c)
            samples["bare_teardown"].append(t)
            samples["hl_vm_vcpu_create"].append(hc)
            samples["hl_vm_vcpu_close"].append(ht)
            samples["floor_total"].append(floor["total_ns"][0])
            for phase in ("create_vm", "memory_slot", "vcpu_setup", "first_run"):
                samples[f"floor_{phase}"].append(floor[f"{phase}_ns"][0])
            samples["floor_teardown"].append(floor["teardown_ns"][0])
            samples["open_cold"].append(cold)
            samples["open_warm"].append(warm)
            for k, v in sb.items():
                samples[k].append(v)

        status(f"warming up ({WARMUP} iterations) ...")
        for _ in range(WARMUP):
            one(False)
        gc.collect()
        status(f"{iterations} interleaved iterations ...")
        gc.disable()
        try:
            for i in progress(range(iterations), "creation"):
                one(True)
                if i % 50 == 49:
                    gc.collect()
        finally:
            gc.enable()
        status("breakdown of Sandbox(snapshot) ...")
        breakdown = creation_breakdown(snapshot, max(20, iterations // 2))
        for layer in snapshot.layers:
            layer.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    stats = {key: percentiles(v) for key, v in samples.items()}
    base = stats["bare_create"]["p50_us"]
    return {
        "iterations": iterations,
        "snapshot_file_bytes": file_bytes,
        "labels": dict(ROWS),
        "stats": stats,
        "ratio_to_bare_create_p50": {key: s["p50_us"] / base for key, s in stats.items()},
        "sandbox_create_breakdown": breakdown,
    }


def print_report(data: dict[str, Any]) -> None:
    rows = []
    for key, label in ROWS:
        s = data["stats"][key]
        rows.append([label, s["p50_us"], s["p90_us"], s["p99_us"], s["min_us"],
                     data["ratio_to_bare_create_p50"][key]])
    print_table(f"Sandbox creation from a persisted snapshot vs bare KVM VM + vCPU "
                f"({data['iterations']} iterations, interleaved); us",
                ["step", "p50", "p90", "p99", "min", "x bare p50"], rows)
    b = data["sandbox_create_breakdown"]
    rows = [[label, b["stats"][key]["p50_us"], b["stats"][key]["p90_us"]] for key, label in BREAKDOWN]
    print_table(f"Sandbox(snapshot) split into parts (separate instrumented pass, {b['iterations']} sandboxes; "
                f"{b['memory_slots_per_sandbox']} memory slots each); us", ["part", "p50", "p90"], rows)
    st = data["stats"]
    print(f"Sandbox(snapshot) + first call = {st['create_plus_first_call']['p50_us'] / 1000:.2f} ms median; "
          f"of which bare VM + vCPU {st['bare_create']['p50_us'] / 1000:.2f} ms; Snapshot.open (cold) "
          f"{st['open_cold']['p50_us'] / 1000:.2f} ms for a {data['snapshot_file_bytes'] / 1024:.0f} KiB file.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sandbox creation from a snapshot vs bare VM + vCPU creation")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ITERATIONS} iterations (< 1 minute)")
    parser.add_argument("--iterations", type=int, default=None, help=f"default {DEFAULT_ITERATIONS}")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/creation.json")
    args = parser.parse_args(argv)
    iterations = args.iterations or (QUICK_ITERATIONS if args.quick else DEFAULT_ITERATIONS)
    if iterations <= 0:
        parser.error("--iterations must be positive")
    t0 = time.monotonic()
    data = run_benchmark(iterations)
    data["quick"] = bool(args.quick)
    data["elapsed_s"] = time.monotonic() - t0
    print_report(data)
    if not args.no_write:
        path = write_results("creation", data)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
