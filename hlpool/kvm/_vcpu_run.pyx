# cython: language_level=3, boundscheck=False, wraparound=False
"""The hot path of a vCPU: load registers through sync regs, KVM_RUN, stop at a deadline.

KVM_RUN is issued here, not through Python's fcntl/ctypes, for two reasons:
it must not be retried on EINTR (Python retries interrupted system calls),
and it must release the GIL for the whole run.

Deadlines: each thread that runs vCPUs owns one POSIX timer that delivers a
real-time signal to that thread (SIGEV_THREAD_ID). The signal's handler sets
``immediate_exit`` in the kvm_run structure of the vCPU the thread is
running, so KVM_RUN returns EINTR whether the signal lands inside the guest
or just before KVM_RUN is entered. Spurious wake-ups are filtered by the
caller, which compares the clock with the deadline.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t, uintptr_t
from libc.string cimport memcpy
from libc.errno cimport errno, EINTR
from hlpool.kvm cimport kvm
from hlpool.kvm.kvm cimport kvm_run, kvm_run_io, kvm_regs, kvm_sregs, kvm_debugregs, kvm_xcrs
import os

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "run_support.h":
    int hl_kick_signal() nogil
    int hl_install_kick_handler() nogil
    int hl_timer_arm(int64_t deadline_ns) nogil
    int hl_timer_disarm() nogil
    int hl_kvm_run(int fd, void *run) nogil
    int64_t hl_monotonic_ns() nogil
    void hl_clear_kick(void *run) nogil

# Every kvm_run offset, struct size and flag below comes from <linux/kvm.h> through
# hlpool/kvm/kvm.pxd: the run mapping is accessed as a struct kvm_run.

RUN_INTERRUPTED = -1

if hl_install_kick_handler() != 0:
    raise OSError(errno, "sigaction(kick signal): " + os.strerror(errno))

KICK_SIGNAL = hl_kick_signal()


def monotonic_ns():
    """CLOCK_MONOTONIC in nanoseconds (the clock deadlines use)."""
    return hl_monotonic_ns()


def load_sync_regs(uintptr_t run, const uint8_t[:] regs, const uint8_t[:] sregs):
    """Queue ``regs``/``sregs`` (raw kvm_regs/kvm_sregs bytes) to be loaded by the next KVM_RUN.

    ``run`` is the address of the vCPU's mmap'ed kvm_run; the copies stay
    inside its fixed-layout sync-regs area.
    """
    cdef kvm_run *r = <kvm_run *>run
    cdef uint64_t dirty = 0
    if regs.shape[0]:
        if regs.shape[0] != sizeof(kvm_regs):
            raise ValueError("kvm_regs must be %d bytes" % sizeof(kvm_regs))
        memcpy(&r.s.regs.regs, &regs[0], sizeof(kvm_regs))
        dirty |= kvm.KVM_SYNC_X86_REGS
    if sregs.shape[0]:
        if sregs.shape[0] != sizeof(kvm_sregs):
            raise ValueError("kvm_sregs must be %d bytes" % sizeof(kvm_sregs))
        memcpy(&r.s.regs.sregs, &sregs[0], sizeof(kvm_sregs))
        dirty |= kvm.KVM_SYNC_X86_SREGS
    r.kvm_dirty_regs = dirty


def arm_deadline(int64_t deadline_ns):
    """Arm this thread's timer to kick the running vCPU at ``deadline_ns`` (monotonic).

    0 disarms it.
    """
    cdef int rc
    if deadline_ns:
        rc = hl_timer_arm(deadline_ns)
    else:
        rc = hl_timer_disarm()
    if rc != 0:
        raise OSError(errno, "timer_settime: " + os.strerror(errno))


def run(int fd, uintptr_t run):
    """KVM_RUN once. Returns the exit reason, or RUN_INTERRUPTED if a kick arrived."""
    cdef int rc
    with nogil:
        rc = hl_kvm_run(fd, <void *>run)
    if rc < 0:
        if errno == EINTR:
            (<kvm_run *>run).immediate_exit = 0
            return RUN_INTERRUPTED
        raise OSError(errno, "KVM_RUN: " + os.strerror(errno))
    return (<kvm_run *>run).exit_reason


def run_io(int fd, uintptr_t run, size_t run_size):
    """KVM_RUN once; returns (reason, port, value).

    For an I/O exit that is a single 4-byte ``out``, ``port`` and ``value``
    are the port and the value written; for any other I/O exit ``value`` is
    -1 (``port`` is negative for ``in``). For other exits both are -1.
    ``reason`` is RUN_INTERRUPTED when a kick arrived. ``run_size`` is the
    size of the kvm_run mapping (the data of an I/O exit lies inside it).
    """
    cdef int rc
    cdef kvm_run *r = <kvm_run *>run
    cdef const kvm_run_io *io
    with nogil:
        rc = hl_kvm_run(fd, <void *>run)
    if rc < 0:
        if errno == EINTR:
            r.immediate_exit = 0
            return RUN_INTERRUPTED, -1, -1
        raise OSError(errno, "KVM_RUN: " + os.strerror(errno))
    cdef unsigned int reason = r.exit_reason
    if reason != kvm.KVM_EXIT_IO:
        return reason, -1, -1
    io = &r.io
    cdef int direction = io.direction, size = io.size
    cdef int port = io.port
    cdef unsigned int count = io.count
    cdef uint64_t data_offset = io.data_offset
    if direction != kvm.KVM_EXIT_IO_OUT:
        return reason, -port, -1
    if size != 4 or count != 1 or data_offset > run_size - 4:
        return reason, port, -1
    return reason, port, (<uint32_t *>(run + data_offset))[0]


def set_debugregs_xcrs(int fd, const uint8_t[:] debugregs, const uint8_t[:] xcrs):
    """KVM_SET_DEBUGREGS then KVM_SET_XCRS on the vCPU ``fd`` (raw struct bytes; an empty one is
    skipped): the vCPU state a guest can change without an exit, which every switch puts back.

    One call for the pair saves a switch two trips through Python's fcntl (~1 us each here).
    Safe: each buffer must be exactly its struct's size, and KVM only reads it.
    """
    if debugregs.shape[0]:
        if debugregs.shape[0] != sizeof(kvm_debugregs):
            raise ValueError("kvm_debugregs must be %d bytes" % sizeof(kvm_debugregs))
        if ioctl(fd, kvm.KVM_SET_DEBUGREGS, <const void *>&debugregs[0]) < 0:
            raise OSError(errno, "KVM_SET_DEBUGREGS: " + os.strerror(errno))
    if xcrs.shape[0]:
        if xcrs.shape[0] != sizeof(kvm_xcrs):
            raise ValueError("kvm_xcrs must be %d bytes" % sizeof(kvm_xcrs))
        if ioctl(fd, kvm.KVM_SET_XCRS, <const void *>&xcrs[0]) < 0:
            raise OSError(errno, "KVM_SET_XCRS: " + os.strerror(errno))


def clear_kick(uintptr_t run):
    """Forget a kick that came before the deadline (a stale signal); resume normally."""
    hl_clear_kick(<void *>run)


def kvm_header_values():
    """The KVM ABI as the C compiler sees it in <linux/kvm.h> (via hlpool/kvm/kvm.pxd).

    Returns {"constants": {name: value}, "sizes": {struct: bytes},
    "offsets": {"struct.field": bytes}}, for tests/test_contracts.py to compare
    with the Python table in hlpool/kvm/abi.py. Not used at run time.
    """
    cdef kvm.kvm_run r
    cdef uintptr_t base = <uintptr_t>&r
    cdef uintptr_t io = <uintptr_t>&r.io
    constants = {
        "KVM_API_VERSION": kvm.KVM_API_VERSION,
        "KVM_CAP_NR_MEMSLOTS": kvm.KVM_CAP_NR_MEMSLOTS,
        "KVM_CAP_XSAVE": kvm.KVM_CAP_XSAVE,
        "KVM_CAP_GET_TSC_KHZ": kvm.KVM_CAP_GET_TSC_KHZ,
        "KVM_CAP_SYNC_REGS": kvm.KVM_CAP_SYNC_REGS,
        "KVM_CAP_READONLY_MEM": kvm.KVM_CAP_READONLY_MEM,
        "KVM_CAP_IMMEDIATE_EXIT": kvm.KVM_CAP_IMMEDIATE_EXIT,
        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2": kvm.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        "KVM_CAP_DIRTY_LOG_RING": kvm.KVM_CAP_DIRTY_LOG_RING,
        "KVM_CAP_X86_MSR_FILTER": kvm.KVM_CAP_X86_MSR_FILTER,
        "KVM_EXIT_UNKNOWN": kvm.KVM_EXIT_UNKNOWN,
        "KVM_EXIT_EXCEPTION": kvm.KVM_EXIT_EXCEPTION,
        "KVM_EXIT_IO": kvm.KVM_EXIT_IO,
        "KVM_EXIT_HYPERCALL": kvm.KVM_EXIT_HYPERCALL,
        "KVM_EXIT_DEBUG": kvm.KVM_EXIT_DEBUG,
        "KVM_EXIT_HLT": kvm.KVM_EXIT_HLT,
        "KVM_EXIT_MMIO": kvm.KVM_EXIT_MMIO,
        "KVM_EXIT_SHUTDOWN": kvm.KVM_EXIT_SHUTDOWN,
        "KVM_EXIT_FAIL_ENTRY": kvm.KVM_EXIT_FAIL_ENTRY,
        "KVM_EXIT_INTR": kvm.KVM_EXIT_INTR,
        "KVM_EXIT_INTERNAL_ERROR": kvm.KVM_EXIT_INTERNAL_ERROR,
        "KVM_EXIT_SYSTEM_EVENT": kvm.KVM_EXIT_SYSTEM_EVENT,
        "KVM_EXIT_DIRTY_RING_FULL": kvm.KVM_EXIT_DIRTY_RING_FULL,
        "KVM_EXIT_IO_IN": kvm.KVM_EXIT_IO_IN,
        "KVM_EXIT_IO_OUT": kvm.KVM_EXIT_IO_OUT,
        "KVM_DIRTY_LOG_PAGE_OFFSET": kvm.KVM_DIRTY_LOG_PAGE_OFFSET,
        "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE": kvm.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
        "KVM_DIRTY_LOG_INITIALLY_SET": kvm.KVM_DIRTY_LOG_INITIALLY_SET,
        "KVM_MSR_FILTER_READ": kvm.KVM_MSR_FILTER_READ,
        "KVM_MSR_FILTER_WRITE": kvm.KVM_MSR_FILTER_WRITE,
        "KVM_MSR_FILTER_DEFAULT_ALLOW": kvm.KVM_MSR_FILTER_DEFAULT_ALLOW,
        "KVM_MSR_FILTER_DEFAULT_DENY": kvm.KVM_MSR_FILTER_DEFAULT_DENY,
        "KVM_MSR_FILTER_MAX_RANGES": kvm.KVM_MSR_FILTER_MAX_RANGES,
        "KVM_SYNC_X86_REGS": kvm.KVM_SYNC_X86_REGS,
        "KVM_SYNC_X86_SREGS": kvm.KVM_SYNC_X86_SREGS,
        "KVM_SYNC_X86_EVENTS": kvm.KVM_SYNC_X86_EVENTS,
        "KVM_MEM_LOG_DIRTY_PAGES": kvm.KVM_MEM_LOG_DIRTY_PAGES,
        "KVM_MEM_READONLY": kvm.KVM_MEM_READONLY,
        "KVM_DIRTY_GFN_F_DIRTY": kvm.KVM_DIRTY_GFN_F_DIRTY,
        "KVM_DIRTY_GFN_F_RESET": kvm.KVM_DIRTY_GFN_F_RESET,
        "KVM_GET_API_VERSION": kvm.KVM_GET_API_VERSION,
        "KVM_GET_MSR_INDEX_LIST": kvm.KVM_GET_MSR_INDEX_LIST,
        "KVM_CREATE_VM": kvm.KVM_CREATE_VM,
        "KVM_CHECK_EXTENSION": kvm.KVM_CHECK_EXTENSION,
        "KVM_GET_VCPU_MMAP_SIZE": kvm.KVM_GET_VCPU_MMAP_SIZE,
        "KVM_GET_SUPPORTED_CPUID": kvm.KVM_GET_SUPPORTED_CPUID,
        "KVM_CREATE_VCPU": kvm.KVM_CREATE_VCPU,
        "KVM_GET_DIRTY_LOG": kvm.KVM_GET_DIRTY_LOG,
        "KVM_SET_USER_MEMORY_REGION": kvm.KVM_SET_USER_MEMORY_REGION,
        "KVM_SET_TSS_ADDR": kvm.KVM_SET_TSS_ADDR,
        "KVM_RUN": kvm.KVM_RUN,
        "KVM_GET_REGS": kvm.KVM_GET_REGS,
        "KVM_SET_REGS": kvm.KVM_SET_REGS,
        "KVM_GET_SREGS": kvm.KVM_GET_SREGS,
        "KVM_SET_SREGS": kvm.KVM_SET_SREGS,
        "KVM_GET_MSRS": kvm.KVM_GET_MSRS,
        "KVM_SET_MSRS": kvm.KVM_SET_MSRS,
        "KVM_GET_FPU": kvm.KVM_GET_FPU,
        "KVM_SET_FPU": kvm.KVM_SET_FPU,
        "KVM_SET_CPUID2": kvm.KVM_SET_CPUID2,
        "KVM_GET_VCPU_EVENTS": kvm.KVM_GET_VCPU_EVENTS,
        "KVM_SET_VCPU_EVENTS": kvm.KVM_SET_VCPU_EVENTS,
        "KVM_GET_DEBUGREGS": kvm.KVM_GET_DEBUGREGS,
        "KVM_SET_DEBUGREGS": kvm.KVM_SET_DEBUGREGS,
        "KVM_ENABLE_CAP": kvm.KVM_ENABLE_CAP,
        "KVM_GET_TSC_KHZ": kvm.KVM_GET_TSC_KHZ,
        "KVM_GET_XSAVE": kvm.KVM_GET_XSAVE,
        "KVM_SET_XSAVE": kvm.KVM_SET_XSAVE,
        "KVM_GET_XCRS": kvm.KVM_GET_XCRS,
        "KVM_SET_XCRS": kvm.KVM_SET_XCRS,
        "KVM_RESET_DIRTY_RINGS": kvm.KVM_RESET_DIRTY_RINGS,
        "KVM_X86_SET_MSR_FILTER": kvm.KVM_X86_SET_MSR_FILTER,
    }
    sizes = {
        "kvm_regs": sizeof(kvm.kvm_regs),
        "kvm_segment": sizeof(kvm.kvm_segment),
        "kvm_dtable": sizeof(kvm.kvm_dtable),
        "kvm_sregs": sizeof(kvm.kvm_sregs),
        "kvm_vcpu_events": sizeof(kvm.kvm_vcpu_events),
        "kvm_fpu": sizeof(kvm.kvm_fpu),
        "kvm_xsave": sizeof(kvm.kvm_xsave),
        "kvm_xcr": sizeof(kvm.kvm_xcr),
        "kvm_xcrs": sizeof(kvm.kvm_xcrs),
        "kvm_debugregs": sizeof(kvm.kvm_debugregs),
        "kvm_msr_entry": sizeof(kvm.kvm_msr_entry),
        "kvm_msrs": sizeof(kvm.kvm_msrs),
        "kvm_msr_list": sizeof(kvm.kvm_msr_list),
        "kvm_msr_filter_range": sizeof(kvm.kvm_msr_filter_range),
        "kvm_msr_filter": sizeof(kvm.kvm_msr_filter),
        "kvm_cpuid_entry2": sizeof(kvm.kvm_cpuid_entry2),
        "kvm_cpuid2": sizeof(kvm.kvm_cpuid2),
        "kvm_userspace_memory_region": sizeof(kvm.kvm_userspace_memory_region),
        "kvm_enable_cap": sizeof(kvm.kvm_enable_cap),
        "kvm_sync_regs": sizeof(kvm.kvm_sync_regs),
        "kvm_run.io": sizeof(kvm.kvm_run_io),
        "kvm_dirty_log": sizeof(kvm.kvm_dirty_log),
        "kvm_dirty_gfn": sizeof(kvm.kvm_dirty_gfn),
    }
    offsets = {
        "kvm_run.immediate_exit": <uintptr_t>&r.immediate_exit - base,
        "kvm_run.exit_reason": <uintptr_t>&r.exit_reason - base,
        "kvm_run.io": io - base,
        "kvm_run.kvm_valid_regs": <uintptr_t>&r.kvm_valid_regs - base,
        "kvm_run.kvm_dirty_regs": <uintptr_t>&r.kvm_dirty_regs - base,
        "kvm_run.s": <uintptr_t>&r.s - base,
        "kvm_run.s.regs.regs": <uintptr_t>&r.s.regs.regs - base,
        "kvm_run.s.regs.sregs": <uintptr_t>&r.s.regs.sregs - base,
        "kvm_run.s.regs.events": <uintptr_t>&r.s.regs.events - base,
        "kvm_run.io.direction": <uintptr_t>&r.io.direction - io,
        "kvm_run.io.size": <uintptr_t>&r.io.size - io,
        "kvm_run.io.port": <uintptr_t>&r.io.port - io,
        "kvm_run.io.count": <uintptr_t>&r.io.count - io,
        "kvm_run.io.data_offset": <uintptr_t>&r.io.data_offset - io,
    }
    return {"constants": constants, "sizes": sizes, "offsets": offsets}
