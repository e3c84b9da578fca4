"""A KVM vCPU: registers, FPU/XSAVE state, MSRs, the run structure, running."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from hlpool import _mapping
from hlpool.kept import KeptValues
from hlpool.errors import KvmError
from hlpool.kvm import _vcpu_run, abi, pvm
from hlpool.kvm.vm import Vm

# vCPU state a capture takes from the run structure (stored by the KVM_RUN that completes the
# last `out`: Vcpu.run_immediate_exit) instead of three ioctls: see Vcpu.save_state
SAVED_SYNC_PARTS = abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS | abi.KVM_SYNC_X86_EVENTS

# MSRs that make up a guest's CPU state beyond regs/sregs; the runtime writes
# the syscall ones during boot. Saved in snapshots and restored after faults.
STATE_MSRS = (
    abi.MSR_STAR,
    abi.MSR_LSTAR,
    abi.MSR_CSTAR,
    abi.MSR_SFMASK,
    abi.MSR_KERNEL_GS_BASE,
    abi.MSR_TSC_AUX,
)


# MSRs a strict reset never writes back: the time stamp counter and its deadline (writing them
# would move the guest's clock), and PVM's own registration MSRs (written once by the host).
NOT_RESET_MSRS = frozenset({abi.MSR_IA32_TSC, abi.MSR_IA32_TSC_DEADLINE, abi.MSR_PVM_VIF,
                            abi.MSR_PVM_SIGNATURE})
_resettable: tuple[int, ...] | None = None


@dataclass(frozen=True)
class VcpuState:
    """The architectural state of a vCPU, as raw KVM struct bytes."""

    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    msrs: dict[int, int]
    debugregs: bytes
    events: bytes


# The vCPU states of a family's snapshot files are nearly all equal (70 JS tenants: 4 distinct
# register sets, 2 XSAVE areas, one of everything else), and a worker keeps thousands of snapshots
# open: equal blobs are kept once (~5 KiB less per open snapshot). A VcpuState's MSR dict may be
# shared that way: it is never changed.
_blobs = KeptValues(256)
_msr_tables = KeptValues(256)


def shared_state(regs: bytes, sregs: bytes, xsave: bytes, xcrs: bytes, msrs: "Sequence[tuple[int, int]]",
                 debugregs: bytes, events: bytes) -> VcpuState:
    """A VcpuState whose blobs (and MSR dict) are the objects already kept for equal values."""
    key = tuple(msrs)
    one = _blobs.one
    return VcpuState(regs=one(regs), sregs=one(sregs), xsave=one(xsave), xcrs=one(xcrs),
                     msrs=_msr_tables.one_for(key, lambda: dict(key)), debugregs=one(debugregs), events=one(events))


class Vcpu:
    """vCPU 0 of a VM (hlpool VMs have exactly one)."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        try:
            self.fd = abi.ioctl(vm.fd, abi.KVM_CREATE_VCPU, 0)
        except OSError as exc:
            raise KvmError(f"KVM_CREATE_VCPU failed: {exc.strerror}") from None
        # Mapped with a raw mmap, not Python's mmap object: a ctypes view kept alive by a
        # traceback must not stop close() from unmapping it (nothing touches it after close).
        self.run_size = vm.kvm.vcpu_mmap_size
        self.run_address = _mapping.map_shared(self.fd, self.run_size)
        self.run_struct = abi.KvmRun.from_address(self.run_address)
        self.dirty_ring = 0
        self._dirty_ring_size = 0
        if vm.dirty_ring_entries:
            self._dirty_ring_size = vm.dirty_ring_entries * 16
            self.dirty_ring = _mapping.map_shared(self.fd, self._dirty_ring_size,
                                                  abi.KVM_DIRTY_LOG_PAGE_OFFSET * 4096)
        abi.ioctl(self.fd, abi.KVM_SET_CPUID2, vm.kvm.supported_cpuid)

    # ---- registers ----------------------------------------------------------------

    def get_regs(self) -> abi.KvmRegs:
        regs = abi.KvmRegs()
        abi.ioctl(self.fd, abi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: abi.KvmRegs) -> None:
        abi.ioctl(self.fd, abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.KvmSregs:
        sregs = abi.KvmSregs()
        abi.ioctl(self.fd, abi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: abi.KvmSregs) -> None:
        abi.ioctl(self.fd, abi.KVM_SET_SREGS, sregs)

    def get_msrs(self, indices: tuple[int, ...]) -> dict[int, int]:
        msrs = abi.msrs_struct(len(indices))
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        got = abi.ioctl(self.fd, abi.KVM_GET_MSRS, msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(got)}

    def set_msrs(self, values: dict[int, int]) -> None:
        msrs = abi.msrs_struct(len(values))
        for i, (index, data) in enumerate(values.items()):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        done = abi.ioctl(self.fd, abi.KVM_SET_MSRS, msrs)
        if done != len(values):
            failed = list(values)[done]
            raise KvmError(f"KVM_SET_MSRS stopped at MSR {failed:#x}")

    def resettable_msrs(self) -> tuple[int, ...]:
        """The MSRs of KVM's index list that this vCPU can read and the host can write back.

        Probed one by one once per process (KVM_GET/SET_MSRS stop at the first MSR
        they cannot handle); :data:`NOT_RESET_MSRS` are left out.
        """
        global _resettable
        if _resettable is None:
            usable = []
            for index in self.vm.kvm.msr_index_list:
                if index in NOT_RESET_MSRS:
                    continue
                value = self.get_msrs((index,))
                if index not in value:
                    continue
                try:
                    self.set_msrs(value)
                except (KvmError, OSError):
                    continue
                usable.append(index)
            _resettable = tuple(usable)
        return _resettable

    def enable_native_execution(self, vif_gpa: int) -> None:
        """Run natively on PVM (register the VIF page at ``vif_gpa``); nothing elsewhere."""
        msrs = pvm.native_execution_msrs(self.vm.kvm.info.flavour, vif_gpa)
        if msrs:
            self.set_msrs(msrs)

    def get_xcrs(self) -> abi.KvmXcrs:
        xcrs = abi.KvmXcrs()
        abi.ioctl(self.fd, abi.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: abi.KvmXcrs) -> None:
        abi.ioctl(self.fd, abi.KVM_SET_XCRS, xcrs)

    def get_xsave(self) -> abi.KvmXsave:
        xsave = abi.KvmXsave()
        abi.ioctl(self.fd, abi.KVM_GET_XSAVE, xsave)
        return xsave

    def set_xsave(self, xsave: abi.KvmXsave) -> None:
        abi.ioctl(self.fd, abi.KVM_SET_XSAVE, xsave)

    @property
    def tsc_khz(self) -> int:
        try:
            return abi.ioctl(self.fd, abi.KVM_GET_TSC_KHZ)
        except OSError:
            return 0

    # ---- whole state ---------------------------------------------------------------

    def save_state(self, synced: int = 0) -> VcpuState:
        """Everything needed to put this vCPU (or a new one) back in the same state.

        ``synced``: the KVM_SYNC_X86_* parts that the last KVM_RUN stored into the run structure
        (see :meth:`run_immediate_exit`); those are copied from there instead of read by an ioctl
        (on PVM ~8 us each): the same kernel functions fill both, so the bytes are the same."""
        sync = self.run_struct.s
        debugregs = abi.KvmDebugregs()
        abi.ioctl(self.fd, abi.KVM_GET_DEBUGREGS, debugregs)
        if synced & abi.KVM_SYNC_X86_EVENTS:
            events = bytes(sync.events)
        else:
            got = abi.KvmVcpuEvents()
            abi.ioctl(self.fd, abi.KVM_GET_VCPU_EVENTS, got)
            events = bytes(got)
        return VcpuState(
            regs=bytes(sync.regs) if synced & abi.KVM_SYNC_X86_REGS else bytes(self.get_regs()),
            sregs=bytes(sync.sregs) if synced & abi.KVM_SYNC_X86_SREGS else bytes(self.get_sregs()),
            xsave=bytes(self.get_xsave()),
            xcrs=bytes(self.get_xcrs()),
            msrs=self.get_msrs(STATE_MSRS),
            debugregs=bytes(debugregs),
            events=events,
        )

    def run_immediate_exit(self, store_sync: int = 0) -> int:
        """KVM_RUN with immediate_exit: completes a pending `out` (or MMIO) without running the guest;
        ``store_sync``: KVM_SYNC_X86_* parts KVM then stores into the run structure as it returns (for
        this run only: every call's run would pay for storing them)."""
        run = self.run_struct
        run.immediate_exit = 1
        run.kvm_valid_regs = store_sync
        try:
            return self.run()
        finally:
            run.immediate_exit = 0
            run.kvm_valid_regs = 0

    def load_state(self, state: VcpuState) -> None:
        """Load a saved state completely (used when a sandbox is created or after a fault).

        Fields that are empty (a boot state has only regs and sregs) keep the vCPU's reset values.
        """
        if state.xcrs:
            self.set_xcrs(abi.KvmXcrs.from_buffer_copy(state.xcrs))
        self.set_sregs(abi.KvmSregs.from_buffer_copy(state.sregs))
        self.set_regs(abi.KvmRegs.from_buffer_copy(state.regs))
        if state.xsave:
            self.set_xsave(abi.KvmXsave.from_buffer_copy(state.xsave))
        if state.msrs:
            self.set_msrs(state.msrs)
        if state.debugregs:
            abi.ioctl(self.fd, abi.KVM_SET_DEBUGREGS, abi.KvmDebugregs.from_buffer_copy(state.debugregs))
        if state.events:
            abi.ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, abi.KvmVcpuEvents.from_buffer_copy(state.events))

    # ---- running --------------------------------------------------------------------

    def load_sync_regs(self, regs: bytes, sregs: bytes) -> None:
        """Have the next :meth:`run` load these registers (KVM_CAP_SYNC_REGS, no extra ioctl)."""
        _vcpu_run.load_sync_regs(self.run_address, regs, sregs)

    def run(self) -> int:
        """KVM_RUN until the next exit; returns the exit reason or ``RUN_INTERRUPTED``."""
        return _vcpu_run.run(self.fd, self.run_address)

    def run_io(self) -> tuple[int, int, int]:
        """KVM_RUN until the next exit; returns (reason, port, value) (see ``_vcpu_run.run_io``)."""
        return _vcpu_run.run_io(self.fd, self.run_address, self.run_size)

    def close(self) -> None:
        if self.fd >= 0:
            _mapping.unmap(self.run_address, self.run_size)
            self.run_address = 0
            if self.dirty_ring:
                _mapping.unmap(self.dirty_ring, self._dirty_ring_size)
                self.dirty_ring = 0
            os.close(self.fd)
            self.fd = -1
