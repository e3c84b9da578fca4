"""The guest page-table builder (Cython) against the pure-Python reference, and what the tables map.

No KVM needed: the tables are only bytes, walked here the way the CPU would.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hlpool import _mapping
from hlpool.guest import boot, pagetables
from hlpool.guest.layout import (
    BOOT_INFO,
    FILES_TABLE,
    GDT_PAGE,
    GIB,
    IMAGE_BASE,
    KIB,
    MIB,
    PAGE_TABLES,
    VIF_PAGE,
    Layout,
    MemoryConfig,
)
from hlpool.guest.pagetables import (
    ADDRESS_MASK,
    LARGE_PAGE_SIZE,
    MAP_EXEC,
    MAP_WRITE,
    PAGE_SIZE,
    PTE_ACCESSED,
    PTE_DIRTY,
    PTE_LARGE,
    PTE_NX,
    PTE_PRESENT,
    PTE_USER,
    PTE_WRITE,
    walk,
)

PAGE = PAGE_SIZE
LARGE = LARGE_PAGE_SIZE
TOP = 1 << 47
RW, RX, RO, RWX = MAP_WRITE, MAP_EXEC, 0, MAP_WRITE | MAP_EXEC
TABLE_FLAGS = PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_ACCESSED
BASES = [PAGE_TABLES, 0, 0x100000, 4 * GIB + 0x3000]


# ---- helpers ---------------------------------------------------------------------------


def build_both(mappings: list, base: int = PAGE_TABLES, max_pages: int = 4096) -> bytes:
    """Build with the Cython builder and the reference; assert they agree byte for byte."""
    fast = _mapping.build_page_tables(list(mappings), base, max_pages)
    slow = pagetables.build_page_tables(list(mappings), base, max_pages)
    assert fast == slow
    assert len(fast) % PAGE == 0
    return fast


def merged(mappings: list) -> list[tuple[int, int, int]]:
    """Sorted mappings with equal-permission neighbours joined (written independently of the builders)."""
    out: list[list[int]] = []
    for start, size, perms in sorted(mappings):
        if out and out[-1][0] + out[-1][1] == start and out[-1][2] == perms:
            out[-1][1] += size
        else:
            out.append([start, size, perms])
    return [tuple(m) for m in out]  # type: ignore[misc]


def iter_entries(tables: bytes, base: int):
    """Yield (level, virtual address, entry) for every present entry (level 4 = PML4 ... 1 = PT)."""

    def visit(offset: int, level: int, va_base: int):
        assert 0 <= offset and offset + PAGE <= len(tables) and offset % PAGE == 0
        for index, entry in enumerate(struct.unpack_from("<512Q", tables, offset)):
            if not entry & PTE_PRESENT:
                continue
            va = va_base | (index << (12 + 9 * (level - 1)))
            yield level, va, entry
            if level > 1 and not entry & PTE_LARGE:
                yield from visit((entry & ADDRESS_MASK) - base, level - 1, va)

    yield from visit(0, 4, 0)


def leaves(tables: bytes, base: int) -> list[tuple[int, int, int]]:
    """(virtual address, size, entry) of every leaf, in address order."""
    out = []
    for level, va, entry in iter_entries(tables, base):
        if level == 1:
            out.append((va, PAGE, entry))
        elif entry & PTE_LARGE:
            assert level == 2, "only 2 MiB large pages are expected"
            out.append((va, LARGE, entry))
    return out


def perms_of(writable: bool, executable: bool) -> int:
    return (MAP_WRITE if writable else 0) | (MAP_EXEC if executable else 0)


def check_tables(mappings: list, tables: bytes, base: int, walk_every_page: bool = True) -> None:
    """Everything a set of tables must satisfy for ``mappings`` (see the module docstring)."""
    expected = merged(mappings)
    # Flags on every entry: U/S and Accessed everywhere, tables are P|W|U|A, leaves exact.
    for level, va, entry in iter_entries(tables, base):
        assert entry & PTE_USER, f"U/S clear at level {level} for {va:#x}"
        assert entry & PTE_ACCESSED, f"Accessed clear at level {level} for {va:#x}"
        if level > 1 and not entry & PTE_LARGE:
            assert entry & ~ADDRESS_MASK == TABLE_FLAGS
            child = (entry & ADDRESS_MASK) - base
            assert 0 < child < len(tables) and child % PAGE == 0
    # Leaves: identity, exact flags, exactly covering the mappings, 2 MiB where possible.
    found = leaves(tables, base)
    covered: list[list[int]] = []
    for va, size, entry in found:
        assert entry & PTE_DIRTY, f"Dirty clear on leaf {va:#x}"
        containing = [m for m in expected if m[0] <= va and va + size <= m[0] + m[1]]
        assert len(containing) == 1, f"leaf {va:#x}+{size:#x} is not inside one mapping"
        perms = containing[0][2]
        want = va | pagetables.leaf_flags(perms) | (PTE_LARGE if size == LARGE else 0)
        assert entry == want, f"leaf {va:#x}: {entry:#x} != {want:#x}"
        if covered and covered[-1][1] == va:
            covered[-1][1] = va + size
        else:
            covered.append([va, va + size])
    want_cover: list[list[int]] = []
    for start, size, _p in expected:
        if want_cover and want_cover[-1][1] == start:
            want_cover[-1][1] = start + size
        else:
            want_cover.append([start, start + size])
    assert covered == want_cover
    # A 2 MiB block fully inside one merged mapping is one large page; any other block is 4 KiB pages.
    large = {va for va, size, _e in found if size == LARGE}
    for start, size, _p in expected:
        block = start - start % LARGE
        while block < start + size:
            inside = start <= block and block + LARGE <= start + size
            assert (block in large) == inside, f"2 MiB block {block:#x}: large={block in large}, expected {inside}"
            block += LARGE
    # The CPU's view, through walk().
    for start, size, perms in expected:
        pages = range(start, start + size, PAGE)
        if not walk_every_page and len(pages) > 64:
            pages = [*pages[:16], *pages[-16:], *pages[::97]]
        for addr in pages:
            got = walk(tables, base, addr + 0x123)
            assert got == (addr + 0x123, bool(perms & MAP_WRITE), bool(perms & MAP_EXEC)), hex(addr)
        for neighbour in (start - PAGE, start + size):
            if 0 <= neighbour < TOP and not any(m[0] <= neighbour < m[0] + m[1] for m in expected):
                assert walk(tables, base, neighbour) is None, f"{neighbour:#x} should be unmapped"
    if not any(m[0] == 0 for m in expected):
        assert walk(tables, base, 0) is None


# ---- reference module ----------------------------------------------------------------


def test_constants_match_cython():
    for name in ("PTE_PRESENT", "PTE_WRITE", "PTE_USER", "PTE_ACCESSED", "PTE_DIRTY", "PTE_LARGE", "PTE_NX",
                 "MAP_WRITE", "MAP_EXEC", "PAGE_SIZE", "LARGE_PAGE_SIZE"):
        assert getattr(pagetables, name) == getattr(_mapping, name), name
    assert (PTE_USER, PTE_ACCESSED, PTE_DIRTY) == (1 << 2, 1 << 5, 1 << 6)


def test_leaf_flags():
    assert pagetables.leaf_flags(RO) == PTE_PRESENT | PTE_USER | PTE_ACCESSED | PTE_DIRTY | PTE_NX
    assert pagetables.leaf_flags(RW) == PTE_PRESENT | PTE_USER | PTE_ACCESSED | PTE_DIRTY | PTE_WRITE | PTE_NX
    assert pagetables.leaf_flags(RX) == PTE_PRESENT | PTE_USER | PTE_ACCESSED | PTE_DIRTY
    assert pagetables.leaf_flags(RWX) == PTE_PRESENT | PTE_USER | PTE_ACCESSED | PTE_DIRTY | PTE_WRITE


# ---- fixed inputs -----------------------------------------------------------------------

FIXED_CASES = {
    "empty": [],
    "one page": [(0x1000, PAGE, RO)],
    "page zero": [(0, PAGE, RW)],
    "one large page": [(LARGE, LARGE, RX)],
    "large, not aligned": [(LARGE + PAGE, LARGE, RW)],
    "large minus a page": [(LARGE, LARGE - PAGE, RW)],
    "three large pages and a tail": [(4 * LARGE, 3 * LARGE + 5 * PAGE, RO)],
    "neighbours merge into a large page": [(LARGE, MIB, RW), (LARGE + MIB, MIB, RW)],
    "neighbours with different perms": [(LARGE, MIB, RW), (LARGE + MIB, MIB, RO)],
    "every permission": [(0x10000, PAGE, RO), (0x11000, PAGE, RW), (0x12000, PAGE, RX), (0x13000, PAGE, RWX)],
    "guard pages": [(0x200000, 0x9000, RX), (0x20A000, 0x4000, RW), (0x20F000, 0x1000, RW)],
    "unsorted input": [(8 * LARGE, PAGE, RW), (0x3000, PAGE, RO), (LARGE, LARGE, RX)],
    "above 4 GiB": [(4 * GIB, LARGE, RO), (5 * GIB + PAGE, 3 * PAGE, RW)],
    "across a 1 GiB boundary": [(GIB - 2 * PAGE, 4 * PAGE, RW), (2 * GIB - LARGE, 2 * LARGE, RO)],
    "across a 512 GiB boundary": [(512 * GIB - PAGE, 2 * PAGE, RW)],
    "up to the top of the lower half": [(TOP - LARGE - PAGE, LARGE + PAGE, RO)],
    "4 GiB window": [(GIB, 4 * GIB, RO)],
}


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("name", sorted(FIXED_CASES))
def test_fixed_inputs(name, base):
    mappings = FIXED_CASES[name]
    tables = build_both(mappings, base)
    check_tables(mappings, tables, base, walk_every_page=False)


def test_table_counts_and_allocation_order():
    assert len(build_both([])) == PAGE
    assert build_both([]) == bytes(PAGE)
    assert len(build_both([(0x1000, PAGE, RO)])) == 4 * PAGE  # PML4, PDPT, PD, PT
    assert len(build_both([(LARGE, 2 * LARGE, RW)])) == 3 * PAGE  # no PT needed
    # PML4 -> PDPT is table 1, PDPT -> PD table 2, PD -> PT table 3.
    tables = build_both([(0x1000, PAGE, RO)], PAGE_TABLES)
    for table, child in ((0, 1), (1, 2), (2, 3)):
        assert struct.unpack_from("<Q", tables, table * PAGE)[0] == (PAGE_TABLES + child * PAGE) | TABLE_FLAGS
    assert struct.unpack_from("<Q", tables, 3 * PAGE + 8)[0] == 0x1000 | pagetables.leaf_flags(RO)


def test_large_pages_used_for_uniform_aligned_ranges():
    tables = build_both([(LARGE, 2 * LARGE, RW)])
    pd = struct.unpack_from("<512Q", tables, 2 * PAGE)
    assert pd[1] == LARGE | pagetables.leaf_flags(RW) | PTE_LARGE
    assert pd[2] == 2 * LARGE | pagetables.leaf_flags(RW) | PTE_LARGE
    # Same block split into two permissions: 4 KiB pages.
    tables = build_both([(LARGE, MIB, RW), (LARGE + MIB, MIB, RX)])
    assert [size for _va, size, _e in leaves(tables, PAGE_TABLES)] == [PAGE] * 512
    # One missing page: 4 KiB pages.
    tables = build_both([(LARGE, LARGE - PAGE, RW)])
    assert [size for _va, size, _e in leaves(tables, PAGE_TABLES)] == [PAGE] * 511
    assert walk(tables, PAGE_TABLES, 2 * LARGE - PAGE) is None


def test_exact_max_pages():
    mappings = [(0x1000, PAGE, RO), (GIB, PAGE, RW), (600 * GIB, LARGE, RO)]
    needed = len(build_both(mappings)) // PAGE
    assert needed == 1 + 3 + 2 + 1 + 1  # PML4; PDPT+PD+PT; PD+PT; PDPT+PD
    build_both(mappings, max_pages=needed)
    for builder in (_mapping.build_page_tables, pagetables.build_page_tables):
        with pytest.raises(ValueError, match="more than"):
            builder(list(mappings), PAGE_TABLES, needed - 1)


# ---- errors ----------------------------------------------------------------------------

ERROR_CASES = {
    "unaligned start": [(0x1001, PAGE, RO)],
    "unaligned size": [(0x1000, PAGE + 1, RO)],
    "zero size": [(0x1000, 0, RO)],
    "overlap": [(0x1000, 2 * PAGE, RO), (0x2000, PAGE, RO)],
    "overlap, same start": [(0x1000, PAGE, RO), (0x1000, PAGE, RW)],
    "duplicate": [(0x1000, PAGE, RO), (0x1000, PAGE, RO)],
    "containment": [(LARGE, 4 * LARGE, RW), (2 * LARGE, PAGE, RW)],
    "overlap, unsorted": [(0x5000, PAGE, RO), (0x1000, 0x8000, RW)],
    "starts at 2**47": [(TOP, PAGE, RO)],
    "crosses 2**47": [(TOP - PAGE, 2 * PAGE, RO)],
    "far beyond 2**47": [(1 << 52, LARGE, RW)],
    "unaligned after valid ones": [(0x1000, PAGE, RO), (0x3000, 0x800, RO)],
}


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_errors(name):
    for builder in (_mapping.build_page_tables, pagetables.build_page_tables):
        with pytest.raises(ValueError):
            builder(list(ERROR_CASES[name]), PAGE_TABLES)


def test_error_messages():
    for builder in (_mapping.build_page_tables, pagetables.build_page_tables):
        with pytest.raises(ValueError, match="not page aligned"):
            builder([(0x1001, PAGE, RO)], PAGE_TABLES)
        with pytest.raises(ValueError, match="overlap"):
            builder([(0x1000, 2 * PAGE, RO), (0x2000, PAGE, RO)], PAGE_TABLES)
        with pytest.raises(ValueError, match="47-bit"):
            builder([(TOP, PAGE, RO)], PAGE_TABLES)
        with pytest.raises(ValueError, match="more than 3 pages"):
            builder([(0x1000, PAGE, RO)], PAGE_TABLES, 3)
        with pytest.raises(ValueError, match="more than 1 pages"):
            builder([(LARGE, LARGE, RO)], PAGE_TABLES, 1)


def test_reference_rejects_bad_base_and_negative_mappings():
    with pytest.raises(ValueError):
        pagetables.build_page_tables([], 0x5001)
    with pytest.raises(ValueError):
        pagetables.build_page_tables([], -PAGE)
    with pytest.raises(ValueError):
        pagetables.build_page_tables([], (1 << 52) - PAGE)
    with pytest.raises(ValueError):
        pagetables.build_page_tables([(-PAGE, PAGE, RO)], PAGE_TABLES)
    with pytest.raises(ValueError):
        pagetables.build_page_tables([(0x1000, -PAGE, RO)], PAGE_TABLES)


def test_walk_edge_cases():
    tables = build_both([(0x1000, PAGE, RW)])
    assert walk(tables, PAGE_TABLES, 0x1FFF) == (0x1FFF, True, False)
    assert walk(tables, PAGE_TABLES, 0x2000) is None
    assert walk(tables, PAGE_TABLES, TOP) is None  # non-canonical hole
    assert walk(tables, PAGE_TABLES, (1 << 64) - PAGE) is None  # upper half: nothing is mapped there
    with pytest.raises(ValueError):
        walk(tables, PAGE_TABLES, -1)
    with pytest.raises(ValueError):
        walk(tables, 0x7000, 0x1000)  # wrong base: entries point outside the buffer
    # A table entry without R/W or with NX restricts everything below it.
    patched = bytearray(tables)
    struct.pack_into("<Q", patched, 0, struct.unpack_from("<Q", tables, 0)[0] & ~PTE_WRITE | PTE_NX)
    assert walk(bytes(patched), PAGE_TABLES, 0x1000) == (0x1000, False, False)


# ---- randomized -------------------------------------------------------------------------

START_POINTS = [0, PAGE, LARGE, GIB - LARGE - 3 * PAGE, 4 * GIB, 4 * GIB + 3 * PAGE, 512 * GIB - LARGE,
                300 * GIB + 7 * PAGE, TOP - 40 * LARGE]


@st.composite
def mapping_lists(draw) -> list[tuple[int, int, int]]:
    """Page-aligned, non-overlapping mappings with random permissions, in random order.

    Chunks are laid out upwards from a start point (some above 4 GiB, one near
    2**47), separated by random gaps (often none, so equal-permission neighbours
    merge). Some chunks start 2 MiB-aligned and span whole 2 MiB blocks, some
    are just over 2 MiB but unaligned, some jump to the next 1 GiB boundary.
    """
    addr = draw(st.sampled_from(START_POINTS))
    mappings = []
    for _ in range(draw(st.integers(0, 6))):
        addr += draw(st.sampled_from([0, 0, 0, 1, 2, 511])) * PAGE
        kind = draw(st.sampled_from(["small", "small", "aligned", "unaligned", "jump"]))
        if kind == "aligned":
            addr = -(-addr // LARGE) * LARGE
            size = draw(st.integers(1, 2)) * LARGE + draw(st.sampled_from([0, 0, PAGE, 7 * PAGE]))
        elif kind == "unaligned":
            size = draw(st.integers(LARGE // PAGE, LARGE // PAGE + 600)) * PAGE
        elif kind == "jump":
            addr = max(addr, (addr // GIB + 1) * GIB - draw(st.sampled_from([0, PAGE, LARGE])))
            size = draw(st.integers(1, 3)) * PAGE
        else:
            size = draw(st.integers(1, 16)) * PAGE
        if addr + size > TOP:
            break
        mappings.append((addr, size, draw(st.sampled_from([RO, RW, RX, RWX]))))
        addr += size
    return draw(st.permutations(mappings))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mappings=mapping_lists(), base=st.sampled_from(BASES))
def test_random_inputs_match_reference(mappings, base):
    build_both(mappings, base)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mappings=mapping_lists())
def test_random_inputs_map_exactly(mappings):
    tables = build_both(mappings)
    check_tables(mappings, tables, PAGE_TABLES, walk_every_page=True)


@settings(max_examples=60, deadline=None)
@given(mappings=mapping_lists().filter(bool), data=st.data())
def test_random_overlaps_are_rejected(mappings, data):
    start, size, perms = data.draw(st.sampled_from(mappings))
    first = data.draw(st.integers(0, size // PAGE - 1))
    count = data.draw(st.integers(1, size // PAGE - first))
    extra = (start + first * PAGE, count * PAGE, data.draw(st.sampled_from([RO, RW, RX, RWX])))
    where = data.draw(st.integers(0, len(mappings)))
    bad = [*mappings[:where], extra, *mappings[where:]]
    for builder in (_mapping.build_page_tables, pagetables.build_page_tables):
        with pytest.raises(ValueError, match="overlap"):
            builder(list(bad), PAGE_TABLES)


@settings(max_examples=30, deadline=None)
@given(mappings=mapping_lists().filter(bool), max_pages=st.integers(1, 12))
def test_random_max_pages(mappings, max_pages):
    needed = len(_mapping.build_page_tables(list(mappings), PAGE_TABLES)) // PAGE
    if max_pages >= needed:
        build_both(mappings, PAGE_TABLES, max_pages)
    else:
        for builder in (_mapping.build_page_tables, pagetables.build_page_tables):
            with pytest.raises(ValueError, match="more than"):
                builder(list(mappings), PAGE_TABLES, max_pages)


# ---- the real boot layout ---------------------------------------------------------------


def fake_image() -> SimpleNamespace:
    """A GuestImage-like object: text r-x, rodata r--, data+bss rw- (like the echo example)."""
    seg = SimpleNamespace
    return SimpleNamespace(segments=(
        seg(offset=0, size=0x9000, readable=True, writable=False, executable=True),
        seg(offset=0x9000, size=0x2000, readable=True, writable=False, executable=False),
        seg(offset=0xB000, size=0x1B000, readable=True, writable=True, executable=False),
    ))


CONFIGS = {
    "default": MemoryConfig(),
    "small, no files window": MemoryConfig(heap_size=64 * KIB, stack_size=16 * KIB, in_size=4 * KIB,
                                           out_size=4 * KIB, reply_size=4 * KIB, log_size=4 * KIB, files_window=0),
    "odd sizes": MemoryConfig(heap_size=3 * MIB + 5 * KIB, stack_size=2 * MIB, in_size=5 * MIB,
                              files_window=2 * MIB),
}


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_boot_layout_tables(config_name):
    image = fake_image()
    layout = Layout(CONFIGS[config_name], 0x26000)
    mappings = boot.page_table_mappings(layout, image)
    tables = build_both(mappings, PAGE_TABLES, boot.MAX_PAGE_TABLE_PAGES)
    assert PAGE_TABLES + len(tables) <= IMAGE_BASE
    check_tables(mappings, tables, PAGE_TABLES, walk_every_page=False)

    def at(addr: int):
        return walk(tables, PAGE_TABLES, addr)

    def unmapped(addr: int, what: str) -> None:
        assert at(addr) is None, f"{what} at {addr:#x} is mapped"

    def mapped(addr: int, writable: bool, executable: bool, what: str) -> None:
        assert at(addr) == (addr, writable, executable), f"{what} at {addr:#x}: {at(addr)}"

    unmapped(0, "null page")
    unmapped(0xFFF, "null page")
    unmapped(VIF_PAGE, "VIF page")
    for addr in range(PAGE_TABLES, IMAGE_BASE, PAGE):
        unmapped(addr, "page tables / low memory")
    for addr, what in ((BOOT_INFO, "boot info"), (GDT_PAGE, "GDT"), (FILES_TABLE, "files table")):
        mapped(addr, False, False, what)
    # The image, with the ELF segments' permissions.
    mapped(IMAGE_BASE, False, True, "text")
    mapped(IMAGE_BASE + 0x8FFF, False, True, "text")
    mapped(IMAGE_BASE + 0x9000, False, False, "rodata")
    mapped(IMAGE_BASE + 0xB000, True, False, "data")
    mapped(IMAGE_BASE + 0x25FFF, True, False, "bss")
    # Guard pages around every stack and heap.
    assert layout.heap.start == layout.image.end + PAGE
    unmapped(layout.image.end, "guard after the image")
    for area in (layout.heap, layout.stack, layout.exception_stack):
        unmapped(area.start - PAGE, f"guard before {area.name}")
        unmapped(area.start - 1, f"guard before {area.name}")
        mapped(area.start, True, False, area.name)
        mapped(area.end - 8, True, False, area.name)
        if area is not layout.stack:
            unmapped(area.end, f"guard after {area.name}")
    # Above the top of the stack sits the call page (writable), then the read-only io area.
    assert layout.call.start == layout.stack.end
    mapped(layout.call.start, True, False, "call page")
    assert layout.control.start == layout.call.end
    # OUT and LOG are writable; IN and REPLY read-only; nothing past them but the files window.
    for area in (layout.out, layout.log):
        mapped(area.start, True, False, area.name)
        mapped(area.end - 1, True, False, area.name)
    unmapped(layout.log.end, "guard after log")
    for area in (layout.input, layout.reply):
        mapped(area.start, False, False, area.name)
        mapped(area.end - 1, False, False, area.name)
    control = layout.control  # the entry-stub page
    mapped(control.start, False, True, "control page")
    assert layout.input.start == control.end
    if layout.files.start > layout.reply.end:
        unmapped(layout.reply.end, "gap after reply")
        unmapped(layout.files.start - PAGE, "gap before the files window")
    if layout.files.size:
        mapped(layout.files.start, False, False, "files window")
        mapped(layout.files.end - PAGE, False, False, "files window")
    unmapped(layout.files.end, "past the files window")
    # Only the text (and the control page's entry stub) is executable.
    code = [(IMAGE_BASE, IMAGE_BASE + 0x9000), (control.start, control.end)]
    executable = [va for va, _size, entry in leaves(tables, PAGE_TABLES) if not entry & PTE_NX]
    assert executable and all(any(lo <= va < hi for lo, hi in code) for va in executable)


def test_boot_layout_with_a_real_image():
    from hlpool.guest.elf import load_guest_image
    from hlpool.guest.examples import example_path

    image = load_guest_image(example_path("echo"), IMAGE_BASE, MemoryConfig().max_image_size)
    layout = Layout(MemoryConfig(), image.size)
    mappings = boot.page_table_mappings(layout, image)
    tables = build_both(mappings, PAGE_TABLES, boot.MAX_PAGE_TABLE_PAGES)
    check_tables(mappings, tables, PAGE_TABLES, walk_every_page=False)
    entry = walk(tables, PAGE_TABLES, image.entry)
    assert entry is not None and entry[2] and not entry[1]  # the entry point is executable, not writable
    assert walk(tables, PAGE_TABLES, layout.input.start) == (layout.input.start, False, False)
