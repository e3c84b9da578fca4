"""Sandbox calls on real KVM VMs running the example and test guests."""

from __future__ import annotations

import hashlib
import math
import time

import pytest

import hlpool
from hlpool import (
    CallError,
    GuestError,
    GuestFault,
    GuestProtocolError,
    GuestTimeout,
    HostFunctionError,
    MemoryConfig,
    PayloadTooLargeError,
    Sandbox,
    SandboxClosedError,
    Snapshot,
)

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def echo(snapshots):
    with Sandbox(snapshots("echo")) as sb:
        yield sb


@pytest.mark.parametrize("value", [
    None, True, False, 0, 1, -1, 127, 128, -33, 2**31, -(2**63), 2**63 - 1, 0.0, -2.5, 1e308, math.inf,
    "", "hello", "ünïcödé ☃", "a\x00b", b"", b"\x00\xff" * 1000, [], [1, [2, [3, [4]]]], {},
    {"a": 1, "b": [None, True], "c": {"d": b"x"}}, list(range(1000)),
])
def test_echo_returns_every_value_type(echo, value):
    assert echo.call("echo", value) == value


def test_nesting_limit_is_the_same_on_both_sides(echo):
    assert echo.call("echo", _nested(32)) == _nested(32)
    with pytest.raises(CallError, match="nested deeper"):
        echo.call("echo", _nested(33))


def test_echo_nan_and_tuple(echo):
    assert math.isnan(echo.call("echo", math.nan))
    assert echo.call("echo", (1, "a")) == [1, "a"]  # tuples travel as lists


def test_echo_large_bytes(echo):
    data = bytes(range(256)) * 3000  # 768 KiB: most of the 1 MiB buffers
    assert echo.call("echo", data) == data


def test_add_and_argument_errors(snapshots):
    with Sandbox(snapshots("add")) as sb:
        assert sb.call("add", 2, 3) == 5
        assert sb.call("add", 2.5, 1) == 3.5
        assert sb.call("sum", [1, 2, 3.5]) == 6.5
        with pytest.raises(CallError, match="argument 1: expected int, got str"):
            sb.call("add", 1, "x")
        with pytest.raises(CallError, match="argument 1: expected int, got nothing"):
            sb.call("add", 1)
        with pytest.raises(CallError, match="list item: expected float, got str"):
            sb.call("sum", [1, "two"])
        with pytest.raises(GuestError, match="integer overflow"):
            sb.call("add", 2**62, 2**62)
        assert sb.call("add", 40, 2) == 42  # still usable


def test_unknown_function_lists_exports(echo):
    with pytest.raises(CallError, match=r"unknown function 'nope'.*\['echo', 'noop'\]"):
        echo.call("nope")
    assert echo.call("echo", 1) == 1


def _nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("bad, message", [
    ({1, 2}, "set is not a supported value type"),
    (object(), "object is not a supported value type"),
    (2**64, "does not fit in 64 bits"),
    (-(2**63) - 1, "does not fit in 64 bits"),
    ({1: "x"}, "dict key 1 is not a str"),
    (_nested(40), "nested deeper"),
])
def test_unencodable_arguments_are_rejected_before_the_guest(echo, bad, message):
    with pytest.raises(CallError, match=message):
        echo.call("echo", bad)
    assert echo.call("echo", "ok") == "ok"


def test_payload_too_large(kvm, example):
    snap = Snapshot.from_elf(example("echo"), config=MemoryConfig(in_size=16384))
    with Sandbox(snap) as sb:
        with pytest.raises(PayloadTooLargeError, match="input buffer holds"):
            sb.call("echo", b"x" * 20000)
        assert sb.call("echo", b"y" * 1000) == b"y" * 1000


def test_sha256_matches_hashlib(snapshots):
    with Sandbox(snapshots("sha256")) as sb:
        for size in (0, 1, 55, 56, 63, 64, 65, 1000, 100_000):
            data = bytes((i * 7 + size) & 0xFF for i in range(size))
            assert sb.call("sha256", data) == hashlib.sha256(data).hexdigest()
        assert sb.call("sha256", "abc") == hashlib.sha256(b"abc").hexdigest()


def test_fib(snapshots):
    with Sandbox(snapshots("fib")) as sb:
        assert sb.call("fib", 90) == 2880067194370816120
        assert sb.call("fib_recursive", 20) == 6765
        with pytest.raises(GuestError, match="n must be in"):
            sb.call("fib", -1)


# ---- faults, timeouts, guest errors ------------------------------------------------------


@pytest.fixture(scope="module")
def faults(snapshots):
    with Sandbox(snapshots("faults"), timeout=2.0) as sb:
        yield sb


@pytest.mark.parametrize("fn, vector, text", [
    ("null_deref", 14, "NULL pointer dereference"),
    ("divide_by_zero", 0, "#DE divide error"),
    ("invalid_opcode", 6, "#UD invalid opcode"),
    ("stack_overflow", 14, "stack overflow"),
    ("write_code", 14, "protection violation"),
])
def test_guest_faults_are_reported_and_sandbox_recovers(faults, fn, vector, text):
    with pytest.raises(GuestFault, match=text) as info:
        faults.call(fn)
    assert info.value.vector == vector
    assert info.value.rip and info.value.rip >= 0x200000
    if vector == 14:
        assert info.value.address is not None
    with pytest.raises(GuestError, match="still works"):
        faults.call("fail", "still works")


def test_infinite_loop_is_stopped_at_its_deadline(faults):
    start = time.monotonic()
    with pytest.raises(GuestTimeout):
        faults.call("infinite_loop", timeout=0.3)
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 2.0
    with pytest.raises(GuestError, match="after timeout"):
        faults.call("fail", "after timeout")


def test_timeouts_repeat_without_leaking_kicks(faults):
    for _ in range(3):
        with pytest.raises(GuestTimeout):
            faults.call("infinite_loop", timeout=0.05)
    # A stale timer signal must not interrupt later calls.
    for _ in range(50):
        with pytest.raises(GuestError):
            faults.call("fail", "x")


def test_abort_and_exit_are_guest_errors(faults):
    with pytest.raises(GuestError, match="SIGABRT"):
        faults.call("abort")
    with pytest.raises(GuestError, match=r"exit\(3\)"):
        faults.call("exit", 3)


def test_invalid_timeout(faults):
    with pytest.raises(CallError, match="timeout must be positive"):
        faults.call("fail", "x", timeout=0)


# ---- host functions ------------------------------------------------------------------------


def test_host_functions(snapshots):
    calls = []

    def value(i):
        calls.append(i)
        return i * 2

    def boom():
        raise RuntimeError("kaboom")

    host = {"prefix": lambda: "Hello", "value": value, "boom": boom, "echo": lambda *a: list(a),
            "bad": lambda: object(), "huge": lambda: b"x" * (2 << 20)}
    with Sandbox(snapshots("hostcall"), host_functions=host, max_host_calls=1000) as sb:
        assert sb.call("greet", "world") == "Hello, world!"
        assert sb.call("total", 10) == 90 and calls == list(range(10))
        assert sb.call("ask", "echo", 1, "a", b"b", [None]) == [1, "a", b"b", [None]]
        with pytest.raises(HostFunctionError, match="raised RuntimeError: kaboom") as info:
            sb.call("ask", "boom")
        assert isinstance(info.value.__cause__, RuntimeError)
        with pytest.raises(HostFunctionError, match="unknown host function 'missing'"):
            sb.call("ask", "missing")
        with pytest.raises(HostFunctionError, match="object is not a supported value type"):
            sb.call("ask", "bad")
        with pytest.raises(HostFunctionError, match="reply buffer"):
            sb.call("ask", "huge")
        with pytest.raises(HostFunctionError, match="more than 1000 host calls"):
            sb.call("total", 5000)
        assert sb.call("total", 3) == 6


def test_host_function_table_is_validated(snapshots):
    with pytest.raises(TypeError):
        Sandbox(snapshots("echo"), host_functions={"x": 42})


# ---- logging ---------------------------------------------------------------------------------


def test_guest_output_reaches_the_log_handler(kvm, test_guest):
    lines: list[str] = []
    with Sandbox.from_elf(test_guest("libc"), log_handler=lines.append) as sb:
        sb.call("say", "hi")
    assert lines == ["stdout: hi", "stderr: hi", "puts line", "hl_log 7", "no newline at the end"]


def test_guest_output_goes_to_logging_by_default(kvm, test_guest, caplog):
    with caplog.at_level("INFO", logger="hlpool.guest"):
        with Sandbox.from_elf(test_guest("libc"), name="loggy") as sb:
            sb.call("say", "there")
    assert any("[loggy] stdout: there" in r.getMessage() for r in caplog.records)


def test_log_flood_is_bounded(kvm, test_guest, caplog):
    lines: list[str] = []
    with Sandbox.from_elf(test_guest("hostile"), log_handler=lines.append, max_log_bytes=10_000) as sb:
        with caplog.at_level("WARNING", logger="hlpool.guest"):
            assert sb.call("flood_log", 2000) == 2000  # 200 KB of output: many log-full exits
    assert 90 <= len(lines) <= 101
    assert any("bytes dropped" in r.getMessage() for r in caplog.records)


# ---- libc ------------------------------------------------------------------------------------


def test_ordinary_c_code_runs(kvm, test_guest):
    with Sandbox.from_elf(test_guest("libc")) as sb:
        assert sb.call("format", 7) == "42| 3.14|1.234568e+04|0.0001|ff|str|z|7"
        assert sb.call("sort", [3, 1.5, -2, 10]) == [-2.0, 1.5, 3.0, 10.0]
        s, r, p, e, d = sb.call("math", 2.0)
        assert (s, r, p, e, d) == pytest.approx((math.sin(2), math.sqrt(2), 2**3.5, math.exp(2), 2500.0))
        assert sb.call("alloc", 8 << 20, 1000) > 0
        assert sb.call("alloc", 4 << 20, 300_000) > 0  # large blocks: mmap path
        assert sb.call("oom", 1 << 40) is False
        assert sb.call("setjmp", 5) == 5
        elapsed, realtime, time_t = sb.call("clocks")
        assert 0 < elapsed < 1e9 and abs(realtime - time.time()) < 5 and abs(time_t - realtime) <= 1
        a, b = sb.call("random", 32), sb.call("random", 32)
        assert len(a) == 32 and a != b
        assert len(sb.call("random", 300_000)) == 300_000
        fd, err1, pid, err2 = sb.call("unsupported")
        assert fd == -1 and pid == -1 and err1 == err2 == "Function not implemented"


def test_calls_never_see_each_others_state(kvm, test_guest):
    with Sandbox.from_elf(test_guest("libc")) as sb:
        assert sb.call("recall") == "from hl_main"
        sb.call("remember", "secret")
        assert sb.call("recall") == "from hl_main"
        sb.call("remember", "kept", restore=False)
        assert sb.call("recall") == "kept"
        assert sb.call("recall") == "from hl_main"


@pytest.mark.parametrize("setter, getter, value", [
    ("set_xmm", "get_xmm", 0x1234_5678_9ABC),
    ("set_mxcsr", "get_mxcsr", 0x1F80 | 0x6000),
    ("set_regs", "get_regs", 0x7777),
    ("set_gsbase", "get_gsbase", 0x4444_0000),
])
def test_cpu_state_does_not_leak_between_calls(kvm, test_guest, setter, getter, value):
    with Sandbox.from_elf(test_guest("cpustate")) as sb:
        before = sb.call(getter)
        sb.call(setter, value)
        assert sb.call(getter) == before
        if setter != "set_regs":  # compiled code restores callee-saved registers itself
            sb.call(setter, value, restore=False)
            assert sb.call(getter) == value  # kept on purpose
            assert sb.call(getter) == before


def test_strict_cpu_reset(kvm, test_guest):
    with Sandbox.from_elf(test_guest("cpustate"), strict_cpu_reset=True) as sb:
        sb.call("set_xmm", 99)
        assert sb.call("get_xmm") == 0


# ---- hostile guests ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(kvm, test_guest):
    with Sandbox.from_elf(test_guest("hostile"), timeout=5) as sb:
        yield sb


def _still_works(sb):
    assert sb.call("input_tail") == 0


@pytest.mark.parametrize("args, error, text", [
    ((2, 1 << 62), GuestProtocolError, "claims a 4611686018427387904-byte record"),
    ((2, 5, b"\xc1\xc1\xc1\xc1\xc1"), GuestProtocolError, "malformed"),
    ((2, 3, b"\xd6\xff\x00"), GuestProtocolError, "malformed"),
    ((2, 2, b"\x81\x01"), GuestProtocolError, "malformed"),
    ((99, 0), GuestProtocolError, "unknown kind 99"),
    ((7, 0), GuestProtocolError, "unknown kind 7"),
    ((3, 1 << 40), GuestProtocolError, "claims"),
])
def test_forged_results_are_rejected(hostile, args, error, text):
    with pytest.raises(error, match=text):
        hostile.call("forge", *args)
    _still_works(hostile)


def test_garbage_in_output_buffer(hostile):
    with pytest.raises(GuestProtocolError, match="bad magic"):
        hostile.call("bad_magic")
    with pytest.raises(GuestProtocolError, match="unexpected event 77"):
        hostile.call("bad_event", 77)
    with pytest.raises(GuestProtocolError, match="unknown I/O port 0x80"):
        hostile.call("bad_port")
    with pytest.raises(GuestProtocolError, match="read from unknown I/O port"):
        hostile.call("port_in")
    with pytest.raises(GuestProtocolError, match="claims"):
        hostile.call("bad_hostcall", 1 << 50)
    with pytest.raises(GuestProtocolError, match="randomness request"):
        hostile.call("bad_random", 1 << 40)
    _still_works(hostile)


def test_log_length_is_clamped(hostile):
    assert hostile.call("bad_log", 1 << 60) == 7
    _still_works(hostile)


def test_write_to_read_only_input_is_a_fault(hostile):
    with pytest.raises(GuestFault):
        hostile.call("write_input")
    _still_works(hostile)


def test_result_larger_than_output_buffer(hostile):
    assert len(hostile.call("big_result", 1000)) == 1000
    with pytest.raises(CallError, match="does not fit the output buffer"):
        hostile.call("big_result", 3 << 20)
    _still_works(hostile)


def test_input_buffer_holds_no_earlier_call_data(hostile):
    with pytest.raises(GuestFault):  # any call with a big argument...
        hostile.call("write_input", b"secret" * 10_000)
    assert hostile.call("input_tail") == 0  # ...leaves nothing behind for the next call


def test_host_call_flood_is_bounded(kvm, test_guest):
    with Sandbox.from_elf(test_guest("hostile"), host_functions={"f": lambda: 1}, max_host_calls=200) as sb:
        assert sb.call("flood_host", "f", 200) == 200
        with pytest.raises(HostFunctionError, match="more than 200 host calls"):
            sb.call("flood_host", "f", 201)


# ---- lifecycle ------------------------------------------------------------------------------


def test_closed_sandbox_refuses_calls(snapshots):
    sb = Sandbox(snapshots("echo"))
    assert sb.call("noop") is None
    sb.close()
    sb.close()  # idempotent
    with pytest.raises(SandboxClosedError):
        sb.call("noop")


def test_many_sandboxes_of_one_snapshot(snapshots):
    snap = snapshots("echo")
    boxes = [Sandbox(snap) for _ in range(20)]
    try:
        assert [sb.call("echo", i) for i, sb in enumerate(boxes)] == list(range(20))
    finally:
        for sb in boxes:
            sb.close()


def test_from_elf_rejects_a_non_guest(kvm, tmp_path):
    path = tmp_path / "not.elf"
    path.write_bytes(b"hello")
    with pytest.raises(hlpool.GuestImageError, match="not an ELF"):
        Sandbox.from_elf(str(path))


def test_failing_hl_main(kvm, tmp_path):
    from hlpool.guest.build import build_guest

    src = tmp_path / "failing.c"
    src.write_text('#include <hlpool.h>\nint hl_main(void) { hl_log("giving up"); return 3; }\n')
    elf = build_guest([src], tmp_path / "failing.elf")
    with pytest.raises(hlpool.GuestImageError, match="hl_main returned 3"):
        Snapshot.from_elf(elf)
    src.write_text('#include <hlpool.h>\nint hl_main(void) { return *(volatile int *)0; }\n')
    elf = build_guest([src], tmp_path / "crashing.elf")
    with pytest.raises(hlpool.GuestImageError, match="initialisation failed.*NULL pointer") as info:
        Snapshot.from_elf(elf)
    assert isinstance(info.value.__cause__, GuestFault)
    src.write_text('#include <hlpool.h>\nint hl_main(void) { for (;;); }\n')
    elf = build_guest([src], tmp_path / "hanging.elf")
    with pytest.raises(hlpool.GuestImageError, match="deadline"):
        Snapshot.from_elf(elf, timeout=0.5)


FORGED_INIT = r"""
#include <hlpool.h>
#include <string.h>
#include "%s/hlpool/guest/sdk/runtime/runtime.h"
int hl_main(void) {
    /* a msgpack array with one 100-character name, written by hand */
    static unsigned char payload[2 + 1 + 100];
    payload[0] = 0x91; payload[1] = 0xd9; payload[2] = 100;
    memset(payload + 3, 'a', 100);
    hl__out_record_bytes(HL_MSG_INIT, payload, sizeof payload, 0);
    hl__signal(HL_EV_INIT_DONE);
    return 0;
}
"""


def test_forged_export_list_is_rejected(kvm, tmp_path):
    from pathlib import Path

    from hlpool.guest.build import build_guest

    src = tmp_path / "forged.c"
    src.write_text(FORGED_INIT % Path(__file__).resolve().parent.parent)
    elf = build_guest([src], tmp_path / "forged.elf")
    with pytest.raises(hlpool.GuestImageError, match="invalid list of exports"):
        Snapshot.from_elf(elf)


def test_one_sandbox_shared_by_threads(snapshots):
    import threading

    results: list = []
    with Sandbox(snapshots("echo")) as sb:
        def worker(k: int) -> None:
            results.extend(sb.call("echo", [k, i]) == [k, i] for i in range(200))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 800 and all(results)


def test_private_memory_never_drops_pages_to_zeros(snapshots):
    """A private copy has no file under its pages: restore must copy every page back, whatever
    the resident budget (dropping one brought back zeros and the guest triple-faulted)."""
    from hlpool import RestorePolicy

    with Sandbox(snapshots("touch"), private_memory=True,
                 restore_policy=RestorePolicy(keep_resident_pages=0)) as sb:
        first = sb.call("touch", 64)
        for _ in range(5):
            assert sb.call("touch", 64) == first
            assert sb.call("touch", 1) == sb.call("touch", 1)
