# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Low-level guest memory work: host mappings, page tables, guest buffers.

This is one of the few modules that touches raw memory. Each unsafe step says
why it is safe. Callers (hlpool.memory, hlpool.machine, hlpool.snapshot) pass only addresses
of mappings they created and keep alive.

- ``reserve``/``map_file_fixed``/``map_anonymous_fixed``/``unmap``/``drop``:
  the host side of guest memory. A sandbox reserves one contiguous range of
  address space, then overlays MAP_PRIVATE mappings of snapshot files (and
  anonymous zero memory) on it with MAP_FIXED.
- ``build_page_tables``: the guest's 4-level identity page tables.
- Dirty pages and their restore live in ``hlpool.memory._dirty``.
- ``write_record`` / ``read_bytes`` / ``zero_bytes`` / ``pages_equal``: guest buffers.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t, uintptr_t
from libc.string cimport memcpy, memset
from libc.errno cimport errno
from posix.stat cimport struct_stat, fstat
from posix.mman cimport (mmap, munmap, madvise, MAP_PRIVATE, MAP_SHARED, MAP_ANONYMOUS,
                         MAP_FIXED, MAP_FAILED, PROT_NONE, PROT_READ, PROT_WRITE,
                         MADV_DONTNEED)
from hlpool cimport guest_abi
from hlpool.guest_abi cimport HL_PAGE_SIZE, hl_msg_header
import os

cdef extern from "sys/mman.h":
    int MAP_NORESERVE
    int MAP_POPULATE

# Guest memory pages are the contract's HL_PAGE_SIZE (hlpool_abi.h); the shift and
# the 2 MiB large page are x86-64 paging constants, which no header here defines.
cdef enum:
    PAGE = HL_PAGE_SIZE
    PAGE_SHIFT = 12
    LARGE = 2 * 1024 * 1024

if (1 << PAGE_SHIFT) != PAGE:
    raise ImportError("hlpool_abi.h HL_PAGE_SIZE (%d) is not the x86-64 page size" % PAGE)

PAGE_SIZE = PAGE
LARGE_PAGE_SIZE = LARGE

# Page-table entry bits.
PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_USER = 1 << 2      # PVM needs U/S=1 at every level (PVM.md)
PTE_ACCESSED = 1 << 5
PTE_DIRTY = 1 << 6
PTE_LARGE = 1 << 7
PTE_NX = 1 << 63


# The same bits as C constants, so the page-table builder does no Python arithmetic.
cdef enum:
    C_PRESENT = 1 << 0
    C_WRITE = 1 << 1
    C_USER = 1 << 2
    C_ACCESSED = 1 << 5
    C_DIRTY = 1 << 6
    C_LARGE = 1 << 7
cdef uint64_t C_NX = (<uint64_t>1) << 63

# Mapping permission flags understood by build_page_tables.
MAP_WRITE = 1
MAP_EXEC = 2


cdef _oserror(str what):
    return OSError(errno, "%s: %s" % (what, os.strerror(errno)))


# ---- host mappings ------------------------------------------------------------------

def reserve(size_t size):
    """Reserve ``size`` bytes of address space (no access, no memory). Returns the address."""
    cdef void *p = mmap(NULL, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if p == MAP_FAILED:
        raise _oserror("mmap(reserve %d bytes)" % size)
    return <uintptr_t>p


def map_file_fixed(uintptr_t addr, size_t size, int fd, int64_t offset, bint shared=False, bint writable=True):
    """Map ``size`` bytes of ``fd`` at ``offset`` over ``[addr, addr+size)``.

    MAP_PRIVATE by default: writes copy-on-write into this process, the file
    never changes. Safe because ``addr`` lies inside a reservation the caller owns.
    """
    cdef int prot = PROT_READ | (PROT_WRITE if writable else 0)
    cdef int flags = MAP_FIXED | (MAP_SHARED if shared else MAP_PRIVATE)
    cdef void *p = mmap(<void *>addr, size, prot, flags, fd, offset)
    if p == MAP_FAILED:
        raise _oserror("mmap(fd %d, offset %d, %d bytes)" % (fd, offset, size))


def map_anonymous_fixed(uintptr_t addr, size_t size):
    """Map zero-filled private memory over ``[addr, addr+size)`` (inside a reservation)."""
    cdef void *p = mmap(<void *>addr, size, PROT_READ | PROT_WRITE,
                        MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if p == MAP_FAILED:
        raise _oserror("mmap(anonymous, %d bytes)" % size)


def map_file_view(int fd, size_t size, bint populate=False):
    """A read-only shared view of a whole file (page-cache pages, never copied). ``populate``:
    fill its page tables now (MAP_POPULATE: one system call instead of a fault per page later)."""
    if size == 0:
        return 0
    cdef void *p = mmap(NULL, size, PROT_READ, MAP_SHARED | (MAP_POPULATE if populate else 0), fd, 0)
    if p == MAP_FAILED:
        raise _oserror("mmap(view of fd %d, %d bytes)" % (fd, size))
    return <uintptr_t>p


def map_shared(int fd, size_t size, int64_t offset=0):
    """Map ``size`` bytes of ``fd`` read-write and shared (e.g. a vCPU's kvm_run). Returns the address."""
    cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset)
    if p == MAP_FAILED:
        raise _oserror("mmap(shared fd %d, %d bytes at %d)" % (fd, size, offset))
    return <uintptr_t>p


def unmap(uintptr_t addr, size_t size):
    """Unmap a range this process mapped."""
    if size and munmap(<void *>addr, size) != 0:
        raise _oserror("munmap")


def drop(uintptr_t addr, size_t size):
    """Drop private pages: a MAP_PRIVATE file range reads the file again, anonymous memory reads zero."""
    if madvise(<void *>addr, size, MADV_DONTNEED) != 0:
        raise _oserror("madvise(MADV_DONTNEED)")


def write_bytes(uintptr_t addr, const uint8_t[:] data):
    """Copy ``data`` to ``addr`` (which must lie in a writable mapping the caller owns)."""
    if data.shape[0]:
        memcpy(<void *>addr, &data[0], data.shape[0])


def write_record(uintptr_t addr, size_t capacity, uint64_t magic, uint64_t kind, const uint8_t[:] payload,
                 uint64_t aux0, uint64_t aux1):
    """Write a ``struct hl_msg_header`` (hlpool_abi.h) and its payload at ``addr``.

    ``capacity`` is the size of the buffer at ``addr``; the caller checked
    the payload fits, and this checks again before copying.
    """
    cdef size_t n = payload.shape[0]
    cdef hl_msg_header *h = <hl_msg_header *>addr
    if capacity < sizeof(hl_msg_header) or n > capacity - sizeof(hl_msg_header):
        raise ValueError("record does not fit its buffer")
    h.magic = magic
    h.kind = kind
    h.length = n
    h.aux0 = aux0
    h.aux1 = aux1
    h.aux2 = 0
    h.aux3 = 0
    h.aux4 = 0
    if n:
        memcpy(<void *>(addr + sizeof(hl_msg_header)), &payload[0], n)


def guest_header_values():
    """The guest/host contract as the C compiler sees it in hlpool_abi.h (via hlpool/guest_abi.pxd).

    Returns {"constants": {name: value}, "sizes": {struct: bytes},
    "offsets": {"struct.field": bytes}}, for tests/test_contracts.py to compare
    with hlpool/guest/abi.py. Not used at run time.
    """
    cdef guest_abi.hl_msg_header m
    cdef guest_abi.hl_boot_info b
    cdef guest_abi.hl_file_entry f
    cdef uintptr_t mb = <uintptr_t>&m, bb = <uintptr_t>&b, fb = <uintptr_t>&f
    constants = {
        "HL_ABI_VERSION": guest_abi.HL_ABI_VERSION,
        "HL_PAGE_SIZE": guest_abi.HL_PAGE_SIZE,
        "HL_PORT": guest_abi.HL_PORT,
        "HL_MSG_HEADER_SIZE": guest_abi.HL_MSG_HEADER_SIZE,
        "HL_LOG_HEADER_SIZE": guest_abi.HL_LOG_HEADER_SIZE,
        "HL_CALL_PAGE_INLINE": guest_abi.HL_CALL_PAGE_INLINE,
        "HL_INLINE_MAX": guest_abi.HL_INLINE_MAX,
        "HL_FILES_MAX": guest_abi.HL_FILES_MAX,
        "HL_NAME_MAX": guest_abi.HL_NAME_MAX,
        "HL_MSG_MAGIC": guest_abi.HL_MSG_MAGIC,
        "HL_BOOT_MAGIC": guest_abi.HL_BOOT_MAGIC,
    }
    sizes = {
        "hl_msg_header": sizeof(guest_abi.hl_msg_header),
        "hl_log_header": sizeof(guest_abi.hl_log_header),
        "hl_boot_info": sizeof(guest_abi.hl_boot_info),
        "hl_file_entry": sizeof(guest_abi.hl_file_entry),
        "hl_files_table": sizeof(guest_abi.hl_files_table),
    }
    offsets = {
        "hl_msg_header.magic": <uintptr_t>&m.magic - mb,
        "hl_msg_header.kind": <uintptr_t>&m.kind - mb,
        "hl_msg_header.length": <uintptr_t>&m.length - mb,
        "hl_msg_header.aux0": <uintptr_t>&m.aux0 - mb,
        "hl_msg_header.aux1": <uintptr_t>&m.aux1 - mb,
        "hl_msg_header.aux2": <uintptr_t>&m.aux2 - mb,
        "hl_msg_header.aux3": <uintptr_t>&m.aux3 - mb,
        "hl_msg_header.aux4": <uintptr_t>&m.aux4 - mb,
        "hl_boot_info.magic": <uintptr_t>&b.magic - bb,
        "hl_boot_info.abi_version": <uintptr_t>&b.abi_version - bb,
        "hl_boot_info.image_base": <uintptr_t>&b.image_base - bb,
        "hl_boot_info.image_size": <uintptr_t>&b.image_size - bb,
        "hl_boot_info.phdr": <uintptr_t>&b.phdr - bb,
        "hl_boot_info.phnum": <uintptr_t>&b.phnum - bb,
        "hl_boot_info.phent": <uintptr_t>&b.phent - bb,
        "hl_boot_info.heap_base": <uintptr_t>&b.heap_base - bb,
        "hl_boot_info.heap_size": <uintptr_t>&b.heap_size - bb,
        "hl_boot_info.stack_base": <uintptr_t>&b.stack_base - bb,
        "hl_boot_info.stack_size": <uintptr_t>&b.stack_size - bb,
        "hl_boot_info.in_base": <uintptr_t>&b.in_base - bb,
        "hl_boot_info.in_size": <uintptr_t>&b.in_size - bb,
        "hl_boot_info.reply_base": <uintptr_t>&b.reply_base - bb,
        "hl_boot_info.reply_size": <uintptr_t>&b.reply_size - bb,
        "hl_boot_info.out_base": <uintptr_t>&b.out_base - bb,
        "hl_boot_info.out_size": <uintptr_t>&b.out_size - bb,
        "hl_boot_info.log_base": <uintptr_t>&b.log_base - bb,
        "hl_boot_info.log_size": <uintptr_t>&b.log_size - bb,
        "hl_boot_info.tsc_khz": <uintptr_t>&b.tsc_khz - bb,
        "hl_boot_info.files_base": <uintptr_t>&b.files_base - bb,
        "hl_boot_info.files_size": <uintptr_t>&b.files_size - bb,
        "hl_boot_info.files_table": <uintptr_t>&b.files_table - bb,
        "hl_boot_info.call_page": <uintptr_t>&b.call_page - bb,
        "hl_file_entry.guest_address": <uintptr_t>&f.guest_address - fb,
        "hl_file_entry.size": <uintptr_t>&f.size - fb,
    }
    return {"constants": constants, "sizes": sizes, "offsets": offsets}


def read_bytes(uintptr_t addr, size_t size):
    """Copy ``size`` bytes at ``addr`` into a new bytes object."""
    return (<char *>addr)[:size]


def zero_bytes(uintptr_t addr, Py_ssize_t size):
    """Zero ``size`` bytes at ``addr`` (inside a writable mapping the caller owns)."""
    if size < 0:
        raise ValueError("negative size")
    memset(<void *>addr, 0, <size_t>size)


def pages_equal(uintptr_t a, uintptr_t b):
    """True if the 4 KiB pages at ``a`` and ``b`` hold the same bytes (``b == 0`` means zero)."""
    cdef const uint64_t *pa = <const uint64_t *>a
    cdef const uint64_t *pb = <const uint64_t *>b
    cdef int i
    if b == 0:
        for i in range(PAGE // 8):
            if pa[i]:
                return False
        return True
    for i in range(PAGE // 8):
        if pa[i] != pb[i]:
            return False
    return True


def zero_page_spans(uintptr_t addr, size_t pages):
    """Split ``pages`` pages at ``addr`` into (first, count, all_zero) spans, in order."""
    cdef size_t i = 0, start
    cdef bint z
    out = []
    while i < pages:
        start = i
        z = pages_equal(addr + i * PAGE, 0)
        i += 1
        while i < pages and pages_equal(addr + i * PAGE, 0) == z:
            i += 1
        out.append((start, i - start, z))
    return out


# ---- page tables ---------------------------------------------------------------------

cdef class _TableBuilder:
    cdef bytearray data
    cdef uint64_t base
    cdef int max_pages
    cdef int used

    def __init__(self, uint64_t base, int max_pages):
        self.data = bytearray(PAGE)
        self.base = base
        self.max_pages = max_pages
        self.used = 1  # the PML4

    cdef int new_table(self) except -1:
        if self.used >= self.max_pages:
            raise ValueError("page tables need more than %d pages" % self.max_pages)
        self.data.extend(bytes(PAGE))
        self.used += 1
        return self.used - 1

    cdef uint64_t *entry(self, int table, int index):
        cdef char *buf = self.data
        return <uint64_t *>(buf + table * PAGE) + index

    cdef int child(self, int table, int index) except -1:
        cdef uint64_t *e = self.entry(table, index)
        cdef int t
        if e[0] & C_PRESENT:
            if e[0] & C_LARGE:
                raise ValueError("overlapping mappings in page tables")
            return <int>(((e[0] & 0x000FFFFFFFFFF000) - self.base) >> PAGE_SHIFT)
        t = self.new_table()
        e = self.entry(table, index)  # data may have moved
        e[0] = (self.base + (<uint64_t>t << PAGE_SHIFT)) | C_PRESENT | C_WRITE | C_USER | C_ACCESSED
        return t


cdef uint64_t _leaf_flags(int perms):
    cdef uint64_t f = C_PRESENT | C_USER | C_ACCESSED | C_DIRTY
    if perms & 1:  # MAP_WRITE
        f |= C_WRITE
    if not (perms & 2):  # MAP_EXEC
        f |= C_NX
    return f


def build_page_tables(list mappings, uint64_t base, int max_pages=4096):
    """Build identity-mapped 4-level page tables.

    ``mappings``: (address, size, perms) tuples, page-aligned, non-overlapping,
    perms a combination of MAP_WRITE and MAP_EXEC (read is implied). Every entry
    has U/S set (PVM needs it) and Accessed/Dirty preset, so the CPU never
    writes the tables. 2 MiB pages are used wherever a 2 MiB-aligned range is
    fully mapped with one set of permissions. Unlisted ranges stay unmapped.

    Returns the tables as bytes, to be placed at guest-physical ``base``
    (the PML4 is the first page, so CR3 = base).
    """
    if base % PAGE or base >> 47:
        raise ValueError("page tables base %#x must be page aligned and below 2**47" % base)
    cdef _TableBuilder tb = _TableBuilder(base, max_pages)
    cdef uint64_t addr, end, size
    cdef int perms, pdpt, pd, pt
    for start, length, p in _merge(mappings):
        addr = start
        end = start + length
        perms = p
        while addr < end:
            if addr >> 47:
                raise ValueError("address %#x beyond the 47-bit lower half" % addr)
            pdpt = tb.child(0, (addr >> 39) & 511)
            pd = tb.child(pdpt, (addr >> 30) & 511)
            if addr % LARGE == 0 and end - addr >= LARGE:
                tb.entry(pd, (addr >> 21) & 511)[0] = addr | _leaf_flags(perms) | C_LARGE
                addr += LARGE
                continue
            pt = tb.child(pd, (addr >> 21) & 511)
            tb.entry(pt, (addr >> 12) & 511)[0] = addr | _leaf_flags(perms)
            addr += PAGE
    return bytes(tb.data)


def _merge(list mappings):
    """Sort mappings and join neighbours with equal permissions (so they can share 2 MiB pages)."""
    out = []
    for start, length, perms in sorted(mappings):
        if start % PAGE or length % PAGE or length == 0:
            raise ValueError("mapping %#x+%#x is not page aligned" % (start, length))
        if out:
            last = out[len(out) - 1]  # no negative indexing: this module disables wraparound
            if last[0] + last[1] > start:
                raise ValueError("mappings overlap at %#x" % start)
            if last[0] + last[1] == start and last[2] == perms:
                last[1] += length
                continue
        out.append([start, length, perms])
    return out


# ==== switch: a live sandbox moves to another snapshot of its family (hlpool.memory.switch) ====
#
# A run list is a flat int64 array of (first_page, count, ident, base) records that tile a slot:
# ``ident`` names the bytes' layer (-1: zero pages), ``base`` is the byte offset in that layer of
# page 0 of the slot (so page p's bytes are at ``base + p*4096``): two runs show the same bytes on
# their overlap iff ident and base are equal. The caller builds them from snapshots' runs.

cdef inline bint _same_source(const int64_t[:] a, Py_ssize_t i, const int64_t[:] b, Py_ssize_t j) noexcept:
    return a[i + 2] == b[j + 2] and (a[i + 2] < 0 or a[i + 3] == b[j + 3])


cdef int _emit(list out, int64_t first, int64_t count, int64_t ident, int64_t base) except -1:
    cdef Py_ssize_t n = len(out)
    if n and out[n - 2] == ident and (ident < 0 or out[n - 1] == base) and out[n - 4] + out[n - 3] == first:
        out[n - 3] = out[n - 3] + count
        return 0
    out.extend((first, count, ident, base if ident >= 0 else 0))
    return 0


cdef int _check_tiling(const int64_t[:] runs, int64_t npages) except -1:
    cdef Py_ssize_t i
    cdef int64_t pos = 0
    if runs.shape[0] % 4:
        raise ValueError("malformed run array")
    for i in range(0, runs.shape[0], 4):
        if runs[i] != pos or runs[i + 1] <= 0:
            raise ValueError("run array does not tile the slot")
        pos += runs[i + 1]
    if pos != npages:
        raise ValueError("run array does not cover the slot")
    return 0


def switch_slot(uintptr_t host, int64_t npages, const int64_t[:] mapped, const int64_t[:] current,
                const int64_t[:] target, const int64_t[:] t_src, const int64_t[:] t_fd, const int64_t[:] t_foff,
                uint8_t[:] resident, int64_t resident_count, int64_t copy_max):
    """Make every page of a slot show ``target``'s bytes, given that it shows ``current``'s.

    ``mapped`` says which file range is mapped under each page (what MADV_DONTNEED reverts a
    page to). The invariant on entry and exit: a page whose mapping is not its snapshot's
    source is resident (``resident[p]``), and restore never drops a resident page. For each
    span where current and target differ (n pages): n <= ``copy_max``: copy the target's
    bytes (from ``t_src[r]``, the host address of target run r's first page in a read-only
    view, 0 for zeros) and mark the pages resident (pinned); otherwise, if the mapping is
    already the target's, drop the private copies (MADV_DONTNEED) and unmark them, else map
    the target's file range there (``t_fd[r]``, ``t_foff[r]`` the file offset of run r's
    first page; anonymous memory for zero runs) and unmark them. Spans where the two agree
    are not touched: the cost follows the differing pages and the number of runs.

    Safe because the three lists are checked to tile ``npages`` pages, ``resident`` covers
    them, every written page is inside ``[host, host + npages*4096)`` (the caller's slot
    mapping) and every source page inside its run's view. Returns (copied, dropped,
    remapped pages, remap calls, resident_count, new mapped list as a flat list).
    """
    cdef Py_ssize_t im = 0, ic = 0, it = 0
    cdef Py_ssize_t nm = mapped.shape[0], nc = current.shape[0], nt = target.shape[0]
    cdef int64_t pos = 0, end, e, n, p, copied = 0, dropped = 0, remapped = 0, calls = 0
    cdef uintptr_t dst, src
    cdef void *r
    out = []
    if t_src.shape[0] * 4 != nt or t_fd.shape[0] * 4 != nt or t_foff.shape[0] * 4 != nt:
        raise ValueError("malformed target source arrays")
    if resident.shape[0] < npages:
        raise ValueError("resident map smaller than the slot")
    _check_tiling(mapped, npages)
    _check_tiling(current, npages)
    _check_tiling(target, npages)
    while pos < npages:
        end = mapped[im] + mapped[im + 1]
        e = current[ic] + current[ic + 1]
        if e < end:
            end = e
        e = target[it] + target[it + 1]
        if e < end:
            end = e
        n = end - pos
        if _same_source(current, ic, target, it):
            _emit(out, pos, n, mapped[im + 2], mapped[im + 3])
        elif n <= copy_max:
            src = <uintptr_t>t_src[it // 4]
            for p in range(pos, end):
                dst = host + (<uintptr_t>p << PAGE_SHIFT)
                if src:
                    memcpy(<void *>dst, <const void *>(src + (<uintptr_t>(p - target[it]) << PAGE_SHIFT)), PAGE)
                else:
                    memset(<void *>dst, 0, PAGE)
                if not resident[p]:
                    resident[p] = 1
                    resident_count += 1
            copied += n
            _emit(out, pos, n, mapped[im + 2], mapped[im + 3])
        else:
            dst = host + (<uintptr_t>pos << PAGE_SHIFT)
            if _same_source(mapped, im, target, it):
                if madvise(<void *>dst, n * PAGE, MADV_DONTNEED) != 0:
                    raise _oserror("madvise(MADV_DONTNEED)")
                dropped += n
                _emit(out, pos, n, mapped[im + 2], mapped[im + 3])
            else:
                if target[it + 2] < 0:
                    r = mmap(<void *>dst, n * PAGE, PROT_READ | PROT_WRITE,
                             MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
                else:
                    r = mmap(<void *>dst, n * PAGE, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_PRIVATE,
                             <int>t_fd[it // 4], t_foff[it // 4] + (pos - target[it]) * PAGE)
                if r == MAP_FAILED:
                    raise _oserror("mmap(switch %d pages)" % n)
                remapped += n
                calls += 1
                _emit(out, pos, n, target[it + 2], target[it + 3])
            for p in range(pos, end):
                if resident[p]:
                    resident[p] = 0
                    resident_count -= 1
        pos = end
        if mapped[im] + mapped[im + 1] == end:
            im += 4
        if current[ic] + current[ic + 1] == end:
            ic += 4
        if target[it] + target[it + 1] == end:
            it += 4
    return copied, dropped, remapped, calls, resident_count, out


# ---- switch: copy plans (hlpool.memory.switch) ---------------------------------------------
# A switch between two snapshots whose differing spans are all copied (none re-mapped) needs no
# walk over the runs and no new mapped list: hlpool.memory.switch makes the plan once per pair of
# snapshots, and this copies it. (switch_slot above does the general case.)

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE


def differing_span(const uint8_t[:] a, const uint8_t[:] b):
    """The smallest [start, end) outside which ``a`` and ``b`` (equal lengths) are equal; (0, 0)
    if they are equal. (A switch writes only these bytes of the control page.) Only reads."""
    cdef Py_ssize_t n = a.shape[0], start = 0, end
    if b.shape[0] != n:
        raise ValueError("differing_span needs buffers of one length")
    while start < n and a[start] == b[start]:
        start += 1
    if start == n:
        return 0, 0
    end = n
    while end > start and a[end - 1] == b[end - 1]:
        end -= 1
    return start, end


def files_unchanged(const int64_t[:] expected):
    """Whether each open file still is what it was: ``expected`` holds (descriptor, inode, size,
    mtime in ns) quads. Returns the index of the first quad whose ``fstat`` fails or differs, or
    -1 if all match (a switch checks its target's layer files this way: one call, no stat objects).
    Only reads the descriptors' metadata."""
    cdef Py_ssize_t n = expected.shape[0] // 4, i
    cdef struct_stat st
    if expected.shape[0] % 4:
        raise ValueError("files_unchanged takes (fd, inode, size, mtime_ns) quads")
    for i in range(n):
        if fstat(<int>expected[4 * i], &st) != 0:
            return i
        if (<int64_t>st.st_ino != expected[4 * i + 1] or <int64_t>st.st_size != expected[4 * i + 2]
                or <int64_t>st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec != expected[4 * i + 3]):
            return i
    return -1


def copy_plan(uintptr_t host, int64_t npages, bytes plan, bytearray resident, int64_t resident_count):
    """Copy a switch plan into the slot at ``host`` (``npages`` pages) and pin the pages.

    ``plan``: native int64 triples (first page, pages, source address of the first page in a
    read-only view of its layer, or 0 for zeros). Each page is copied (or zeroed) and marked
    in ``resident``. Safe because every span is checked to lie inside the slot (and inside
    ``resident``) before anything is written, the slot mapping spans ``npages`` pages (the
    caller's), and each source span lies in a view of the layer its run was built from
    (hlpool.memory.switch builds plans only from a snapshot's own runs, as switch_slot's
    callers do). Returns (pages copied, resident_count).
    """
    cdef Py_ssize_t size = PyBytes_GET_SIZE(plan), n = size // 24, i
    cdef const int64_t *p = <const int64_t *>PyBytes_AS_STRING(plan)
    cdef uint8_t *res = <uint8_t *>PyByteArray_AS_STRING(resident)
    cdef int64_t first, count, page, copied = 0
    cdef uintptr_t src
    if size % 24:
        raise ValueError("malformed copy plan")
    if PyByteArray_GET_SIZE(resident) < npages:
        raise ValueError("resident map smaller than the slot")
    for i in range(n):
        first, count = p[3 * i], p[3 * i + 1]
        if first < 0 or count <= 0 or count > npages or first > npages - count:
            raise ValueError("copy plan span %d+%d outside the slot's %d pages" % (first, count, npages))
    for i in range(n):
        first, count, src = p[3 * i], p[3 * i + 1], <uintptr_t>p[3 * i + 2]
        for page in range(first, first + count):
            if src:
                memcpy(<void *>(host + (<uintptr_t>page << PAGE_SHIFT)),
                       <const void *>(src + (<uintptr_t>(page - first) << PAGE_SHIFT)), PAGE)
            else:
                memset(<void *>(host + (<uintptr_t>page << PAGE_SHIFT)), 0, PAGE)
            if not res[page]:
                res[page] = 1
                resident_count += 1
        copied += count
    return copied, resident_count


def plan_copies(const int64_t[:] cur, const int64_t[:] tgt, const int64_t[:] src, int64_t copy_max):
    """hlpool.memory.switch.plan_copies over the flat run arrays (see its docstring): the copy
    plan (native int64 triples) or None. Reads only: every index is checked against the arrays'
    lengths (a run array is flat (first, count, ident, base) records, ``src`` one entry per run)."""
    cdef Py_ssize_t nc = cur.shape[0], nt = tgt.shape[0], ic = 0, it = 0
    cdef int64_t pos = 0, end, a, b, ident, count, first_src
    out = bytearray()
    cdef int64_t triple[3]
    if nc % 4 or nt % 4 or src.shape[0] < nt // 4:
        raise ValueError("malformed run arrays")
    while ic < nc and it < nt:
        a = cur[ic] + cur[ic + 1]
        b = tgt[it] + tgt[it + 1]
        end = a if a < b else b
        ident = tgt[it + 2]
        if cur[ic + 2] != ident or (ident >= 0 and cur[ic + 3] != tgt[it + 3]):
            count = end - pos
            if count > copy_max:
                return None
            first_src = src[it // 4]
            triple[0] = pos
            triple[1] = count
            triple[2] = first_src + (pos - tgt[it]) * PAGE if first_src else 0
            out += (<char *>triple)[:24]
        pos = end
        if a == end:
            ic += 4
        if b == end:
            it += 4
    if ic != nc or it != nt:
        return None
    return bytes(out)


def slot_run_arrays(const int64_t[:] runs, list per_layer):
    """hlpool.memory.switch.slot_runs in one pass: the flat (first, count, ident, base) records and
    the source address, fd and file offset of each run, as native int64 bytearrays. ``runs``:
    flat (first page, count, layer index or -1 for zeros, byte offset in the layer) records
    (a RunList's array, checked by the snapshot already); ``per_layer``: (ident, view address,
    fd, data offset) per layer (an index outside it raises)."""
    if runs.shape[0] % 4:
        raise ValueError("malformed run array")
    cdef Py_ssize_t n = runs.shape[0] // 4, nl = len(per_layer), i, index
    cdef int64_t first, count, offset, ident, view, layer_fd, data_offset
    flat, src, fds, foff = bytearray(n * 32), bytearray(n * 8), bytearray(n * 8), bytearray(n * 8)
    cdef int64_t *F = <int64_t *>PyByteArray_AS_STRING(flat)
    cdef int64_t *S = <int64_t *>PyByteArray_AS_STRING(src)
    cdef int64_t *D = <int64_t *>PyByteArray_AS_STRING(fds)
    cdef int64_t *O = <int64_t *>PyByteArray_AS_STRING(foff)
    for i in range(n):
        first, count, index, offset = runs[4 * i], runs[4 * i + 1], runs[4 * i + 2], runs[4 * i + 3]
        if index < 0:
            F[4 * i], F[4 * i + 1], F[4 * i + 2], F[4 * i + 3] = first, count, -1, 0
            S[i], D[i], O[i] = 0, -1, 0
        else:
            if index >= nl:
                raise ValueError("run refers to layer %d of %d" % (index, nl))
            ident, view, layer_fd, data_offset = per_layer[index]
            F[4 * i], F[4 * i + 1], F[4 * i + 2], F[4 * i + 3] = first, count, ident, offset - first * PAGE
            S[i], D[i], O[i] = view + offset, layer_fd, data_offset + offset
    return flat, src, fds, foff
