"""``hlpool guest build``: compile C (or freestanding C++) sources into a guest ELF with the SDK.

Guests are static PIEs linked against musl (Debian: musl-dev) and the hlpool
runtime, with the SDK's linker script. The runtime's objects are compiled
once per SDK version and compiler and cached.

C++ sources (.cpp, .cc, .cxx, .C) are compiled with g++ as freestanding C++:
no exceptions, no RTTI and no C++ standard library (Debian ships libstdc++
only for glibc). The runtime supplies operator new/delete, pure-virtual and
local-static guard support (sdk/runtime/cxx.c); see README.md, "C++ guests".
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

from hlpool.errors import GuestBuildError
from hlpool.guest.abi import SDK_DIR

MUSL_DIR = Path(os.environ.get("HLPOOL_MUSL_DIR", "/usr/lib/x86_64-linux-musl"))
MUSL_INCLUDE = Path(os.environ.get("HLPOOL_MUSL_INCLUDE", "/usr/include/x86_64-linux-musl"))
RUNTIME_SOURCES = ("entry.S", "runtime.c", "syscalls.c", "heap.c", "support.c", "msgpack.c", "cxx.c")
CXX_SUFFIXES = (".cpp", ".cc", ".cxx", ".C")
#: What C++ sources are compiled with, on top of BASE_CFLAGS (which keep out every system and C++ header but
#: musl's and the SDK's): there is no C++ runtime for musl to throw exceptions or look up type information with.
CXX_FLAGS = ("-fno-exceptions", "-fno-rtti")
LINKER_SCRIPT = SDK_DIR / "guest.ld"

BASE_CFLAGS = (
    "-fPIE", "-fno-plt", "-ffunction-sections", "-fdata-sections", "-fno-asynchronous-unwind-tables",
    "-nostdinc", "-isystem", str(MUSL_INCLUDE), "-isystem", str(SDK_DIR / "include"),
)


def cache_dir() -> Path:
    """Where hlpool caches built objects and guests (``$HLPOOL_CACHE_DIR``, else ~/.cache/hlpool)."""
    base = os.environ.get("HLPOOL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hlpool")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_cxx(cxx: str) -> None:
    if shutil.which(cxx) is None:
        raise GuestBuildError(f"C++ compiler {cxx!r} not found: C++ guests need it "
                              "(Debian/Ubuntu: apt-get install g++)")


def _check_toolchain(cc: str) -> None:
    if shutil.which(cc) is None:
        raise GuestBuildError(f"C compiler {cc!r} not found (install gcc)")
    if not (MUSL_DIR / "libc.a").exists() or not (MUSL_INCLUDE / "stdio.h").exists():
        raise GuestBuildError(f"musl not found in {MUSL_DIR} / {MUSL_INCLUDE}: install it "
                              "(Debian/Ubuntu: apt-get install musl-dev)")


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()
        raise GuestBuildError(f"{what} failed:\n{output}\n(command: {' '.join(cmd)})")


@functools.lru_cache(maxsize=None)
def sdk_fingerprint(cc: str = "gcc") -> str:
    """A hash of the SDK sources, headers, linker script and compiler version."""
    digest = hashlib.sha256()
    for path in sorted((SDK_DIR / "runtime").iterdir()) + sorted((SDK_DIR / "include").iterdir()) + [LINKER_SCRIPT]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    digest.update(version.encode())
    digest.update(" ".join(BASE_CFLAGS).encode())
    digest.update(" ".join(RUNTIME_SOURCES).encode())  # a build with another list of objects is another runtime
    return digest.hexdigest()[:16]


def runtime_objects(cc: str = "gcc") -> list[Path]:
    """Compile (or reuse) the runtime's objects."""
    _check_toolchain(cc)
    out = cache_dir() / f"runtime-{sdk_fingerprint(cc)}"
    objects = [out / (Path(src).stem + ".o") for src in RUNTIME_SOURCES]
    if all(o.exists() for o in objects):
        return objects
    tmp = Path(tempfile.mkdtemp(prefix="runtime-", dir=cache_dir()))
    try:
        for src, obj in zip(RUNTIME_SOURCES, objects):
            _run([cc, *BASE_CFLAGS, "-O2", "-Wall", "-Wextra", "-c", str(SDK_DIR / "runtime" / src),
                  "-o", str(tmp / obj.name)], f"compiling the runtime ({src})")
        try:
            tmp.rename(out)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return objects


def build_guest(
    sources: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    include_dirs: Sequence[str | os.PathLike] = (),
    defines: Sequence[str] = (),
    optimize: str = "2",
    cflags: Sequence[str] = (),
    cc: str = "gcc",
    cxx: str = "g++",
) -> Path:
    """Compile ``sources`` (C, freestanding C++ or assembly) into the guest ELF ``output``; returns its path.

    ``defines`` are ``NAME`` or ``NAME=VALUE``; ``optimize`` is the -O level
    (0, 1, 2, 3, s); ``cflags`` are passed through to the compiler. Sources
    ending in .cpp/.cc/.cxx/.C are compiled with ``cxx`` and CXX_FLAGS.
    """
    if not sources:
        raise GuestBuildError("no source files given")
    for src in sources:
        if not Path(src).is_file():
            raise GuestBuildError(f"source file {src} does not exist")
    if optimize not in ("0", "1", "2", "3", "s", "g"):
        raise GuestBuildError(f"invalid optimisation level {optimize!r} (use 0, 1, 2, 3, s or g)")
    runtime = runtime_objects(cc)
    if any(Path(src).suffix in CXX_SUFFIXES for src in sources):
        _check_cxx(cxx)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    libgcc = subprocess.run([cc, "-print-libgcc-file-name"], capture_output=True, text=True).stdout.strip()
    flags = [*BASE_CFLAGS, f"-O{optimize}", *cflags]
    flags += [f"-I{d}" for d in include_dirs]
    flags += [f"-D{d}" for d in defines]
    with tempfile.TemporaryDirectory(prefix="hlpool-build-") as tmp:
        objects = []
        for i, src in enumerate(sources):
            obj = Path(tmp) / f"{i}-{Path(src).stem}.o"
            if Path(src).suffix in CXX_SUFFIXES:
                _run([cxx, *flags, *CXX_FLAGS, "-c", str(src), "-o", str(obj)], f"compiling {src}")
            else:
                _run([cc, *flags, "-c", str(src), "-o", str(obj)], f"compiling {src}")
            objects.append(str(obj))
        linked = Path(tmp) / "guest.elf"
        _run([cc, "-static-pie", "-nostdlib", "-nostartfiles", f"-Wl,-T,{LINKER_SCRIPT}", "-Wl,-z,norelro",
              "-Wl,--build-id=none", "-Wl,-z,noexecstack", "-Wl,--gc-sections", "-Wl,--no-undefined",
              "-o", str(linked), *objects, *map(str, runtime),
              str(MUSL_DIR / "libc.a"), libgcc], "linking")
        tmp_out = output.with_name(f".{output.name}.tmp-{os.getpid()}")
        shutil.copyfile(linked, tmp_out)
        os.chmod(tmp_out, 0o755)
        os.replace(tmp_out, output)
    return output
