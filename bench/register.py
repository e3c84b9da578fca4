"""Script registration: wall time and CPU per ``Pool.script`` with M tenants already stored.

Issue 11's target is "registering a script costs <= 2 ms". This benchmark isolates it:
a 2-worker Pool (``--workers``) whose store already holds M registered JS tenants
(``--prefill``, default 0, 1,000 and 10,000: registered through the same pool, so the
supervisor holds their handles and pins and the workers have them open, as in
production), then N distinct one-line JS and N Lua scripts (``--count``, alternating
js, lua) registered one at a time. Per language and M it prints mean / p50 / p99 wall
time per registration and the CPU time per registration of each process role:
the supervisor (this process, all its threads), the script builders
(``hlpool-builder`` children) and the workers (they open each new tenant ahead,
``open_on_register``). Before measuring, it waits until the workers are done opening
the prefilled tenants.

    .venv/bin/python bench/register.py                   # M = 0, 1000, 10000; N = 300
    .venv/bin/python bench/register.py --prefill 0 1000 --count 100
    .venv/bin/python bench/register.py --work /dev/shm   # stores on tmpfs

Creating a file on this machine's ext4 (no journal) costs far more for minutes after many files
were deleted (ext4 skips recently deleted inodes): each row's stores are kept until the end of
the run (a row's deletions would slow the next one down), the table prints the median time to
create a file in the store's directory measured before each row ("fs create us"), and A/B runs
should alternate; ``--work /dev/shm`` leaves the disk out.

Writes ``register.json`` into ``$HLPOOL_BENCH_RESULTS`` or bench/results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import file_create_us, percentiles, print_table, status, write_results  # noqa: E402

from hlpool import Pool  # noqa: E402

JS = "let calls = 0; function who(x) {{ calls += 1; return [{id}, calls, x, {tag!r}]; }}"
LUA = "local calls = 0\nfunction who(x) calls = calls + 1; return {{{id}, calls, x, {tag!r}}} end"
SOURCES = {"js": JS, "lua": LUA}


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _children(root: int) -> list[int]:
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for kid in map(int, kids):
            out.append(kid)
            todo.append(kid)
    return out


def _roles(pool: Pool) -> dict[str, list[int]]:
    workers = [w["pid"] for w in pool.stats() if w.get("alive", True)]
    builders = []
    for pid in _children(os.getpid()):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "hlpool-builder":
                builders.append(pid)
        except OSError:
            pass
    return {"supervisor": [os.getpid()], "builder": builders, "workers": workers}


def _cpu_by_role(roles: dict[str, list[int]]) -> dict[str, float]:
    return {role: sum(_cpu_seconds(p) for p in pids) for role, pids in roles.items()}


def _settle(pool: Pool, limit: float = 120.0) -> None:
    """Wait until the workers stop using CPU (done opening the tenants registered so far)."""
    workers = _roles(pool)["workers"]
    deadline = time.monotonic() + limit
    last = sum(_cpu_seconds(p) for p in workers)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = sum(_cpu_seconds(p) for p in workers)
        if now - last < 0.02:
            return
        last = now


def run(prefill: int, count: int, languages: list[str], workers: int, work: Path, check: int) -> list[dict[str, Any]]:
    store = Path(tempfile.mkdtemp(prefix=f"register-{prefill}-", dir=work))  # removed with ``work``, at the end
    tag = os.urandom(4).hex()  # distinct sources per run: nothing is found in a store from before
    options = json.loads(os.environ.get("HLPOOL_BENCH_POOL_OPTIONS", "{}"))
    rows = []
    with Pool(workers=workers, snapshot_dir=store, call_timeout=30, **options) as pool:
        for language in languages:  # builders started, bases persisted
            pool.script(language, SOURCES[language].format(id=-1, tag=tag))
        t0 = time.perf_counter()
        for i in range(prefill):
            pool.script("js", JS.format(id=i, tag=tag + "p"))
        if prefill:
            status(f"  M={prefill}: prefilled in {time.perf_counter() - t0:.1f} s")
        _settle(pool)
        create_us = file_create_us(store)
        roles = _roles(pool)
        cpu0 = _cpu_by_role(roles)
        times: dict[str, list[float]] = {language: [] for language in languages}
        handles: dict[str, list[Any]] = {language: [] for language in languages}
        t_all = time.perf_counter()
        for i in range(count):
            for language in languages:
                source = SOURCES[language].format(id=i, tag=tag)
                t = time.perf_counter_ns()
                handles[language].append(pool.script(language, source))
                times[language].append(time.perf_counter_ns() - t)
        wall = time.perf_counter() - t_all
        cpu1 = _cpu_by_role(roles)  # before the workers' deferred opens finish: see "workers_settled"
        _settle(pool)
        cpu2 = _cpu_by_role(roles)
        total = count * len(languages)
        for language in languages:  # the tenants answer as themselves
            for i in range(0, count, max(1, count // check) if check else count + 1):
                got = pool.submit(handles[language][i], "who", (7,)).result(timeout=60)
                assert list(got) == [i, 1, 7, tag], (language, i, got)
        for language in languages:
            stats = percentiles(times[language])
            rows.append({"prefill": prefill, "language": language, "count": count, **stats,
                         "cpu_us": {role: (cpu1[role] - cpu0[role]) / total * 1e6 for role in roles},
                         "workers_settled_cpu_us": (cpu2["workers"] - cpu0["workers"]) / total * 1e6,
                         "wall_per_registration_us": wall / total * 1e6,
                         "load_average": os.getloadavg()[0], "file_create_us": create_us})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill", type=int, nargs="+", default=[0, 1000, 10000],
                        help="tenants stored before measuring (M; default 0 1000 10000)")
    parser.add_argument("--count", type=int, default=300, help="scripts per language measured (N; default 300)")
    parser.add_argument("--languages", nargs="+", default=["js", "lua"], choices=sorted(SOURCES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--check", type=int, default=20, help="tenants per language called to check (0: none)")
    parser.add_argument("--name", default="register", help="results file name (default register)")
    parser.add_argument("--work", help="directory for the stores (default: the temp directory; e.g. /dev/shm "
                        "to leave the disk's file creation cost out)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="hlpool-register-", dir=args.work))
    results = []
    try:
        for m in args.prefill:
            status(f"M={m}")
            results += run(m, args.count, args.languages, args.workers, work, args.check)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table("Script registration (Pool.script): wall time per registration, CPU us per registration by process",
                ["M stored", "lang", "N", "mean us", "p50 us", "p99 us", "cpu sup", "cpu builder", "cpu workers",
                 "cpu workers (settled)", "load", "fs create us"],
                [[r["prefill"], r["language"], r["count"], r["mean_us"], r["p50_us"], r["p99_us"],
                  r["cpu_us"]["supervisor"], r["cpu_us"]["builder"], r["cpu_us"]["workers"],
                  r["workers_settled_cpu_us"], r["load_average"], r["file_create_us"]] for r in results])
    print("CPU columns are per registration of either language (one script builder loads both languages, "
          "in turn)")
    path = write_results(args.name, {"results": results, "count": args.count, "workers": args.workers,
                                     "work": str(args.work or tempfile.gettempdir())})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
