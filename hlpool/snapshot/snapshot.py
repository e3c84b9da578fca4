"""Snapshots: the initialised state of a guest, as immutable layers.

A snapshot is vCPU state + a memory layout + for each snapshot slot (system,
main) an ordered list of runs, each backed by a layer (an immutable file, in
memory or on disk) or by zero pages. Sandboxes map the layers MAP_PRIVATE,
so every sandbox of a snapshot shares its pages and pays only for pages it
writes.

- :meth:`Snapshot.from_elf` loads, relocates and boots a guest, runs
  ``hl_main`` once and captures the result as a single-layer snapshot.
- :meth:`Sandbox.snapshot` (:func:`~hlpool.snapshot.capture.capture`) stores
  only the pages that differ from the sandbox's snapshot in a new layer on top of it.
- :meth:`Snapshot.persist` / :meth:`Snapshot.open` write and read snapshot
  files (the format and both functions: :mod:`hlpool.snapshot.snapfile`).
- :meth:`Snapshot.flatten` copies a chain of layers into one standalone layer
  (:mod:`hlpool.snapshot.flatten`).

The class is a value: it sits below :class:`~hlpool.Sandbox`, and the modules
that produce snapshots (initialise, capture, snapfile) never import it; they
build instances through the class they are given or ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from hlpool.defaults import INIT_TIMEOUT
from hlpool.errors import SnapshotError
from hlpool.guest.layout import PAGE, Layout, MemoryConfig
from hlpool.kvm.vcpu import VcpuState
from hlpool.machine.machine import HostFunction
from hlpool.memory.layers import Layer, Run, RunList, check_runs
from hlpool.memory.mapped_files import MappedFile
from hlpool.memory.switch import family_of
from hlpool.snapshot.flatten import flatten_snapshot
from hlpool.snapshot.initialise import snapshot_from_elf
from hlpool.snapshot.regions import Region, regions_of
from hlpool.snapshot.snapfile import read_snapshot, write_snapshot

__all__ = ["Region", "Snapshot"]

log = logging.getLogger(__name__)


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
    runs: "dict[str, RunList | list[Run]]"  # a RunList per slot once made
    image_segments: tuple[tuple[int, int, str], ...] = ()
    mapped_files: tuple[MappedFile, ...] = ()
    parent: "Snapshot | None" = None
    path: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Kept compactly (a worker holds thousands of snapshots); reads give Run tuples as before.
        object.__setattr__(self, "runs", {slot: runs if isinstance(runs, RunList) else RunList(runs)
                                          for slot, runs in self.runs.items()})
        # The only check of a snapshot file's runs (read_snapshot relies on it): keep it here.
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
        host_functions: Mapping[str, HostFunction] | None = None,
        config: MemoryConfig | None = None,
        timeout: float | None = INIT_TIMEOUT,
    ) -> "Snapshot":
        """Load and relocate a guest ELF, run its ``hl_main`` in a VM and capture the result.

        ``heap_size``/``stack_size`` override ``config`` (a :class:`MemoryConfig`).
        ``host_functions`` are available to ``hl_main``. Raises
        :class:`GuestImageError` if the file is not a usable guest or its
        initialisation fails (the cause is chained).
        """
        return snapshot_from_elf(cls, path, heap_size=heap_size, stack_size=stack_size,
                                 host_functions=host_functions, config=config, timeout=timeout)

    @classmethod
    def open(cls, path: str | os.PathLike, *, max_memory: int | None = None,
             max_layer_size: int | None = None, files_path: "Sequence[str | os.PathLike]" = (),
             parents: "dict[bytes, Snapshot] | None" = None) -> "Snapshot":
        """Open and fully validate a snapshot file (and its parents) before anything is mapped.

        ``max_memory`` bounds the guest memory the file may describe (default 256 GiB),
        ``max_layer_size`` the page data each file of the chain may hold (default 8 GiB),
        which bounds the time spent hashing. Every failure is a :class:`SnapshotError`; a
        file that needs what this host or this hlpool lacks (hlpool version, guest ABI
        version, CPU vendor, XSAVE components, KVM flavour) is a
        :class:`SnapshotCompatibilityError` naming which (rules: :mod:`hlpool.snapshot.snapfile`).

        Mapped host files are found at the path recorded, else at the path recorded relative
        to the snapshot file (a directory holding both can move), else by file name in each
        directory of ``files_path``; wherever found, a file must have the recorded SHA-256.
        ``parents``: a cache of snapshots opened before, by their top layer's hash, used for and
        filled with this file's parents (see :func:`hlpool.snapshot.snapfile.read_snapshot`).
        """
        return read_snapshot(os.fspath(path), cls, max_memory=max_memory, max_layer_size=max_layer_size,
                             files_path=[os.fspath(d) for d in files_path], parents=parents)

    def persist(self, path: str | os.PathLike) -> "Snapshot":
        """Write this snapshot's own layer to ``path`` (atomically, read-only) and return the
        file-backed snapshot.

        Parents still in memory are persisted first, next to ``path``: the parent at index
        ``n`` of :attr:`layers` (0 is the base) is written to ``<stem>.parent-<n>.hlsnap``,
        where ``<stem>`` is ``path`` without its ``.hlsnap`` suffix (``child.hlsnap`` ->
        ``child.parent-1.hlsnap``). Like ``path`` itself, an existing file of that name is
        replaced. Parents already in files stay where they are. The returned snapshot's
        :attr:`parent` chain is the file-backed one.
        """
        path = os.path.abspath(os.fspath(path))
        if all(layer.persisted for layer in self.layers[:-1]):
            return write_snapshot(self, path)
        chain = self._chain()
        stem = path[:-len(".hlsnap")] if path.endswith(".hlsnap") else path
        below: Snapshot | None = None
        for n, snap in enumerate(chain[:-1]):
            if below is not None:
                snap = dataclasses.replace(snap, layers=below.layers + (snap.layers[-1],), parent=below)
            if not snap.layers[-1].persisted:
                snap = write_snapshot(snap, f"{stem}.parent-{n}.hlsnap")
            below = snap
        assert below is not None
        return write_snapshot(dataclasses.replace(self, layers=below.layers + (self.layers[-1],), parent=below),
                              path)

    def _chain(self) -> list["Snapshot"]:
        """This snapshot and its parents, base first; each one adds one layer to the one below."""
        chain: list[Snapshot] = []
        snap: Snapshot | None = self
        while snap is not None:
            chain.append(snap)
            snap = snap.parent
        chain.reverse()
        if len(chain) != len(self.layers) or any(
                len(snap.layers) != n + 1 or snap.layers[-1] is not self.layers[n] for n, snap in enumerate(chain)):
            raise SnapshotError("cannot persist the parents of this snapshot: its parent chain does not match "
                                "its layers (persist or flatten the parent first)")
        return chain

    def flatten(self) -> "Snapshot":
        """One standalone layer with this snapshot's memory (the whole chain's pages merged).

        The result is in memory, equal in guest-visible memory, vCPU state, exports and
        mapped files, with no parent; ``flatten().persist(path)`` writes one file that opens
        without any of the chain's files. Costs a copy of every non-zero page.
        """
        return flatten_snapshot(self)

    # ---- description --------------------------------------------------------------------

    @functools.cached_property
    def family(self) -> str:
        """Which sandboxes can :meth:`Sandbox.switch` to this snapshot: those at a snapshot of the
        same family, i.e. finished snapshots with the same layout (memory configuration and image
        size) and the same base layer (``layers[0]``, by content hash): an interpreter base and the
        scripts loaded on it, a C base and its children. Mapped files and vCPU state may differ.
        A flattened snapshot starts a family of its own. Computed once per snapshot object."""
        return family_of(self)

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
        return regions_of(self)

    def stored_bytes(self) -> int:
        """Bytes of page data in this snapshot's own (top) layer."""
        return self.layers[-1].size

    def __repr__(self) -> str:
        where = self.path or "memory"
        return (f"<Snapshot {where} layers={self.depth} exports={list(self.exports or ())} "
                f"own={self.stored_bytes()} bytes>")


