"""The example guests shipped with hlpool (sources in ``hlpool/guest/programs``), built on demand.

``example_path("echo")`` returns a built ELF, compiling it into the cache
the first time (or when its source or the SDK changed). The host functions
the examples call are :data:`EXAMPLE_HOST_FUNCTIONS`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from hlpool.guest.build import build_guest, cache_dir, sdk_fingerprint

PROGRAMS_DIR = Path(__file__).resolve().parent / "programs"
EXAMPLES = ("echo", "add", "fib", "sha256", "hostcall", "faults", "touch")


# ---- host functions the example guests call (hostcall.c) --------------------------------------


def _prefix() -> str:
    return "Hello"


def _value(i: int) -> int:
    return i * i


#: Host functions for the example guests: ``greet`` calls ``prefix()``, ``total(n)`` calls ``value(i)``.
#: Module-level functions (not lambdas), so a Pool can hand them to its worker processes.
EXAMPLE_HOST_FUNCTIONS = {"prefix": _prefix, "value": _value}


def example_source(name: str) -> Path:
    if name not in EXAMPLES:
        raise KeyError(f"no example guest {name!r}; available: {', '.join(EXAMPLES)}")
    return PROGRAMS_DIR / f"{name}.c"


def example_path(name: str) -> Path:
    """Path of the built example guest ``name`` (built now if needed)."""
    source = example_source(name)
    digest = hashlib.sha256(sdk_fingerprint().encode())
    for header in sorted(PROGRAMS_DIR.glob("*.h")):
        digest.update(header.read_bytes())
    digest.update(source.read_bytes())
    out = cache_dir() / "guests" / f"{name}-{digest.hexdigest()[:12]}.elf"
    if not out.exists():
        build_guest([source], out, include_dirs=[PROGRAMS_DIR])
    return out


def build_all() -> dict[str, Path]:
    """Build every example guest; returns name -> path."""
    return {name: example_path(name) for name in EXAMPLES}
