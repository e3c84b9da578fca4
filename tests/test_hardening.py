"""Regression tests for what a hostile guest, caller or file could do (the red-team findings).

Each test reproduces an attack on real parts (real VMs running tests/guests/hostile.c,
real forked workers) and checks the fix: a clear hlpool error, nothing wedged, nothing kept.
"""

from __future__ import annotations

import msgspec
import pytest

from hlpool import GuestProtocolError, HlpoolError, Pool, Sandbox
from hlpool.guest import codec

pytestmark = pytest.mark.kvm

HL_MSG_OK = 2
DEEP = b"\x91" * 2000 + b"\xc0"  # [[[...[nil]...]]] 2000 levels: msgspec raises RecursionError


@pytest.fixture(scope="module")
def hostile_sandbox(kvm, test_guest):
    with Sandbox.from_elf(test_guest("hostile"), timeout=5) as sb:
        yield sb


# ---- 1. guest data can only raise hlpool errors ------------------------------------------------------

HOSTILE_ENCODINGS = [
    DEEP,
    b"\xdd\xff\xff\xff\xff",  # array claiming 4 Gi items
    b"\xdf\xff\xff\xff\xff",  # map claiming 4 Gi pairs
    b"\xc7\x01\x05x",  # extension type
    b"\x81\xc0\x01",  # dict with a nil key
    b"\x81\x91\x01\x01",  # dict with a list key
    b"\x92\x01",  # truncated array
    b"\xd9\x05ab",  # truncated str
    b"\xc1",  # never-used byte
    b"\xcf" + b"\xff" * 8,  # uint64 over int64
    b"\x91" * 64 + b"\xc0",  # one level deeper than the host allows
]


@pytest.mark.parametrize("data", HOSTILE_ENCODINGS, ids=lambda d: d[:6].hex())
def test_decoding_guest_bytes_raises_only_protocol_errors(data):
    try:
        value = codec.decode_value(data)
    except GuestProtocolError:
        return
    # the only acceptable success is a valid hlpool value (e.g. a big uint64 msgspec may accept)
    codec.check_value(value)


def test_decoder_never_raises_anything_else_on_random_bytes():
    import random

    rng = random.Random(1234)
    for _ in range(3000):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
        if rng.random() < 0.3:
            data = bytes([rng.choice([0x91, 0x81, 0xdc, 0xde])]) * rng.randint(1, 300) + data
        try:
            codec.decode_value(data)
        except GuestProtocolError:
            pass


def test_sandbox_call_with_deeply_nested_result_is_a_protocol_error(hostile_sandbox):
    with pytest.raises(GuestProtocolError, match="nested deeper"):
        hostile_sandbox.call("forge", HL_MSG_OK, len(DEEP), DEEP)
    assert hostile_sandbox.call("input_tail") == 0  # still usable, back at its snapshot


def test_pool_survives_many_deeply_nested_results(kvm, test_guest):
    """Before the fix, one such result killed the worker's collector thread and every later call
    to that worker hung forever; six wedged an HTTP server."""
    with Pool(workers=1) as pool:
        snap = pool.snapshot(test_guest("hostile"))
        for _ in range(8):
            future = pool.submit(snap, "forge", (HL_MSG_OK, len(DEEP), DEEP))
            with pytest.raises(GuestProtocolError):
                future.result(timeout=30)
        assert pool.submit(snap, "input_tail", ()).result(timeout=30) == 0
        assert pool.collector_failures == 0
        assert all(w["alive"] for w in pool.stats())


def test_every_guest_protocol_error_is_an_hlpool_error():
    assert issubclass(GuestProtocolError, HlpoolError)
    with pytest.raises(GuestProtocolError):
        codec.decode_value(msgspec.msgpack.encode([[[[1]]]]) [:-1])
