"""Capture: a layered snapshot of a live machine that stores only what changed.

For each run of the parent snapshot, pages the guest did not write stay
references to the parent's layers; written pages go into one new layer unless
they equal the parent's bytes (then a reference) or are zero (then a zero run).
``retain`` overrides that: a callable decides per region (layout area and
backing), a list of ``(guest_address, size)`` page ranges keeps the parent's
bytes for those pages. Uses only the machine's public methods; the new snapshot
is the parent with the captured fields replaced. :func:`lay_out` (pieces ->
runs + new layer) is shared with :mod:`hlpool.snapshot.flatten`.

The common case (no ``retain``, no flattening: every script a pool registers) runs in Cython
(:mod:`hlpool.snapshot._capture`, the same rules over arrays): a JS script's capture took
~480-520 us in the builder, ~220 us with it (``save_vcpu_state``'s ioctls are ~100 of those).
"""

from __future__ import annotations

import bisect
import dataclasses
from array import array
from dataclasses import dataclass
from typing import Callable, Sequence, Union

from hlpool import _mapping
from hlpool.errors import SnapshotError
from hlpool.guest.layout import FILES_TABLE, IMAGE_BASE, PAGE, SYSTEM_BASE, Area
from hlpool.machine.machine import Machine
from hlpool.memory.image import SnapshotImage
from hlpool.memory.layers import Layer, Run, RunList, coalesce
from hlpool.snapshot import _capture
from hlpool.snapshot.regions import SLOTS, Region, regions_of
from hlpool.snapshot.snapwrite import PendingLayer

MAX_RUNS_PER_SLOT = 64  # bounds the host mappings each sandbox needs

REF, ZERO, NEW = "ref", "zero", "new"

#: What ``retain`` may be: a callable asked per region, or page ranges ``[(guest_address, size), ...]``.
Retain = Union[Callable[[Region], Union[bool, None]], Sequence[tuple[int, int]]]


@dataclass
class _Piece:
    """A page span of a snapshot being captured, before the new layer is laid out.

    ``ref``: keep ``layer``/``offset`` of the parent; ``zero``: zero pages;
    ``new``: copy ``count`` pages from host address ``source`` (0: zeros)
    into the new layer. A ``ref`` piece's ``source`` is where its parent
    bytes are visible in this process.
    """

    first: int
    count: int
    kind: str
    layer: int = -1
    offset: int = 0
    source: int = 0

    @property
    def end(self) -> int:
        return self.first + self.count


def capture(
    machine: Machine,
    *,
    retain: Retain | None = None,
    flatten: bool = False,
    exports: tuple[str, ...] | None = None,
) -> SnapshotImage:
    """Snapshot a live machine (see :meth:`Sandbox.snapshot`): a child of its snapshot.

    With ``flatten`` the result has a single layer holding every non-zero
    page (used for snapshots made from an ELF).
    """
    parent = machine.base_snapshot
    ranges = None if retain is None or callable(retain) else _page_ranges(parent, retain)
    vcpu_state = machine.save_vcpu_state()
    dirty = {"main": machine.dirty_pages(),
             "system": [(FILES_TABLE - parent.layout.system.start) // PAGE]}
    new_index = 0 if flatten else len(parent.layers)
    if ranges is None and retain is None and not flatten:  # the common case, in Cython
        runs, layer = _capture_plain(machine, parent, dirty, new_index)
        return _child(machine, parent, vcpu_state, exports, parent.layers + (layer,), runs, flatten)
    regions_by_slot = _regions_by_slot(parent) if callable(retain) else {}
    pieces_by_slot: dict[str, list[_Piece]] = {}
    for slot in SLOTS:
        host = machine.slot_host_address(slot)
        pieces: list[_Piece] = []
        parent_runs = parent.runs[slot]
        for run in parent_runs.listed() if isinstance(parent_runs, RunList) else parent_runs:
            if ranges is not None:
                decisions = _range_decisions(run, ranges[slot])
            else:
                decisions = _decisions(run, regions_by_slot.get(slot, ()), retain)  # type: ignore[arg-type]
            for first, count, decision in decisions:
                offset = run.offset + (first - run.first_page) * PAGE if run.layer >= 0 else 0
                span = Run(first, count, run.layer, offset)
                pieces.extend(_classify(parent, host, span, dirty[slot], decision, flatten))
        pieces_by_slot[slot] = pieces
    runs, layer = lay_out(pieces_by_slot, new_index)
    layers: tuple[Layer, ...] = (layer,) if flatten else parent.layers + (layer,)
    return _child(machine, parent, vcpu_state, exports, layers, runs, flatten)


def _child(machine: Machine, parent: SnapshotImage, vcpu_state: object, exports: tuple[str, ...] | None,
           layers: tuple[Layer, ...], runs: dict[str, "list[Run] | RunList"], flatten: bool) -> SnapshotImage:
    """The parent's type and fields, with the captured state."""
    return dataclasses.replace(
        parent, vcpu=vcpu_state, exports=exports if exports is not None else parent.exports,
        layers=layers, runs=runs, mapped_files=machine.mapped_files, parent=None if flatten else parent,
        path=None, info={**parent.info},
    )


def _capture_plain(machine: Machine, parent: SnapshotImage, dirty: dict[str, list[int]],
                   new_index: int) -> tuple[dict[str, RunList], PendingLayer]:
    """:func:`capture` with no ``retain`` and no flattening (what :func:`_classify`, :func:`_merge`
    and :func:`lay_out` do for that case), one :mod:`hlpool.snapshot._capture` call per slot."""
    views = array("q", (layer.view() for layer in parent.layers))
    sizes = array("q", (layer.size for layer in parent.layers))
    chunks: list[bytes] = []
    size = 0
    runs: dict[str, RunList] = {}
    for slot in SLOTS:
        parent_runs = parent.runs[slot]
        flat = parent_runs.flat if isinstance(parent_runs, RunList) else RunList(parent_runs).flat
        raw, size = _capture.capture_slot(flat, views, sizes, array("q", dirty[slot]), machine.slot_host_address(slot),
                                          getattr(parent.layout, slot).size // PAGE, new_index, size,
                                          MAX_RUNS_PER_SLOT, chunks)
        runs[slot] = RunList.from_flat(raw)
    return runs, PendingLayer(chunks, name="hlpool-snapshot")


def lay_out(pieces_by_slot: dict[str, list[_Piece]], new_index: int) -> tuple[dict[str, list[Run]], Layer]:
    """Runs for each slot and the new layer holding the ``new`` pieces' bytes, at layer index
    ``new_index``; each slot's runs bounded to :data:`MAX_RUNS_PER_SLOT`. The layer keeps the bytes
    (copied out of the guest now) in memory until it is written into a file or needed as a
    descriptor (then a sealed memfd): :class:`~hlpool.snapshot.snapwrite.PendingLayer`."""
    chunks: list[bytes] = []
    layer_size = 0
    runs: dict[str, list[Run]] = {}
    for slot, pieces in pieces_by_slot.items():
        slot_runs: list[Run] = []
        for piece in _bound(_merge(pieces)):
            if piece.kind == NEW:
                size = piece.count * PAGE
                data = _mapping.read_bytes(piece.source, size) if piece.source else bytes(size)
                chunks.append(data)
                slot_runs.append(Run(piece.first, piece.count, new_index, layer_size))
                layer_size += size
            elif piece.kind == ZERO:
                slot_runs.append(Run(piece.first, piece.count, -1, 0))
            else:
                slot_runs.append(Run(piece.first, piece.count, piece.layer, piece.offset))
        runs[slot] = coalesce(slot_runs)
    # (written with pwritev, a few hundred pieces per system call: no join, no memfd unless needed)
    return runs, PendingLayer(chunks, name="hlpool-snapshot")


def _page_ranges(snapshot: SnapshotImage, retain: Sequence[tuple[int, int]]) -> dict[str, list[tuple[int, int]]]:
    """``[(guest_address, size), ...]`` -> per slot, sorted page ranges ``(first, end)`` in slot pages.

    Addresses and sizes must be page-aligned and lie in the snapshot's memory (system or main slot).
    """
    out: dict[str, list[tuple[int, int]]] = {slot: [] for slot in SLOTS}
    try:
        items = list(retain)
    except TypeError:
        raise TypeError("retain must be a callable or a list of (guest_address, size) pairs") from None
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
            raise TypeError(f"retain: expected (guest_address, size) pairs of ints, got {item!r}")
        address, size = item
        if address % PAGE or size % PAGE or size <= 0 or address < 0:
            raise ValueError(f"retain: range {address:#x}+{size:#x} is not a positive, page-aligned range")
        for slot in SLOTS:
            area: Area = getattr(snapshot.layout, slot)
            if area.start <= address and address + size <= area.end:
                out[slot].append(((address - area.start) // PAGE, (address + size - area.start) // PAGE))
                break
        else:
            raise ValueError(f"retain: range {address:#x}+{size:#x} is not inside the snapshot's memory "
                             "(one system or main slot range per pair)")
    for slot in SLOTS:
        out[slot].sort()
    return out


def _range_decisions(run: Run, ranges: list[tuple[int, int]]) -> list[tuple[int, int, bool | None]]:
    """Split ``run`` into pages inside ``ranges`` (True: keep the parent's bytes) and outside (None)."""
    out: list[tuple[int, int, bool | None]] = []
    cursor = run.first_page
    for first, end in ranges:
        lo, hi = max(cursor, first), min(run.end_page, end)
        if lo >= hi:
            continue
        if lo > cursor:
            out.append((cursor, lo - cursor, None))
        out.append((lo, hi - lo, True))
        cursor = hi
    if cursor < run.end_page:
        out.append((cursor, run.end_page - cursor, None))
    return out


def _regions_by_slot(snapshot: SnapshotImage) -> dict[str, list[Region]]:
    out: dict[str, list[Region]] = {slot: [] for slot in SLOTS}
    for region in regions_of(snapshot):
        for slot in SLOTS:
            area: Area = getattr(snapshot.layout, slot)
            if area.start <= region.guest_address < area.end:
                out[slot].append(region)
    return out


def _decisions(run: Run, regions: list[Region], retain: Callable[[Region], bool | None] | None):
    """Split ``run`` at region boundaries; ask ``retain`` about each piece."""
    if retain is None:
        return [(run.first_page, run.count, None)]
    out = []
    for region in regions:
        base = IMAGE_BASE if region.guest_address >= IMAGE_BASE else SYSTEM_BASE
        first = (region.guest_address - base) // PAGE
        lo, hi = max(run.first_page, first), min(run.end_page, first + region.size // PAGE)
        if lo < hi:
            decision = retain(region)
            if decision not in (True, False, None):
                raise TypeError(f"retain() must return True, False or None, not {decision!r}")
            out.append((lo, hi - lo, decision))
    if sum(c for _f, c, _d in out) != run.count:
        raise SnapshotError("internal error: regions do not tile the snapshot's runs")
    return out


def _classify(parent: SnapshotImage, host: int, span: Run, dirty: list[int], decision: bool | None,
              flatten: bool) -> list[_Piece]:
    """Pieces for one span of a parent run (one backing, one retain decision)."""
    lo = bisect.bisect_left(dirty, span.first_page)
    hi = bisect.bisect_left(dirty, span.end_page)
    if lo == hi and decision is None and not flatten:  # untouched: the parent's pages (most spans)
        if span.layer < 0:
            return [_Piece(span.first_page, span.count, ZERO)]
        source = parent.layers[span.layer].view()
        return [_Piece(span.first_page, span.count, REF, span.layer, span.offset, source + span.offset)]
    source = parent.layers[span.layer].view() if span.layer >= 0 else 0
    if decision is True:  # keep the parent's bytes, whatever the sandbox wrote
        if span.layer < 0:
            return [_Piece(span.first_page, span.count, ZERO)]
        return [_Piece(span.first_page, span.count, REF, span.layer, span.offset, source + span.offset)]
    copy_all = flatten or decision is False
    out: list[_Piece] = []

    def clean(first: int, count: int) -> None:
        if count <= 0:
            return
        if span.layer < 0:
            out.append(_Piece(first, count, ZERO))
            return
        offset = span.offset + (first - span.first_page) * PAGE
        if copy_all:  # copy the parent's bytes, except pages that are zero
            for start, n, is_zero in _mapping.zero_page_spans(source + offset, count):
                if is_zero:
                    out.append(_Piece(first + start, n, ZERO))
                else:
                    out.append(_Piece(first + start, n, NEW, source=source + offset + start * PAGE))
        else:
            out.append(_Piece(first, count, REF, span.layer, offset, source + offset))

    cursor = span.first_page
    for page in dirty[lo:hi]:
        clean(cursor, page - cursor)
        cursor = page + 1
        addr = host + page * PAGE
        if _mapping.pages_equal(addr, 0):
            out.append(_Piece(page, 1, ZERO))
            continue
        if not copy_all and span.layer >= 0:
            parent_offset = span.offset + (page - span.first_page) * PAGE
            if _mapping.pages_equal(addr, source + parent_offset):
                out.append(_Piece(page, 1, REF, span.layer, parent_offset, source + parent_offset))
                continue
        out.append(_Piece(page, 1, NEW, source=addr))
    clean(cursor, span.end_page - cursor)
    return out


def _continues(a: _Piece, b: _Piece) -> bool:
    if a.end != b.first or a.kind != b.kind:
        return False
    if a.kind == ZERO:
        return True
    if a.kind == REF:
        return a.layer == b.layer and a.offset + a.count * PAGE == b.offset
    return bool(a.source) and a.source + a.count * PAGE == b.source


def _merge(pieces: list[_Piece]) -> list[_Piece]:
    out: list[_Piece] = []
    for p in pieces:
        if out and _continues(out[-1], p):
            out[-1].count += p.count
        else:
            out.append(p)
    return out


def _bound(pieces: list[_Piece]) -> list[_Piece]:
    """At most MAX_RUNS_PER_SLOT backing changes: turn the smallest gaps between new
    pieces into new data (copying their parent bytes), which costs file size, not memory."""
    while _backing_changes(pieces) > MAX_RUNS_PER_SLOT:
        gaps = [i for i in range(1, len(pieces) - 1)
                if pieces[i].kind != NEW and pieces[i - 1].kind == NEW and pieces[i + 1].kind == NEW]
        if not gaps:
            gaps = [i for i, p in enumerate(pieces) if p.kind != NEW]
        if not gaps:
            break
        i = min(gaps, key=lambda k: pieces[k].count)
        gap = pieces[i]
        pieces[i] = _Piece(gap.first, gap.count, NEW, source=0 if gap.kind == ZERO else gap.source)
    return pieces


def _backing_changes(pieces: list[_Piece]) -> int:
    """Runs after layout: consecutive NEW pieces become one run in the new layer."""
    count = 0
    for i, p in enumerate(pieces):
        if i == 0 or not (p.kind == NEW and pieces[i - 1].kind == NEW):
            count += 1
    return count

