"""A sandbox's guest memory: host mappings, KVM memory slots, reads/writes, restore.

Each snapshot slot (system, main) is one reserved host range on which the
snapshot's runs are mapped with MAP_FIXED: layer files MAP_PRIVATE (shared
page-cache pages until the guest writes one), zero runs as anonymous memory.
The io slot (IN/REPLY) and the VIF page are plain anonymous memory.

The main area (everything the guest can write) is two KVM slots over one
host range: the large "logged" slot with KVM dirty logging, and the small
"hot" slot (call page + top of the stack) that every call writes, which is
treated as always dirty. Restore (mechanism in ``_dirty.DirtySet.restore``,
policy in :class:`RestorePolicy`) puts back exactly the logged slot's dirty
pages plus the hot pages.

The logged slot's dirty pages come from KVM's dirty bitmap with manual protect
(the default) or from KVM's dirty ring. With the bitmap, pages that calls write
again and again form a bounded per-sandbox *working set*: they are restored
wholesale (compared and copied back by every restore) and stay writable, so a
steady working set costs no write-protect fault per page per call. Isolation
does not depend on the working set: KVM sets a page's dirty bit when it makes
the page writable for the guest; every page whose bit is set is restored; a bit
is cleared (KVM_CLEAR_DIRTY_LOG, which write-protects the page) only right
after its page was restored, and never for a working-set page. So every page a
call could have written is put back before the next call.
"""

from __future__ import annotations

import ctypes
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hlpool import _mapping
from hlpool.errors import GuestProtocolError
from hlpool.guest.layout import PAGE, SLOT_HOT, SLOT_IO, SLOT_MAIN, SLOT_SYSTEM, SLOT_VIF, VIF_PAGE, Area, Layout
from hlpool.kvm.vm import MemorySlot, Vm
from hlpool.memory import _dirty
from hlpool.memory.layers import Layer, Run, pin_layers, unpin_layers

#: ``dirty_log="auto"`` uses the dirty bitmap up to this logged-slot size. Its fixed cost per call
#: (KVM_GET_DIRTY_LOG + the bitmap scan) grows with the slot; the dirty ring's follows the dirty
#: pages only, but costs a write-protect fault per written page per call. Measured here (PVM,
#: touch guest, p50 per call, bitmap vs ring): 1 GiB: touch(0) 91 vs 91 us, touch(16) 92 vs 213;
#: 4 GiB: 112 vs 92, 111 vs 213; 16 GiB: 207 vs 94, 193 vs 227. So: the bitmap up to 2 GiB.
AUTO_BITMAP_MAX_BYTES = 2 << 30

DIRTY_LOG_MODES = ("auto", "bitmap", "ring")

from hlpool.memory.switch import restore_inputs

if TYPE_CHECKING:
    from hlpool.memory.image import SnapshotImage
    from hlpool.memory.switch import MemorySwitcher


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
    #: Entries of KVM's dirty ring per vCPU (16 bytes each; a power of two), when the ring is
    #: used (see ``dirty_log``). A call that dirties more pages takes one exit per ring-full,
    #: and pages harvested mid-call are write-protected again, so heavy writers want a larger
    #: ring; 0 never uses the ring.
    dirty_ring_entries: int = 4096
    #: How the guest's writes are found: ``"bitmap"`` (KVM_GET_DIRTY_LOG with manual protect:
    #: cost follows the memory's size, ~1 us per 16 MiB slot; allows the working set below),
    #: ``"ring"`` (KVM's dirty ring: cost follows the dirty pages; every written page is
    #: write-protected again by every restore) or ``"auto"``: the bitmap up to
    #: ``AUTO_BITMAP_MAX_BYTES`` of logged memory when KVM has manual protect, else the ring.
    dirty_log: str = "auto"
    #: Bitmap mode: at most this many pages per sandbox are restored wholesale (the working
    #: set): copied back by every restore (~0.2 us a page) but never write-protected, where a
    #: protected page costs a write-protect fault (~3.5 us on PVM) each call that writes it.
    #: 0 turns the working set off. Wholesale pages count in ``keep_resident_pages``.
    max_wholesale_pages: int = 64
    #: A page joins the working set after it was written by this many restores in a row.
    promote_after: int = 2
    #: A wholesale page leaves the working set after this many restores in a row found it
    #: unchanged (~ fault cost / copy cost: a page written once in 16 calls costs about the
    #: same either way), so the set follows the calls' current working set.
    demote_after: int = 16

    def __post_init__(self) -> None:
        if self.keep_resident_pages < 0:
            raise ValueError("keep_resident_pages must be >= 0")
        if self.dirty_log not in DIRTY_LOG_MODES:
            raise ValueError(f"dirty_log must be one of {DIRTY_LOG_MODES}")
        if self.dirty_log == "ring" and not self.dirty_ring_entries:
            raise ValueError('dirty_log="ring" needs dirty_ring_entries > 0')
        if self.max_wholesale_pages < 0:
            raise ValueError("max_wholesale_pages must be >= 0")
        if not (1 <= self.promote_after <= 255 and 1 <= self.demote_after <= 255):
            raise ValueError("promote_after and demote_after must be in [1, 255]")
        n = self.dirty_ring_entries
        if n and (n < 256 or n & (n - 1) or n > 1 << 16):
            raise ValueError("dirty_ring_entries must be 0 or a power of two in [256, 65536]")


@dataclass
class RestoreStats:
    """What one restore did (pages of the main area)."""

    dirty: int = 0      #: pages put back: ``copied + dropped``
    copied: int = 0     #: copied back from the snapshot (hot pages and changed wholesale pages included)
    dropped: int = 0    #: dropped (MADV_DONTNEED), beyond the residency budget
    resident: int = 0   #: pages resident after the restore
    unchanged: int = 0  #: wholesale pages compared equal to the snapshot (nothing to copy)
    protected: int = 0  #: pages write-protected again: each costs a fault when the guest next writes it
    promoted: int = 0   #: pages that joined the working set
    demoted: int = 0    #: pages that left it
    wholesale: int = 0  #: the working set's size after the restore


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
        self._pinned: tuple[Layer, ...] = ()  # the layers memory maps and restores from (Layer.pin)
        try:
            self._pinned = pin_layers(layers)
            if not vm.dirty_ring_entries and policy.dirty_log != "ring":
                vm.enable_manual_dirty_protect()  # before the logged slot exists
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
        self._set_restore_inputs(runs["main"], layers)
        logged_pages = layout.logged.size // PAGE
        self._pending = _dirty.DirtySet(self.main_pages)  # pages to restore (main-area page indices)
        if vm.manual_dirty_protect:  # bitmap mode: restore re-protects pages itself, keeps a working set
            self._pending.track(vm.fd, SLOT_MAIN, logged_pages)
        self._hot_first = logged_pages  # the hot slot's pages: always restored, outside the budget
        # Pages copied back stay resident up to the policy's budget and beyond it are dropped to
        # the mapping under them. A private copy has no file under its pages (a dropped page would
        # come back as zeros), so there every page is copied back.
        self._keep_resident = self.main_pages if private_copy else policy.keep_resident_pages
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
    def enable_dirty_ring(vm: Vm, policy: RestorePolicy, logged_bytes: int = 0) -> int:
        """Turn on KVM's dirty ring for ``vm`` if ``policy`` chooses it (before any vCPU exists).

        ``logged_bytes`` (the layout's logged area) decides ``dirty_log="auto"``.
        Returns the number of ring entries per vCPU, or 0 (then dirty bitmaps are used).
        """
        if not policy.dirty_ring_entries or policy.dirty_log == "bitmap":
            return 0
        if (policy.dirty_log == "auto" and logged_bytes <= AUTO_BITMAP_MAX_BYTES
                and vm.kvm.info.manual_dirty_log_protect):
            return 0
        return vm.enable_dirty_ring(policy.dirty_ring_entries)

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
            _dirty.get_dirty_log(self.vm.fd, SLOT_MAIN, self._scratch)
            self._pending.add_bitmap(self._scratch)
        self._pending.add_range(self._hot_first, self.main_pages - self._hot_first)

    def pending_dirty_pages(self) -> list[int]:
        """Main-area page indices written since the last restore (after :meth:`collect_dirty`).

        A superset: the hot pages and the working set's pages are always listed.
        """
        return self._pending.pages()

    @property
    def working_set_pages(self) -> list[int]:
        """Main-area pages restored wholesale (kept writable), ascending; empty in dirty-ring mode."""
        return self._pending.working_set()

    def reset_working_set(self) -> None:
        """Forget the working set and the pages' write history (e.g. after a switch to another snapshot).

        Safe at any time. The former wholesale pages keep their KVM dirty bits,
        so the next :meth:`restore` puts them back from the runs it uses then
        (``_run_first``/``_run_count``/``_run_source``) and write-protects them;
        pages are then learnt again.
        """
        self._pending.reset_working_set()

    def restore(self) -> RestoreStats:
        """Put every page written since the last restore back to the snapshot."""
        self.collect_dirty()
        pending, policy = self._pending, self.policy
        copied, dropped, self._resident_count = pending.restore(
            self.main_host, self._run_first, self._run_count, self._run_source,
            self._resident, self._resident_count, self._keep_resident, self._hot_first,
            policy.max_wholesale_pages, policy.promote_after, policy.demote_after)
        stats = RestoreStats(copied + dropped, copied, dropped, self._resident_count, pending.last_unchanged,
                             pending.last_protected, pending.last_promoted, pending.last_demoted,
                             pending.wholesale)
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

    def _set_restore_inputs(self, main_runs: list[Run], layers: tuple[Layer, ...]) -> None:
        """Restore inputs: the main slot's runs and where their pristine bytes are."""
        self._run_first = array("Q", (r.first_page for r in main_runs))
        self._run_count = array("Q", (r.count for r in main_runs))
        self._run_source = array("Q", (layers[r.layer].view() + r.offset if r.layer >= 0 else 0
                                       for r in main_runs))

    # ---- switching to another snapshot of the family (hlpool.memory.switch) ----------------

    def switch(self, current: "SnapshotImage", target: "SnapshotImage", switcher: "MemorySwitcher",
               restored: bool = False, pinned: tuple[Layer, ...] | None = None) -> tuple[int, ...]:
        """Make memory show ``target`` instead of ``current`` (same layout; see hlpool.memory.switch).

        Restores the last call's dirty pages first, then puts back the pages whose source
        differs and points restore at the target's runs. Keeps the switch invariant: the
        mapping under a page shows the snapshot's bytes, or the page is resident, and restore
        never drops a resident page (it copies it back). Returns (dirty restored, copied,
        remapped, remap calls, system pages copied). ``restored``: the guest has not run since
        the last restore, so memory is at ``current`` already and the restore is skipped.
        ``pinned``: the target's layers, pinned by the caller (:func:`pin_layers`); this memory
        holds those pins from now on, or lets go of them if the switch fails.
        """
        if pinned is None:
            pinned = pin_layers(target.layers)  # before anything is copied from them
        try:
            dirty = 0 if restored else self.restore().dirty
            copied, remapped, calls, self._resident_count, system = switcher.switch(
                self.main_host, self._slots["system"].host, current, target, self._resident, self._resident_count)
            self._run_first, self._run_count, self._run_source = restore_inputs(target)
        except BaseException:
            unpin_layers(pinned)
            raise
        unpin_layers(self._pinned)
        self._pinned = pinned
        return dirty, copied, remapped, calls, system

    def switch_by_plan(self, plan: bytes, inputs: tuple[array, array, array], restored: bool,
                       pinned: tuple[Layer, ...]) -> tuple[int, int]:
        """:meth:`switch` for a pair whose whole switch is one copy plan of the main slot
        (:meth:`MemorySwitcher.copy_only` said so for this pair; ``inputs``: the target's restore
        inputs). Returns (dirty pages restored, pages copied); the pins as in :meth:`switch`."""
        try:
            dirty = 0 if restored else self.restore().dirty
            copied, self._resident_count = _mapping.copy_plan(self.main_host, len(self._resident), plan,
                                                              self._resident, self._resident_count)
            self._run_first, self._run_count, self._run_source = inputs
        except BaseException:
            unpin_layers(pinned)
            raise
        unpin_layers(self._pinned)
        self._pinned = pinned
        return dirty, copied

    def slot_runs_host(self, name: str) -> SlotMapping:
        return self._slots[name]

    def close(self) -> None:
        self._vif_host = 0
        for m in self._slots.values():
            m.close()
        self._slots.clear()
        pinned, self._pinned = self._pinned, ()
        unpin_layers(pinned)

