"""Switching a live sandbox's memory between snapshots of one family.

A *family* is the set of snapshots one warm VM can serve one after the other:
finished snapshots (their exports known) with the same layout (memory
configuration and image size, so every slot has the same size and place) and
the same base layer (``layers[0]``, by content hash): an interpreter base and
every script loaded on it, or a C base and its children. Two snapshots of a
family differ only where their own layers put pages, so a switch costs what
differs, not what the guest has. (Snapshots with equal layouts but different
bases could be switched by the same mechanism, at the cost of most of their
memory; they are kept apart on purpose.)

The mechanism: the sandbox first restores the last call's dirty pages (to the
current snapshot; nothing to do when no guest code ran since the last restore),
then :class:`MemorySwitcher` compares, run by run, where each page's bytes
come from in the current and in the target snapshot, and puts back only the
pages whose source differs (``_mapping.switch_slot``):

- a span of at most :data:`COPY_MAX_PAGES` pages is copied from the target's
  layer and stays resident (the guest touches it at native speed);
- a longer span is re-mapped from the target's layer file (``mmap MAP_FIXED``,
  one call per span; the guest pays one page fault per page it touches), or,
  when the target's file is already mapped there, its private copies are
  dropped.

The invariant that makes this safe with restore's MADV_DONTNEED (which reverts
a page to the file mapped under it): **the host mapping under every page of
the main slot shows the current snapshot's bytes for that page, or the page is
pinned resident** (``GuestMemory._resident``; restore copies resident pages
back and never drops them). A copy over a mapping of another file pins the
page; a re-map or a drop unpins it. :class:`MemorySwitcher` remembers which
file range is mapped under each page (``mapped``) to keep the invariant across
any number of switches. The system slot (read-only to the guest, never
restored) is always copied.

A switch between two snapshots whose differing spans are all short enough to
copy (the common case: a script layer's 20-40 pages) follows a *copy plan*
made once per pair of snapshots (:func:`plan_copies`, kept with the target):
one ``_mapping.copy_plan`` call copies the planned pages and pins them, with no
walk over the runs and no new ``mapped`` list (a copy keeps the mapping). The
plan does exactly what ``switch_slot`` would (tests/test_switch.py compares the
two); any other switch goes through ``switch_slot``.
"""

from __future__ import annotations

import threading
import weakref
from array import array
from dataclasses import dataclass
from typing import Any

from hlpool import _mapping
from hlpool.guest.layout import PAGE
from hlpool.memory.image import SnapshotImage
from hlpool.memory.layers import Layer, Run, RunList

#: Spans of differing pages up to this size are copied; longer ones are re-mapped.
#: Measured by bench/switch.py on the PVM development host (2 vCPUs, loaded): putting back
#: a span costs the host ~2.5 us + ~0.25 us per page by copy, ~9 us + ~0.06 us per page by
#: re-map (one mmap; the two meet near 64 pages), and each re-mapped page the guest then
#: reads costs it a page fault (~12 us) that a copied page does not. So up to 64 pages a copy
#: is cheaper for the switch and for the guest; beyond, re-mapping keeps the switch's cost
#: flat and the pages shared (copied pages are private memory of the VM).
COPY_MAX_PAGES = 64

_SYSTEM_COPY_ALL = 1 << 62  # the system slot is never restored: copying is always safe there


@dataclass
class SwitchStats:
    """What one :meth:`Sandbox.switch` did."""

    pages_copied: int = 0      # pages copied from the target's layers (now resident)
    pages_remapped: int = 0    # pages re-mapped from the target's layer files (or dropped to them)
    runs_remapped: int = 0     # mmap calls made for those pages
    dirty_restored: int = 0    # pages the last call dirtied, put back first
    microseconds: float = 0.0  # wall time of the whole switch (memory, vCPU, files)


# ---- families -----------------------------------------------------------------------------


_layout_keys: dict[int, tuple[Any, str]] = {}  # id(layout) -> (layout, its part of family keys)


def _layout_key(layout: Any) -> str:
    hit = _layout_keys.get(id(layout))
    if hit is not None and hit[0] is layout:  # snapshots of one family share their Layout object
        return hit[1]
    config = layout.config.to_dict()
    key = ";".join([f"image={layout.image_size}", *(f"{k}={config[k]}" for k in sorted(config))])
    if len(_layout_keys) > 1024:
        _layout_keys.clear()
    _layout_keys[id(layout)] = (layout, key)
    return key


def family_of(image: SnapshotImage) -> str:
    """The family key of a snapshot (see the module docstring): equal keys can be switched."""
    root = image.layers[0].sha256.hex() if image.layers else "-"
    finished = "finished" if image.exports is not None else "boot"
    return f"{finished};{_layout_key(image.layout)};root={root}"


def incompatibility(current: SnapshotImage, target: SnapshotImage) -> str | None:
    """Why a sandbox at ``current`` cannot switch to ``target`` (None if it can)."""
    if target.exports is None:
        return "the target is a boot image (not a finished snapshot: its exports are unknown)"
    if current.exports is None:
        return "the sandbox runs a boot image"
    a, b = current.layout, target.layout
    if a.image_size != b.image_size:
        return f"image size differs ({a.image_size} here, {b.image_size} in the target)"
    ca, cb = a.config.to_dict(), b.config.to_dict()
    differ = [f"{k} ({ca[k]} here, {cb[k]} in the target)" for k in sorted(ca) if ca[k] != cb[k]]
    if differ:
        return "memory configuration differs: " + ", ".join(differ)
    if not target.layers or not current.layers or target.layers[0].sha256 != current.layers[0].sha256:
        here = current.layers[0].sha256.hex()[:12] if current.layers else "none"
        there = target.layers[0].sha256.hex()[:12] if target.layers else "none"
        return f"base layer differs ({here} here, {there} in the target): not the same family"
    return None


# ---- run arrays ---------------------------------------------------------------------------

_idents: dict[bytes, int] = {}  # layer content hash -> small integer (the same bytes: the same ident)
_idents_lock = threading.Lock()


def _ident(layer: Layer) -> int:
    with _idents_lock:
        return _idents.setdefault(layer.sha256, len(_idents))


@dataclass
class SlotRuns:
    """One slot's runs as ``_mapping.switch_slot`` reads them."""

    runs: array       # flat (first, count, ident, base) int64 records
    src: array        # host address of each run's first page in its layer's view (0: zeros)
    fd: array         # the layer's descriptor (-1: zeros)
    foff: array       # file offset of each run's first page


def slot_runs(runs: list[Run], layers: tuple[Layer, ...]) -> SlotRuns:
    # Per layer once (a snapshot has a few layers and hundreds of runs): ident, view, fd, data offset.
    per_layer = [(_ident(layer), layer.view(), layer.fd, layer.file_offset(0)) for layer in layers]
    arrays = []
    flat = runs.flat if isinstance(runs, RunList) else RunList(runs).flat
    for raw in _mapping.slot_run_arrays(flat, per_layer):  # one Cython pass, then typed arrays
        typed = array("q")
        typed.frombytes(raw)
        arrays.append(typed)
    return SlotRuns(*arrays)


_cache: dict[int, tuple[Any, dict[Any, Any]]] = {}
_cache_lock = threading.Lock()


def derived(image: SnapshotImage) -> dict[Any, Any]:
    """A dict of values computed from a snapshot, kept while the snapshot object lives (a
    snapshot is immutable: its runs, layers and vCPU state never change). The switch caches
    its run arrays, family key, entry pages and copy plans here, so a switch to a tenant
    served before recomputes nothing."""
    key = id(image)
    hit = _cache.get(key)  # the hot path takes no lock: a dict read is atomic, the entry checked by identity
    if hit is not None and hit[0]() is image:
        return hit[1]
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0]() is image:
            return hit[1]
        values: dict[Any, Any] = {}
        try:
            ref = weakref.ref(image, lambda _r, k=key: _cache.pop(k, None))
        except TypeError:  # an image type without weak references: not cached
            return values
        _cache[key] = (ref, values)
        return values


def snapshot_runs(image: SnapshotImage) -> dict[str, SlotRuns]:
    """Both slots' run arrays of a snapshot (cached, see :func:`derived`)."""
    values = derived(image)
    runs = values.get("runs")
    if runs is None:
        runs = values["runs"] = {slot: slot_runs(image.runs[slot], image.layers) for slot in ("system", "main")}
    return runs


def restore_inputs(image: SnapshotImage) -> tuple[array, array, array]:
    """The main slot's (first pages, counts, source addresses) arrays restore reads (cached)."""
    values = derived(image)
    inputs = values.get("restore")
    if inputs is None:
        main = snapshot_runs(image)["main"]  # the same numbers, all non-negative: reinterpreted
        firsts, counts, sources = array("Q"), array("Q"), array("Q")
        firsts.frombytes(main.runs[0::4].tobytes())
        counts.frombytes(main.runs[1::4].tobytes())
        sources.frombytes(main.src.tobytes())
        inputs = values["restore"] = (firsts, counts, sources)
    return inputs


def cached_family(image: SnapshotImage) -> str:
    values = derived(image)
    family = values.get("family")
    if family is None:
        family = values["family"] = family_of(image)
    return family


# ---- copy plans -----------------------------------------------------------------------------

#: How many source snapshots a target keeps copy plans for (see :func:`plan_copies`).
PLANS_PER_TARGET = 16


def plan_copies(current: SlotRuns, target: SlotRuns, copy_max: int) -> bytes | None:
    """The pages ``_mapping.switch_slot`` would copy to switch a slot from ``current`` to
    ``target``, as a plan for ``_mapping.copy_plan`` (int64 triples: first page, pages, source
    address or 0 for zeros), if it would copy every span it puts back; else None.

    ``switch_slot`` walks the pieces where the mapped, current and target runs all stay the
    same and puts back each piece whose current and target sources differ: a piece of at
    most ``copy_max`` pages by copying the target's bytes. Whatever is mapped only splits
    those pieces further, so if every differing piece of current and target alone has at most
    ``copy_max`` pages, switch_slot copies exactly these pages whatever is mapped, and leaves
    the mapping as it is: the plan is the same for every sandbox and every switch of the pair.
    """
    # In Cython (_mapping.plan_copies, the same walk: ~2 us instead of ~80 for a JS tenant's runs).
    return _mapping.plan_copies(current.runs, target.runs, target.src, copy_max)


def _switch_plan(current: SnapshotImage, target: SnapshotImage, copy_max: int) -> tuple[Any, ...]:
    """(weakref to ``current`` or None, main slot copy plan or None, system runs equal) for a
    switch ``current`` -> ``target``, kept with the target for its last few sources."""
    values = derived(target)
    plans = values.get("plans")
    if plans is None:
        plans = values["plans"] = {}
    key = (id(current), copy_max)
    hit = plans.get(key)
    if hit is not None and hit[0]() is current:
        return hit
    cur, tgt = snapshot_runs(current), snapshot_runs(target)
    plan = plan_copies(cur["main"], tgt["main"], copy_max)
    same_system = cur["system"].runs == tgt["system"].runs
    try:
        ref = weakref.ref(current)
    except TypeError:  # an image type without weak references: not cached
        return None, plan, same_system
    if len(plans) >= PLANS_PER_TARGET:
        plans.clear()
    hit = plans[key] = (ref, plan, same_system)
    return hit


# ---- the switch ---------------------------------------------------------------------------


class MemorySwitcher:
    """Which file range is mapped under each page of a sandbox, and the switch that keeps it.

    Made from the snapshot the sandbox's memory was mapped from (its runs are mapped
    under every page then).
    """

    def __init__(self, image: SnapshotImage, copy_max: int | None = None) -> None:
        runs = snapshot_runs(image)
        self.copy_max = COPY_MAX_PAGES if copy_max is None else copy_max
        self.mapped = {slot: array("q", runs[slot].runs) for slot in runs}
        self._system_resident = bytearray(image.layout.system.size // PAGE)  # required by switch_slot, unused

    def copy_only(self, current: SnapshotImage, target: SnapshotImage) -> tuple[int, bytes, Any] | None:
        """(copy_max, copy plan, the target's restore inputs) if a switch ``current`` -> ``target``
        is one copy plan for the main slot and nothing for the system slot (the common case: two
        scripts of one interpreter), for :meth:`GuestMemory.switch_by_plan`; else None. The same for
        every sandbox with this ``copy_max`` (see :func:`plan_copies`)."""
        _ref, plan, same_system = _switch_plan(current, target, self.copy_max)
        if plan is None or not same_system:
            return None
        return self.copy_max, plan, restore_inputs(target)

    def switch(self, main_host: int, system_host: int, current: SnapshotImage, target: SnapshotImage,
               resident: bytearray, resident_count: int) -> tuple[int, int, int, int, int]:
        """Switch the main slot at ``main_host`` (restored to ``current``) and the system slot at
        ``system_host`` to ``target``. Returns (copied, remapped or dropped pages, remap calls,
        resident_count, system pages copied)."""
        _ref, plan, same_system = _switch_plan(current, target, self.copy_max)
        dropped = remapped = calls = system = 0
        if plan is not None:  # every differing span is copied: the mapping stays as it is
            copied, resident_count = _mapping.copy_plan(main_host, len(resident), plan, resident, resident_count)
        else:
            cur, tgt = snapshot_runs(current), snapshot_runs(target)
            t = tgt["main"]
            copied, dropped, remapped, calls, resident_count, mapped = _mapping.switch_slot(
                main_host, len(resident), self.mapped["main"], cur["main"].runs, t.runs, t.src, t.fd, t.foff,
                resident, resident_count, self.copy_max)
            if calls:  # only a re-mapped span changes what is mapped where (a copy or a drop keeps the mapping)
                self.mapped["main"] = array("q", mapped)
        if not same_system:  # children usually share their base's system pages
            cur, tgt = snapshot_runs(current), snapshot_runs(target)
            t = tgt["system"]
            system, _dropped, _remapped, system_calls, _count, mapped = _mapping.switch_slot(
                system_host, len(self._system_resident), self.mapped["system"], cur["system"].runs, t.runs,
                t.src, t.fd, t.foff, self._system_resident, 0, _SYSTEM_COPY_ALL)
            if system_calls:  # never, as every span is copied; kept for the rule above
                self.mapped["system"] = array("q", mapped)
        return copied + system, dropped + remapped, calls, resident_count, system
