# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Dirty pages of a sandbox's main area and their restore (the mechanism under hlpool.memory.guest_memory).

- ``get_dirty_log``: KVM_GET_DIRTY_LOG of one memory slot into a bitmap.
- ``DirtySet``: the pages to put back, filled from KVM's dirty ring or a
  dirty bitmap, and ``DirtySet.restore``, which puts them back (copy or drop),
  and, with KVM's manual dirty-log protect, keeps a bounded working set of
  pages restored wholesale (never write-protected) and write-protects the rest
  again with KVM_CLEAR_DIRTY_LOG.

Raw memory: callers pass only addresses of mappings they created and keep
alive (the area's host range, the snapshot layers' read-only views, the
vCPU's dirty ring); every page index is checked against the area's size.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t, uintptr_t
from libc.string cimport memcmp, memcpy, memset
from libc.errno cimport errno
from posix.mman cimport madvise, MADV_DONTNEED
from hlpool.kvm cimport kvm
from hlpool.kvm.kvm cimport kvm_clear_dirty_log, kvm_dirty_log, kvm_dirty_gfn
from hlpool.guest_abi cimport HL_PAGE_SIZE
import os

cdef enum:
    PAGE = HL_PAGE_SIZE
    PAGE_SHIFT = 12

if (1 << PAGE_SHIFT) != PAGE:
    raise ImportError("hlpool_abi.h HL_PAGE_SIZE (%d) is not the x86-64 page size" % PAGE)


cdef _oserror(str what):
    return OSError(errno, "%s: %s" % (what, os.strerror(errno)))


cdef extern from "sys/ioctl.h":
    int ioctl(int fd, unsigned long request, ...) nogil

# KVM ioctl numbers, flags and structs below come from <linux/kvm.h> (hlpool/kvm/kvm.pxd).


def get_dirty_log(int vm_fd, uint32_t slot, uint64_t[:] bitmap):
    """KVM_GET_DIRTY_LOG for ``slot`` straight into ``bitmap`` (one bit per page of the slot;
    its first words are overwritten). Without manual protect KVM clears the log and
    write-protects the reported pages again; with it, the log is only read."""
    cdef kvm_dirty_log log
    memset(&log, 0, sizeof(log))
    log.slot = slot
    log.dirty_bitmap = &bitmap[0]
    if ioctl(vm_fd, kvm.KVM_GET_DIRTY_LOG, &log) != 0:
        raise _oserror("KVM_GET_DIRTY_LOG")


cdef extern from *:
    int __builtin_ctzll(unsigned long long) nogil
    int __builtin_popcountll(unsigned long long) nogil
    void __sync_synchronize() nogil



cdef uint8_t _zero_page[PAGE]  # static storage: all zero


cdef class DirtySet:
    """The set of main-area pages to put back, with the words that hold them.

    Filled from KVM's dirty ring (O(pages dirtied)) or from a dirty bitmap
    (O(bitmap)), plus pages the caller always adds (the hot slot). Restoring
    visits only the words that were touched, so its cost follows the number
    of dirty pages, not the size of guest memory.

    With :meth:`track` (a bitmap dirty log with KVM's manual protect), the set
    also keeps a bounded *working set*: pages that calls write again and again
    are restored wholesale (compared and copied back every restore) and stay
    writable, so the guest's next write to them costs no write-protect fault.
    The isolation invariant (see :meth:`restore`): a page's dirty bit is
    cleared (and the page write-protected) only right after that page was
    restored, and every page whose bit is set is restored; a wholesale page
    keeps its bit set, so it is restored by every restore.
    """

    cdef uint64_t[::1] bits
    cdef uint32_t[::1] words
    cdef Py_ssize_t nwords_used
    cdef uint64_t npages
    cdef uint64_t fetch  # next dirty-ring entry to read
    # The working set (only after track()):
    cdef uint64_t tracked          # pages of the logged slot, from page 0 (0: not tracking)
    cdef int vm_fd
    cdef uint32_t slot_id
    cdef uint64_t[::1] ws          # wholesale pages: never cleared in KVM, restored every time
    cdef uint64_t[::1] streak      # pages (outside ws) dirty in the previous restore
    cdef uint32_t[::1] streak_words
    cdef Py_ssize_t nstreak_words
    cdef uint8_t[::1] age          # per page: restores in a row dirty (outside ws) / unchanged (in ws)
    cdef uint64_t[::1] clear       # KVM_CLEAR_DIRTY_LOG buffer, all zero between restores
    cdef readonly int64_t wholesale  # pages in the working set
    # What the last restore did besides copying and dropping (see restore()):
    cdef readonly int64_t last_unchanged, last_protected, last_promoted, last_demoted

    def __init__(self, uint64_t npages):
        cdef Py_ssize_t nwords = (npages + 63) // 64
        import array as _array
        self.bits = _array.array("Q", bytes(8 * nwords))
        self.words = _array.array("I", bytes(4 * nwords))
        self.nwords_used = 0
        self.npages = npages
        self.fetch = 0
        self.tracked = 0
        self.vm_fd = -1
        self.wholesale = 0
        self.last_unchanged = self.last_protected = self.last_promoted = self.last_demoted = 0

    cdef inline void _add(self, uint64_t page) noexcept:
        cdef uint64_t w = page >> 6
        if self.bits[w] == 0:
            self.words[self.nwords_used] = <uint32_t>w
            self.nwords_used += 1
        self.bits[w] |= (<uint64_t>1) << (page & 63)

    @property
    def empty(self):
        return self.nwords_used == 0

    @property
    def tracking(self):
        """True once :meth:`track` was called: restores clear dirty bits and keep a working set."""
        return self.tracked != 0

    def track(self, int vm_fd, uint32_t slot_id, uint64_t slot_pages):
        """Take over write-protection of KVM slot ``slot_id`` (pages ``[0, slot_pages)`` of the area).

        The VM must have KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled: KVM_GET_DIRTY_LOG
        then leaves bits set, and :meth:`restore` clears (KVM_CLEAR_DIRTY_LOG) the
        bits of the pages it restored, except those of the working set.
        """
        cdef Py_ssize_t nwords = (slot_pages + 63) // 64
        if slot_pages == 0 or slot_pages > self.npages:
            raise ValueError("tracked slot must be inside the area")
        import array as _array
        self.ws = _array.array("Q", bytes(8 * nwords))
        self.streak = _array.array("Q", bytes(8 * nwords))
        self.clear = _array.array("Q", bytes(8 * nwords))
        self.streak_words = _array.array("I", bytes(4 * nwords))
        self.age = bytearray(slot_pages)
        self.nstreak_words = 0
        self.wholesale = 0
        self.vm_fd = vm_fd
        self.slot_id = slot_id
        self.tracked = slot_pages

    def reset_working_set(self):
        """Forget the working set and every page's history (e.g. after the area changed snapshot).

        Safe at any time: former wholesale pages keep their dirty bits in KVM,
        so the next :meth:`restore` restores them (from the runs it is given then)
        and write-protects them again.
        """
        if not self.tracked:
            return
        self.ws[:] = 0
        self.streak[:] = 0
        self.age[:] = 0
        self.nstreak_words = 0
        self.wholesale = 0

    def working_set(self):
        """The wholesale pages, ascending."""
        out = []
        cdef Py_ssize_t w
        cdef uint64_t word
        if self.tracked:
            for w in range(self.ws.shape[0]):
                word = self.ws[w]
                while word:
                    out.append(w * 64 + __builtin_ctzll(word))
                    word &= word - 1
        return out

    def add_range(self, uint64_t first, uint64_t count):
        """Add pages ``[first, first+count)``."""
        cdef uint64_t p
        if first + count > self.npages:
            raise ValueError("page range outside the area")
        for p in range(first, first + count):
            self._add(p)

    def add_bitmap(self, const uint64_t[:] bitmap):
        """Add the pages set in a KVM dirty bitmap (its first words cover this area's first pages)."""
        cdef Py_ssize_t w, n = min(bitmap.shape[0], self.bits.shape[0])
        for w in range(n):
            if bitmap[w]:
                if self.bits[w] == 0:
                    self.words[self.nwords_used] = <uint32_t>w
                    self.nwords_used += 1
                self.bits[w] |= bitmap[w]

    def harvest_ring(self, int vm_fd, uintptr_t ring, uint32_t entries, uint32_t slot_id):
        """Collect the dirty-ring entries KVM published for memory slot ``slot_id``.

        Each harvested entry is marked for reset; KVM_RESET_DIRTY_RINGS then
        write-protects those pages again, so the guest's next write to them is
        logged. ``entries`` is a power of two; ``ring`` is the vCPU's mapped
        ring (``entries`` struct kvm_dirty_gfn), which KVM writes and this reads: every
        index is masked into it, every page checked against the area.
        Returns the number of entries harvested.
        """
        cdef volatile kvm_dirty_gfn *e
        cdef uint32_t harvested = 0
        cdef uint64_t page
        while True:
            e = <volatile kvm_dirty_gfn *>(ring + (self.fetch & (entries - 1)) * sizeof(kvm_dirty_gfn))
            if not (e.flags & kvm.KVM_DIRTY_GFN_F_DIRTY):
                break
            __sync_synchronize()  # read the entry only after seeing its DIRTY flag
            page = e.offset
            # slot is (address space << 16) | slot id; <linux/kvm.h> has no macro for the split.
            if (e.slot & 0xFFFF) == slot_id and page < self.npages:
                self._add(page)
            __sync_synchronize()
            e.flags = kvm.KVM_DIRTY_GFN_F_RESET
            self.fetch += 1
            harvested += 1
        if harvested and ioctl(vm_fd, kvm.KVM_RESET_DIRTY_RINGS, 0) < 0:
            raise _oserror("KVM_RESET_DIRTY_RINGS")
        return harvested

    def pages(self):
        """The pages in the set, ascending."""
        out = []
        cdef Py_ssize_t i
        cdef uint64_t word, w
        for w in sorted(self.words[i] for i in range(self.nwords_used)):
            word = self.bits[w]
            while word:
                out.append(w * 64 + __builtin_ctzll(word))
                word &= word - 1
        return out

    def restore(self, uintptr_t host_base,
                const uint64_t[:] run_first, const uint64_t[:] run_count, const uint64_t[:] run_source,
                uint8_t[:] resident, int64_t resident_count, int64_t keep_resident, uint64_t always_copy_from,
                int64_t max_wholesale=0, int promote_after=2, int demote_after=16):
        """Put every page in the set back to its snapshot contents, then empty the set.

        Mechanism: page ``i`` of the area lives at ``host_base + i*4096``. The
        snapshot's runs (sorted, covering the area) say where its pristine bytes
        are: ``run_source[r]`` is the host address of the run's first page in a
        read-only view of the backing file, or 0 for zero pages.

        Policy: a page is copied back (and stays resident, so the guest's next
        touch costs no page fault) if it is already resident or fewer than
        ``keep_resident`` pages are; otherwise it is dropped with MADV_DONTNEED
        (memory returned; the next touch faults the page in again). Pages from
        ``always_copy_from`` on (the hot slot, written by every call) are always
        copied, outside the budget.

        Working set (after :meth:`track` only). The set must hold every page
        whose KVM dirty bit is set (the caller adds the bitmap KVM_GET_DIRTY_LOG
        returned just before). A resident page copied back in ``promote_after``
        restores in a row joins the working set (at most ``max_wholesale`` pages);
        a wholesale page is compared with its snapshot bytes and copied back only
        if it differs, and leaves the set after ``demote_after`` restores in a row
        that found it unchanged. Finally the bits of every restored page outside
        the working set are cleared with one KVM_CLEAR_DIRTY_LOG (which
        write-protects those pages again); wholesale pages stay writable and
        their bits stay set, so the next restore visits them again. Hence no
        write survives a restore: a write sets the page's bit (or finds it set),
        a set bit means the page is restored, and a bit is cleared only here,
        right after its page was restored.

        Safe because every page in the set is below ``npages`` (checked when
        added), the area's host mapping spans ``npages`` pages, and every source
        page lies inside a view of the file its run was built from.

        Returns (copied, dropped, resident_count); sets ``last_unchanged``
        (wholesale pages that needed no copy), ``last_protected`` (pages
        write-protected again), ``last_promoted`` and ``last_demoted``.
        """
        cdef Py_ssize_t i, lo, hi, mid, r, nruns = run_first.shape[0]
        cdef Py_ssize_t minw = -1, maxw = -1
        cdef uint64_t w, word, orig, bit, page, src, mask, gone
        cdef int64_t copied = 0, dropped = 0, unchanged = 0, protected = 0, promoted = 0, demoted = 0
        cdef uintptr_t dst
        cdef int a
        cdef bint tracking = self.tracked != 0
        cdef kvm_clear_dirty_log cl
        if resident.shape[0] < <Py_ssize_t>self.npages:
            raise ValueError("resident map smaller than the area")
        if promote_after < 1 or promote_after > 255 or demote_after < 1 or demote_after > 255:
            raise ValueError("promote_after and demote_after must be in [1, 255]")
        if tracking:
            # Pages dirty in the previous restore but not in this one: their streak ends.
            for i in range(self.nstreak_words):
                w = self.streak_words[i]
                gone = self.streak[w] & ~self.bits[w]
                self.streak[w] = 0
                while gone:
                    self.age[w * 64 + __builtin_ctzll(gone)] = 0
                    gone &= gone - 1
            self.nstreak_words = 0
        for i in range(self.nwords_used):
            w = self.words[i]
            word = self.bits[w]
            orig = word
            self.bits[w] = 0
            while word:
                page = w * 64 + __builtin_ctzll(word)
                bit = word & (~word + 1)
                word &= word - 1
                lo, hi = 0, nruns  # binary search: the run holding this page
                while lo < hi:
                    mid = (lo + hi) // 2
                    if run_first[mid] + run_count[mid] <= page:
                        lo = mid + 1
                    else:
                        hi = mid
                r = lo
                if r == nruns or run_first[r] > page:
                    for lo in range(i, self.nwords_used):  # leave the set empty and consistent
                        self.bits[self.words[lo]] = 0
                    self.nwords_used = 0
                    raise ValueError("dirty page %d is not covered by the snapshot" % page)
                dst = host_base + (<uintptr_t>page << PAGE_SHIFT)
                src = run_source[r]
                if src:
                    src += (page - run_first[r]) << PAGE_SHIFT
                else:
                    src = <uintptr_t>_zero_page
                if tracking and page < self.tracked and (self.ws[w] & bit):
                    # Wholesale: writable since its last restore, whatever the guest did.
                    if memcmp(<const void *>dst, <const void *>src, PAGE) == 0:
                        unchanged += 1
                        a = self.age[page] + 1
                        if a >= demote_after:  # unused lately: back to write-protection (cleared below)
                            self.ws[w] &= ~bit
                            self.wholesale -= 1
                            self.age[page] = 0
                            demoted += 1
                        else:
                            self.age[page] = <uint8_t>a
                    else:
                        memcpy(<void *>dst, <const void *>src, PAGE)
                        self.age[page] = 0
                        copied += 1
                elif resident[page] or resident_count < keep_resident or page >= always_copy_from:
                    memcpy(<void *>dst, <const void *>src, PAGE)
                    if not resident[page]:
                        resident[page] = 1
                        resident_count += 1
                    copied += 1
                    if tracking and page < self.tracked:
                        a = self.age[page] + 1
                        if a >= promote_after and self.wholesale < max_wholesale:
                            self.ws[w] |= bit
                            self.wholesale += 1
                            self.age[page] = 0
                            promoted += 1
                        else:
                            self.age[page] = <uint8_t>(a if a < 255 else 255)
                            if self.streak[w] == 0:
                                self.streak_words[self.nstreak_words] = <uint32_t>w
                                self.nstreak_words += 1
                            self.streak[w] |= bit
                else:
                    madvise(<void *>dst, PAGE, MADV_DONTNEED)
                    dropped += 1
                    if tracking and page < self.tracked:
                        self.age[page] = 0
            if tracking and w * 64 < self.tracked:
                mask = orig & ~self.ws[w]
                if (w + 1) * 64 > self.tracked:  # the word also holds pages past the slot
                    mask &= ((<uint64_t>1) << (self.tracked - w * 64)) - 1
                if mask:
                    self.clear[w] = mask
                    protected += __builtin_popcountll(mask)
                    if minw < 0 or <Py_ssize_t>w < minw:
                        minw = w
                    if <Py_ssize_t>w > maxw:
                        maxw = w
        self.nwords_used = 0
        self.last_unchanged, self.last_protected = unchanged, protected
        self.last_promoted, self.last_demoted = promoted, demoted
        if maxw >= 0:
            memset(&cl, 0, sizeof(cl))
            cl.slot = self.slot_id
            cl.first_page = <uint64_t>minw * 64
            cl.num_pages = <uint32_t>min(<uint64_t>(maxw - minw + 1) * 64, self.tracked - cl.first_page)
            cl.dirty_bitmap = &self.clear[minw]
            a = ioctl(self.vm_fd, kvm.KVM_CLEAR_DIRTY_LOG, &cl)
            memset(&self.clear[minw], 0, (maxw - minw + 1) * sizeof(uint64_t))
            if a != 0:
                raise _oserror("KVM_CLEAR_DIRTY_LOG")
        return copied, dropped, resident_count
