"""The described pieces of a snapshot's memory (:attr:`Snapshot.regions`).

A region is a guest-physical range with one layout area, one set of guest
permissions and one backing; ``retain`` callbacks of a capture decide per region.
"""

from __future__ import annotations

from dataclasses import dataclass

from hlpool.guest.layout import IMAGE_BASE, PAGE, page_up
from hlpool.memory.image import SnapshotImage

SLOTS = ("system", "main")


@dataclass(frozen=True)
class Region:
    """A described piece of a snapshot's memory (see :attr:`Snapshot.regions`)."""

    guest_address: int
    size: int
    area: str  # layout area: system, image, heap, stack, out, log, input, reply, file
    perms: str  # guest permissions: "r", "rw", "rx", "rwx" or "-" (guard / not mapped)
    backing: str  # "file" (a persisted snapshot file or mapped host file), "memory", "anonymous"
    path: str | None = None  # the backing file, if on disk
    layer: int | None = None  # index in Snapshot.layers
    offset: int = 0  # byte offset in the layer's page data


def regions_of(snapshot: SnapshotImage) -> list[Region]:
    """The snapshot's memory, split where backing or permissions change."""
    out: list[Region] = []
    for slot in SLOTS:
        base = getattr(snapshot.layout, slot).start
        for start, end, area, perms in _areas(snapshot, slot):
            for run in snapshot.runs[slot]:
                lo = max(start, base + run.first_page * PAGE)
                hi = min(end, base + run.end_page * PAGE)
                if lo >= hi:
                    continue
                if run.layer < 0:
                    out.append(Region(lo, hi - lo, area, perms, "anonymous"))
                else:
                    layer = snapshot.layers[run.layer]
                    offset = run.offset + (lo - base - run.first_page * PAGE)
                    out.append(Region(lo, hi - lo, area, perms, "file" if layer.path else "memory",
                                      layer.path, run.layer, offset))
    io = snapshot.layout.io
    out.append(Region(io.start, io.size, "input", "r", "anonymous"))
    for f in snapshot.mapped_files:
        out.append(Region(f.guest_address, page_up(f.size), "file", "r", "file", f.path))
    return out


def _areas(snapshot: SnapshotImage, slot: str) -> list[tuple[int, int, str, str]]:
    """(start, end, area name, perms) covering a slot."""
    L = snapshot.layout
    if slot == "system":
        return [(L.system.start, L.system.end, "system", "r")]
    pieces: list[tuple[int, int, str, str]] = []
    for offset, size, perms in snapshot.image_segments:
        pieces.append((IMAGE_BASE + offset, IMAGE_BASE + offset + size, "image", perms))
    for area, perms in ((L.heap, "rw"), (L.stack, "rw"), (L.exception_stack, "rw"), (L.out, "rw"),
                        (L.log, "rw"), (L.call, "rw")):
        pieces.append((area.start, area.end, area.name, perms))
    pieces.sort()
    out: list[tuple[int, int, str, str]] = []
    cursor = L.main.start
    for start, end, name, perms in pieces:
        if start > cursor:
            out.append((cursor, start, "guard", "-"))
        out.append((start, end, name, perms))
        cursor = end
    if cursor < L.main.end:
        out.append((cursor, L.main.end, "guard", "-"))
    return out

