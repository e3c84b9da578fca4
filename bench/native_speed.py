"""Does guest code run at native speed? The same compute kernel on the host and in a sandbox.

``hlpool/guest/programs/compute_loop.h`` is compiled into a small host C program with
``gcc -O2`` (the example guests are built with -O2 too); the program times
``compute_loop(iterations)`` with clock_gettime and prints the result and
the elapsed ns. The same kernel runs in the ``fib`` example guest as
``compute(iterations)``, timed around ``Sandbox.call`` (nothing subtracted:
the ~0.1-0.2 ms call overhead is noise at the default size). Host and guest
runs alternate; both must return the same value (the guest returns it as a
signed int64, so they are compared modulo 2**64).

Expect guest/host ~1.0 when the guest runs natively (on PVM an emulated
guest would be ~1000x slower).

Usage: ``python bench/native_speed.py [--quick] [--iterations N] [--repeats R]``;
writes bench/results/native_speed.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from .common import print_table, status, write_results
except ImportError:  # run as a script, or imported with bench/ on sys.path
    from common import print_table, status, write_results  # type: ignore[no-redef]

DEFAULT_ITERATIONS = 200_000_000
QUICK_ITERATIONS = 20_000_000
DEFAULT_REPEATS = 5
QUICK_REPEATS = 3
CFLAGS = ("-O2",)

HOST_PROGRAM = r"""
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "compute_loop.h"

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s iterations\n", argv[0]);
        return 2;
    }
    uint64_t iterations = strtoull(argv[1], NULL, 0);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint64_t result = compute_loop(iterations);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    int64_t ns = (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec);
    printf("%" PRIu64 " %" PRId64 "\n", result, ns);
    return 0;
}
"""


def guests_dir() -> Path:
    import hlpool

    return Path(hlpool.__file__).resolve().parent / "guest" / "programs"


def build_host_program(workdir: Path, cc: str = "gcc") -> tuple[Path, list[str]]:
    """Compile the host program into ``workdir``; returns (binary, command line used)."""
    if shutil.which(cc) is None:
        raise SystemExit(f"{cc} not found: install gcc to run this benchmark")
    src = workdir / "compute_host.c"
    src.write_text(HOST_PROGRAM)
    exe = workdir / "compute_host"
    cmd = [cc, *CFLAGS, f"-I{guests_dir()}", str(src), "-o", str(exe)]
    subprocess.run(cmd, check=True)
    return exe, cmd


def run_host(exe: Path, iterations: int) -> tuple[int, int]:
    """(result, elapsed ns measured inside the program around compute_loop)."""
    out = subprocess.run([str(exe), str(iterations)], check=True, capture_output=True, text=True).stdout
    result, ns = out.split()
    return int(result), int(ns)


def run_benchmark(iterations: int, repeats: int) -> dict[str, Any]:
    import hlpool
    from hlpool.guest.examples import example_path

    with tempfile.TemporaryDirectory(prefix="hlpool-native-speed-") as tmp:
        exe, cmd = build_host_program(Path(tmp))
        status("building the fib guest snapshot ...")
        snapshot = hlpool.Snapshot.from_elf(example_path("fib"))
        with hlpool.Sandbox(snapshot, timeout=None, name="bench-native-speed") as sb:
            # Warm-up: page in the host binary and the guest's code, check small cases agree.
            for n in (0, 1, 1000, 123_457):
                host_small, _ = run_host(exe, n)
                guest_small = sb.call("compute", n)
                if guest_small % 2**64 != host_small:
                    raise RuntimeError(f"compute({n}): guest {guest_small} != host {host_small} (mod 2**64)")
            host_ns: list[int] = []
            guest_ns: list[int] = []
            host_result = guest_result = None
            for r in range(repeats):
                status(f"repeat {r + 1}/{repeats}: host ...")
                host_result, ns = run_host(exe, iterations)
                host_ns.append(ns)
                status(f"repeat {r + 1}/{repeats}: guest ...")
                t0 = time.perf_counter_ns()
                guest_result = sb.call("compute", iterations)
                guest_ns.append(time.perf_counter_ns() - t0)
                if guest_result % 2**64 != host_result:
                    raise RuntimeError(f"compute({iterations}): guest {guest_result} != host {host_result} "
                                       "(mod 2**64)")
            restore = sb.last_restore

    def summary(samples: list[int]) -> dict[str, float]:
        return {
            "min_ms": min(samples) / 1e6,
            "median_ms": statistics.median(samples) / 1e6,
            "max_ms": max(samples) / 1e6,
            "ns_per_iteration_median": statistics.median(samples) / iterations,
            "samples_ns": samples,
        }

    host = summary(host_ns)
    guest = summary(guest_ns)
    return {
        "iterations": iterations,
        "repeats": repeats,
        "host_compile_command": " ".join(cmd[:-3]) + " compute_host.c",
        "result": host_result,
        "guest_result_int64": guest_result,
        "results_match_mod_2_64": True,
        "host": host,
        "guest": guest,
        "ratio_median": guest["median_ms"] / host["median_ms"],
        "ratio_min": guest["min_ms"] / host["min_ms"],
        "guest_last_restore_dirty_pages": restore.dirty,
    }


def print_report(data: dict[str, Any]) -> None:
    rows = []
    for label, key in (("host: gcc -O2 native", "host"), ("guest: Sandbox.call('compute')", "guest")):
        s = data[key]
        ratio_med = 1.0 if key == "host" else data["ratio_median"]
        ratio_min = 1.0 if key == "host" else data["ratio_min"]
        rows.append([label, s["min_ms"], s["median_ms"], s["max_ms"], s["ns_per_iteration_median"],
                     ratio_med, ratio_min])
    print_table(f"compute_loop({data['iterations']:.3g}), {data['repeats']} runs each, alternating "
                f"(result {data['result']}, equal mod 2**64)",
                ["where", "min ms", "median ms", "max ms", "ns/iter", "x host (median)", "x host (min)"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="guest vs host speed of the same compute kernel")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ITERATIONS:.0e} iterations, "
                        f"{QUICK_REPEATS} repeats")
    parser.add_argument("--iterations", type=float, default=None,
                        help=f"compute_loop iterations (default {DEFAULT_ITERATIONS:.0e})")
    parser.add_argument("--repeats", type=int, default=None, help=f"runs of each (default {DEFAULT_REPEATS})")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/native_speed.json")
    args = parser.parse_args(argv)
    iterations = int(args.iterations) if args.iterations else (QUICK_ITERATIONS if args.quick else DEFAULT_ITERATIONS)
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    if iterations <= 0 or repeats <= 0:
        parser.error("--iterations and --repeats must be positive")
    data = run_benchmark(iterations, repeats)
    data["quick"] = bool(args.quick)
    print_report(data)
    if not args.no_write:
        path = write_results("native_speed", data)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
