"""The snapshot file format: writing (atomic, read-only) and reading (validate first).

A file holds one layer. Layout::

    page 0      header (little-endian, HEADER.size bytes, rest zero)
    page 1...   page data (the layer), page-aligned so it can be mapped
    after it    metadata: msgpack map (vCPU state, layout, runs, parents, files)

Header fields: magic, format version (independent of the package version),
header size, flags, metadata offset/size, data offset/size, file size,
content hash (SHA-256 of data + metadata: the layer's identity, by which
children name it), and a CRC-32 of the header itself.

Reading validates everything before anything is mapped: magic, version,
header CRC, every offset and size against the file, the content hash, the
metadata's types and bounds, the runs against the layers, and recursively
every parent (found by the path recorded in the child, checked by hash)
and every referenced host file (by hash).

What a file needs (metadata ``requires``, checked on open for every file of a
chain; a failure is a :class:`SnapshotCompatibilityError` naming the need):

- ``hlpool``: the version that wrote it. Rule: same major.minor as this hlpool
  (a patch release never changes what a file means; the byte layout has its
  own FORMAT_VERSION, checked first).
- ``abi``: the guest ABI version (``HL_ABI_VERSION``) its runtime was built
  for. Rule: equal to this hlpool's.
- ``kvm``: the KVM flavour ("pvm" or "hardware") its vCPU state was saved
  under. Rule: equal to this host's.
- ``cpu_vendor``: the CPUID vendor string its vCPU state assumes. Rule: equal.
- ``xcr0`` and ``xsave``: the XSAVE components the vCPU state enables and
  where its XSAVE area holds them. Rule: the vCPU state's XCR0 is within
  what this host's KVM supports, and each enabled component has the same
  offset and size here.

Host facts come from ``/dev/kvm``; without KVM (nothing could run the file
anyway) only ``hlpool`` and ``abi`` are checked. Files written before these
checks (no ``requires``) open as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import re
import struct
import threading
import time
import zlib
from typing import Any, Callable, Sequence

import msgspec

from hlpool.errors import (
    KvmError,
    SnapshotCompatibilityError,
    SnapshotError,
    SnapshotFormatError,
    SnapshotIntegrityError,
    SnapshotParentError,
    SnapshotTooLargeError,
    SnapshotVersionError,
)
from hlpool.guest import abi as guest_abi
from hlpool.guest.entry_stub import xcr0_of
from hlpool.guest.layout import PAGE, Layout, MemoryConfig, page_up
from hlpool.kvm.system import system
from hlpool.kvm.vcpu import VcpuState, shared_state
from hlpool.memory.image import S
from hlpool.memory.layers import Layer, Run, RunList
from hlpool.memory.mapped_files import (
    MappedFile,
    basename_name,
    fingerprint,
    hash_file,
    name_problem,
    open_regular,
)
from hlpool.snapshot.snapwrite import layer_chunks, publish, stream_chunks, write_all_at
from hlpool.version import __version__ as hlpool_version

MAGIC = b"HLSNAP\r\n"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQQQQQQ32sI")
HEADER_CRC_OFFSET = HEADER.size - 4
MAX_META_SIZE = 16 << 20
MAX_FILE_SIZE = 1 << 40
MAX_DEPTH = 64
MAX_RUNS = 1 << 16
DEFAULT_MAX_MEMORY = 256 << 30
# Page data one snapshot file may hold: bounds the time its content hash takes (~1 GB/s here).
DEFAULT_MAX_LAYER = 8 << 30


def looks_like_snapshot(path: str | os.PathLike) -> bool:
    """True if the file starts with the snapshot magic (a cheap sniff; :func:`read_snapshot` validates)."""
    try:
        fd, _st = open_regular(os.fspath(path))
    except OSError:
        return False
    try:
        return os.pread(fd, len(MAGIC), 0) == MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def _fail(path: str, message: str, cls: type[SnapshotError] = SnapshotFormatError) -> SnapshotError:
    return cls(f"{path}: {message}")


# ---- writing --------------------------------------------------------------------------


def _vcpu_to_meta(v: VcpuState) -> dict[str, Any]:
    return {"regs": v.regs, "sregs": v.sregs, "xsave": v.xsave, "xcrs": v.xcrs,
            "msrs": [[k, val] for k, val in v.msrs.items()], "debugregs": v.debugregs, "events": v.events}


def write_snapshot(snapshot: S, path: str, *, sync: bool = True) -> S:
    """Persist ``snapshot``'s top layer to ``path``; returns the file-backed snapshot.

    ``sync=False`` skips the fsyncs (file and directory): for content-addressed files whose
    writer can tell a torn file after a crash from its content hash and write it again."""
    path = os.path.abspath(path)
    digest, data_offset, data_size = write_snapshot_file(snapshot, path, sync=sync)
    read_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    layer = Layer(read_fd, data_size, digest, path=path, data_offset=data_offset)
    _remember(path, os.fstat(read_fd), layer)
    return dataclasses.replace(snapshot, layers=snapshot.layers[:-1] + (layer,), path=path, info=dict(snapshot.info))


def write_snapshot_file(snapshot: S, path: str, *, sync: bool = True, ahead: bool = False) -> tuple[bytes, int, int]:
    """:func:`write_snapshot` without reopening the file: (top layer's content hash, its data offset,
    its size), for a writer that hands the file on (the script builder; ``ahead``: into a file made
    in the background while it was idle, see :func:`hlpool.snapshot.snapwrite.publish`)."""
    if snapshot.exports is None:
        raise SnapshotError("a boot snapshot (before hl_main ran) cannot be persisted")
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    parents = snapshot.layers[:-1]
    for i, layer in enumerate(parents):
        if not layer.persisted:
            raise SnapshotError(f"layer {i} of this snapshot's parents is not persisted; persist the parent "
                                "snapshot first (layers name their parents by file)")
    top = snapshot.layers[-1]
    meta = {
        "hlpool": hlpool_version,
        "created": time.time(),
        "config": snapshot.layout.config.to_dict(),
        "image_size": snapshot.layout.image_size,
        "vcpu": _vcpu_to_meta(snapshot.vcpu),
        "exports": list(snapshot.exports),
        "image_segments": [list(s) for s in snapshot.image_segments],
        "runs": {slot: _runs_meta(runs) for slot, runs in snapshot.runs.items()},
        "parents": [{"sha256": layer.sha256, "path": _relative(layer.path, directory), "size": layer.size}
                    for layer in parents],
        "mapped_files": [{"path": f.path, "relpath": os.path.relpath(f.path, directory),
                          "guest_address": f.guest_address, "size": f.size, "sha256": f.sha256,
                          "name": f.name} for f in snapshot.mapped_files],
        "info": {k: v for k, v in snapshot.info.items() if isinstance(v, (str, int, float, bool))},
        "host": {"kvm": system().info.flavour, "xsave_size": len(snapshot.vcpu.xsave)},
        "requires": _requirements(snapshot.vcpu),
    }
    meta_bytes = msgspec.msgpack.encode(meta)
    data_offset = PAGE
    data_size = top.size
    meta_offset = data_offset + data_size
    file_size = meta_offset + len(meta_bytes)
    chunks, _size = layer_chunks(top)  # a captured layer's bytes straight from memory (no memfd)

    def header(digest: bytes) -> bytes:
        raw = bytearray(PAGE)
        HEADER.pack_into(raw, 0, MAGIC, FORMAT_VERSION, HEADER.size, 0, meta_offset, len(meta_bytes),
                         data_offset, data_size, file_size, digest, 0)
        struct.pack_into("<I", raw, HEADER_CRC_OFFSET, zlib.crc32(raw[:HEADER_CRC_OFFSET]))
        return bytes(raw)

    content = hashlib.sha256()

    def write(fd: int) -> None:
        if chunks is not None:  # hash first, then header, data and metadata in one pwritev
            for chunk in chunks:
                content.update(chunk)
            content.update(meta_bytes)
            write_all_at(fd, [header(content.digest()), *chunks, meta_bytes], 0)
            return
        offset = data_offset
        for chunk in stream_chunks(top):
            content.update(chunk)
            offset = write_all_at(fd, [chunk], offset)
        content.update(meta_bytes)
        write_all_at(fd, [meta_bytes], offset)
        write_all_at(fd, [header(content.digest())], 0)

    publish(path, write, sync=sync, ahead=ahead)
    return content.digest(), data_offset, data_size


def _runs_meta(runs: "RunList | Sequence[Run]") -> list[tuple[int, int, int, int]]:
    """A slot's runs as the metadata stores them, [first page, count, layer, offset] each (tuples
    encode as MessagePack arrays, as lists do): a RunList straight from its array, no Run made per run
    (~40 runs a script's layer; ~60 us of a registration went to making and listing them)."""
    if isinstance(runs, RunList):
        flat = runs.flat
        return list(zip(flat[0::4], flat[1::4], flat[2::4], flat[3::4]))
    return [tuple(r) for r in runs]


def _relative(path: str, directory: str) -> str:
    """``os.path.relpath(path, directory)``, without its cost for a file in ``directory`` itself
    (a script's layer and its base share the store directory)."""
    if os.path.dirname(path) == directory and os.path.isabs(path):
        return os.path.basename(path)
    return os.path.relpath(path, directory)


# ---- what a file needs (rules: the module docstring) ---------------------------------------


@dataclasses.dataclass(frozen=True)
class _Host:
    kvm: str
    cpu_vendor: str
    xcr0: int  # the XSAVE components KVM lets a guest enable
    xsave: dict[int, tuple[int, int]]  # component -> (offset, size) in the XSAVE area


_host_facts: dict[int, _Host] = {}


def _host() -> _Host | None:
    """This host's facts (read once per process); None without a usable /dev/kvm (asked again next time)."""
    pid = os.getpid()
    if pid not in _host_facts:
        try:
            kvm = system()
            cpuid = kvm.supported_cpuid
            vendor = ""
            for i in range(cpuid.nent):
                entry = cpuid.entries[i]
                if entry.function == 0 and entry.index == 0:
                    vendor = struct.pack("<III", entry.ebx, entry.edx, entry.ecx).decode("latin-1").rstrip("\0")
            _host_facts[pid] = _Host(kvm.info.flavour, vendor, kvm.supported_xcr0, dict(kvm.xsave_components))
        except (KvmError, OSError):
            return None
    return _host_facts[pid]


def _requirements(vcpu: VcpuState) -> dict[str, Any]:
    host = _host()
    if host is None:
        raise SnapshotError("cannot persist a snapshot without /dev/kvm (the file records this host's KVM)")
    xcr0 = xcr0_of(vcpu.xcrs)
    return {"hlpool": hlpool_version, "abi": guest_abi.HL_ABI_VERSION, "kvm": host.kvm,
            "cpu_vendor": host.cpu_vendor, "xcr0": xcr0,
            "xsave": [[n, *host.xsave[n]] for n in sorted(host.xsave) if xcr0 >> n & 1]}


def _major_minor(version: str) -> tuple[str, str] | None:
    parts = version.split(".")
    return (parts[0], parts[1]) if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit() else None


_met: set[tuple] = set()  # requirements (and XSAVE layouts) met here: a writer's files repeat them


def _check_requirements(path: str, req: "_RequiresMeta | None") -> None:
    """Refuse a file that needs another hlpool or guest ABI, KVM flavour or CPU vendor
    (``req`` is None for files written before ``requires`` existed; its types are checked by the decoder)."""
    if req is None or (os.getpid(), req) in _met:
        return
    written_by = req.hlpool
    if _major_minor(written_by) is None:
        raise _fail(path, f"metadata field 'requires.hlpool' is not a version: {written_by[:40]!r}")
    if _major_minor(written_by) != _major_minor(hlpool_version):
        raise _fail(path, f"written by hlpool {written_by[:40]}; this is hlpool {hlpool_version}, which opens files "
                    f"of hlpool {'.'.join(_major_minor(hlpool_version) or ())}.x only", SnapshotCompatibilityError)
    if req.abi != guest_abi.HL_ABI_VERSION:
        raise _fail(path, f"built for guest ABI version {req.abi}; this hlpool speaks guest ABI version "
                    f"{guest_abi.HL_ABI_VERSION} (rebuild the guest and its snapshot)", SnapshotCompatibilityError)
    if not all(0 <= c[0] < 64 for c in req.xsave):
        raise _fail(path, "metadata field 'requires.xsave' is malformed")
    host = _host()
    if host is None:
        return
    if req.kvm != host.kvm:
        raise _fail(path, f"written for KVM flavour {req.kvm[:40]!r}, this host is {host.kvm!r}",
                    SnapshotCompatibilityError)
    if req.cpu_vendor != host.cpu_vendor:
        raise _fail(path, f"its vCPU state was saved on a {req.cpu_vendor[:40]!r} CPU, this host's is "
                    f"{host.cpu_vendor!r}", SnapshotCompatibilityError)
    if len(_met) < 256:
        _met.add((os.getpid(), req))


def _check_xsave(path: str, req: "_RequiresMeta | None", vcpu: VcpuState) -> None:
    """The vCPU state's XSAVE components must exist on this host, laid out as the file recorded."""
    if req is None or (os.getpid(), req, vcpu.xcrs) in _met:
        return
    host = _host()
    if host is None:
        return
    xcr0 = xcr0_of(vcpu.xcrs)
    if xcr0 & ~host.xcr0:
        missing = [n for n in range(64) if (xcr0 & ~host.xcr0) >> n & 1]
        raise _fail(path, f"its vCPU state enables XSAVE components {missing} (XCR0 {xcr0:#x}); this host's KVM "
                    f"supports XCR0 {host.xcr0:#x}", SnapshotCompatibilityError)
    for n, offset, size in req.xsave:
        if xcr0 >> n & 1 and host.xsave.get(n) != (offset, size):
            here = host.xsave.get(n)
            raise _fail(path, f"its XSAVE area holds component {n} at offset {offset}, size {size}; this host's at "
                        f"{'offset %d, size %d' % here if here else 'nowhere'}", SnapshotCompatibilityError)
    if len(_met) < 256:
        _met.add((os.getpid(), req, vcpu.xcrs))


# ---- reading ----------------------------------------------------------------------------

# Content hashes of files already verified in this process, by (path, inode, size,
# mtime_ns): children sharing a base do not hash it again.
_verified: dict[tuple[str, int, int, int], bytes] = {}
_verified_lock = threading.Lock()


def _remember(path: str, st: os.stat_result, layer: Layer) -> None:
    layer.fingerprint = fingerprint(st)
    with _verified_lock:
        _verified[(path, st.st_ino, st.st_size, st.st_mtime_ns)] = layer.sha256


class _Header:
    def __init__(self, path: str, raw: "bytes | memoryview", actual_size: int) -> None:
        if len(raw) < HEADER.size:
            raise _fail(path, f"truncated: {actual_size} bytes is too short for a snapshot header")
        (magic, version, header_size, flags, self.meta_offset, self.meta_size, self.data_offset,
         self.data_size, self.file_size, self.content_sha256, crc) = HEADER.unpack_from(raw, 0)
        if magic != MAGIC:
            raise _fail(path, "not an hlpool snapshot (bad magic)")
        if version != FORMAT_VERSION:
            raise _fail(path, f"snapshot format version {version}; this hlpool reads version {FORMAT_VERSION}",
                        SnapshotVersionError)
        if zlib.crc32(raw[:HEADER_CRC_OFFSET]) != crc:
            raise _fail(path, "header checksum mismatch (corrupted or tampered header)", SnapshotIntegrityError)
        if header_size != HEADER.size or flags != 0:
            raise _fail(path, f"unsupported header (size {header_size}, flags {flags:#x})")
        if self.file_size > MAX_FILE_SIZE:
            raise _fail(path, f"file claims {self.file_size} bytes, over the {MAX_FILE_SIZE}-byte limit",
                        SnapshotTooLargeError)
        if actual_size != self.file_size:
            raise _fail(path, f"file is {actual_size} bytes but its header says {self.file_size} "
                        f"({'truncated' if actual_size < self.file_size else 'trailing data'})")
        if self.data_offset != PAGE or self.data_size % PAGE:
            raise _fail(path, "page data is not page-aligned")
        if self.meta_offset != self.data_offset + self.data_size or \
                self.meta_offset + self.meta_size != self.file_size:
            raise _fail(path, "sections do not tile the file")
        if self.meta_size > MAX_META_SIZE:
            raise _fail(path, f"metadata of {self.meta_size} bytes exceeds {MAX_META_SIZE}", SnapshotTooLargeError)


# The metadata's schema: msgspec decodes and type-checks it in one pass (no generic dicts walked
# in Python, runs built as Run tuples directly); what types cannot say is checked in read_snapshot.
# Unknown keys are ignored (a newer writer may add some); a missing or mistyped one is refused.

class _VcpuMeta(msgspec.Struct):
    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    debugregs: bytes
    events: bytes
    msrs: list[tuple[int, int]]


class _RequiresMeta(msgspec.Struct, frozen=True):  # hashable: checked once per process (_met)
    hlpool: str
    abi: int
    kvm: str
    cpu_vendor: str
    xcr0: int
    xsave: tuple[tuple[int, int, int], ...]


class _RunsMeta(msgspec.Struct):
    system: list[Run]
    main: list[Run]


class _Meta(msgspec.Struct):
    config: dict
    image_size: int
    vcpu: _VcpuMeta
    exports: list[str]
    image_segments: list[tuple[int, int, str]]
    runs: _RunsMeta
    parents: list  # of maps, checked where used
    mapped_files: list  # of maps, checked where used
    info: Any = None
    requires: _RequiresMeta | None = None  # absent in files written before it existed


_meta_decoder = msgspec.msgpack.Decoder(_Meta)
_requires_decoder = msgspec.msgpack.Decoder(msgspec.defstruct("_Requires", [("requires", _RequiresMeta | None, None)]))
_SCHEMA_WHERE = re.compile(r" - at `\$([^`]*)`$")
_SCHEMA_MISSING = re.compile(r"missing required field `([^`]*)`")
# (the words of the checks the schema replaced: a whole field, or an item in it ([n] in the path))
_SCHEMA_ITEMS = {"exports": "export list is malformed", "image_segments": "image segment list is malformed"}


def _schema_problem(message: str) -> str:
    """What a schema error from the decoder means, in the words of this format."""
    where = _SCHEMA_WHERE.search(message)
    at = where.group(1) if where else ""
    missing = _SCHEMA_MISSING.search(message)
    keys, item = re.findall(r"\.(\w+)", at) + ([missing.group(1)] if missing else []), "[" in at
    if not keys:
        return "malformed metadata (not a map)"
    top, sub = keys[0], keys[1] if len(keys) > 1 else ""
    if top == "vcpu":
        return "vCPU MSR list is malformed" if sub == "msrs" else f"vCPU field {sub!r} is malformed" if sub else \
            "vCPU state is malformed"
    if top == "runs" and sub:
        return f"a run of slot {sub} is malformed" if item else f"runs of slot {sub} are malformed"
    if top == "requires":
        return f"metadata field 'requires.{sub}' is malformed" if item else \
            f"metadata field 'requires.{sub}' is missing or has the wrong type" if sub else \
            "metadata field 'requires' is malformed"
    if item and top in _SCHEMA_ITEMS:
        return _SCHEMA_ITEMS[top]
    return f"metadata field {top!r} is missing or has the wrong type"


def _decode_meta(path: str, raw: "bytes | memoryview") -> _Meta:
    try:
        return _meta_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        problem = str(exc)
    except RecursionError:
        raise _fail(path, "malformed metadata: nested too deeply") from None
    except Exception as exc:  # whatever the decoder raises, the file is at fault
        raise _fail(path, f"malformed metadata: {exc}") from None
    try:  # first, as before the schema: a file of another hlpool (whose metadata may differ) says so
        _check_requirements(path, _requires_decoder.decode(raw).requires)
    except msgspec.ValidationError as exc:
        problem = str(exc)
    except (msgspec.DecodeError, RecursionError):
        pass
    raise _fail(path, _schema_problem(problem))


# Files up to this size are read whole with one pread into a buffer the thread keeps (a tenant's
# layer is ~80 KiB; bigger files, such as bases, are read once per process in chunks): header, hash
# and metadata come from one copy, and no new memory is faulted in per open. The buffer is an
# anonymous mapping: page-aligned, so the kernel's copy into it runs at full speed (into a bytearray
# it took 3-4 times longer here), and it stays resident only as far as files filled it.
READ_WHOLE_LIMIT = 256 << 10
_scratch = threading.local()


def _read_whole(path: str, fd: int, size: int) -> memoryview:
    """The first ``size`` bytes of the file, in this thread's buffer: valid until its next call."""
    buf: mmap.mmap | None = getattr(_scratch, "buffer", None)
    if buf is None or len(buf) < size:
        # private: a shared anonymous mapping would stay shared with processes forked after this
        buf = mmap.mmap(-1, max(page_up(size), READ_WHOLE_LIMIT), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        _scratch.buffer = buf  # (a smaller one goes with its last view)
    view = memoryview(buf)[:size]
    done = 0
    while done < size:
        n = os.preadv(fd, [view[done:]], done)
        if n == 0:
            raise _fail(path, "file shrank while being read")
        done += n
    return view


def _open_layer(path: str, expected_sha256: bytes | None, max_layer: int) -> tuple[Layer, _Meta]:
    """Open, hash and parse one snapshot file. Returns its layer and metadata."""
    try:
        fd, st = open_regular(path)
    except FileNotFoundError:
        raise SnapshotParentError(f"{path}: no such snapshot file") if expected_sha256 else \
            SnapshotError(f"{path}: no such file") from None
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot open: {exc.strerror}") from None
    whole: memoryview | None = None  # (dropped unreleased: the buffer is never resized or closed)
    try:
        if st.st_size <= READ_WHOLE_LIMIT:
            whole = _read_whole(path, fd, st.st_size)
            header = _Header(path, whole[:PAGE], st.st_size)
        else:
            header = _Header(path, os.pread(fd, PAGE, 0), st.st_size)
        if header.data_size > max_layer:
            raise _fail(path, f"holds {header.data_size} bytes of page data, over the {max_layer}-byte limit "
                        "(Snapshot.open(max_layer_size=...))", SnapshotTooLargeError)
        if expected_sha256 is not None and header.content_sha256 != expected_sha256:
            raise _fail(path, "is not the parent this snapshot was layered on (content hash differs)",
                        SnapshotParentError)
        key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
        with _verified_lock:
            known = _verified.get(key)
        if known is None:
            if whole is not None:
                digest = hashlib.sha256(whole[header.data_offset:header.file_size]).digest()
            else:
                content = hashlib.sha256()
                offset = header.data_offset
                while offset < header.file_size:
                    chunk = os.pread(fd, min(8 << 20, header.file_size - offset), offset)
                    if not chunk:
                        raise _fail(path, "file shrank while being read")
                    content.update(chunk)
                    offset += len(chunk)
                digest = content.digest()
            if digest != header.content_sha256:
                raise _fail(path, "content hash mismatch: the file was modified or corrupted after it was "
                            "written", SnapshotIntegrityError)
        elif known != header.content_sha256:
            raise _fail(path, "content hash changed", SnapshotIntegrityError)
        if whole is not None:
            meta = _decode_meta(path, whole[header.meta_offset:header.file_size])
        else:
            meta_raw = os.pread(fd, header.meta_size, header.meta_offset)
            if len(meta_raw) != header.meta_size:
                raise _fail(path, "truncated metadata")
            meta = _decode_meta(path, meta_raw)
    except OSError as exc:  # e.g. EIO from a procfs file that claims to be regular
        os.close(fd)
        raise _fail(path, f"cannot read: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    layer = Layer(fd, header.data_size, header.content_sha256, path=path, data_offset=header.data_offset)
    _remember(path, st, layer)
    return layer, meta


_VCPU_NAMES = ("regs", "sregs", "xsave", "xcrs", "debugregs", "events")
_VCPU_SIZES = (144, 312, 4096, 392, 128, 64)
_DEBUGREGS_TAIL = struct.Struct("<QQQ9Q")


def _vcpu_of(raw: _VcpuMeta, path: str) -> VcpuState:
    if (len(raw.regs), len(raw.sregs), len(raw.xsave), len(raw.xcrs), len(raw.debugregs), len(raw.events)) != \
            _VCPU_SIZES:
        for name, size in zip(_VCPU_NAMES, _VCPU_SIZES):
            if len(getattr(raw, name)) != size:
                raise _fail(path, "vCPU XSAVE area has an unexpected size" if name == "xsave" else
                            f"vCPU field {name!r} is malformed")
    # struct kvm_debugregs: db[4], dr6, dr7, flags, reserved[9]; KVM rejects high bits in dr6/dr7 and flags
    dr6, dr7, flags, *reserved = _DEBUGREGS_TAIL.unpack_from(raw.debugregs, 32)
    if dr6 >> 32 or dr7 >> 32 or flags or any(reserved):
        raise _fail(path, "vCPU debug registers are malformed")
    return shared_state(raw.regs, raw.sregs, raw.xsave, raw.xcrs, raw.msrs, raw.debugregs, raw.events)


_layouts: dict[tuple, Layout] = {}  # (memory configuration, image size) -> Layout: one per family, not per file


def _layout_of(config_raw: dict, image_size: int) -> Layout:
    """The layout a file describes; layouts are values, so files that describe the same one share it
    (a worker opening thousands of children of one base computes it once)."""
    key = (tuple(config_raw.items()), image_size)  # as listed: files of one writer list them in one order
    try:
        return _layouts[key]
    except (KeyError, TypeError):  # TypeError: an unhashable value, refused by MemoryConfig below
        pass
    layout = Layout(MemoryConfig(**{k: v for k, v in config_raw.items() if isinstance(k, str)}), image_size)
    if len(_layouts) < 256:
        _layouts[key] = layout
    return layout


def read_snapshot(path: str, make: Callable[..., S], *, max_memory: int | None = None,
                  max_layer_size: int | None = None, files_path: Sequence[str] = (), _expected: bytes | None = None,
                  _depth: int = 0, parents: "dict[bytes, S] | None" = None) -> S:
    """Validate and open the snapshot at ``path`` (and its parent chain); ``make`` builds the
    value (the :class:`~hlpool.Snapshot` class or a subclass) from its fields and checks that the
    runs tile the slots inside their layers (:func:`~hlpool.memory.layers.check_runs`, as
    ``Snapshot.__post_init__`` does); a SnapshotError it raises is reported as the file's.

    ``parents``: snapshots opened (and validated) before, by the content hash of their top layer;
    a parent found there is used as it is (a child names its parent by that hash), and parents
    opened here are added: a worker opening many children of one base reads and hashes it once."""
    path = os.path.abspath(path)
    if _depth > MAX_DEPTH:
        raise _fail(path, f"parent chain deeper than {MAX_DEPTH}", SnapshotParentError)
    layer, meta = _open_layer(path, _expected,
                              max_layer_size if max_layer_size is not None else DEFAULT_MAX_LAYER)
    try:
        _check_requirements(path, meta.requires)
        try:
            layout = _layout_of(meta.config, meta.image_size)
        except Exception as exc:  # MemoryConfig's TypeError, ValueError or SnapshotError
            raise _fail(path, f"invalid memory configuration: {exc}") from None
        limit = max_memory if max_memory is not None else DEFAULT_MAX_MEMORY
        if layout.guest_memory_size > limit:
            raise _fail(path, f"describes {layout.guest_memory_size} bytes of guest memory, over the "
                        f"{limit}-byte limit", SnapshotTooLargeError)
        exports = meta.exports
        if len(exports) > 256 or not all(0 < len(e) < 64 for e in exports):
            raise _fail(path, "export list is malformed")
        vcpu = _vcpu_of(meta.vcpu, path)
        _check_xsave(path, meta.requires, vcpu)
        runs = {"system": meta.runs.system, "main": meta.runs.main}
        for slot, slot_runs in runs.items():
            if len(slot_runs) > MAX_RUNS:
                raise _fail(path, f"runs of slot {slot} are malformed")

        parents_raw = meta.parents
        parent: S | None = None
        if parents_raw:
            last = parents_raw[-1]
            if not (isinstance(last, dict) and isinstance(last.get("path"), str)
                    and isinstance(last.get("sha256"), bytes)):
                raise _fail(path, "parent reference is malformed")
            parent = parents.get(last["sha256"]) if parents is not None else None
            if parent is None:
                parent_path = os.path.normpath(os.path.join(os.path.dirname(path), last["path"]))
                parent = read_snapshot(parent_path, make, max_memory=max_memory, max_layer_size=max_layer_size,
                                       files_path=files_path, _expected=last["sha256"], _depth=_depth + 1,
                                       parents=parents)
                if parents is not None:
                    parents[parent.layers[-1].sha256] = parent
            if len(parent.layers) != len(parents_raw) or any(
                    not isinstance(p, dict) or p.get("sha256") != pl.sha256
                    for p, pl in zip(parents_raw, parent.layers)):
                raise _fail(path, "parent chain does not match the layers recorded in this file",
                            SnapshotParentError)
            if parent.layout is not layout and parent.layout != layout:
                raise _fail(path, "parent has a different memory layout", SnapshotParentError)
        layers = (parent.layers if parent else ()) + (layer,)
        files = []
        for f in meta.mapped_files:
            if not (isinstance(f, dict) and isinstance(f.get("path"), str) and type(f.get("guest_address")) is int
                    and type(f.get("size")) is int and isinstance(f.get("sha256"), bytes)):
                raise _fail(path, "mapped file entry is malformed")
            files.append(_verify_mapped_file(path, f, layout, files_path))
            if any(other.name == files[-1].name for other in files[:-1]):
                raise _fail(path, f"two mapped files have the guest name {files[-1].name!r}")
        info = meta.info if isinstance(meta.info, dict) else {}
        try:  # make checks the runs against the layers (check_runs): once per open, not twice
            return make(layout=layout, vcpu=vcpu, exports=tuple(exports), layers=layers, runs=runs,
                        image_segments=tuple(meta.image_segments), mapped_files=tuple(files),
                        parent=parent, path=path, info=info)
        except SnapshotError as exc:
            raise _fail(path, str(exc)) from None
    except BaseException:
        layer.close()
        raise


def _verify_mapped_file(snapshot_path: str, f: dict, layout: Layout, files_path: Sequence[str]) -> MappedFile:
    """Find a mapped file and check it is the one the snapshot was taken with (size and SHA-256).

    Where it is looked for, in order: the absolute path recorded, the path recorded relative
    to the snapshot file (so a directory holding both can move), then the recorded file name in
    each directory of ``files_path``. The first candidate with the recorded content wins.
    """
    file_path = f["path"]
    name = f.get("name")
    if name is None:  # written before mappings had names: the basename, as the guest saw it then
        name = basename_name(file_path)
    elif name_problem(name):
        raise _fail(snapshot_path, f"mapped file {file_path} has an invalid guest name: {name_problem(name)}")
    if not (layout.files.start <= f["guest_address"] and f["guest_address"] + page_up(f["size"]) <= layout.files.end):
        raise _fail(snapshot_path, f"mapped file {file_path} lies outside the files window")
    candidates = [file_path]
    relpath = f.get("relpath")
    if isinstance(relpath, str) and relpath and "\0" not in relpath:
        candidates.append(os.path.normpath(os.path.join(os.path.dirname(snapshot_path), relpath)))
    candidates += [os.path.join(os.fspath(d), os.path.basename(file_path)) for d in files_path]
    candidates = list(dict.fromkeys(candidates))  # in order, without repeats
    unavailable: str | None = None
    changed = False
    for candidate in candidates:
        try:
            fd, st = open_regular(candidate)
        except (OSError, ValueError) as exc:  # ValueError: a NUL in a recorded path
            unavailable = unavailable or getattr(exc, "strerror", None) or str(exc)
            continue
        try:
            if st.st_size == f["size"] and hash_file(fd) == f["sha256"]:
                return MappedFile(path=candidate, guest_address=f["guest_address"], size=f["size"],
                                  sha256=f["sha256"], fingerprint=fingerprint(st), name=name)
            changed = True
        except OSError as exc:
            unavailable = unavailable or exc.strerror
        finally:
            os.close(fd)
    looked = f" (looked in: {', '.join(candidates)})" if len(candidates) > 1 else ""
    if changed:
        raise _fail(snapshot_path, f"mapped file {file_path} changed since the snapshot was taken{looked}",
                    SnapshotParentError)
    raise _fail(snapshot_path, f"mapped file {file_path} is not available: {unavailable}{looked}",
                SnapshotParentError)
