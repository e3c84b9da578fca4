"""The one exception hierarchy of hlpool, and its wire form.

Everything hlpool raises on purpose derives from :class:`HlpoolError`. Errors
that describe what happened inside a guest keep the sandbox usable: the
sandbox is put back to its snapshot before the error reaches the caller.

An error crosses a process or network boundary as :meth:`HlpoolError.to_wire`
(a dict of plain values: type, stable code, message, details) and comes back
with :func:`from_wire`. The worker -> supervisor reports, the HTTP service's
error bodies and the client all use this pair, so the list of a fault's fields
is written once (:attr:`GuestFault.FIELDS`).
"""

from __future__ import annotations

from typing import Any, Mapping


class HlpoolError(Exception):
    """Base class of every error hlpool raises.

    ``code`` is the stable, machine-readable name of the error kind (the HTTP
    API's ``error.code``); subclasses set their own.
    """

    code = "internal"

    def details(self) -> dict[str, Any] | None:
        """Structured facts beyond the message (None when there are none)."""
        return None

    def to_wire(self) -> dict[str, Any]:
        """This error as plain values: ``{"type", "code", "message"[, "details"]}``."""
        wire: dict[str, Any] = {"type": type(self).__name__, "code": self.code, "message": str(self)}
        details = self.details()
        if details is not None:
            wire["details"] = details
        return wire


# ---- environment -----------------------------------------------------------------


class KvmError(HlpoolError):
    """KVM is missing, lacks a needed capability, or an ioctl failed."""


class KvmUnavailableError(KvmError):
    """``/dev/kvm`` cannot be opened (missing device, no permission)."""


# ---- inputs ----------------------------------------------------------------------


class GuestImageError(HlpoolError):
    """A guest ELF file is malformed, unsupported or does not fit its memory budget."""

    code = "snapshot_error"


class GuestBuildError(HlpoolError):
    """Compiling or linking a guest failed (the compiler's messages are in the text)."""


class SnapshotError(HlpoolError):
    """A snapshot file cannot be used."""

    code = "snapshot_error"


class SnapshotIncompatibleError(SnapshotError):
    """A sandbox cannot switch to this snapshot: it is not of the sandbox's family (another
    layout, memory configuration or base layer, or not a finished snapshot); the message
    names what differs. The sandbox stays usable on the snapshot it holds."""

    code = "snapshot_error"  # the wire form names the class; the HTTP status is that of every snapshot error


class SnapshotFormatError(SnapshotError):
    """The file is not a snapshot, is truncated, or its header or tables are inconsistent."""


class SnapshotVersionError(SnapshotError):
    """The snapshot was written in a format version this hlpool does not read."""


class SnapshotIntegrityError(SnapshotError):
    """A checksum or content hash does not match: the file was changed or corrupted."""


class SnapshotParentError(SnapshotError):
    """A layered snapshot's parent (or a mapped file it references) is missing or different."""


class SnapshotTooLargeError(SnapshotError):
    """The snapshot describes more memory than the configured limits allow."""


class SnapshotCompatibilityError(SnapshotError):
    """The snapshot needs something this host or this hlpool does not offer (hlpool version,
    guest ABI version, CPU vendor, XSAVE components, KVM flavour); the message names which."""

    code = "snapshot_error"


# ---- calls -----------------------------------------------------------------------


class CallError(HlpoolError):
    """The call itself is wrong: unknown function, bad arguments, payload too large."""

    code = "bad_request"


class PayloadTooLargeError(CallError):
    """Arguments or a result do not fit the sandbox's I/O buffers."""

    code = "payload_too_large"


class GuestError(HlpoolError):
    """The guest reported an error (``hl_error()``, ``exit()``, ``abort()``)."""

    code = "guest_error"


class GuestProtocolError(GuestError):
    """The guest broke the host/guest protocol (malformed or oversized output)."""


class GuestFault(HlpoolError):
    """The guest took a CPU exception (or the VM stopped in a way only a fault explains).

    Attributes: ``vector`` (number or None), ``vector_name`` (e.g. ``"#PF page fault"``),
    ``error_code``, ``rip`` and ``address`` (the faulting address for page faults and
    read-only mapping violations, else None).
    """

    code = "guest_fault"

    FIELDS = ("vector", "vector_name", "error_code", "rip", "address")

    def __init__(
        self,
        message: str,
        *,
        vector: int | None = None,
        vector_name: str | None = None,
        error_code: int | None = None,
        rip: int | None = None,
        address: int | None = None,
    ) -> None:
        super().__init__(message)
        self.vector = vector
        self.vector_name = vector_name
        self.error_code = error_code
        self.rip = rip
        self.address = address

    def details(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}


class GuestTimeout(HlpoolError):
    """The call ran past its deadline and was stopped."""

    code = "timeout"


class HostFunctionError(HlpoolError):
    """A host function called by the guest raised, or the guest called an unknown one.

    The original exception (if any) is the ``__cause__``.
    """

    code = "host_function_error"


# ---- sandbox and pool state ---------------------------------------------------------


class SandboxClosedError(HlpoolError):
    """The sandbox (or pool) was closed."""


class SandboxBrokenError(HlpoolError):
    """The sandbox cannot be put back to its snapshot and must be discarded."""


class WorkerCrashed(HlpoolError):
    """The worker process running a call died before answering."""

    code = "worker_crashed"


class NodeLostError(WorkerCrashed):
    """The cluster node (or its hlpool actor) running a call was lost before answering (:mod:`hlpool.ray`)."""


class PoolOverloadedError(HlpoolError):
    """The pool's queue is full and the pool was configured not to wait."""

    code = "overloaded"


class PoolClosedError(HlpoolError):
    """The pool was shut down."""

    code = "shutting_down"


# ---- the wire form ------------------------------------------------------------------

_BY_NAME: dict[str, type[HlpoolError]] = {}
_BY_CODE: dict[str, type[HlpoolError]] = {}


def _index() -> None:
    for obj in list(globals().values()):
        if isinstance(obj, type) and issubclass(obj, HlpoolError):
            _BY_NAME[obj.__name__] = obj
            _BY_CODE.setdefault(obj.code, obj)  # the first (most general) class of a code wins


def error_class(*, type_name: str | None = None, code: str | None = None) -> type[HlpoolError]:
    """The hlpool exception class for a wire ``type`` name, else for a ``code``, else HlpoolError."""
    if not _BY_NAME:
        _index()
    if type_name in _BY_NAME:
        return _BY_NAME[type_name]  # type: ignore[index]
    return _BY_CODE.get(code or "", HlpoolError)


def from_wire(wire: Mapping[str, Any], base: type[HlpoolError] | None = None) -> HlpoolError:
    """Rebuild an exception from :meth:`HlpoolError.to_wire` output. Never raises: anything
    malformed becomes a plain :class:`HlpoolError` naming what arrived.

    ``base`` overrides the class (e.g. the client's Remote* classes for a code).
    """
    if not isinstance(wire, Mapping):
        return HlpoolError(f"unreadable error report ({type(wire).__name__})")
    type_name = wire.get("type") if isinstance(wire.get("type"), str) else None
    code = wire.get("code") if isinstance(wire.get("code"), str) else None
    message = str(wire.get("message", ""))
    cls = base or error_class(type_name=type_name, code=code)
    if cls is HlpoolError and type_name and type_name not in _BY_NAME:
        message = f"{type_name}: {message}"  # a non-hlpool exception on the other side
    details = wire.get("details")
    exc = cls.__new__(cls)
    if issubclass(cls, GuestFault):
        fields = {k: details.get(k) for k in GuestFault.FIELDS} if isinstance(details, Mapping) else {}
        GuestFault.__init__(exc, message, **fields)
    else:
        HlpoolError.__init__(exc, message)
    return exc
