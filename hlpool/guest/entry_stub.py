"""The entry stub: host-written code every restored call starts in.

Restoring memory and general registers (sync regs) is not enough: the x87,
SSE and MXCSR state would carry one call's data into the next (memcpy
leaves bytes in XMM registers). Reloading it with KVM_SET_XSAVE costs an
ioctl per call (~9 us on PVM). Instead the host points RIP at this stub,
which lives in the control page (host-written, read-only to the guest at
stage 2, mapped read+execute), and runs before any guest instruction::

    fxrstor64 image(%rip)      ; x87/SSE/MXCSR := the snapshot's values
    jmp *resume(%rip)          ; continue where the snapshot stopped

It touches no general register and no guest memory, so every register the
guest sees is exactly the snapshot's. What it does not reset (AVX upper
halves, MSRs, XCR0, debug registers: state only privileged guest code can
change on purpose) is reset by ``Sandbox(strict_cpu_reset=True)``.
"""

from __future__ import annotations

import struct

from hlpool.guest.layout import PAGE

RESUME_OFFSET = 0x80   # qword: the snapshot's RIP
IMAGE_OFFSET = 0x100   # 512-byte FXSAVE image (16-byte aligned)
FXSAVE_SIZE = 512


def fxsave_image(xsave: bytes) -> bytes:
    """The FXSAVE part of a KVM XSAVE area, with components in their init state made explicit.

    XSTATE_BV (at byte 512) says which components hold live state; where the
    x87 or SSE bit is clear, the legacy bytes are replaced by init values so
    fxrstor loads exactly what xrstor would.
    """
    image = bytearray(xsave[:FXSAVE_SIZE])
    xstate_bv = struct.unpack_from("<Q", xsave, 512)[0] if len(xsave) >= 520 else 3
    if not xstate_bv & 1:  # x87 in init state
        mxcsr = image[24:32]
        image[0:160] = bytes(160)
        struct.pack_into("<H", image, 0, 0x037F)  # FCW
        image[24:32] = mxcsr
    if not xstate_bv & 2:  # SSE registers in init state
        image[160:416] = bytes(256)
    return bytes(image)


def control_page(resume_rip: int, fxsave_image: bytes) -> bytes:
    """The control page for a snapshot whose vCPU stopped at ``resume_rip``.

    ``fxsave_image`` is the legacy (first 512 bytes) part of the snapshot's
    XSAVE area, which is exactly the FXSAVE format.
    """
    if len(fxsave_image) != FXSAVE_SIZE:
        raise ValueError("fxsave image must be 512 bytes")
    page = bytearray(PAGE)
    # fxrstor64 rel32(%rip): REX.W 0F AE /1, ModRM 00 001 101 (RIP-relative)
    fxrstor_end = 8
    page[0:4] = b"\x48\x0f\xae\x0d"
    struct.pack_into("<i", page, 4, IMAGE_OFFSET - fxrstor_end)
    # jmp *rel32(%rip): FF /4, ModRM 00 100 101
    jmp_end = fxrstor_end + 6
    page[fxrstor_end:fxrstor_end + 2] = b"\xff\x25"
    struct.pack_into("<i", page, fxrstor_end + 2, RESUME_OFFSET - jmp_end)
    struct.pack_into("<Q", page, RESUME_OFFSET, resume_rip)
    page[IMAGE_OFFSET:IMAGE_OFFSET + FXSAVE_SIZE] = fxsave_image
    return bytes(page)
