"""Layers: the immutable files that hold snapshot pages.

A layer is a sequence of whole pages. Snapshot runs point into layers by
byte offset. A layer lives either in memory (a sealed memfd: the kernel
refuses every later write, so it is as immutable as a file) or on disk (a
read-only file written once by :mod:`hlpool.snapfile`). Either way a
sandbox maps it MAP_PRIVATE, so all sandboxes of a process (and, for disk
files, of all processes) share its pages through the page cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import weakref
from array import array
from typing import Iterable, Iterator, NamedTuple, Sequence

from hlpool import _mapping
from hlpool.errors import SnapshotError
from hlpool.guest.layout import PAGE

F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 1, 2, 4, 8


POPULATE_MAX = 4 << 20  # layers up to this size get their view's page tables filled when it is made


class Layer:
    """An immutable run of pages in a file descriptor.

    ``sha256`` is the content hash of the layer's bytes; for a persisted
    layer it is the hash of the whole snapshot file (which embeds the bytes).
    """

    def __init__(self, fd: int, size: int, sha256: bytes, *, path: str | None = None,
                 data_offset: int = 0) -> None:
        self.fd = fd
        self.size = size  # bytes of page data
        self.sha256 = sha256
        self.path = path
        self.data_offset = data_offset  # where page data starts in the file
        self.fingerprint: tuple[int, int, int] = (0, 0, 0)  # (inode, size, mtime_ns) when verified
        self._lock = threading.Lock()
        # [fd, view address, view size, owner pid]: released together when the layer is collected, or
        # closed and no sandbox holds it (see pin), by the process that made the layer only (_release).
        self._resources = [fd, 0, 0, os.getpid()]
        self._finalizer = weakref.finalize(self, _release, self._resources)
        self._pins = 0
        self._closing = False

    @classmethod
    def from_pages(cls, chunks: list[bytes | memoryview], name: str = "hlpool-layer") -> "Layer":
        """Write ``chunks`` (each a whole number of pages) into a sealed memfd."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        digest = hashlib.sha256()
        size = 0
        try:
            for chunk in chunks:
                if len(chunk) % PAGE:
                    raise ValueError("layer chunks must be whole pages")
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                size += len(chunk)
            fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, size, digest.digest())

    @property
    def persisted(self) -> bool:
        return self.path is not None

    def file_offset(self, offset: int) -> int:
        """Offset in the file of byte ``offset`` of the layer's page data."""
        return self.data_offset + offset

    def view(self) -> int:
        """Address of a read-only shared view of the page data (made once, kept; valid after fork)."""
        with self._lock:
            if self._closing:
                raise SnapshotError(f"{self!r} was closed")
            if not self._resources[1] and self.size:
                total = self.data_offset + self.size
                # A small layer's page tables are filled at once: a switch copies from it right away,
                # and a fault per page costs more here (PVM) than one populating mmap.
                self._resources[1] = _mapping.map_file_view(self.fd, total, total <= POPULATE_MAX)
                self._resources[2] = total
            return self._resources[1] + self.data_offset if self._resources[1] else 0

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or offset + size > self.size:
            raise SnapshotError(f"read of {size} bytes at {offset} outside a {self.size}-byte layer")
        return os.pread(self.fd, size, self.data_offset + offset)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (its resources may still be held by sandboxes)."""
        return self._closing

    def close(self) -> None:
        """Release the descriptor and the view now, or when the last sandbox holding the layer
        lets go of it (:func:`pin_layers`). A closed layer cannot back a new sandbox or a switch."""
        with _PINS:
            self._closing = True
            if self._pins:
                return
        self._finalizer()

    def __repr__(self) -> str:
        where = self.path or "memory"
        return f"<Layer {self.sha256.hex()[:12]} {self.size} bytes in {where}>"


# Pins of every layer change under one lock: a switch pins and unpins a few layers at once.
_PINS = threading.Lock()


def pin_layers(layers: "tuple[Layer, ...]") -> "tuple[Layer, ...]":
    """Keep each layer's file descriptor and view until :func:`unpin_layers`: a sandbox maps its
    memory from the descriptors and copies pages from the views by address, so neither may go
    (and a descriptor's number be reused by another file) while one holds the layers. All or
    none: raises :class:`~hlpool.SnapshotError` if one was closed."""
    with _PINS:
        for layer in layers:
            if layer._closing:
                raise SnapshotError(f"{layer!r} was closed")
        for layer in layers:
            layer._pins += 1
    return layers


def unpin_layers(layers: "tuple[Layer, ...]") -> None:
    """Let go of a :func:`pin_layers`; a layer closed meanwhile is released by its last holder."""
    released = []
    with _PINS:
        for layer in layers:
            layer._pins -= 1
            if layer._closing and not layer._pins:
                released.append(layer)
    for layer in released:
        layer._finalizer()


def _release(resources: list[int]) -> None:
    fd, view, view_size, owner = resources
    if owner != os.getpid():
        # A forked child's copy of the layer object: the numbers are the parent's. The pool's
        # spawner closes the inherited memfd and KVM descriptors at start, so in its children
        # (workers, builders) such a number may belong to a file of their own by now (a vCPU's,
        # say): closing or unmapping it here would pull that from under them. The child's copies
        # of the parent's descriptors and mappings go when it exits.
        return
    if view:
        try:
            _mapping.unmap(view, view_size)
        except OSError:
            pass
    try:
        os.close(fd)
    except OSError:
        pass


class Run(NamedTuple):
    """Pages ``[first_page, first_page + count)`` of a slot and where their bytes are.

    ``layer`` indexes the snapshot's layer list; -1 means zero pages
    (anonymous memory). ``offset`` is the byte offset in that layer.
    An immutable tuple: a snapshot file holds hundreds of runs and a worker opens
    thousands of files, so making one is kept cheap.
    """

    first_page: int
    count: int
    layer: int
    offset: int

    @property
    def end_page(self) -> int:
        return self.first_page + self.count


class RunList:
    """A slot's runs, read-only, four int64 per run in one array (a :class:`Run` is made when
    one is read). A snapshot keeps its runs this way: ~32 bytes a run instead of a tuple and
    its integers (~100), and one object for the garbage collector instead of one per run; a
    worker keeps thousands of snapshots open. Compares equal to a list of the same runs."""

    __slots__ = ("flat", "_listed")

    def __init__(self, runs: "Iterable[Sequence[int]]" = ()) -> None:
        flat = array("q")
        for run in runs:
            flat.extend(run)
        self.flat = flat  # (first page, count, layer, offset) per run
        self._listed: "tuple[Run, ...] | None" = None

    @classmethod
    def from_flat(cls, flat: bytes) -> "RunList":
        """Runs from native int64 quads (what :mod:`hlpool.snapshot._capture` returns)."""
        runs = cls()
        runs.flat.frombytes(flat)
        return runs

    def listed(self) -> "tuple[Run, ...]":
        """The runs as Run tuples, made once and kept: for snapshots whose runs are walked again
        and again (the base a script builder captures each script's layer from), not for the
        thousands of tenants a worker keeps open."""
        if self._listed is None:
            self._listed = tuple(self)
        return self._listed

    def __len__(self) -> int:
        return len(self.flat) // 4

    def __getitem__(self, index: int) -> Run:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]  # type: ignore[return-value]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("run index out of range")
        k = 4 * index
        return Run(*self.flat[k:k + 4])

    def __iter__(self) -> "Iterator[Run]":
        flat = self.flat
        return map(Run._make, zip(flat[0::4], flat[1::4], flat[2::4], flat[3::4]))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RunList):
            return self.flat == other.flat
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RunList({list(self)!r})"


def coalesce(runs: "Iterable[Run]") -> list[Run]:
    """Join neighbouring runs that continue each other in the same backing."""
    out: list[Run] = []
    for run in runs:
        if run.count == 0:
            continue
        if out:
            last = out[-1]
            contiguous = last.end_page == run.first_page and last.layer == run.layer
            if contiguous and (run.layer < 0 or last.offset + last.count * PAGE == run.offset):
                out[-1] = Run(last.first_page, last.count + run.count, last.layer,
                              last.offset if run.layer >= 0 else 0)
                continue
        out.append(run)
    return out


def check_runs(runs: list[Run], pages: int, layer_sizes: list[int], what: str) -> None:
    """Raise SnapshotError unless ``runs`` exactly tile ``pages`` pages and stay inside their layers.

    Runs on every snapshot open, so one tight loop (tried: C-level passes with zip/accumulate/map
    were slower for the ~30 runs of a tenant's slot)."""
    expected = 0
    layers = len(layer_sizes)
    if isinstance(runs, RunList):  # straight from its array: no Run made per run
        flat = runs.flat
        runs = zip(flat[0::4], flat[1::4], flat[2::4], flat[3::4])  # type: ignore[assignment]
    for first, count, layer, offset in runs:
        if first != expected or count <= 0:
            raise SnapshotError(f"{what}: runs do not tile the slot (gap or overlap at page {expected})")
        if layer >= 0:
            if layer >= layers:
                raise SnapshotError(f"{what}: run refers to missing layer {layer}")
            if offset % PAGE or offset < 0 or offset + count * PAGE > layer_sizes[layer]:
                raise SnapshotError(f"{what}: run at page {first} points outside layer {layer}")
        elif layer != -1:
            raise SnapshotError(f"{what}: invalid layer index {layer}")
        expected = first + count
    if expected != pages:
        raise SnapshotError(f"{what}: runs cover {expected} pages, the slot has {pages}")
