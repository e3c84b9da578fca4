"""WebAssembly peers of hlpool's benchmark guests, for wasmtime-py (PyPI ``wasmtime``).

- :func:`large_module_wat`: the density benchmark's large-image guest as a
  WebAssembly module: one linear memory whose data segment holds the same
  bytes as the hlpool guest's image data (``TABLE_MIB`` MiB pseudo-random
  table + ``DATA_MIB`` MiB writable data, from ``density.guest_data()``), and
  ``work(i, stride)`` computing exactly what the C guest's ``work`` computes
  (read word ``i % 512`` of every ``stride``-th table page, add ``i+1`` to
  that word of ``WRITE_PAGES`` pages of the data, return the wrapped sum), so
  the host checks the same expected values.
- :func:`small_module_wat`: ``noop()`` and ``echo(x: i64) -> i64``, the peer of
  the ``echo`` example guest for call latency.

wasmtime configuration (:func:`make_engine`): the library defaults, i.e. the
on-demand instance allocator (one mmap reservation per linear memory,
``memory_reservation`` 4 GiB + guard pages on 64-bit hosts; address space only)
and ``memory_init_cow`` on: a module's data segments become a copy-on-write
memory image that every instance maps, so instances share its pages until they
write them. The density benchmark serializes the compiled module to a file and
loads it with ``Module.deserialize_file``; wasmtime then maps the memory image
from that file (if its data is page-aligned there) or from a memfd it creates
once per process and module. :func:`image_backing` says which, from
/proc/self/maps.

wasmtime is imported lazily: these helpers are only called in processes that
use it (the density benchmark keeps wasmtime out of its parent process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PAGE = 4096
WASM_PAGE = 65536
WORDS_PER_PAGE = PAGE // 8

ENGINE_CONFIG = {
    "allocation_strategy": "on-demand (wasmtime default)",
    "memory_init_cow": True,
    "memory_reservation": "default (4 GiB + guard on 64-bit hosts; virtual only)",
    "cranelift_opt_level": "speed (default)",
}


def wasmtime_version() -> str:
    try:
        from importlib.metadata import version

        return version("wasmtime")
    except Exception:  # not installed
        return "unavailable"


def make_engine() -> Any:
    import wasmtime

    config = wasmtime.Config()
    config.memory_init_cow = True  # the default, set explicitly so the report is true by construction
    config.parallel_compilation = False  # no compiler threads (the benchmarks fork)
    return wasmtime.Engine(config)


def _escape(data: bytes) -> str:
    return "\\" + data.hex("\\") if data else ""


def large_module_wat(table: bytes, data: bytes, write_pages: int) -> str:
    """The WAT text of the large-image module (``table`` at address 0, ``data`` right after it)."""
    if len(table) % PAGE or len(data) % PAGE or not table or not data:
        raise ValueError("table and data must be whole, non-empty 4 KiB pages")
    table_pages = len(table) // PAGE
    data_pages = len(data) // PAGE
    if write_pages < 1 or data_pages < write_pages:
        raise ValueError("1 <= write_pages <= data pages")
    data_offset = len(table)
    step = (data_pages // write_pages) * PAGE
    memory_pages = (len(table) + len(data) + WASM_PAGE - 1) // WASM_PAGE + 1  # + 64 KiB spare
    return f"""(module
  (memory (export "memory") {memory_pages} {memory_pages})
  (func (export "noop"))
  (func (export "work") (param $i i64) (param $stride i64) (result i64)
    (local $w i32) (local $p i32) (local $k i32) (local $addr i32) (local $s i32) (local $sum i64) (local $v i64)
    (local.set $w (i32.mul (i32.wrap_i64 (i64.rem_u (local.get $i) (i64.const {WORDS_PER_PAGE}))) (i32.const 8)))
    (local.set $s (i32.wrap_i64 (local.get $stride)))
    (if (i32.lt_s (local.get $s) (i32.const 1)) (then unreachable))
    (block $read_done
      (loop $read
        (br_if $read_done (i32.ge_u (local.get $p) (i32.const {table_pages})))
        (local.set $sum (i64.add (local.get $sum)
          (i64.load (i32.add (i32.mul (local.get $p) (i32.const {PAGE})) (local.get $w)))))
        (local.set $p (i32.add (local.get $p) (local.get $s)))
        (br $read)))
    (block $write_done
      (loop $write
        (br_if $write_done (i32.ge_u (local.get $k) (i32.const {write_pages})))
        (local.set $addr (i32.add (i32.add (i32.const {data_offset}) (i32.mul (local.get $k) (i32.const {step})))
                                  (local.get $w)))
        (local.set $v (i64.add (i64.load (local.get $addr)) (i64.add (local.get $i) (i64.const 1))))
        (i64.store (local.get $addr) (local.get $v))
        (local.set $sum (i64.add (local.get $sum) (local.get $v)))
        (local.set $k (i32.add (local.get $k) (i32.const 1)))
        (br $write)))
    (local.get $sum))
  (data (i32.const 0) "{_escape(table)}")
  (data (i32.const {data_offset}) "{_escape(data)}")
)
"""


def small_module_wat() -> str:
    """``noop()`` and ``echo(x: i64) -> i64``, with one 64 KiB page of memory (like a minimal guest)."""
    return """(module
  (memory (export "memory") 1 1)
  (func (export "noop"))
  (func (export "echo") (param $x i64) (result i64) (local.get $x))
)
"""


def compile_to_file(wat: str, path: str | Path) -> dict[str, Any]:
    """Compile ``wat`` and write the serialized module to ``path``; returns sizes and timings."""
    import time

    import wasmtime

    engine = make_engine()
    t0 = time.perf_counter()
    module = wasmtime.Module(engine, wat)
    t1 = time.perf_counter()
    blob = module.serialize()
    Path(path).write_bytes(blob)
    return {"compile_s": t1 - t0, "serialized_bytes": len(blob), "wat_chars": len(wat)}


def image_backing(serialized_path: str | Path) -> dict[str, int]:
    """Mappings in this process that back wasm memory images: by the serialized file, by a memfd."""
    path = str(serialized_path)
    out = {"file": 0, "memfd": 0}
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.rstrip().endswith(path):
                out["file"] += 1
            elif "memfd:" in line and "wasm" in line.lower():
                out["memfd"] += 1
    return out
