"""Script snapshots: a script loaded into an interpreter guest, as a layer on its base.

The interpreter guests (QuickJS, Lua) are built by :mod:`hlpool.guest.interpreters`.
Here the base snapshot of each (the interpreter initialised once, cached per
process and memory configuration, optionally persisted) and the layered
snapshot of a loaded script, which holds only the pages the script changed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Mapping

from hlpool.defaults import INIT_TIMEOUT
from hlpool.errors import HlpoolError, SnapshotError
from hlpool.guest.build import cache_dir
from hlpool.guest.interpreters import DEFAULT_CONFIG, SOURCES, check_language, interpreter_path
from hlpool.guest.layout import MemoryConfig
from hlpool.sandbox.sandbox import HostFunction, Sandbox
from hlpool.snapshot.snapshot import Snapshot

log = logging.getLogger(__name__)

DEFAULT_LOAD_TIMEOUT = INIT_TIMEOUT

_bases: dict[tuple, "Snapshot"] = {}
_bases_lock = threading.Lock()
EXPORTS = ("eval", "load", "call")


def _config_key(config: MemoryConfig) -> str:
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def base_snapshot(language: str, *, config: MemoryConfig | None = None,
                  host_functions: Mapping[str, HostFunction] | None = None) -> Snapshot:
    """The interpreter for ``language`` initialised (runtime, context, libraries), as an
    in-memory snapshot. Cached per process and memory configuration.

    ``config`` defaults to :data:`DEFAULT_CONFIG` (64 MiB heap: the interpreter's
    memory limit is 3/4 of it). ``host_functions`` are only available while the
    interpreter initialises (it calls none; scripts get theirs per sandbox).

    To persist scripts' layers, persist the base first and load the scripts
    into the persisted base (``base_snapshot("js").persist(path)``, or
    :func:`persisted_base_snapshot`).
    """
    check_language(language)
    config = config or DEFAULT_CONFIG
    path = interpreter_path(language)
    key = (language, str(path), config, os.getpid())
    with _bases_lock:
        snap = _bases.get(key)
        if snap is None:
            snap = Snapshot.from_elf(path, config=config, host_functions=host_functions)
            spec = SOURCES[language]
            snap.info.update({"interpreter": language, "interpreter_source": f"{spec.name}=={spec.version}"})
            _bases[key] = snap
    return snap


def persisted_base_snapshot(language: str, directory: str | os.PathLike | None = None, *,
                            config: MemoryConfig | None = None) -> Snapshot:
    """The base snapshot of ``language`` as a file in ``directory`` (default: the cache's
    ``snapshots`` directory), written once per interpreter build and memory
    configuration and opened (validated) afterwards. Scripts loaded into it can be
    persisted, and every process that opens it shares its pages."""

    check_language(language)
    config = config or DEFAULT_CONFIG
    directory = Path(directory) if directory is not None else cache_dir() / "snapshots"
    directory.mkdir(parents=True, exist_ok=True)
    elf = interpreter_path(language)
    path = directory / f"{elf.stem}-{_config_key(config)}.hlsnap"
    with open(directory / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            try:
                return Snapshot.open(path)
            except SnapshotError as exc:
                log.warning("rebuilding the %s base snapshot %s: %s", language, path, exc)
                path.unlink()
        return base_snapshot(language, config=config).persist(path)


def load_script(base: Snapshot, source: str, *, host_functions: Mapping[str, HostFunction] | None = None,
                timeout: float | None = DEFAULT_LOAD_TIMEOUT) -> Snapshot:
    """Load ``source`` into a sandbox of the interpreter snapshot ``base`` and return a
    layered snapshot of the result: its own layer holds only the pages the script
    changed; everything else (the interpreter's code, its untouched heap) stays a
    reference to ``base``'s layers.

    Every call into the returned snapshot starts from the loaded script
    (``Sandbox(snap).call("call", "fn", [args])``). The snapshot is in memory;
    ``.persist(path)`` it if ``base`` is persisted (parents first). Errors in the
    script (syntax error, exception while loading) raise :class:`GuestError` with
    the interpreter's message; ``host_functions`` are those the script may call
    while it loads; ``timeout`` bounds the load (:class:`GuestTimeout`).
    """
    if not isinstance(base, Snapshot):
        raise TypeError(f"load_script needs a Snapshot, not {type(base).__name__}")
    if not isinstance(source, str):
        raise TypeError(f"the script must be a str, not {type(source).__name__}")
    if not set(EXPORTS) <= set(base.exports or ()):
        raise HlpoolError(f"{base!r} is not an interpreter snapshot (it exports {list(base.exports or ())}, "
                          f"not {list(EXPORTS)})")
    language = base.info.get("interpreter", "script")
    with Sandbox(base, host_functions=host_functions, timeout=timeout, name=f"load:{language}") as sb:
        sb.call("load", source, restore=False)
        child = sb.snapshot()
    child.info["script_sha256"] = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
    return child


def script_snapshot(language: str, source: str, *, directory: str | os.PathLike | None = None,
                    config: MemoryConfig | None = None,
                    host_functions: Mapping[str, HostFunction] | None = None,
                    timeout: float | None = DEFAULT_LOAD_TIMEOUT) -> Snapshot:
    """:func:`load_script` on the persisted base of ``language``; if ``directory`` is
    given, the script's layer is persisted there too (named by its content hash)."""
    base = persisted_base_snapshot(language, directory, config=config)
    child = load_script(base, source, host_functions=host_functions, timeout=timeout)
    if directory is None:
        return child
    name = hashlib.sha256(child.layers[-1].sha256 + child.vcpu.regs).hexdigest()[:32]
    path = Path(directory) / f"script-{name}.hlsnap"
    if path.exists():
        try:
            return Snapshot.open(path)
        except HlpoolError:
            path.unlink()
    return child.persist(path)
