"""The machine side of a switch between snapshots of one family (see :meth:`Machine.switch`).

Memory is switched by :mod:`hlpool.memory.switch`; this module loads the target's vCPU state
and entry (control page and entry registers), its mapped files, and resets the I/O buffers.

CPU state, and how each piece reaches the target's value (a fresh sandbox of the target loads
its whole saved state with ~8 ioctls, ~90 us here; a switch avoids most of them):

- general, segment and control registers: sync regs at the next call (no ioctl), as every call;
- x87/SSE/AVX: the entry stub's xrstor at the next call (KVM_SET_XSAVE only if the control page
  cannot hold every component the target's XCR0 enables);
- CR8 and KERNEL_GS_BASE: more stub instructions in the first call after the switch (a trapped
  ``mov %rax,%cr8``, and swapgs/wrgsbase/swapgs: ~20 us of that call on PVM; KVM_SET_SREGS does
  not reach CR8 on PVM, and KVM_SET_MSRS costs ~45 us here); then the plain control page is put
  back. Only the bytes of the control page that differ from what it holds are written;
- debug registers (DR0-3, DR6, DR7) and XCR0: KVM_SET_DEBUGREGS and KVM_SET_XCRS at every switch
  (one Cython call for both), whatever the guest did (~5 us each; the first vCPU ioctl after a
  call ~12 us). Not in the stub:
  on PVM every ``mov %rax,%drN`` and ``xsetbv`` traps into the hypervisor's instruction emulator
  (~9 us and ~12 us each, measured in a guest), so six DR writes and an xsetbv would cost the
  first call ~65 us to save the switch ~18 us. Never skipped: only reading them back (another
  ioctl) could show that a call left them alone, and the guest's word is worth nothing. (On PVM
  guest code runs under the host's XCR0 and xgetbv shows it, but KVM's copy, which a guest's
  xsetbv changes, is what a snapshot taken next would hold.);
- other MSRs: the host denies guest MSR writes, so they hold the snapshot's values: set only
  where the target's saved values differ from the current snapshot's;
- vCPU events (pending exceptions, NMI, interrupt shadow): not reset. At a call's end the vCPU
  sits at a completed `out` with none pending, so they carry nothing from one tenant to another.

In ``strict_cpu_reset`` mode the next call reloads the whole saved state anyway.

What a switch computes from a snapshot (entry pages, raw ioctl arguments, exports) is kept with
the snapshot (:func:`hlpool.memory.switch.derived`), and what it computes from a pair of
snapshots (that they are of one family, the MSRs that differ, the control page bytes that
differ; the memory's copy plan, see :func:`hlpool.memory.switch.plan_copies`) with the target,
for its last :data:`PAIRS_PER_TARGET` sources. After a call every page and line a switch
touches is cold (the guest ran in between: ~0.5-1 us per Python-level step here), so a switch
between tenants served before does little besides the copy and the two ioctls, in as few
Python steps as it can: a few dict lookups, one Cython call that fstats the target's layer
files (unchanged since they were verified), one that copies the pair's planned pages
(:meth:`GuestMemory.switch_by_plan <hlpool.memory.guest_memory.GuestMemory.switch_by_plan>`:
the plan and the target's restore arrays are made at the pair's first switch and kept with
it), one write of the control page's differing bytes and one call for the two ioctls. A/B with
``bench/switch.py`` (three alternated runs, 13:3x UTC 2026-11-30): switch p50 48.5 / 53.7 /
49.6 us before, 38.7 / 32.7 / 38.4 us after. A pair's first switch (what a pool with
thousands of tenants does on most calls) also computes the pair: family check, MSRs that
differ (none when the two snapshots' MSRs are equal, the common case), the control page's
differing bytes (``_mapping.differing_span``, C) and the copy plan; random switches among 300
JS tenants (/tmp harness, alternated): p50 126 / 131 / 133 -> 75 / 96 / 88 us.
"""

from __future__ import annotations

import time
import weakref
from array import array
from typing import TYPE_CHECKING, Any, NamedTuple

from hlpool import _mapping
from hlpool.kvm import _vcpu_run
from hlpool.errors import SandboxBrokenError, SnapshotIncompatibleError
from hlpool.guest import entry_stub
from hlpool.guest.boot import CR4_FSGSBASE
from hlpool.kept import KeptValues
from hlpool.kvm import abi as kvm_abi
from hlpool.memory.image import SnapshotImage
from hlpool.memory.layers import pin_layers, unpin_layers
from hlpool.memory.mapped_files import check_unchanged
from hlpool.memory.switch import (MemorySwitcher, SwitchStats, cached_family, derived, incompatibility,
                                  restore_inputs, snapshot_runs)

if TYPE_CHECKING:
    from hlpool.machine.machine import Machine

_time_ns = time.time_ns

#: How many source snapshots a target remembers pair data for (bounds memory in a pool that
#: switches among many tenants; a miss only recomputes a few hundred microseconds' worth).
PAIRS_PER_TARGET = 16

_ENTRY_KEYS = (("entry", False), ("entry", True))  # an _Entry's key in derived(), by strict_cpu_reset


class EntryHost(NamedTuple):
    """What a snapshot's entry depends on besides the snapshot: the process's KVM, the family's
    layout and the reset mode (a :class:`Machine` has all three; a worker preparing a switch
    before it has a VM of the family makes one of these)."""

    kvm: Any
    layout: Any
    strict_cpu_reset: bool


_images = KeptValues(512)  # (XSAVE area, XCR0) -> the stub's image and mask


def _host(machine: "Machine | EntryHost") -> EntryHost:
    if isinstance(machine, EntryHost):
        return machine
    return EntryHost(machine.vm.kvm, machine.layout, machine.strict_cpu_reset)


def entry_for(machine: "Machine | EntryHost", snapshot: SnapshotImage, *, kernel_gs_base: int | None = None,
              cr8: int | None = None) -> tuple[bytes, bytes, bool]:
    """The control page and entry registers of calls into ``snapshot`` (a finished one) on
    ``machine``, and whether the stub's XSAVE image covers every component the snapshot's XCR0
    enables. ``cr8``/``kernel_gs_base``: also load these (else CR8 from the snapshot in strict mode)."""
    machine = _host(machine)
    kvm = machine.kvm
    regs = kvm_abi.KvmRegs.from_buffer_copy(snapshot.vcpu.regs)
    xcr0 = entry_stub.xcr0_of(snapshot.vcpu.xcrs)
    if kvm.info.flavour == "pvm":  # PVM runs guest code under the host's XCR0, not the guest's
        xcr0 |= kvm.supported_xcr0
    # equal for most of a family (its XSAVE blobs are kept once, so hashed once)
    image, mask = _images.one_for((snapshot.vcpu.xsave, xcr0), lambda: entry_stub.restore_image(
        snapshot.vcpu.xsave, xcr0, kvm.xsave_components))
    if cr8 is None and machine.strict_cpu_reset:
        cr8 = kvm_abi.KvmSregs.from_buffer_copy(snapshot.vcpu.sregs).cr8
    page = entry_stub.control_page(regs.rip, regs.rax, regs.rdx, image, cr8=cr8, kernel_gs_base=kernel_gs_base)
    regs.rip = machine.layout.control.start
    regs.rax, regs.rdx = mask & 0xFFFFFFFF, mask >> 32
    needed = xcr0 & (3 | sum(1 << n for n in kvm.xsave_components))
    return page, bytes(regs), (mask & needed) == needed


class _Entry:
    """What switching to (or from) one snapshot needs, computed once per snapshot and mode."""

    __slots__ = ("plain", "entry_regs", "covered", "first", "after_first", "stub_kgs", "kgs", "exports",
                 "debugregs", "xcrs", "pairs", "layer_checks")

    def __init__(self, machine: "Machine | EntryHost", target: SnapshotImage) -> None:
        machine = _host(machine)
        vcpu = target.vcpu
        strict = machine.strict_cpu_reset
        self.kgs = vcpu.msrs.get(kvm_abi.MSR_KERNEL_GS_BASE)
        fsgsbase = bool(kvm_abi.KvmSregs.from_buffer_copy(vcpu.sregs).cr4 & CR4_FSGSBASE)
        self.stub_kgs = self.kgs if self.kgs is not None and fsgsbase and not strict else None
        self.plain, self.entry_regs, self.covered = entry_for(machine, target)
        # CR8 as a fresh vCPU shows it: on PVM KVM_SET_SREGS does not reach it (the reset value, 0)
        sregs_cr8 = kvm_abi.KvmSregs.from_buffer_copy(vcpu.sregs).cr8
        fresh_cr8 = 0 if machine.kvm.info.flavour == "pvm" else sregs_cr8
        self.first = _kept.one(entry_for(machine, target, kernel_gs_base=self.stub_kgs, cr8=fresh_cr8)[0])
        self.plain, self.entry_regs = _kept.one(self.plain), _kept.one(self.entry_regs)
        self.after_first = self.plain if self.plain != self.first else None  # put back after the first call
        self.exports = _kept_exports(target.exports or ())
        # the exact struct sizes KVM reads (a blob from a file may be longer)
        self.debugregs = (_kept.one(bytes(kvm_abi.KvmDebugregs.from_buffer_copy(vcpu.debugregs)))
                          if vcpu.debugregs else None)
        self.xcrs = _kept.one(bytes(kvm_abi.KvmXcrs.from_buffer_copy(vcpu.xcrs))) if vcpu.xcrs else None
        self.pairs: dict[int, _Pair] = {}  # id(a source snapshot) -> what switching from it needs
        self.layer_checks = _layer_checks(target.layers)


def _layer_checks(layers: "tuple[Any, ...]") -> array | None:
    """(descriptor, inode, size, mtime_ns) of each of ``layers``' files, as ``_mapping.files_unchanged``
    reads them (a layer's descriptor is fixed for its life); None if one does not fit an int64."""
    quads = array("q")
    try:
        for layer in layers:
            if layer.path is not None:
                quads.extend((layer.fd, *layer.fingerprint))
    except OverflowError:
        return None
    return quads


# Tenants of one family mostly have equal entry pages and blobs (two 4 KiB control pages per
# tenant otherwise): equal values are kept once. All are immutable (the exports dict is only read).
_kept = KeptValues(512)


def _kept_exports(names: "tuple[str, ...] | list[str]") -> dict[str, int]:
    key = ("exports", tuple(names))
    return _kept.one_for(key, lambda: {n: i for i, n in enumerate(key[1])})


def prepare(machine: "Machine", target: SnapshotImage) -> bool:
    """Compute what a switch of ``machine`` to ``target`` needs of ``target`` alone, ahead of the
    switch; False (nothing done) if ``target`` is not of its family."""
    if target.exports is None or cached_family(machine.base_snapshot) != cached_family(target):
        return False
    prepare_target(target, _host(machine))
    return True


def prepare_target(target: SnapshotImage, host: EntryHost) -> None:
    """What a switch to ``target`` needs of ``target`` alone (its entry pages, run arrays and
    restore arrays), kept with the snapshot object: the first switch to it then computes only
    what depends on the snapshot switched from."""
    if target.exports is None:
        return
    _entry(host, target, derived(target))
    snapshot_runs(target)
    restore_inputs(target)


def _entry(machine: "Machine | EntryHost", image: SnapshotImage, values: dict[Any, Any]) -> _Entry:
    """``image``'s :class:`_Entry` for ``machine``'s mode, cached in ``values`` (its derived dict):
    the same for every sandbox of its family in this process (one KVM, one CPU, one layout)."""
    key = _ENTRY_KEYS[machine.strict_cpu_reset]
    entry = values.get(key)
    if entry is None:
        entry = values[key] = _Entry(machine, image)
    return entry


class _Pair:
    """What a switch from one snapshot to another needs beyond the target's :class:`_Entry`
    (kept in the target's entry, for its last :data:`PAIRS_PER_TARGET` sources)."""

    __slots__ = ("source", "msrs", "control", "memory")

    def __init__(self, machine: "Machine", current: SnapshotImage, cur: _Entry, target: SnapshotImage,
                 tgt: _Entry) -> None:
        target_msrs = target.vcpu.msrs
        self.msrs: dict[int, int] = {}
        if not machine.strict_cpu_reset:
            if target_msrs != current.vcpu.msrs:  # (equal for most pairs of a family: no loop)
                self.msrs = {k: v for k, v in target_msrs.items()
                             if (k != kvm_abi.MSR_KERNEL_GS_BASE or tgt.stub_kgs is None)
                             and current.vcpu.msrs.get(k) != v}
            if tgt.kgs is not None and tgt.stub_kgs is None:  # swapgs can change it: always put back
                self.msrs[kvm_abi.MSR_KERNEL_GS_BASE] = tgt.kgs
        # The control page holds cur.first until the first call after a switch to ``current``
        # ran, cur.plain otherwise (the host is its only writer: at creation, at a switch, after
        # that first call): the bytes of tgt.first that differ from each, as (offset, bytes).
        self.control = tuple((lo, memoryview(tgt.first)[lo:hi]) for lo, hi in (
            _mapping.differing_span(cur.plain, tgt.first), _mapping.differing_span(cur.first, tgt.first)))
        self.source: Any = None  # a weak reference to ``current`` once cached
        # (copy_max, copy plan, the target's restore inputs), made at the pair's first switch; plan and
        # inputs None when the pair's memory switch is not one copy plan (hlpool.memory.switch)
        self.memory: tuple[int, bytes | None, Any] | None = None


def _pair(machine: "Machine", current: SnapshotImage, target: SnapshotImage, tv: dict[Any, Any]) -> _Pair:
    """The checks and the cached data of a switch ``current`` -> ``target`` (``tv``: the target's
    derived dict); raises if the two are not of one family. A pair is cached only once checked."""
    if cached_family(current) != cached_family(target) or target.exports is None:
        problem = incompatibility(current, target) or "the target is a boot image"
        raise SnapshotIncompatibleError(f"{machine.name}: cannot switch to {target!r}: {problem}")
    tgt = _entry(machine, target, tv)
    pair = _Pair(machine, current, _entry(machine, current, derived(current)), target, tgt)
    try:
        pair.source = weakref.ref(current)
    except TypeError:  # an image type without weak references: not cached
        return pair
    if len(tgt.pairs) >= PAIRS_PER_TARGET:
        tgt.pairs.clear()
    tgt.pairs[id(current)] = pair
    return pair


def switch_machine(machine: "Machine", target: SnapshotImage) -> SwitchStats:
    """:meth:`Machine.switch` (the caller holds the machine's lock and checked it is usable).

    A switch between tenants switched between before is the hot path (a pool's worker moving a
    warm VM between tenants): the pair's cached data says what to copy and write, and the layer
    files are checked with one ``fstat`` each in one Cython call."""
    start = _time_ns()
    current = machine.base_snapshot
    strict = machine.strict_cpu_reset
    tv = derived(target)
    tgt = tv.get(_ENTRY_KEYS[strict])
    pair = tgt.pairs.get(id(current)) if tgt is not None else None
    if pair is None or pair.source() is not current:  # not switched from ``current`` before
        pair = _pair(machine, current, target, tv)
        tgt = tv[_ENTRY_KEYS[strict]]
    if machine._private_memory:
        raise SnapshotIncompatibleError(f"{machine.name}: a sandbox with private_memory=True cannot switch "
                                        "(its memory is copied, not mapped from the snapshot's files)")
    pinned = pin_layers(target.layers)  # a closed layer is refused here, before anything changes
    try:
        checks = tgt.layer_checks
        if checks is None or target.mapped_files or _mapping.files_unchanged(checks) >= 0:
            check_unchanged(target.layers, target.mapped_files)  # says which file changed, and how
    except BaseException:
        unpin_layers(pinned)
        raise
    switcher = machine._switcher or MemorySwitcher(current)
    # the bytes of the control page to write: it holds current's first-call page until that call ran
    offset, data = pair.control[machine._control_after_switch is not None]
    memory = machine.memory
    planned = pair.memory
    try:
        # _reload_registers: no guest code ran since the last restore or switch
        if planned is None or planned[0] != switcher.copy_max:  # the pair's first switch (or another copy_max)
            planned = pair.memory = switcher.copy_only(current, target) or (switcher.copy_max, None, None)
        if planned[1] is not None:
            dirty, copied = memory.switch_by_plan(planned[1], planned[2], machine._reload_registers, pinned)
            remapped = calls = system = 0
        else:
            dirty, copied, remapped, calls, system = memory.switch(
                current, target, switcher, restored=machine._reload_registers, pinned=pinned)
        machine._switcher = switcher
        files = machine._mapped_files
        if system or target.mapped_files or files.watched:  # else no file before or after, the table intact
            files.switch(target.mapped_files, table_intact=not system)
        if data:
            _mapping.write_bytes(machine._control_addr + offset, data)
        if not strict:  # strict mode reloads the whole vCPU state at the next call
            _vcpu_run.set_debugregs_xcrs(machine.vcpu.fd, tgt.debugregs or b"", tgt.xcrs or b"")
            if not tgt.covered and target.vcpu.xsave:
                machine.vcpu.set_xsave(kvm_abi.KvmXsave.from_buffer_copy(target.vcpu.xsave))
            if pair.msrs:
                machine.vcpu.set_msrs(pair.msrs)
    except Exception as exc:
        machine.mark_broken(f"switch to {target!r} failed half-way: {exc}")
        raise SandboxBrokenError(f"{machine.name}: switch failed half-way ({exc}); discard the sandbox") from exc
    machine.base_snapshot = target
    machine._exports = tgt.exports  # shared: never changed (a machine replaces its dict, as here)
    machine._entry_regs = tgt.entry_regs
    machine._control_after_switch = tgt.after_first
    if strict:
        vmsrs = target.vcpu.msrs
        machine._strict_msrs = {k: vmsrs.get(k, v) for k, v in machine._strict_msrs.items()}
    if machine._in_used or machine._reply_used:  # after a call with restore=False
        machine._clear_io()
    machine._reload_registers = True
    return SwitchStats(copied, remapped, calls, dirty, (_time_ns() - start) / 1000)
