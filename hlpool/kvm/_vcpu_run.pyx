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

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, uintptr_t
from libc.string cimport memcpy
from libc.errno cimport errno, EINTR
import os

cdef extern from "run_support.h":
    int hl_kick_signal() nogil
    int hl_install_kick_handler() nogil
    int hl_timer_arm(int64_t deadline_ns) nogil
    int hl_timer_disarm() nogil
    int hl_kvm_run(int fd, void *run) nogil
    int64_t hl_monotonic_ns() nogil
    void hl_clear_kick(void *run) nogil

DEF KVM_RUN_OFFSET_EXIT_REASON = 8
DEF KVM_RUN_OFFSET_IMMEDIATE_EXIT = 1
DEF KVM_RUN_OFFSET_DIRTY_REGS = 296
DEF KVM_RUN_OFFSET_SYNC_REGS = 304
DEF SIZEOF_KVM_REGS = 144
DEF SIZEOF_KVM_SREGS = 312
DEF KVM_SYNC_X86_REGS = 1
DEF KVM_SYNC_X86_SREGS = 2

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
    cdef uint64_t dirty = 0
    if regs.shape[0]:
        if regs.shape[0] != SIZEOF_KVM_REGS:
            raise ValueError("kvm_regs must be %d bytes" % SIZEOF_KVM_REGS)
        memcpy(<void *>(run + KVM_RUN_OFFSET_SYNC_REGS), &regs[0], SIZEOF_KVM_REGS)
        dirty |= KVM_SYNC_X86_REGS
    if sregs.shape[0]:
        if sregs.shape[0] != SIZEOF_KVM_SREGS:
            raise ValueError("kvm_sregs must be %d bytes" % SIZEOF_KVM_SREGS)
        memcpy(<void *>(run + KVM_RUN_OFFSET_SYNC_REGS + SIZEOF_KVM_REGS), &sregs[0], SIZEOF_KVM_SREGS)
        dirty |= KVM_SYNC_X86_SREGS
    (<uint64_t *>(run + KVM_RUN_OFFSET_DIRTY_REGS))[0] = dirty


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
            (<uint8_t *>(run + KVM_RUN_OFFSET_IMMEDIATE_EXIT))[0] = 0
            return RUN_INTERRUPTED
        raise OSError(errno, "KVM_RUN: " + os.strerror(errno))
    return (<unsigned int *>(run + KVM_RUN_OFFSET_EXIT_REASON))[0]


DEF KVM_EXIT_IO = 2
DEF KVM_RUN_OFFSET_IO = 32


def run_io(int fd, uintptr_t run, size_t run_size):
    """KVM_RUN once; returns (reason, port, value).

    For an I/O exit that is a single 4-byte ``out``, ``port`` and ``value``
    are the port and the value written; for any other I/O exit ``value`` is
    -1 (``port`` is negative for ``in``). For other exits both are -1.
    ``reason`` is RUN_INTERRUPTED when a kick arrived. ``run_size`` is the
    size of the kvm_run mapping (the data of an I/O exit lies inside it).
    """
    cdef int rc
    cdef uint8_t *io
    with nogil:
        rc = hl_kvm_run(fd, <void *>run)
    if rc < 0:
        if errno == EINTR:
            (<uint8_t *>(run + KVM_RUN_OFFSET_IMMEDIATE_EXIT))[0] = 0
            return RUN_INTERRUPTED, -1, -1
        raise OSError(errno, "KVM_RUN: " + os.strerror(errno))
    cdef unsigned int reason = (<unsigned int *>(run + KVM_RUN_OFFSET_EXIT_REASON))[0]
    if reason != KVM_EXIT_IO:
        return reason, -1, -1
    io = <uint8_t *>(run + KVM_RUN_OFFSET_IO)
    # struct kvm_run.io: u8 direction, u8 size, u16 port, u32 count, u64 data_offset
    cdef int direction = io[0], size = io[1]
    cdef int port = (<uint16_t *>(io + 2))[0]
    cdef unsigned int count = (<uint32_t *>(io + 4))[0]
    cdef uint64_t data_offset = (<uint64_t *>(io + 8))[0]
    if direction != 1:
        return reason, -port, -1
    if size != 4 or count != 1 or data_offset > run_size - 4:
        return reason, port, -1
    return reason, port, (<uint32_t *>(run + data_offset))[0]


def clear_kick(uintptr_t run):
    """Forget a kick that came before the deadline (a stale signal); resume normally."""
    hl_clear_kick(<void *>run)
