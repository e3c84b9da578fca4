"""The channel's slot records (hlpool.pool.channel, written and read by the Cython hlpool.pool._slots)
on a real posix_ipc channel: the layout the struct definitions describe, and refusals of records
that do not fit or that the other process corrupted (a worker is not trusted)."""

from __future__ import annotations

import pytest

from hlpool.errors import HlpoolError
from hlpool.pool import _slots
from hlpool.pool import channel as ipc


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
