# cython: language_level=3, boundscheck=False, wraparound=False
"""A channel slot's records (:mod:`hlpool.pool.channel`), read and written in C.

Every call crosses a channel four times (request written, read; answer written, read): with
``struct`` and slicing that was ~8 us of Python per call over both processes on the PVM host,
about a fifth of what a pool adds to a call. The layout is the one ``channel.HEADER`` and
``channel.RESPONSE`` describe (little-endian uint64 fields; x86-64 is little-endian), and
tests/test_channel.py checks the two agree.

Safety: every function takes the channel's whole mapping as a typed memoryview (Cython checks
it is one contiguous writable buffer) and the slot's offset, and checks that the slot's header
and ``capacity`` bytes of data lie inside it before touching memory. Lengths read back from a
slot (the other process wrote them) are checked against ``capacity`` before they are used.
"""

from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8

from hlpool.errors import HlpoolError

cdef enum:
    HEADER_BYTES = 128   # channel.HEADER_SIZE: sixteen uint64 fields
    TAKEN_FIELD = 15     # the header's last field: the request id the worker took


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


def write_request(uint8_t[::1] view, Py_ssize_t base, Py_ssize_t capacity, uint64_t op, uint64_t request_id,
                  bytes path, bytes function, bytes payload, uint64_t timeout_ns, uint64_t expires_ns,
                  uint64_t notify):
    """Write a request into the slot at ``base``: the data (path, function name, payload) first,
    then the header. ValueError if the data exceeds the slot's ``capacity``."""
    cdef uint8_t *slot = _slot(view, base, capacity)
    cdef Py_ssize_t lp = PyBytes_GET_SIZE(path), lf = PyBytes_GET_SIZE(function), ld = PyBytes_GET_SIZE(payload)
    cdef int field
    if lp + lf + ld > capacity:
        raise ValueError("request does not fit the channel")
    memcpy(slot + HEADER_BYTES, PyBytes_AS_STRING(path), lp)
    memcpy(slot + HEADER_BYTES + lp, PyBytes_AS_STRING(function), lf)
    memcpy(slot + HEADER_BYTES + lp + lf, PyBytes_AS_STRING(payload), ld)
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


def read_request(uint8_t[::1] view, Py_ssize_t base, Py_ssize_t capacity, uint64_t call_op, uint64_t open_op):
    """(op, request id, timeout ns, expiry ns, path, function, payload offset in the mapping,
    payload length, notify) of the request in the slot at ``base``. For an op other than
    ``call_op``/``open_op`` only the op is meaningful. HlpoolError if the lengths exceed the slot."""
    cdef const uint8_t *slot = _slot(view, base, capacity)
    cdef uint64_t op = _get(slot, 0)
    cdef uint64_t lp, lf, ld
    if op != call_op and op != open_op:
        return op, 0, 0, 0, "", "", 0, 0, False
    lp, lf, ld = _get(slot, 3), _get(slot, 4), _get(slot, 5)
    if lp > <uint64_t>capacity or lf > <uint64_t>capacity or ld > <uint64_t>capacity or lp + lf + ld > <uint64_t>capacity:
        raise HlpoolError("corrupt request in the channel")
    path = PyUnicode_DecodeUTF8(<const char *>slot + HEADER_BYTES, <Py_ssize_t>lp, NULL)
    function = PyUnicode_DecodeUTF8(<const char *>slot + HEADER_BYTES + lp, <Py_ssize_t>lf, NULL)
    return (op, _get(slot, 1), _get(slot, 2), _get(slot, 6), path, function,
            base + HEADER_BYTES + <Py_ssize_t>(lp + lf), <Py_ssize_t>ld, _get(slot, 7) == 1)


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
