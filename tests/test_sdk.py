"""The C guest SDK on real VMs: sequential reading (hl_iter), building nested values, C++ guests.

The guests are tests/guests/sdk_values.c and tests/guests/sdk_cxx.cpp, built here with
``build_guest`` (and once through the ``hlpool guest build`` command line). Timings are
taken inside the guest (CLOCK_MONOTONIC), so they hold only the SDK's work.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from hlpool import CallError, GuestBuildError, GuestError, MemoryConfig, Sandbox, Snapshot
from hlpool.guest.build import build_guest

pytestmark = pytest.mark.kvm

GUESTS = Path(__file__).resolve().parent / "guests"
MIB = 1 << 20


@pytest.fixture(scope="module")
def values_elf(tmp_path_factory) -> Path:
    return build_guest([GUESTS / "sdk_values.c"], tmp_path_factory.mktemp("sdk") / "sdk_values.elf")


@pytest.fixture(scope="module")
def sb(kvm, values_elf):
    # 4 MiB of input for the 100k-pair dicts; 64 MiB of heap for repeated constructions.
    snap = Snapshot.from_elf(values_elf, config=MemoryConfig(heap_size=64 * MIB, in_size=4 * MIB))
    with Sandbox(snap, host_functions={"numbers": lambda n: list(range(n))}) as box:
        yield box


def _best(calls: int, fn):
    return min(fn() for _ in range(calls))


# ---- hl_iter -----------------------------------------------------------------------------------


def test_iter_reads_lists_and_dicts_in_order(sb):
    assert sb.call("iter_sum", list(range(10)))[0] == 45
    assert sb.call("iter_sum", [])[0] == 0
    assert sb.call("item_sum", list(range(10)))[0] == 45
    assert sb.call("item_sum_backwards", list(range(1000))) == 499500
    d = {"a": 1, "bb": [1, 2], "c": {"d": None}, "": "x"}
    assert sb.call("pairs", d) == [[k, v] for k, v in d.items()]
    assert sb.call("pairs", {}) == []
    assert sb.call("dict_sum", {f"k{i}": i for i in range(100)})[:3] == [100, 4950, 290]


def test_iter_over_values_built_in_the_call(sb):
    # [sum of [1, 2, 3], keys and values joined, hl_key(dict, 1), hl_item(hl_get(dict, "b"), 2), missing key]
    assert sb.call("built") == [6, "axb[list]", "b", 3, True]


def test_iter_over_a_host_call_result(sb):
    assert sb.call("from_host", 100_000) == sum(range(100_000))


def test_iter_on_a_scalar_is_a_call_error(sb):
    with pytest.raises(CallError, match="hl_iter_init: expected list or dict, got int"):
        sb.call("iter_wrong", 5)
    assert sb.call("iter_sum", [1, 2])[0] == 3  # still usable


@pytest.mark.parametrize("fn", ["iter_sum", "item_sum"])
def test_reading_a_long_list_costs_the_same_per_item(sb, fn):
    """100k items cost no more per item than 1k (hl_item in order is as cheap as hl_iter)."""
    per_item = {}
    for n in (1_000, 100_000):
        xs = list(range(n))
        assert sb.call(fn, xs)[0] == sum(xs)
        per_item[n] = _best(5, lambda: sb.call(fn, xs)[1]) / n
    print(f"{fn}: ns per item {per_item}")
    assert per_item[100_000] < 3 * per_item[1_000] + 20, per_item


def test_reading_a_long_dict_costs_the_same_per_pair(sb):
    per_pair = {}
    for n in (1_000, 100_000):
        d = {f"k{i}": i for i in range(n)}
        count, total, key_bytes, _ = sb.call("dict_sum", d)
        assert (count, total, key_bytes) == (n, sum(range(n)), sum(len(k) for k in d))
        per_pair[n] = _best(5, lambda: sb.call("dict_sum", d)[3]) / n
    print(f"dict_sum: ns per pair {per_pair}")
    assert per_pair[100_000] < 3 * per_pair[1_000] + 20, per_pair


# ---- building nested values ------------------------------------------------------------------


def _deep(depth):
    value = depth
    for i in range(depth):
        value = [value, i]
    return value


def test_deep_results_up_to_the_nesting_limit(sb):
    assert sb.call("deep", 32) == _deep(32)  # HL_MAX_DEPTH levels: what the host accepts
    for depth in (33, 500):
        with pytest.raises(CallError, match="result nested deeper than 32 levels"):
            sb.call("deep", depth)
    assert sb.call("deep", 3) == _deep(3)


def _record(i):
    return {"id": i, "name": f"item-{i}", "tags": [i, i + 1, "t"], "sub": {"x": [1.5]}}


def _output_size(sb, fn, *args):
    """The exact size of a result as the guest encoded it."""
    return len(sb.call_encoded(fn, msgspec.msgpack.encode(list(args))))


def test_a_wide_nested_result_near_the_output_limit(sb):
    n = 18_000
    value = sb.call("wide", n)
    size = _output_size(sb, "wide", n)
    assert size == len(msgspec.msgpack.encode(value))  # ints in their shortest form, as msgspec writes them
    assert 0.9 * MIB < size <= MIB, size
    assert len(value) == n and value[0] == _record(0) and value[-1] == _record(n - 1)
    with pytest.raises(CallError, match="does not fit the output buffer"):
        sb.call("wide", 20_000)


PRETOUCH = 24 * MIB


def _build_time(sb, kind, n):
    """Guest-side construction time (ns), best of 3, with the heap it needs already written in the call.

    The first write to a page in a sandbox costs microseconds (KVM dirty tracking, and a host page fault
    when the page is not resident): linear in the memory used as well, but with a constant that depends
    on the host, so it is kept out of this measurement (the "cold" numbers printed include it).
    """
    return _best(3, lambda: sb.call("build_time", kind, n, 1, PRETOUCH))


def test_construction_cost_per_output_byte_is_flat(sb):
    """Nested records: construction time per output byte stays flat as the output grows to ~1 MiB."""
    warm, cold = {}, {}
    for n in (500, 2_000, 8_000, 18_000):
        size = _output_size(sb, "wide", n)
        cold[n] = round(sb.call("build_time", "wide", n, 1) / size, 1)
        warm[n] = round(_build_time(sb, "wide", n) / size, 1)
    print(f"wide: ns per output byte: {warm} (cold: {cold})")
    assert max(warm.values()) < 4 * min(warm.values()), warm  # quadratic would grow 36x from 500 to 18,000


def test_construction_cost_per_level_is_flat(sb):
    """N nested lists (built in the guest; deeper than 32 is fine until it is returned): linear in N."""
    warm, cold = {}, {}
    for n in (10_000, 30_000, 100_000):
        cold[n] = round(sb.call("build_time", "deep", n, 1) / n, 1)
        warm[n] = round(_build_time(sb, "deep", n) / n, 1)
    print(f"deep: ns per level: {warm} (cold: {cold})")
    assert max(warm.values()) < 4 * min(warm.values()), warm  # quadratic would grow 10x from 10,000 to 100,000


# ---- the interpreter guests read arguments with hl_iter ------------------------------------------


@pytest.mark.parametrize("language, source", [
    ("js", "function total(xs, d) { let s = 0; for (const x of xs) s += x;"
           " for (const k in d) s += d[k]; return [s, xs.length, Object.keys(d).length]; }"),
    ("lua", "function total(xs, d) local s, n = 0, 0 for _, x in ipairs(xs) do s = s + x end"
            " for _, v in pairs(d) do s = s + v n = n + 1 end return {s, #xs, n} end"),
])
def test_interpreters_take_long_lists_and_dicts(kvm, language, source):
    from hlpool.guest import interpreters
    from hlpool.sandbox.scripts import base_snapshot, load_script

    interpreters.build_interpreters()
    snap = load_script(base_snapshot(language), source)
    with Sandbox(snap, timeout=30) as box:
        xs, d = list(range(100_000)), {f"k{i}": i for i in range(20_000)}
        assert box.call("call", "total", [xs, d]) == [sum(xs) + sum(d.values()), len(xs), len(d)]


# ---- C++ ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimize", ["0", "2"])
def test_a_cxx_guest_builds_and_runs(kvm, tmp_path, optimize):
    elf = build_guest([GUESTS / "sdk_cxx.cpp"], tmp_path / "cxx.elf", optimize=optimize)
    with Sandbox(Snapshot.from_elf(elf)) as box:
        assert box.call("add", 2, 40) == 42
        assert box.call("area", 6, 7) == 42  # virtual call through new/delete, new[]/delete[]
        # a global constructed before hl_main (41) and a function-local static, both back at their
        # snapshot state in every call
        assert box.call("counters") == [42, 42]
        assert box.call("counters") == [42, 42]
        assert box.call("sum", list(range(100))) == 4950  # a lambda over hl_iter
        assert box.call("greet", "c++") == {"greeting": "hello, c++"}
        with pytest.raises(CallError, match="argument 0: expected int"):
            box.call("add", "x", 1)


def test_cxx_guest_with_the_command_line(kvm, tmp_path):
    out = tmp_path / "cli.elf"
    proc = subprocess.run([sys.executable, "-m", "hlpool.cli", "guest", "build", str(GUESTS / "sdk_cxx.cpp"),
                           "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "hlpool.cli", "run", str(out), "area", "6", "7"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "42"


@pytest.mark.parametrize("source, message", [
    ("#include <vector>\nextern \"C\" int hl_main(void) { return 0; }\n", "vector: No such file"),
    ("extern \"C\" int hl_main(void) { throw 1; }\n", "exception handling disabled"),
    ("#include <typeinfo>\nextern \"C\" int hl_main(void) { return 0; }\n", "typeinfo: No such file"),
])
def test_what_cxx_guests_cannot_use_fails_at_build_time(tmp_path, source, message):
    src = tmp_path / "bad.cpp"
    src.write_text(source)
    with pytest.raises(GuestBuildError, match=message):
        build_guest([src], tmp_path / "bad.elf")


def test_a_guest_error_from_cxx_code(kvm, tmp_path):
    src = tmp_path / "err.cc"
    src.write_text('#include <hlpool.h>\n'
                   'static hl_value f(const hl_args *) { return hl_error("from %s", "c++"); }\n'
                   'extern "C" int hl_main(void) { hl_export("f", f); return 0; }\n')
    with Sandbox(Snapshot.from_elf(build_guest([src], tmp_path / "err.elf"))) as box:
        with pytest.raises(GuestError, match="from c\\+\\+"):
            box.call("f")
