"""Helpers shared by the benchmark scripts in bench/.

Nothing here runs at import time except cheap constant definitions and one
hook: a benchmark that needs KVM on a host without it ends with the cause in
one line, not a traceback. The scripts print their own output (they are
scripts, print is fine).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TypeVar

BENCH_DIR = Path(__file__).resolve().parent
# Where results go: bench/results (the files the README quotes), or $HLPOOL_BENCH_RESULTS
# (`make bench QUICK=1` uses bench/results/quick, so a short run never replaces a full one).
RESULTS_DIR = Path(os.environ.get("HLPOOL_BENCH_RESULTS") or BENCH_DIR / "results").resolve()

T = TypeVar("T")


def _no_kvm_in_one_line(kind: type[BaseException], value: BaseException, traceback: Any) -> None:
    """sys.excepthook: KvmUnavailableError (the host, not the benchmark) as ``script: error: cause``."""
    from hlpool.errors import KvmUnavailableError

    if isinstance(value, KvmUnavailableError):
        print(f"{Path(sys.argv[0]).name}: error: {value}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, traceback)


sys.excepthook = _no_kvm_in_one_line


# ---- machine description -------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _total_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _kvm_flavour() -> str:
    try:
        from hlpool.kvm.system import system

        return system().info.flavour
    except Exception as exc:  # no /dev/kvm, no permission, ...: still describe the machine
        return f"unavailable ({type(exc).__name__}: {exc})"


def _hlpool_version() -> str:
    try:
        import hlpool

        return getattr(hlpool, "__version__", "unknown")
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    mem = _total_memory_bytes()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": mem,
        "memory_total_gib": round(mem / 2**30, 2) if mem else None,
        "kernel": platform.uname().release,
        "kvm_flavour": _kvm_flavour(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "hlpool_version": _hlpool_version(),
    }


# ---- statistics ------------------------------------------------------------------------

def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of already sorted values."""
    if not sorted_values:
        raise ValueError("no samples")
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] * (1.0 - frac) + sorted_values[hi] * frac


def percentiles(samples_ns: Iterable[int | float]) -> dict[str, float]:
    """p50, p90, p99, mean, min (and max, n) of samples given in ns, returned in microseconds."""
    values = sorted(samples_ns)
    if not values:
        raise ValueError("percentiles() needs at least one sample")
    us = 1e-3
    return {
        "n": len(values),
        "p50_us": _percentile(values, 50) * us,
        "p90_us": _percentile(values, 90) * us,
        "p99_us": _percentile(values, 99) * us,
        "mean_us": statistics.fmean(values) * us,
        "min_us": values[0] * us,
        "max_us": values[-1] * us,
    }


# ---- output ------------------------------------------------------------------------------

def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print an aligned plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def fmt(row: Sequence[str]) -> str:
        parts = []
        for i, c in enumerate(row):
            parts.append(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]))
        return "  ".join(parts).rstrip()

    line = "-" * len(fmt(list(headers)))
    print()
    print(title)
    print(line)
    print(fmt(list(headers)))
    print(line)
    for row in cells:
        print(fmt(row))
    print(line)


def file_create_us(directory: str | os.PathLike, samples: int = 30) -> float:
    """Median microseconds to create a file in ``directory`` (an unnamed ``O_TMPFILE``, as the
    snapshot store's writers do; closed unlinked, so nothing is left). On ext4 this moves from
    ~0.1 to ~2 ms for minutes after many files were deleted (ext4 skips recently freed inodes):
    benchmarks that create a file per tenant print it next to their figures."""
    times = []
    for _ in range(samples):
        t = time.perf_counter_ns()
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o444)
        times.append(time.perf_counter_ns() - t)
        os.close(fd)
    return statistics.median(times) / 1000


def utc_timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_results(name: str, data: Any) -> Path:
    """Write ``bench/results/<name>.json`` (machine info, UTC timestamp, data); returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc = {
        "benchmark": name,
        "timestamp_utc": utc_timestamp(),
        "machine": machine_info(),
        "argv": sys.argv,
        "data": data,
    }
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


# ---- progress --------------------------------------------------------------------------------

class Progress:
    """A one-line progress indicator on stderr, shown only when stderr is a TTY.

    >>> for i in progress(range(n), "noop"):
    ...     work()

    Redraws at most every 0.1 s, so it costs nothing measurable per
    iteration beyond one clock read and a compare.
    """

    def __init__(self, total: int | None, label: str = "", interval: float = 0.1) -> None:
        self.total = total
        self.label = label
        self.enabled = sys.stderr.isatty()
        self.interval = interval
        self.done = 0
        self._next = 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        self._draw()

    def _draw(self) -> None:
        if self.total:
            text = f"\r{self.label} {self.done}/{self.total} ({100 * self.done // self.total}%)"
        else:
            text = f"\r{self.label} {self.done}"
        sys.stderr.write(text + "\x1b[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(iterable: Iterable[T], label: str = "", total: int | None = None) -> Iterator[T]:
    """Yield from ``iterable`` while showing a progress indicator on a TTY stderr."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    bar = Progress(total, label)
    try:
        for item in iterable:
            yield item
            bar.update()
    finally:
        bar.close()


def status(message: str) -> None:
    """A short status line on stderr (always shown: it is not per-iteration)."""
    print(message, file=sys.stderr, flush=True)
