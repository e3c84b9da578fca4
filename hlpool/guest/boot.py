"""The state a guest boots from: system pages (boot info, GDT/TSS, page tables) and registers.

The guest starts directly in 64-bit mode (PVM.md, recipe step 3): no real
mode, no firmware. The host builds everything the CPU needs before the
first instruction; the runtime then installs its own IDT and syscall MSRs.
"""

from __future__ import annotations

import struct

from hlpool import _mapping
from hlpool.guest import abi
from hlpool.guest.elf import GuestImage
from hlpool.guest.layout import (
    BOOT_INFO,
    FILES_TABLE,
    GDT_PAGE,
    IMAGE_BASE,
    PAGE,
    PAGE_TABLES,
    SYSTEM_BASE,
    TSS_OFFSET,
    Layout,
)
from hlpool.kvm import abi as kvm_abi

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = 1, 2, 0x10, 0x20, 0x10000, 0x40000, 0x80000000
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_FSGSBASE, CR4_OSXSAVE = 0x20, 0x200, 0x400, 0x10000, 0x40000
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 0x1, 0x100, 0x400, 0x800

CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG  # 0x80050033
CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_FSGSBASE | CR4_OSXSAVE  # XSAVE: AVX and the entry stub's xrstor
XCR0_USABLE = 0x2FF  # x87, SSE, AVX, MPX (never set by KVM), AVX-512 (opmask, ZMM_Hi256, Hi16_ZMM), PKRU
EFER = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE  # 0xd01

SEL_CODE, SEL_DATA, SEL_TSS = 0x08, 0x10, 0x18
TSS_SIZE = 104
TSS_IST1_OFFSET = 0x24
MAX_PAGE_TABLE_PAGES = (IMAGE_BASE - PAGE_TABLES) // PAGE


def page_table_mappings(layout: Layout, image: GuestImage) -> list[tuple[int, int, int]]:
    """(address, size, perms) for everything the guest may touch; the rest stays unmapped."""
    W, X = _mapping.MAP_WRITE, _mapping.MAP_EXEC
    maps = [(BOOT_INFO, PAGE, 0), (GDT_PAGE, PAGE, 0), (FILES_TABLE, PAGE, 0)]
    for seg in image.segments:
        perms = (W if seg.writable else 0) | (X if seg.executable else 0)
        maps.append((IMAGE_BASE + seg.offset, seg.size, perms))
    for area in (layout.heap, layout.exception_stack):
        maps.append((area.start, area.size, W))
    maps.append((layout.out.start, layout.out.size + layout.log.size, W))
    maps.append((layout.stack.start, layout.stack.size + layout.call.size, W))
    maps.append((layout.control.start, layout.control.size, X))
    maps.append((layout.input.start, layout.input.size + layout.reply.size, 0))
    if layout.files.size:
        maps.append((layout.files.start, layout.files.size, 0))
    return maps


def _gdt_and_tss(layout: Layout) -> bytes:
    tss_base = GDT_PAGE + TSS_OFFSET
    tss_low = ((TSS_SIZE - 1) & 0xFFFF) | ((tss_base & 0xFFFFFF) << 16) | (0x8B << 40) | \
              (((tss_base >> 24) & 0xFF) << 56)
    gdt = struct.pack("<5Q", 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, tss_low, tss_base >> 32)
    tss = bytearray(TSS_SIZE)
    struct.pack_into("<Q", tss, TSS_IST1_OFFSET, layout.exception_stack.end)
    struct.pack_into("<H", tss, 102, TSS_SIZE)  # no I/O permission bitmap
    page = bytearray(PAGE)
    page[:len(gdt)] = gdt
    page[TSS_OFFSET:TSS_OFFSET + TSS_SIZE] = tss
    return bytes(page)


def boot_info(layout: Layout, image: GuestImage, tsc_khz: int) -> bytes:
    return abi.pack_boot_info(
        magic=abi.HL_BOOT_MAGIC, abi_version=abi.HL_ABI_VERSION,
        image_base=IMAGE_BASE, image_size=layout.image.size,
        phdr=image.phdr, phnum=image.phnum, phent=image.phent,
        heap_base=layout.heap.start, heap_size=layout.heap.size,
        stack_base=layout.stack.start, stack_size=layout.stack.size,
        in_base=layout.input.start, in_size=layout.input.size,
        reply_base=layout.reply.start, reply_size=layout.reply.size,
        out_base=layout.out.start, out_size=layout.out.size,
        log_base=layout.log.start, log_size=layout.log.size,
        tsc_khz=tsc_khz,
        files_base=layout.files.start, files_size=layout.files.size, files_table=FILES_TABLE,
        call_page=layout.call.start,
    )


def system_memory(layout: Layout, image: GuestImage, tsc_khz: int) -> bytearray:
    """Contents of the system slot (starting at SYSTEM_BASE)."""
    mem = bytearray(layout.system.size)

    def put(addr: int, data: bytes) -> None:
        mem[addr - SYSTEM_BASE:addr - SYSTEM_BASE + len(data)] = data

    put(BOOT_INFO, boot_info(layout, image, tsc_khz))
    put(GDT_PAGE, _gdt_and_tss(layout))
    tables = _mapping.build_page_tables(page_table_mappings(layout, image), PAGE_TABLES, MAX_PAGE_TABLE_PAGES)
    put(PAGE_TABLES, tables)
    return mem


def initial_sregs(template: kvm_abi.KvmSregs) -> kvm_abi.KvmSregs:
    """64-bit mode, paging on, flat segments; ``template`` is the vCPU's reset state."""
    s = kvm_abi.KvmSregs.from_buffer_copy(bytes(template))
    code = kvm_abi.KvmSegment(base=0, limit=0xFFFFFFFF, selector=SEL_CODE, type=11, present=1, dpl=0, db=0,
                              s=1, l=1, g=1)
    data = kvm_abi.KvmSegment(base=0, limit=0xFFFFFFFF, selector=SEL_DATA, type=3, present=1, dpl=0, db=1,
                              s=1, l=0, g=1)
    s.cs = code
    s.ds = s.es = s.fs = s.gs = s.ss = data
    s.tr = kvm_abi.KvmSegment(base=GDT_PAGE + TSS_OFFSET, limit=TSS_SIZE - 1, selector=SEL_TSS, type=11,
                              present=1, s=0)
    s.ldt = kvm_abi.KvmSegment(selector=0, type=2, present=1, unusable=1)
    s.gdt = kvm_abi.KvmDtable(base=GDT_PAGE, limit=5 * 8 - 1)
    s.idt = kvm_abi.KvmDtable(base=0, limit=0)
    s.cr0, s.cr3, s.cr4, s.efer = CR0, PAGE_TABLES, CR4, EFER
    return s


def initial_regs(layout: Layout, image: GuestImage) -> kvm_abi.KvmRegs:
    regs = kvm_abi.KvmRegs()
    regs.rip = image.entry
    regs.rsp = layout.stack.end
    regs.rdi = BOOT_INFO
    regs.rflags = 0x2
    return regs


def initial_xcrs(supported_xcr0: int) -> kvm_abi.KvmXcrs:
    """XCR0 for a new guest: x87, SSE and every usable component KVM supports (AVX, AVX-512, PKRU)."""
    xcrs = kvm_abi.KvmXcrs()
    xcrs.nr_xcrs = 1
    xcrs.xcrs[0].xcr = 0
    xcrs.xcrs[0].value = 0x3 | (supported_xcr0 & XCR0_USABLE & ~0x18)  # never MPX (bits 3-4)
    return xcrs
