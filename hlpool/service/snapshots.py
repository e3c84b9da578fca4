"""The snapshots a server serves, by name: built through the pool (blocking: boots a VM) and described.

A request may name a file on the server host only inside a directory the
operator allows (``--allow-dir``): the path, as given and with its symbolic
links resolved, must lie in one, and the file opened must be a regular file
(opened without blocking, checked with ``fstat``) of at most the upload limit.
A path outside gets the same answer whether or not it exists.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import msgspec

from hlpool import defaults
from hlpool.errors import HlpoolError
from hlpool.memory.mapped_files import NotARegularFile, open_regular
from hlpool.pool.supervisor import SnapshotHandle
from hlpool.service.api_errors import ApiError
from hlpool.service.names import NameRecord, NameTable
from hlpool.service.schema import NAME_PATTERN, NAME_RULE, SnapshotInfo
from hlpool.snapshot.describe import describe_file
from hlpool.snapshot.snapfile import MAGIC as SNAPSHOT_MAGIC

log = logging.getLogger("hlpool.server")


@dataclass
class SnapshotEntry:
    name: str
    handle: SnapshotHandle
    info: SnapshotInfo

    def describe(self) -> SnapshotInfo:
        return self.info


class Snapshots:
    """Name -> :class:`SnapshotEntry`. The ``build_*`` methods block (run them in a thread).

    With a :class:`~hlpool.service.names.NameTable` (several front ends), the names are those of the
    table: :meth:`refresh` (called by :meth:`get` and :meth:`check_new_name`) adopts the names other
    front ends added (opening their store files in this front end's pool) and drops those they removed.
    """

    def __init__(self, pool: Any, allow_dirs: Iterable[str] = (), max_file_size: int = defaults.MAX_BODY,
                 table: NameTable | None = None) -> None:
        self.pool = pool
        self.table = table
        self.entries: dict[str, SnapshotEntry] = {}
        self._reserved: set[str] = set()  # names being built
        self.max_file_size = max_file_size
        # the directories whose files requests may name: as given, and with their symbolic links resolved
        self._given = tuple(os.path.normpath(os.path.abspath(d)) for d in allow_dirs)
        self._real = tuple(os.path.realpath(d) for d in allow_dirs)

    def __len__(self) -> int:
        return len(self.entries)

    def sync(self) -> dict[str, SnapshotEntry]:
        """The entries, after taking the name table's changes (if any)."""
        if self.table is not None and self.table.changed():
            self.refresh()
        return self.entries

    def get(self, name: str) -> SnapshotEntry:
        if self.table is not None and self.table.changed():
            self.refresh()
        entry = self.entries.get(name)
        if entry is None:
            raise ApiError("unknown_snapshot", f"no snapshot named {name!r}; see GET /v1/snapshots")
        return entry

    def check_new_name(self, name: str) -> None:
        if not NAME_PATTERN.match(name):
            raise ApiError("bad_request", f"invalid snapshot name {name!r}: use {NAME_RULE}")
        if self.table is not None and self.table.changed():
            self.refresh()
        if name in self.entries or name in self._reserved:
            raise ApiError("snapshot_exists", f"a snapshot named {name!r} exists already")

    @contextmanager
    def reserve(self, name: str) -> Iterator[None]:
        """Hold ``name`` while its snapshot is built (a second registration of it is refused)."""
        self.check_new_name(name)
        self._reserved.add(name)
        try:
            yield
        finally:
            self._reserved.discard(name)

    def add(self, entry: SnapshotEntry) -> None:
        """Serve ``entry`` (with a name table: publish it; ``snapshot_exists`` if another front end has it)."""
        if self.table is not None:
            record = NameRecord(path=entry.handle.path, language=entry.handle.language,
                                info=msgspec.to_builtins(entry.info), owner=os.getpid())
            if not self.table.claim(entry.name, record):
                raise ApiError("snapshot_exists", f"a snapshot named {entry.name!r} exists already")
        self.entries[entry.name] = entry

    def remove(self, name: str) -> None:
        """Stop serving ``name`` (with a name table: in every front end)."""
        self.entries.pop(name, None)
        if self.table is not None:
            self.table.remove(name)

    def refresh(self) -> None:
        """Take the name table's names (blocking briefly: opens the store files of new names)."""
        assert self.table is not None
        records = self.table.read()
        for name in [n for n, e in self.entries.items()
                     if n not in records or records[n].path != e.handle.path]:
            entry = self.entries.pop(name)
            if not any(e.handle.path == entry.handle.path for e in self.entries.values()):
                try:  # unpins it here; deletes the file if no other process pins it
                    self.pool.remove_snapshot(entry.handle)
                except (HlpoolError, OSError) as exc:  # calls for it still running here: the file stays
                    log.debug("name %s removed elsewhere; its file stays for now: %s", name, exc)
        for name, record in records.items():
            if name in self.entries:
                continue
            try:
                handle = self.pool.snapshot(record.path)
                info = msgspec.convert(record.info, SnapshotInfo)
            except (HlpoolError, OSError, msgspec.ValidationError) as exc:  # removed meanwhile
                log.debug("name %s: cannot open %s: %s", name, record.path, exc)
                continue
            if handle.language != record.language:
                handle = dataclasses.replace(handle, language=record.language)
            self.entries[name] = SnapshotEntry(name, handle, info)

    # ---- files named by requests -------------------------------------------------------

    def check_path_registration(self) -> None:
        """``forbidden`` unless the server allows registering files by path (``--allow-dir``)."""
        if not self._real:
            raise ApiError("forbidden", "registration by path is off on this server: start it with --allow-dir DIR "
                                        "to allow the files under DIR (or upload an ELF with PUT /v1/snapshots/NAME)")

    def open_allowed(self, path: str) -> tuple[int, os.stat_result, str]:
        """Open a file a request names: (fd, stat, real path). Blocking, but never on a file's contents."""
        self.check_path_registration()
        refused = ApiError("forbidden", f"{path!r} is not in a directory this server allows (--allow-dir)")
        # Decided before the file system is asked anything about a path outside: the answer cannot depend
        # on whether it exists.
        if not _inside(os.path.normpath(path), self._given + self._real):
            raise refused
        real = os.path.realpath(path)
        if not _inside(real, self._real):
            raise refused
        try:
            fd, st = open_regular(real)  # O_NONBLOCK: a FIFO cannot stall the thread; fstat: regular files only
        except NotARegularFile:
            raise ApiError("snapshot_error", f"{path}: not a regular file") from None
        except OSError as exc:
            raise ApiError("snapshot_error", f"{path}: {exc.strerror}") from None
        try:
            if not _inside(_opened_path(fd), self._real):  # a directory on the way was swapped meanwhile
                raise refused
            if st.st_size > self.max_file_size:
                raise ApiError("snapshot_error", f"{path}: {st.st_size} bytes, more than this server's limit of "
                                                 f"{self.max_file_size} bytes (--max-body)")
        except BaseException:
            os.close(fd)
            raise
        return fd, st, real

    # ---- building (blocking) ------------------------------------------------------------

    def build_file(self, name: str, path: str, source: str | None = None) -> SnapshotEntry:
        """Build or open ``path`` (a guest ELF or .hlsnap, trusted: the operator's) as ``name``."""
        return self._entry(name, self.pool.snapshot(path), source or path)

    def build_path(self, name: str, path: str) -> SnapshotEntry:
        """Serve the file a request names (see :meth:`open_allowed`) as ``name``: a snapshot file in place
        (it names its parents relative to itself), a guest ELF from a private copy of what was checked."""
        fd, st, real = self.open_allowed(path)
        try:
            if os.pread(fd, len(SNAPSHOT_MAGIC), 0) == SNAPSHOT_MAGIC:
                data = None
            else:
                data = _read_all(fd, self.max_file_size)
        finally:
            os.close(fd)
        if data is None:
            return self.build_file(name, real, source=path)
        if len(data) > self.max_file_size:
            raise ApiError("snapshot_error", f"{path}: more than this server's limit of {self.max_file_size} bytes")
        return self.build_upload(name, data, source=path)

    def build_script(self, name: str, language: str, source: str) -> SnapshotEntry:
        """Load a script as a layer on its interpreter's base snapshot."""
        return self._entry(name, self.pool.script(language, source),
                           f"{language} script ({len(source)} characters)")

    def build_derived(self, name: str, base: SnapshotEntry, calls: list[tuple[str, list]], map_files: list[str],
                      retain: list[str], timeout: float) -> SnapshotEntry:
        """A child of ``base``: ``map_files`` (each checked as :meth:`open_allowed`) mapped, ``calls`` run keeping
        their state, captured as a layer in the store (by the pool's builder)."""
        files = []
        for path in map_files:
            fd, _st, real = self.open_allowed(path)
            os.close(fd)
            files.append(real)
        handle = self.pool.derive(base.handle, calls, map_files=files, retain=retain or None, timeout=timeout)
        return self._entry(name, handle, f"derived from {base.name} ({len(calls)} call(s), {len(files)} file(s))")

    def build_upload(self, name: str, data: bytes, source: str | None = None) -> SnapshotEntry:
        """Build an uploaded guest ELF (written to a private file in the snapshot directory meanwhile)."""
        tmp = Path(self.pool.snapshot_dir) / f".upload-{secrets.token_hex(8)}.elf"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return self.build_file(name, str(tmp), source=source or f"upload of {len(data)} bytes")
        finally:
            tmp.unlink(missing_ok=True)

    def _entry(self, name: str, handle: SnapshotHandle, source: str) -> SnapshotEntry:
        info = describe_file(handle.path)
        info["stored_bytes"] = sum(layer["bytes"] for layer in info["layers"])
        described = {"name": name, "id": handle.id, "sha256": handle.sha256, "source": source, **info}
        return SnapshotEntry(name, handle, msgspec.convert(described, SnapshotInfo))


def _inside(path: str, directories: tuple[str, ...]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in directories)


def _opened_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""  # unknown: inside no directory


def _read_all(fd: int, limit: int) -> bytes:
    """Up to ``limit + 1`` bytes of a regular file (one more than allowed shows that it grew)."""
    chunks, size = [], 0
    while size <= limit:
        chunk = os.pread(fd, min(1 << 20, limit + 1 - size), size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
