"""Latency of the JavaScript and Lua interpreter guests, next to the interpreters in-process.

Rows (p50 / p99 / mean in microseconds):

- hlpool ``Sandbox.call`` on the interpreter guests (QuickJS from the PyPI
  ``quickjs`` sdist, Lua 5.4 from the ``lupa`` sdist; see hlpool/interpreters.py):
  ``eval("1+1")`` on the base snapshot (interpreter initialised), and calls into
  a loaded script (``add(1, 2)``, ``fib(15)``) on the script's layered snapshot.
  Every call starts from its snapshot (restore included), as in production.
- the same interpreters in this process, as references: the PyPI ``quickjs``
  binding (QuickJS 2021-03-27, the same version) and ``lupa`` (Lua 5.4), each
  with a reused context (no isolation between calls: state leaks from call to
  call) and with a fresh context per call (isolation, the script loaded again
  every time). A reference that cannot be imported is listed as unavailable.

Also reported: the size of each base snapshot's layer, ``load_script`` time,
and the mean / max own-layer size of N loaded scripts (each a different
script), plus how many pages a call dirtied (``sandbox.last_restore``).

All cases are measured interleaved, in rounds, so machine noise and drift hit
them alike; every result is checked.

Usage: ``python bench/interpreters.py [--quick] [--iterations N] [--scripts N]``;
writes bench/results/interpreters.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

try:
    from .common import percentiles, print_table, progress, status, write_results
except ImportError:  # run as a script
    from common import percentiles, print_table, progress, status, write_results  # type: ignore[no-redef]

DEFAULT_ITERATIONS = 3000
QUICK_ITERATIONS = 300
DEFAULT_SCRIPTS = 50
QUICK_SCRIPTS = 20
ROUND = 50

JS_SCRIPT = """
function add(a, b) { return a + b; }
function fib(n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }
"""
LUA_SCRIPT = """
function add(a, b) return a + b end
function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
"""
FIB15 = 610


@dataclass
class Case:
    label: str
    group: str
    step: Callable[[int], None] | None = None
    weight: float = 1.0
    samples: list[int] = field(default_factory=list)
    dirty: list[int] = field(default_factory=list)
    unavailable: str | None = None

    @property
    def per_round(self) -> int:
        return max(1, int(ROUND * self.weight))


def _timed(case: Case, fn: Callable[[], Any], expected: Any, sandbox: Any = None) -> Callable[[int], None]:
    clock = time.perf_counter_ns

    def step(n: int) -> None:
        for _ in range(n):
            t0 = clock()
            result = fn()
            t1 = clock()
            if result != expected:
                raise AssertionError(f"{case.label}: got {result!r}, expected {expected!r}")
            case.samples.append(t1 - t0)
            if sandbox is not None:
                case.dirty.append(sandbox.last_restore.dirty)

    return step


def hlpool_cases(language: str, base: Any, script: Any, sandboxes: list) -> list[Case]:
    from hlpool import Sandbox

    on_base = Sandbox(base, timeout=10)
    on_script = Sandbox(script, timeout=10)
    sandboxes += [on_base, on_script]
    name = {"js": "JS", "lua": "Lua"}[language]
    cases = [
        Case(f'hlpool {name}: eval("1+1")', "hlpool"),
        Case(f'hlpool {name}: call("add", [1, 2])', "hlpool"),
        Case(f'hlpool {name}: call("fib", [15])', "hlpool", weight=0.4),
    ]
    cases[0].step = _timed(cases[0], lambda: on_base.call("eval", "1+1"), 2, on_base)
    cases[1].step = _timed(cases[1], lambda: on_script.call("call", "add", [1, 2]), 3, on_script)
    cases[2].step = _timed(cases[2], lambda: on_script.call("call", "fib", [15]), FIB15, on_script)
    return cases


def quickjs_cases() -> list[Case]:
    labels = ['quickjs (PyPI) reused ctx: eval("1+1")', "quickjs (PyPI) reused ctx: add(1, 2)",
              "quickjs (PyPI) reused ctx: fib(15)", 'quickjs (PyPI) fresh ctx: eval("1+1")',
              "quickjs (PyPI) fresh ctx: load + add(1, 2)"]
    try:
        import quickjs
    except ImportError as exc:
        return [Case(label, "reference", unavailable=f"quickjs not importable ({exc}); pip install quickjs")
                for label in labels]
    ctx = quickjs.Context()
    ctx.eval(JS_SCRIPT)
    add, fib = ctx.get("add"), ctx.get("fib")

    def fresh_eval() -> Any:
        return quickjs.Context().eval("1+1")

    def fresh_add() -> Any:
        c = quickjs.Context()
        c.eval(JS_SCRIPT)
        return c.get("add")(1, 2)

    cases = [Case(label, "reference", weight=0.4 if "fib" in label else 1.0) for label in labels]
    for case, fn, expected in zip(cases, [lambda: ctx.eval("1+1"), lambda: add(1, 2), lambda: fib(15),
                                          fresh_eval, fresh_add], [2, 3, FIB15, 2, 3]):
        case.step = _timed(case, fn, expected)
    return cases


def lupa_cases() -> list[Case]:
    labels = ['lupa (PyPI) reused runtime: eval("1+1")', "lupa (PyPI) reused runtime: add(1, 2)",
              "lupa (PyPI) reused runtime: fib(15)", "lupa (PyPI) fresh runtime: load + add(1, 2)"]
    try:
        from lupa import lua54
    except ImportError as exc:
        return [Case(label, "reference", unavailable=f"lupa not importable ({exc}); pip install lupa")
                for label in labels]
    rt = lua54.LuaRuntime()
    rt.execute(LUA_SCRIPT)
    add, fib = rt.globals().add, rt.globals().fib

    def fresh_add() -> Any:
        r = lua54.LuaRuntime()
        r.execute(LUA_SCRIPT)
        return r.globals().add(1, 2)

    cases = [Case(label, "reference", weight=0.4 if "fib" in label else 1.0) for label in labels]
    for case, fn, expected in zip(cases, [lambda: rt.eval("1+1"), lambda: add(1, 2), lambda: fib(15), fresh_add],
                                  [2, 3, FIB15, 3]):
        case.step = _timed(case, fn, expected)
    return cases


def layer_sizes(language: str, base: Any, n: int) -> dict[str, Any]:
    """Load n different scripts as layers on ``base``; their own-layer sizes and load times."""
    from hlpool.sandbox.scripts import load_script

    template = {"js": "var hits = 0;\nfunction handle%(i)d(x) { hits++; return [x * %(i)d, hits, 'script %(i)d']; }\n",
                "lua": "hits = 0\nfunction handle%(i)d(x) hits = hits + 1 return {x * %(i)d, hits, 'script %(i)d'} end\n"}
    sizes, times = [], []
    layers = []
    for i in progress(range(n), f"{language} scripts"):
        t0 = time.perf_counter_ns()
        layers.append(load_script(base, template[language] % {"i": i}))
        times.append(time.perf_counter_ns() - t0)
        sizes.append(layers[-1].stored_bytes())
    return {"scripts": n, "base_layer_bytes": base.stored_bytes(), "mean_layer_bytes": statistics.fmean(sizes),
            "max_layer_bytes": max(sizes), "min_layer_bytes": min(sizes),
            "load_script": percentiles(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ITERATIONS} iterations, {QUICK_SCRIPTS} scripts")
    parser.add_argument("--iterations", type=int, help=f"calls per cheap case (default {DEFAULT_ITERATIONS})")
    parser.add_argument("--scripts", type=int, help=f"scripts loaded as layers (default {DEFAULT_SCRIPTS})")
    args = parser.parse_args(argv)
    iterations = args.iterations or (QUICK_ITERATIONS if args.quick else DEFAULT_ITERATIONS)
    n_scripts = args.scripts or (QUICK_SCRIPTS if args.quick else DEFAULT_SCRIPTS)

    from hlpool.guest.interpreters import SOURCES, build_interpreters
    from hlpool.sandbox.scripts import base_snapshot, load_script

    status("building / finding the interpreter guests ...")
    paths = build_interpreters()
    tmp = Path(tempfile.mkdtemp(prefix="hlpool-bench-interp-"))
    sandboxes: list = []
    try:
        bases, scripts, sizes = {}, {}, {}
        for language in ("js", "lua"):
            bases[language] = base_snapshot(language).persist(tmp / f"{language}.hlsnap")
            scripts[language] = load_script(bases[language], JS_SCRIPT if language == "js" else LUA_SCRIPT)
            sizes[language] = layer_sizes(language, bases[language], n_scripts)
            sizes[language]["base_file_bytes"] = os.path.getsize(bases[language].path)
        cases = (hlpool_cases("js", bases["js"], scripts["js"], sandboxes) + quickjs_cases()
                 + hlpool_cases("lua", bases["lua"], scripts["lua"], sandboxes) + lupa_cases())
        active = [c for c in cases if c.unavailable is None]

        status(f"warming up, then {iterations} iterations per case, interleaved ...")
        for c in active:
            c.step(max(5, c.per_round // 5))
            c.samples.clear()
            c.dirty.clear()
        rounds = max(1, iterations // ROUND)
        gc.disable()
        try:
            for _ in progress(range(rounds), "rounds"):
                for c in active:
                    c.step(c.per_round)
        finally:
            gc.enable()

        rows, results = [], []
        for c in cases:
            if c.unavailable:
                rows.append([c.label, None, None, None, None, "unavailable"])
                results.append({"label": c.label, "group": c.group, "unavailable": c.unavailable})
                continue
            stats = percentiles(c.samples)
            dirty = statistics.median(c.dirty) if c.dirty else None
            rows.append([c.label, stats["p50_us"], stats["p99_us"], stats["mean_us"], dirty, ""])
            results.append({"label": c.label, "group": c.group, **stats, "dirty_pages_median": dirty})
        print_table(f"Interpreter call latency (µs; {iterations} calls per case, interleaved)",
                    ["case", "p50", "p99", "mean", "dirty pages", "note"], rows)
        for c in cases:
            if c.unavailable:
                print(f"  {c.label}: {c.unavailable}")

        size_rows = []
        for language, s in sizes.items():
            size_rows.append([language, s["base_layer_bytes"] / 1024, s["base_file_bytes"] / 1024, s["scripts"],
                              s["mean_layer_bytes"] / 1024, s["max_layer_bytes"] / 1024,
                              100 * s["mean_layer_bytes"] / s["base_layer_bytes"], s["load_script"]["p50_us"] / 1000])
        print_table("Snapshots: base layer and scripts loaded as layers (KiB)",
                    ["interpreter", "base layer", "base file", "scripts", "mean layer", "max layer",
                     "mean % of base", "load_script p50 ms"], size_rows)

        data = {
            "iterations": iterations,
            "sources": {k: {"name": v.name, "version": v.version, "sha256": v.sha256} for k, v in SOURCES.items()},
            "guests": {k: str(v) for k, v in paths.items()},
            "cases": results,
            "snapshots": sizes,
            "references": {"quickjs": _version("quickjs"), "lupa": _version("lupa")},
        }
        path = write_results("interpreters", data)
        print(f"\nwrote {path}")
    finally:
        for sb in sandboxes:
            sb.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
