"""The snapshot names shared by the front ends of one ``hlpool serve --frontends K`` server.

One small JSON file per name in a directory private to the server run (made by
the supervisor, removed when it exits): the store file the name serves, the
script language (if any) and its description. A name is claimed atomically
(``link(2)`` of a private temporary file: fails if the name exists), removed
with ``unlink(2)``; every change also bumps a 64-bit generation counter in a
shared memory-mapped file, so that a front end learns of changes with one
memory read per request (:meth:`NameTable.changed`) and rescans the directory
only then. Directory mtimes are not used: their granularity (the kernel's
coarse clock) can hide two changes in one tick.

The names are per server run, not kept in the snapshot store: two servers
sharing one store (or one after the other) do not see each other's names,
as with a single front end.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import secrets
import struct
from typing import Any

import msgspec

log = logging.getLogger("hlpool.server")

_GEN = struct.Struct("<Q")
_SUFFIX = ".json"


class NameRecord(msgspec.Struct, frozen=True):
    """What a name holds: its store file, script language, and description (a SnapshotInfo as JSON values)."""

    path: str
    language: str | None
    info: dict[str, Any]
    owner: int = 0  # pid of the front end that registered it


_decoder = msgspec.json.Decoder(NameRecord)


def create_table(directory: str) -> None:
    """Make an empty table in ``directory`` (the supervisor does, before any front end starts)."""
    os.makedirs(os.path.join(directory, "names"), mode=0o700, exist_ok=True)
    with open(os.path.join(directory, "generation"), "wb") as f:
        f.write(_GEN.pack(0))


class NameTable:
    """One front end's view of the shared names (see the module docstring)."""

    @staticmethod
    def names_in(directory: str) -> list[str]:
        """The names in the table of ``directory`` now."""
        files = os.listdir(os.path.join(directory, "names"))
        return [f[:-len(_SUFFIX)] for f in files if f.endswith(_SUFFIX) and not f.startswith(".")]

    def __init__(self, directory: str) -> None:
        self.names_dir = os.path.join(directory, "names")
        self._gen_fd = os.open(os.path.join(directory, "generation"), os.O_RDWR | os.O_CLOEXEC)
        self._gen = mmap.mmap(self._gen_fd, _GEN.size)
        self.seen = -1  # the generation last read (-1: never)

    def close(self) -> None:
        try:
            self._gen.close()
        except BufferError:
            pass
        os.close(self._gen_fd)

    def generation(self) -> int:
        return _GEN.unpack_from(self._gen, 0)[0]

    def changed(self) -> bool:
        """True if a name was added or removed since the last :meth:`read` (one memory read)."""
        return _GEN.unpack_from(self._gen, 0)[0] != self.seen

    def _bump(self) -> None:
        fcntl.flock(self._gen_fd, fcntl.LOCK_EX)
        try:
            _GEN.pack_into(self._gen, 0, _GEN.unpack_from(self._gen, 0)[0] + 1)
        finally:
            fcntl.flock(self._gen_fd, fcntl.LOCK_UN)

    def read(self) -> dict[str, NameRecord]:
        """Every name now (and remember the generation read)."""
        self.seen = self.generation()  # read first: a change during the scan shows again next time
        records = {}
        try:
            files = os.listdir(self.names_dir)
        except FileNotFoundError:  # the server is going away
            return {}
        for file in files:
            if not file.endswith(_SUFFIX) or file.startswith("."):
                continue
            try:
                with open(os.path.join(self.names_dir, file), "rb") as f:
                    records[file[:-len(_SUFFIX)]] = _decoder.decode(f.read())
            except FileNotFoundError:  # removed meanwhile
                continue
            except (OSError, msgspec.ValidationError, msgspec.DecodeError) as exc:
                log.warning("name table: skipping %s: %s", file, exc)
        return records

    def claim(self, name: str, record: NameRecord) -> bool:
        """Publish ``name`` unless it exists; False if another front end has it."""
        tmp = os.path.join(self.names_dir, f".{name}.{secrets.token_hex(6)}")
        with open(tmp, "xb") as f:
            f.write(msgspec.json.encode(record))
        try:
            os.link(tmp, os.path.join(self.names_dir, name + _SUFFIX))
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        self._bump()
        return True

    def remove(self, name: str) -> bool:
        """Remove ``name``; False if it was not there."""
        try:
            os.unlink(os.path.join(self.names_dir, name + _SUFFIX))
        except FileNotFoundError:
            return False
        self._bump()
        return True
