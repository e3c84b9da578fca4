# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A bounds check of a MessagePack value written by a guest, before anything decodes it.

One pass over the bytes, no recursion and no allocation: every length must fit
the buffer, containers may nest at most ``max_depth`` levels, only the types an
hlpool value can hold appear (no ext types, no reserved byte), the value ends
exactly at the end of the buffer, and the memory the decoded Python objects
would take (an estimate, per object) stays under ``max_decoded``. A guest can
thus neither exhaust the decoder's recursion nor make a 1 MiB result expand into
hundreds of MiB of Python objects in the supervisor.

Reading is safe: every read is preceded by a check that ``pos + n <= size``.
"""

from libc.stdint cimport uint8_t, uint64_t

# Estimated CPython object sizes (bytes, 64-bit), plus 8 for the parent's pointer.
cdef enum:
    COST_SCALAR = 32 + 8      # int or float object (None/True/False are shared: counted the same, harmlessly)
    COST_STR = 49 + 8         # + length
    COST_BYTES = 33 + 8       # + length
    COST_LIST = 56 + 8        # + 8 per item
    COST_DICT = 64 + 8        # + COST_DICT_ITEM per pair
    COST_DICT_ITEM = 48
    MAX_STACK = 256


cdef inline uint64_t _be(const uint8_t *p, int n) nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n):
        v = (v << 8) | p[i]
    return v


def check(const uint8_t[:] data, int max_depth, uint64_t max_decoded):
    """None if ``data`` is one well-formed value within the bounds, else why not (a str)."""
    cdef Py_ssize_t size = data.shape[0], pos = 0
    cdef const uint8_t *p = &data[0] if size else NULL
    cdef uint64_t remaining[MAX_STACK]   # items still expected at each open container level
    cdef int depth = 0
    cdef uint64_t cost = 0, n, items
    cdef uint8_t b
    cdef int width
    if max_depth < 0 or max_depth >= MAX_STACK:
        raise ValueError("max_depth out of range")
    remaining[0] = 1  # the top level holds exactly one value
    while True:
        while depth >= 0 and remaining[depth] == 0:
            depth -= 1
        if depth < 0:
            break
        remaining[depth] -= 1
        if pos >= size:
            return "truncated"
        b = p[pos]
        pos += 1
        items = 0
        if b <= 0x7f or b >= 0xe0 or b == 0xc0 or b == 0xc2 or b == 0xc3:
            cost += COST_SCALAR
            continue
        if 0xa0 <= b <= 0xbf or 0xd9 <= b <= 0xdb or 0xc4 <= b <= 0xc6:
            if b <= 0xbf and b >= 0xa0:
                n = b & 0x1f
            else:
                width = 1 << ((b - 0xd9) if b >= 0xd9 else (b - 0xc4))
                if pos + width > size:
                    return "truncated length"
                n = _be(p + pos, width)
                pos += width
            if n > <uint64_t>(size - pos):
                return "a string or bytes claims more bytes than the buffer holds"
            pos += <Py_ssize_t>n
            cost += (COST_BYTES if 0xc4 <= b <= 0xc6 else COST_STR) + n
        elif b == 0xca or b == 0xcb or 0xcc <= b <= 0xd3:
            if b == 0xca:
                width = 4
            elif b == 0xcb:
                width = 8
            else:
                width = 1 << ((b - 0xcc) & 3)
            if pos + width > size:
                return "truncated number"
            pos += width
            cost += COST_SCALAR
        elif 0x90 <= b <= 0x9f or b == 0xdc or b == 0xdd:
            if b <= 0x9f:
                n = b & 0x0f
            else:
                width = 2 if b == 0xdc else 4
                if pos + width > size:
                    return "truncated length"
                n = _be(p + pos, width)
                pos += width
            if n > <uint64_t>(size - pos):  # every item takes at least one byte
                return "an array claims more items than the buffer holds"
            cost += COST_LIST + 8 * n
            items = n
        elif 0x80 <= b <= 0x8f or b == 0xde or b == 0xdf:
            if b <= 0x8f:
                n = b & 0x0f
            else:
                width = 2 if b == 0xde else 4
                if pos + width > size:
                    return "truncated length"
                n = _be(p + pos, width)
                pos += width
            if n > <uint64_t>(size - pos) // 2:
                return "a map claims more pairs than the buffer holds"
            cost += COST_DICT + COST_DICT_ITEM * n
            items = 2 * n
        else:
            return f"byte {b:#04x} at offset {pos - 1} is not part of an hlpool value (ext types are not allowed)"
        if cost > max_decoded:
            return f"would decode into more than {max_decoded} bytes of objects"
        if items:
            if depth + 1 > max_depth:
                return f"nested deeper than {max_depth} levels"
            depth += 1
            remaining[depth] = items
    if cost > max_decoded:
        return f"would decode into more than {max_decoded} bytes of objects"
    if pos != size:
        return "trailing bytes after the value"
    return None
