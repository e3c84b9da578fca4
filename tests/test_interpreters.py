"""The JavaScript (QuickJS) and Lua interpreter guests, and functions-as-a-service on layers.

The interpreters are built once (cached in the hlpool cache, keyed by the
pinned sdist hashes, the SDK and the glue sources); the first run downloads the
sdists from PyPI and compiles them (about a minute).
"""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from hlpool import CallError, GuestBuildError, GuestError, GuestTimeout, HostFunctionError, Sandbox, Snapshot
from hlpool.guest import interpreters
from hlpool.sandbox import scripts
from hlpool.sandbox.scripts import base_snapshot, load_script

pytestmark = pytest.mark.kvm


def _host_fail(*args):
    raise ValueError("host says no")


HOST = {
    "add": lambda a, b: a + b,
    "echo": lambda *args: list(args),
    "fail": _host_fail,
    "bad_result": lambda: {1, 2},
}


@pytest.fixture(scope="session")
def built():
    return interpreters.build_interpreters()


@pytest.fixture(scope="module")
def bases(kvm, built):
    return {lang: base_snapshot(lang) for lang in interpreters.LANGUAGES}


JS_LIB = r"""
function echo(x) { return x; }
function roundtrip(x) { return JSON.parse(JSON.stringify(x)); }
function stringify(x) { return JSON.stringify(x); }
function sum(xs) { let s = 0; for (const x of xs) s += x; return s; }
function types(...a) {
    return a.map(x => x === null ? 'null' : x instanceof Uint8Array ? 'bytes' : Array.isArray(x) ? 'array' : typeof x);
}
function nest(n) { let v = 1; for (let i = 0; i < n; i++) v = [v]; return v; }
function spin() { for (;;) {} }
let counter = 0;
const inc = () => ++counter;
var util = { k: 10, add(x) { return this.k + x; } };
function callHost(name, ...args) { return host.call(name, ...args); }
"""

LUA_LIB = r"""
function echo(x) return x end
function sum(xs) local s = 0 for _, x in ipairs(xs) do s = s + x end return s end
function types(...)
    local out = {}
    for i = 1, select('#', ...) do
        local x = select(i, ...)
        out[i] = math.type(x) or type(x)
    end
    return out
end
function nest(n) local v = 1 for _ = 1, n do v = {v} end return v end
function spin() while true do end end
local counter = 0
function inc() counter = counter + 1 return counter end
util = {k = 10, add = function(x) return util.k + x end}
function callHost(name, ...) return host.call(name, ...) end

-- a small JSON encoder built from strings
local escapes = {['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t'}
function encode(v)
    local t = type(v)
    if v == nil then return 'null'
    elseif t == 'boolean' then return tostring(v)
    elseif math.type(v) == 'integer' then return string.format('%d', v)
    elseif t == 'number' then return string.format('%.17g', v)
    elseif t == 'string' then
        return '"' .. v:gsub('[%c"\\]', function(c) return escapes[c] or string.format('\\u%04x', c:byte()) end) .. '"'
    elseif t == 'table' then
        local parts = {}
        if #v > 0 or next(v) == nil then
            for i = 1, #v do parts[i] = encode(v[i]) end
            return '[' .. table.concat(parts, ',') .. ']'
        end
        local keys = {}
        for k in pairs(v) do keys[#keys + 1] = k end
        table.sort(keys)
        for i, k in ipairs(keys) do parts[i] = encode(k) .. ':' .. encode(v[k]) end
        return '{' .. table.concat(parts, ',') .. '}'
    end
    error('cannot encode a ' .. t)
end
"""


@pytest.fixture(scope="module")
def libs(bases):
    return {"js": load_script(bases["js"], JS_LIB), "lua": load_script(bases["lua"], LUA_LIB)}


@pytest.fixture(scope="module")
def js(libs):
    with Sandbox(libs["js"], host_functions=HOST, timeout=10) as sb:
        yield sb


@pytest.fixture(scope="module")
def lua(libs):
    with Sandbox(libs["lua"], host_functions=HOST, timeout=10) as sb:
        yield sb


# ---- building -------------------------------------------------------------------------------


def test_pinned_sources_and_built_guests(built):
    assert interpreters.SOURCES["js"].name == "quickjs" and interpreters.SOURCES["js"].version.startswith("1.19.")
    assert interpreters.SOURCES["lua"].name == "lupa" and interpreters.SOURCES["lua"].version.startswith("2.")
    for language, path in built.items():
        assert path.exists() and path.name.startswith(language + "-")
        assert interpreters.interpreter_path(language) == path  # cached


def test_cli_builds_and_prints_the_interpreters(built, capsys):
    from hlpool.cli.main import main

    assert main(["guest", "interpreters"]) == 0
    out = capsys.readouterr().out
    assert f"js\t{built['js']}" in out and f"lua\t{built['lua']}" in out


def test_hash_mismatch_is_a_build_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HLPOOL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HLPOOL_SDIST_DIR", str(tmp_path))
    spec = interpreters.SOURCES["lua"]
    (tmp_path / spec.filename).write_bytes(b"not the lupa sdist")
    with pytest.raises(GuestBuildError, match="does not match the pinned"):
        interpreters.fetch_sdist(spec)


def test_unreachable_index_is_a_build_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HLPOOL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HLPOOL_SDIST_DIR", raising=False)
    monkeypatch.setattr(interpreters, "PYPI_URL", "http://127.0.0.1:9")
    for var, value in (("PIP_INDEX_URL", "http://127.0.0.1:9/simple"), ("PIP_NO_INDEX", "1"),
                       ("PIP_FIND_LINKS", ""), ("PIP_EXTRA_INDEX_URL", ""), ("PIP_CONFIG_FILE", os.devnull)):
        monkeypatch.setenv(var, value)
    spec = interpreters.SourceSpec("quickjs", "1.19.4", "0" * 64, "upstream-quickjs")
    with pytest.raises(GuestBuildError, match="cannot download quickjs==1.19.4"):
        interpreters.fetch_sdist(spec)


# ---- JavaScript -----------------------------------------------------------------------------


def test_js_eval_basics(js):
    assert js.call("eval", "1+1") == 2
    assert js.call("eval", "'a' + 'b'") == "ab"
    assert js.call("eval", "var x = 5; x * 2") == 10
    assert js.call("eval", "typeof x") == "undefined"  # every call starts from the snapshot
    assert js.call("eval", "undefined") is None
    assert js.call("eval", "[1, 'two', null, true, 2.5, {a: [1, {b: null}]}]") == [
        1, "two", None, True, 2.5, {"a": [1, {"b": None}]}]


def test_js_closures(js):
    src = """(() => {
        const make = () => { let n = 0; return { inc: () => ++n, get: () => n }; };
        const a = make(), b = make();
        a.inc(); a.inc(); b.inc();
        const fns = [];
        for (let i = 0; i < 3; i++) fns.push(() => i * 10);
        return [a.get(), b.get(), fns.map(f => f())];
    })()"""
    assert js.call("eval", src) == [2, 1, [0, 10, 20]]


def test_js_exceptions_inside_scripts(js):
    src = """(() => {
        class MyError extends Error { constructor(m) { super(m); this.name = 'MyError'; } }
        const log = [];
        try { try { throw new MyError('inner'); } finally { log.push('finally'); } }
        catch (e) { log.push(e instanceof MyError, e.name, e.message); }
        try { null.x; } catch (e) { log.push(e.constructor.name); }
        return log;
    })()"""
    assert js.call("eval", src) == ["finally", True, "MyError", "inner", "TypeError"]


def test_js_thrown_error_is_guest_error_with_message_and_stack(js):
    js.call("load", "function outer() {\n  return inner();\n}\n"
                    "function inner() {\n  const x = 1;\n  throw new RangeError('bad value');\n}\n", restore=False)
    with pytest.raises(GuestError) as info:
        js.call("call", "outer")
    text = str(info.value)
    assert text.startswith("call: RangeError: bad value\n")
    assert "at inner (<script>:6)" in text and "at outer (<script>" in text
    with pytest.raises(GuestError, match="uncaught exception: plain string"):
        js.call("eval", "throw 'plain string'")
    with pytest.raises(GuestError, match="SyntaxError"):
        js.call("eval", "function (")
    assert js.call("eval", "1+1") == 2


def test_js_string_and_number_formatting(js):
    src = """[
        (3.14159).toFixed(2), (255).toString(16), (1e21).toString(), String(0.1 + 0.2), (123.456).toPrecision(4),
        (12345.6789).toExponential(2), String(-0), String(1/3), `${1 + 1} items`, 'ab'.padStart(5, '*'),
        'ünïcödé ☃'.toUpperCase(), 'ünïcödé ☃'.length, [1, 2, 3].join('-'), String(2 ** 53), (0.000001234).toString(),
        Number.MAX_SAFE_INTEGER, parseInt('ff', 16), parseFloat('1.5e3'), (1e-7).toFixed(10), Number('0x1f'),
    ]"""
    assert js.call("eval", src) == [
        "3.14", "ff", "1e+21", "0.30000000000000004", "123.5", "1.23e+4", "0", "0.3333333333333333", "2 items",
        "***ab", "ÜNÏCÖDÉ ☃", 9, "1-2-3", "9007199254740992", "0.000001234", 2**53 - 1, 255, 1500, "0.0000001000",
        31]


def test_js_json_round_trips(js):
    value = {"name": "ünï ☃", "n": [1, -2, 3.5, 1e300], "ok": True, "none": None, "nested": {"deep": [[], {}]},
             "quote": 'say "hi"\n'}
    assert js.call("call", "roundtrip", [value]) == value
    assert json.loads(js.call("call", "stringify", [value])) == value
    text = json.dumps(value)
    assert js.call("eval", f"JSON.parse({json.dumps(text)})") == value
    assert js.call("call", "stringify", [{"a": [1, "x", None]}]) == '{"a":[1,"x",null]}'


def test_js_big_arrays(js):
    out = js.call("eval", "Array.from({length: 100000}, (_, i) => i * 2)")
    assert len(out) == 100_000 and out[:3] == [0, 2, 4] and out[-1] == 199_998
    words = js.call("eval", "Array.from({length: 100000}, (_, i) => 'item-' + i)")
    assert len(words) == 100_000 and words[99_999] == "item-99999"
    assert js.call("call", "sum", [list(range(100_000))]) == sum(range(100_000))
    assert js.call("call", "echo", [list(range(100_000))]) == list(range(100_000))


@pytest.mark.parametrize("value", [
    None, True, False, 0, 1, -1, 2**31, -(2**31) - 1, 2**53, -(2**53), 1.5, -2.25, 1e300, math.inf, -math.inf,
    "", "hello", "ünïcödé ☃", "a\x00b", b"", b"\x00\xff\x10", [], {}, [1, [2, [3, [4]]]],
    {"a": 1, "b": [None, True], "c": {"d": b"x", "e": "f"}}, list(range(1000)),
])
def test_js_value_mapping_round_trip(js, value):
    assert js.call("call", "echo", [value]) == value


def test_js_value_mapping_details(js):
    assert js.call("call", "types", [None, True, 1, 1.5, "s", b"b", [1], {"a": 1}]) == [
        "null", "boolean", "number", "number", "string", "bytes", "array", "object"]
    assert math.isnan(js.call("call", "echo", [math.nan]))
    negzero = js.call("eval", "-0")
    assert negzero == 0 and math.copysign(1, negzero) == -1 and isinstance(negzero, float)
    assert js.call("eval", "2.0") == 2 and isinstance(js.call("eval", "2.0"), int)
    assert js.call("eval", "2 ** 62") == 2**62 and isinstance(js.call("eval", "2 ** 64"), float)
    assert js.call("call", "echo", [2**63 - 1]) == float(2**63)  # JS numbers are doubles
    assert js.call("eval", "123456789012345678n") == 123456789012345678
    with pytest.raises(GuestError, match="BigInt does not fit in 64 bits"):
        js.call("eval", "2n ** 64n")
    assert js.call("eval", "new Date(0)") == "1970-01-01T00:00:00.000Z"  # toJSON
    assert js.call("eval", "new Uint8Array([1, 2, 255])") == b"\x01\x02\xff"
    assert js.call("eval", "new Uint8Array([1, 2, 3, 4]).subarray(1, 3)") == b"\x02\x03"
    assert js.call("eval", "new Uint8Array([7, 8]).buffer") == b"\x07\x08"
    assert js.call("eval", "new Int16Array([1, -2])") == [1, -2]
    assert js.call("eval", "'\\ud800x'") == "\ufffdx"  # a lone surrogate is not UTF-8
    assert js.call("eval", "({a: undefined, [Symbol('s')]: 1, b: 2})") == {"a": None, "b": 2}
    assert js.call("eval", "Promise.resolve(41).then(x => x + 1)") == 42
    assert js.call("eval", "(async () => { await null; return 'async' })()") == "async"
    with pytest.raises(GuestError, match="Error: rejected"):
        js.call("eval", "Promise.reject(new Error('rejected'))")
    deepest = js.call("call", "nest", [32])  # 32 levels of lists: the most a result may have
    # Arguments: the runtime decodes the argument array itself as a level, so an argument may
    # have 31 levels (the host's codec lets 32 through; see the report), and this one is in a list.
    assert js.call("call", "echo", [deepest[0][0]]) == deepest[0][0]
    with pytest.raises(GuestError, match="nested deeper than 32 levels"):
        js.call("call", "nest", [33])
    with pytest.raises(GuestError, match="nested deeper than 32 levels"):
        js.call("eval", "const a = []; a.push(a); a")
    with pytest.raises(GuestError, match="a function cannot be passed to the host"):
        js.call("eval", "[() => 1]")
    with pytest.raises(GuestError, match="Symbol"):
        js.call("eval", "Symbol('x')")


def test_js_random_differs_between_calls(js):
    values = {js.call("eval", "Math.random()") for _ in range(5)}
    assert len(values) == 5 and all(0 <= v < 1 for v in values)


def test_js_load_and_call(js):
    assert js.call("call", "util.add", [5]) == 15  # `this` is util
    assert js.call("call", "inc") == 1 and js.call("call", "inc") == 1  # let binding, reset after every call
    assert js.call("call", "JSON.stringify", [[1, 2]]) == "[1,2]"
    with pytest.raises(GuestError, match='no function named "nope" is defined'):
        js.call("call", "nope")
    with pytest.raises(GuestError, match='"counter" is not a function'):
        js.call("call", "counter")
    with pytest.raises(GuestError, match="args must be a list"):
        js.call("call", "echo", 5)
    with pytest.raises(CallError, match="expected str"):
        js.call("eval", 5)
    assert js.call("load", "function tmp() { return 7 }") is None
    with pytest.raises(GuestError, match="no function named"):
        js.call("call", "tmp")  # load() with restore: gone after the call


def test_js_host_functions(js):
    assert js.call("eval", "host.call('add', 2, 40)") == 42
    assert js.call("call", "callHost", ["echo", {"a": [1, b"\x00"]}, None]) == [{"a": [1, b"\x00"]}, None]
    with pytest.raises(HostFunctionError, match="unknown host function 'nope'"):
        js.call("call", "callHost", ["nope"])
    with pytest.raises(HostFunctionError, match="ValueError: host says no") as info:
        js.call("eval", "host.call('fail', 1)")
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(HostFunctionError, match="not a supported value type"):
        js.call("eval", "host.call('bad_result')")
    # a value the host cannot take is a catchable TypeError inside the script
    assert "cannot be passed to the host" in js.call(
        "eval", "try { host.call('echo', () => 1) } catch (e) { e.message }")
    assert js.call("eval", "typeof host.call") == "function"


def test_js_timeout_and_recovery(js):
    start = time.monotonic()
    with pytest.raises(GuestTimeout):
        js.call("eval", "while (true) {}", timeout=0.5)
    assert time.monotonic() - start < 5
    with pytest.raises(GuestTimeout):
        js.call("call", "spin", timeout=0.3)
    assert js.call("eval", "1+1") == 2
    assert js.call("call", "inc") == 1


def test_js_memory_bomb(js):
    with pytest.raises(GuestError, match="out of memory"):
        js.call("eval", "const a = []; while (true) a.push('x'.repeat(1024) + a.length)")
    with pytest.raises(GuestError, match="out of memory|RangeError"):
        js.call("eval", "let s = 'x'; while (true) s = s + s")
    with pytest.raises(GuestError, match="out of memory|RangeError|invalid array buffer length"):
        js.call("eval", "new Uint8Array(1e9)")
    with pytest.raises(GuestError, match="stack overflow|Maximum call stack"):
        js.call("eval", "function r() { return r() + 1 } r()")
    assert js.call("eval", "Array(1000).fill('ok').length") == 1000
    assert js.call("call", "inc") == 1


# ---- Lua ------------------------------------------------------------------------------------


def test_lua_eval_basics(lua):
    assert lua.call("eval", "1+1") == 2
    assert lua.call("eval", "'a' .. 'b'") == "ab"
    assert lua.call("eval", "x = 5") is None
    assert lua.call("eval", "x") is None  # every call starts from the snapshot
    assert lua.call("eval", "local y = 3 return y * 2") == 6
    assert lua.call("eval", "1, 2") == 1  # the first value
    assert lua.call("eval", "{1, 'two', true, 2.5, {a = {1, {b = false}}}}") == [
        1, "two", True, 2.5, {"a": [1, {"b": False}]}]


def test_lua_closures(lua):
    src = """(function()
        local function make() local n = 0 return function() n = n + 1 return n end, function() return n end end
        local inc_a, get_a = make()
        local inc_b, get_b = make()
        inc_a() inc_a() inc_b()
        local fns = {}
        for i = 1, 3 do fns[i] = function() return i * 10 end end
        return {get_a(), get_b(), {fns[1](), fns[2](), fns[3]()}}
    end)()"""
    assert lua.call("eval", src) == [2, 1, [10, 20, 30]]


def test_lua_errors_inside_scripts(lua):
    src = """(function()
        local ok, e = pcall(error, {code = 42})
        local ok2, e2 = pcall(function() local t = nil; return t.x end)
        local ok3, e3 = xpcall(function() error('deep', 0) end, function(m) return 'handled: ' .. m end)
        return {ok, e.code, ok2, e2:match('attempt to index') ~= nil, ok3, e3}
    end)()"""
    assert lua.call("eval", src) == [False, 42, False, True, False, "handled: deep"]


def test_lua_error_is_guest_error_with_message_and_traceback(lua):
    lua.call("load", "function outer() return inner() end\nfunction inner() error('bad value') end",
             restore=False)
    with pytest.raises(GuestError) as info:
        lua.call("call", "outer")
    text = str(info.value)
    assert "script:2: bad value" in text and "stack traceback:" in text and "in function 'inner'" in text
    with pytest.raises(GuestError, match=r"eval:1: .*near"):
        lua.call("eval", "function (")
    with pytest.raises(GuestError, match="error object is a table value"):
        lua.call("eval", "error({})")
    assert lua.call("eval", "1+1") == 2


def test_lua_string_and_number_formatting(lua):
    src = """{
        string.format('%5.2f', 3.14159), string.format('%x', 255), string.format('%q', 'a\\nb'),
        string.format('%g', 1e20), tostring(1e100), tostring(10 // 3), tostring(7 // 2.0), tostring(7 % -3),
        tostring(2^53), math.tointeger(3.0), string.format('%d', 3.0), string.format('%-5s|', 'ab'),
        ('ünï'):upper(), #'ünï', utf8.len('ünï'), string.rep('ab', 3, ','), tostring(1/0), tostring(0.1 + 0.2),
        math.type(1), math.type(1.0), 3 / 2, 1e15, string.format('%.3f', 2/3),
    }"""
    assert lua.call("eval", src) == [
        " 3.14", "ff", '"a\\\nb"', "1e+20", "1e+100", "3", "3.0", "-2", "9.007199254741e+15", 3, "3", "ab   |",
        "üNï", 5, 3, "ab,ab,ab", "inf", "0.3", "integer", "float", 1.5, 1e15, "0.667"]


def test_lua_json_encoding(lua):
    value = {"name": "ünï ☃", "n": [1, -2, 3.5, 1e300], "ok": True, "nested": {"deep": [1, {"x": "y"}]},
             "quote": 'say "hi"\n\t'}
    text = lua.call("call", "encode", [value])
    assert json.loads(text) == value
    assert lua.call("call", "encode", [[1, "x", False]]) == '[1,"x",false]'
    assert lua.call("call", "encode", [{"b": 1, "a": [2.5]}]) == '{"a":[2.5],"b":1}'


def test_lua_big_arrays(lua):
    out = lua.call("eval", "(function() local t = {} for i = 1, 100000 do t[i] = i * 2 end return t end)()")
    assert len(out) == 100_000 and out[:3] == [2, 4, 6] and out[-1] == 200_000
    assert lua.call("call", "sum", [list(range(100_000))]) == sum(range(100_000))
    assert lua.call("call", "echo", [list(range(100_000))]) == list(range(100_000))


@pytest.mark.parametrize("value", [
    None, True, False, 0, 1, -1, 2**63 - 1, -(2**63), 1.5, -2.25, 1e300, math.inf, "", "hello", "ünïcödé ☃",
    "a\x00b", [1, [2, [3, [4]]]], {"a": 1, "b": [True, 2], "c": {"d": "x", "e": 1.0}}, list(range(1000)),
    [1, None, 3], {},
])
def test_lua_value_mapping_round_trip(lua, value):
    assert lua.call("call", "echo", [value]) == value


def test_lua_value_mapping_details(lua):
    assert lua.call("call", "types", [None, True, 1, 1.5, "s", b"b", [1], {"a": 1}]) == [
        "nil", "boolean", "integer", "float", "string", "string", "table", "table"]
    assert lua.call("call", "echo", [b"\xff\x00"]) == b"\xff\x00"  # not UTF-8: bytes
    assert lua.call("call", "echo", [b"text"]) == "text"  # Lua strings are bytes; valid UTF-8 is str
    assert lua.call("eval", "1.0") == 1.0 and isinstance(lua.call("eval", "1.0"), float)
    assert lua.call("eval", "{[1] = 'a', [3] = 'c'}") == ["a", None, "c"]
    with pytest.raises(GuestError, match="table key 10 is not a string"):
        lua.call("eval", "{[10] = 'x'}")
    with pytest.raises(GuestError, match="table key of type boolean"):
        lua.call("eval", "{[true] = 1}")
    with pytest.raises(GuestError, match="a function cannot be passed to the host"):
        lua.call("eval", "print")
    with pytest.raises(GuestError, match="nested deeper than 32 levels"):
        lua.call("eval", "(function() local t = {} t.self = t return t end)()")
    deepest = lua.call("call", "nest", [32])
    assert lua.call("call", "echo", [deepest[0][0]]) == deepest[0][0]
    with pytest.raises(GuestError, match="nested deeper than 32 levels"):
        lua.call("call", "nest", [33])


def test_lua_sandboxed_libraries(lua):
    assert lua.call("eval", "{io == nil, os.exit == nil, os.execute == nil, dofile == nil, package == nil}") == [
        True] * 5
    assert isinstance(lua.call("eval", "os.time()"), int) and isinstance(lua.call("eval", "os.clock()"), float)
    assert lua.call("eval", "os.date('!%Y-%m-%d', 0)") == "1970-01-01"
    assert lua.call("eval", "load('return 1 + 2')()") == 3
    with pytest.raises(GuestError, match="attempt to load a binary chunk"):
        lua.call("eval", "assert(load(string.dump(function() return 1 end)))")
    values = {lua.call("eval", "math.random()") for _ in range(5)}
    assert len(values) == 5
    assert lua.call("eval", "(function() math.randomseed(7) return math.random(1000) end)()") == \
        lua.call("eval", "(function() math.randomseed(7) return math.random(1000) end)()")


def test_lua_load_and_call(lua):
    assert lua.call("call", "util.add", [5]) == 15
    assert lua.call("call", "inc") == 1 and lua.call("call", "inc") == 1
    assert lua.call("call", "string.upper", ["abc"]) == "ABC"
    with pytest.raises(GuestError, match='no function named "nope" is defined'):
        lua.call("call", "nope")
    with pytest.raises(GuestError, match='"util.k" is not a function'):
        lua.call("call", "util.k")
    with pytest.raises(GuestError, match="args must be a list"):
        lua.call("call", "echo", "x")


def test_lua_host_functions(lua):
    assert lua.call("eval", "host.call('add', 2, 40)") == 42
    assert lua.call("call", "callHost", ["echo", {"a": [1, 2]}, "x"]) == [{"a": [1, 2]}, "x"]
    with pytest.raises(HostFunctionError, match="unknown host function 'nope'"):
        lua.call("call", "callHost", ["nope"])
    with pytest.raises(HostFunctionError, match="ValueError: host says no"):
        lua.call("eval", "host.call('fail')")
    ok, message = lua.call("eval", "{pcall(host.call, 'echo', print)}")
    assert ok is False and "cannot be passed to the host" in message


def test_lua_timeout_and_recovery(lua):
    with pytest.raises(GuestTimeout):
        lua.call("eval", "(function() while true do end end)()", timeout=0.5)
    with pytest.raises(GuestTimeout):
        lua.call("call", "spin", timeout=0.3)
    assert lua.call("eval", "1+1") == 2


def test_lua_memory_bomb(lua):
    with pytest.raises(GuestError, match="not enough memory"):
        lua.call("eval", "(function() local s = 'x' while true do s = string.rep(s, 2) end end)()")
    with pytest.raises(GuestError, match="not enough memory"):
        lua.call("eval", "(function() local t = {} while true do t[#t + 1] = {1, 2, 3} end end)()")
    with pytest.raises(GuestError, match="stack overflow|not enough memory"):
        lua.call("eval", "(function() local function r() return 1 + r() end return r() end)()")
    assert lua.call("eval", "#string.rep('x', 1000)") == 1000
    assert lua.call("call", "inc") == 1


# ---- functions-as-a-service: scripts as layers on the interpreter's base snapshot ------------


JS_SCRIPT = """
let hits = 0;
function handle(x) { hits += 1; return {id: %(i)d, result: x * %(i)d + hits, hits}; }
"""
LUA_SCRIPT = """
local hits = 0
function handle(x) hits = hits + 1 return {id = %(i)d, result = x * %(i)d + hits, hits = hits} end
"""


@pytest.mark.parametrize("language, template", [("js", JS_SCRIPT), ("lua", LUA_SCRIPT)])
def test_fifty_scripts_as_layers(bases, tmp_path, language, template, record_property):
    base = bases[language].persist(tmp_path / f"{language}-base.hlsnap")
    base_size = base.stored_bytes()
    base_layer = base.layers[0]

    layers = [load_script(base, template % {"i": i}) for i in range(50)]  # all held at once
    sizes = [child.stored_bytes() for child in layers]
    persisted = [child.persist(tmp_path / f"{language}-script{i}.hlsnap") for i, child in enumerate(layers[:10])]
    file_sizes = [os.path.getsize(p.path) for p in persisted]
    record_property(f"{language}_base_layer_bytes", base_size)
    record_property(f"{language}_layer_bytes", sizes)
    record_property(f"{language}_layer_file_bytes", file_sizes)
    print(f"\n{language}: base layer {base_size} bytes; 50 script layers: mean {sum(sizes) / 50:.0f}, "
          f"max {max(sizes)} bytes; files {file_sizes[:3]}... (base file {os.path.getsize(base.path)})")

    for child in layers:
        assert child.depth == 2 and child.layers[0] is base_layer
        assert child.stored_bytes() < base_size // 4
        code = [r for r in child.regions if r.area == "image" and "x" in r.perms]
        assert code and all(r.layer == 0 and r.path == base.path for r in code)
    for size in file_sizes:
        assert size < os.path.getsize(base.path) // 4
    reopened = [Snapshot.open(p.path) for p in persisted]
    for snap in reopened:
        assert snap.parent is not None and snap.parent.path == base.path

    sandboxes = [Sandbox(snap, timeout=10) for snap in layers[10:] + reopened]
    try:
        for sb, i in zip(sandboxes, list(range(10, 50)) + list(range(10))):
            first = sb.call("call", "handle", [3])
            assert first == {"id": i, "result": 3 * i + 1, "hits": 1}
            assert sb.call("call", "handle", [3]) == first  # every call starts from the layer
    finally:
        for sb in sandboxes:
            sb.close()


def test_script_errors_at_load(bases):
    with pytest.raises(GuestError, match="SyntaxError"):
        load_script(bases["js"], "function broken( {")
    with pytest.raises(GuestError, match="Error: failed while loading"):
        load_script(bases["js"], "throw new Error('failed while loading')")
    with pytest.raises(GuestError, match="script:1: .*near"):
        load_script(bases["lua"], "function broken( end")
    with pytest.raises(GuestTimeout):
        load_script(bases["lua"], "while true do end", timeout=0.3)
    with pytest.raises(TypeError):
        load_script(bases["js"], b"bytes")


def test_scripts_call_host_functions_while_loading_and_calls(bases):
    config = {"greeting": "hello"}
    snap = load_script(bases["js"], "const greeting = host.call('config').greeting;\n"
                                    "function greet(name) { return greeting + ', ' + host.call('upper', name) }",
                       host_functions={"config": lambda: config})
    with Sandbox(snap, host_functions={"upper": str.upper}) as sb:
        assert sb.call("call", "greet", ["world"]) == "hello, WORLD"


def test_persisted_base_and_script_snapshot(kvm, built, tmp_path):
    first = scripts.persisted_base_snapshot("lua", tmp_path)
    again = scripts.persisted_base_snapshot("lua", tmp_path)
    assert first.path == again.path and again.info.get("interpreter") == "lua"
    snap = scripts.script_snapshot("lua", "function twice(x) return 2 * x end", directory=tmp_path)
    assert snap.path and snap.parent.path == first.path
    with Sandbox(Snapshot.open(snap.path)) as sb:
        assert sb.call("call", "twice", [21]) == 42
