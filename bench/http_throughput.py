"""HTTP throughput of ``hlpool serve`` for K front ends, with the CPU each process role spends per request.

    python bench/http_throughput.py [--quick] [--frontends 1,2] [--lanes fast,aiohttp] [--workers N] [--duration S]

For each K, and each way of reading calls (``fast``: the default server, whose
fast lane answers the call requests; ``aiohttp``: ``--no-fast-lane``, the
baseline): starts ``hlpool serve --workers N --frontends K --port 0`` (the
example guests), warms it up, then drives ``POST /v1/snapshots/echo/calls/echo``
(``{"args":[1]}``) with ``wrk`` (``--latency``, 16 connections) and reads the
CPU time (utime + stime from ``/proc/PID/stat``) of every process of the server
before and after. CPU per request, by role:

- front ends: the ``hlpool-fe-*`` processes (K = 1: the ``hlpool serve`` process
  itself, which is the front end; that is the single-process mode);
- workers: every ``hlpool-worker-*`` descendant;
- main: the ``hlpool serve`` supervisor (K > 1 only);
- other: the pools' spawners and builders.

The projection for a C-core host is ``C / (front-end + worker + main CPU seconds
per request)``: every core busy with server work and nothing else (wrk runs on
this box and takes its share, shown as wrk CPU per request; on the projected
host the load comes from elsewhere). It assumes work spreads over the cores
without contention: an upper bound.

``wrk`` is the Debian package ``wrk``; if it is missing the bench installs it
with apt-get when run as root, else says how. Prints a table and writes
bench/results/http_throughput.json (or under $HLPOOL_BENCH_RESULTS).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

try:
    from .common import print_table, status, write_results
except ImportError:  # run as a script
    from common import print_table, status, write_results  # type: ignore[no-redef]

CONNECTIONS = 16
THREADS = 2
PATH = "/v1/snapshots/echo/calls/echo"
BODY = '{"args":[1]}'
START_TIMEOUT = 300.0
TICK = os.sysconf("SC_CLK_TCK")
HOSTS = (16, 64)


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        status("wrk is missing: installing the Debian package wrk")
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False, stdout=subprocess.DEVNULL)
        found = shutil.which("wrk")
        if found:
            return found
    sys.exit("this benchmark needs wrk: install it (Debian/Ubuntu: sudo apt-get install wrk)")


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, utime + stime in ticks) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    return comm, int(fields[1]), int(fields[11]) + int(fields[12])


def server_processes(root: int) -> dict[int, tuple[str, int]]:
    """pid -> (comm, CPU ticks) of ``root`` and every descendant."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st is not None:
                table[int(entry)] = st
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            out[pid] = (table[pid][0], table[pid][2])
            todo.extend(p for p, st in table.items() if st[1] == pid)
    return out


def role(pid: int, comm: str, root: int, frontends: int) -> str:
    if pid == root:
        return "frontend" if frontends == 1 else "main"
    if comm.startswith("hlpool-fe"):
        return "frontend"
    if comm.startswith("hlpool-worker"):
        return "worker"
    return "other"


def cpu_by_role(root: int, frontends: int) -> dict[str, dict[int, int]]:
    roles: dict[str, dict[int, int]] = {"frontend": {}, "worker": {}, "main": {}, "other": {}}
    for pid, (comm, ticks) in server_processes(root).items():
        roles[role(pid, comm, root, frontends)][pid] = ticks
    return roles


def start_server(workers: int, frontends: int, log_path: Path, lane: str = "fast") -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "hlpool.cli", "serve", "--workers", str(workers), "--frontends",
               str(frontends), "--port", "0"] + (["--no-fast-lane"] if lane == "aiohttp" else [])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}:\n{log_path.read_text()}")
        match = re.search(r"listening on (http://\S+)", log_path.read_text(errors="replace"))
        if match:
            return proc, match.group(1)
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"the server did not start:\n{log_path.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_wrk(wrk: str, url: str, script: str, duration: float) -> dict[str, Any]:
    command = [wrk, f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{duration:g}s", "--latency", "-s", script, url + PATH]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result: dict[str, Any] = {"output": out}
    result["requests"] = int(re.search(r"(\d+) requests in", out).group(1))
    result["req_per_s"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    result["non_2xx"] = int(bad.group(1)) if bad else 0
    errors = re.search(r"Socket errors: (.*)", out)
    result["socket_errors"] = errors.group(1).strip() if errors else ""
    for q in ("50", "99"):
        m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        scale = {"us": 1.0, "ms": 1e3, "s": 1e6}[m.group(2)]
        result[f"p{q}_us"] = float(m.group(1)) * scale
    return result


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(wrk: str, script: str, workers: int, frontends: int, lane: str, duration: float, warmup: float,
            logdir: Path) -> dict[str, Any]:
    proc, url = start_server(workers, frontends, logdir / f"server-k{frontends}-{lane}.log", lane)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        run_wrk(wrk, url, script, warmup)  # warm sandboxes, connections' first requests, caches
        before = cpu_by_role(proc.pid, frontends)
        wrk_before = children_cpu()
        result = run_wrk(wrk, url, script, duration)
        wrk_cpu = children_cpu() - wrk_before
        after = cpu_by_role(proc.pid, frontends)
    finally:
        stop_server(proc)
    n = result.pop("requests")
    result["requests"] = n
    cpu_us: dict[str, float] = {}
    for name in after:
        ticks = sum(t - before[name].get(pid, 0) for pid, t in after[name].items())
        cpu_us[name] = ticks / TICK / n * 1e6
    result["cpu_us_per_request"] = cpu_us
    result["processes"] = {name: len(pids) for name, pids in after.items()}
    result["wrk_cpu_us_per_request"] = wrk_cpu / n * 1e6
    server_s = (cpu_us["frontend"] + cpu_us["worker"] + cpu_us["main"]) / 1e6
    result["projected_req_per_s"] = {str(c): c / server_s for c in HOSTS}
    result["frontend_over_worker"] = cpu_us["frontend"] / cpu_us["worker"] if cpu_us["worker"] else None
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (under 2 minutes in all)")
    parser.add_argument("--frontends", default="1,2", help="front-end counts to measure (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="workers of each server (default %(default)s)")
    parser.add_argument("--lanes", default="fast,aiohttp",
                        help="how calls are read: fast (the default server: the fast lane) and/or aiohttp "
                             "(--no-fast-lane, every request through aiohttp); default %(default)s")
    parser.add_argument("--duration", type=float, help="seconds of each measured wrk run (default 15, quick 6)")
    args = parser.parse_args(argv)
    duration = args.duration or (6.0 if args.quick else 15.0)
    warmup = 2.0 if args.quick else 4.0
    counts = [int(k) for k in args.frontends.split(",")]
    lanes = [lane for lane in args.lanes.split(",") if lane]
    if not lanes or set(lanes) - {"fast", "aiohttp"}:
        parser.error("--lanes: fast and/or aiohttp")
    wrk = ensure_wrk()
    rows, data = [], {"connections": CONNECTIONS, "threads": THREADS, "path": PATH, "body": BODY,
                      "workers": args.workers, "duration_s": duration, "cpus": len(os.sched_getaffinity(0)),
                      "runs": {}}
    with tempfile.TemporaryDirectory(prefix="hlpool-bench-http-") as tmp:
        script = os.path.join(tmp, "post.lua")
        with open(script, "w") as f:
            f.write(f'wrk.method = "POST"\nwrk.body = \'{BODY}\'\n'
                    f'wrk.headers["Content-Type"] = "application/json"\n')
        for k, lane in [(k, lane) for k in counts for lane in lanes]:
            label = f"K={k}" + ("" if lane == "fast" else f", {lane}")
            status(f"{label}: {args.workers} workers, wrk {CONNECTIONS} connections for {duration:g} s")
            r = measure(wrk, script, args.workers, k, lane, duration, warmup, Path(tmp))
            data["runs"][str(k) if lane == "fast" else f"{k}-{lane}"] = r
            cpu = r["cpu_us_per_request"]
            rows.append([label, r["req_per_s"], r["p50_us"], r["p99_us"], cpu["frontend"], cpu["worker"],
                         cpu["main"], cpu["other"], r["wrk_cpu_us_per_request"], r["frontend_over_worker"],
                         r["projected_req_per_s"]["16"], r["projected_req_per_s"]["64"]])
            if r["non_2xx"] or r["socket_errors"]:
                status(f"  {label}: {r['non_2xx']} non-2xx responses, socket errors: {r['socket_errors'] or 'none'}")
    print_table(f"hlpool serve, POST {PATH} {BODY}, wrk -c{CONNECTIONS} -t{THREADS}, {args.workers} workers, "
                f"{data['cpus']} CPUs (CPU µs per request by role)",
                ["front ends", "req/s", "p50 µs", "p99 µs", "front-end", "workers", "main", "other", "wrk",
                 "fe/worker", "proj. 16 cores", "proj. 64 cores"], rows)
    path = write_results("http_throughput", data)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
