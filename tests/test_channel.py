"""The channel (hlpool.pool.channel, driven by the Cython hlpool.pool._slots) on real shared memory:
slot records in the layout the struct definitions describe, refusals of records that do not fit or
that the other process corrupted (a worker is not trusted), the process-shared semaphores in the
mapping (posted and waited on by real other processes), and the pool's batch read of answers."""

from __future__ import annotations

import collections
import os
import threading
import time

import posix_ipc
import pytest

from hlpool.errors import HlpoolError
from hlpool.pool import _slots
from hlpool.pool import channel as ipc
from hlpool.pool.registry import SnapshotHandle


@pytest.fixture
def channel():
    ch = ipc.Channel.create(4, 8192)
    ch.unlink()
    yield ch
    ch.close()


def test_a_request_round_trips_in_the_layout_the_header_describes(channel):
    path, function, payload = "/store/ab.hlsnap".encode(), b"echo", b"\x91\xcd\x01\x00"
    for index in range(9):  # past the depth: slots are reused in order
        channel.write_request(index, 1000 + index, path, function, payload, 5_000_000, 77, ipc.OP_CALL, index % 2 == 1)
        fields = ipc.HEADER.unpack_from(channel.view, (index % channel.depth) * channel.slot_size)
        assert fields[:8] == (ipc.OP_CALL, 1000 + index, 5_000_000, len(path), len(function), len(payload), 77,
                              index % 2)
        op, rid, timeout, expires, p, fn, data, notify = channel.read_request(index)
        assert (op, rid, timeout, expires, p, fn, bytes(data), notify) == (
            ipc.OP_CALL, 1000 + index, 5_000_000, 77, path.decode(), "echo", payload, index % 2 == 1)
        channel.mark_taken(index, 1000 + index)
        assert channel.taken(index, 1000 + index) and not channel.taken(index, 999)


def test_an_answer_round_trips_in_the_layout_the_response_describes(channel):
    data = bytes(range(256)) * 3
    channel.write_response(2, 42, ipc.STATUS_ERROR, data, 3, 123_456, 7, 9)
    assert ipc.RESPONSE.unpack_from(channel.view, 2 * channel.slot_size) == (
        ipc.STATUS_ERROR, 42, len(data), 3, 123_456, 7, 9)
    assert channel.read_response(2) == (ipc.STATUS_ERROR, 42, data, (3, 123_456, 7, 9))
    channel.write_response(3, 43, ipc.STATUS_OK, b"", 1)
    assert channel.read_response(3) == (ipc.STATUS_OK, 43, b"", (1, 0, 0, 0))


def test_the_worker_takes_a_request_marked_taken_with_its_payload_copied(channel):
    channel.write_request(5, 1005, b"/s/x.hlsnap", b"fn", b"\x92\x01\x02", 9, 10, ipc.OP_CALL, True)
    assert not channel.taken(5, 1005)
    taken = _slots.take_request(channel.view, channel.offsets[5 % channel.depth], channel.data_capacity,
                                ipc.OP_CALL, ipc.OP_OPEN)
    assert taken == (ipc.OP_CALL, 1005, 9, 10, "/s/x.hlsnap", "fn", b"\x92\x01\x02", True)
    assert channel.taken(5, 1005)
    channel.write_request(5, 1009, b"/s/x.hlsnap", b"fn", b"\x00" * 3, 9, 10)  # the slot reused: the copy stays
    assert taken[6] == b"\x92\x01\x02"
    channel.write_stop(6)
    assert _slots.take_request(channel.view, channel.offsets[6 % channel.depth], channel.data_capacity,
                               ipc.OP_CALL, ipc.OP_OPEN)[0] == ipc.OP_STOP
    channel.write_request(1, 7, b"/p", b"f", b"xy", 0)
    fields = list(ipc.HEADER.unpack_from(channel.view, channel.offsets[1]))
    fields[5] = 2**64 - 1
    ipc.HEADER.pack_into(channel.view, channel.offsets[1], *fields)
    with pytest.raises(HlpoolError, match="corrupt request"):
        _slots.take_request(channel.view, channel.offsets[1], channel.data_capacity, ipc.OP_CALL, ipc.OP_OPEN)
    assert not channel.taken(1, 7)  # refused before it was marked


def test_a_stop_request_carries_only_its_op(channel):
    channel.write_stop(1)
    assert channel.read_request(1)[0] == ipc.OP_STOP


def test_records_that_do_not_fit_the_slot_are_refused(channel):
    cap = channel.data_capacity
    with pytest.raises(ValueError, match="does not fit"):
        channel.write_request(0, 1, b"p" * 10, b"f", b"x" * (cap - 10), 0)
    channel.write_request(0, 1, b"p" * 10, b"f", b"x" * (cap - 11), 0)  # exactly full
    assert len(channel.read_request(0)[6]) == cap - 11
    with pytest.raises(ValueError, match="does not fit"):
        channel.write_response(0, 1, ipc.STATUS_OK, b"x" * (cap + 1), 1)


@pytest.mark.parametrize("lengths", [(0, 0, 10**9), (2**63, 2**63, 8), (2**64 - 1, 1, 0), (5, 2**64 - 4, 0)],
                         ids=["huge", "sum-overflows", "wraps", "wraps-to-small"])
def test_corrupt_request_lengths_are_refused(channel, lengths):
    channel.write_request(1, 5, b"/p", b"f", b"xy", 0)
    fields = list(ipc.HEADER.unpack_from(channel.view, channel.slot_size))
    fields[3:6] = lengths
    ipc.HEADER.pack_into(channel.view, channel.slot_size, *fields)
    with pytest.raises(HlpoolError, match="corrupt request"):
        channel.read_request(1)


@pytest.mark.parametrize("length", [8192 * 2, 2**64 - 1, 2**63])
def test_a_corrupt_answer_length_is_refused(channel, length):
    channel.write_response(0, 5, ipc.STATUS_OK, b"ok", 1)
    fields = list(ipc.RESPONSE.unpack_from(channel.view, 0))
    fields[2] = length
    ipc.RESPONSE.pack_into(channel.view, 0, *fields)
    with pytest.raises(HlpoolError, match="corrupt response"):
        channel.read_response(0)


def test_a_slot_outside_the_mapping_is_refused(channel):
    size = len(channel.view)
    for base, capacity in ((size - 64, 0), (-1, 0), (0, size), (channel.slot_size, size - channel.slot_size)):
        with pytest.raises(ValueError, match="outside the mapping"):
            _slots.read_response(channel.view, base, capacity)
        with pytest.raises(ValueError, match="outside the mapping"):
            _slots.write_request(channel.view, base, capacity, 1, 1, b"", b"", b"", 0, 0, 0)


# ---- the semaphores in the mapping ---------------------------------------------------------------


def _other_process(action) -> int:
    """Fork a process that runs ``action()`` and exits (0 on success)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            action()
            code = 0
        finally:
            os._exit(code)
    return pid


def _exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_channel_leaves_one_name_and_its_semaphores_are_in_its_mapping():
    prefix = f"{ipc.PREFIX}{os.getpid()}-"
    before = {n for n in os.listdir("/dev/shm") if prefix in n}
    ch = ipc.Channel.create(3, 4096)
    try:
        made = {n for n in os.listdir("/dev/shm") if prefix in n} - before
        assert made == {ch.names.shm[1:]}  # no sem.* names
        ch.unlink()
        assert not {n for n in os.listdir("/dev/shm") if prefix in n} - before
        # a full answer in the last slot does not touch the semaphores after it
        ch.write_response(ch.depth - 1, 9, ipc.STATUS_OK, b"\xff" * ch.data_capacity, 1, 2**64 - 1, 2**64 - 1, 2**64 - 1)
        assert ch.requests.value == 0 and ch.responses.value == 0
        ch.responses.release()
        assert (ch.requests.value, ch.responses.value) == (0, 1)
        assert ch.read_response(ch.depth - 1)[2] == b"\xff" * ch.data_capacity
    finally:
        ch.close()


def test_a_token_posted_by_another_process_ends_a_wait_and_waits_are_bounded(channel):
    with pytest.raises(posix_ipc.BusyError):
        channel.responses.acquire(0)
    start = time.monotonic()
    with pytest.raises(posix_ipc.BusyError):
        channel.responses.acquire(0.05)
    assert 0.05 <= time.monotonic() - start < 2

    pid = _other_process(lambda: (time.sleep(0.03), channel.responses.release()))
    try:
        channel.responses.acquire(5)  # woken by the other process
        assert channel.responses.value == 0
    finally:
        assert _exit_code(pid) == 0
    pid = _other_process(lambda: (time.sleep(0.03), channel.requests.release()))
    try:
        channel.requests.acquire()  # no bound
    finally:
        assert _exit_code(pid) == 0
    assert channel.requests.value == 0 and channel.responses.value == 0


def test_a_worker_attached_by_name_shares_the_semaphores():
    ch = ipc.Channel.create(2, 4096)
    try:
        other = ipc.Channel.attach(ch.names)  # as the spawner does, before it forks the worker

        def worker_side() -> None:
            other.requests.acquire(5)  # the supervisor's post
            other.write_response(0, 7, ipc.STATUS_OK, b"hi", 1)
            other.responses.release()

        pid = _other_process(worker_side)
        other.close()
        ch.unlink()  # the name goes once the other side is attached
        ch.requests.release()
        try:
            ch.responses.acquire(5)
        finally:
            assert _exit_code(pid) == 0
        assert ch.read_response(0)[:3] == (ipc.STATUS_OK, 7, b"hi")
    finally:
        ch.close()


def test_take_and_poll_take_only_what_was_posted(channel):
    sem = channel.responses
    for _ in range(3):
        sem.release()
    assert sem.take(2) == 2 and sem.value == 1
    assert sem.take(10) == 1 and sem.value == 0
    assert sem.take(10) == 0
    assert not sem.poll(time.monotonic_ns() + 2_000_000)
    sem.release()
    assert sem.poll(time.monotonic_ns() + 2_000_000) and sem.value == 0


def test_a_closed_semaphore_refuses_use_and_a_waiter_keeps_the_mapping(channel):
    sem = channel.requests
    waiter_done = threading.Event()
    outcome: list = []

    def wait() -> None:
        try:
            sem.acquire(0.3)
            outcome.append("taken")
        except posix_ipc.BusyError:
            outcome.append("timed out")
        waiter_done.set()

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.05)
    sem.close()  # while the other thread waits: its wait still ends normally
    with pytest.raises(HlpoolError, match="closed"):
        sem.release()
    assert waiter_done.wait(5)
    thread.join()
    assert outcome == ["timed out"]
    with pytest.raises(HlpoolError, match="closed"):
        sem.acquire(0)


def test_semaphores_outside_the_mapping_are_refused(channel):
    size = len(channel.view)
    for offset in (-8, size - 32, size, 3):
        with pytest.raises(ValueError, match="outside the mapping"):
            _slots.SharedSemaphore(channel.view, offset)


# ---- the call record and the batch read ----------------------------------------------------------


def _handle(path: str = "/store/t.hlsnap") -> SnapshotHandle:
    return SnapshotHandle(path, ("echo",), "0" * 64, 4096)


def test_a_call_is_written_as_write_request_writes_it(channel):
    call = _slots.Call(None, _handle(), "échø", b"\x91\x01", 5_000, 77, expires=12.5, in_loop=True)
    assert call.op == ipc.OP_CALL
    _slots.write_call(channel.view, channel.offsets[1], channel.data_capacity, call)
    by_call = bytes(channel.view[channel.offsets[1]:channel.offsets[2]])
    channel.write_request(1, 77, b"/store/t.hlsnap", "échø".encode(), b"\x91\x01", 5_000, 12_500_000_000,
                          ipc.OP_CALL, True)
    assert bytes(channel.view[channel.offsets[1]:channel.offsets[2]]) == by_call
    assert channel.read_request(1)[:6] == (ipc.OP_CALL, 77, 5_000, 12_500_000_000, "/store/t.hlsnap", "échø")
    too_big = _slots.Call(None, _handle(), "f", b"x" * channel.data_capacity, 0, 1)
    with pytest.raises(ValueError, match="does not fit"):
        _slots.write_call(channel.view, channel.offsets[0], channel.data_capacity, too_big)


def _answered_calls(channel, count: int, first_id: int = 100) -> collections.deque:
    calls = collections.deque()
    for i in range(count):
        op = ipc.OP_OPEN if i == 1 else ipc.OP_CALL
        calls.append(_slots.Call(None, _handle(f"/store/{i % 2}.hlsnap"), "echo", b"", 0, first_id + i, op=op))
        channel.write_response(i, first_id + i, ipc.STATUS_ERROR if i == 2 else ipc.STATUS_OK, bytes([i]) * i,
                               5 + i, 1_000_000 * (i + 1), 10 + i, 20 + i)
    return calls


def test_a_batch_is_read_in_order_with_counts_figures_and_cost_estimates(channel):
    inflight = _answered_calls(channel, 4)
    calls = list(inflight)
    costs: dict = {}
    batch, trusted, n_calls, n_errors, n_opens, figures = _slots.read_answers(
        channel.view, channel.offsets, channel.data_capacity, 0, inflight, 4, ipc.OP_CALL, ipc.STATUS_OK, costs)
    assert trusted and not inflight
    assert [(c, s, d) for c, s, d in batch] == [(calls[i], ipc.STATUS_ERROR if i == 2 else ipc.STATUS_OK,
                                                 bytes([i]) * i) for i in range(4)]
    assert (n_calls, n_errors, n_opens, figures) == (3, 1, 1, (8, 13, 23))
    # /store/0: calls 0 and 2 (1 ms, then 3 ms); /store/1: call 3 (4 ms; call 1 was an open hint)
    assert costs == {"/store/0.hlsnap": pytest.approx(0.8 * 0.001 + 0.2 * 0.003), "/store/1.hlsnap": 0.004}


@pytest.mark.parametrize("breach", ["another request id", "a length beyond the slot"])
def test_a_worker_breaking_the_protocol_is_reported_and_no_call_is_lost(channel, breach):
    inflight = _answered_calls(channel, 3)
    calls = list(inflight)
    fields = list(ipc.RESPONSE.unpack_from(channel.view, channel.offsets[1]))
    if breach == "another request id":
        fields[1] = 999
    else:
        fields[2] = 2**64 - 1
    ipc.RESPONSE.pack_into(channel.view, channel.offsets[1], *fields)
    batch, trusted, *_ = _slots.read_answers(channel.view, channel.offsets, channel.data_capacity, 0, inflight, 3,
                                             ipc.OP_CALL, ipc.STATUS_OK, {})
    assert not trusted
    assert [item[0] for item in batch] == calls and not inflight  # every call taken is in the batch


def test_a_semaphore_the_other_side_wrote_over_fails_with_a_clear_error(channel):
    at = channel.names.size - ipc.SEMAPHORE_PAGE  # requests: glibc's 64-bit word, the count in its low half
    channel.view[at:at + 8] = (2**31 - 1).to_bytes(8, "little")  # full: a post overflows
    with pytest.raises(HlpoolError, match="corrupted"):
        channel.requests.release()
    assert channel.requests.take(3) == 3  # what it says is posted can be taken (and read as garbage)
    channel.view[at:at + 8] = bytes(8)
    channel.requests.release()
    assert channel.requests.value == 1  # the other semaphore and the mapping are unharmed
    assert channel.responses.value == 0
