"""The machine side of a switch between snapshots of one family (see :meth:`Machine.switch`).

Memory is switched by :mod:`hlpool.memory.switch`; this module loads the target's vCPU state
and entry (control page and entry registers), its mapped files, and resets the I/O buffers.

CPU state, and how each piece reaches the target's value (a fresh sandbox of the target loads
its whole saved state with ~8 ioctls, ~90 us here; a switch avoids most of them):

- general, segment and control registers: sync regs at the next call (no ioctl), as every call;
- x87/SSE/AVX: the entry stub's xrstor at the next call (KVM_SET_XSAVE only if the control page
  cannot hold every component the target's XCR0 enables);
- CR8 and KERNEL_GS_BASE: two more stub instructions in the first call after the switch
  (KVM_SET_SREGS does not reach CR8 on PVM; swapgs lets a guest change KERNEL_GS_BASE without an
  MSR write, and KVM_SET_MSRS costs ~45 us here); then the plain control page is put back;
- debug registers and XCR0: KVM_SET_DEBUGREGS and KVM_SET_XCRS (~5 us each);
- other MSRs: the host denies guest MSR writes, so they hold the snapshot's values: set only
  where the target's saved values differ from the current snapshot's;
- vCPU events (pending exceptions, NMI, interrupt shadow): not reset. At a call's end the vCPU
  sits at a completed `out` with none pending, so they carry nothing from one tenant to another.

In ``strict_cpu_reset`` mode the next call reloads the whole saved state anyway.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from hlpool.errors import SandboxBrokenError, SnapshotIncompatibleError
from hlpool.guest import entry_stub
from hlpool.guest.boot import CR4_FSGSBASE
from hlpool.kvm import abi as kvm_abi
from hlpool.memory.image import SnapshotImage
from hlpool.memory.mapped_files import check_unchanged
from hlpool.memory.switch import MemorySwitcher, SwitchStats, cached_family, derived, incompatibility

if TYPE_CHECKING:
    from hlpool.machine.machine import Machine

_time_ns = time.time_ns


def entry_for(machine: "Machine", snapshot: SnapshotImage, *, kernel_gs_base: int | None = None,
              cr8: int | None = None) -> tuple[bytes, bytes, bool]:
    """The control page and entry registers of calls into ``snapshot`` (a finished one) on
    ``machine``, and whether the stub's XSAVE image covers every component the snapshot's XCR0
    enables. ``cr8``/``kernel_gs_base``: also load these (else CR8 from the snapshot in strict mode)."""
    kvm = machine.vm.kvm
    regs = kvm_abi.KvmRegs.from_buffer_copy(snapshot.vcpu.regs)
    xcr0 = entry_stub.xcr0_of(snapshot.vcpu.xcrs)
    if kvm.info.flavour == "pvm":  # PVM runs guest code under the host's XCR0, not the guest's
        xcr0 |= kvm.supported_xcr0
    image, mask = entry_stub.restore_image(snapshot.vcpu.xsave, xcr0, kvm.xsave_components)
    if cr8 is None and machine.strict_cpu_reset:
        cr8 = kvm_abi.KvmSregs.from_buffer_copy(snapshot.vcpu.sregs).cr8
    page = entry_stub.control_page(regs.rip, regs.rax, regs.rdx, image, cr8=cr8, kernel_gs_base=kernel_gs_base)
    regs.rip = machine.layout.control.start
    regs.rax, regs.rdx = mask & 0xFFFFFFFF, mask >> 32
    needed = xcr0 & (3 | sum(1 << n for n in kvm.xsave_components))
    return page, bytes(regs), (mask & needed) == needed


def switch_machine(machine: "Machine", target: SnapshotImage) -> SwitchStats:
    """:meth:`Machine.switch` (the caller holds the machine's lock and checked it is usable)."""
    start = _time_ns()
    current = machine.base_snapshot
    problem = (None if cached_family(current) == cached_family(target) and target.exports is not None
               else incompatibility(current, target) or "the target is a boot image")
    if problem is not None:
        raise SnapshotIncompatibleError(f"{machine.name}: cannot switch to {target!r}: {problem}")
    if machine._private_memory:
        raise SnapshotIncompatibleError(f"{machine.name}: a sandbox with private_memory=True cannot switch "
                                        "(its memory is copied, not mapped from the snapshot's files)")
    check_unchanged(target.layers, target.mapped_files)
    switcher = machine._switcher or MemorySwitcher(current)
    vcpu = target.vcpu
    kgs = vcpu.msrs.get(kvm_abi.MSR_KERNEL_GS_BASE)
    cache = derived(target)
    entry = cache.get(("entry", machine.strict_cpu_reset))
    if entry is None:  # the same for every sandbox of this process (one KVM, one CPU)
        fsgsbase = bool(kvm_abi.KvmSregs.from_buffer_copy(vcpu.sregs).cr4 & CR4_FSGSBASE)
        stub_kgs = kgs if kgs is not None and fsgsbase and not machine.strict_cpu_reset else None
        plain, entry_regs, covered = entry_for(machine, target)
        # CR8 as a fresh vCPU shows it: on PVM KVM_SET_SREGS does not reach it (the reset value, 0)
        sregs_cr8 = kvm_abi.KvmSregs.from_buffer_copy(vcpu.sregs).cr8
        fresh_cr8 = 0 if machine.vm.kvm.info.flavour == "pvm" else sregs_cr8
        first = entry_for(machine, target, kernel_gs_base=stub_kgs, cr8=fresh_cr8)[0]
        exports = {n: i for i, n in enumerate(target.exports or ())}
        debugregs = kvm_abi.KvmDebugregs.from_buffer_copy(vcpu.debugregs) if vcpu.debugregs else None
        xcrs = kvm_abi.KvmXcrs.from_buffer_copy(vcpu.xcrs) if vcpu.xcrs else None
        entry = cache[("entry", machine.strict_cpu_reset)] = (plain, entry_regs, covered, first, stub_kgs, exports,
                                                              debugregs, xcrs)
    plain, entry_regs, covered, first, stub_kgs, exports, debugregs, xcrs = entry
    msrs = {} if machine.strict_cpu_reset else {
        k: v for k, v in vcpu.msrs.items()
        if (k != kvm_abi.MSR_KERNEL_GS_BASE or stub_kgs is None) and current.vcpu.msrs.get(k) != v}
    if kgs is not None and stub_kgs is None and not machine.strict_cpu_reset:
        msrs[kvm_abi.MSR_KERNEL_GS_BASE] = kgs
    try:
        # _reload_registers: no guest code ran since the last restore or switch
        dirty, copied, remapped, calls, system = machine.memory.switch(
            current, target, switcher, restored=machine._reload_registers)
        machine._switcher = switcher
        machine._mapped_files.switch(target.mapped_files, table_intact=not system)
        machine.memory.write(machine.layout.control.start, first)
        if not machine.strict_cpu_reset:  # strict mode reloads the whole vCPU state at the next call
            if debugregs is not None:  # the KVM_SET_* ioctls only read these structs: shared
                kvm_abi.ioctl(machine.vcpu.fd, kvm_abi.KVM_SET_DEBUGREGS, debugregs)
            if xcrs is not None:
                machine.vcpu.set_xcrs(xcrs)
            if not covered and vcpu.xsave:
                machine.vcpu.set_xsave(kvm_abi.KvmXsave.from_buffer_copy(vcpu.xsave))
            if msrs:
                machine.vcpu.set_msrs(msrs)
    except Exception as exc:
        machine.mark_broken(f"switch to {target!r} failed half-way: {exc}")
        raise SandboxBrokenError(f"{machine.name}: switch failed half-way ({exc}); discard the sandbox") from exc
    machine.base_snapshot = target
    machine._exports = dict(exports)
    machine._entry_regs = entry_regs
    machine._control_after_switch = plain if plain != first else None
    if machine.strict_cpu_reset:
        machine._strict_msrs = {k: vcpu.msrs.get(k, v) for k, v in machine._strict_msrs.items()}
    machine._clear_io()
    machine._reload_registers = True
    stats = SwitchStats(copied, remapped, calls, dirty, (_time_ns() - start) / 1000)
    return stats
