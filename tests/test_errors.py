"""The error hierarchy's wire form: what crosses from a worker to the supervisor and from
the server to a client. Pure Python (no KVM)."""

from __future__ import annotations

import msgspec
import pytest

from hlpool import errors
from hlpool.pool.calls import rebuild_error as _rebuild_error
from hlpool.pool.worker import error_blob

ALL = sorted((obj for obj in vars(errors).values() if isinstance(obj, type) and issubclass(obj, errors.HlpoolError)),
             key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_error_round_trips_with_its_type_and_code(cls):
    exc = cls("something went wrong")
    back = errors.from_wire(exc.to_wire())
    assert type(back) is cls
    assert str(back) == "something went wrong"
    assert back.code == cls.code


def test_fault_details_survive_the_wire():
    fault = errors.GuestFault("#PF", vector=14, vector_name="#PF page fault", error_code=6, rip=0x401000,
                              address=0xdead000)
    wire = fault.to_wire()
    assert wire["details"] == {"vector": 14, "vector_name": "#PF page fault", "error_code": 6, "rip": 0x401000,
                               "address": 0xdead000}
    back = errors.from_wire(msgspec.msgpack.decode(msgspec.msgpack.encode(wire)))
    assert (back.vector, back.vector_name, back.error_code, back.rip, back.address) == \
        (14, "#PF page fault", 6, 0x401000, 0xdead000)


def test_codes_are_stable():
    # The HTTP API documents these codes; changing one breaks clients.
    assert errors.CallError.code == "bad_request"
    assert errors.PayloadTooLargeError.code == "payload_too_large"
    assert errors.GuestFault.code == "guest_fault"
    assert errors.GuestTimeout.code == "timeout"
    assert errors.GuestError.code == errors.GuestProtocolError.code == "guest_error"
    assert errors.WorkerCrashed.code == "worker_crashed"
    assert errors.PoolOverloadedError.code == "overloaded"
    assert errors.PoolClosedError.code == "shutting_down"
    assert errors.SnapshotError.code == errors.GuestImageError.code == "snapshot_error"
    assert errors.HlpoolError.code == "internal"
    assert not issubclass(errors.PoolClosedError, errors.SandboxClosedError)


@pytest.mark.parametrize("wire", [None, 3, "x", [], {"type": 5, "message": object()}, {"code": "nope"}, {}])
def test_malformed_wire_still_gives_an_hlpool_error(wire):
    assert isinstance(errors.from_wire(wire), errors.HlpoolError)


def test_unknown_type_keeps_its_name_and_falls_back_to_the_code():
    exc = errors.from_wire({"type": "RecursionError", "message": "too deep"})
    assert type(exc) is errors.HlpoolError and str(exc) == "RecursionError: too deep"
    exc = errors.from_wire({"type": "SomethingNew", "code": "timeout", "message": "late"})
    assert isinstance(exc, errors.GuestTimeout)


def test_worker_report_round_trip_keeps_type_fields_and_cause():
    try:
        try:
            raise ValueError("inner problem")
        except ValueError as inner:
            raise errors.GuestFault("outer", vector=13, rip=7) from inner
    except errors.GuestFault as exc:
        blob = error_blob(exc)
    back = _rebuild_error(blob)
    assert type(back) is errors.GuestFault and (back.vector, back.rip) == (13, 7)
    assert "inner problem" in str(back.__cause__)
    assert isinstance(_rebuild_error(error_blob(KeyError("k"))), errors.HlpoolError)
    assert isinstance(_rebuild_error(b"\xc1garbage"), errors.WorkerCrashed)
