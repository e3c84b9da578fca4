"""The snapshots a server serves, by name: built through the pool (blocking: boots a VM) and described."""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import msgspec

from hlpool.pool.supervisor import SnapshotHandle
from hlpool.service.api_errors import ApiError
from hlpool.service.schema import NAME_PATTERN, NAME_RULE, SnapshotInfo
from hlpool.snapshot.describe import describe_file


@dataclass
class SnapshotEntry:
    name: str
    handle: SnapshotHandle
    info: SnapshotInfo

    def describe(self) -> SnapshotInfo:
        return self.info


class Snapshots:
    """Name -> :class:`SnapshotEntry`. The ``build_*`` methods block (run them in a thread)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.entries: dict[str, SnapshotEntry] = {}
        self._reserved: set[str] = set()  # names being built

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: str) -> SnapshotEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise ApiError("unknown_snapshot", f"no snapshot named {name!r}; see GET /v1/snapshots")
        return entry

    def check_new_name(self, name: str) -> None:
        if not NAME_PATTERN.match(name):
            raise ApiError("bad_request", f"invalid snapshot name {name!r}: use {NAME_RULE}")
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
        self.entries[entry.name] = entry

    # ---- building (blocking) ------------------------------------------------------------

    def build_file(self, name: str, path: str, source: str | None = None) -> SnapshotEntry:
        """Build or open ``path`` (a guest ELF or .hlsnap) as ``name``."""
        return self._entry(name, self.pool.snapshot(path), source or path)

    def build_script(self, name: str, language: str, source: str) -> SnapshotEntry:
        """Load a script as a layer on its interpreter's base snapshot."""
        return self._entry(name, self.pool.script(language, source),
                           f"{language} script ({len(source)} characters)")

    def build_upload(self, name: str, data: bytes) -> SnapshotEntry:
        """Build an uploaded guest ELF (written to a private file in the snapshot directory meanwhile)."""
        tmp = Path(self.pool.snapshot_dir) / f".upload-{secrets.token_hex(8)}.elf"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return self.build_file(name, str(tmp), source=f"upload of {len(data)} bytes")
        finally:
            tmp.unlink(missing_ok=True)

    def _entry(self, name: str, handle: SnapshotHandle, source: str) -> SnapshotEntry:
        info = describe_file(handle.path)
        info["stored_bytes"] = sum(layer["bytes"] for layer in info["layers"])
        described = {"name": name, "id": handle.id, "sha256": handle.sha256, "source": source, **info}
        return SnapshotEntry(name, handle, msgspec.convert(described, SnapshotInfo))
