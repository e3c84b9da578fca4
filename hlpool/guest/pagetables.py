"""Pure-Python reference for the guest page-table builder.

:func:`build_page_tables` here is the *reference* implementation of
``hlpool._mapping.build_page_tables`` (Cython). The test suite checks the
Cython builder against it byte for byte; hlpool itself always uses the Cython
version. Both follow the same algorithm:

1. Sort the ``(address, size, perms)`` mappings, reject unaligned or
   overlapping ones and join neighbours with equal permissions.
2. Walk each merged range from low to high. For every address, the PDPT and
   the page directory are found or allocated; a 2 MiB page is used when the
   address is 2 MiB-aligned and at least 2 MiB of the range remain, otherwise
   a page table is found or allocated and a 4 KiB page is written.

Tables are allocated in that order, one 4 KiB page each, right after the PML4
(which is the first page, so CR3 = ``base``). Every entry has U/S set (PVM
needs it at every level) and Accessed preset; leaves also have Dirty preset,
so the CPU never writes the tables. Read permission is implied; ``MAP_WRITE``
sets R/W and the absence of ``MAP_EXEC`` sets NX.

:func:`walk` translates a virtual address through finished tables, the way the
CPU would, so tests can check what a guest actually sees.

Differences from the Cython builder, outside its contract: this version also
rejects a ``base`` that is not page aligned or whose tables would not fit in
52-bit physical addresses, and negative or non-integer addresses and sizes,
with :class:`ValueError` (the Cython builder silently produces wrong tables
or raises ``OverflowError``/``TypeError`` there).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

PAGE_SIZE = 4096
LARGE_PAGE_SIZE = 2 * 1024 * 1024
PAGE_SHIFT = 12

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_USER = 1 << 2
PTE_ACCESSED = 1 << 5
PTE_DIRTY = 1 << 6
PTE_LARGE = 1 << 7
PTE_NX = 1 << 63
ADDRESS_MASK = 0x000FFFFFFFFFF000

MAP_WRITE = 1
MAP_EXEC = 2

LOWER_HALF_BITS = 47
PHYSICAL_BITS = 52

_ENTRY = struct.Struct("<Q")
_TABLE_FLAGS = PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_ACCESSED


def leaf_flags(perms: int) -> int:
    """The flag bits of a leaf entry for ``perms`` (MAP_WRITE | MAP_EXEC; read is implied)."""
    flags = PTE_PRESENT | PTE_USER | PTE_ACCESSED | PTE_DIRTY
    if perms & MAP_WRITE:
        flags |= PTE_WRITE
    if not perms & MAP_EXEC:
        flags |= PTE_NX
    return flags


def merge_mappings(mappings: Iterable[Sequence[int]]) -> list[list[int]]:
    """Sort mappings and join neighbours with equal permissions.

    Raises ValueError for a mapping that is not page aligned, empty, negative
    or overlapping another one. The checks run in sorted order, like the
    Cython builder's ``_merge``.
    """
    out: list[list[int]] = []
    for start, length, perms in sorted(tuple(m) for m in mappings):
        if not all(isinstance(v, int) for v in (start, length, perms)):
            raise ValueError("mapping %r has non-integer fields" % ((start, length, perms),))
        if start % PAGE_SIZE or length % PAGE_SIZE or length == 0:
            raise ValueError("mapping %#x+%#x is not page aligned" % (start, length))
        if start < 0 or length < 0:
            raise ValueError("mapping %#x+%#x is negative" % (start, length))
        if out:
            last = out[-1]
            if last[0] + last[1] > start:
                raise ValueError("mappings overlap at %#x" % start)
            if last[0] + last[1] == start and last[2] == perms:
                last[1] += length
                continue
        out.append([start, length, perms])
    return out


class _Tables:
    """Page-table pages being built, allocated in order after the PML4."""

    def __init__(self, base: int, max_pages: int) -> None:
        self.data = bytearray(PAGE_SIZE)
        self.base = base
        self.max_pages = max_pages
        self.used = 1  # the PML4

    def new_table(self) -> int:
        if self.used >= self.max_pages:
            raise ValueError("page tables need more than %d pages" % self.max_pages)
        self.data.extend(bytes(PAGE_SIZE))
        self.used += 1
        return self.used - 1

    def get(self, table: int, index: int) -> int:
        return _ENTRY.unpack_from(self.data, table * PAGE_SIZE + index * 8)[0]

    def set(self, table: int, index: int, value: int) -> None:
        _ENTRY.pack_into(self.data, table * PAGE_SIZE + index * 8, value)

    def child(self, table: int, index: int) -> int:
        """The table that entry ``index`` of ``table`` points to, allocated if absent."""
        entry = self.get(table, index)
        if entry & PTE_PRESENT:
            if entry & PTE_LARGE:
                raise ValueError("overlapping mappings in page tables")
            return ((entry & ADDRESS_MASK) - self.base) >> PAGE_SHIFT
        new = self.new_table()
        self.set(table, index, (self.base + (new << PAGE_SHIFT)) | _TABLE_FLAGS)
        return new


def build_page_tables(mappings: Iterable[Sequence[int]], base: int, max_pages: int = 4096) -> bytes:
    """Build identity-mapped 4-level page tables (reference for the Cython builder).

    ``mappings``: ``(address, size, perms)`` tuples, page-aligned,
    non-overlapping, ``perms`` a combination of MAP_WRITE and MAP_EXEC (read
    is implied). 2 MiB pages are used wherever a 2 MiB-aligned range is fully
    mapped with one set of permissions; unlisted ranges stay unmapped.

    Returns the tables as bytes, to be placed at guest-physical ``base`` (the
    PML4 is the first page, so CR3 = base). Raises ValueError for unaligned,
    overlapping or negative mappings, addresses at or beyond 2**47, tables
    needing more than ``max_pages`` pages, or an unusable ``base``.
    """
    if not isinstance(base, int) or base < 0 or base % PAGE_SIZE:
        raise ValueError("page-table base %r is not a page-aligned address" % (base,))
    if base + max(max_pages, 1) * PAGE_SIZE > 1 << PHYSICAL_BITS:
        raise ValueError("page tables at %#x do not fit in %d-bit physical addresses" % (base, PHYSICAL_BITS))
    tables = _Tables(base, max_pages)
    for start, length, perms in merge_mappings(mappings):
        addr = start
        end = start + length
        while addr < end:
            if addr >> LOWER_HALF_BITS:
                raise ValueError("address %#x beyond the 47-bit lower half" % addr)
            pdpt = tables.child(0, (addr >> 39) & 511)
            pd = tables.child(pdpt, (addr >> 30) & 511)
            if addr % LARGE_PAGE_SIZE == 0 and end - addr >= LARGE_PAGE_SIZE:
                tables.set(pd, (addr >> 21) & 511, addr | leaf_flags(perms) | PTE_LARGE)
                addr += LARGE_PAGE_SIZE
                continue
            pt = tables.child(pd, (addr >> 21) & 511)
            tables.set(pt, (addr >> 12) & 511, addr | leaf_flags(perms))
            addr += PAGE_SIZE
    return bytes(tables.data)


def walk(tables: bytes, base: int, address: int) -> tuple[int, bool, bool] | None:
    """Translate guest-virtual ``address`` through ``tables`` placed at physical ``base``.

    Returns ``(physical address, writable, executable)`` or None if the address
    is not mapped (including any address in or beyond the non-canonical hole).
    Writable and executable combine every level, as the CPU does (R/W must be
    set and NX clear at all four levels). 1 GiB and 2 MiB pages are followed.
    Raises ValueError if an entry points to a table outside ``tables``.
    """
    if address < 0 or address >> 64:
        raise ValueError("address %r is not a 64-bit value" % (address,))
    if address >> LOWER_HALF_BITS:
        return None
    table = 0
    writable = True
    executable = True
    for shift in (39, 30, 21, 12):
        pos = table + ((address >> shift) & 511) * 8
        if pos + 8 > len(tables):
            raise ValueError("page table at offset %#x lies outside the tables" % table)
        entry = _ENTRY.unpack_from(tables, pos)[0]
        if not entry & PTE_PRESENT:
            return None
        writable = writable and bool(entry & PTE_WRITE)
        executable = executable and not entry & PTE_NX
        frame = entry & ADDRESS_MASK
        if shift == PAGE_SHIFT or (shift in (30, 21) and entry & PTE_LARGE):
            size = 1 << shift
            return (frame & ~(size - 1)) | (address & (size - 1)), writable, executable
        table = frame - base
        if table < 0 or table + PAGE_SIZE > len(tables):
            raise ValueError("entry %#x points outside the tables" % entry)
    raise AssertionError("unreachable")  # the loop always returns at the 4 KiB level
