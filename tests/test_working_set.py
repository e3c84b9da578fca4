"""The restore working set: pages that calls write again and again are restored wholesale.

In bitmap mode (KVM_GET_DIRTY_LOG with manual protect) a page written by
``promote_after`` restores in a row stays writable and is compared / copied back
by every restore instead of being write-protected (a ~3.5 us fault per page per
call on PVM). These tests run the pages.c guest in real VMs and check, after
every call, the whole main area through the host mapping against a fresh
sandbox, the guest's own view, and KVM's dirty bitmap (exactly the working set
stays unprotected), across promotions, demotions and resets.
"""

from __future__ import annotations

import fcntl
import os
import struct
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hlpool import RestorePolicy, Sandbox, Snapshot
from hlpool.guest.layout import PAGE, SLOT_MAIN
from hlpool.memory import _dirty

pytestmark = pytest.mark.kvm

CALL_TIMEOUT = 5.0  # seconds: a call that runs on memory a broken restore left behind fails, not hangs
TINY = RestorePolicy(max_wholesale_pages=6, promote_after=2, demote_after=3)


@pytest.fixture(scope="module")
def pages_snapshot(test_guest):
    return Snapshot.from_elf(test_guest("pages"))


class Reference(tuple):
    """(main area bytes of a sandbox that never ran a call, main-area page of the guest's area)."""

    def __repr__(self) -> str:  # hypothesis prints fixtures: not 18 MiB of bytes
        return f"Reference(first={self[1]})"


@pytest.fixture(scope="module")
def reference(pages_snapshot):
    with Sandbox(pages_snapshot, timeout=CALL_TIMEOUT) as fresh:
        memory = main_memory(fresh)
        address, count = fresh.call("info")
    first = (address - fresh.layout.main.start) // PAGE
    assert count == 96 and address % PAGE == 0
    return Reference((memory, first))


def main_memory(sb: Sandbox) -> bytes:
    main = sb.layout.main
    return sb.memory.read(main.start, main.size)


def kvm_dirty_bits(sb: Sandbox) -> list[int]:
    """Pages whose bit is set in KVM's dirty bitmap of the logged slot (read-only with manual protect)."""
    logged = sb.layout.logged.size // PAGE
    bitmap = array("Q", bytes(8 * ((logged + 63) // 64)))
    _dirty.get_dirty_log(sb.vm.fd, SLOT_MAIN, bitmap)
    return [w * 64 + b for w, word in enumerate(bitmap) for b in range(64) if word >> b & 1]


def vcpu_stats(sb: Sandbox) -> dict[str, int]:
    """The vCPU's counters from KVM's binary statistics (KVM_GET_STATS_FD; struct kvm_stats_header/desc)."""
    stats_fd = fcntl.ioctl(sb.vcpu.fd, (0xAE << 8) | 0xCE)  # _IO(KVMIO, 0xce)
    try:
        _flags, name_size, count, _id, desc_offset, data_offset = struct.unpack("6I", os.pread(stats_fd, 24, 0))
        size = 16 + name_size
        descs = os.pread(stats_fd, size * count, desc_offset)
        out = {}
        for i in range(count):
            offset = struct.unpack_from("IhHII", descs, i * size)[3]
            name = descs[i * size + 16:(i + 1) * size].split(b"\0")[0].decode()
            out[name] = struct.unpack("Q", os.pread(stats_fd, 8, data_offset + offset))[0]
        return out
    finally:
        os.close(stats_fd)


def check_restored(sb: Sandbox, reference: bytes, policy: RestorePolicy) -> None:
    assert main_memory(sb) == reference  # every page the call wrote is back
    ws = sb.memory.working_set_pages
    assert len(ws) == sb.last_restore.wholesale <= policy.max_wholesale_pages
    assert kvm_dirty_bits(sb) == ws  # everything else is write-protected again


# One call: (pages, fill per page, op, restore automatically?)
steps = st.lists(
    st.tuples(st.lists(st.integers(0, 95) | st.integers(0, 11), max_size=24),
              st.integers(0, 3),
              st.sampled_from(["write", "write", "rewrite"]),
              st.booleans()),
    min_size=1, max_size=14)


@pytest.mark.parametrize("policy", [TINY, RestorePolicy(), RestorePolicy(promote_after=1, demote_after=1),
                                    RestorePolicy(keep_resident_pages=12, max_wholesale_pages=4, demote_after=2)],
                         ids=["tiny", "default", "eager", "small-budget"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=steps)
def test_no_write_survives_a_restore(pages_snapshot, reference, policy, calls):
    memory, first = reference
    with Sandbox(pages_snapshot, timeout=CALL_TIMEOUT, restore_policy=policy) as sb:
        assert sb.vm.manual_dirty_protect and sb.vm.dirty_ring_entries == 0
        for pages, fill, op, auto in calls:
            args = (pages, [(fill + p) % 4 for p in pages]) if op == "write" else (pages,)
            sb.call(op, *args, restore=auto)
            if not auto:  # the writes are there until the restore (pages >= 48 start zero)
                changed = op == "write" and any(p < 48 or (fill + p) % 4 for p in pages)
                area = slice(first * PAGE, (first + 96) * PAGE)
                assert (main_memory(sb)[area] != memory[area]) == changed
                stats = sb.restore()
                assert stats.copied + stats.dropped == stats.dirty
            check_restored(sb, memory, policy)
        assert sb.call("pristine") == 1  # and the guest sees its snapshot


def test_steady_working_set_stops_write_protecting(pages_snapshot, reference):
    memory, first = reference
    hot = list(range(16))
    for policy, wholesale in ((RestorePolicy(), True), (RestorePolicy(max_wholesale_pages=0), False)):
        with Sandbox(pages_snapshot, timeout=CALL_TIMEOUT, restore_policy=policy) as sb:
            protected, promoted = [], 0
            for i in range(6):
                sb.call("write", hot, [1 + i] * 16)
                protected.append(sb.last_restore.protected)
                promoted += sb.last_restore.promoted
                check_restored(sb, memory, policy)
            before = vcpu_stats(sb)
            for i in range(20):
                sb.call("write", hot, [1 + i] * 16)
            after = vcpu_stats(sb)
            faults = after["pf_taken"] - before["pf_taken"]  # KVM's own count of guest page faults
            check_restored(sb, memory, policy)
            if wholesale:
                assert faults < 20, faults  # none per call (slack for host events that zap mappings)
                assert protected[0] >= 16 and protected[2:] == [0] * 4, protected
                assert promoted >= 16
                assert {first + p for p in hot} <= set(sb.memory.working_set_pages)
                assert sb.last_restore.copied >= 16  # restored wholesale, every call
            else:
                assert faults >= 16 * 20, faults  # one write-protect fault per page per call
                assert min(protected) >= 16 and promoted == 0 and sb.memory.working_set_pages == []
            assert sb.call("pristine") == 1


def test_working_set_is_bounded(pages_snapshot, reference):
    memory, first = reference
    policy = RestorePolicy(max_wholesale_pages=8)
    with Sandbox(pages_snapshot, timeout=CALL_TIMEOUT, restore_policy=policy) as sb:
        for i in range(5):
            sb.call("write", list(range(40)), [i + 1] * 40)
            check_restored(sb, memory, policy)
        stats = sb.last_restore
        assert stats.wholesale == 8 and len(sb.memory.working_set_pages) == 8
        assert stats.protected >= 40 - 8


def test_unused_pages_leave_the_working_set(pages_snapshot, reference):
    memory, first = reference
    a, b = list(range(0, 10)), list(range(60, 70))
    with Sandbox(pages_snapshot, timeout=CALL_TIMEOUT, restore_policy=TINY) as sb:
        for _ in range(3):
            sb.call("write", a[:6], [7] * 6)
            check_restored(sb, memory, TINY)
        assert {first + p for p in a[:6]} <= set(sb.memory.working_set_pages)
        demoted = 0
        for _ in range(TINY.demote_after + 2):  # another working set: the old one is demoted, then replaced
            sb.call("write", b[:6], [9] * 6)
            demoted += sb.last_restore.demoted
            check_restored(sb, memory, TINY)
        ws = set(sb.memory.working_set_pages)
        assert demoted >= 6 and not ws & {first + p for p in a} and {first + p for p in b[:6]} <= ws
        sb.call("write", a, [3] * 10)  # demoted pages are logged (write-protected) again
        assert sb.last_restore.protected >= 10
        check_restored(sb, memory, TINY)
        assert sb.call("pristine") == 1


def test_rewrites_with_same_bytes_need_no_copy(pages_snapshot, reference):
    memory, first = reference
    with Sandbox(pages_snapshot, timeout=CALL_TIMEOUT, restore_policy=TINY) as sb:
        for _ in range(2):
            sb.call("rewrite", list(range(4)))
        assert {first + p for p in range(4)} <= set(sb.memory.working_set_pages)
        sb.call("rewrite", list(range(4)))
        assert sb.last_restore.unchanged >= 4
        check_restored(sb, memory, TINY)


def test_reset_working_set_relearns(pages_snapshot, reference):
    memory, first = reference
    with Sandbox(pages_snapshot, timeout=CALL_TIMEOUT) as sb:
        for i in range(3):
            sb.call("write", list(range(16)), [i + 1] * 16)
        assert len(sb.memory.working_set_pages) >= 16
        sb.memory.reset_working_set()  # the hook a snapshot switch calls
        assert sb.memory.working_set_pages == []
        assert kvm_dirty_bits(sb)  # the former working set keeps its bits until the next restore
        sb.call("write", list(range(16)), [5] * 16)
        assert sb.last_restore.protected >= 16 and sb.last_restore.promoted == 0
        check_restored(sb, memory, sb.memory.policy)
        sb.call("write", list(range(16)), [6] * 16)
        assert sb.last_restore.promoted >= 16
        check_restored(sb, memory, sb.memory.policy)


def test_dirty_pages_still_lists_written_pages(pages_snapshot, reference):
    memory, first = reference
    with Sandbox(pages_snapshot, timeout=CALL_TIMEOUT) as sb:
        for i in range(3):
            sb.call("write", [1, 2, 70], [i + 1] * 3)
        sb.call("write", [1, 2, 70, 80], [9] * 4, restore=False)
        assert {first + p for p in (1, 2, 70, 80)} <= set(sb.dirty_pages())
        sb.restore()
        assert main_memory(sb) == memory


def test_ring_mode_keeps_no_working_set(pages_snapshot, reference):
    memory, first = reference
    with Sandbox(pages_snapshot, timeout=CALL_TIMEOUT, restore_policy=RestorePolicy(dirty_log="ring")) as sb:
        assert sb.vm.dirty_ring_entries == 4096 and not sb.vm.manual_dirty_protect
        for i in range(4):
            sb.call("write", list(range(16)), [i + 1] * 16)
            assert main_memory(sb) == memory
        assert sb.memory.working_set_pages == [] and sb.last_restore.wholesale == 0


def test_policy_validation():
    for bad in (dict(dirty_log="pml"), dict(dirty_log="ring", dirty_ring_entries=0), dict(max_wholesale_pages=-1),
                dict(promote_after=0), dict(demote_after=256)):
        with pytest.raises(ValueError):
            RestorePolicy(**bad)


def test_auto_choice_follows_memory_size(test_guest, pages_snapshot):
    from hlpool import MemoryConfig
    from hlpool.memory.guest_memory import AUTO_BITMAP_MAX_BYTES

    huge = Snapshot.from_elf(test_guest("pages"), config=MemoryConfig(heap_size=AUTO_BITMAP_MAX_BYTES))
    assert huge.layout.logged.size > AUTO_BITMAP_MAX_BYTES >= pages_snapshot.layout.logged.size
    with Sandbox(huge, timeout=CALL_TIMEOUT) as sb:  # huge memory: the dirty ring (cost follows dirty pages)
        assert sb.vm.dirty_ring_entries == 4096 and not sb.vm.manual_dirty_protect
        sb.call("write", [3], [1])
        assert sb.call("pristine") == 1
    with Sandbox(huge, timeout=CALL_TIMEOUT, restore_policy=RestorePolicy(dirty_log="bitmap")) as sb:
        assert sb.vm.dirty_ring_entries == 0 and sb.vm.manual_dirty_protect
        for i in range(3):
            sb.call("write", [3, 4], [i + 1] * 2)
        assert sb.last_restore.protected == 0 and sb.last_restore.wholesale >= 2
        assert sb.call("pristine") == 1
    with Sandbox(pages_snapshot, timeout=CALL_TIMEOUT, restore_policy=RestorePolicy(dirty_ring_entries=0)) as sb:
        assert sb.vm.dirty_ring_entries == 0 and sb.vm.manual_dirty_protect
