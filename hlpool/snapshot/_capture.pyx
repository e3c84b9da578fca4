# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""One slot of a capture (:func:`hlpool.snapshot.capture.capture`) in C, for the common case.

The common case is a snapshot with no ``retain`` and no flattening, e.g. each script a pool
registers (its load captured as a layer on the interpreter base). Python walked the parent's
runs, made a piece object per span and per written page, merged and bounded them and made the
runs: ~250 us of the ~550 a script's capture took on the PVM host, for a few dozen runs. This
does the same walk over arrays; :mod:`hlpool.snapshot.capture` keeps the general case (and
tests/test_capture_fast.py checks the two give the same runs and layer bytes).

For each run of the parent (first page, count, layer, offset), pages the guest did not write
stay references to the parent (or zeros); each written page becomes a zero run if it is all
zeros, a reference if it equals the parent's page, else a page of the new layer. Neighbouring
pieces that continue each other are merged; at most ``max_runs`` backing changes are kept by
turning the smallest gaps between new pieces into new data; then the runs are laid out and
neighbouring runs coalesced.

Safety: the parent's runs must tile ``[0, npages)`` and each run must lie inside its layer
(``layer_sizes``; its bytes are visible at ``views[layer]``), the written pages must be sorted,
unique and inside the slot; all of it is checked before any page is read. ``host`` is the
caller's mapping of the slot (``npages`` pages). Pages are only read, never written.
"""

from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcmp, memset
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

from hlpool.errors import SnapshotError

cdef enum:
    PAGE = 4096
    REF = 0
    ZERO = 1
    NEW = 2


cdef struct Piece:
    int64_t first
    int64_t count
    int64_t kind
    int64_t layer
    int64_t offset
    uintptr_t source


cdef bint _page_is_zero(const char *page) noexcept nogil:
    cdef const uint64_t *words = <const uint64_t *>page
    cdef int i
    for i in range(PAGE // 8):
        if words[i]:
            return False
    return True


cdef bint _continues(const Piece *a, const Piece *b) noexcept nogil:
    if a.first + a.count != b.first or a.kind != b.kind:
        return False
    if a.kind == ZERO:
        return True
    if a.kind == REF:
        return a.layer == b.layer and a.offset + a.count * PAGE == b.offset
    return a.source != 0 and a.source + <uintptr_t>(a.count * PAGE) == b.source


cdef inline void _add(Piece *pieces, Py_ssize_t *n, int64_t first, int64_t count, int64_t kind, int64_t layer,
                      int64_t offset, uintptr_t source) noexcept nogil:
    """Append a piece, merged into the last one when it continues it."""
    cdef Piece p
    p.first, p.count, p.kind, p.layer, p.offset, p.source = first, count, kind, layer, offset, source
    if n[0] and _continues(&pieces[n[0] - 1], &p):
        pieces[n[0] - 1].count += count
    else:
        pieces[n[0]] = p
        n[0] += 1


cdef inline void _clean(Piece *pieces, Py_ssize_t *n, int64_t first, int64_t count, int64_t run_first, int64_t layer,
                        int64_t offset, uintptr_t view) noexcept nogil:
    """Pages of a parent run the guest did not write: the parent's bytes (or zeros)."""
    if count <= 0:
        return
    if layer < 0:
        _add(pieces, n, first, count, ZERO, -1, 0, 0)
    else:
        offset = offset + (first - run_first) * PAGE
        _add(pieces, n, first, count, REF, layer, offset, view + <uintptr_t>offset)


cdef Py_ssize_t _backing_changes(const Piece *pieces, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, count = 0
    for i in range(n):
        if i == 0 or not (pieces[i].kind == NEW and pieces[i - 1].kind == NEW):
            count += 1
    return count


cdef void _bound(Piece *pieces, Py_ssize_t n, Py_ssize_t max_runs) noexcept nogil:
    """At most ``max_runs`` backing changes: the smallest gap between two new pieces (else the
    smallest piece that is not new) becomes new data, until the bound holds."""
    cdef Py_ssize_t i, best
    cdef int attempt
    cdef bint between
    while _backing_changes(pieces, n) > max_runs:
        best = -1
        for attempt in range(2):
            between = attempt == 0
            for i in range(n):
                if pieces[i].kind == NEW:
                    continue
                if between and not (0 < i < n - 1 and pieces[i - 1].kind == NEW and pieces[i + 1].kind == NEW):
                    continue
                if best < 0 or pieces[i].count < pieces[best].count:
                    best = i
            if best >= 0:
                break
        if best < 0:
            return
        if pieces[best].kind == ZERO:
            pieces[best].source = 0
        pieces[best].kind = NEW


def capture_slot(const int64_t[:] parent, const int64_t[:] views, const int64_t[:] layer_sizes,
                 const int64_t[:] dirty, uintptr_t host, int64_t npages, int64_t new_index, int64_t layer_size,
                 Py_ssize_t max_runs, list chunks):
    """The new runs of one slot (flat int64 quads as bytes) and the new layer's size after it.

    ``parent``: the parent's runs of the slot (first page, count, layer, offset quads);
    ``views[i]``/``layer_sizes[i]``: where layer i's page data is visible and its size;
    ``dirty``: the slot's pages the guest wrote; ``host``: the slot's mapping (``npages`` pages);
    ``new_index``/``layer_size``: the new layer's index and its size so far. The new layer's
    bytes are appended to ``chunks`` (one bytes object per new run)."""
    cdef Py_ssize_t nruns = parent.shape[0] // 4, ndirty = dirty.shape[0], nlayers = views.shape[0]
    cdef Py_ssize_t r, d = 0, n = 0, i, nout = 0
    cdef int64_t expected = 0, first, count, layer, offset, end, page, cursor, size
    cdef uintptr_t view = 0, addr
    cdef Piece *pieces
    cdef int64_t *out
    if parent.shape[0] % 4 or layer_sizes.shape[0] != nlayers or npages < 0 or max_runs < 1:
        raise ValueError("capture_slot: malformed arguments")
    for r in range(nruns):
        first, count, layer, offset = parent[4 * r], parent[4 * r + 1], parent[4 * r + 2], parent[4 * r + 3]
        if first != expected or count <= 0 or count > npages - first:
            raise SnapshotError("parent runs do not tile the slot")
        if layer >= 0:
            if layer >= nlayers or views[layer] == 0 or offset < 0 or offset % PAGE \
                    or offset > layer_sizes[layer] - count * PAGE:
                raise SnapshotError("a parent run points outside its layer")
        elif layer != -1:
            raise SnapshotError("a parent run has an invalid layer index")
        expected = first + count
    if expected != npages:
        raise SnapshotError("parent runs do not cover the slot")
    for i in range(ndirty):
        if dirty[i] < 0 or dirty[i] >= npages or (i and dirty[i] <= dirty[i - 1]):
            raise ValueError("dirty pages must be sorted, unique and inside the slot")
    # Each run gives at most its clean spans and its written pages: 2 pieces per written page + 1 per run.
    pieces = <Piece *>malloc((nruns + 2 * ndirty + 1) * sizeof(Piece))
    out = <int64_t *>malloc((nruns + 2 * ndirty + 1) * 4 * sizeof(int64_t))
    if pieces == NULL or out == NULL:
        free(pieces)
        free(out)
        raise MemoryError()
    try:
        with nogil:
            for r in range(nruns):
                first, count, layer, offset = parent[4 * r], parent[4 * r + 1], parent[4 * r + 2], parent[4 * r + 3]
                end = first + count
                view = <uintptr_t>views[layer] if layer >= 0 else 0
                cursor = first
                while d < ndirty and dirty[d] < end:
                    page = dirty[d]
                    d += 1
                    _clean(pieces, &n, cursor, page - cursor, first, layer, offset, view)
                    cursor = page + 1
                    addr = host + <uintptr_t>page * PAGE
                    if _page_is_zero(<const char *>addr):
                        _add(pieces, &n, page, 1, ZERO, -1, 0, 0)
                    elif layer >= 0 and memcmp(<const void *>addr,
                                               <const void *>(view + <uintptr_t>(offset + (page - first) * PAGE)),
                                               PAGE) == 0:
                        _add(pieces, &n, page, 1, REF, layer, offset + (page - first) * PAGE,
                             view + <uintptr_t>(offset + (page - first) * PAGE))
                    else:
                        _add(pieces, &n, page, 1, NEW, -1, 0, addr)
                _clean(pieces, &n, cursor, end - cursor, first, layer, offset, view)
            _bound(pieces, n, max_runs)
        for i in range(n):
            first, count = pieces[i].first, pieces[i].count
            if pieces[i].kind == NEW:
                size = count * PAGE
                if pieces[i].source:
                    chunk = PyBytes_FromStringAndSize(<const char *>pieces[i].source, size)
                else:
                    chunk = PyBytes_FromStringAndSize(NULL, size)
                    memset(PyBytes_AS_STRING(chunk), 0, size)
                chunks.append(chunk)
                layer, offset = new_index, layer_size
                layer_size += size
            elif pieces[i].kind == ZERO:
                layer, offset = -1, 0
            else:
                layer, offset = pieces[i].layer, pieces[i].offset
            # coalesce: a run that continues the last one in the same backing joins it
            if nout and out[4 * (nout - 1)] + out[4 * (nout - 1) + 1] == first and out[4 * (nout - 1) + 2] == layer \
                    and (layer < 0 or out[4 * (nout - 1) + 3] + out[4 * (nout - 1) + 1] * PAGE == offset):
                out[4 * (nout - 1) + 1] += count
            else:
                out[4 * nout], out[4 * nout + 1], out[4 * nout + 2], out[4 * nout + 3] = first, count, layer, offset
                nout += 1
        return PyBytes_FromStringAndSize(<const char *>out, nout * 4 * sizeof(int64_t)), layer_size
    finally:
        free(pieces)
        free(out)
