"""The one exception hierarchy of hlpool.

Everything hlpool raises on purpose derives from :class:`HlpoolError`. Errors
that describe what happened inside a guest keep the sandbox usable: the
sandbox is put back to its snapshot before the error reaches the caller.
"""

from __future__ import annotations


class HlpoolError(Exception):
    """Base class of every error hlpool raises."""


# ---- environment -----------------------------------------------------------------


class KvmError(HlpoolError):
    """KVM is missing, lacks a needed capability, or an ioctl failed."""


class KvmUnavailableError(KvmError):
    """``/dev/kvm`` cannot be opened (missing device, no permission)."""


# ---- inputs ----------------------------------------------------------------------


class GuestImageError(HlpoolError):
    """A guest ELF file is malformed, unsupported or does not fit its memory budget."""


class GuestBuildError(HlpoolError):
    """Compiling or linking a guest failed (the compiler's messages are in the text)."""


class SnapshotError(HlpoolError):
    """A snapshot file cannot be used."""


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


# ---- calls -----------------------------------------------------------------------


class CallError(HlpoolError):
    """The call itself is wrong: unknown function, bad arguments, payload too large."""


class PayloadTooLargeError(CallError):
    """Arguments or a result do not fit the sandbox's I/O buffers."""


class GuestError(HlpoolError):
    """The guest reported an error (``hl_error()``, ``exit()``, ``abort()``)."""


class GuestProtocolError(GuestError):
    """The guest broke the host/guest protocol (malformed or oversized output)."""


class GuestFault(HlpoolError):
    """The guest took a CPU exception (or the VM stopped in a way only a fault explains).

    Attributes: ``vector`` (number or None), ``vector_name`` (e.g. ``"#PF page fault"``),
    ``error_code``, ``rip`` and ``address`` (the faulting address for page faults and
    read-only mapping violations, else None).
    """

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


class GuestTimeout(HlpoolError):
    """The call ran past its deadline and was stopped."""


class HostFunctionError(HlpoolError):
    """A host function called by the guest raised, or the guest called an unknown one.

    The original exception (if any) is the ``__cause__``.
    """


# ---- sandbox and pool state ---------------------------------------------------------


class SandboxClosedError(HlpoolError):
    """The sandbox (or pool) was closed."""


class SandboxBrokenError(HlpoolError):
    """The sandbox cannot be put back to its snapshot and must be discarded."""


class WorkerCrashed(HlpoolError):
    """The worker process running a call died before answering."""


class PoolOverloadedError(HlpoolError):
    """The pool's queue is full and the pool was configured not to wait."""


class PoolClosedError(SandboxClosedError):
    """The pool was shut down."""
