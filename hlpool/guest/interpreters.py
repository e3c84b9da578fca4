"""JavaScript (QuickJS) and Lua 5.4 guests, and functions-as-a-service on layered snapshots.

The interpreters are built from upstream sources fetched from PyPI at build
time (never committed): the sdist of ``quickjs`` carries QuickJS in
``upstream-quickjs/``, the sdist of ``lupa`` carries Lua 5.4 in
``third-party/lua54/`` (both MIT). Versions and sdist hashes are pinned in
:data:`SOURCES`; every fetch is checked against the hash. The glue that turns
an interpreter into an hlpool guest is in ``hlpool/guest/programs/js`` and
``hlpool/guest/programs/lua``.

Both guests export the same three functions:

``eval(source) -> value``
    Evaluate ``source`` and return its value (JS: the completion value of the
    script; Lua: the first value of ``return <source>`` if that compiles,
    else of the chunk ``source``).
``load(source) -> None``
    Run ``source`` as a script in the global scope, to define functions and
    state.
``call(name, args=[]) -> value``
    Call the global function ``name`` (``"a.b"`` walks tables / properties;
    ``this`` is ``a`` in JS) with the items of the list ``args``.

Script errors (syntax errors, thrown exceptions, ``error()``) end the call with
:class:`~hlpool.GuestError` carrying the interpreter's message and stack.
Each interpreter has a memory limit of 3/4 of the guest heap (an allocation
bomb is a ``GuestError`` saying ``out of memory`` / ``not enough memory``); time
limits are the sandbox's call deadline (:class:`~hlpool.GuestTimeout`).
Scripts reach the host through ``host.call(name, ...args)`` (a global object
in JS, a global table in Lua): the same host functions and validation as
``hl_call_host`` in C guests. ``console.log``/``print`` write to the guest log.

Value mapping (guest -> host):

- JS: number -> int if it is an integer that fits in 64 bits (not -0), else
  float; BigInt -> int (error beyond 64 bits); string -> str (lone surrogates
  become U+FFFD); boolean -> bool; null/undefined -> None; Array (and typed
  arrays other than Uint8Array) -> list; Uint8Array/ArrayBuffer -> bytes; an
  object with a ``toJSON`` method (Date) -> its result; other objects -> dict of
  their own enumerable string keys; a Promise is settled first (the job queue
  is run) and its value returned. Functions and symbols are errors.
- Lua: nil -> None; boolean; integer -> int; float -> float; string -> str if
  valid UTF-8, else bytes; a table whose keys are all integers 1..n, at least
  half of them present -> list (missing ones are None); any other table -> dict
  (keys must then be strings; an empty table is ``{}``); functions, userdata,
  threads are errors.
- Nesting is limited to ``HL_MAX_DEPTH`` (32) levels, which also stops cycles.

Host -> guest: None -> null/nil, bool, int -> JS number (exact up to 2**53) /
Lua integer, float, str -> string, bytes -> Uint8Array / Lua string, list ->
Array / sequence table (None items are nil holes in Lua), dict -> object/table.

The environment: JS has the standard built-ins (BigInt included) plus ``host``,
``console.log`` and ``print``; no modules, no OS access. Lua has base (without
``dofile``/``loadfile``; ``load`` takes text chunks only), coroutine, table,
string, math, utf8 and ``os.clock/date/difftime/time``; no io, package or
debug. ``Math.random`` / ``math.random`` are seeded from ``getrandom`` on their
first use in each call (unless the Lua script seeds explicitly), so calls from
one snapshot do not share a random sequence.

Functions-as-a-service::

    base = base_snapshot("js").persist("js-base.hlsnap")    # interpreter initialised
    fn = load_script(base, "function add(a, b) { return a + b }")   # a layer on it
    fn.persist("add.hlsnap")                                  # optional; base persisted first
    with Sandbox(fn) as sb:
        sb.call("call", "add", [1, 2])                        # 3, from the layer, every call

``load_script`` returns a snapshot whose own layer holds only the pages the
script changed; the interpreter's code and untouched heap pages stay
references to the base's layer (its file once persisted), shared by every
script's layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hlpool.defaults import SCRIPT_LANGUAGES
from hlpool.errors import GuestBuildError
from hlpool.guest.build import build_guest, cache_dir, runtime_objects, sdk_fingerprint
from hlpool.guest.layout import MIB, MemoryConfig

log = logging.getLogger(__name__)

PROGRAMS_DIR = Path(__file__).resolve().parent / "programs"
LANGUAGES = SCRIPT_LANGUAGES
PYPI_URL = os.environ.get("HLPOOL_PYPI_URL", "https://pypi.org").rstrip("/")
DOWNLOAD_TIMEOUT = 120.0

# The sandbox memory an interpreter gets by default: QuickJS and Lua allocate
# on the heap (the interpreter's own limit is 3/4 of it; the rest is for the
# runtime's result arena and allocator slack), and large results need a larger
# OUT area than the 1 MiB default. Untouched pages cost nothing.
DEFAULT_CONFIG = MemoryConfig(heap_size=64 * MIB, stack_size=1 * MIB, out_size=8 * MIB)


@dataclass(frozen=True)
class SourceSpec:
    """A pinned upstream source: the PyPI sdist ``name==version`` with the sha256 of its file."""

    name: str
    version: str
    sha256: str
    subdir: str  # where the interpreter's sources are inside the sdist (after its top directory)
    license: str = "MIT"

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.tar.gz"


SOURCES: dict[str, SourceSpec] = {
    # QuickJS 2021-03-27 (upstream-quickjs/VERSION).
    "js": SourceSpec("quickjs", "1.19.4", "1205953abc24ff757f4a795304d5d61e4bf1e555c9ef6ec96a132d4b95535484",
                     "upstream-quickjs"),
    # Lua 5.4.8.
    "lua": SourceSpec("lupa", "2.8", "d8022641b9ec8ecf2c5ecbe9f47e5a70e0b87c4b5ae921b92cb02a638e0acd08",
                      "third-party/lua54"),
}

QUICKJS_SOURCES = ("quickjs.c", "libregexp.c", "libunicode.c", "cutils.c", "libbf.c")
LUA_SOURCES = ("lapi.c", "lcode.c", "lctype.c", "ldebug.c", "ldo.c", "ldump.c", "lfunc.c", "lgc.c", "llex.c",
               "lmem.c", "lobject.c", "lopcodes.c", "lparser.c", "lstate.c", "lstring.c", "ltable.c", "ltm.c",
               "lundump.c", "lvm.c", "lzio.c", "lauxlib.c", "lbaselib.c", "lcorolib.c", "lmathlib.c", "loslib.c",
               "lstrlib.c", "ltablib.c", "lutf8lib.c")

# Edits applied to the extracted upstream sources (recorded in the build key);
# each "old" text must occur exactly once.
# 1. QuickJS defines CONFIG_ATOMICS (Atomics.wait/notify on pthreads) for every
#    platform but Emscripten; the guest runtime has no threads (no clone()).
# 2. JSON.stringify (js_json_to_str) recurses without a stack check in QuickJS
#    2021-03-27 (fixed upstream later): a deeply nested object ran into the guard
#    page below the guest's stack (GuestFault) instead of a RangeError.
_JSON_TO_STR_START = ("    prop = JS_UNDEFINED;\n\n    switch (JS_VALUE_GET_NORM_TAG(val)) {\n    case JS_TAG_OBJECT:\n"
                      "        p = JS_VALUE_GET_OBJ(val);\n        cl = p->class_id;\n        if (cl == JS_CLASS_STRING) {\n")
QUICKJS_PATCHES = (
    ("quickjs.c", "#define CONFIG_ATOMICS\n",
     "/* #define CONFIG_ATOMICS: disabled by hlpool (no threads in the guest) */\n"),
    ("quickjs.c", _JSON_TO_STR_START,
     _JSON_TO_STR_START.replace("    prop = JS_UNDEFINED;\n\n", "    prop = JS_UNDEFINED;\n\n"
                                "    if (js_check_stack_overflow(ctx->rt, 0)) { /* hlpool */\n"
                                "        JS_ThrowStackOverflow(ctx);\n"
                                "        goto exception;\n"
                                "    }\n", 1)),
)


# ---- fetching the upstream sources ----------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_urllib(spec: SourceSpec, dest: Path) -> None:
    """Find the sdist's URL with PyPI's JSON API and download it."""
    api = f"{PYPI_URL}/pypi/{spec.name}/json"
    with urllib.request.urlopen(api, timeout=DOWNLOAD_TIMEOUT) as resp:
        info = json.load(resp)
    files = info.get("releases", {}).get(spec.version) or []
    urls = [u for u in files if u.get("packagetype") == "sdist" and u.get("filename") == spec.filename]
    if not urls:
        raise GuestBuildError(f"PyPI lists no sdist {spec.filename} for {spec.name}=={spec.version}")
    entry = urls[0]
    listed = entry.get("digests", {}).get("sha256")
    if listed and listed != spec.sha256:
        raise GuestBuildError(f"{spec.name}=={spec.version}: PyPI lists sdist sha256 {listed}, pinned "
                              f"{spec.sha256}; refusing to use it")
    with urllib.request.urlopen(entry["url"], timeout=DOWNLOAD_TIMEOUT) as resp, open(dest, "wb") as out:
        shutil.copyfileobj(resp, out)


def _download_pip(spec: SourceSpec, dest: Path) -> None:
    """``pip download`` of the sdist (used when the JSON API is not reachable, e.g. behind a mirror)."""
    with tempfile.TemporaryDirectory(prefix="hlpool-pip-") as tmp:
        # pip prepares the sdist's metadata, which needs its build requirements (setuptools,
        # wheel): let it fetch them in an isolated build environment.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", spec.name,
               "-q", "-d", tmp, f"{spec.name}=={spec.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        found = Path(tmp) / spec.filename
        if not found.exists():
            raise GuestBuildError(f"pip download of {spec.name}=={spec.version} failed:\n"
                                  f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
        shutil.move(str(found), dest)


def fetch_sdist(spec: SourceSpec) -> Path:
    """The pinned sdist file in the cache (downloaded if needed), its sha256 verified.

    ``$HLPOOL_SDIST_DIR`` may name a directory holding the sdist already (offline
    set-ups); its hash is checked the same way.
    """
    sources = cache_dir() / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    target = sources / spec.filename
    candidates = [target]
    if os.environ.get("HLPOOL_SDIST_DIR"):
        candidates.insert(0, Path(os.environ["HLPOOL_SDIST_DIR"]) / spec.filename)
    for candidate in candidates:
        if candidate.is_file():
            actual = _sha256_file(candidate)
            if actual == spec.sha256:
                return candidate
            if candidate == target:
                log.warning("%s has sha256 %s, expected %s: downloading it again", target, actual, spec.sha256)
                target.unlink()
            else:
                raise GuestBuildError(f"{candidate}: sha256 {actual} does not match the pinned {spec.sha256}")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.part")
    errors = []
    try:
        for method in (_download_urllib, _download_pip):
            try:
                method(spec, tmp)
                break
            except GuestBuildError as exc:
                if "refusing" in str(exc):
                    raise
                errors.append(str(exc))
            except (OSError, urllib.error.URLError, ValueError, subprocess.SubprocessError) as exc:
                errors.append(f"{method.__name__.strip('_')}: {exc}")
        else:
            raise GuestBuildError(
                f"cannot download {spec.name}=={spec.version} (the sdist with the {spec.subdir} sources): "
                + "; ".join(errors) + ". Check network access to PyPI, or put "
                f"{spec.filename} into $HLPOOL_SDIST_DIR.")
        actual = _sha256_file(tmp)
        if actual != spec.sha256:
            raise GuestBuildError(f"downloaded {spec.filename} has sha256 {actual}, expected the pinned "
                                  f"{spec.sha256}; not using it")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _patches(language: str) -> tuple[tuple[str, str, str], ...]:
    return QUICKJS_PATCHES if language == "js" else ()


def extract_sources(language: str) -> Path:
    """The interpreter's upstream source directory (extracted from the verified sdist, patched)."""
    spec = SOURCES[language]
    patches = hashlib.sha256(repr(_patches(language)).encode()).hexdigest()[:8]
    out = cache_dir() / "sources" / f"{spec.name}-{spec.version}-{spec.sha256[:12]}-{patches}"
    if (out / ".complete").exists():
        return out
    sdist = fetch_sdist(spec)
    prefix = f"{spec.name}-{spec.version}/{spec.subdir}/"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(prefix) or not m.isfile():
                    continue
                rel = m.name[len(prefix):]
                if not rel or rel.startswith("/") or ".." in Path(rel).parts or "/" in rel:
                    continue  # only the top directory's files: that is all the build uses
                members.append((m, rel))
            if not members:
                raise GuestBuildError(f"{sdist}: no files under {prefix}")
            for m, rel in members:
                f = tar.extractfile(m)
                assert f is not None
                (tmp / rel).write_bytes(f.read())
        for name, old, new in _patches(language):
            path = tmp / name
            text = path.read_text(encoding="utf-8", errors="surrogateescape")
            if text.count(old) != 1:
                raise GuestBuildError(f"{spec.name} {spec.version}: cannot apply the hlpool patch to {name}")
            path.write_text(text.replace(old, new, 1), encoding="utf-8", errors="surrogateescape")
        (tmp / ".complete").write_text(spec.sha256 + "\n")
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            if not (out / ".complete").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- building the guests --------------------------------------------------------------------


# Compiler settings per interpreter (besides the glue and upstream sources).
BUILD_FLAGS: dict[str, dict[str, Any]] = {
    # As the quickjs binding's setup.py (CONFIG_VERSION, CONFIG_BIGNUM for BigInt), plus _GNU_SOURCE.
    "js": {"defines": ["CONFIG_BIGNUM", "_GNU_SOURCE"], "optimize": "2", "cflags": ["-w"]},
    # No LUA_USE_LINUX: no dlopen, popen or mkstemp; the guest opens no files anyway.
    "lua": {"defines": [], "optimize": "2", "cflags": ["-w"]},
}


def _build_recipe(language: str, src: Path) -> dict[str, Any]:
    glue_dir = PROGRAMS_DIR / language
    flags = BUILD_FLAGS[language]
    if language == "js":
        version = (src / "VERSION").read_text().strip()
        sources = [glue_dir / "js_guest.c", *(src / s for s in QUICKJS_SOURCES)]
        defines = [f'CONFIG_VERSION="{version}"', *flags["defines"]]
    else:
        sources = [glue_dir / "lua_guest.c", *(src / s for s in LUA_SOURCES)]
        defines = list(flags["defines"])
    # interp_util.h and pack_alloc.h (shared by both glues) live with the JS glue.
    return {"sources": sources, "include_dirs": [glue_dir, PROGRAMS_DIR / "js", src], "defines": defines,
            "optimize": flags["optimize"], "cflags": list(flags["cflags"])}


def check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise KeyError(f"no interpreter {language!r}; available: {', '.join(LANGUAGES)}")


def _build_key(language: str) -> str:
    spec = SOURCES[language]
    digest = hashlib.sha256(sdk_fingerprint().encode())
    digest.update(spec.sha256.encode())
    digest.update(repr(_patches(language)).encode())
    shared = [PROGRAMS_DIR / "js" / "interp_util.h", PROGRAMS_DIR / "js" / "pack_alloc.h"]
    for path in dict.fromkeys(sorted((PROGRAMS_DIR / language).iterdir()) + shared):
        if path.suffix in (".c", ".h"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    digest.update(repr(BUILD_FLAGS[language]).encode())
    digest.update(repr((QUICKJS_SOURCES, LUA_SOURCES)).encode())
    return digest.hexdigest()[:12]


_build_locks = {language: threading.Lock() for language in LANGUAGES}


def interpreter_path(language: str) -> Path:
    """Path of the built interpreter guest for ``"js"`` or ``"lua"`` (built now if needed).

    Raises :class:`~hlpool.GuestBuildError` if the sources cannot be fetched
    (offline, hash mismatch) or do not compile.
    """
    check_language(language)
    out = cache_dir() / "guests" / f"{language}-{_build_key(language)}.elf"
    if out.exists():
        return out
    with _build_locks[language]:
        if out.exists():
            return out
        src = extract_sources(language)
        recipe = _build_recipe(language, src)
        log.info("building the %s interpreter guest (%s %s)", language, SOURCES[language].name,
                 SOURCES[language].version)
        build_guest(recipe["sources"], out, include_dirs=recipe["include_dirs"], defines=recipe["defines"],
                    optimize=recipe["optimize"], cflags=recipe["cflags"])
    return out


def build_interpreters() -> dict[str, Path]:
    """Build both interpreter guests (in parallel); returns language -> path."""
    runtime_objects()  # once, before the two builds would both compile it
    with ThreadPoolExecutor(max_workers=len(LANGUAGES)) as pool:
        futures = {language: pool.submit(interpreter_path, language) for language in LANGUAGES}
        return {language: future.result() for language, future in futures.items()}
