"""A KVM virtual machine: memory slots and dirty logs."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from hlpool.errors import KvmError
from hlpool.kvm import abi
from hlpool.kvm.system import Kvm, system

# (base, count): the MSR ranges a call's guest may read (architectural, KVM/Hyper-V synthetic,
# KVM paravirtual, AMD64 and AMD-specific); it may write none.
READABLE_MSR_RANGES = ((0x0, 0x2000), (0x40000000, 0x200), (0x4B564D00, 0x100), (0xC0000000, 0x2000),
                       (0xC0010000, 0x2000))


@dataclass(frozen=True)
class MemorySlot:
    """One KVM memory slot: guest-physical range backed by host memory."""

    slot: int
    guest_address: int
    size: int
    host_address: int
    readonly: bool = False
    log_dirty: bool = False

    @property
    def pages(self) -> int:
        return self.size // 4096


class Vm:
    """A KVM VM. Create vCPUs with :class:`hlpool.kvm.vcpu.Vcpu`."""

    def __init__(self, kvm: Kvm | None = None) -> None:
        self.kvm = kvm or system()
        self.kvm.info  # fail early on a KVM without the capabilities we need
        self.fd = self.kvm.create_vm_fd()
        self.slots: dict[int, MemorySlot] = {}
        self.dirty_ring_entries = 0
        self.manual_dirty_protect = False  # see enable_manual_dirty_protect
        try:
            if self.kvm.info.flavour == "hardware":
                # VMX needs a 3-page TSS region outside guest memory for real-mode
                # emulation; hlpool never uses real mode, but KVM insists on one.
                abi.ioctl(self.fd, abi.KVM_SET_TSS_ADDR, 0xFFFBD000)
        except OSError:
            pass

    def set_memory_slot(self, slot: MemorySlot) -> None:
        """Add (or replace) a memory slot. Its host range must stay mapped while in use."""
        region = abi.KvmUserspaceMemoryRegion(
            slot=slot.slot,
            flags=(abi.KVM_MEM_READONLY if slot.readonly else 0)
            | (abi.KVM_MEM_LOG_DIRTY_PAGES if slot.log_dirty else 0),
            guest_phys_addr=slot.guest_address,
            memory_size=slot.size,
            userspace_addr=slot.host_address,
        )
        try:
            abi.ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region)
        except OSError as exc:
            raise KvmError(f"KVM_SET_USER_MEMORY_REGION (slot {slot.slot} at {slot.guest_address:#x}, "
                           f"{slot.size} bytes): {exc.strerror}") from None
        self.slots[slot.slot] = slot

    def enable_dirty_ring(self, entries: int) -> int:
        """Enable KVM's per-vCPU dirty ring of ``entries`` entries (before vCPUs are created).

        Returns ``entries``, or 0 if this KVM has no dirty ring (or refuses the size).
        """
        supported = self.kvm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING)
        size = entries * 16  # sizeof(struct kvm_dirty_gfn)
        if not supported or size > supported:
            return 0
        cap = abi.KvmEnableCap(cap=abi.KVM_CAP_DIRTY_LOG_RING)
        cap.args[0] = size
        try:
            abi.ioctl(self.fd, abi.KVM_ENABLE_CAP, cap)
        except OSError:
            return 0
        self.dirty_ring_entries = entries
        return entries

    def enable_manual_dirty_protect(self) -> bool:
        """Turn on KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (before any logged slot is added).

        From then on KVM_GET_DIRTY_LOG only reads the dirty bitmap; a page is
        write-protected again (and its bit cleared) only by KVM_CLEAR_DIRTY_LOG
        (``hlpool.memory._dirty.DirtySet.restore``). Returns False if this KVM lacks it.
        """
        if self.manual_dirty_protect:
            return True
        if self.dirty_ring_entries or not self.kvm.check_extension(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
            return False
        cap = abi.KvmEnableCap(cap=abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        cap.args[0] = abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE  # not INITIALLY_SET: a new slot starts clean
        try:
            abi.ioctl(self.fd, abi.KVM_ENABLE_CAP, cap)
        except OSError:
            return False
        self.manual_dirty_protect = True
        return True

    def deny_guest_msr_writes(self) -> None:
        """Make every guest ``wrmsr`` fault (#GP) and allow ``rdmsr`` only in the architectural ranges.

        A guest that could write MSRs could pass data from one call to the next
        (SYSENTER_*, PAT, STAR...), change how its successor runs, or make KVM
        write into guest memory (the kvmclock MSRs). Guests set their MSRs while
        ``hl_main`` runs (that machine has no filter); calls never need to. The
        host's own KVM_SET_MSRS is not filtered. Raises :class:`KvmError` if this
        KVM has no MSR filtering (the sandbox then relies on ``strict_cpu_reset``).
        """
        if not self.kvm.check_extension(abi.KVM_CAP_X86_MSR_FILTER):
            raise KvmError("this KVM cannot filter guest MSR accesses (KVM_CAP_X86_MSR_FILTER)")
        msr_filter = abi.KvmMsrFilter(flags=abi.KVM_MSR_FILTER_DEFAULT_DENY)
        bitmaps = []  # KVM copies them during the ioctl
        for i, (base, count) in enumerate(READABLE_MSR_RANGES):
            bitmap = ctypes.create_string_buffer(b"\xff" * (count // 8), count // 8)
            bitmaps.append(bitmap)
            msr_filter.ranges[i] = abi.KvmMsrFilterRange(flags=abi.KVM_MSR_FILTER_READ, nmsrs=count, base=base,
                                                         bitmap=ctypes.addressof(bitmap))
        try:
            abi.ioctl(self.fd, abi.KVM_X86_SET_MSR_FILTER, msr_filter)
        except OSError as exc:
            raise KvmError(f"KVM_X86_SET_MSR_FILTER: {exc.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
