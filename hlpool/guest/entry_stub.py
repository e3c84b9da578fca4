"""The entry stub: host-written code every restored call starts in.

Restoring memory and general registers (sync regs) is not enough: the x87,
SSE, AVX and AVX-512 state would carry one call's data into the next (memcpy
leaves bytes in vector registers). Reloading it with KVM_SET_XSAVE costs an
ioctl per call (~5 us each on PVM, see PVM.md). Instead the host points RIP at this stub,
which lives in the control page (host-written, read-only to the guest at
stage 2, mapped read+execute), and runs before any guest instruction::

    xrstor64 image(%rip)       ; every XSAVE component in the mask := the snapshot's
    movabs $snapshot_rax, %rax ; the host entered with RAX:RDX = the component mask
    movabs $snapshot_rdx, %rdx
    jmp *resume(%rip)          ; continue where the snapshot stopped

The image is the snapshot's XSAVE area (standard form) with every enabled
component made explicit in XSTATE_BV (init values where the snapshot had the
component in its init state), so xrstor loads exactly the snapshot's registers:
x87, MXCSR, XMM, the YMM upper halves, AVX-512 opmasks and ZMM (whatever the
snapshot's XCR0 enables and the control page can hold). Because XSTATE_BV names
every component of the snapshot's XCR0, a guest that shrank XCR0 with xsetbv
makes the stub fault (#GP) on the next call, which puts the whole vCPU state back
(see Machine._recover) instead of running on with a changed XCR0. The stub
touches no guest memory; RFLAGS is untouched (mov does not change flags).

What it does not reset (debug registers, XCR0 itself, CR8 and KERNEL_GS_BASE:
state only privileged guest code can change on purpose, and whose reset costs
an ioctl or a trapped instruction per call) is reset by ``strict_cpu_reset``,
for CR8 by one more instruction in this stub. A switch to another snapshot
resets all four: CR8 and KERNEL_GS_BASE by more instructions of this stub in
the first call after it (``cr8``/``kernel_gs_base`` of :func:`control_page`),
debug registers and XCR0 by two ioctls (hlpool.machine.switching), not here:
on PVM a ``mov`` to a debug register (~9 us) and ``xsetbv`` (~12 us) each trap
into the hypervisor's instruction emulator, so seven of them would cost more
than the ioctls.
MSRs need no reset: the host denies guest MSR writes (see hlpool.kvm.vm).
"""

from __future__ import annotations

import struct

from hlpool.guest.layout import PAGE

RESUME_OFFSET = 0x80   # qword: the snapshot's RIP
IMAGE_OFFSET = 0x100   # the XSAVE image (64-byte aligned, as xrstor requires)
MAX_IMAGE = PAGE - IMAGE_OFFSET
LEGACY_SIZE = 512      # x87 + SSE (the FXSAVE layout)
HEADER_SIZE = 64       # XSAVE header: XSTATE_BV, XCOMP_BV, reserved
X87, SSE = 1, 2
FCW_INIT = 0x037F
MXCSR_INIT = 0x1F80


def xcr0_of(xcrs: bytes) -> int:
    """XCR0 from a ``struct kvm_xcrs`` blob (3, x87|SSE, if there is none)."""
    if len(xcrs) >= 8:
        count = min(struct.unpack_from("<I", xcrs, 0)[0], 16)
        for i in range(count):
            xcr, _reserved, value = struct.unpack_from("<IIQ", xcrs, 8 + 16 * i)
            if xcr == 0:
                return value
    return X87 | SSE


def restore_image(xsave: bytes, xcr0: int, components: dict[int, tuple[int, int]]) -> tuple[bytes, int]:
    """The stub's XSAVE image and component mask for a snapshot's XSAVE area and XCR0.

    ``components`` maps each XSAVE component number >= 2 to its (offset, size)
    in the standard form (CPUID leaf 0xD). Components that do not fit in the
    control page are left out of the mask (``strict_cpu_reset`` restores them).
    """
    mask = xcr0 & (X87 | SSE)
    end = LEGACY_SIZE + HEADER_SIZE
    for number in sorted(components):
        offset, size = components[number]
        if xcr0 >> number & 1 and offset >= LEGACY_SIZE + HEADER_SIZE and offset + size <= MAX_IMAGE:
            mask |= 1 << number
            end = max(end, offset + size)
    image = bytearray(end)
    image[:min(len(xsave), end)] = xsave[:end]
    live = struct.unpack_from("<Q", image, LEGACY_SIZE)[0] if len(xsave) >= LEGACY_SIZE + 8 else X87 | SSE
    if not live & X87:  # init state: FCW=0x37F, the rest of the x87 area zero (MXCSR is kept)
        mxcsr = bytes(image[24:32])
        image[0:160] = bytes(160)
        struct.pack_into("<H", image, 0, FCW_INIT)
        image[24:32] = mxcsr
    if not live & SSE:
        image[160:416] = bytes(256)
    if len(xsave) < 32:
        struct.pack_into("<I", image, 24, MXCSR_INIT)
    for number in components:
        if mask >> number & 1 and not live >> number & 1:
            offset, size = components[number]
            image[offset:offset + size] = bytes(size)  # every component >= 2 initialises to zeros
    image[LEGACY_SIZE:LEGACY_SIZE + HEADER_SIZE] = bytes(HEADER_SIZE)
    struct.pack_into("<Q", image, LEGACY_SIZE, mask)  # XSTATE_BV: every component explicit; XCOMP_BV 0
    return bytes(image), mask


def control_page(resume_rip: int, rax: int, rdx: int, image: bytes, *, cr8: int | None = None,
                 kernel_gs_base: int | None = None) -> bytes:
    """The control page for a snapshot whose vCPU stopped at ``resume_rip`` with ``rax``/``rdx``.

    The host enters it with RAX = mask & 0xffffffff and RDX = mask >> 32 (the
    component mask of :func:`restore_image`). With ``cr8`` the stub also loads CR8
    (``strict_cpu_reset``: on PVM the task-priority register lives in the hypervisor,
    where KVM_SET_SREGS does not reach it; the guest-side ``mov`` is trapped, ~3 us).
    """
    if len(image) > MAX_IMAGE:
        raise ValueError(f"XSAVE image of {len(image)} bytes does not fit the control page")
    page = bytearray(PAGE)
    # xrstor64 rel32(%rip): REX.W 0F AE /5, ModRM 00 101 101 (RIP-relative)
    code = bytearray(b"\x48\x0f\xae\x2d") + struct.pack("<i", IMAGE_OFFSET - 8)
    if cr8 is not None:
        code += b"\x48\xb8" + struct.pack("<Q", cr8)  # movabs $cr8, %rax
        code += b"\x44\x0f\x22\xc0"  # mov %rax, %cr8
    if kernel_gs_base is not None:  # KERNEL_GS_BASE without an MSR write (needs CR4.FSGSBASE): after a switch
        code += b"\x0f\x01\xf8"  # swapgs
        code += b"\x48\xb8" + struct.pack("<Q", kernel_gs_base)  # movabs $kgs, %rax
        code += b"\xf3\x48\x0f\xae\xd8"  # wrgsbase %rax
        code += b"\x0f\x01\xf8"  # swapgs (GS base back to the sregs' value)
    code += b"\x48\xb8" + struct.pack("<Q", rax)  # movabs $rax, %rax
    code += b"\x48\xba" + struct.pack("<Q", rdx)  # movabs $rdx, %rdx
    jmp_end = len(code) + 6
    code += b"\xff\x25" + struct.pack("<i", RESUME_OFFSET - jmp_end)  # jmp *rel32(%rip)
    page[:len(code)] = code
    struct.pack_into("<Q", page, RESUME_OFFSET, resume_rip)
    page[IMAGE_OFFSET:IMAGE_OFFSET + len(image)] = image
    return bytes(page)
