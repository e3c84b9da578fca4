"""Switching a live sandbox between snapshots of one family (Sandbox.switch).

The isolation guarantee is checked against the definition: after a switch the guest sees
byte for byte what a fresh ``Sandbox(target)`` sees, in every page of every memory slot
(read through the host mappings, the VIF page included), in every piece of CPU state the
guest can write (read by the guest itself: tests/guests/tenant.c ``state``; and what KVM
holds of the debug registers and XCR0, which a call does not reload), in its mapped files and
its buffers. Tenants are children of one C base that planted secrets in data, heap, stack,
vector registers, debug registers (DR0-3, DR6, DR7), CR8 and KERNEL_GS_BASE; a hostile call
also shrinks XCR0.
"""

from __future__ import annotations

import os
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hlpool import _mapping
from hlpool.errors import SandboxBrokenError, SnapshotIncompatibleError
from hlpool.guest.layout import PAGE, MemoryConfig
from hlpool.kvm import abi as kvm_abi
from hlpool.machine.machine import SandboxStatus
from hlpool.memory import switch as switch_module
from hlpool.memory.guest_memory import RestorePolicy
from hlpool.sandbox.sandbox import Sandbox
from hlpool.snapshot.snapshot import Snapshot


KIB, MIB = 1024, 1024 * 1024
CONFIG = MemoryConfig(heap_size=1 * MIB, stack_size=256 * KIB, in_size=64 * KIB, out_size=64 * KIB,
                      reply_size=64 * KIB, log_size=16 * KIB)
SLOTS = ("vif", "system", "main", "io")


@pytest.fixture(scope="module")
def family(kvm, test_guest, tmp_path_factory):
    """The base snapshot and its tenants: children with a few different pages and CPU state each,
    one with a mapped file, one a grandchild (a layer on a layer)."""
    base = Snapshot.from_elf(test_guest("tenant"), config=CONFIG)
    data = tmp_path_factory.mktemp("switch") / "tenant-file.bin"
    data.write_bytes(os.urandom(3 * PAGE + 100))
    tenants = [base]
    for k, pages in enumerate((1, 5, 12)):
        with Sandbox(base, timeout=10) as sb:
            if k == 1:
                sb.map_file(str(data), name="tenant-file")
            sb.call("plant", 1000 + k, pages, restore=False)
            tenants.append(sb.snapshot())
    with Sandbox(tenants[2], timeout=10) as sb:
        sb.call("plant", 2000, 3, restore=False)
        tenants.append(sb.snapshot())
    assert len({t.family for t in tenants}) == 1
    return Tenants(tenants)


class Tenants(list):
    """The family's snapshots (a short repr: hypothesis prints its arguments)."""

    def __repr__(self) -> str:
        return f"<{len(self)} tenants>"


def _image(sb: Sandbox) -> dict[str, bytes]:
    out = {}
    for slot in SLOTS:
        m = sb.memory.slot_runs_host(slot)
        out[slot] = _mapping.read_bytes(m.host, m.size)
    return out


def _control_page_offset(sb: Sandbox) -> int:
    return sb.layout.control.start - sb.layout.io.start


def _diff(a: dict[str, bytes], b: dict[str, bytes], skip_control: int | None = None) -> list[str]:
    bad = []
    for slot in SLOTS:
        x, y = a[slot], b[slot]
        assert len(x) == len(y)
        for off in range(0, len(x), PAGE):
            if slot == "io" and off == skip_control:
                continue
            if x[off:off + PAGE] != y[off:off + PAGE]:
                bad.append(f"{slot} page {off // PAGE}")
    return bad


def _kvm_cpu_state(sb: Sandbox) -> tuple[bytes, bytes]:
    """KVM's debug registers and XCRs of a sandbox's vCPU (on PVM the guest cannot read its XCR0:
    xgetbv shows the host's; a snapshot taken now would hold these)."""
    debugregs = kvm_abi.KvmDebugregs()
    kvm_abi.ioctl(sb.vcpu.fd, kvm_abi.KVM_GET_DEBUGREGS, debugregs)
    return bytes(debugregs), bytes(sb.vcpu.get_xcrs())


def assert_like_fresh(sb: Sandbox, target: Snapshot, **options) -> None:
    """The switched sandbox ``sb`` is indistinguishable from a fresh Sandbox(target)."""
    with Sandbox(target, timeout=10, **options) as fresh:
        skip = _control_page_offset(sb)  # holds the first call's extra CR8/KERNEL_GS_BASE loads (the target's own)
        assert _diff(_image(sb), _image(fresh), skip) == []
        assert sb.mapped_files == fresh.mapped_files
        assert sb.exports == fresh.exports
        assert sb.snapshot_in_use is target
        assert sb.call("state") == fresh.call("state")
        assert _kvm_cpu_state(sb) == _kvm_cpu_state(fresh)
        assert sb.call("digest") == fresh.call("digest")
        assert _diff(_image(sb), _image(fresh)) == []  # after a call each: the control pages too


OPS = st.lists(st.one_of(
    st.tuples(st.just("switch"), st.integers(0, 4)),
    st.tuples(st.just("hostile"), st.integers(1, 10**6)),   # secrets in memory and CPU state, then restore
    st.tuples(st.just("keep"), st.integers(1, 10**6)),      # a call with restore=False, then switch away
    st.tuples(st.just("scribble"), st.integers(0, 150)),    # many dirty pages: restore drops some
    st.tuples(st.just("vif"), st.integers(1, 10**6)),       # data in the VIF page, outside the snapshot
    st.tuples(st.just("xcr0"), st.integers(0, 4)),          # XCR0 shrunk, then switch
    st.tuples(st.just("hop"), st.integers(0, 24)),          # two switches with no call between
), min_size=1, max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.integers(0, 4), ops=OPS, copy_max=st.sampled_from([0, 4, 16, 1 << 20]),
       strict=st.sampled_from([False, False, True]))
def test_a_switched_sandbox_is_a_fresh_sandbox_of_the_target(family, monkeypatch, start, ops, copy_max, strict):
    monkeypatch.setattr(switch_module, "COPY_MAX_PAGES", copy_max)
    options = dict(strict_cpu_reset=strict, restore_policy=RestorePolicy(keep_resident_pages=4))
    with Sandbox(family[start], timeout=10, **options) as sb:
        for op, arg in ops:
            if op == "switch":
                stats = sb.switch(family[arg])
                assert stats.microseconds > 0
                assert_like_fresh(sb, family[arg], **options)
            elif op == "hostile":
                sb.call("plant", arg, arg % 40)
            elif op == "vif":
                sb.call("vif_write", arg, restore=False)  # the VIF page is put back by the switch itself
            elif op == "hop":  # the control page holds the first tenant's first-call stub at the second switch
                sb.switch(family[arg // 5])
                sb.switch(family[arg % 5])
                assert_like_fresh(sb, family[arg % 5], **options)
            elif op == "xcr0":  # switched at once: on VMX the next call into the same tenant would fault
                sb.call("shrink_xcr0")
                sb.switch(family[arg])
                assert_like_fresh(sb, family[arg], **options)
            elif op == "keep":
                sb.call("plant", arg, arg % 40, restore=False)
            else:
                assert sb.call("scribble", arg, arg) == arg


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_a_hostile_tenants_cpu_state_does_not_reach_the_next_one(family, strict):
    """Debug registers (DR0-3, DR6, DR7), XCR0, CR8, KERNEL_GS_BASE and vector registers written by
    one tenant's call are the next tenant's own after a switch, between every two tenants."""
    with Sandbox(family[1], timeout=10, strict_cpu_reset=strict) as sb:
        for k in (2, 3, 0, 4, 1, 1):
            sb.call("plant", 31 + k, 2)
            sb.call("shrink_xcr0")
            before = _kvm_cpu_state(sb)
            sb.switch(family[k])
            with Sandbox(family[k], timeout=10, strict_cpu_reset=strict) as fresh:
                assert _kvm_cpu_state(fresh) != before  # the call did change what the switch must reset
                assert sb.call("state") == fresh.call("state")
                assert _kvm_cpu_state(sb) == _kvm_cpu_state(fresh)


def test_kernel_gs_base_is_always_put_back_where_the_stub_cannot_load_it(family):
    """Without FSGSBASE in the target's CR4 the entry stub cannot load KERNEL_GS_BASE, and a guest's
    swapgs changes it without an MSR write: every pair then sets it with KVM_SET_MSRS, also between
    two snapshots whose saved MSRs are equal (the pair skips its comparison loop for those)."""
    from hlpool.machine import switching
    from hlpool.memory.switch import derived

    with Sandbox(family[3], timeout=10) as sb:
        current = target = family[3]  # a switch to the snapshot held: equal saved MSRs
        kgs = target.vcpu.msrs.get(kvm_abi.MSR_KERNEL_GS_BASE)
        assert kgs is not None
        cur = switching._entry(sb, current, derived(current))
        tgt = switching._Entry(sb, target)  # a fresh entry, not the cached one
        pair = switching._Pair(sb, current, cur, target, tgt)
        assert kvm_abi.MSR_KERNEL_GS_BASE not in pair.msrs or tgt.stub_kgs is None  # the stub loads it here
        tgt.stub_kgs = None  # as on a host without FSGSBASE
        pair = switching._Pair(sb, current, cur, target, tgt)
        assert pair.msrs == {kvm_abi.MSR_KERNEL_GS_BASE: kgs}


def test_switching_puts_back_only_what_differs(family):
    base, a, b = family[0], family[1], family[3]
    with Sandbox(a, timeout=10) as sb:
        stats = sb.switch(b)
        own = sum(r.count for r in a.runs["main"] if r.layer == 1) + sum(
            r.count for r in b.runs["main"] if r.layer == 1)
        assert 0 < stats.pages_copied + stats.pages_remapped <= own
        assert stats.pages_copied + stats.pages_remapped < sb.layout.main.size // PAGE // 10
        again = sb.switch(b)  # the snapshot held: a restore
        assert again.pages_copied == again.pages_remapped == 0
        to_base = sb.switch(base)
        assert to_base.pages_copied + to_base.pages_remapped <= sum(
            r.count for r in b.runs["main"] if r.layer == 1)


@pytest.mark.parametrize("copy_max", [0, 1 << 20], ids=["remap", "copy"])
def test_pages_copied_over_another_file_survive_restore_drops(family, monkeypatch, copy_max):
    """The MADV_DONTNEED hazard: a page whose target bytes were copied over a mapping of another
    snapshot's file must never be dropped (it would revert to that file). With a resident budget
    of 0 pages restore drops every page it may; the tenant's data pages must still be its own."""
    monkeypatch.setattr(switch_module, "COPY_MAX_PAGES", copy_max)
    policy = RestorePolicy(keep_resident_pages=0)
    order = [3, 1, 4, 0, 3, 2, 3]
    with Sandbox(family[order[0]], timeout=10, restore_policy=policy) as sb:
        for k in order[1:]:
            sb.switch(family[k])
            for seed in (7, 8):  # dirty every data page and many heap pages; restore drops them
                sb.call("scribble", seed, 150)
            assert_like_fresh(sb, family[k], restore_policy=policy)


def test_an_incompatible_target_is_refused_and_the_sandbox_goes_on(family, test_guest):
    other_config = Snapshot.from_elf(test_guest("tenant"), config=MemoryConfig(
        heap_size=2 * MIB, stack_size=256 * KIB, in_size=64 * KIB, out_size=64 * KIB, reply_size=64 * KIB,
        log_size=16 * KIB))
    other_base = family[2].flatten()  # the same memory, another base layer
    with Sandbox(family[2], timeout=10) as sb:
        before = sb.call("digest")
        with pytest.raises(SnapshotIncompatibleError, match="heap_size"):
            sb.switch(other_config)
        with pytest.raises(SnapshotIncompatibleError, match="base layer"):
            sb.switch(other_base)
        assert other_base.family != family[2].family != other_config.family
        assert sb.status is SandboxStatus.READY and sb.snapshot_in_use is family[2]
        assert sb.call("digest") == before
        assert_like_fresh(sb, family[2])
        sb.switch(family[1])  # and it can still switch within its family
        assert_like_fresh(sb, family[1])


def test_a_target_whose_file_changed_is_refused_before_anything_changes(family, tmp_path):
    from hlpool.errors import SnapshotParentError

    data = tmp_path / "changing.bin"
    data.write_bytes(b"x" * 5000)
    with Sandbox(family[0], timeout=10) as sb:
        sb.map_file(str(data), name="changing")
        sb.call("plant", 77, 2, restore=False)
        target = sb.snapshot()
    data.write_bytes(b"y" * 6000)
    with Sandbox(family[3], timeout=10) as sb:
        with pytest.raises(SnapshotParentError):
            sb.switch(target)
        assert sb.status is SandboxStatus.READY
        assert_like_fresh(sb, family[3])


def test_a_pair_switched_before_takes_its_cached_plan_and_still_checks_the_files(family, tmp_path, monkeypatch):
    """A pair's copy plan is made at its first switch and kept: every switch of the pair copies
    by it (GuestMemory.switch_by_plan) and checks the target's layer files with one Cython call;
    the sandbox is still a fresh sandbox of the target, and a layer file changed since the pair
    was cached refuses the switch before anything changes."""
    from hlpool.errors import SnapshotIntegrityError
    from hlpool.memory.guest_memory import GuestMemory
    from hlpool.memory.switch import MemorySwitcher

    b = family[3].persist(tmp_path / "b.hlsnap")  # a child without mapped files: its base is written next to it
    a = b.parent  # the base, file-backed
    planned, plans_made = [], []
    by_plan, copy_only = GuestMemory.switch_by_plan, MemorySwitcher.copy_only
    monkeypatch.setattr(GuestMemory, "switch_by_plan",
                        lambda self, *args: planned.append(args[0]) or by_plan(self, *args))
    monkeypatch.setattr(MemorySwitcher, "copy_only",
                        lambda self, *args: plans_made.append(args) or copy_only(self, *args))
    with Sandbox(a, timeout=10) as sb:
        for round_ in range(3):
            sb.switch(b)
            assert_like_fresh(sb, b)
            sb.call("plant", 40 + round_, 6)  # a hostile call between the switches (restored after it)
            sb.switch(a)
            assert_like_fresh(sb, a)
        assert len(planned) == 6 and len(plans_made) == 2  # a plan per pair, made once, taken six times
        os.chmod(b.path, 0o644)
        with open(b.path, "r+b") as f:  # a snapshot file must never change: this one did
            f.seek(PAGE + 10)
            f.write(b"\xff")
        with pytest.raises(SnapshotIntegrityError, match="modified after it was verified"):
            sb.switch(b)
        assert sb.status is SandboxStatus.READY and sb.snapshot_in_use is a
        assert_like_fresh(sb, a)


def test_a_private_memory_sandbox_refuses_to_switch(family):
    with Sandbox(family[1], timeout=10, private_memory=True) as sb, Sandbox(family[1], timeout=10) as fresh:
        with pytest.raises(SnapshotIncompatibleError, match="private_memory"):
            sb.switch(family[2])
        assert sb.call("digest") == fresh.call("digest")


def test_a_broken_sandbox_refuses_to_switch(family):
    with Sandbox(family[1], timeout=10) as sb:
        sb.status = SandboxStatus.BROKEN  # as after a failed restore
        with pytest.raises(SandboxBrokenError):
            sb.switch(family[2])


def test_switches_leak_no_mappings_or_descriptors(family):
    def counts():
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f), len(os.listdir("/proc/self/fd"))

    with Sandbox(family[0], timeout=10) as sb:
        for k in range(3 * len(family)):
            sb.switch(family[k % len(family)])
        maps, fds = counts()
        for k in range(20 * len(family)):
            sb.switch(family[(k * 3) % len(family)])
            sb.call("plant", k, 3)
        maps2, fds2 = counts()
        assert fds2 == fds
        assert maps2 <= maps + 8  # the host mappings under the slots do not fragment without bound


def test_js_tenants_each_get_their_own_results(kvm):
    from hlpool.sandbox.scripts import base_snapshot, load_script

    base = base_snapshot("js")
    sources = {
        "one": "var n = 1; function f(x) { return n + x }",
        "two": "var table = []; for (var i = 0; i < 2000; i++) table.push('t' + i);"
               " function f(x) { return table.length + x }",
        "three": "function f(x) { return 'three:' + x }",
    }
    expected = {"one": 6, "two": 2005, "three": "three:5"}
    tenants = {name: load_script(base, src) for name, src in sources.items()}
    assert len({t.family for t in tenants.values()}) == 1
    with Sandbox(tenants["one"], timeout=10) as sb:
        for name in ("two", "three", "one", "three", "two", "one", "two"):
            sb.switch(tenants[name])
            assert sb.call("call", "f", [5]) == expected[name]
            assert sb.call("call", "f", [5]) == expected[name]
        sb.switch(base)
        with pytest.raises(Exception, match="f"):
            sb.call("call", "f", [5])  # the base has no script loaded


# ---- the mechanism alone (no KVM): _mapping.switch_slot against a model ------------------------------

MODEL_PAGES = 48


def _model_runs(draw_runs, layers):
    """Runs tiling MODEL_PAGES pages from (first, count, layer or -1, page offset) choices."""
    from hlpool.memory.layers import Run

    runs, first = [], 0
    for count, layer, offset in draw_runs:
        count = min(count, MODEL_PAGES - first)
        if count <= 0:
            break
        offset = min(offset, MODEL_PAGES - count)
        runs.append(Run(first, count, layer, offset * PAGE if layer >= 0 else 0))
        first += count
    if first < MODEL_PAGES:
        runs.append(Run(first, MODEL_PAGES - first, -1, 0))
    return runs


def _expected(runs, page: int) -> bytes:
    for r in runs:
        if r.first_page <= page < r.end_page:
            if r.layer < 0:
                return bytes(PAGE)
            return bytes([r.layer + 1, (r.offset // PAGE + page - r.first_page) % 251]) * (PAGE // 2)
    raise AssertionError(page)


RUN_LISTS = st.lists(st.lists(st.tuples(st.integers(1, 20), st.integers(-1, 2), st.integers(0, MODEL_PAGES)),
                              min_size=1, max_size=6), min_size=2, max_size=6)


@settings(max_examples=60, deadline=None)
@given(snapshots=RUN_LISTS, order=st.lists(st.integers(0, 5), min_size=1, max_size=10),
       copy_max=st.sampled_from([0, 1, 3, 8, 1 << 20]))
def test_switch_slot_shows_the_target_and_survives_drops(snapshots, order, copy_max):
    """Every page shows the target's bytes after a switch, and still does after every page that is
    not resident is dropped (what restore may do): the mapping under it is the target's."""
    from hlpool.memory.layers import Layer
    from hlpool.memory.switch import slot_runs

    layers = tuple(Layer.from_pages([b"".join(bytes([k + 1, i % 251]) * (PAGE // 2) for i in range(MODEL_PAGES))])
                   for k in range(3))
    snaps = [_model_runs(s, layers) for s in snapshots]
    host = _mapping.reserve(MODEL_PAGES * PAGE)
    try:
        for r in snaps[0]:
            if r.layer < 0:
                _mapping.map_anonymous_fixed(host + r.first_page * PAGE, r.count * PAGE)
            else:
                _mapping.map_file_fixed(host + r.first_page * PAGE, r.count * PAGE, layers[r.layer].fd, r.offset)
        mapped = slot_runs(snaps[0], layers).runs
        resident, count, current = bytearray(MODEL_PAGES), 0, snaps[0]
        for index in order:
            target = snaps[index % len(snaps)]
            cur, tgt = slot_runs(current, layers), slot_runs(target, layers)
            _c, _d, _r, _calls, count, out = _mapping.switch_slot(
                host, MODEL_PAGES, mapped, cur.runs, tgt.runs, tgt.src, tgt.fd, tgt.foff, resident, count, copy_max)
            mapped = array("q", out)
            assert count == sum(resident)
            for p in range(MODEL_PAGES):
                assert _mapping.read_bytes(host + p * PAGE, PAGE) == _expected(target, p), f"page {p} after switch"
            for p in range(MODEL_PAGES):  # restore with no resident budget: drop whatever is not pinned
                if not resident[p]:
                    _mapping.drop(host + p * PAGE, PAGE)
            for p in range(MODEL_PAGES):
                assert _mapping.read_bytes(host + p * PAGE, PAGE) == _expected(target, p), f"page {p} after drop"
            current = target
    finally:
        _mapping.unmap(host, MODEL_PAGES * PAGE)
        for layer in layers:
            layer.close()


def _per_page(flat) -> list[tuple[int, int]]:
    """A flat (first, count, ident, base) run list as (ident, base) per page (base 0 for zeros)."""
    out = []
    for i in range(0, len(flat), 4):
        out += [(flat[i + 2], flat[i + 3] if flat[i + 2] >= 0 else 0)] * flat[i + 1]
    return out


@settings(max_examples=60, deadline=None)
@given(snapshots=RUN_LISTS, order=st.lists(st.integers(0, 5), min_size=1, max_size=10),
       copy_max=st.sampled_from([0, 1, 2, 3, 8, 1 << 20]))
def test_a_copy_plan_does_what_switch_slot_does(snapshots, order, copy_max):
    """Where ``plan_copies`` gives a plan, ``_mapping.copy_plan`` leaves the slot, the resident map
    and the mapping exactly as ``switch_slot`` does (two copies of one slot, switched side by side)."""
    from hlpool.memory.layers import Layer
    from hlpool.memory.switch import plan_copies, slot_runs

    layers = tuple(Layer.from_pages([b"".join(bytes([k + 1, i % 251]) * (PAGE // 2) for i in range(MODEL_PAGES))])
                   for k in range(3))
    snaps = [_model_runs(s, layers) for s in snapshots]
    hosts = [_mapping.reserve(MODEL_PAGES * PAGE) for _ in range(2)]
    try:
        for host in hosts:
            for r in snaps[0]:
                if r.layer < 0:
                    _mapping.map_anonymous_fixed(host + r.first_page * PAGE, r.count * PAGE)
                else:
                    _mapping.map_file_fixed(host + r.first_page * PAGE, r.count * PAGE, layers[r.layer].fd,
                                            r.offset)
        mapped = [slot_runs(snaps[0], layers).runs for _ in hosts]
        resident, count, current = [bytearray(MODEL_PAGES) for _ in hosts], [0, 0], snaps[0]
        for index in order:
            target = snaps[index % len(snaps)]
            cur, tgt = slot_runs(current, layers), slot_runs(target, layers)
            plan = plan_copies(cur, tgt, copy_max)
            results = []
            for k, host in enumerate(hosts):
                if k == 1 and plan is not None:
                    copied, count[k] = _mapping.copy_plan(host, MODEL_PAGES, plan, resident[k], count[k])
                    results.append((copied, 0, 0, 0))
                    continue
                copied, dropped, remapped, calls, count[k], out = _mapping.switch_slot(
                    host, MODEL_PAGES, mapped[k], cur.runs, tgt.runs, tgt.src, tgt.fd, tgt.foff, resident[k],
                    count[k], copy_max)
                if calls:
                    mapped[k] = array("q", out)
                else:  # what MemorySwitcher relies on: with no re-map the mapping is the same, page by page
                    assert _per_page(out) == _per_page(mapped[k])
                results.append((copied, dropped, remapped, calls))
            assert results[0] == results[1]
            assert resident[0] == resident[1] and count[0] == count[1] == sum(resident[0])
            assert mapped[0] == mapped[1]
            for p in range(MODEL_PAGES):
                got = [_mapping.read_bytes(host + p * PAGE, PAGE) for host in hosts]
                assert got[0] == got[1] == _expected(target, p), f"page {p}"
            current = target
    finally:
        for host in hosts:
            _mapping.unmap(host, MODEL_PAGES * PAGE)
        for layer in layers:
            layer.close()


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=64), edits=st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)),
                                                            max_size=4))
def test_differing_span_is_the_smallest_span_outside_which_two_pages_agree(data, edits):
    """The bytes of the control page a switch writes: what _mapping.differing_span says differ."""
    other = bytearray(data)
    for at, value in edits:
        other[at % len(data)] = value
    start, end = _mapping.differing_span(data, bytes(other))
    if bytes(other) == data:
        assert (start, end) == (0, 0)
        return
    assert data[:start] == other[:start] and data[end:] == other[end:]
    assert data[start] != other[start] and data[end - 1] != other[end - 1]
    with pytest.raises(ValueError):
        _mapping.differing_span(data, data + b"x")


def test_a_copy_plan_outside_the_slot_is_refused_before_anything_is_written():
    host, source = _mapping.reserve(4 * PAGE), _mapping.reserve(PAGE)
    try:
        _mapping.map_anonymous_fixed(host, 4 * PAGE)
        _mapping.map_anonymous_fixed(source, PAGE)
        _mapping.write_bytes(source, b"\x07" * PAGE)
        resident = bytearray(4)
        for bad in ((0, 1, source, 3, 2, 0), (0, 1, source, -1, 1, 0), (0, 1, source, 2, 0, 0)):
            with pytest.raises(ValueError, match="outside"):  # the first span is valid: nothing copied yet
                _mapping.copy_plan(host, 4, array("q", bad).tobytes(), resident, 0)
        with pytest.raises(ValueError, match="malformed"):
            _mapping.copy_plan(host, 4, b"\0" * 20, resident, 0)
        with pytest.raises(ValueError, match="resident"):
            _mapping.copy_plan(host, 4, b"", bytearray(3), 0)
        assert _mapping.read_bytes(host, 4 * PAGE) == bytes(4 * PAGE) and resident == bytearray(4)
        assert _mapping.copy_plan(host, 4, array("q", (1, 1, source, 3, 1, 0)).tobytes(), resident, 0) == (2, 2)
        assert _mapping.read_bytes(host, 4 * PAGE) == bytes(PAGE) + b"\x07" * PAGE + bytes(2 * PAGE)
        assert resident == bytearray((0, 1, 0, 1))
    finally:
        _mapping.unmap(host, 4 * PAGE)
        _mapping.unmap(source, PAGE)


def test_prepare_switch_does_the_targets_part_ahead_and_changes_nothing(kvm):
    from hlpool.guest.examples import example_path
    from hlpool.sandbox.scripts import base_snapshot, load_script

    base = base_snapshot("js")
    a = load_script(base, "function f() { return 'a'; }")
    b = load_script(base, "function f() { return 'b'; }")
    with Sandbox(a) as sb:
        assert sb.call("call", "f", []) == "a"
        assert not switch_module.derived(b)  # nothing computed for b yet
        assert sb.prepare_switch(b) is True
        assert switch_module.derived(b)  # its entry and run arrays are kept with it now
        assert sb.snapshot_in_use is a and sb.call("call", "f", []) == "a"  # the sandbox is still at a
        sb.switch(b)
        assert sb.call("call", "f", []) == "b"
        assert sb.prepare_switch(Snapshot.from_elf(example_path("echo"))) is False  # another family


def _tenant_child(base: Snapshot, seed: int) -> Snapshot:
    with Sandbox(base, timeout=10) as sb:
        sb.call("plant", seed, 4, restore=False)
        return sb.snapshot()


def _inode_at(fd: int) -> int | None:
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None


def test_a_closed_layer_stays_until_its_last_sandbox_lets_go(family):
    """Layer.close() while sandboxes use the layer: they keep mapping and copying from it (its
    descriptor number is not reused by another file under them); nothing new can use it."""
    from hlpool.errors import SnapshotError

    child = _tenant_child(family[0], 4242)
    layer = child.layers[-1]
    assert not layer.persisted
    with Sandbox(child, timeout=10) as expected:
        want = expected.call("digest")
    with Sandbox(child, timeout=10) as sb, Sandbox(family[1], timeout=10) as other:
        other.switch(child)
        other.switch(family[1])  # the pair's switch data are cached with the child now
        fd, inode = layer.fd, os.fstat(layer.fd).st_ino
        layer.close()
        assert layer.closed and _inode_at(fd) == inode  # held by the sandbox: released later
        # new layers and files take new descriptors; the sandbox still restores from its own
        others = [_tenant_child(family[0], 7000 + k) for k in range(3)]
        for _ in range(3):
            sb.call("scribble", 5, 40)
            assert sb.call("digest") == want
        assert _inode_at(fd) == inode
        # nothing new may use the closed layer: a sandbox, a switch (the sandbox goes on)
        with pytest.raises(SnapshotError, match="closed"):
            Sandbox(child, timeout=10)
        with pytest.raises(SnapshotError, match="closed"):
            other.switch(child)
        assert other.status is SandboxStatus.READY and other.snapshot_in_use is family[1]
        assert_like_fresh(other, family[1])
        sb.switch(others[0])  # switching away lets go of the closed layer: released now
        assert _inode_at(fd) != inode
        assert_like_fresh(sb, others[0])
        with pytest.raises(SnapshotError, match="closed"):
            sb.switch(child)
        assert_like_fresh(sb, others[0])
    for o in others:
        o.layers[-1].close()


def test_closing_a_layer_with_no_sandbox_releases_it_at_once(family):
    child = _tenant_child(family[0], 99)
    with Sandbox(child, timeout=10) as sb:
        sb.call("digest")
    before = len(os.listdir("/proc/self/fd"))
    child.layers[-1].close()
    assert len(os.listdir("/proc/self/fd")) == before - 1
    child.layers[-1].close()  # twice is harmless
