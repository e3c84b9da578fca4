# cython: language_level=3, boundscheck=False, wraparound=False
"""The pool's per-call records in C: a call on its way (:class:`Call`), a channel's slot
records and its semaphores (:mod:`hlpool.pool.channel`).

Every call crosses a channel four times (request written, read; answer written, read): with
``struct`` and slicing that was ~8 us of Python per call over both processes on the PVM host,
about a fifth of what a pool adds to a call. The layout is the one ``channel.HEADER`` and
``channel.RESPONSE`` describe (little-endian uint64 fields; x86-64 is little-endian), and
tests/test_channel.py checks the two agree.

Safety: every function takes the channel's whole mapping as a typed memoryview (Cython checks
it is one contiguous writable buffer) and the slot's offset, and checks that the slot's header
and ``capacity`` bytes of data lie inside it before touching memory. Lengths read back from a
slot (the other process wrote them) are checked against ``capacity`` before they are used.

A pool makes a :class:`Call` per call and the hot functions here read its fields as a C
struct (a dataclass's fields are found by name, per access).

The channel's two semaphores live in its mapping too (:class:`SharedSemaphore`): process-shared
POSIX semaphores that this module drives directly, so that the hot path takes posted answers
and posts requests without a Python call per semaphore operation and without letting go of the
GIL for an operation that cannot block (posix_ipc's ``acquire(0)`` releases it each time).
"""

from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EAGAIN, EINTR, ETIMEDOUT, errno
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, clockid_t, timespec
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object text, Py_ssize_t *size) except NULL

import os

import posix_ipc

from hlpool.errors import HlpoolError

cdef extern from "<semaphore.h>" nogil:
    ctypedef struct sem_t:
        pass
    int sem_init(sem_t *sem, int pshared, unsigned int value)
    int sem_post(sem_t *sem)
    int sem_wait(sem_t *sem)
    int sem_trywait(sem_t *sem)
    int sem_clockwait(sem_t *sem, clockid_t clock, const timespec *abstime)
    int sem_getvalue(sem_t *sem, int *value)

cdef extern from "<sched.h>" nogil:
    int sched_yield()

SEMAPHORE_BYTES = 64  # the room a SharedSemaphore takes in a mapping (a cache line; sem_t is 32 bytes)
assert sizeof(sem_t) <= SEMAPHORE_BYTES

cdef enum:
    HEADER_BYTES = 128   # channel.HEADER_SIZE: sixteen uint64 fields
    TAKEN_FIELD = 15     # the header's last field: the request id the worker took


OP_CALL = 1  # (channel.OP_CALL; tests/test_channel.py checks they agree)


cdef class Call:
    """A pool call on its way: its future, snapshot handle, function, payload, limits, and
    where it is (``worker``: set once it is written into that worker's channel).

    ``started``: when the worker started it (monotonic s); ``expires``: the monotonic time by
    which the whole call must end, queue included (0: none); ``eager``: the pool's thread
    collects the answer at once; ``retried``: queued again after its worker died without
    taking it; ``op``: ``OP_OPEN`` only opens the snapshot in the worker (a hint);
    ``in_loop``: an event loop collects the answer (see :mod:`hlpool.pool.loopcollect`).
    """

    cdef public object future
    cdef public object handle
    cdef public str function
    cdef public bytes payload
    cdef public uint64_t timeout_ns
    cdef public uint64_t request_id
    cdef public double started
    cdef public double expires
    cdef public object worker
    cdef public bint eager
    cdef public bint retried
    cdef public int op
    cdef public bint in_loop

    def __init__(self, future, handle, str function not None, bytes payload not None, uint64_t timeout_ns,
                 uint64_t request_id, double started=0.0, double expires=0.0, worker=None, bint eager=False,
                 bint retried=False, int op=OP_CALL, bint in_loop=False):
        self.future = future
        self.handle = handle
        self.function = function
        self.payload = payload
        self.timeout_ns = timeout_ns
        self.request_id = request_id
        self.started = started
        self.expires = expires
        self.worker = worker
        self.eager = eager
        self.retried = retried
        self.op = op
        self.in_loop = in_loop

    def __repr__(self):
        return (f"Call(request_id={self.request_id}, function={self.function!r}, op={self.op}, "
                f"worker={getattr(self.worker, 'index', None)})")


cdef inline uint8_t *_slot(uint8_t[::1] view, Py_ssize_t base, Py_ssize_t capacity) except NULL:
    if base < 0 or capacity < 0 or base > view.shape[0] - HEADER_BYTES - capacity:
        raise ValueError("channel slot outside the mapping")
    return &view[base]


cdef inline uint64_t _get(const uint8_t *slot, int field) noexcept:
    cdef uint64_t value
    memcpy(&value, slot + 8 * field, 8)
    return value


cdef inline void _put(uint8_t *slot, int field, uint64_t value) noexcept:
    memcpy(slot + 8 * field, &value, 8)


cdef int _fill_request(uint8_t[::1] view, Py_ssize_t base, Py_ssize_t capacity, uint64_t op, uint64_t request_id,
                       const char *path, Py_ssize_t lp, const char *function, Py_ssize_t lf, const char *payload,
                       Py_ssize_t ld, uint64_t timeout_ns, uint64_t expires_ns, uint64_t notify) except -1:
    cdef uint8_t *slot = _slot(view, base, capacity)
    cdef int field
    if lp + lf + ld > capacity:
        raise ValueError("request does not fit the channel")
    memcpy(slot + HEADER_BYTES, path, lp)
    memcpy(slot + HEADER_BYTES + lp, function, lf)
    memcpy(slot + HEADER_BYTES + lp + lf, payload, ld)
    _put(slot, 0, op)
    _put(slot, 1, request_id)
    _put(slot, 2, timeout_ns)
    _put(slot, 3, <uint64_t>lp)
    _put(slot, 4, <uint64_t>lf)
    _put(slot, 5, <uint64_t>ld)
    _put(slot, 6, expires_ns)
    _put(slot, 7, notify)
    for field in range(8, 16):
        _put(slot, field, 0)
    return 0


def write_request(uint8_t[::1] view, Py_ssize_t base, Py_ssize_t capacity, uint64_t op, uint64_t request_id,
                  bytes path not None, bytes function not None, bytes payload not None, uint64_t timeout_ns,
                  uint64_t expires_ns, uint64_t notify):
    """Write a request into the slot at ``base``: the data (path, function name, payload) first,
    then the header. ValueError if the data exceeds the slot's ``capacity``."""
    _fill_request(view, base, capacity, op, request_id, PyBytes_AS_STRING(path), PyBytes_GET_SIZE(path),
                  PyBytes_AS_STRING(function), PyBytes_GET_SIZE(function), PyBytes_AS_STRING(payload),
                  PyBytes_GET_SIZE(payload), timeout_ns, expires_ns, notify)


cdef int _request_lengths(const uint8_t *slot, Py_ssize_t capacity, uint64_t *lp, uint64_t *lf,
                          uint64_t *ld) except -1:
    lp[0], lf[0], ld[0] = _get(slot, 3), _get(slot, 4), _get(slot, 5)
    if (lp[0] > <uint64_t>capacity or lf[0] > <uint64_t>capacity or ld[0] > <uint64_t>capacity
            or lp[0] + lf[0] + ld[0] > <uint64_t>capacity):
        raise HlpoolError("corrupt request in the channel")
    return 0


def read_request(uint8_t[::1] view, Py_ssize_t base, Py_ssize_t capacity, uint64_t call_op, uint64_t open_op):
    """(op, request id, timeout ns, expiry ns, path, function, payload offset in the mapping,
    payload length, notify) of the request in the slot at ``base``. For an op other than
    ``call_op``/``open_op`` only the op is meaningful. HlpoolError if the lengths exceed the slot."""
    cdef const uint8_t *slot = _slot(view, base, capacity)
    cdef uint64_t op = _get(slot, 0)
    cdef uint64_t lp, lf, ld
    if op != call_op and op != open_op:
        return op, 0, 0, 0, "", "", 0, 0, False
    _request_lengths(slot, capacity, &lp, &lf, &ld)
    path = PyUnicode_DecodeUTF8(<const char *>slot + HEADER_BYTES, <Py_ssize_t>lp, NULL)
    function = PyUnicode_DecodeUTF8(<const char *>slot + HEADER_BYTES + lp, <Py_ssize_t>lf, NULL)
    return (op, _get(slot, 1), _get(slot, 2), _get(slot, 6), path, function,
            base + HEADER_BYTES + <Py_ssize_t>(lp + lf), <Py_ssize_t>ld, _get(slot, 7) == 1)


def take_request(uint8_t[::1] view, Py_ssize_t base, Py_ssize_t capacity, uint64_t call_op, uint64_t open_op):
    """The worker's read of its next request: (op, request id, timeout ns, expiry ns, path,
    function, payload (a copy), notify); a call or an open is marked taken in the slot before
    this returns (:func:`mark_taken`: from then on a crash may have run part of it). For
    another op only the op is meaningful. HlpoolError if the lengths exceed the slot."""
    cdef uint8_t *slot = _slot(view, base, capacity)
    cdef uint64_t op = _get(slot, 0)
    cdef uint64_t lp, lf, ld
    if op != call_op and op != open_op:
        return op, 0, 0, 0, "", "", b"", False
    _request_lengths(slot, capacity, &lp, &lf, &ld)
    path = PyUnicode_DecodeUTF8(<const char *>slot + HEADER_BYTES, <Py_ssize_t>lp, NULL)
    function = PyUnicode_DecodeUTF8(<const char *>slot + HEADER_BYTES + lp, <Py_ssize_t>lf, NULL)
    payload = PyBytes_FromStringAndSize(<const char *>slot + HEADER_BYTES + lp + lf, <Py_ssize_t>ld)
    _put(slot, TAKEN_FIELD, _get(slot, 1))
    return op, _get(slot, 1), _get(slot, 2), _get(slot, 6), path, function, payload, _get(slot, 7) == 1


def mark_taken(uint8_t[::1] view, Py_ssize_t base, Py_ssize_t capacity, uint64_t request_id):
    """Record in the slot's header that the worker took request ``request_id``."""
    _put(_slot(view, base, capacity), TAKEN_FIELD, request_id)


def write_response(uint8_t[::1] view, Py_ssize_t base, Py_ssize_t capacity, uint64_t status, uint64_t request_id,
                   bytes data, uint64_t sandboxes, uint64_t run_ns, uint64_t created, uint64_t switches):
    """Write an answer into the slot at ``base``: data, then the seven response fields."""
    cdef uint8_t *slot = _slot(view, base, capacity)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    if n > capacity:
        raise ValueError("response does not fit the channel")
    memcpy(slot + HEADER_BYTES, PyBytes_AS_STRING(data), n)
    _put(slot, 0, status)
    _put(slot, 1, request_id)
    _put(slot, 2, <uint64_t>n)
    _put(slot, 3, sandboxes)
    _put(slot, 4, run_ns)
    _put(slot, 5, created)
    _put(slot, 6, switches)


def read_response(uint8_t[::1] view, Py_ssize_t base, Py_ssize_t capacity):
    """(status, request id, data, (VMs held, run ns, VMs made, switches)) of the answer in the
    slot at ``base``; HlpoolError if its length exceeds the slot (a worker is not trusted)."""
    cdef const uint8_t *slot = _slot(view, base, capacity)
    cdef uint64_t n = _get(slot, 2)
    if n > <uint64_t>capacity:
        raise HlpoolError("corrupt response in the channel")
    data = PyBytes_FromStringAndSize(<const char *>slot + HEADER_BYTES, <Py_ssize_t>n)
    return _get(slot, 0), _get(slot, 1), data, (_get(slot, 3), _get(slot, 4), _get(slot, 5), _get(slot, 6))


cdef object _corrupt(str doing, int err):
    # glibc's semaphore functions fail only on a semaphore that is not one (EINVAL) or is full
    # (EOVERFLOW): the other process, which shares the memory, wrote over it
    return HlpoolError(f"{doing} a channel semaphore failed ({os.strerror(err)}): the other side corrupted it")


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return <int64_t>now.tv_sec * 1000000000 + now.tv_nsec


cdef class SharedSemaphore:
    """A process-shared POSIX semaphore at an offset of a channel's mapping.

    It answers the calls the pool makes of a ``posix_ipc.Semaphore`` (``acquire``,
    ``release``, ``value``, ``close``; a wait that times out raises ``posix_ipc.BusyError``)
    without a name in /dev/shm: the channel's mapping is the only thing to share and to
    unlink. :meth:`take` and :meth:`poll` are the hot path's: several posted tokens taken in
    one call, and a bounded spin with the GIL released.

    Safety: the object holds a typed view of the mapping (the mapping cannot be unmapped
    under it: ``mmap.close`` refuses while a view exists) and checks that the semaphore lies
    inside it. The other process shares the memory and may write anything there; glibc's
    semaphore functions then fail (EINVAL, EOVERFLOW: raised as HlpoolError) or wake spuriously,
    and every wait here has a bound or is the worker's own. :meth:`close` while another
    thread waits keeps the view until that wait returns.
    """

    cdef sem_t *_sem
    cdef uint8_t[::1] _view
    cdef int _waiting
    cdef bint _closing

    def __cinit__(self, uint8_t[::1] view, Py_ssize_t offset, bint create=False):
        if offset < 0 or offset % 8 or offset > view.shape[0] - SEMAPHORE_BYTES:
            raise ValueError("semaphore outside the mapping")
        self._view = view
        self._sem = <sem_t *>&view[offset]
        if create and sem_init(self._sem, 1, 0) != 0:
            raise HlpoolError(f"cannot make a channel semaphore: {os.strerror(errno)}")

    cdef sem_t *_open(self) except NULL:
        if self._sem == NULL or self._closing:
            raise HlpoolError("the channel's semaphore is closed")
        return self._sem

    cdef void _done_waiting(self) noexcept:
        self._waiting -= 1
        if self._closing and not self._waiting:
            self._sem = NULL
            self._view = None

    def acquire(self, timeout=None):
        """Take one token: wait for it without a bound (``None``), not at all (``0``: BusyError
        if none is posted), or up to ``timeout`` seconds (then BusyError). Signals are handled
        while waiting (Ctrl-C interrupts)."""
        cdef sem_t *sem = self._open()
        cdef int rc = 0, err = 0
        cdef bint bounded = timeout is not None
        cdef double seconds
        cdef int64_t until
        cdef timespec deadline
        if sem_trywait(sem) == 0:  # posted already: taken without letting go of the GIL
            return
        if errno != EAGAIN:
            raise _corrupt("taking", errno)
        if bounded:
            seconds = timeout
            if seconds <= 0:
                raise posix_ipc.BusyError("the semaphore is zero")
            until = _now_ns() + <int64_t>(seconds * 1e9)
            deadline.tv_sec = until // 1000000000
            deadline.tv_nsec = until % 1000000000
        self._waiting += 1
        try:
            while True:
                with nogil:
                    if not bounded:
                        rc = sem_wait(sem)
                    else:
                        rc = sem_clockwait(sem, CLOCK_MONOTONIC, &deadline)
                    if rc != 0:
                        err = errno
                if rc == 0:
                    return
                if err == ETIMEDOUT:
                    raise posix_ipc.BusyError("timed out waiting for the semaphore")
                if err != EINTR:
                    raise _corrupt("waiting for", err)
                PyErr_CheckSignals()
        finally:
            self._done_waiting()

    def release(self):
        """Post one token (wakes a waiter of either process)."""
        if sem_post(self._open()) != 0:
            raise _corrupt("posting", errno)

    @property
    def value(self):
        """The tokens posted and not taken (no system call)."""
        cdef int value = 0
        if sem_getvalue(self._open(), &value) != 0:
            raise _corrupt("reading", errno)
        return value

    cpdef int take(self, int most) except -1:
        """Take up to ``most`` tokens that are posted already (never waits); how many were taken."""
        cdef sem_t *sem = self._open()
        cdef int taken = 0
        while taken < most and sem_trywait(sem) == 0:
            taken += 1
        return taken

    def poll(self, int64_t until_ns, int yield_every=1):
        """Spin until a token is posted (taken: True) or the CLOCK_MONOTONIC instant ``until_ns``
        passes (False, nothing taken), calling ``sched_yield`` every ``yield_every`` polls. The
        GIL is released meanwhile: the process's other threads run."""
        cdef sem_t *sem = self._open()
        cdef int polls = 0
        cdef bint taken = False
        if yield_every < 1:
            yield_every = 1
        self._waiting += 1
        try:
            with nogil:
                while True:
                    if sem_trywait(sem) == 0:
                        taken = True
                        break
                    if _now_ns() >= until_ns:
                        break
                    polls += 1
                    if polls % yield_every == 0:
                        sched_yield()
        finally:
            self._done_waiting()
        return taken

    def close(self):
        """Let go of the mapping (a thread still waiting keeps it until its wait returns)."""
        if self._waiting:
            self._closing = True
        else:
            self._sem = NULL
            self._view = None


def read_answers(uint8_t[::1] view, list offsets, Py_ssize_t capacity, Py_ssize_t received, object inflight,
                 Py_ssize_t count, uint64_t call_op, uint64_t ok_status, dict costs):
    """Take ``count`` calls off the front of ``inflight`` and read their answers, the first in
    slot ``received % len(offsets)``: the pool's batch read, in one call.

    Returns ``(batch, trusted, calls, errors, opens, figures)``: ``batch`` holds
    ``(call, status, data)`` per answer; ``trusted`` is False when the worker broke the
    channel's protocol (an answer for another request, a length beyond the slot: the caller
    fails the whole batch and replaces the worker; nothing is raised, so no call taken off
    ``inflight`` is lost); ``calls``/``errors``/``opens`` count the answers to calls, the failed
    ones and the answers to open hints; ``figures`` are the last answer's (VMs held, VMs made,
    switches). Each call answered updates ``costs[call.handle.path]``, the moving average of
    the worker's own seconds per call (bounded: a cost estimate, never trusted further)."""
    cdef Py_ssize_t depth = len(offsets), i
    cdef const uint8_t *slot = NULL
    cdef uint64_t length, status
    cdef double elapsed
    cdef list batch = []
    cdef bint trusted = True
    cdef Py_ssize_t calls = 0, errors = 0, opens = 0
    cdef Call call
    popleft = inflight.popleft
    for i in range(count):
        slot = _slot(view, offsets[(received + i) % depth], capacity)
        call = popleft()
        status, length = _get(slot, 0), _get(slot, 2)
        if length > <uint64_t>capacity or call.request_id != _get(slot, 1):
            trusted = False
            batch.append((call, status, b""))
            continue
        batch.append((call, status, PyBytes_FromStringAndSize(<const char *>slot + HEADER_BYTES, <Py_ssize_t>length)))
        if call.op == call_op:
            calls += 1
            errors += status != ok_status
            elapsed = min(_get(slot, 4) / 1e9, 60.0)
            path = call.handle.path
            previous = costs.get(path)
            costs[path] = elapsed if previous is None else 0.8 * previous + 0.2 * elapsed
        else:
            opens += 1
    figures = (_get(slot, 3), _get(slot, 5), _get(slot, 6)) if slot != NULL else None
    return batch, trusted, calls, errors, opens, figures


def write_call(uint8_t[::1] view, Py_ssize_t base, Py_ssize_t capacity, Call call):
    """Write ``call`` into the slot at ``base`` as a request (what :func:`write_request` writes,
    from the call's own fields). ValueError if it exceeds the slot's ``capacity``."""
    cdef bytes path = call.handle.path_bytes
    cdef Py_ssize_t lf = 0
    if path is None or call.payload is None:
        raise TypeError("a call without its snapshot's path or its payload")
    cdef const char *function = PyUnicode_AsUTF8AndSize(call.function, &lf)
    _fill_request(view, base, capacity, <uint64_t>call.op, call.request_id, PyBytes_AS_STRING(path),
                  PyBytes_GET_SIZE(path), function, lf, PyBytes_AS_STRING(call.payload), PyBytes_GET_SIZE(call.payload),
                  call.timeout_ns, <uint64_t>(call.expires * 1e9) if call.expires > 0 else 0, call.in_loop)
