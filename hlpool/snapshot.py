"""Snapshots: the initialised state of a guest, as immutable layers.

A snapshot is vCPU state + a memory layout + for each snapshot slot (system,
main) an ordered list of runs, each backed by a layer (an immutable file, in
memory or on disk) or by zero pages. Sandboxes map the layers MAP_PRIVATE,
so every sandbox of a snapshot shares its pages and pays only for pages it
writes.

- :meth:`Snapshot.from_elf` loads, relocates and boots a guest, runs
  ``hl_main`` once and captures the result as a single-layer snapshot.
- :meth:`Sandbox.snapshot` (:func:`capture`) stores only the pages that
  differ from the sandbox's snapshot in a new layer on top of it.
- :meth:`Snapshot.persist` / :meth:`Snapshot.open` write and read snapshot
  files (see :mod:`hlpool.snapfile` for the format).
"""

from __future__ import annotations

import bisect
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from . import _mapping
from .boot import initial_regs, initial_sregs, system_memory
from .elf import load_guest_image
from .errors import GuestImageError, HlpoolError, SnapshotError
from .kvm import abi as kvm_abi
from .kvm.system import system
from .kvm.vcpu import VcpuState
from .layers import Layer, Run, check_runs, coalesce
from .layout import FILES_TABLE, IMAGE_BASE, PAGE, SYSTEM_BASE, Area, Layout, MemoryConfig, page_up
from .mapped_files import MappedFile, SandboxFiles

if TYPE_CHECKING:
    from .sandbox import HostFunction, Sandbox

log = logging.getLogger(__name__)

SLOTS = ("system", "main")
MAX_RUNS_PER_SLOT = 64  # bounds the host mappings each sandbox needs
DEFAULT_INIT_TIMEOUT = 30.0
APIC_BASE_DEFAULT = 0xFEE00900  # enabled, BSP, at the architectural address


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


@dataclass
class Snapshot:
    """The immutable, shareable state of an initialised guest.

    Create with :meth:`from_elf`, :meth:`open` or :meth:`Sandbox.snapshot`;
    run with :class:`~hlpool.Sandbox`.
    """

    layout: Layout
    vcpu: VcpuState
    exports: tuple[str, ...] | None
    layers: tuple[Layer, ...]
    runs: dict[str, list[Run]]
    image_segments: tuple[tuple[int, int, str], ...] = ()
    mapped_files: tuple[MappedFile, ...] = ()
    parent: "Snapshot | None" = None
    path: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = [layer.size for layer in self.layers]
        check_runs(self.runs["system"], self.layout.system.size // PAGE, sizes, "system slot")
        check_runs(self.runs["main"], self.layout.main.size // PAGE, sizes, "main slot")

    # ---- creation ---------------------------------------------------------------------

    @classmethod
    def from_elf(
        cls,
        path: str | os.PathLike,
        *,
        heap_size: int | None = None,
        stack_size: int | None = None,
        host_functions: "Mapping[str, HostFunction] | None" = None,
        config: MemoryConfig | None = None,
        timeout: float | None = DEFAULT_INIT_TIMEOUT,
    ) -> "Snapshot":
        """Load and relocate a guest ELF, run its ``hl_main`` in a VM and capture the result.

        ``heap_size``/``stack_size`` override ``config`` (a :class:`MemoryConfig`).
        ``host_functions`` are available to ``hl_main``. Raises
        :class:`GuestImageError` if the file is not a usable guest or its
        initialisation fails (the cause is chained).
        """
        from .sandbox import Sandbox

        path = os.fspath(path)
        config = config or MemoryConfig()
        overrides = {k: v for k, v in (("heap_size", heap_size), ("stack_size", stack_size)) if v is not None}
        if overrides:
            config = MemoryConfig(**{**config.to_dict(), **overrides})
        image = load_guest_image(path, IMAGE_BASE, config.max_image_size)
        try:
            layout = Layout(config, image.size)
        except HlpoolError as exc:
            raise GuestImageError(f"{path}: {exc}") from None
        kvm = system()
        system_bytes = system_memory(layout, image, kvm.tsc_khz)
        image_bytes = image.memory()
        layer = Layer.from_pages([system_bytes, image_bytes], name="hlpool-boot")
        image_pages = len(image_bytes) // PAGE
        main_pages = layout.main.size // PAGE
        runs = {
            "system": [Run(0, len(system_bytes) // PAGE, 0, 0)],
            "main": [Run(0, image_pages, 0, len(system_bytes)), Run(image_pages, main_pages - image_pages, -1, 0)],
        }
        sregs = initial_sregs(kvm_abi.KvmSregs(apic_base=APIC_BASE_DEFAULT))
        boot_state = VcpuState(regs=bytes(initial_regs(layout, image)), sregs=bytes(sregs), xsave=b"",
                               xcrs=b"", msrs={}, debugregs=b"", events=b"")
        segments = tuple((s.offset, s.size, "r" + ("w" if s.writable else "") + ("x" if s.executable else ""))
                         for s in image.segments)
        boot = cls(layout=layout, vcpu=boot_state, exports=None, layers=(layer,), runs=runs,
                   image_segments=segments, info={"image": os.path.abspath(path)})
        sandbox = Sandbox(boot, host_functions=host_functions, timeout=None, name=f"init:{os.path.basename(path)}")
        try:
            try:
                exports, rc = sandbox._boot(timeout)
            except HlpoolError as exc:
                raise GuestImageError(f"{path}: initialisation failed: {exc}") from exc
            if rc != 0:
                raise GuestImageError(f"{path}: hl_main returned {rc}")
            snapshot = capture(sandbox, flatten=True, exports=tuple(exports))
        finally:
            sandbox.close()
            layer.close()
        log.info("snapshot of %s: %d exports, %d layer bytes", path, len(snapshot.exports or ()),
                 snapshot.layers[-1].size)
        return snapshot

    @classmethod
    def open(cls, path: str | os.PathLike, *, max_memory: int | None = None) -> "Snapshot":
        """Open and fully validate a snapshot file (and its parents) before anything is mapped."""
        from .snapfile import read_snapshot

        return read_snapshot(os.fspath(path), max_memory=max_memory)

    def persist(self, path: str | os.PathLike) -> "Snapshot":
        """Write this snapshot's own layer to ``path`` (atomically, read-only) and return the
        file-backed snapshot. Parents must be persisted first."""
        from .snapfile import write_snapshot

        return write_snapshot(self, os.fspath(path))

    # ---- description --------------------------------------------------------------------

    @property
    def persisted(self) -> bool:
        return self.path is not None

    @property
    def depth(self) -> int:
        """Number of layers (1 for a snapshot made from an ELF)."""
        return len(self.layers)

    @property
    def regions(self) -> list[Region]:
        """The snapshot's memory, split where backing or permissions change."""
        out: list[Region] = []
        for slot in SLOTS:
            base = getattr(self.layout, slot).start
            for start, end, area, perms in self._areas(slot):
                for run in self.runs[slot]:
                    lo = max(start, base + run.first_page * PAGE)
                    hi = min(end, base + run.end_page * PAGE)
                    if lo >= hi:
                        continue
                    if run.layer < 0:
                        out.append(Region(lo, hi - lo, area, perms, "anonymous"))
                    else:
                        layer = self.layers[run.layer]
                        offset = run.offset + (lo - base - run.first_page * PAGE)
                        out.append(Region(lo, hi - lo, area, perms, "file" if layer.path else "memory",
                                          layer.path, run.layer, offset))
        io = self.layout.io
        out.append(Region(io.start, io.size, "input", "r", "anonymous"))
        for f in self.mapped_files:
            out.append(Region(f.guest_address, page_up(f.size), "file", "r", "file", f.path))
        return out

    def _areas(self, slot: str) -> list[tuple[int, int, str, str]]:
        """(start, end, area name, perms) covering a slot."""
        L = self.layout
        if slot == "system":
            return [(L.system.start, L.system.end, "system", "r")]
        pieces: list[tuple[int, int, str, str]] = []
        for offset, size, perms in self.image_segments:
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

    def stored_bytes(self) -> int:
        """Bytes of page data in this snapshot's own (top) layer."""
        return self.layers[-1].size

    def check_usable(self) -> None:
        """Raise if a sandbox cannot be made from this snapshot (e.g. a mapped file changed)."""
        from .snapfile import check_files_unchanged

        check_files_unchanged(self)

    def attach_files(self, sandbox: "Sandbox") -> SandboxFiles:
        return SandboxFiles(sandbox, self.mapped_files)

    def __repr__(self) -> str:
        where = self.path or "memory"
        return (f"<Snapshot {where} layers={self.depth} exports={list(self.exports or ())} "
                f"own={self.stored_bytes()} bytes>")


# ---- capture --------------------------------------------------------------------------

REF, ZERO, NEW = "ref", "zero", "new"


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
    sandbox: "Sandbox",
    *,
    retain: Callable[[Region], bool | None] | None = None,
    flatten: bool = False,
    exports: tuple[str, ...] | None = None,
) -> Snapshot:
    """Snapshot a live sandbox (see :meth:`Sandbox.snapshot`).

    With ``flatten`` the result has a single layer holding every non-zero
    page (used for snapshots made from an ELF).
    """
    parent = sandbox.base_snapshot
    sandbox._finish_pending_io()
    vcpu_state = sandbox.vcpu.save_state()
    memory = sandbox.memory
    memory.collect_dirty()
    dirty = {"main": memory.pending_dirty_pages(),
             "system": [(FILES_TABLE - parent.layout.system.start) // PAGE]}
    new_index = 0 if flatten else len(parent.layers)
    regions_by_slot = _regions_by_slot(parent) if retain else {}
    chunks: list[bytes] = []
    layer_size = 0
    runs: dict[str, list[Run]] = {}
    for slot in SLOTS:
        host = memory.slot_runs_host(slot).host
        pieces: list[_Piece] = []
        for run in parent.runs[slot]:
            for first, count, decision in _decisions(run, regions_by_slot.get(slot, ()), retain):
                offset = run.offset + (first - run.first_page) * PAGE if run.layer >= 0 else 0
                span = Run(first, count, run.layer, offset)
                pieces.extend(_classify(parent, host, span, dirty[slot], decision, flatten))
        pieces = _bound(_merge(pieces))
        slot_runs: list[Run] = []
        for piece in pieces:
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
    layer = Layer.from_pages(chunks, name="hlpool-snapshot")
    layers: tuple[Layer, ...] = (layer,) if flatten else parent.layers + (layer,)
    return Snapshot(
        layout=parent.layout, vcpu=vcpu_state,
        exports=exports if exports is not None else parent.exports,
        layers=layers, runs=runs, image_segments=parent.image_segments,
        mapped_files=sandbox._mapped_files.files, parent=None if flatten else parent,
        info={**parent.info},
    )


def _regions_by_slot(snapshot: Snapshot) -> dict[str, list[Region]]:
    out: dict[str, list[Region]] = {slot: [] for slot in SLOTS}
    for region in snapshot.regions:
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


def _classify(parent: Snapshot, host: int, span: Run, dirty: list[int], decision: bool | None,
              flatten: bool) -> list[_Piece]:
    """Pieces for one span of a parent run (one backing, one retain decision)."""
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

    lo = bisect.bisect_left(dirty, span.first_page)
    hi = bisect.bisect_left(dirty, span.end_page)
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

