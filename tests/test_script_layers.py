"""What a script's load() leaves in its layer, with the interpreters' packing allocator.

The interpreter guests allocate what a load() creates from one region with a bump
pointer (hlpool/guest/programs/js/pack_alloc.h), so a script's layer holds few heap
pages; calls allocate as before. These tests check the layers' sizes on real builds
and that loads layered on loads, and calls on them, see exactly the state they should.
"""

from __future__ import annotations

import pytest

from hlpool import GuestError, Sandbox
from hlpool.guest import interpreters
from hlpool.sandbox.scripts import base_snapshot, load_script

pytestmark = pytest.mark.kvm

PAGE = 4096

# Pages of a one-line script's own layer. Measured with this allocator: JS 12, Lua 8 (with
# libc's allocator alone they were 18 and 13: one page group per size class, plus meta pages).
ONE_LINE = {"js": ("function f() { return 1; }", 13), "lua": ("function f() return 1 end", 9)}


@pytest.fixture(scope="module")
def bases(kvm):
    interpreters.build_interpreters()
    return {lang: base_snapshot(lang) for lang in interpreters.LANGUAGES}


def _own_pages(snap) -> int:
    return snap.layers[-1].size // PAGE


def _heap_runs(snap) -> list[tuple[int, int]]:
    """(first page, pages) of the heap runs in the snapshot's own layer."""
    top = len(snap.layers) - 1
    return [(r.guest_address // PAGE, r.size // PAGE) for r in snap.regions if r.layer == top and r.area == "heap"]


@pytest.mark.parametrize("language", ["js", "lua"])
def test_a_one_line_script_has_a_small_layer(bases, language):
    source, most = ONE_LINE[language]
    snap = load_script(bases[language], source)
    assert _own_pages(snap) <= most, f"{language}: {_own_pages(snap)} pages, {_heap_runs(snap)}"
    with Sandbox(snap) as sb:
        assert sb.call("call", "f") == 1


@pytest.mark.parametrize("language", ["js", "lua"])
def test_what_a_load_allocates_is_contiguous(bases, language):
    # 200 distinct strings kept by the script: with one page group per size class they would
    # spread over the heap; packed, they fill consecutive pages.
    source = ("const keep = []; for (let i = 0; i < 200; i++) keep.push('item' + i + '-'.repeat(i % 40));\n"
              "function get(i) { return keep[i]; }" if language == "js" else
              "keep = {} for i = 0, 199 do keep[i + 1] = 'item' .. i .. string.rep('-', i % 40) end\n"
              "function get(i) return keep[i + 1] end")
    snap = load_script(bases[language], source)
    runs = _heap_runs(snap)
    longest = max(n for _, n in runs)
    assert longest >= 3, runs  # ~16 KiB of strings and their array in one stretch
    assert _own_pages(snap) <= ONE_LINE[language][1] + longest + 2, runs
    with Sandbox(snap) as sb:
        assert sb.call("call", "get", [7]) == "item7" + "-" * 7
        assert sb.call("call", "get", [199]) == "item199" + "-" * (199 % 40)


GARBAGE = {
    # 20,000 ever longer strings (~900 MB of garbage in all): most freed at once.
    "js": "let s = ''; for (let i = 0; i < 20000; i++) s += i; const n = s.length; function f() { return n; }",
    "lua": "local s = '' for i = 1, 20000 do s = s .. i end n = #s function f() return n end",
}


@pytest.mark.parametrize("language", ["js", "lua"])
def test_a_load_that_makes_much_garbage_does_not_keep_it(bases, language):
    # With libc alone these layers were 56 (JS) and 146 (Lua) pages; the packing allocator
    # may add at most its budget per load (16 pages). Keeping the garbage would be thousands.
    snap = load_script(bases[language], GARBAGE[language])
    assert _own_pages(snap) <= {"js": 56, "lua": 146}[language] + 16 + 4
    with Sandbox(snap) as sb:
        assert sb.call("call", "f") == (88890 if language == "js" else 88894)


JS_FIRST = """
const items = [];
for (let i = 0; i < 50; i++) items.push({n: i, name: 'n' + i});
var table = {};
for (let i = 0; i < 300; i++) globalThis['g' + i] = i;   // grows the global object (an object of the base)
let counter = 0;
function bump() { counter += 1; items.push({n: 1000 + counter}); return [counter, items.length]; }
function names() { return items.slice(0, 3).map(x => x.name); }
function total() { let s = 0; for (let i = 0; i < 300; i++) s += globalThis['g' + i]; return s; }
"""
JS_SECOND = """
for (let i = 0; i < 2000; i++) items.push({n: -i});     // grows the first load's array (frozen) well past it
items[0].name = 'changed';
delete globalThis.g7;
globalThis.g8 = 'eight';
const extra = 'x'.repeat(5000);
function total() { let s = 0; for (let i = 0; i < 300; i++) if (i !== 7 && i !== 8) s += globalThis['g' + i]; return s; }
function info() { return [items.length, items[0].name, typeof g7, g8, extra.length]; }
"""
LUA_FIRST = """
items = {}
for i = 1, 50 do items[i] = {n = i, name = 'n' .. i} end
for i = 1, 300 do _G['g' .. i] = i end
counter = 0
function bump() counter = counter + 1 items[#items + 1] = {n = 1000 + counter} return {counter, #items} end
function names() return {items[1].name, items[2].name, items[3].name} end
function total() local s = 0 for i = 1, 300 do s = s + _G['g' .. i] end return s end
"""
LUA_SECOND = """
for i = 1, 2000 do items[#items + 1] = {n = -i} end
items[1].name = 'changed'
g7 = nil
g8 = 'eight'
extra = string.rep('x', 5000)
function total() local s = 0 for i = 1, 300 do if i ~= 7 and i ~= 8 then s = s + _G['g' .. i] end end return s end
function info() return {#items, items[1].name, type(g7), g8, #extra} end
"""


@pytest.mark.parametrize("language", ["js", "lua"])
def test_loads_on_loads_and_calls_see_exactly_their_state(bases, language):
    first_src, second_src = (JS_FIRST, JS_SECOND) if language == "js" else (LUA_FIRST, LUA_SECOND)
    first = load_script(bases[language], first_src)
    second = load_script(first, second_src)
    # the first snapshot is untouched by the second load
    with Sandbox(first) as sb:
        for _ in range(3):  # every call starts from the snapshot: the same answer each time
            assert sb.call("call", "bump") == [1, 51]
        assert sb.call("call", "names") == (["n0", "n1", "n2"] if language == "js" else ["n1", "n2", "n3"])
        assert sb.call("call", "total") == (sum(range(300)) if language == "js" else sum(range(1, 301)))
        # a call that grows and frees what the load made, then a restore and the same call
        grown = sb.call("call", "bump", restore=False)
        assert sb.call("call", "bump") == [grown[0] + 1, grown[1] + 1]
        sb.restore()
        assert sb.call("call", "bump") == [1, 51]
    with Sandbox(second) as sb:
        expected_total = (sum(range(300)) - 7 - 8) if language == "js" else (sum(range(1, 301)) - 7 - 8)
        for _ in range(3):
            assert sb.call("call", "info") == [2050, "changed", "undefined" if language == "js" else "nil",
                                               "eight", 5000]
            assert sb.call("call", "total") == expected_total
            assert sb.call("call", "bump") == [1, 2051]
    # a fresh sandbox of the second snapshot sees the same as one that ran calls before
    with Sandbox(second) as fresh:
        assert fresh.call("call", "info")[0] == 2050


@pytest.mark.parametrize("language", ["js", "lua"])
def test_a_memory_bomb_while_loading_is_the_interpreters_error(bases, language):
    bomb = ("const a = []; for (;;) a.push('x'.repeat(4096) + a.length);" if language == "js" else
            "local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 4096) .. i end")
    with pytest.raises(GuestError, match="out of memory" if language == "js" else "not enough memory"):
        load_script(bases[language], bomb, timeout=60)
    snap = load_script(bases[language], ONE_LINE[language][0])  # the base is as it was
    with Sandbox(snap) as sb:
        assert sb.call("call", "f") == 1


@pytest.mark.parametrize("language", ["js", "lua"])
def test_a_small_heap_leaves_calls_their_memory(kvm, language):
    """The load region takes at most 1/8 of the heap: with a 5 MiB heap (an interpreter limit
    of 3.75 MiB) a call can still build a big string (2.5 MB in JS; 1 MB in Lua, whose buffer
    doubles on the way), as with libc's allocator alone."""
    from hlpool.guest.layout import MIB, MemoryConfig

    interpreters.build_interpreters()
    config = MemoryConfig(heap_size=5 * MIB, stack_size=1 * MIB, out_size=1 * MIB)
    source = ("function big(n) { return 'x'.repeat(n).length; }" if language == "js" else
              "function big(n) return #string.rep('x', n) end")
    snap = load_script(base_snapshot(language, config=config), source)
    assert _own_pages(snap) <= ONE_LINE[language][1] + 2  # packed here too
    size = 2_500_000 if language == "js" else 1_000_000
    with Sandbox(snap) as sb:
        assert sb.call("call", "big", [size]) == size
