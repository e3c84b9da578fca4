"""Micro-benchmarks (pytest-benchmark) of the hot pieces: page-table build, dirty scan, restore.

Each one is also a plain test: it checks its result. ``pytest -q`` runs them
quickly (``benchmark.pedantic`` with a fixed, small number of rounds, ~3 s in all); for
numbers, run ``pytest tests/test_microbench.py --benchmark-only`` (add
``--benchmark-columns=min,median,mean,stddev,rounds`` or ``--benchmark-json``
as needed). Only the last one needs KVM.
"""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest

from hlpool import _mapping
from hlpool.memory import _dirty
from hlpool.guest import boot, pagetables
from hlpool.guest.layout import MIB, PAGE_TABLES, Layout, MemoryConfig

PAGE = 4096

try:
    import pytest_benchmark  # noqa: F401  (the test extra installs it; it provides the benchmark fixture)
except ImportError:  # pragma: no cover - keep these usable as plain tests without the plugin
    class _OneShot:
        """Stands in for pytest-benchmark's fixture: runs the target once."""

        group = None

        def __call__(self, fn, *args, **kwargs):
            return fn(*args, **kwargs)

        def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, iterations=1, warmup_rounds=0):
            if setup is not None:
                made = setup()
                if made is not None:
                    args, kwargs = made
            return target(*args, **(kwargs or {}))

    @pytest.fixture
    def benchmark():
        return _OneShot()


# ---- page tables ---------------------------------------------------------------------------------


def _image(text: int, rodata: int, data: int) -> SimpleNamespace:
    """A GuestImage-like object: text r-x, rodata r--, data+bss rw- (sizes in bytes, page multiples)."""
    seg = SimpleNamespace
    return SimpleNamespace(segments=(
        seg(offset=0, size=text, readable=True, writable=False, executable=True),
        seg(offset=text, size=rodata, readable=True, writable=False, executable=False),
        seg(offset=text + rodata, size=data, readable=True, writable=True, executable=False),
    ))


IMAGES = {
    # Like the echo example: 36 KiB text, 8 KiB rodata, 108 KiB data+bss; default memory config.
    "small guest": (_image(0x9000, 0x2000, 0x1B000), MemoryConfig()),
    # Like bench/density.py's large-image guest: 6 MiB of rodata, 1 MiB of data, 256 MiB heap.
    "7 MiB image": (_image(0x40000, 6 * MIB + 0x4000, MIB + 0x8000), MemoryConfig(heap_size=256 * MIB)),
}


def _mappings(name: str) -> list:
    image, config = IMAGES[name]
    size = sum(s.size for s in image.segments)
    return boot.page_table_mappings(Layout(config, size), image)


@pytest.mark.parametrize("builder", ["cython", "python"])
@pytest.mark.parametrize("image", sorted(IMAGES))
def test_build_page_tables(benchmark, image, builder):
    benchmark.group = "page tables"
    mappings = _mappings(image)
    build = _mapping.build_page_tables if builder == "cython" else pagetables.build_page_tables
    rounds = 200 if builder == "cython" else 20
    tables = benchmark.pedantic(build, args=(list(mappings), PAGE_TABLES, boot.MAX_PAGE_TABLE_PAGES),
                                rounds=rounds, iterations=1)
    reference = _mapping.build_page_tables(list(mappings), PAGE_TABLES, boot.MAX_PAGE_TABLE_PAGES)
    assert tables == reference == pagetables.build_page_tables(list(mappings), PAGE_TABLES,
                                                               boot.MAX_PAGE_TABLE_PAGES)
    assert len(tables) % PAGE == 0 and len(tables) >= 4 * PAGE


# ---- dirty scan ----------------------------------------------------------------------------------

AREA_PAGES = (1 << 30) // PAGE  # a 1 GiB main slot: a 32 KiB bitmap


def _spread(count: int, pages: int) -> list[int]:
    """``count`` distinct pages spread evenly over ``pages``."""
    step = pages // count
    return [i * step + (i % 7) for i in range(count)]


@pytest.mark.parametrize("dirty", [1, 16, 256, 4096])
def test_dirty_scan(benchmark, dirty):
    benchmark.group = "dirty scan (1 GiB slot)"
    pages = _spread(dirty, AREA_PAGES)
    bitmap = array("Q", bytes(AREA_PAGES // 8))
    for p in pages:
        bitmap[p // 64] |= 1 << (p % 64)

    def setup():
        return (_dirty.DirtySet(AREA_PAGES),), {}

    def scan(ds):
        ds.add_bitmap(bitmap)
        return ds.pages()

    found = benchmark.pedantic(scan, setup=setup, rounds=100, iterations=1)
    assert found == sorted(pages)


# ---- restore -------------------------------------------------------------------------------------

RESTORE_PAGES = (16 * MIB) // PAGE


class _Area:
    """A private anonymous 'guest' area and a read-only-by-convention source it is restored from.

    Like GuestMemory: the area has two runs, the first half backed by the source
    (a snapshot layer's view), the second half zero pages.
    """

    def __init__(self, pages: int) -> None:
        self.pages = pages
        size = pages * PAGE
        self.size = size
        self.dst = _mapping.reserve(size)
        _mapping.map_anonymous_fixed(self.dst, size)
        self.src = _mapping.reserve(size)
        _mapping.map_anonymous_fixed(self.src, size)
        half = pages // 2
        pattern = bytes((i * 37 + 11) & 0xFF for i in range(PAGE))
        for p in range(half):
            _mapping.write_bytes(self.src + p * PAGE, pattern[p % 251:] + pattern[:p % 251])
            _mapping.write_bytes(self.dst + p * PAGE, _mapping.read_bytes(self.src + p * PAGE, PAGE))
        self.run_first = array("Q", [0, half])
        self.run_count = array("Q", [half, pages - half])
        self.run_source = array("Q", [self.src, 0])
        self.resident = bytearray(pages)
        self.resident_count = 0
        self.dirty = _dirty.DirtySet(pages)

    def expected(self, page: int) -> bytes:
        if page < self.pages // 2:
            return _mapping.read_bytes(self.src + page * PAGE, PAGE)
        return bytes(PAGE)

    def scribble(self, pages: list[int]) -> None:
        for p in pages:
            _mapping.write_bytes(self.dst + p * PAGE + (p % 512) * 8, b"\xa5" * 8)
            self.dirty.add_range(p, 1)

    def restore(self) -> tuple[int, int, int]:
        copied, dropped, self.resident_count = self.dirty.restore(
            self.dst, self.run_first, self.run_count, self.run_source, self.resident, self.resident_count,
            1 << 20, self.pages)
        return copied, dropped, self.resident_count

    def close(self) -> None:
        _mapping.unmap(self.dst, self.size)
        _mapping.unmap(self.src, self.size)


@pytest.mark.parametrize("dirty", [1, 16, 256])
def test_restore_pages(benchmark, dirty):
    benchmark.group = "restore (DirtySet.restore, copy-back)"
    area = _Area(RESTORE_PAGES)
    pages = _spread(dirty, RESTORE_PAGES)
    try:
        def setup():
            area.scribble(pages)
            return (), {}

        copied, dropped, _resident = benchmark.pedantic(area.restore, setup=setup, rounds=100, iterations=1)
        assert (copied, dropped) == (dirty, 0)
        assert area.dirty.empty
        for p in pages:
            assert _mapping.read_bytes(area.dst + p * PAGE, PAGE) == area.expected(p), f"page {p}"
    finally:
        area.close()


# ---- a real sandbox ------------------------------------------------------------------------------


@pytest.mark.kvm
def test_sandbox_restore_after_touch16(benchmark, snapshots):
    benchmark.group = "Sandbox.restore"
    from hlpool import Sandbox

    with Sandbox(snapshots("touch"), name="microbench-restore") as sb:
        expected = sum(1 + i for i in range(16))

        def setup():
            assert sb.call("touch", 16, restore=False) == expected  # wrong if a restore missed a page
            return (), {}

        stats = benchmark.pedantic(sb.restore, setup=setup, rounds=50, iterations=1, warmup_rounds=2)
        assert stats.dirty >= 16
        assert sb.call("touch", 16) == expected
