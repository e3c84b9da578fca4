"""Raw KVM ABI for x86-64, Python side: ioctl numbers, capability numbers and ctypes structs.

Everything here mirrors ``<linux/kvm.h>`` and ``<asm/kvm.h>`` field for field;
no other Python module defines a KVM struct or ioctl number. The layouts are
part of the stable kernel ABI.

The Cython modules (``hlpool/_mapping.pyx``, ``hlpool/kvm/_vcpu_run.pyx`` and its
``run_support.h``) take the same ABI straight from the kernel's ``<linux/kvm.h>``
through ``hlpool/kvm/kvm.pxd``, so the dirty-log ioctls and structs they alone
use are not repeated here. ``tests/test_contracts.py`` checks every number, size
and offset below against that header.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from ctypes import c_char, c_uint8, c_uint16, c_uint32, c_uint64

# ---- ioctl number encoding (asm-generic/ioctl.h) ---------------------------------

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct: type) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iow(nr: int, struct: type) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


# ---- structs ---------------------------------------------------------------------


class KvmRegs(ctypes.Structure):
    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = [
        ("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment), ("fs", KvmSegment),
        ("gs", KvmSegment), ("ss", KvmSegment), ("tr", KvmSegment), ("ldt", KvmSegment),
        ("gdt", KvmDtable), ("idt", KvmDtable),
        ("cr0", c_uint64), ("cr2", c_uint64), ("cr3", c_uint64), ("cr4", c_uint64),
        ("cr8", c_uint64), ("efer", c_uint64), ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * 4),
    ]


class KvmFpu(ctypes.Structure):
    _fields_ = [
        ("fpr", c_uint8 * 128),
        ("fcw", c_uint16), ("fsw", c_uint16), ("ftwx", c_uint8), ("pad1", c_uint8),
        ("last_opcode", c_uint16), ("last_ip", c_uint64), ("last_dp", c_uint64),
        ("xmm", c_uint8 * 256), ("mxcsr", c_uint32), ("pad2", c_uint32),
    ]


class KvmXsave(ctypes.Structure):
    _fields_ = [("region", c_uint32 * 1024)]


class KvmXcr(ctypes.Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class KvmXcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", c_uint32), ("flags", c_uint32), ("xcrs", KvmXcr * 16), ("padding", c_uint64 * 16)]


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class KvmMsrsHeader(ctypes.Structure):
    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


_msrs_types: dict[int, type] = {}  # count -> its struct type (making a ctypes class costs ~50-100 us)


def msrs_struct(count: int) -> ctypes.Structure:
    """A ``struct kvm_msrs`` with room for ``count`` entries."""
    kind = _msrs_types.get(count)
    if kind is None:

        class KvmMsrs(ctypes.Structure):
            _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", KvmMsrEntry * count)]

        kind = KvmMsrs
        if len(_msrs_types) < 64:
            _msrs_types[count] = kind
    msrs = kind()
    msrs.nmsrs = count
    return msrs


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", c_uint32), ("index", c_uint32), ("flags", c_uint32),
        ("eax", c_uint32), ("ebx", c_uint32), ("ecx", c_uint32), ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class KvmCpuid2Header(ctypes.Structure):
    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


def cpuid_struct(count: int) -> ctypes.Structure:
    """A ``struct kvm_cpuid2`` with room for ``count`` entries."""

    class KvmCpuid2(ctypes.Structure):
        _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", KvmCpuidEntry2 * count)]

    cpuid = KvmCpuid2()
    cpuid.nent = count
    return cpuid


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class KvmEnableCap(ctypes.Structure):
    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4), ("pad", c_uint8 * 64)]


class KvmDebugregs(ctypes.Structure):
    _fields_ = [("db", c_uint64 * 4), ("dr6", c_uint64), ("dr7", c_uint64), ("flags", c_uint64),
                ("reserved", c_uint64 * 9)]


class KvmVcpuEvents(ctypes.Structure):
    """Opaque 64-byte ``struct kvm_vcpu_events``; saved and restored as a whole."""

    _fields_ = [("raw", c_uint8 * 64)]


# ``struct kvm_run``: only the parts hlpool reads. Offsets are fixed by the ABI.
class KvmRunIo(ctypes.Structure):
    _fields_ = [("direction", c_uint8), ("size", c_uint8), ("port", c_uint16), ("count", c_uint32),
                ("data_offset", c_uint64)]


class KvmRunMmio(ctypes.Structure):
    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32), ("is_write", c_uint8)]


class KvmRunFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class KvmRunInternal(ctypes.Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class KvmRunExit(ctypes.Union):
    _fields_ = [("io", KvmRunIo), ("mmio", KvmRunMmio), ("fail_entry", KvmRunFailEntry),
                ("internal", KvmRunInternal), ("padding", c_char * 256)]


class KvmSyncRegs(ctypes.Structure):
    _fields_ = [("regs", KvmRegs), ("sregs", KvmSregs), ("events", KvmVcpuEvents)]


class KvmRun(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("exit", KvmRunExit),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", KvmSyncRegs),
    ]


RUN_OFFSET_EXIT = KvmRun.exit.offset
RUN_OFFSET_SYNC_REGS = KvmRun.s.offset
assert RUN_OFFSET_EXIT == 32 and KvmRun.kvm_valid_regs.offset == 288 and RUN_OFFSET_SYNC_REGS == 304

# ---- ioctls ----------------------------------------------------------------------

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, KvmCpuid2Header)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, KvmRegs)
KVM_SET_REGS = _iow(0x82, KvmRegs)
KVM_GET_SREGS = _ior(0x83, KvmSregs)
KVM_SET_SREGS = _iow(0x84, KvmSregs)
KVM_GET_MSRS = _iowr(0x88, KvmMsrsHeader)
KVM_SET_MSRS = _iow(0x89, KvmMsrsHeader)
KVM_GET_FPU = _ior(0x8C, KvmFpu)
KVM_SET_FPU = _iow(0x8D, KvmFpu)
KVM_SET_CPUID2 = _iow(0x90, KvmCpuid2Header)
KVM_GET_VCPU_EVENTS = _ior(0x9F, KvmVcpuEvents)
KVM_SET_VCPU_EVENTS = _iow(0xA0, KvmVcpuEvents)
KVM_GET_DEBUGREGS = _ior(0xA1, KvmDebugregs)
KVM_SET_DEBUGREGS = _iow(0xA2, KvmDebugregs)
KVM_ENABLE_CAP = _iow(0xA3, KvmEnableCap)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, KvmXsave)
KVM_SET_XSAVE = _iow(0xA5, KvmXsave)
KVM_GET_XCRS = _ior(0xA6, KvmXcrs)
KVM_SET_XCRS = _iow(0xA7, KvmXcrs)
KVM_RESET_DIRTY_RINGS = _io(0xC7)
KVM_DIRTY_LOG_PAGE_OFFSET = 64  # pages into the vCPU mapping where the dirty ring starts
# KVM_CLEAR_DIRTY_LOG itself is issued from Cython (hlpool/memory/_dirty.pyx, via kvm.pxd).

# ---- capabilities ----------------------------------------------------------------

KVM_API_VERSION = 12
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_XSAVE = 55
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_SYNC_REGS = 74
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 arguments: GET_DIRTY_LOG stops clearing and write-protecting
# (KVM_CLEAR_DIRTY_LOG does that, page by page); INITIALLY_SET starts with every bit set.
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

# ---- exit reasons ----------------------------------------------------------------

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_DIRTY_RING_FULL = 31

EXIT_REASON_NAMES = {
    KVM_EXIT_UNKNOWN: "UNKNOWN", KVM_EXIT_EXCEPTION: "EXCEPTION", KVM_EXIT_IO: "IO",
    KVM_EXIT_HYPERCALL: "HYPERCALL", KVM_EXIT_DEBUG: "DEBUG", KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO", KVM_EXIT_SHUTDOWN: "SHUTDOWN", KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
    KVM_EXIT_INTR: "INTR", KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
    KVM_EXIT_SYSTEM_EVENT: "SYSTEM_EVENT", KVM_EXIT_DIRTY_RING_FULL: "DIRTY_RING_FULL",
}

# ---- MSRs ------------------------------------------------------------------------

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SFMASK = 0xC0000084
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103

# PVM (the paravirtual nested hypervisor of the development machines, see PVM.md).
MSR_PVM_VIF = 0x4B564D10
MSR_PVM_SIGNATURE = 0x4B564D11
PVM_SIGNATURE = 0x4D5650  # "PVM"
PVM_VIF_EXPLICIT = 0x400

# ---- libc ioctl via ctypes (releases the GIL, no buffer copies) --------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def ioctl(fd: int, request: int, arg: object = None) -> int:
    """Issue an ioctl; ``arg`` is None, an int, or a ctypes object passed by reference.

    Raises OSError with the errno on failure.
    """
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)  # type: ignore[arg-type]
    result = _libc.ioctl(fd, request, ptr)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


# ---- MSR filtering and the MSR index list (guest MSR writes denied; strict reset) ----


class KvmMsrFilterRange(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("nmsrs", c_uint32), ("base", c_uint32), ("bitmap", ctypes.c_void_p)]


class KvmMsrFilter(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("ranges", KvmMsrFilterRange * 16)]


KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1
KVM_X86_SET_MSR_FILTER = _iow(0xC6, KvmMsrFilter)
KVM_CAP_X86_MSR_FILTER = 189


class KvmMsrListHeader(ctypes.Structure):
    _fields_ = [("nmsrs", c_uint32)]


def msr_list_struct(count: int) -> ctypes.Structure:
    """A ``struct kvm_msr_list`` with room for ``count`` indices."""

    class KvmMsrList(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * count)]

    out = KvmMsrList()
    out.nmsrs = count
    return out


KVM_GET_MSR_INDEX_LIST = _iowr(0x02, KvmMsrListHeader)
