"""A sandbox's guest memory: host mappings, KVM memory slots, reads/writes, restore.

Each snapshot slot (system, main) is one reserved host range on which the
snapshot's runs are mapped with MAP_FIXED: layer files MAP_PRIVATE (shared
page-cache pages until the guest writes one), zero runs as anonymous memory.
The io slot (IN/REPLY) and the VIF page are plain anonymous memory.

The main area (everything the guest can write) is two KVM slots over one
host range: the large "logged" slot with KVM dirty logging, and the small
"hot" slot (call page + top of the stack) that every call writes, which is
treated as always dirty. Restore (mechanism in ``_mapping.DirtySet.restore``,
policy in :class:`RestorePolicy`) puts back exactly the logged slot's dirty
pages plus the hot pages.
"""

from __future__ import annotations

import ctypes
from array import array
from dataclasses import dataclass

from hlpool import _mapping
from hlpool.errors import GuestProtocolError
from hlpool.guest.layout import PAGE, SLOT_HOT, SLOT_IO, SLOT_MAIN, SLOT_SYSTEM, SLOT_VIF, VIF_PAGE, Area, Layout
from hlpool.kvm.vm import MemorySlot, Vm
from hlpool.memory.layers import Layer, Run


@dataclass(frozen=True)
class RestorePolicy:
    """How restore treats the pages a call dirtied.

    Up to ``keep_resident_pages`` pages per sandbox are copied back from the
    snapshot and stay private to the sandbox: the guest touches them again
    at native speed. Beyond that budget, dirty pages are dropped
    (MADV_DONTNEED): their memory goes back to the host and the next touch
    reads the snapshot again through a page fault.
    """

    keep_resident_pages: int = 1024
    #: Entries of KVM's dirty ring per vCPU (16 bytes each; a power of two). A call that
    #: dirties more pages takes one exit per ring-full, and pages harvested mid-call are
    #: write-protected again, so heavy writers want a larger ring; 0 uses dirty bitmaps.
    dirty_ring_entries: int = 4096

    def __post_init__(self) -> None:
        if self.keep_resident_pages < 0:
            raise ValueError("keep_resident_pages must be >= 0")
        n = self.dirty_ring_entries
        if n and (n < 256 or n & (n - 1) or n > 1 << 16):
            raise ValueError("dirty_ring_entries must be 0 or a power of two in [256, 65536]")


@dataclass
class RestoreStats:
    dirty: int = 0
    copied: int = 0
    dropped: int = 0
    resident: int = 0


class SlotMapping:
    """One reserved host range holding a slot, with the snapshot's runs mapped on it.

    With ``private_copy`` the layer bytes are copied into anonymous memory
    instead of mapped: the design before snapshot files, kept as the baseline
    the density benchmark compares against.
    """

    def __init__(self, area: Area, runs: list[Run] | None, layers: tuple[Layer, ...],
                 private_copy: bool = False) -> None:
        self.area = area
        self.size = area.size
        self.host = _mapping.reserve(area.size)
        try:
            if runs is None:
                _mapping.map_anonymous_fixed(self.host, area.size)
            else:
                for run in runs:
                    addr = self.host + run.first_page * PAGE
                    if run.layer < 0:
                        _mapping.map_anonymous_fixed(addr, run.count * PAGE)
                    elif private_copy:
                        _mapping.map_anonymous_fixed(addr, run.count * PAGE)
                        _mapping.write_bytes(addr, layers[run.layer].read(run.offset, run.count * PAGE))
                    else:
                        layer = layers[run.layer]
                        _mapping.map_file_fixed(addr, run.count * PAGE, layer.fd, layer.file_offset(run.offset))
        except BaseException:
            _mapping.unmap(self.host, area.size)
            raise

    def host_address(self, guest_address: int) -> int:
        return self.host + (guest_address - self.area.start)

    def close(self) -> None:
        if self.host:
            _mapping.unmap(self.host, self.size)
            self.host = 0


class GuestMemory:
    """All memory of one sandbox's VM."""

    def __init__(self, vm: Vm, layout: Layout, runs: dict[str, list[Run]], layers: tuple[Layer, ...],
                 policy: RestorePolicy, private_copy: bool = False) -> None:
        self.layout = layout
        self.policy = policy
        self._slots: dict[str, SlotMapping] = {}
        self._vif_host = 0  # where this process sees the VIF page (see _reset_vif_page)
        try:
            self._slots["vif"] = SlotMapping(Area("vif", VIF_PAGE, PAGE), None, layers)
            self._vif_host = self._slots["vif"].host
            self._slots["system"] = SlotMapping(layout.system, runs["system"], layers, private_copy)
            self._slots["main"] = SlotMapping(layout.main, runs["main"], layers, private_copy)
            self._slots["io"] = SlotMapping(layout.io, None, layers)
            for slot_id, area, readonly, log in ((SLOT_VIF, self._slots["vif"].area, False, False),
                                                 (SLOT_SYSTEM, layout.system, True, False),
                                                 (SLOT_MAIN, layout.logged, False, True),
                                                 (SLOT_HOT, layout.hot, False, False),
                                                 (SLOT_IO, layout.io, True, False)):
                host = self.slot_of(area.start, area.size).host_address(area.start)
                vm.set_memory_slot(MemorySlot(slot_id, area.start, area.size, host, readonly=readonly,
                                              log_dirty=log))
        except BaseException:
            self.close()
            raise
        self.vm = vm
        main = self._slots["main"]
        self.main_host = main.host
        self.main_pages = main.size // PAGE
        # Restore inputs: the main slot's runs and where their pristine bytes are.
        main_runs = runs["main"]
        self._run_first = array("Q", (r.first_page for r in main_runs))
        self._run_count = array("Q", (r.count for r in main_runs))
        self._run_source = array("Q", (layers[r.layer].view() + r.offset if r.layer >= 0 else 0
                                       for r in main_runs))
        logged_pages = layout.logged.size // PAGE
        self._pending = _mapping.DirtySet(self.main_pages)  # pages to restore (main-area page indices)
        self._hot_first = logged_pages  # the hot slot's pages: always restored, outside the budget
        self._resident = bytearray(self.main_pages)
        self._resident_count = 0
        # Dirty tracking: KVM's dirty ring when the vCPU exists and KVM has one (cost follows
        # dirty pages), else KVM_GET_DIRTY_LOG into a bitmap (cost follows the slot's size).
        self._ring = 0
        self._ring_entries = 0
        self._scratch = array("Q", bytes(8 * ((logged_pages + 63) // 64)))

    # ---- access --------------------------------------------------------------------

    def slot_of(self, guest_address: int, size: int) -> SlotMapping:
        for m in self._slots.values():
            if m.area.start <= guest_address and guest_address + size <= m.area.end:
                return m
        raise GuestProtocolError(f"guest range {guest_address:#x}+{size:#x} is outside guest memory")

    def host_address(self, guest_address: int, size: int = 1) -> int:
        """Host address of guest memory; raises if the range is not inside one slot."""
        return self.slot_of(guest_address, size).host_address(guest_address)

    def view(self, area: Area) -> memoryview:
        """A writable byte view of an area (valid while this GuestMemory is open)."""
        addr = self.host_address(area.start, area.size)
        return memoryview((ctypes.c_char * area.size).from_address(addr)).cast("B")

    def read(self, guest_address: int, size: int) -> bytes:
        return _mapping.read_bytes(self.host_address(guest_address, size), size)

    def write(self, guest_address: int, data: bytes) -> None:
        _mapping.write_bytes(self.host_address(guest_address, len(data)), data)

    # ---- dirty pages and restore ------------------------------------------------------

    @staticmethod
    def enable_dirty_ring(vm: Vm, policy: RestorePolicy) -> int:
        """Turn on KVM's dirty ring for ``vm`` if KVM offers one (before any vCPU exists).

        Returns the number of ring entries per vCPU, or 0 (then dirty bitmaps are used).
        """
        return vm.enable_dirty_ring(policy.dirty_ring_entries) if policy.dirty_ring_entries else 0

    def attach_dirty_ring(self, ring_address: int, entries: int) -> None:
        """Use the vCPU's mapped dirty ring from now on."""
        self._ring, self._ring_entries = ring_address, entries

    def collect_dirty(self) -> None:
        """Move the pages the guest wrote (and the hot pages, always) into the pending set.

        Called after every call and when KVM reports a full dirty ring.
        """
        if self._ring:
            self._pending.harvest_ring(self.vm.fd, self._ring, self._ring_entries, SLOT_MAIN)
        else:
            _mapping.get_dirty_log(self.vm.fd, SLOT_MAIN, self._scratch)
            self._pending.add_bitmap(self._scratch)
        self._pending.add_range(self._hot_first, self.main_pages - self._hot_first)

    def pending_dirty_pages(self) -> list[int]:
        """Main-area page indices written since the last restore (after :meth:`collect_dirty`)."""
        return self._pending.pages()

    def restore(self) -> RestoreStats:
        """Put every page written since the last restore back to the snapshot."""
        self.collect_dirty()
        stats = RestoreStats()
        copied, dropped, self._resident_count = self._pending.restore(
            self.main_host, self._run_first, self._run_count, self._run_source,
            self._resident, self._resident_count, self.policy.keep_resident_pages, self._hot_first)
        stats.dirty = copied + dropped
        stats.copied, stats.dropped, stats.resident = copied, dropped, self._resident_count
        if self._vif_host and not _mapping.pages_equal(self._vif_host, 0):
            self._reset_vif_page()
        return stats

    def _reset_vif_page(self) -> None:
        """Zero the PVM VIF page if anything wrote to it.

        The hypervisor owns it (it must stay in a writable memory slot), and the
        host's page tables never map it, but a guest that loads its own page tables
        can reach it and leave data there for the next call. A fresh sandbox sees
        zeros, and so does the next call: the check (in :meth:`restore`) is one 4 KiB compare.
        """
        _mapping.zero_bytes(self._vif_host, PAGE)

    def slot_runs_host(self, name: str) -> SlotMapping:
        return self._slots[name]

    def close(self) -> None:
        self._vif_host = 0
        for m in self._slots.values():
            m.close()
        self._slots.clear()
