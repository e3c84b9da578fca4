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
import os
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
from hlpool.kvm.vcpu import VcpuState
from hlpool.memory.image import S
from hlpool.memory.layers import Layer, Run, check_runs
from hlpool.memory.mapped_files import (
    MappedFile,
    basename_name,
    fingerprint,
    hash_file,
    name_problem,
    open_regular,
)
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


def _relative_path(target: str, directory: str) -> str:
    return os.path.relpath(target, directory)


def write_snapshot(snapshot: S, path: str, *, sync: bool = True) -> S:
    """Persist ``snapshot``'s top layer to ``path``; returns the file-backed snapshot.

    ``sync=False`` skips the fsyncs (file and directory): for content-addressed files whose
    writer can tell a torn file after a crash from its content hash and write it again."""
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
        "runs": {slot: [[r.first_page, r.count, r.layer, r.offset] for r in runs]
                 for slot, runs in snapshot.runs.items()},
        "parents": [{"sha256": layer.sha256, "path": _relative_path(layer.path, directory), "size": layer.size}
                    for layer in parents],
        "mapped_files": [{"path": f.path, "relpath": _relative_path(f.path, directory),
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

    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        content = hashlib.sha256()
        os.lseek(fd, data_offset, os.SEEK_SET)
        offset = 0
        while offset < data_size:
            chunk = top.read(offset, min(8 << 20, data_size - offset))
            content.update(chunk)
            _write_all(fd, chunk)
            offset += len(chunk)
        content.update(meta_bytes)
        _write_all(fd, meta_bytes)
        header = bytearray(PAGE)
        HEADER.pack_into(header, 0, MAGIC, FORMAT_VERSION, HEADER.size, 0, meta_offset, len(meta_bytes),
                         data_offset, data_size, file_size, content.digest(), 0)
        struct.pack_into("<I", header, HEADER_CRC_OFFSET, zlib.crc32(header[:HEADER_CRC_OFFSET]))
        os.pwrite(fd, bytes(header), 0)
        if sync:
            os.fsync(fd)
        os.fchmod(fd, 0o444)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if sync:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    read_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    layer = Layer(read_fd, data_size, content.digest(), path=path, data_offset=data_offset)
    _remember(path, read_fd, layer)
    return dataclasses.replace(snapshot, layers=parents + (layer,), path=path, info=dict(snapshot.info))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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


def _check_requirements(path: str, meta: dict) -> dict | None:
    """Refuse a file that needs another hlpool or guest ABI, KVM flavour or CPU vendor.
    Returns the ``requires`` map (None for files written before it existed)."""
    req = meta.get("requires")
    if req is None:
        return None

    def need(key: str, kind: type) -> Any:
        value = req.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _fail(path, f"metadata field 'requires.{key}' is missing or has the wrong type")
        return value

    if not isinstance(req, dict):
        raise _fail(path, "metadata field 'requires' is malformed")
    written_by = need("hlpool", str)
    if _major_minor(written_by) is None:
        raise _fail(path, f"metadata field 'requires.hlpool' is not a version: {written_by[:40]!r}")
    if _major_minor(written_by) != _major_minor(hlpool_version):
        raise _fail(path, f"written by hlpool {written_by[:40]}; this is hlpool {hlpool_version}, which opens files "
                    f"of hlpool {'.'.join(_major_minor(hlpool_version) or ())}.x only", SnapshotCompatibilityError)
    abi_version = need("abi", int)
    if abi_version != guest_abi.HL_ABI_VERSION:
        raise _fail(path, f"built for guest ABI version {abi_version}; this hlpool speaks guest ABI version "
                    f"{guest_abi.HL_ABI_VERSION} (rebuild the guest and its snapshot)", SnapshotCompatibilityError)
    kvm, vendor = need("kvm", str), need("cpu_vendor", str)
    need("xcr0", int)
    layouts = need("xsave", list)
    if not all(isinstance(c, list) and len(c) == 3 and all(type(v) is int for v in c) and 0 <= c[0] < 64
               for c in layouts):
        raise _fail(path, "metadata field 'requires.xsave' is malformed")
    host = _host()
    if host is None:
        return req
    if kvm != host.kvm:
        raise _fail(path, f"written for KVM flavour {kvm[:40]!r}, this host is {host.kvm!r}",
                    SnapshotCompatibilityError)
    if vendor != host.cpu_vendor:
        raise _fail(path, f"its vCPU state was saved on a {vendor[:40]!r} CPU, this host's is {host.cpu_vendor!r}",
                    SnapshotCompatibilityError)
    return req


def _check_xsave(path: str, req: dict | None, vcpu: VcpuState) -> None:
    """The vCPU state's XSAVE components must exist on this host, laid out as the file recorded."""
    host = _host()
    if req is None or host is None:
        return
    xcr0 = xcr0_of(vcpu.xcrs)
    if xcr0 & ~host.xcr0:
        missing = [n for n in range(64) if (xcr0 & ~host.xcr0) >> n & 1]
        raise _fail(path, f"its vCPU state enables XSAVE components {missing} (XCR0 {xcr0:#x}); this host's KVM "
                    f"supports XCR0 {host.xcr0:#x}", SnapshotCompatibilityError)
    for n, offset, size in req["xsave"]:
        if xcr0 >> n & 1 and host.xsave.get(n) != (offset, size):
            here = host.xsave.get(n)
            raise _fail(path, f"its XSAVE area holds component {n} at offset {offset}, size {size}; this host's at "
                        f"{'offset %d, size %d' % here if here else 'nowhere'}", SnapshotCompatibilityError)


# ---- reading ----------------------------------------------------------------------------

# Content hashes of files already verified in this process, by (path, inode, size,
# mtime_ns): children sharing a base do not hash it again.
_verified: dict[tuple[str, int, int, int], bytes] = {}
_verified_lock = threading.Lock()


def _remember(path: str, fd: int, layer: Layer) -> None:
    st = os.fstat(fd)
    layer.fingerprint = fingerprint(st)
    with _verified_lock:
        _verified[(path, st.st_ino, st.st_size, st.st_mtime_ns)] = layer.sha256


class _Header:
    def __init__(self, path: str, raw: bytes, actual_size: int) -> None:
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


def _open_layer(path: str, expected_sha256: bytes | None, max_layer: int) -> tuple[Layer, dict[str, Any]]:
    """Open, hash and parse one snapshot file. Returns its layer and metadata."""
    try:
        fd, st = open_regular(path)
    except FileNotFoundError:
        raise SnapshotParentError(f"{path}: no such snapshot file") if expected_sha256 else \
            SnapshotError(f"{path}: no such file") from None
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot open: {exc.strerror}") from None
    try:
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
            content = hashlib.sha256()
            offset = header.data_offset
            while offset < header.file_size:
                chunk = os.pread(fd, min(8 << 20, header.file_size - offset), offset)
                if not chunk:
                    raise _fail(path, "file shrank while being read")
                content.update(chunk)
                offset += len(chunk)
            if content.digest() != header.content_sha256:
                raise _fail(path, "content hash mismatch: the file was modified or corrupted after it was "
                            "written", SnapshotIntegrityError)
        elif known != header.content_sha256:
            raise _fail(path, "content hash changed", SnapshotIntegrityError)
        meta_raw = os.pread(fd, header.meta_size, header.meta_offset)
        if len(meta_raw) != header.meta_size:
            raise _fail(path, "truncated metadata")
        try:
            meta = msgspec.msgpack.decode(meta_raw)
        except RecursionError:
            raise _fail(path, "malformed metadata: nested too deeply") from None
        except Exception as exc:  # whatever the decoder raises, the file is at fault
            raise _fail(path, f"malformed metadata: {exc}") from None
        if not isinstance(meta, dict):
            raise _fail(path, "malformed metadata (not a map)")
    except OSError as exc:  # e.g. EIO from a procfs file that claims to be regular
        os.close(fd)
        raise _fail(path, f"cannot read: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    layer = Layer(fd, header.data_size, header.content_sha256, path=path, data_offset=header.data_offset)
    _remember(path, fd, layer)
    return layer, meta


def _get(meta: dict, key: str, kind: type | tuple[type, ...], path: str) -> Any:
    value = meta.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise _fail(path, f"metadata field {key!r} is missing or has the wrong type")
    return value


def _parse_runs(raw: Any, path: str, slot: str) -> list[Run]:
    if not isinstance(raw, list) or len(raw) > MAX_RUNS:
        raise _fail(path, f"runs of slot {slot} are malformed")
    runs = []
    for item in raw:
        if not (type(item) is list and len(item) == 4):
            raise _fail(path, f"a run of slot {slot} is malformed")
        first, count, layer, offset = item
        if not (type(first) is int and type(count) is int and type(layer) is int and type(offset) is int):
            raise _fail(path, f"a run of slot {slot} is malformed")
        runs.append(Run(first, count, layer, offset))
    return runs


def _parse_vcpu(raw: Any, path: str) -> VcpuState:
    if not isinstance(raw, dict):
        raise _fail(path, "vCPU state is malformed")
    sizes = {"regs": 144, "sregs": 312, "xcrs": 392, "debugregs": 128, "events": 64}
    fields = {}
    for name in ("regs", "sregs", "xsave", "xcrs", "debugregs", "events"):
        value = raw.get(name)
        if not isinstance(value, bytes) or (name in sizes and len(value) != sizes[name]):
            raise _fail(path, f"vCPU field {name!r} is malformed")
        fields[name] = value
    if len(fields["xsave"]) != 4096:
        raise _fail(path, "vCPU XSAVE area has an unexpected size")
    # struct kvm_debugregs: db[4], dr6, dr7, flags, reserved[9]; KVM rejects high bits in dr6/dr7 and flags
    dr6, dr7, flags, *reserved = struct.unpack_from("<QQQ9Q", fields["debugregs"], 32)
    if dr6 >> 32 or dr7 >> 32 or flags or any(reserved):
        raise _fail(path, "vCPU debug registers are malformed")
    msrs = raw.get("msrs")
    if not isinstance(msrs, list) or not all(isinstance(m, list) and len(m) == 2 and all(type(v) is int for v in m)
                                             for m in msrs):
        raise _fail(path, "vCPU MSR list is malformed")
    return VcpuState(msrs={m[0]: m[1] for m in msrs}, **fields)


_layouts: dict[tuple, Layout] = {}  # (memory configuration, image size) -> Layout: one per family, not per file


def _layout_of(config_raw: dict, image_size: int) -> Layout:
    """The layout a file describes; layouts are values, so files that describe the same one share it
    (a worker opening thousands of children of one base computes it once)."""
    items = tuple(sorted((k, v) for k, v in config_raw.items() if isinstance(k, str)))
    key = (items, image_size)
    try:
        return _layouts[key]
    except (KeyError, TypeError):  # TypeError: an unhashable value, refused by MemoryConfig below
        pass
    layout = Layout(MemoryConfig(**dict(items)), image_size)
    if len(_layouts) < 256:
        _layouts[key] = layout
    return layout


def read_snapshot(path: str, make: Callable[..., S], *, max_memory: int | None = None,
                  max_layer_size: int | None = None, files_path: Sequence[str] = (), _expected: bytes | None = None,
                  _depth: int = 0, parents: "dict[bytes, S] | None" = None) -> S:
    """Validate and open the snapshot at ``path`` (and its parent chain); ``make`` builds the
    value (the :class:`~hlpool.Snapshot` class or a subclass) from its fields.

    ``parents``: snapshots opened (and validated) before, by the content hash of their top layer;
    a parent found there is used as it is (a child names its parent by that hash), and parents
    opened here are added: a worker opening many children of one base reads and hashes it once."""
    path = os.path.abspath(path)
    if _depth > MAX_DEPTH:
        raise _fail(path, f"parent chain deeper than {MAX_DEPTH}", SnapshotParentError)
    layer, meta = _open_layer(path, _expected,
                              max_layer_size if max_layer_size is not None else DEFAULT_MAX_LAYER)
    try:
        requires = _check_requirements(path, meta)
        config_raw = _get(meta, "config", dict, path)
        try:
            layout = _layout_of(config_raw, _get(meta, "image_size", int, path))
        except (TypeError, SnapshotError) as exc:
            raise _fail(path, f"invalid memory configuration: {exc}") from None
        except Exception as exc:
            raise _fail(path, f"invalid memory configuration: {exc}") from None
        limit = max_memory if max_memory is not None else DEFAULT_MAX_MEMORY
        if layout.guest_memory_size > limit:
            raise _fail(path, f"describes {layout.guest_memory_size} bytes of guest memory, over the "
                        f"{limit}-byte limit", SnapshotTooLargeError)
        exports = _get(meta, "exports", list, path)
        if len(exports) > 256 or not all(isinstance(e, str) and 0 < len(e) < 64 for e in exports):
            raise _fail(path, "export list is malformed")
        segments = _get(meta, "image_segments", list, path)
        if not all(isinstance(s, list) and len(s) == 3 and type(s[0]) is int and type(s[1]) is int
                   and isinstance(s[2], str) for s in segments):
            raise _fail(path, "image segment list is malformed")
        vcpu = _parse_vcpu(meta.get("vcpu"), path)
        _check_xsave(path, requires, vcpu)
        runs_raw = _get(meta, "runs", dict, path)
        runs = {slot: _parse_runs(runs_raw.get(slot), path, slot) for slot in ("system", "main")}

        parents_raw = _get(meta, "parents", list, path)
        parent: S | None = None
        if parents_raw:
            last = parents_raw[-1]
            if not (isinstance(last, dict) and isinstance(last.get("path"), str)
                    and isinstance(last.get("sha256"), bytes)):
                raise _fail(path, "parent reference is malformed")
            parent_path = os.path.normpath(os.path.join(os.path.dirname(path), last["path"]))
            parent = parents.get(last["sha256"]) if parents is not None else None
            if parent is None:
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
            if parent.layout != layout:
                raise _fail(path, "parent has a different memory layout", SnapshotParentError)
        layers = (parent.layers if parent else ()) + (layer,)
        sizes = [lay.size for lay in layers]
        for slot, slot_runs in runs.items():
            try:
                check_runs(slot_runs, getattr(layout, slot).size // PAGE, sizes, f"{path}: {slot} slot")
            except SnapshotError as exc:
                raise SnapshotFormatError(str(exc)) from None

        files = []
        for f in _get(meta, "mapped_files", list, path):
            if not (isinstance(f, dict) and isinstance(f.get("path"), str) and type(f.get("guest_address")) is int
                    and type(f.get("size")) is int and isinstance(f.get("sha256"), bytes)):
                raise _fail(path, "mapped file entry is malformed")
            files.append(_verify_mapped_file(path, f, layout, files_path))
            if any(other.name == files[-1].name for other in files[:-1]):
                raise _fail(path, f"two mapped files have the guest name {files[-1].name!r}")
        info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
        return make(layout=layout, vcpu=vcpu, exports=tuple(exports), layers=layers, runs=runs,
                    image_segments=tuple(tuple(s) for s in segments), mapped_files=tuple(files),
                    parent=parent, path=path, info=info)
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
