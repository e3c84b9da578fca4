"""Host files mapped read-only into a guest (``Sandbox.map_file``).

Each file gets its own read-only KVM memory slot in the files window, backed
by a shared read-only view of the file (page-cache pages, never copied), and
read-only, no-execute page-table entries (the whole window is mapped that way
from the start, so nothing is rebuilt). The guest learns its mappings from
the files table in the system slot (``hl_mapped_file``), by name.

The files of the snapshot a sandbox is made from stay mapped for its whole
life; files mapped since are dropped by every restore (:meth:`SandboxFiles.reset`)
or by :meth:`SandboxFiles.unmap`. Before each call the machine checks that no
mapped file changed (:meth:`SandboxFiles.check`: one ``fstat`` per file).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hlpool import _mapping
from hlpool.errors import HlpoolError, SnapshotError, SnapshotIntegrityError, SnapshotParentError
from hlpool.guest import abi
from hlpool.guest.layout import FILES_TABLE, LARGE_PAGE, PAGE, SLOT_FIRST_FILE, Layout, align_up, page_up
from hlpool.kvm.vm import MemorySlot, Vm
from hlpool.memory.layers import Layer

if TYPE_CHECKING:
    from hlpool.memory.guest_memory import GuestMemory

NAME_BYTES = 48


@dataclass(frozen=True)
class MappedFile:
    """A host file mapped into guest memory, as a snapshot records it."""

    path: str
    guest_address: int
    size: int
    sha256: bytes
    fingerprint: tuple[int, int, int] = (0, 0, 0)  # (inode, size, mtime_ns) when the hash was taken
    name: str = ""  # what the guest looks it up by (hl_mapped_file); "" means the path's basename

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", basename_name(self.path))


def basename_name(path: str) -> str:
    """The guest name of a file recorded without one: its basename, cut to the table's 47 bytes."""
    raw = os.path.basename(path).encode("utf-8", "replace")[:NAME_BYTES - 1]
    return raw.decode("utf-8", "ignore")


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a mapping in the guest's files table (None if it can)."""
    if not isinstance(name, str):
        return "it is not a string"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    if not 0 < size < NAME_BYTES:
        return f"it must be 1-{NAME_BYTES - 1} bytes of UTF-8, not {size}"
    if not name.isprintable() or "/" in name:
        return "it must be printable and contain no '/'"
    return None


def fingerprint(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class NotARegularFile(OSError):
    """The path names a directory, device, FIFO or socket, not a regular file."""


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only without blocking (a FIFO cannot stall us) and check it is a
    regular file; returns (fd, stat). Raises OSError (:class:`NotARegularFile` for the rest)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def hash_file(fd: int) -> bytes:
    digest = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return digest.digest()
        digest.update(chunk)
        offset += len(chunk)


@dataclass
class _Attached:
    file: MappedFile
    fd: int
    view: int
    view_size: int
    slot: int


class SandboxFiles:
    """The files mapped into one VM: their memory slots and the guest's files table.

    The first ``inherited`` files are the snapshot's; the rest were mapped since.
    ``extra`` (files mapped since the snapshot) and ``watched`` (any file mapped)
    are plain attributes so that the machine's per-call checks cost one test when
    they have nothing to do.
    """

    def __init__(self, vm: Vm, memory: "GuestMemory", layout: Layout, inherited: tuple[MappedFile, ...]) -> None:
        self._vm = vm
        self._memory = memory
        self._window = layout.files
        self._attached: list[_Attached] = []
        self._inherited = 0
        self.extra = False
        self.watched = False
        try:
            for f in inherited:
                self._attach(f)
        except BaseException:
            self.close()
            raise
        self._inherited = len(self._attached)

    @property
    def files(self) -> tuple[MappedFile, ...]:
        return tuple(a.file for a in self._attached)

    def map(self, path: str, guest_address: int | None, name: str | None = None) -> tuple[int, int]:
        path = os.path.abspath(path)
        name = self._new_name(path, name)
        try:
            fd, st = open_regular(path)
        except NotARegularFile:
            raise HlpoolError(f"map_file: {path} is not a regular, non-empty file") from None
        except OSError as exc:
            raise HlpoolError(f"map_file: cannot open {path}: {exc.strerror}") from None
        try:
            if st.st_size == 0:
                raise HlpoolError(f"map_file: {path} is not a regular, non-empty file")
            size = st.st_size
            address = self._place(page_up(size), guest_address, path)
            mapped = MappedFile(path=path, guest_address=address, size=size, sha256=hash_file(fd),
                                fingerprint=fingerprint(st), name=name)
        finally:
            os.close(fd)
        self._attach(mapped)
        self.extra = True
        return address, mapped.size

    def _new_name(self, path: str, name: str | None) -> str:
        if name is None:
            name = os.path.basename(path)
            problem = name_problem(name)
            if problem:
                raise HlpoolError(f"map_file: the basename of {path} cannot name it in the guest ({problem}); "
                                  "pass name=")
        else:
            problem = name_problem(name)
            if problem:
                raise HlpoolError(f"map_file: invalid name {name!r}: {problem}")
        for a in self._attached:
            if a.file.name == name:
                raise HlpoolError(f"map_file: a file named {name!r} is already mapped ({a.file.path}); "
                                  f"pass another name= for {path}")
        return name

    def unmap(self, name_or_path: str) -> None:
        """Unmap a file mapped since the snapshot, found by its guest name or else by its path."""
        index = next((i for i, a in enumerate(self._attached) if a.file.name == name_or_path), None)
        if index is None:
            path = os.path.abspath(name_or_path)
            index = next((i for i, a in enumerate(self._attached) if a.file.path == path), None)
        if index is None:
            raise HlpoolError(f"unmap_file: no mapped file is named {name_or_path!r} or has that path; mapped: "
                              f"{[a.file.name for a in self._attached] or 'none'}")
        if index < self._inherited:
            f = self._attached[index].file
            raise HlpoolError(f"unmap_file: {f.name!r} ({f.path}) belongs to the snapshot this sandbox was made "
                              "from; only files mapped since the snapshot can be unmapped")
        self._detach(index)
        self.extra = len(self._attached) > self._inherited
        self._write_table()

    def reset(self) -> None:
        """Back to the snapshot's mappings: unmap every file mapped since (on restore)."""
        while len(self._attached) > self._inherited:
            self._detach(len(self._attached) - 1)
        self.extra = False
        self._write_table()

    def switch(self, files: tuple[MappedFile, ...], table_intact: bool = False) -> None:
        """Hold exactly ``files`` (another snapshot's), as a fresh sandbox of it would (on a switch).

        Files the two lists share in the same place stay attached; the others are detached
        and attached. The files table is rewritten whatever it holds now, unless
        ``table_intact`` (nothing wrote the table's page since it was last written) and the
        files are the ones attached already.
        """
        if table_intact and len(self._attached) == self._inherited == len(files) and all(
                a.file == f for a, f in zip(self._attached, files)):
            return
        keep = 0
        while (keep < len(files) and keep < len(self._attached) and keep < self._inherited
               and self._attached[keep].file == files[keep]):
            keep += 1
        while len(self._attached) > keep:
            self._detach(len(self._attached) - 1)
        for f in files[keep:]:
            self._attach(f)
        self._inherited = len(self._attached)
        self.extra = False
        self.watched = bool(self._attached)
        self._write_table()

    def check(self) -> None:
        """Raise :class:`SnapshotParentError` if a mapped file changed since it was hashed
        (``fstat`` of the descriptor the slot maps: inode, size, mtime)."""
        for a in self._attached:
            f = a.file
            try:
                st = os.fstat(a.fd)
            except OSError as exc:
                raise SnapshotParentError(f"mapped file {f.path} cannot be checked: {exc.strerror}") from None
            inode, size, mtime_ns = f.fingerprint
            if st.st_mtime_ns != mtime_ns or st.st_size != size or st.st_ino != inode:
                since = "since the snapshot" if self._attached.index(a) < self._inherited else "since map_file"
                raise SnapshotParentError(
                    f"mapped file {f.path} (guest name {f.name!r}) changed {since} (size or mtime differ); the "
                    "call was not run. Put the file back, or unmap_file()/restore() if it was mapped since "
                    "the snapshot")

    def describe(self, address: int) -> str | None:
        for a in self._attached:
            f = a.file
            if f.guest_address <= address < f.guest_address + page_up(f.size):
                return f"in read-only mapped file {f.path}"
        files = self._window
        if files.start <= address < files.end:
            return "unmapped part of the files window"
        return None

    def _place(self, size: int, wanted: int | None, path: str) -> int:
        window = self._window
        if len(self._attached) >= abi.HL_FILES_MAX:
            raise HlpoolError(f"map_file: at most {abi.HL_FILES_MAX} files per sandbox")
        if wanted is None:
            end = max((a.file.guest_address + page_up(a.file.size) for a in self._attached), default=window.start)
            wanted = align_up(end, LARGE_PAGE)
        if wanted % PAGE:
            raise HlpoolError(f"map_file: guest_address {wanted:#x} is not page aligned")
        if not (window.start <= wanted and wanted + size <= window.end):
            raise HlpoolError(f"map_file: {path} ({size} bytes) does not fit the files window at {wanted:#x} "
                              f"(window {window.start:#x}-{window.end:#x}; raise MemoryConfig.files_window)")
        for a in self._attached:
            f = a.file
            if wanted < f.guest_address + page_up(f.size) and f.guest_address < wanted + size:
                raise HlpoolError(f"map_file: {wanted:#x} overlaps {f.path}")
        return wanted

    def _attach(self, f: MappedFile) -> None:
        try:
            fd, st = open_regular(f.path)
        except OSError as exc:
            raise SnapshotParentError(f"mapped file {f.path} is not available: {exc.strerror}") from None
        try:
            if fingerprint(st) != f.fingerprint:
                raise SnapshotParentError(f"mapped file {f.path} changed since it was hashed "
                                          f"(inode, size or mtime differ)")
            view = _mapping.map_file_view(fd, page_up(f.size))
        except BaseException:
            os.close(fd)
            raise
        used = {a.slot for a in self._attached}
        slot = next(s for s in itertools.count(SLOT_FIRST_FILE) if s not in used)
        attached = _Attached(f, fd, view, page_up(f.size), slot)
        try:
            self._vm.set_memory_slot(MemorySlot(slot, f.guest_address, page_up(f.size), view, readonly=True))
        except BaseException:
            _mapping.unmap(view, page_up(f.size))
            os.close(fd)
            raise
        self._attached.append(attached)
        self.watched = True
        self._write_table()

    def _detach(self, index: int) -> None:
        """Delete the file's KVM slot (size 0), then release its view and descriptor."""
        a = self._attached[index]
        self._vm.set_memory_slot(MemorySlot(a.slot, a.file.guest_address, 0, 0, readonly=True))
        self._vm.slots.pop(a.slot, None)
        del self._attached[index]
        self.watched = bool(self._attached)
        try:
            _mapping.unmap(a.view, a.view_size)
        finally:
            os.close(a.fd)

    def _write_table(self) -> None:
        table = _table_bytes(tuple((a.file.guest_address, a.file.size, a.file.name) for a in self._attached))
        current = self._memory.read(FILES_TABLE, len(table))
        if current != table:
            self._memory.write(FILES_TABLE, table)

    def close(self) -> None:
        for a in self._attached:
            try:
                _mapping.unmap(a.view, a.view_size)
            finally:
                os.close(a.fd)
        self._attached.clear()
        self.extra = self.watched = False


@functools.lru_cache(maxsize=256)
def _table_bytes(entries: tuple[tuple[int, int, str], ...]) -> bytes:
    """The guest's files table (hlpool_abi.h struct hl_files_table) for (address, size, name) entries."""
    table = bytearray(abi.FILES_TABLE_SIZE)
    abi.FILES_TABLE_HEADER.pack_into(table, 0, len(entries), len(entries))
    for i, (address, size, name) in enumerate(entries):
        raw = name.encode("utf-8", "replace")[:NAME_BYTES - 1]
        abi.FILE_ENTRY.pack_into(table, abi.FILES_TABLE_HEADER.size + i * abi.FILE_ENTRY.size, address, size, raw)
    return bytes(table)


def check_unchanged(layers: "tuple[Layer, ...]", files: "tuple[MappedFile, ...]") -> None:
    """Cheap check (fstat/stat) that no snapshot file or mapped file changed since it was verified."""
    for layer in layers:
        if layer.closed:  # its descriptor may be another file's now
            raise SnapshotError(f"{layer!r} was closed")
        if layer.path is None:
            continue
        try:
            current = fingerprint(os.fstat(layer.fd))
        except OSError as exc:
            raise SnapshotIntegrityError(f"{layer.path}: cannot stat snapshot file: {exc.strerror}") from None
        if current != layer.fingerprint:
            raise SnapshotIntegrityError(f"{layer.path}: snapshot file was modified after it was verified "
                                         "(size or mtime changed); a snapshot file must never change")
    for f in files:
        try:
            st = os.stat(f.path)
        except OSError as exc:
            raise SnapshotParentError(f"mapped file {f.path} is gone: {exc.strerror}") from None
        if fingerprint(st) != f.fingerprint:
            raise SnapshotParentError(f"mapped file {f.path} changed since it was hashed")
