"""How many live sandboxes fit on this host: memory per sandbox vs N, for hlpool and its baselines.

The guest has a large image, like an interpreter: a generated C source (see
:func:`guest_source`) with ``TABLE_MIB`` MiB of pseudo-random read-only data
(``static const uint64_t table[]``, so nothing of it is a zero page) and
``DATA_MIB`` MiB of pseudo-random initialized writable data, plus ``work(i)``
which reads one word in every page of the table (``--read-stride`` pages
apart), adds ``i+1`` to one word in each of ``WRITE_PAGES`` pages of the
writable data, and returns a checksum that the host checks. It is built once
into ~/.cache/hlpool/bench. A snapshot of it is persisted to a temporary
directory (in a short-lived child process, so this process never maps it).

Modes, all measured in the same run, one after another:

- ``shared``: ``hlpool.Sandbox(Snapshot.open(path))``, the default: the
  snapshot file is mapped MAP_PRIVATE, every sandbox shares its page-cache
  pages and pays only for the pages it writes;
- ``private``: ``Sandbox(snapshot, private_memory=True)``, a private anonymous
  copy of the snapshot per sandbox (the design before snapshot files);
- ``floor-file``: the bare floor, a minimal KVM VM + vCPU per sandbox
  (bench/floor.py, no hlpool runtime, no dirty tracking) whose memory is the
  snapshot's image area mapped MAP_PRIVATE from the same snapshot file; its
  guest reads one byte of every image page (a superset of what ``work``
  reads) and writes ``WRITE_PAGES`` pages;
- ``floor-anon``: the same bare VM with a private anonymous copy of those pages
  (the floor under ``private``);
- ``wasmtime``: wasmtime-py (PyPI ``wasmtime``), the peer a Python user would
  otherwise pick: per sandbox one ``Store`` + ``Instance`` of a WebAssembly
  module whose data segment holds the same bytes and whose ``work`` computes
  the same checksum (bench/wasm_guest.py); the module is compiled once,
  serialized to a file and loaded with ``Module.deserialize_file``, and
  wasmtime's copy-on-write memory images (``memory_init_cow``, the default)
  map its data from that file, so instances share those pages like hlpool's.

For each mode, W worker processes (``--workers``, default: the CPU count) are
forked; each opens the snapshot (or the module), builds and drops one warm-up
sandbox, and waits. The baseline is read then. The workers then grow their
sandboxes step by step to each N in ``--counts`` (N/W each; every sandbox
serves one ``work`` call and stays alive), and after each step the host
memory is read again:

- /proc/meminfo: ``used`` = MemTotal - MemAvailable (system-wide: includes
  kernel memory that no other field itemises, and other processes' noise),
  and the kernel-side fields a VM grows: SUnreclaim, KernelStack, PageTables,
  SecPageTables, VmallocUsed, Percpu (``kernel``), plus Shmem, AnonPages;
- the workers' /proc/PID/smaps_rollup: Pss (a page-cache page mapped by k
  sandboxes counts 1/k in each), Rss, Private_Dirty; and their map, thread
  and address-space (VmSize) counts;
- the memory cgroup of this process tree, when readable (cgroup v1
  ``memory.usage_in_bytes`` + ``memory.kmem.usage_in_bytes``, or v2
  ``memory.current``): what the kernel charges the workers, user and kernel
  memory (KVM's shadow page tables, vCPU structures) alike, without other
  processes' noise. This is the ``total`` column; without a cgroup, ``total``
  is ``used``.

Per-sandbox figures are (reading - baseline) / N. The snapshot file's page
cache (and wasmtime's module file) are read before the baseline, so they are
not in ``total``; they are a fixed cost shared by all sandboxes of the host
(reported beside the table). A mode stops growing when its projected total at
the next N would exceed the memory budget (``--budget-gib``, default 8 GiB), or
leave less than ``--reserve-gib`` available, or exceed the workers'
``vm.max_map_count``, or (``--mode-minutes``) take too long; the report says
so. The time each step took is reported too, with the CPU time the kernel's
DAMON threads (kdamond) used meanwhile: where DAMON monitors physical memory,
it walks the reverse map of every page it samples, and a snapshot page shared
by N sandboxes has N mappings (see bench/README.md).

Usage: ``python bench/density.py [--quick] [--counts 1,10,100] [--workers W]
[--modes shared,private,...] [--budget-gib G] [--repeats R]``; writes
bench/results/density.json.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import resource
import selectors
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from array import array
from pathlib import Path
from typing import Any, Callable

try:
    from .common import Progress, percentiles, print_table, status, write_results
except ImportError:  # run as a script, or imported with bench/ on sys.path
    from common import Progress, percentiles, print_table, status, write_results  # type: ignore[no-redef]

PAGE = 4096
KIB_PER_GIB = 1 << 20
WORDS_PER_PAGE = PAGE // 8
TABLE_MIB = 6
DATA_MIB = 1
WRITE_PAGES = 8
SEED = 20240601
GENERATOR_VERSION = 1
COUNTS = (1, 10, 100, 250, 500, 1000)
QUICK_COUNTS = (1, 10, 50, 100)
MODES = ("shared", "private", "floor-file", "floor-anon", "wasmtime")
MODE_LABELS = {
    "shared": "hlpool, snapshot file shared (default)",
    "private": "hlpool, private_memory=True",
    "floor-file": "bare KVM VM, file MAP_PRIVATE",
    "floor-anon": "bare KVM VM, anonymous copy",
    "wasmtime": "wasmtime-py Store+Instance",
}
DEFAULT_BUDGET_GIB = 8.0
DEFAULT_RESERVE_GIB = 3.0
DEFAULT_MODE_MINUTES = 15.0  # stop growing a mode when the next step would end later than this
MAP_COUNT_HEADROOM = 0.9  # use at most this share of vm.max_map_count per worker
SETTLE_S = 0.5
PROGRESS_EVERY = 10  # a worker reports progress every this many sandboxes
# Deadline of the first work() call. Generous: on the development machine (a nested PVM guest)
# creating a VM or its first call occasionally stalls for seconds while many VMs are alive,
# beyond hlpool's default 10 s (see bench/README.md).
CALL_TIMEOUT_S = 300.0

MEMINFO_FIELDS = ("MemFree", "MemAvailable", "AnonPages", "Shmem", "Cached", "Mapped", "SUnreclaim",
                  "SReclaimable", "KernelStack", "PageTables", "SecPageTables", "VmallocUsed", "Percpu")
KERNEL_FIELDS = ("SUnreclaim", "KernelStack", "PageTables", "SecPageTables", "VmallocUsed", "Percpu")
SMAPS_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Shared_Clean", "Private_Clean",
                "Private_Dirty")


# ---- the guest ------------------------------------------------------------------------------

def _words(rng: random.Random, n_words: int) -> array:
    data = array("Q", rng.randbytes(8 * n_words))
    if sys.byteorder != "little":
        data.byteswap()
    return data


def guest_data(table_mib: int = TABLE_MIB, data_mib: int = DATA_MIB, seed: int = SEED) -> tuple[array, array]:
    """The table and writable-data words the generated guest is built with (deterministic)."""
    rng = random.Random(seed)
    return _words(rng, table_mib * (1 << 20) // 8), _words(rng, data_mib * (1 << 20) // 8)


def _initializer(words: array, per_line: int = 8) -> str:
    lines = []
    for i in range(0, len(words), per_line):
        lines.append(",".join(f"0x{w:016x}u" for w in words[i:i + per_line]))
    return ",\n".join(lines)


def guest_source(table: array, data: array, write_pages: int = WRITE_PAGES) -> str:
    """C source of the large-image guest."""
    table_pages = len(table) // WORDS_PER_PAGE
    data_pages = len(data) // WORDS_PER_PAGE
    return f"""/* Generated by bench/density.py: a guest with a large image. Do not edit. */
#include <hlpool.h>
#include <stdint.h>

#define PAGE_WORDS {WORDS_PER_PAGE}u
#define TABLE_PAGES {table_pages}u
#define DATA_PAGES {data_pages}u
#define WRITE_PAGES {write_pages}u

/* {len(table) * 8} bytes of read-only pseudo-random data (.rodata: in the image, never written) */
static const uint64_t table[TABLE_PAGES * PAGE_WORDS] = {{
{_initializer(table)}
}};

/* {len(data) * 8} bytes of initialized writable data (.data) */
static uint64_t data[DATA_PAGES * PAGE_WORDS] = {{
{_initializer(data)}
}};

/* work(i[, stride]): read word i%512 of every stride-th table page; add i+1 to word i%512 of
 * WRITE_PAGES pages of data, spread over it; return the wrapped sum of everything read. */
static hl_value work(const hl_args *a) {{
    int64_t i = hl_arg_int(a, 0);
    int64_t stride = hl_argc(a) > 1 ? hl_arg_int(a, 1) : 1;
    if (i < 0 || stride < 1) return hl_error("work(i >= 0, stride >= 1)");
    size_t w = (size_t)i % PAGE_WORDS;
    uint64_t sum = 0;
    for (size_t p = 0; p < TABLE_PAGES; p += (size_t)stride) sum += table[p * PAGE_WORDS + w];
    for (size_t k = 0; k < WRITE_PAGES; k++) {{
        volatile uint64_t *word = &data[(k * (DATA_PAGES / WRITE_PAGES)) * PAGE_WORDS + w];
        *word += (uint64_t)i + 1;
        sum += *word;
    }}
    return hl_int((int64_t)sum);
}}

int hl_main(void) {{
    hl_export("work", work);
    return 0;
}}
"""


def expected_work(table: array, data: array, i: int, stride: int = 1, write_pages: int = WRITE_PAGES) -> int:
    """What ``work(i, stride)`` returns on a sandbox at its snapshot (as a signed int64)."""
    mask = (1 << 64) - 1
    w = i % WORDS_PER_PAGE
    table_pages = len(table) // WORDS_PER_PAGE
    data_pages = len(data) // WORDS_PER_PAGE
    total = sum(table[p * WORDS_PER_PAGE + w] for p in range(0, table_pages, stride))
    for k in range(write_pages):
        total += (data[(k * (data_pages // write_pages)) * WORDS_PER_PAGE + w] + i + 1) & mask
    total &= mask
    return total - (1 << 64) if total >= 1 << 63 else total


def build_large_guest(table_mib: int = TABLE_MIB, data_mib: int = DATA_MIB) -> tuple[Path, array, array]:
    """Generate and build the guest (cached in ~/.cache/hlpool/bench); returns (elf, table, data)."""
    from hlpool.guest.build import build_guest, cache_dir, sdk_fingerprint

    table, data = guest_data(table_mib, data_mib)
    key = hashlib.sha256(f"{GENERATOR_VERSION}:{table_mib}:{data_mib}:{WRITE_PAGES}:{SEED}:"
                         f"{sdk_fingerprint()}".encode()).hexdigest()[:16]
    out = cache_dir() / "bench" / f"density-{table_mib}m-{data_mib}m-{key}.elf"
    if not out.exists():
        status(f"generating and building the large-image guest ({table_mib} MiB table + {data_mib} MiB data) ...")
        with tempfile.TemporaryDirectory(prefix="hlpool-density-") as tmp:
            src = Path(tmp) / "density_guest.c"
            src.write_text(guest_source(table, data))
            t0 = time.monotonic()
            build_guest([src], out)
            status(f"  built in {time.monotonic() - t0:.1f} s: {out}")
    return out, table, data


# ---- memory readings ------------------------------------------------------------------------

def read_meminfo() -> dict[str, int]:
    """/proc/meminfo fields in KiB."""
    out = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[name] = int(parts[0])
    return out


def read_smaps_rollup(pid: int | str = "self") -> dict[str, int]:
    """/proc/PID/smaps_rollup fields in KiB."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[name] = int(parts[0])
    return out


def _proc_counts(pid: int) -> dict[str, int]:
    out = {"threads": 0, "vmsize": 0}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
            elif line.startswith("VmSize:"):
                out["vmsize"] = int(line.split()[1])
    with open(f"/proc/{pid}/maps", "rb") as f:
        out["maps"] = sum(1 for _ in f)
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def kdamond_cpu_s() -> float:
    """CPU seconds used so far by the kernel's DAMON threads (kdamond*), 0 if there are none."""
    total = 0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        if comm.startswith("kdamond"):
            fields = stat[stat.rfind(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def _cgroup_dir() -> Path | None:
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    d = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
                    if (d / "memory.usage_in_bytes").exists():
                        return d
                if controllers == "":  # cgroup v2
                    d = Path("/sys/fs/cgroup") / path.lstrip("/")
                    if (d / "memory.current").exists():
                        return d
    except OSError:
        pass
    return None


def read_cgroup(d: Path | None) -> dict[str, int]:
    """Memory charged to this process tree's cgroup, KiB (v1: usage + kmem; v2: memory.current)."""
    if d is None:
        return {}
    out = {}
    for name, key in (("memory.usage_in_bytes", "usage"), ("memory.kmem.usage_in_bytes", "kmem"),
                      ("memory.current", "usage")):
        try:
            out[key] = int((d / name).read_text()) // 1024
        except (OSError, ValueError):
            pass
    return out


def take_reading(pids: list[int], cgroup: Path | None) -> dict[str, Any]:
    """System-wide meminfo, the cgroup's charge, and the sum over ``pids`` of smaps_rollup and counts."""
    mi = read_meminfo()
    procs: dict[str, int] = {k: 0 for k in SMAPS_FIELDS}
    procs.update(threads=0, vmsize=0, maps=0, fds=0)
    for pid in pids:
        for k, v in read_smaps_rollup(pid).items():
            if k in procs:
                procs[k] += v
        for k, v in _proc_counts(pid).items():
            procs[k] += v
    return {
        "meminfo": {k: mi.get(k, 0) for k in MEMINFO_FIELDS},
        "mem_total": mi["MemTotal"],
        "used": mi["MemTotal"] - mi["MemAvailable"],
        "cgroup": read_cgroup(cgroup),
        "procs": procs,
    }


def diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """after - before, KiB (recursively, keys present in both)."""
    out: dict[str, Any] = {}
    for k, v in after.items():
        if isinstance(v, dict):
            out[k] = diff(v, before.get(k, {}))
        elif k in before:
            out[k] = v - before[k]
    return out


def _settle() -> None:
    gc.collect()
    time.sleep(SETTLE_S)


# ---- worker processes --------------------------------------------------------------------------

def _import_bench_module(name: str) -> Any:
    import importlib

    if __package__:
        return importlib.import_module(f"{__package__}.{name}")
    return importlib.import_module(name)


def _dispose(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if close is not None:
        close()


def _setup_mode(mode: str, prep: dict[str, Any], stride: int,
                expected: list[int]) -> tuple[Callable[[int], Any], dict[str, Any]]:
    """In a worker: open what ``mode`` needs; returns make(i) (one live sandbox that served a call) and info."""
    info: dict[str, Any] = {}
    n_expected = len(expected)
    if mode in ("shared", "private"):
        import hlpool

        snapshot = hlpool.Snapshot.open(prep["snapshot"])
        private = mode == "private"

        def make(i: int) -> Any:
            sb = hlpool.Sandbox(snapshot, private_memory=private, name=f"density-{mode}-{i}",
                                timeout=CALL_TIMEOUT_S)
            k = i % n_expected
            result = sb.call("work", k, stride)
            if result != expected[k]:
                raise RuntimeError(f"{mode} sandbox {i}: work({k}) = {result}, expected {expected[k]}")
            return sb
    elif mode in ("floor-file", "floor-anon"):
        import hlpool

        floor_mod = _import_bench_module("floor")
        snapshot = hlpool.Snapshot.open(prep["snapshot"])
        image = floor_mod.FloorImage.from_snapshot(snapshot, private_copy=(mode == "floor-anon"),
                                                   write_pages=WRITE_PAGES)
        info["floor_image_pages"] = image.pages  # the floor reads every image page, whatever the stride

        def make(i: int, _keep: Any = snapshot) -> Any:  # the snapshot owns the fds the image maps
            vm = floor_mod.FloorVm(image)
            try:
                vm.touch()
            except BaseException:
                vm.close()
                raise
            return vm
    elif mode == "wasmtime":
        import wasmtime

        wasm_guest = _import_bench_module("wasm_guest")
        engine = wasm_guest.make_engine()
        module = wasmtime.Module.deserialize_file(engine, prep["cwasm"])

        def make(i: int) -> Any:
            store = wasmtime.Store(engine)
            instance = wasmtime.Instance(store, module, [])
            k = i % n_expected
            result = instance.exports(store)["work"](store, k, stride)
            if result != expected[k]:
                raise RuntimeError(f"wasmtime instance {i}: work({k}) = {result}, expected {expected[k]}")
            return (store, instance)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    warm = make(0)  # the first sandbox of a process pays one-time costs: not in the baseline delta
    if mode == "wasmtime":
        info["image_backing"] = wasm_guest.image_backing(prep["cwasm"])
    _dispose(warm)
    del warm
    gc.collect()
    return make, info


def _worker_main(mode: str, index: int, workers: int, prep: dict[str, Any], stride: int, expected: list[int],
                 nofile: int, cmd_fd: int, report_fd: int) -> None:
    """A worker process: set up, then grow its sandboxes on command; never returns."""
    def send(kind: str, payload: Any = None) -> None:
        os.write(report_fd, f"{kind} {json.dumps(payload)}\n".encode())

    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and tells us to exit
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = nofile if hard == resource.RLIM_INFINITY else min(nofile, hard)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        make, info = _setup_mode(mode, prep, stride, expected)
        info["rlimit_nofile"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
        send("ready", info)
        live: list[Any] = []
        buf = b""
        while True:
            while b"\n" not in buf:
                chunk = os.read(cmd_fd, 4096)
                if not chunk:
                    raise EOFError("parent went away")
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            cmd, _, arg = line.decode().partition(" ")
            if cmd == "exit":
                break
            if cmd != "grow":
                raise ValueError(f"unknown command {cmd!r}")
            target = int(arg)
            samples = []
            clock = time.perf_counter_ns
            while len(live) < target:
                i = len(live) * workers + index
                t0 = clock()
                live.append(make(i))
                samples.append(clock() - t0)
                if len(live) % PROGRESS_EVERY == 0:
                    send("p", len(live))
            gc.collect()
            send("done", {"count": len(live), "make_ns": samples})
    except BaseException:
        code = 1
        try:
            send("error", traceback.format_exc())
        except OSError:
            pass
    os._exit(code)  # the kernel tears the VMs down; no Python teardown of thousands of objects


class _Workers:
    """W forked worker processes of one mode, driven over pipes."""

    def __init__(self, mode: str, workers: int, prep: dict[str, Any], stride: int, expected: list[int],
                 nofile: int) -> None:
        self.mode = mode
        self.pids: list[int] = []
        self.cmd: list[int] = []
        self.rep: list[int] = []
        self.buf: list[bytes] = []
        self.counts = [0] * workers
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            for index in range(workers):
                cmd_r, cmd_w = os.pipe()
                rep_r, rep_w = os.pipe()
                pid = os.fork()
                if pid == 0:  # the worker
                    os.close(cmd_w)
                    os.close(rep_r)
                    for fd in self.cmd + self.rep:
                        os.close(fd)
                    _worker_main(mode, index, workers, prep, stride, expected, nofile, cmd_r, rep_w)
                os.close(cmd_r)
                os.close(rep_w)
                self.pids.append(pid)
                self.cmd.append(cmd_w)
                self.rep.append(rep_r)
                self.buf.append(b"")
        except BaseException:
            self.close()
            raise

    def send_all(self, lines: list[str]) -> None:
        for fd, line in zip(self.cmd, lines):
            os.write(fd, (line + "\n").encode())

    def wait_all(self, kind: str, on_progress: Callable[[], None] | None = None,
                 timeout: float = 1800.0) -> list[Any]:
        """Wait until every worker sent ``kind``; returns their payloads (in worker order)."""
        results: list[Any] = [None] * len(self.pids)
        pending = set(range(len(self.pids)))
        sel = selectors.DefaultSelector()
        for i in pending:
            sel.register(self.rep[i], selectors.EVENT_READ, i)
        deadline = time.monotonic() + timeout
        try:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.mode}: workers {sorted(pending)} did not answer in {timeout:.0f} s")
                for key, _ in sel.select(min(left, 1.0)):
                    i = key.data
                    chunk = os.read(self.rep[i], 65536)
                    if not chunk:
                        raise RuntimeError(f"{self.mode}: worker {i} (pid {self.pids[i]}) died")
                    self.buf[i] += chunk
                    while b"\n" in self.buf[i]:
                        line, self.buf[i] = self.buf[i].split(b"\n", 1)
                        what, _, payload = line.decode().partition(" ")
                        value = json.loads(payload) if payload else None
                        if what == "error":
                            raise RuntimeError(f"{self.mode}: worker {i} failed:\n{value}")
                        if what == "p":
                            self.counts[i] = value
                            if on_progress:
                                on_progress()
                        elif what == kind:
                            results[i] = value
                            pending.discard(i)
                            sel.unregister(self.rep[i])
                            if isinstance(value, dict) and "count" in value:
                                self.counts[i] = value["count"]
                                if on_progress:
                                    on_progress()
        finally:
            sel.close()
        return results

    def close(self, timeout: float = 600.0, kill: bool = False) -> float:
        """Tell the workers to exit (``kill``: SIGKILL them) and reap them; returns the seconds it took."""
        t0 = time.monotonic()
        for fd, pid in zip(self.cmd, self.pids):
            try:
                if kill:
                    os.kill(pid, signal.SIGKILL)
                else:
                    os.write(fd, b"exit\n")
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for pid in self.pids:
            while True:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.02)
        for fd in self.cmd + self.rep:
            try:
                os.close(fd)
            except OSError:
                pass
        self.pids, self.cmd, self.rep = [], [], []
        return time.monotonic() - t0


# ---- preparation ------------------------------------------------------------------------------

def _prepare(elf: Path, table: array, data: array, tmp: str, want_wasm: bool) -> dict[str, Any]:
    """In a short-lived child: persist the snapshot; compile + serialize the wasm module. Returns paths/info."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        out: dict[str, Any] = {}
        code = 0
        try:
            import hlpool

            path = os.path.join(tmp, "density.hlsnap")
            t0 = time.monotonic()
            snap = hlpool.Snapshot.from_elf(elf).persist(path)
            out["snapshot"] = path
            out["snapshot_s"] = time.monotonic() - t0
            out["snapshot_file_bytes"] = os.path.getsize(path)
            out["image_bytes"] = snap.layout.image.size
            del snap
            if want_wasm:
                try:
                    import wasmtime  # noqa: F401
                except ImportError as exc:
                    out["wasm_error"] = f"wasmtime is not installed ({exc}); pip install wasmtime"
                else:
                    wasm_guest = _import_bench_module("wasm_guest")
                    cwasm = os.path.join(tmp, "density.cwasm")
                    wat = wasm_guest.large_module_wat(table.tobytes(), data.tobytes(), WRITE_PAGES)
                    out["wasm"] = wasm_guest.compile_to_file(wat, cwasm)
                    out["cwasm"] = cwasm
        except BaseException:
            out = {"error": traceback.format_exc()}
            code = 1
        os.write(w, json.dumps(out).encode())
        os._exit(code)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    out = json.loads(b"".join(chunks) or b'{"error": "preparation process died"}')
    if "error" in out:
        raise RuntimeError(f"preparing the snapshot / module failed:\n{out['error']}")
    return out


def _read_file(path: str) -> None:
    with open(path, "rb") as f:  # into the page cache before any baseline
        while f.read(1 << 20):
            pass


# ---- the benchmark -------------------------------------------------------------------------------

PER_SB_KEYS = ("total", "used", "kernel", "pss", "rss", "private_dirty", "pss_anon", "pss_file", "pss_shmem",
               "anon_pages", "shmem", "maps", "threads", "fds", "vmsize", "per_gib", "host_capacity",
               "pss_plus_kernel") + tuple(f"kernel_{k}" for k in KERNEL_FIELDS)


def _per_sandbox(delta: dict[str, Any], n: int, mem_total: int) -> dict[str, float]:
    mi, pr, cg = delta["meminfo"], delta["procs"], delta["cgroup"]
    out: dict[str, float] = {
        "used": delta["used"] / n,
        "kernel": sum(mi.get(k, 0) for k in KERNEL_FIELDS) / n,
        "pss": pr.get("Pss", 0) / n,
        "rss": pr.get("Rss", 0) / n,
        "private_dirty": pr.get("Private_Dirty", 0) / n,
        "pss_anon": pr.get("Pss_Anon", 0) / n,
        "pss_file": pr.get("Pss_File", 0) / n,
        "pss_shmem": pr.get("Pss_Shmem", 0) / n,
        "anon_pages": mi["AnonPages"] / n,
        "shmem": mi["Shmem"] / n,
        "maps": pr["maps"] / n,
        "threads": pr["threads"] / n,
        "fds": pr["fds"] / n,
        "vmsize": pr["vmsize"] / n,
    }
    for k in KERNEL_FIELDS:
        out[f"kernel_{k}"] = mi.get(k, 0) / n
    out["pss_plus_kernel"] = out["pss"] + out["kernel"]
    if "usage" in cg:
        out["cgroup"] = cg["usage"] / n
    if "kmem" in cg:
        out["cgroup_kmem"] = cg["kmem"] / n
    out["total"] = out.get("cgroup", out["used"])
    out["per_gib"] = KIB_PER_GIB / out["total"] if out["total"] > 0 else float("nan")
    out["host_capacity"] = mem_total / out["total"] if out["total"] > 0 else float("nan")
    return out


def _stop_reason(n: int, last: dict[str, Any] | None, now: dict[str, Any], workers: int, budget_kib: float,
                 reserve_kib: float, max_map_count: int, base_maps_per_worker: float) -> str | None:
    if last is None:
        return None
    per = last["per_sandbox_kib"]
    per_total = max(per["total"], per["used"], 1.0)
    projected = per_total * n
    if projected > budget_kib:
        return (f"projected {projected / KIB_PER_GIB:.1f} GiB at N={n} "
                f"({per_total:,.0f} KiB/sandbox) > budget {budget_kib / KIB_PER_GIB:.1f} GiB")
    available = now["mem_total"] - now["used"]
    growth = per_total * (n - last["n"])
    if available - growth < reserve_kib:
        return (f"growing to N={n} needs ~{growth / KIB_PER_GIB:.1f} GiB; "
                f"{available / KIB_PER_GIB:.1f} GiB available, reserve {reserve_kib / KIB_PER_GIB:.1f} GiB")
    maps = base_maps_per_worker + per["maps"] * -(-n // workers)
    if max_map_count and maps > MAP_COUNT_HEADROOM * max_map_count:
        return f"~{maps:,.0f} mappings per worker at N={n} > {MAP_COUNT_HEADROOM:.0%} of vm.max_map_count"
    return None


def run_mode(mode: str, counts: tuple[int, ...], workers: int, prep: dict[str, Any], stride: int,
             expected: list[int], cgroup: Path | None, budget_kib: float, reserve_kib: float,
             max_seconds: float = DEFAULT_MODE_MINUTES * 60) -> dict[str, Any]:
    """Grow ``mode``'s sandboxes through ``counts`` in ``workers`` processes; readings after each step."""
    max_map_count = _max_map_count()
    nofile = 4 * (max(counts) // workers + 1) + 256
    result: dict[str, Any] = {"mode": mode, "label": MODE_LABELS[mode], "workers": workers, "steps": [],
                              "stopped": None}
    _settle()
    before_fork = take_reading([], cgroup)
    ws = _Workers(mode, workers, prep, stride, expected, nofile)
    bar = Progress(max(counts), f"{mode}")
    failed = True
    try:
        t0 = time.monotonic()
        result["worker_info"] = ws.wait_all("ready", timeout=600)
        result["setup_s"] = time.monotonic() - t0
        _settle()
        base = take_reading(ws.pids, cgroup)
        result["baseline"] = base
        base_maps = base["procs"]["maps"] / workers
        last = None
        done_before = 0

        def progress() -> None:
            total = sum(ws.counts)
            bar.update(total - bar.done)

        for n in counts:
            reason = _stop_reason(n, last, take_reading([], cgroup), workers, budget_kib, reserve_kib,
                                  max_map_count, base_maps)
            if reason is None and last is not None and last["new_sandboxes"] > 0:
                # Time: assume the cost per sandbox keeps growing in proportion to N (it grows on
                # machines where something walks the reverse maps of the shared pages; README).
                per_new = last["grow_s"] / last["new_sandboxes"]
                projected_s = per_new * (n / last["n"]) * (n - last["n"])
                spent = time.monotonic() - t0
                if spent + projected_s > max_seconds:
                    reason = (f"time budget: ~{projected_s:.0f} s projected for N={n} after {spent:.0f} s "
                              f"(limit {max_seconds:.0f} s per mode; --mode-minutes)")
            if reason:
                result["stopped"] = {"before_n": n, "reason": reason}
                status(f"  {mode}: stopped before N={n}: {reason}")
                break
            targets = [n // workers + (1 if w < n % workers else 0) for w in range(workers)]
            damon0 = kdamond_cpu_s()
            t1 = time.monotonic()
            ws.send_all([f"grow {t}" for t in targets])
            dones = ws.wait_all("done", progress)
            grow_s = time.monotonic() - t1
            _settle()
            live = take_reading(ws.pids, cgroup)
            delta = diff(live, base)
            make_ns = [v for d in dones for v in d["make_ns"]]
            step = {
                "n": n,
                "delta_kib": delta,
                "per_sandbox_kib": _per_sandbox(delta, n, live["mem_total"]),
                "grow_s": grow_s,
                "new_sandboxes": n - done_before,
                "make": percentiles(make_ns) if make_ns else None,
                "mem_available_kib": live["mem_total"] - live["used"],
                "kdamond_cpu_s": kdamond_cpu_s() - damon0,
            }
            done_before = n
            result["steps"].append(step)
            last = step
        failed = False
    finally:
        bar.close()
        result["exit_s"] = ws.close(kill=failed)
    _settle()
    after = take_reading([], cgroup)
    result["residual_after_exit_kib"] = {"used": after["used"] - before_fork["used"],
                                         "cgroup": (after["cgroup"].get("usage", 0)
                                                    - before_fork["cgroup"].get("usage", 0))}
    return result


def _max_map_count() -> int:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 0


def run_benchmark(modes: tuple[str, ...], counts: tuple[int, ...], workers: int, repeats: int, stride: int,
                  table_mib: int, data_mib: int, budget_gib: float, reserve_gib: float,
                  mode_seconds: float = DEFAULT_MODE_MINUTES * 60) -> dict[str, Any]:
    elf, table, data = build_large_guest(table_mib, data_mib)
    status("expected results of work(i) ...")
    expected = [expected_work(table, data, i, stride) for i in range(WORDS_PER_PAGE)]
    cgroup = _cgroup_dir()
    tmp = tempfile.mkdtemp(prefix="hlpool-bench-density-")
    notes: list[str] = []
    try:
        status("snapshot of the large-image guest" + (" and the wasm module" if "wasmtime" in modes else "") + " ...")
        prep = _prepare(elf, table, data, tmp, "wasmtime" in modes)
        if "wasmtime" in modes and "cwasm" not in prep:
            notes.append(f"wasmtime mode skipped: {prep.get('wasm_error')}")
            status(f"  {notes[-1]}")
            modes = tuple(m for m in modes if m != "wasmtime")
        _read_file(prep["snapshot"])
        if prep.get("cwasm"):
            _read_file(prep["cwasm"])
        os.sync()  # the module file was just written: no writeback during the measurements
        time.sleep(2 * SETTLE_S)
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for r in range(repeats):
            order = modes if r % 2 == 0 else modes[::-1]
            for mode in order:
                status(f"repeat {r + 1}/{repeats}: {mode} ({MODE_LABELS[mode]}), N up to {max(counts)} "
                       f"in {workers} worker(s) ...")
                t0 = time.monotonic()
                res = run_mode(mode, counts, workers, prep, stride, expected, cgroup,
                               budget_gib * KIB_PER_GIB, reserve_gib * KIB_PER_GIB, mode_seconds)
                res["elapsed_s"] = time.monotonic() - t0
                runs[mode].append(res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary: dict[str, Any] = {}
    for mode in modes:
        by_n: dict[str, Any] = {}
        for n in counts:
            steps = [s for res in runs[mode] for s in res["steps"] if s["n"] == n]
            if not steps:
                continue
            per = [s["per_sandbox_kib"] for s in steps]
            keys = [k for k in per[0] if all(k in p for p in per)]
            by_n[str(n)] = {
                "repeats": len(steps),
                "per_sandbox_kib": {k: statistics.median(p[k] for p in per) for k in keys},
                "make_p50_us": statistics.median(s["make"]["p50_us"] for s in steps if s["make"]),
                "make_p99_us": statistics.median(s["make"]["p99_us"] for s in steps if s["make"]),
                "make_max_us": max(s["make"]["max_us"] for s in steps if s["make"]),
                "grow_s": statistics.median(s["grow_s"] for s in steps),
                "grow_ms_per_new_sandbox": statistics.median(1000 * s["grow_s"] / max(1, s["new_sandboxes"])
                                                             for s in steps),
                "kdamond_cpu_s": statistics.median(s.get("kdamond_cpu_s", 0.0) for s in steps),
            }
        summary[mode] = {
            "label": MODE_LABELS[mode],
            "by_n": by_n,
            "max_n": max((int(n) for n in by_n), default=0),
            "stopped": [res["stopped"] for res in runs[mode] if res["stopped"]],
            "worker_info": runs[mode][0].get("worker_info"),
            "exit_s": statistics.median(res["exit_s"] for res in runs[mode]),
            "residual_after_exit_kib": runs[mode][-1]["residual_after_exit_kib"],
        }
    if "shared" in summary:
        for mode in modes:
            for n, e in summary[mode]["by_n"].items():
                sh = summary["shared"]["by_n"].get(n)
                if sh:
                    e["ratio_to_shared"] = {k: e["per_sandbox_kib"][k] / sh["per_sandbox_kib"][k]
                                            for k in ("total", "pss", "kernel", "used")
                                            if sh["per_sandbox_kib"].get(k, 0) > 0}
    import platform as _platform

    wasm_info = None
    if "wasmtime" in modes:
        wasm_guest = _import_bench_module("wasm_guest")
        wasm_info = {"version": wasm_guest.wasmtime_version(), "config": wasm_guest.ENGINE_CONFIG,
                     "module": prep.get("wasm")}
    return {
        "modes": list(modes),
        "labels": {m: MODE_LABELS[m] for m in modes},
        "counts": list(counts),
        "workers": workers,
        "repeats": repeats,
        "read_stride_pages": stride,
        "budget_gib": budget_gib,
        "reserve_gib": reserve_gib,
        "mode_seconds": mode_seconds,
        "max_map_count": _max_map_count(),
        "guest": {"elf": str(elf), "elf_bytes": os.path.getsize(elf), "table_mib": table_mib,
                  "data_mib": data_mib, "write_pages": WRITE_PAGES, "image_bytes": prep["image_bytes"],
                  "snapshot_file_bytes": prep["snapshot_file_bytes"]},
        "wasmtime": wasm_info,
        "floor": "bench/floor.py FloorVm with a FloorImage of the snapshot's image area: reads one byte of "
                 "every image page, writes WRITE_PAGES pages (floor-file: the snapshot file MAP_PRIVATE; "
                 "floor-anon: an anonymous copy)",
        "cgroup": str(cgroup) if cgroup else None,
        "total_is": "cgroup memory charge delta" if cgroup else "MemTotal-MemAvailable delta",
        "host_python": _platform.python_version(),
        "notes": notes,
        "summary": summary,
        "runs": runs,
    }


# ---- report ---------------------------------------------------------------------------------------

def print_report(data: dict[str, Any]) -> None:
    g = data["guest"]
    s = data["summary"]
    modes = data["modes"]
    counts = data["counts"]
    title = (f"Memory per live sandbox, KiB ({g['table_mib']} MiB read-only table + {g['data_mib']} MiB data; "
             f"image {g['image_bytes'] / 2**20:.1f} MiB; each sandbox served one work() call; "
             f"{data['workers']} worker process(es))")
    rows = []
    for n in counts:
        row: list[Any] = [str(n)]
        for mode in modes:
            e = s[mode]["by_n"].get(str(n))
            row.append(e["per_sandbox_kib"]["total"] if e else None)
        rows.append(row)
    print_table(f"{title}\ntotal KiB per sandbox (- = not measured: memory budget)", ["N", *modes], rows)

    headers = ["N", "mode", "total", "used", "Pss", "kernel", "kmem", "Priv_Dirty", "per GiB", "x shared",
               "make p50 ms", "make max ms"]
    rows = []
    for n in counts:
        for mode in modes:
            e = s[mode]["by_n"].get(str(n))
            if not e:
                continue
            p = e["per_sandbox_kib"]
            rows.append([str(n), mode, p["total"], p["used"], p["pss"], p["kernel"], p.get("cgroup_kmem"),
                         p["private_dirty"], p["per_gib"], e.get("ratio_to_shared", {}).get("total"),
                         e["make_p50_us"] / 1000, e["make_max_us"] / 1000])
    print_table("Per sandbox, KiB (deltas from the baseline / N)", headers, rows)
    print(f"total = {data['total_is']} (workers' user + kernel memory); used = MemTotal-MemAvailable delta "
          "(system-wide); Pss/Priv_Dirty = sum over the workers' smaps_rollup; kernel = SUnreclaim + "
          "KernelStack + PageTables + SecPageTables + VmallocUsed + Percpu delta (system-wide); kmem = cgroup "
          "kernel memory; per GiB = 1 GiB / total; x shared = total / shared's total at the same N; make = "
          "create + first work() call (p50, max) of the sandboxes added in that step. At small N the cgroup "
          "figures carry the kernel's per-CPU charge batching (up to ~256 KiB per CPU in total).")

    rows = []
    shared_max = s.get("shared", {}).get("by_n", {})
    for mode in modes:
        m = s[mode]
        if not m["by_n"]:
            continue
        n = str(m["max_n"])
        p = m["by_n"][n]["per_sandbox_kib"]
        ratio = m["by_n"][n].get("ratio_to_shared", {}).get("total")
        if ratio is None and shared_max:  # compare with shared at its largest N
            sh = shared_max[str(max(int(k) for k in shared_max))]["per_sandbox_kib"]["total"]
            ratio = p["total"] / sh
        rows.append([mode, m["label"], int(n), p["total"], p["pss"], p["kernel"], p["per_gib"],
                     p["host_capacity"], ratio, p["maps"], p["vmsize"] / 1024])
    print_table("At the largest N each mode reached", ["mode", "what", "N", "total KiB/sb", "Pss KiB/sb",
                                                        "kernel KiB/sb", "sandboxes/GiB", "fit in host RAM",
                                                        "x shared", "maps/sb", "VmSize MiB/sb"], rows)
    print(f"fit in host RAM = MemTotal / total (all of the host's memory for sandboxes); fixed costs not in "
          f"the per-sandbox figures: the snapshot file's page cache ({g['snapshot_file_bytes'] / 2**20:.1f} MiB, "
          "shared by all sandboxes of the host)" +
          (f", wasmtime's serialized module ({data['wasmtime']['module']['serialized_bytes'] / 2**20:.1f} MiB)"
           if data.get("wasmtime") and data["wasmtime"].get("module") else "") + ".")
    for mode in modes:
        for st in s[mode]["stopped"]:
            print(f"{mode}: stopped before N={st['before_n']}: {st['reason']}")
    rows = []
    for n in counts:
        row: list[Any] = [str(n)]
        for mode in modes:
            e = s[mode]["by_n"].get(str(n))
            row += [e["grow_ms_per_new_sandbox"], e["kdamond_cpu_s"]] if e else [None, None]
        rows.append(row)
    print_table(f"Growing to N: wall ms per added sandbox ({data['workers']} workers in parallel) / CPU seconds "
                "the kernel's DAMON threads (kdamond) used meanwhile",
                ["N", *[f"{m} {k}" for m in modes for k in ("ms", "kdamond s")]], rows)
    if data.get("wasmtime"):
        w = data["wasmtime"]
        backing = (s.get("wasmtime", {}).get("worker_info") or [{}])[0].get("image_backing")
        print(f"wasmtime {w['version']}: " + ", ".join(f"{k}={v}" for k, v in w["config"].items()) +
              f"; memory image mappings of the live warm-up instance: {backing} (file = mapped from the "
              "serialized module file, shared via the page cache)")
    for note in data.get("notes", []):
        print(note)


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("counts must be positive")
    return values


def _modes(text: str) -> tuple[str, ...]:
    values = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in values if m not in MODES]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}; got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="how many live sandboxes fit: hlpool vs its baselines")
    parser.add_argument("--quick", action="store_true", help=f"N = {QUICK_COUNTS} (under a minute)")
    parser.add_argument("--counts", type=_counts, default=None, help=f"comma-separated N values (default {COUNTS})")
    parser.add_argument("--modes", type=_modes, default=MODES, help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    parser.add_argument("--repeats", type=int, default=1, help="sweeps per mode; medians are reported (default 1)")
    parser.add_argument("--budget-gib", type=float, default=DEFAULT_BUDGET_GIB,
                        help="stop a mode before its projected total exceeds this (default %(default)s)")
    parser.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE_GIB,
                        help="keep at least this much memory available (default %(default)s)")
    parser.add_argument("--mode-minutes", type=float, default=DEFAULT_MODE_MINUTES,
                        help="stop growing a mode when its next step would end after this (default %(default)s)")
    parser.add_argument("--read-stride", type=int, default=1, help="work() reads every k-th table page (default 1)")
    parser.add_argument("--table-mib", type=int, default=TABLE_MIB)
    parser.add_argument("--data-mib", type=int, default=DATA_MIB)
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/density.json")
    args = parser.parse_args(argv)
    counts = args.counts or (QUICK_COUNTS if args.quick else COUNTS)
    workers = args.workers or os.cpu_count() or 1
    if args.read_stride < 1 or args.table_mib < 1 or args.data_mib < 1 or args.repeats < 1 or workers < 1:
        parser.error("--read-stride, --table-mib, --data-mib, --repeats and --workers must be >= 1")
    t0 = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the workers on SIGTERM too
    data = run_benchmark(args.modes, counts, workers, args.repeats, args.read_stride, args.table_mib,
                         args.data_mib, args.budget_gib, args.reserve_gib, args.mode_minutes * 60)
    data["quick"] = bool(args.quick)
    data["elapsed_s"] = time.monotonic() - t0
    print_report(data)
    if not args.no_write:
        path = write_results("density", data)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
