"""The bare-KVM floor: what one guest->host round trip costs with no hlpool runtime at all.

A minimal VM is built directly from hlpool's KVM building blocks (no
Snapshot, no Sandbox, no guest runtime):

- one anonymous 4 MiB memory slot at GPA 0,
- identity page tables from ``_mapping.build_page_tables`` mapping only a
  code page (r-x) and a stack page (rw),
- a GDT (null, code 0x08, data 0x10, a TSS at 0x18 so the state is valid on
  VMX/SVM too),
- 64-bit sregs from ``hlpool.boot.initial_sregs`` with our GDT and CR3,
- the guest code ``loop: out %al,$0x10 ; jmp loop`` (bytes ``e6 10 eb fc``),
- the PVM VIF page registered on a page the guest never touches.

Each KVM_RUN therefore executes one ``out`` and comes back as KVM_EXIT_IO
on port 0x10: that is the cost of one userspace exit, the floor under any
hlpool call. Measured modes:

- ``run``: plain KVM_RUN round trips;
- ``sync_regs``: ``load_sync_regs(regs, sregs)`` + KVM_RUN, registers
  reloaded each time as hlpool does at the start of every call;
- ``ioctl_regs`` (for comparison): KVM_SET_SREGS + KVM_SET_REGS + KVM_RUN.

The density benchmark (bench/density.py) also uses it as the memory floor:
with a :class:`FloorImage` the VM gets a second memory slot holding a guest
image (the pages of a snapshot's image area, mapped MAP_PRIVATE from the
snapshot file, or copied into private anonymous memory), and
:meth:`FloorVm.touch` runs ``touch_loop``: read one byte of every image page,
then increment one byte in each of ``write_pages`` pages, then ``out``.

Run as a script for a table: ``python bench/floor.py [--quick] [--iterations N]``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import struct
import sys
import time
from dataclasses import dataclass

from hlpool import _mapping
from hlpool.guest.boot import initial_sregs
from hlpool.kvm import _vcpu_run, abi
from hlpool.kvm.vcpu import Vcpu
from hlpool.kvm.vm import MemorySlot, Vm

try:
    from .common import percentiles, print_table, status, write_results
except ImportError:  # run as a script, or imported with bench/ on sys.path
    from common import percentiles, print_table, status, write_results  # type: ignore[no-redef]

PAGE = 4096
MEM_SIZE = 4 << 20
VIF_GPA = 0x1000        # registered with PVM, never mapped in the guest's page tables
GDT_GPA = 0x2000        # GDT + TSS page; not mapped in the guest's page tables: the loop never
TSS_GPA = GDT_GPA + 0x800  # loads a segment or takes an exception, so the CPU never reads it
PT_GPA = 0x10000        # PML4 and the rest of the page tables
CODE_GPA = 0x100000     # 1 MiB: the loop
STACK_GPA = 0x101000    # one rw page (the loop never uses it; rsp points at its top)
MAX_PT_PAGES = (CODE_GPA - PT_GPA) // PAGE

PORT = 0x10
GUEST_CODE = bytes.fromhex("e610ebfc")  # loop: out %al,$0x10 ; jmp loop
# Native-execution check, at CODE_GPA + SPIN_OFFSET:
#   movabs $n,%rcx ; 1: dec %rcx ; jnz 1b ; 2: out %al,$0x10 ; jmp 2b
SPIN_OFFSET = 0x100
SPIN_COUNT_OFFSET = SPIN_OFFSET + 2  # the imm64 of the movabs


# Memory-touching loop, at CODE_GPA + TOUCH_OFFSET (rsi = image, rcx = pages to read,
# rdi = first page to write, rdx = pages to write; rcx, rdx >= 1):
#   1: mov (%rsi),%al ; add $4096,%rsi ; dec %rcx ; jnz 1b
#   2: incb (%rdi)    ; add $4096,%rdi ; dec %rdx ; jnz 2b
#   3: out %al,$0x10  ; jmp 3b
TOUCH_OFFSET = 0x200
TOUCH_CODE = bytes.fromhex("8a06" "4881c600100000" "48ffc9" "75f2"
                           "fe07" "4881c700100000" "48ffca" "75f2"
                           "e610ebfc")
IMAGE_GPA = 0x400000    # the optional image slot: right after the 4 MiB low slot, 2 MiB aligned
SLOT_LOW, SLOT_IMAGE = 0, 1


@dataclass(frozen=True)
class FloorImage:
    """Guest pages for a floor VM's image slot.

    ``runs``: (first_page, count, fd, file_offset) covering ``pages`` pages;
    fd -1 means zero pages. ``private_copy``: copy the file bytes into
    private anonymous memory instead of mapping the file MAP_PRIVATE.
    ``write_pages``: pages :meth:`FloorVm.touch` writes (at the start of the
    image's last 1 MiB, where a guest's .data is).
    """

    pages: int
    runs: tuple[tuple[int, int, int, int], ...]
    private_copy: bool = False
    write_pages: int = 8

    @classmethod
    def from_snapshot(cls, snapshot, private_copy: bool = False, write_pages: int = 8) -> "FloorImage":
        """The image area of an hlpool snapshot (the main slot's first pages), from its layer files."""
        pages = snapshot.layout.image.size // PAGE
        runs = []
        for run in snapshot.runs["main"]:
            if run.first_page >= pages:
                break
            count = min(run.count, pages - run.first_page)
            if run.layer < 0:
                runs.append((run.first_page, count, -1, 0))
            else:
                layer = snapshot.layers[run.layer]
                runs.append((run.first_page, count, layer.fd, layer.file_offset(run.offset)))
        return cls(pages, tuple(runs), private_copy, write_pages)


def _spin_code(n: int) -> bytes:
    return b"\x48\xb9" + struct.pack("<Q", n) + bytes.fromhex("48ffc975fb") + bytes.fromhex("e610ebfc")

SEL_CODE, SEL_DATA, SEL_TSS = 0x08, 0x10, 0x18
TSS_SIZE = 104

# Offsets inside struct kvm_run (fixed ABI).
_OFF_IO = abi.RUN_OFFSET_EXIT
_OFF_IO_DIRECTION = _OFF_IO + abi.KvmRunIo.direction.offset
_OFF_IO_SIZE = _OFF_IO + abi.KvmRunIo.size.offset
_OFF_IO_PORT = _OFF_IO + abi.KvmRunIo.port.offset

MODES = ("run", "sync_regs", "ioctl_regs")
MODE_LABELS = {
    "run": "bare KVM_RUN (out -> exit)",
    "sync_regs": "load_sync_regs + KVM_RUN",
    "ioctl_regs": "SET_SREGS + SET_REGS + KVM_RUN",
}


def _gdt_page() -> bytes:
    tss_low = ((TSS_SIZE - 1) & 0xFFFF) | ((TSS_GPA & 0xFFFFFF) << 16) | (0x8B << 40) | \
              (((TSS_GPA >> 24) & 0xFF) << 56)
    gdt = struct.pack("<5Q", 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, tss_low, TSS_GPA >> 32)
    page = bytearray(PAGE)
    page[:len(gdt)] = gdt
    tss = bytearray(TSS_SIZE)
    struct.pack_into("<H", tss, 102, TSS_SIZE)  # no I/O permission bitmap
    page[TSS_GPA - GDT_GPA:TSS_GPA - GDT_GPA + TSS_SIZE] = tss
    return bytes(page)


class FloorVm:
    """A minimal native-running VM whose every KVM_RUN is one ``out`` to port 0x10.

    With ``image`` it also has an image slot at :data:`IMAGE_GPA` (see :class:`FloorImage`).
    """

    def __init__(self, image: FloorImage | None = None) -> None:
        self.vm: Vm | None = None
        self.vcpu: Vcpu | None = None
        self.host = 0
        self.image = image
        self.image_host = 0
        self.image_size = image.pages * PAGE if image else 0
        self.timings: dict[str, int] = {}
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        t0 = time.perf_counter_ns()
        self.vm = Vm()
        t1 = time.perf_counter_ns()
        # Memory: one anonymous slot; every slot must exist before the vCPU (PVM.md).
        self.host = _mapping.reserve(MEM_SIZE)
        _mapping.map_anonymous_fixed(self.host, MEM_SIZE)
        mappings = [(CODE_GPA, PAGE, _mapping.MAP_EXEC), (STACK_GPA, PAGE, _mapping.MAP_WRITE)]
        if self.image is not None:
            mappings.append((IMAGE_GPA, self.image_size, _mapping.MAP_WRITE))
        tables = _mapping.build_page_tables(mappings, PT_GPA, MAX_PT_PAGES)
        _mapping.write_bytes(self.host + PT_GPA, tables)
        _mapping.write_bytes(self.host + GDT_GPA, _gdt_page())
        _mapping.write_bytes(self.host + CODE_GPA, GUEST_CODE)
        _mapping.write_bytes(self.host + CODE_GPA + SPIN_OFFSET, _spin_code(0))
        _mapping.write_bytes(self.host + CODE_GPA + TOUCH_OFFSET, TOUCH_CODE)
        self.vm.set_memory_slot(MemorySlot(SLOT_LOW, 0, MEM_SIZE, self.host))
        if self.image is not None:
            self.image_host = self._map_image(self.image)
            self.vm.set_memory_slot(MemorySlot(SLOT_IMAGE, IMAGE_GPA, self.image_size, self.image_host))
        t2 = time.perf_counter_ns()
        # vCPU: 64-bit mode straight from the host.
        self.vcpu = vcpu = Vcpu(self.vm)
        sregs = initial_sregs(vcpu.get_sregs())
        sregs.gdt = abi.KvmDtable(base=GDT_GPA, limit=5 * 8 - 1)
        sregs.idt = abi.KvmDtable(base=0, limit=0)
        sregs.tr = abi.KvmSegment(base=TSS_GPA, limit=TSS_SIZE - 1, selector=SEL_TSS, type=11, present=1, s=0)
        sregs.cr3 = PT_GPA
        regs = abi.KvmRegs()
        regs.rip = CODE_GPA
        regs.rsp = STACK_GPA + PAGE
        regs.rflags = 0x2
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        vcpu.enable_native_execution(VIF_GPA)
        self.regs_bytes = bytes(regs)
        self.sregs_bytes = bytes(sregs)
        self.regs = regs
        self.sregs = sregs
        t3 = time.perf_counter_ns()
        self.fd = vcpu.fd
        self.run_address = vcpu.run_address
        self._exit_reason = ctypes.c_uint32.from_address(self.run_address + abi.KvmRun.exit_reason.offset)
        self._io_port = ctypes.c_uint16.from_address(self.run_address + _OFF_IO_PORT)
        self._io_dir = ctypes.c_uint8.from_address(self.run_address + _OFF_IO_DIRECTION)
        self._io_size = ctypes.c_uint8.from_address(self.run_address + _OFF_IO_SIZE)
        self.check_exit(self.run_once())
        t4 = time.perf_counter_ns()
        self.timings = {"create_vm_ns": t1 - t0, "memory_slot_ns": t2 - t1, "vcpu_setup_ns": t3 - t2,
                        "first_run_ns": t4 - t3}

    def _map_image(self, image: FloorImage) -> int:
        host = _mapping.reserve(self.image_size)
        try:
            for first, count, fd, offset in image.runs:
                addr = host + first * PAGE
                if fd < 0:
                    _mapping.map_anonymous_fixed(addr, count * PAGE)
                elif image.private_copy:
                    _mapping.map_anonymous_fixed(addr, count * PAGE)
                    _mapping.write_bytes(addr, os.pread(fd, count * PAGE, offset))
                else:
                    _mapping.map_file_fixed(addr, count * PAGE, fd, offset)
        except BaseException:
            _mapping.unmap(host, self.image_size)
            raise
        return host

    def run_once(self) -> int:
        return _vcpu_run.run(self.fd, self.run_address)

    def touch(self, read_pages: int | None = None, write_pages: int | None = None) -> int:
        """Read one byte of each of the image's first ``read_pages`` pages (default: all), write
        ``write_pages`` (default: the image's) pages, exit; returns the ns spent in KVM_RUN.

        Leaves the vCPU back at the ``out`` loop of :meth:`measure`."""
        if self.image is None:
            raise RuntimeError("touch() needs a FloorVm built with an image")
        pages = self.image.pages
        read_pages = pages if read_pages is None else read_pages
        write_pages = self.image.write_pages if write_pages is None else write_pages
        if not (1 <= read_pages <= pages and 1 <= write_pages <= pages):
            raise ValueError("touch() reads and writes at least one page, at most the image")
        first_write = max(0, pages - 256) if pages - 256 >= write_pages else pages - write_pages
        regs = abi.KvmRegs.from_buffer_copy(self.regs_bytes)
        regs.rip = CODE_GPA + TOUCH_OFFSET
        regs.rsi, regs.rcx = IMAGE_GPA, read_pages
        regs.rdi, regs.rdx = IMAGE_GPA + first_write * PAGE, write_pages
        self.vcpu.set_regs(regs)
        t0 = time.perf_counter_ns()
        reason = self.run_once()
        elapsed = time.perf_counter_ns() - t0
        self.check_exit(reason)
        self.vcpu.set_regs(self.regs)
        self.check_exit(self.run_once())
        return elapsed

    def check_exit(self, reason: int) -> None:
        """Raise unless the last exit was the guest's 1-byte ``out`` to port 0x10."""
        if reason != abi.KVM_EXIT_IO:
            name = abi.EXIT_REASON_NAMES.get(reason, str(reason))
            rip = self.vcpu.get_regs().rip if self.vcpu else 0
            raise RuntimeError(f"floor VM: expected KVM_EXIT_IO, got {name} at rip={rip:#x}")
        if self._io_port.value != PORT or self._io_dir.value != 1 or self._io_size.value != 1:
            raise RuntimeError(f"floor VM: unexpected I/O exit: port {self._io_port.value:#x} "
                               f"direction {self._io_dir.value} size {self._io_size.value}")

    def spin_ns_per_iteration(self, n: int = 200_000) -> float:
        """Run a ``dec; jnz`` loop of ``n`` iterations in the guest; ns per iteration.

        Natively this is ~0.3-1 ns; an instruction-emulated vCPU (PVM without
        the VIF page) takes ~1 us per instruction, so this tells the two apart.
        Leaves the vCPU back at the ``out`` loop.
        """
        _mapping.write_bytes(self.host + CODE_GPA + SPIN_COUNT_OFFSET, struct.pack("<Q", n))
        spin = abi.KvmRegs.from_buffer_copy(self.regs_bytes)
        spin.rip = CODE_GPA + SPIN_OFFSET
        self.vcpu.set_regs(spin)
        t0 = time.perf_counter_ns()
        reason = self.run_once()
        elapsed = time.perf_counter_ns() - t0
        self.check_exit(reason)
        self.vcpu.set_regs(self.regs)
        self.check_exit(self.run_once())
        return elapsed / n

    def measure(self, mode: str, iterations: int, warmup: int = 200) -> list[int]:
        """Per-iteration wall time in ns of ``mode`` (one of :data:`MODES`)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        clock = time.perf_counter_ns
        run = _vcpu_run.run
        fd, addr = self.fd, self.run_address
        check = self.check_exit
        samples = [0] * iterations
        if mode == "run":
            for i in range(-warmup, iterations):
                t0 = clock()
                reason = run(fd, addr)
                t1 = clock()
                if reason != abi.KVM_EXIT_IO or self._io_port.value != PORT:
                    check(reason)
                if i >= 0:
                    samples[i] = t1 - t0
        elif mode == "sync_regs":
            load = _vcpu_run.load_sync_regs
            regs, sregs = self.regs_bytes, self.sregs_bytes
            for i in range(-warmup, iterations):
                t0 = clock()
                load(addr, regs, sregs)
                reason = run(fd, addr)
                t1 = clock()
                if reason != abi.KVM_EXIT_IO or self._io_port.value != PORT:
                    check(reason)
                if i >= 0:
                    samples[i] = t1 - t0
        else:
            set_regs, set_sregs = self.vcpu.set_regs, self.vcpu.set_sregs
            regs, sregs = self.regs, self.sregs
            for i in range(-warmup, iterations):
                t0 = clock()
                set_sregs(sregs)
                set_regs(regs)
                reason = run(fd, addr)
                t1 = clock()
                if reason != abi.KVM_EXIT_IO or self._io_port.value != PORT:
                    check(reason)
                if i >= 0:
                    samples[i] = t1 - t0
        return samples

    def close(self) -> None:
        if self.vcpu is not None:
            self.vcpu.close()
            self.vcpu = None
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.host:
            _mapping.unmap(self.host, MEM_SIZE)
            self.host = 0
        if self.image_host:
            _mapping.unmap(self.image_host, self.image_size)
            self.image_host = 0

    def __enter__(self) -> "FloorVm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def measure_floor(iterations: int, mode: str = "run", *, warmup: int = 200) -> list[int]:
    """Per-iteration ns of one floor mode on a fresh minimal VM.

    ``mode="run"``: plain KVM_RUN round trips (the guest's ``out`` exits to
    userspace every time); ``mode="sync_regs"``: ``load_sync_regs(regs, sregs)``
    + KVM_RUN, i.e. registers reloaded each time as hlpool does per call;
    ``mode="ioctl_regs"``: KVM_SET_SREGS + KVM_SET_REGS + KVM_RUN. Every exit is
    checked to be KVM_EXIT_IO on port 0x10.
    """
    with FloorVm() as vm:
        return vm.measure(mode, iterations, warmup)


def measure_floor_all(iterations: int, modes: tuple[str, ...] = ("run", "sync_regs"), *,
                      warmup: int = 200) -> dict[str, list[int]]:
    """Several floor modes on one VM, interleaved in chunks so drift hits them alike."""
    out: dict[str, list[int]] = {m: [] for m in modes}
    chunk = max(1, min(iterations, 500))
    with FloorVm() as vm:
        for m in modes:
            vm.measure(m, 0, warmup)
        done = 0
        while done < iterations:
            n = min(chunk, iterations - done)
            for m in modes:
                out[m].extend(vm.measure(m, n, warmup=0))
            done += n
    return out


def measure_vm_creation(n: int) -> dict[str, list[int]]:
    """Create and destroy ``n`` minimal VMs; per-phase ns lists.

    Phases: ``create_vm_ns`` (KVM_CREATE_VM), ``memory_slot_ns`` (mmap, page
    tables, KVM_SET_USER_MEMORY_REGION), ``vcpu_setup_ns`` (KVM_CREATE_VCPU,
    run mmap, CPUID, sregs, regs, VIF MSR), ``first_run_ns`` (first KVM_RUN up
    to the first ``out``, including its page faults), ``total_ns`` (all of
    these), ``teardown_ns`` (close vCPU and VM fds, munmap).
    """
    keys = ("create_vm_ns", "memory_slot_ns", "vcpu_setup_ns", "first_run_ns", "total_ns", "teardown_ns")
    out: dict[str, list[int]] = {k: [] for k in keys}
    for _ in range(n):
        t0 = time.perf_counter_ns()
        vm = FloorVm()
        t1 = time.perf_counter_ns()
        vm.close()
        t2 = time.perf_counter_ns()
        for k, v in vm.timings.items():
            out[k].append(v)
        out["total_ns"].append(t1 - t0)
        out["teardown_ns"].append(t2 - t1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2000 iterations, 20 VMs (a few seconds)")
    parser.add_argument("--iterations", type=int, default=None, help="round trips per mode (default 20000)")
    parser.add_argument("--vms", type=int, default=None, help="VMs to create for the creation timing (default 50)")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/floor.json")
    args = parser.parse_args(argv)
    if args.iterations is None:
        args.iterations = 2000 if args.quick else 20000
    if args.vms is None:
        args.vms = 20 if args.quick else 50
    with FloorVm() as vm:
        spin = vm.spin_ns_per_iteration()
    status(f"floor VM: dec/jnz loop {spin:.2f} ns/iteration ({'native' if spin < 20 else 'EMULATED?'})")
    status(f"floor: {args.iterations} iterations per mode ...")
    floors = measure_floor_all(args.iterations, MODES)
    rows = []
    for mode in MODES:
        p = percentiles(floors[mode])
        rows.append([MODE_LABELS[mode], p["p50_us"], p["p90_us"], p["p99_us"], p["mean_us"], p["min_us"]])
    print_table("Bare-KVM floor (one `out` exit per KVM_RUN), us",
                ["mode", "p50", "p90", "p99", "mean", "min"], rows)
    status(f"creating {args.vms} VMs ...")
    creation = measure_vm_creation(args.vms)
    rows = []
    for key, samples in creation.items():
        p = percentiles(samples)
        rows.append([key.removesuffix("_ns"), p["p50_us"], p["p90_us"], p["p99_us"], p["mean_us"], p["min_us"]])
    print_table("Minimal VM creation and teardown, us", ["phase", "p50", "p90", "p99", "mean", "min"], rows)
    if not args.no_write:
        path = write_results("floor", {
            "quick": bool(args.quick),
            "iterations": args.iterations,
            "spin_ns_per_iteration": spin,
            "floor": {m: {"label": MODE_LABELS[m], "latency": percentiles(floors[m])} for m in MODES},
            "vm_creation": {k.removesuffix("_ns"): percentiles(v) for k, v in creation.items()},
        })
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
