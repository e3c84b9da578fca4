"""The common case of a capture in Cython (hlpool.snapshot._capture: no retain, no flattening)
against the general Python path (a ``retain`` callable that decides nothing takes it, with the
same meaning): the same runs and the same new layer, byte for byte, for guests that write new
data, zeros, and the parent's own bytes back, on parents of one, two and three layers; and the
checks of its inputs before it reads a page."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hlpool.errors import SnapshotError
from hlpool.sandbox.sandbox import Sandbox
from hlpool.snapshot import _capture
from hlpool.snapshot.capture import MAX_RUNS_PER_SLOT
from hlpool.snapshot.snapshot import Snapshot

AREA_PAGES = 96  # tests/guests/pages.c: first half a pattern, second half zeros


@pytest.fixture(scope="module")
def pages_base(kvm, test_guest):
    return Snapshot.from_elf(test_guest("pages"))


def _layer_bytes(snapshot: Snapshot) -> bytes:
    layer = snapshot.layers[-1]
    return layer.read(0, layer.size) if layer.size else b""


def _assert_same_capture(sb: Sandbox) -> Snapshot:
    fast = sb.snapshot()  # the Cython path
    general = sb.snapshot(retain=lambda region: None)  # the Python path, deciding nothing
    for slot in ("system", "main"):
        assert fast.runs[slot] == general.runs[slot], slot
        assert len(fast.runs[slot]) <= MAX_RUNS_PER_SLOT + 1
    assert fast.layers[-1].size == general.layers[-1].size
    assert _layer_bytes(fast) == _layer_bytes(general)
    return fast


WRITES = st.lists(st.tuples(st.sampled_from(["write", "rewrite"]),
                            st.lists(st.integers(0, AREA_PAGES - 1), max_size=60, unique=True),
                            st.sampled_from([0, 1, 0x5A, 0xFF])), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(levels=st.lists(WRITES, min_size=1, max_size=3))
def test_the_plain_capture_matches_the_general_one(pages_base, levels):
    snapshot = pages_base
    for writes in levels:  # each level a child of the last: parents of 1, 2, 3 layers
        with Sandbox(snapshot, timeout=10) as sb:
            for op, pages, fill in writes:
                if op == "write":
                    sb.call("write", pages, [fill] * len(pages), restore=False)
                else:  # the parent's own bytes written back: dirty, but a reference to the parent
                    sb.call("rewrite", pages, restore=False)
            snapshot = _assert_same_capture(sb)


def test_many_scattered_writes_are_bounded_alike(pages_base):
    """Every other page new: more backing changes than a slot may have, so both paths turn the
    smallest gaps into new data, the same way."""
    with Sandbox(pages_base, timeout=10) as sb:
        pages = list(range(0, AREA_PAGES, 2))
        sb.call("write", pages, [(7 * p) % 250 + 1 for p in pages], restore=False)
        child = _assert_same_capture(sb)
    with Sandbox(child, timeout=10) as sb:
        pages = list(range(1, AREA_PAGES, 3))
        sb.call("write", pages, [0 if p % 2 else 9 for p in pages], restore=False)
        _assert_same_capture(sb)


def _quads(*runs: tuple[int, int, int, int]) -> array:
    return array("q", [v for run in runs for v in run])


@pytest.mark.parametrize("parent, views, sizes, dirty, npages, error", [
    (_quads((0, 4, -1, 0), (5, 3, -1, 0)), [], [], [], 8, SnapshotError),       # a gap
    (_quads((0, 4, -1, 0)), [], [], [], 8, SnapshotError),                       # short of the slot
    (_quads((0, 8, 0, 0)), [4096], [4 * 4096], [], 8, SnapshotError),            # beyond its layer
    (_quads((0, 8, 1, 0)), [4096], [8 * 4096], [], 8, SnapshotError),            # a missing layer
    (_quads((0, 8, 0, 0)), [0], [8 * 4096], [], 8, SnapshotError),               # a layer with no view
    (_quads((0, 8, 0, 100)), [4096], [9 * 4096], [], 8, SnapshotError),          # unaligned offset
    (_quads((0, 8, -2, 0)), [], [], [], 8, SnapshotError),                       # a bad layer index
    (_quads((0, 8, -1, 0)), [], [], [3, 3], 8, ValueError),                      # repeated dirty page
    (_quads((0, 8, -1, 0)), [], [], [5, 2], 8, ValueError),                      # unsorted
    (_quads((0, 8, -1, 0)), [], [], [8], 8, ValueError),                         # outside the slot
    (_quads((0, 8, -1, 0)), [], [], [-1], 8, ValueError),
], ids=["gap", "short", "beyond-layer", "missing-layer", "no-view", "unaligned", "bad-index", "repeated",
        "unsorted", "outside", "negative"])
def test_malformed_inputs_are_refused_before_a_page_is_read(parent, views, sizes, dirty, npages, error):
    # host=0: a page read would crash the test process, so passing proves nothing was read
    with pytest.raises(error):
        _capture.capture_slot(parent, array("q", views), array("q", sizes), array("q", dirty), 0, npages, 1, 0,
                              MAX_RUNS_PER_SLOT, [])
