"""The ``hlpool`` command line.

    hlpool guest build SRC.c [MORE.c ...] -o OUT.elf     compile a guest with the SDK
    hlpool guest examples                                 build the example guests, print their paths
    hlpool snapshot build GUEST.elf -o X.hlsnap           initialise a guest, persist its snapshot
    hlpool snapshot inspect X.hlsnap                      layers, regions, sizes, parents, files
    hlpool snapshot derive X.hlsnap --call FN '[ARGS]' -o Y.hlsnap   run calls, keep their state as a child
    hlpool snapshot ls|rm NAME|gc [--store DIR]            the snapshot store: list, delete, collect garbage
    hlpool run GUEST.elf|X.hlsnap FN [ARG_JSON ...]       call a guest function in this process
    hlpool demo                                           build the examples and call each one
    hlpool info                                           what this host's KVM offers
    hlpool serve [--guest NAME=PATH ...]                  the pool as an HTTP service
    hlpool call SNAPSHOT FN [ARG_JSON ...]                call a function on a running server

Errors print one line on stderr and exit with status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import asdict
from typing import Any, Sequence

from hlpool import defaults
from hlpool.errors import HlpoolError
from hlpool.guest.build import build_guest, cache_dir
from hlpool.guest.examples import EXAMPLE_HOST_FUNCTIONS, build_all, example_path
from hlpool.guest.interpreters import build_interpreters
from hlpool.guest.layout import MemoryConfig
from hlpool.kvm.system import system
from hlpool.sandbox import Sandbox
from hlpool.service.client import Client
from hlpool.service.config import ServerConfig
from hlpool.service.jsonvalues import from_json, to_json
from hlpool.service.schema import NAME_PATTERN, NAME_RULE
from hlpool.snapshot.describe import describe_snapshot
from hlpool.snapshot.snapshot import Snapshot
from hlpool.version import __version__

log = logging.getLogger("hlpool.cli")

_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]i?[bB]?|[bB])?\s*$")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """'16M', '512k', '1G', '4096' -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 4096, 512K, 16M, 1G)")
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _UNITS[unit]


def format_size(size: int) -> str:
    """4096 -> '4K', 16 << 20 -> '16M' (the largest unit that divides it)."""
    for unit in ("g", "m", "k"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit.upper()}"
    return str(size)


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word is taken as a string


# ---- commands --------------------------------------------------------------------------


def parse_guest_specs(specs: list[str]) -> dict[str, str]:
    """``--guest`` values ``["echo=/x/echo.elf", ...]`` -> {name: absolute path}; one-line errors."""
    guests: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise HlpoolError(f"--guest {spec!r}: expected NAME=PATH")
        if not NAME_PATTERN.match(name):
            raise HlpoolError(f"--guest {spec!r}: the name must be {NAME_RULE}")
        if name in guests:
            raise HlpoolError(f"--guest {name!r} is given twice")
        if not os.path.isfile(path):
            raise HlpoolError(f"--guest {name}: {path} is not a file")
        guests[name] = os.path.abspath(path)
    return guests


def cmd_guest_build(args: argparse.Namespace) -> int:
    out = build_guest(args.sources, args.output, include_dirs=args.include, defines=args.define,
                      optimize=args.optimize, cflags=args.cflag)
    print(out)
    return 0


def cmd_guest_examples(args: argparse.Namespace) -> int:
    for name, path in build_all().items():
        print(f"{name}\t{path}")
    return 0


def cmd_guest_interpreters(args: argparse.Namespace) -> int:
    for language, path in build_interpreters().items():
        print(f"{language}\t{path}")
    return 0


def _config(args: argparse.Namespace) -> MemoryConfig:
    values = {k: getattr(args, k) for k in ("heap_size", "stack_size", "in_size", "out_size")
              if getattr(args, k, None) is not None}
    return MemoryConfig(**values)


def cmd_snapshot_build(args: argparse.Namespace) -> int:
    snap = Snapshot.from_elf(args.guest, config=_config(args))
    persisted = snap.persist(args.output)
    print(f"{persisted.path}: {len(persisted.exports or ())} exports, "
          f"{persisted.stored_bytes()} bytes of pages")
    return 0


def cmd_snapshot_inspect(args: argparse.Namespace) -> int:
    snap = Snapshot.open(args.snapshot)
    info = describe_snapshot(snap)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"snapshot   {info['path']}")
    print(f"exports    {', '.join(info['exports']) or '-'}")
    print(f"memory     {info['memory']['guest_bytes']} bytes (heap {info['memory']['heap']}, "
          f"stack {info['memory']['stack']}, image {info['memory']['image']})")
    print("layers")
    for layer in info["layers"]:
        print(f"  [{layer['index']}] {layer['bytes']:>12} bytes  {layer['sha256'][:16]}  {layer['file']}")
    if info["parent_chain"]:
        print("parents    " + " <- ".join(info["parent_chain"]))
    if info["mapped_files"]:
        print("files")
        for f in info["mapped_files"]:
            print(f"  {f['address']:>14} {f['size']:>12} bytes  {f['path']}")
    print("regions")
    for r in info["regions"]:
        where = f"layer {r['layer']}" if r["layer"] is not None else r["backing"]
        print(f"  {r['address']:>14} {r['size']:>12}  {r['perms']:<4} {r['area']:<16} {where}")
    return 0


def _store(args: argparse.Namespace) -> Any:
    from hlpool.pool.store import SnapshotStore

    directory = args.store or os.path.join(cache_dir(), "snapshots")
    if not os.path.isdir(directory):
        raise HlpoolError(f"--store {directory}: not a directory")
    return SnapshotStore(directory)


def cmd_snapshot_ls(args: argparse.Namespace) -> int:
    store = _store(args)
    files = store.files()
    rows = []
    for path, st in sorted(files.items(), key=lambda item: item[1].st_mtime):
        parents = [os.path.basename(p) for p in store.parents_of(path, st)]
        children = [os.path.basename(c) for c in store.children_of(path)]
        rows.append({"name": os.path.basename(path)[:-len(".hlsnap")], "path": path, "bytes": st.st_size,
                     "parents": parents, "children": children, "modified": st.st_mtime})
    if args.json:
        print(json.dumps({**store.describe(), "snapshots": rows}, indent=2))
        return 0
    for row in rows:
        parent = f"  <- {', '.join(row['parents'])}" if row["parents"] else ""
        print(f"{row['name']}  {row['bytes']:>12} bytes  {len(row['children'])} child(ren){parent}")
    print(f"{len(rows)} snapshot(s), {sum(r['bytes'] for r in rows)} bytes in {store.directory}")
    return 0


def cmd_snapshot_rm(args: argparse.Namespace) -> int:
    store = _store(args)
    for target in args.targets:
        path = target if os.sep in target or target.endswith(".hlsnap") else store.path_for(target)
        path = os.path.abspath(path)
        if not store.contains(path) or not os.path.isfile(path):
            raise HlpoolError(f"{target}: not a snapshot file of the store {store.directory}")
        children = store.children_of(path)
        if children:
            raise HlpoolError(f"{target}: {len(children)} layered snapshot(s) name it as their parent "
                              f"({', '.join(os.path.basename(c) for c in children[:3])}); remove them first")
        if not store.remove(path):
            raise HlpoolError(f"{target}: in use by another process (a pool or server holds it); not removed")
        print(f"removed {path}")
    return 0


def cmd_snapshot_gc(args: argparse.Namespace) -> int:
    store = _store(args)
    for path in store.collect():
        print(f"removed {path}")
    info = store.describe()
    print(f"{info['files']} snapshot(s), {info['bytes']} bytes left in {store.directory}")
    return 0


def _parse_call(values: list[str]) -> tuple[str, list]:
    if len(values) > 2:
        raise HlpoolError(f"--call {' '.join(values)}: expected FN [ARGS_JSON] (the arguments as one JSON array)")
    args = json.loads(values[1]) if len(values) == 2 else []
    if not isinstance(args, list):
        raise HlpoolError(f"--call {values[0]}: ARGS_JSON must be a JSON array, got {values[1]!r}")
    return values[0], [from_json(a) for a in args]


def cmd_snapshot_derive(args: argparse.Namespace) -> int:
    from hlpool.pool.builder import retain_decisions

    try:
        calls = [_parse_call(c) for c in args.call]
    except json.JSONDecodeError as exc:
        raise HlpoolError(f"--call: ARGS_JSON is not JSON: {exc}") from None
    base = Snapshot.open(args.base)
    decisions = retain_decisions(base, args.retain or None)
    retain = (lambda r: decisions.get((r.guest_address, r.size, r.area))) if decisions else None
    with Sandbox(base, timeout=args.timeout) as sb:
        for path in args.map_file:
            sb.map_file(path)
        for fn, call_args in calls:
            sb.call(fn, *call_args, restore=False)
        child = sb.snapshot(retain=retain)
    persisted = child.persist(args.output)
    print(f"{persisted.path}: {persisted.stored_bytes()} bytes of pages on {base.path}")
    return 0


def _open_any(path: str) -> Snapshot:
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"HLSNAP"):
        return Snapshot.open(path)
    return Snapshot.from_elf(path)


def cmd_run(args: argparse.Namespace) -> int:
    call_args = [from_json(_json_arg(a)) for a in args.args]
    with Sandbox(_open_any(args.file), timeout=args.timeout) as sb:
        result = sb.call(args.function, *call_args)
    print(json.dumps(to_json(result), allow_nan=False))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    def show(label: str, fn) -> None:
        start = time.perf_counter()
        try:
            result = fn()
            outcome = repr(result)
        except HlpoolError as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        print(f"  {label:<34} {(time.perf_counter() - start) * 1e6:9.0f} us  {outcome[:110]}")

    print(f"hlpool {__version__} demo: example guests in KVM sandboxes")
    for name in ("echo", "add", "fib", "sha256", "hostcall", "touch", "faults"):
        path = example_path(name)
        snap = Snapshot.from_elf(path)
        with Sandbox(snap, host_functions=EXAMPLE_HOST_FUNCTIONS, timeout=1.0) as sb:
            print(f"{name}: {', '.join(sb.exports)}")
            if name == "echo":
                show("echo('hi')", lambda: sb.call("echo", "hi"))
                show("echo([1, 2.5, b'x', {'k': None}])", lambda: sb.call("echo", [1, 2.5, b"x", {"k": None}]))
            elif name == "add":
                show("add(2, 3)", lambda: sb.call("add", 2, 3))
                show("add(1, 'x')", lambda: sb.call("add", 1, "x"))
            elif name == "fib":
                show("fib(90)", lambda: sb.call("fib", 90))
            elif name == "sha256":
                data = os.urandom(1 << 16)
                show("sha256(64 KiB) == hashlib", lambda: sb.call("sha256", data) == hashlib.sha256(data).hexdigest())
            elif name == "hostcall":
                show("greet('world')", lambda: sb.call("greet", "world"))
                show("total(100) via 100 host calls", lambda: sb.call("total", 100))
            elif name == "touch":
                show("touch(64) twice (restored)", lambda: (sb.call("touch", 64), sb.call("touch", 64)))
            elif name == "faults":
                for fn in ("null_deref", "divide_by_zero", "stack_overflow"):
                    show(fn, lambda fn=fn: sb.call(fn))
                show("infinite_loop (timeout 1 s)", lambda: sb.call("infinite_loop"))
                show("after all that: fail('still alive')", lambda: sb.call("fail", "still alive"))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = asdict(system().info)
    info["tsc_khz"] = system().tsc_khz
    print(json.dumps(info, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # aiohttp takes ~0.2 s to import: only `hlpool serve` pays for it
    from hlpool.service.frontends import run_server as serve

    logging.getLogger("hlpool").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:
        logging.getLogger("hlpool.snapshot").setLevel(logging.WARNING)  # one line per guest is enough
    config = ServerConfig(workers=args.workers, host=args.host, port=args.port, snapshot_dir=args.snapshot_dir,
                          guests=parse_guest_specs(args.guest), token=args.token or None, insecure=args.insecure,
                          max_body=args.max_body, call_timeout=args.call_timeout, grace=args.grace,
                          max_pending=args.max_pending, access_log=args.access_log, fast_lane=not args.no_fast_lane,
                          allow_dirs=[os.path.abspath(d) for d in args.allow_dir],
                          header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                          build_timeout=args.build_timeout, build_memory=args.build_memory,
                          max_guest_memory=args.max_guest_memory, store_quota=args.store_quota)
    config.frontends = args.frontends
    if args.ray:  # one process fronting the Ray cluster's nodes (each node runs its own workers)
        from hlpool.service.serve import serve as serve_ray

        return serve_ray(config, ray_address=args.ray)
    return serve(config)


def cmd_call(args: argparse.Namespace) -> int:
    call_args = [from_json(_json_arg(a)) for a in args.args]
    client = Client(args.url, token=args.token)
    result = client.call(args.snapshot, args.function, *call_args, timeout=args.timeout)
    print(json.dumps(to_json(result), allow_nan=False))
    return 0


# ---- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hlpool", description="Micro-VM sandbox pool on KVM.")
    parser.add_argument("--version", action="version", version=f"hlpool {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    guest = sub.add_parser("guest", help="build guests").add_subparsers(dest="guest_command", required=True)
    b = guest.add_parser("build", help="compile C sources into a guest ELF",
                         description="Compile C (or assembly) sources with the hlpool SDK into a static-PIE "
                                     "guest linked against musl. Define hl_main() instead of main().")
    b.add_argument("sources", nargs="+", help="C or assembly source files")
    b.add_argument("-o", "--output", required=True, help="the guest ELF to write")
    b.add_argument("-I", dest="include", action="append", default=[], help="add an include directory")
    b.add_argument("-D", dest="define", action="append", default=[], help="define a macro (NAME or NAME=VALUE)")
    b.add_argument("-O", dest="optimize", default="2", help="optimisation level: 0, 1, 2, 3, s, g (default 2)")
    b.add_argument("--cflag", action="append", default=[], help="extra compiler flag (repeatable)")
    b.set_defaults(func=cmd_guest_build)
    e = guest.add_parser("examples", help="build the example guests and print their paths")
    e.set_defaults(func=cmd_guest_examples)
    gi = guest.add_parser("interpreters", help="build the JavaScript (QuickJS) and Lua guests, print their paths",
                          description="Fetch the pinned upstream sources (the PyPI sdists of quickjs and lupa, "
                                      "sha256-checked) into the cache and build the js and lua interpreter guests.")
    gi.set_defaults(func=cmd_guest_interpreters)

    snap = sub.add_parser("snapshot", help="build and inspect snapshot files").add_subparsers(
        dest="snapshot_command", required=True)
    sb = snap.add_parser("build", help="initialise a guest ELF and persist its snapshot",
                         description="Load and relocate GUEST.elf, run its hl_main() once in a VM, and write "
                                     "the initialised state as an immutable snapshot file.")
    sb.add_argument("guest", help="guest ELF")
    sb.add_argument("-o", "--output", required=True, help="snapshot file to write (.hlsnap)")
    for flag, dest in (("--heap-size", "heap_size"), ("--stack-size", "stack_size"), ("--in-size", "in_size"),
                       ("--out-size", "out_size")):
        sb.add_argument(flag, dest=dest, type=parse_size, help="bytes (K/M/G suffixes allowed)")
    sb.set_defaults(func=cmd_snapshot_build)
    si = snap.add_parser("inspect", help="show a snapshot's layers, regions, sizes, parents and files")
    si.add_argument("snapshot", help="snapshot file")
    si.add_argument("--json", action="store_true", help="print JSON")
    si.set_defaults(func=cmd_snapshot_inspect)
    store_help = "the snapshot store directory (default ~/.cache/hlpool/snapshots, the pool's and the server's)"
    sl = snap.add_parser("ls", help="list the snapshot store's files: sizes, parents, children")
    sl.add_argument("--store", help=store_help)
    sl.add_argument("--json", action="store_true", help="print JSON")
    sl.set_defaults(func=cmd_snapshot_ls)
    sr = snap.add_parser("rm", help="delete snapshot files from the store (refused while children or another "
                                    "process need them)")
    sr.add_argument("targets", nargs="+", metavar="NAME|PATH", help="a store name (hash) or a store file's path")
    sr.add_argument("--store", help=store_help)
    sr.set_defaults(func=cmd_snapshot_rm)
    sg = snap.add_parser("gc", help="delete the store files no process and no layered child needs")
    sg.add_argument("--store", help=store_help)
    sg.set_defaults(func=cmd_snapshot_gc)
    sd = snap.add_parser("derive", help="run calls keeping their state and persist the result as a child layer",
                         description="Open BASE (a .hlsnap), map --map-file files read-only, run each --call with "
                                     "its state kept, and write the result as a layered snapshot naming BASE as "
                                     "its parent; every call into it starts from that state.")
    sd.add_argument("base", help="the parent snapshot file (.hlsnap)")
    sd.add_argument("--call", nargs="+", action="append", default=[], metavar=("FN", "ARGS_JSON"),
                    help="a call to run: FN and its arguments as one JSON array (repeatable, run in order)")
    sd.add_argument("--map-file", action="append", default=[], metavar="PATH", help="map a host file read-only "
                                                                                    "(repeatable)")
    sd.add_argument("--retain", action="append", default=[], metavar="AREA",
                    help="a layout area (heap, image, stack...) whose bytes the child keeps from BASE (repeatable)")
    sd.add_argument("--timeout", type=float, default=defaults.CALL_TIMEOUT, help="seconds per call "
                                                                                 "(default %(default)g)")
    sd.add_argument("-o", "--output", required=True, help="the child snapshot file to write (.hlsnap)")
    sd.set_defaults(func=cmd_snapshot_derive)

    r = sub.add_parser("run", help="call a guest function in this process",
                       description="Call FN in a sandbox made from a guest ELF or snapshot file. Arguments are "
                                   "JSON values (a bare word is a string; {\"base64\": ...} is bytes).")
    r.add_argument("file", help="guest ELF or .hlsnap snapshot")
    r.add_argument("function", help="exported function name")
    r.add_argument("args", nargs="*", help="arguments as JSON")
    r.add_argument("--timeout", type=float, default=defaults.CALL_TIMEOUT, help="seconds (default %(default)g)")
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="build the example guests and call each of them")
    d.set_defaults(func=cmd_demo)
    i = sub.add_parser("info", help="show what this host's KVM offers")
    i.set_defaults(func=cmd_info)

    sv = sub.add_parser(
        "serve", help="run the sandbox pool as an HTTP service",
        description="Start the pool's supervisor and worker processes and serve a JSON HTTP API: list and "
                    "register snapshots, call their functions (POST /v1/snapshots/NAME/calls/FN with "
                    "{\"args\": [...]}), /healthz, /readyz, Prometheus /metrics and an OpenAPI description at "
                    "/openapi.json. Without --guest the example guests are built and served under their names. "
                    "SIGTERM or Ctrl-C stops accepting, lets calls in flight finish within --grace seconds, "
                    "and exits.")
    sv.add_argument("--workers", type=int, default=ServerConfig.workers, help="worker processes (default %(default)s)")
    sv.add_argument("--frontends", type=int, metavar="K",
                    help="HTTP front-end processes sharing the port (SO_REUSEPORT), each with its own share of "
                         "the workers and all serving the same snapshots (default: half the CPUs, at least 1, "
                         "at most --workers; 1: a single process as before)")
    sv.add_argument("--ray", metavar="ADDRESS",
                    help="front a Ray cluster (ADDRESS: 'auto' or HOST:PORT of its head): one pool of --workers "
                         "workers on every node, snapshots shipped to the nodes by content hash (pip install "
                         "'hlpool[ray]'; see docs/ray.md)")
    sv.add_argument("--host", default=defaults.HOST,
                    help="address to listen on (default %(default)s; others need --token or --insecure)")
    sv.add_argument("--port", type=int, default=defaults.PORT, help="port (default %(default)s; 0 picks a free one)")
    sv.add_argument("--snapshot-dir", help="where snapshots built from ELF files are stored "
                                           "(default ~/.cache/hlpool/snapshots)")
    sv.add_argument("--guest", action="append", default=[], metavar="NAME=PATH",
                    help="serve this guest ELF or .hlsnap as NAME (repeatable; default: the example guests)")
    sv.add_argument("--token", default=os.environ.get("HLPOOL_TOKEN"),
                    help="require 'Authorization: Bearer TOKEN' on every route but /healthz "
                         "(default $HLPOOL_TOKEN; prefer it: other users can see command lines)")
    sv.add_argument("--insecure", action="store_true",
                    help="allow listening on a non-loopback address without a token")
    sv.add_argument("--max-body", type=parse_size, default=defaults.MAX_BODY,
                    help=f"request body limit (default {format_size(defaults.MAX_BODY)})")
    sv.add_argument("--call-timeout", type=float, default=defaults.CALL_TIMEOUT,
                    help="seconds a call may run: the default and the maximum a request may ask for "
                         "(default %(default)g)")
    sv.add_argument("--grace", type=float, default=defaults.SHUTDOWN_GRACE,
                    help="seconds calls in flight get to finish on shutdown (default %(default)g)")
    sv.add_argument("--max-pending", type=int, default=defaults.MAX_PENDING,
                    help="calls queued or running before the server answers 429 overloaded (default %(default)s)")
    sv.add_argument("--access-log", action="store_true", help="log every request (every request then goes "
                                                                     "through aiohttp: no fast lane)")
    sv.add_argument("--no-fast-lane", action="store_true",
                    help="answer calls through aiohttp too (by default a lean HTTP/1.1 reader answers the plain "
                         "form of POST /v1/snapshots/NAME/calls/FN itself: docs/frontends.md)")
    sv.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                    help="let requests register guest ELF or .hlsnap files under DIR by path (repeatable; "
                         "default: none, registration by path is off)")
    sv.add_argument("--header-timeout", type=float, default=defaults.HEADER_TIMEOUT,
                    help="seconds a client gets to send a request's headers; also how long an idle connection "
                         "stays open (default %(default)g)")
    sv.add_argument("--body-timeout", type=float, default=defaults.BODY_TIMEOUT,
                    help="seconds a client gets to send a request's body (default %(default)g)")
    sv.add_argument("--build-timeout", type=float, metavar="S", default=defaults.BUILD_TIMEOUT,
                    help="seconds one snapshot build (hl_main, a script's loading) may take (default %(default)g)")
    sv.add_argument("--build-memory", type=parse_size, metavar="BYTES", default=defaults.BUILD_MEMORY,
                    help=f"memory a snapshot builder process may use (default {format_size(defaults.BUILD_MEMORY)})")
    sv.add_argument("--max-guest-memory", type=parse_size, metavar="BYTES", default=defaults.MAX_GUEST_MEMORY,
                    help=f"largest guest memory (configuration and image) a snapshot may have "
                         f"(default {format_size(defaults.MAX_GUEST_MEMORY)})")
    sv.add_argument("--store-quota", type=parse_size, metavar="BYTES", default=defaults.STORE_QUOTA,
                    help=f"bytes the snapshot store's files may take; unreferenced snapshots are collected first "
                         f"(default {format_size(defaults.STORE_QUOTA)})")
    sv.set_defaults(func=cmd_serve)

    c = sub.add_parser(
        "call", help="call a guest function on a running hlpool server",
        description="Call FN of the snapshot SNAPSHOT on an `hlpool serve` server and print the result as JSON. "
                    "Arguments are JSON values (a bare word is a string; {\"base64\": ...} is bytes). "
                    "Errors print 'hlpool: error: CODE: MESSAGE' and exit with status 1.")
    c.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot name (see GET /v1/snapshots)")
    c.add_argument("function", metavar="FN", help="exported function name")
    c.add_argument("args", metavar="ARGS_JSON", nargs="*", help="arguments as JSON")
    c.add_argument("--url", default=os.environ.get("HLPOOL_URL", defaults.URL),
                   help=f"server URL (default $HLPOOL_URL or {defaults.URL})")
    c.add_argument("--token", default=os.environ.get("HLPOOL_TOKEN"), help="bearer token (default $HLPOOL_TOKEN)")
    c.add_argument("--timeout", type=float, help="seconds the call may run (default: the server's maximum)")
    c.set_defaults(func=cmd_call)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except HlpoolError as exc:
        print(f"hlpool: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `hlpool snapshot inspect X | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
