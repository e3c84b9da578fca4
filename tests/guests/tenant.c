/* tenant: a guest whose children (tenants) differ in a few pages and in CPU state, for the
 * switch tests (tests/test_switch.py).
 *
 * plant(seed, pages) writes secrets derived from `seed` into every area a guest can write:
 * static data (`pages` pages of it), the heap (a malloc'ed block), the stack (a deep
 * buffer), xmm0-15 and the upper halves of ymm0-15, the x87 control word and MXCSR,
 * debug registers DR0-3, DR6 and DR7 (no breakpoint enabled), CR8 and KERNEL_GS_BASE (via
 * swapgs); shrink_xcr0() writes XCR0 (x87|SSE only). A test derives tenants with
 * plant(..., restore=False) + snapshot(), and also calls it on a sandbox it then switches
 * away from, to leave secrets in the CPU state a call does not reset.
 *
 * state() returns, as bytes, every piece of CPU state plant() writes (read first thing:
 * the same code runs before it in every sandbox, so two sandboxes at the same snapshot
 * return the same bytes). scribble(seed, pages) writes many heap/data pages (so restore
 * drops some). */
#include <hlpool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DATA_PAGES 48
static uint8_t data_area[DATA_PAGES][4096] __attribute__((aligned(4096))) = {{1}}; /* .data, not .bss */
static uint8_t *heap_block;
static uint64_t plants;

static uint64_t mix(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return x;
}

static int has_avx(void) {
    uint32_t a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    return (c >> 28) & 1;
}

static __attribute__((noinline)) void fill_stack(uint64_t seed) {
    volatile uint64_t buf[2048]; /* 16 KiB of stack */
    for (int i = 0; i < 2048; i++) buf[i] = mix(seed + i);
    __asm__ volatile("" : : "r"(buf) : "memory");
}

static void plant_cpu(uint64_t seed) {
    uint64_t v[4];
    for (int i = 0; i < 4; i++) v[i] = mix(seed * 31 + i);
    if (has_avx()) {
        __asm__ volatile("vmovdqu %0, %%ymm0\n\tvmovdqu %0, %%ymm1\n\tvmovdqu %0, %%ymm2\n\tvmovdqu %0, %%ymm3\n\t"
                         "vmovdqu %0, %%ymm4\n\tvmovdqu %0, %%ymm5\n\tvmovdqu %0, %%ymm6\n\tvmovdqu %0, %%ymm7\n\t"
                         "vmovdqu %0, %%ymm8\n\tvmovdqu %0, %%ymm9\n\tvmovdqu %0, %%ymm10\n\tvmovdqu %0, %%ymm11\n\t"
                         "vmovdqu %0, %%ymm12\n\tvmovdqu %0, %%ymm13\n\tvmovdqu %0, %%ymm14\n\tvmovdqu %0, %%ymm15"
                         : : "m"(v));
    } else {
        __asm__ volatile("movdqu %0, %%xmm0\n\tmovdqu %0, %%xmm7\n\tmovdqu %0, %%xmm15" : : "m"(v));
    }
    uint16_t fcw = (uint16_t)(0x0270 | ((seed & 3) << 10)); /* rounding control from the seed */
    uint32_t mxcsr = 0x1f80 | ((uint32_t)(seed & 3) << 13);
    __asm__ volatile("fldcw %0" : : "m"(fcw));
    __asm__ volatile("ldmxcsr %0" : : "m"(mxcsr));
    uint64_t d0 = mix(seed + 100) & ~7ULL, d1 = mix(seed + 101) & ~7ULL;
    uint64_t d2 = mix(seed + 102) & ~7ULL, d3 = mix(seed + 103) & ~7ULL;
    d0 &= 0x00007fffffffffffULL; d1 &= 0x00007fffffffffffULL; d2 &= 0x00007fffffffffffULL; d3 &= 0x00007fffffffffffULL;
    __asm__ volatile("mov %0, %%dr0\n\tmov %1, %%dr1\n\tmov %2, %%dr2\n\tmov %3, %%dr3"
                     : : "r"(d0), "r"(d1), "r"(d2), "r"(d3));
    /* DR7: no L/G enable bit (no breakpoint fires) and GD clear, but LE/GE and RW/LEN from the seed;
     * DR6: the status bits B0-B3 from the seed */
    uint64_t d7 = 0x400 | ((seed & 3) << 8) | ((mix(seed + 104) & 0xffff) << 16);
    uint64_t d6 = 0xffff0ff0 | (seed & 0xf);
    __asm__ volatile("mov %0, %%dr7\n\tmov %1, %%dr6" : : "r"(d7), "r"(d6));
    uint64_t cr8 = 1 + (seed % 14);
    __asm__ volatile("mov %0, %%cr8" : : "r"(cr8));
    uint64_t kgs = mix(seed + 200) & 0x00007ffffffff000ULL, gs;
    __asm__ volatile("rdgsbase %0" : "=r"(gs));
    __asm__ volatile("swapgs\n\twrgsbase %0\n\tswapgs\n\twrgsbase %1" : : "r"(kgs), "r"(gs) : "memory");
}

static hl_value plant(const hl_args *a) {
    uint64_t seed = (uint64_t)hl_arg_int(a, 0);
    int pages = (int)hl_arg_int(a, 1);
    if (pages < 0 || pages > DATA_PAGES) return hl_error("plant: 0-%d pages", DATA_PAGES);
    for (int p = 0; p < pages; p++) {
        int page = (int)((seed + (uint64_t)p * 7) % DATA_PAGES);
        for (int i = 0; i < 4096; i += 8) *(uint64_t *)&data_area[page][i] = mix(seed ^ ((uint64_t)page << 20) ^ i);
    }
    if (!heap_block) heap_block = malloc(3 * 4096);
    if (!heap_block) return hl_error("plant: malloc failed");
    for (int i = 0; i < 3 * 4096; i += 8) *(uint64_t *)&heap_block[i] = mix(seed * 3 + i);
    fill_stack(seed);
    plants++;
    plant_cpu(seed);
    return hl_int((int64_t)plants);
}

struct cpu_state {
    uint8_t ymm[16][32];
    uint16_t fcw;
    uint16_t pad;
    uint32_t mxcsr;
    uint64_t dr[4], dr7, cr8, kgs, gs, fs, xcr0, dr6;
};

static hl_value state(const hl_args *a) {
    (void)a;
    struct cpu_state s;
    memset(&s, 0, sizeof(s));
    if (has_avx()) {
        __asm__ volatile("vmovdqu %%ymm0, 0(%0)\n\tvmovdqu %%ymm1, 32(%0)\n\tvmovdqu %%ymm2, 64(%0)\n\t"
                         "vmovdqu %%ymm3, 96(%0)\n\tvmovdqu %%ymm4, 128(%0)\n\tvmovdqu %%ymm5, 160(%0)\n\t"
                         "vmovdqu %%ymm6, 192(%0)\n\tvmovdqu %%ymm7, 224(%0)\n\tvmovdqu %%ymm8, 256(%0)\n\t"
                         "vmovdqu %%ymm9, 288(%0)\n\tvmovdqu %%ymm10, 320(%0)\n\tvmovdqu %%ymm11, 352(%0)\n\t"
                         "vmovdqu %%ymm12, 384(%0)\n\tvmovdqu %%ymm13, 416(%0)\n\tvmovdqu %%ymm14, 448(%0)\n\t"
                         "vmovdqu %%ymm15, 480(%0)" : : "r"(s.ymm) : "memory");
    } else {
        __asm__ volatile("movdqu %%xmm0, 0(%0)\n\tmovdqu %%xmm7, 224(%0)\n\tmovdqu %%xmm15, 480(%0)"
                         : : "r"(s.ymm) : "memory");
    }
    __asm__ volatile("fnstcw %0" : "=m"(s.fcw));
    __asm__ volatile("stmxcsr %0" : "=m"(s.mxcsr));
    __asm__ volatile("mov %%dr0, %0" : "=r"(s.dr[0]));
    __asm__ volatile("mov %%dr1, %0" : "=r"(s.dr[1]));
    __asm__ volatile("mov %%dr2, %0" : "=r"(s.dr[2]));
    __asm__ volatile("mov %%dr3, %0" : "=r"(s.dr[3]));
    __asm__ volatile("mov %%dr7, %0" : "=r"(s.dr7));
    __asm__ volatile("mov %%dr6, %0" : "=r"(s.dr6));
    __asm__ volatile("mov %%cr8, %0" : "=r"(s.cr8));
    uint64_t gs, kgs;
    __asm__ volatile("rdgsbase %0" : "=r"(gs));
    __asm__ volatile("swapgs\n\trdgsbase %0\n\tswapgs" : "=r"(kgs) : : "memory");
    s.gs = gs;
    s.kgs = kgs;
    __asm__ volatile("rdfsbase %0" : "=r"(s.fs));
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    s.xcr0 = ((uint64_t)hi << 32) | lo;
    return hl_bytes(&s, sizeof(s));
}

/* XCR0 := x87|SSE, as a hostile tenant may leave it (on VMX the next call's entry stub then
 * faults and the host reloads the whole vCPU state; on PVM guest code runs under the host's
 * XCR0, so only KVM's copy changes: a switch must still reset it). */
static hl_value shrink_xcr0(const hl_args *a) {
    (void)a;
    __asm__ volatile("xsetbv" : : "a"(3), "d"(0), "c"(0));
    return hl_int(0);
}

/* Reads back what the tenant's memory holds, as a digest (data area, heap block, plants). */
static hl_value digest(const hl_args *a) {
    (void)a;
    uint64_t h = plants;
    for (int p = 0; p < DATA_PAGES; p++)
        for (int i = 0; i < 4096; i += 8) h = mix(h ^ *(uint64_t *)&data_area[p][i]);
    if (heap_block)
        for (int i = 0; i < 3 * 4096; i += 8) h = mix(h ^ *(uint64_t *)&heap_block[i]);
    return hl_int((int64_t)h);
}

static hl_value scribble(const hl_args *a) {
    uint64_t seed = (uint64_t)hl_arg_int(a, 0);
    int pages = (int)hl_arg_int(a, 1);
    if (pages < 0 || pages > 200) return hl_error("scribble: 0-200 pages");
    for (int p = 0; p < DATA_PAGES; p++) data_area[p][(seed + p) % 4096] ^= 0x5a;
    uint8_t *block = malloc((size_t)pages * 4096 + 1);
    if (!block) return hl_error("scribble: malloc failed");
    for (int p = 0; p < pages; p++) memset(block + (size_t)p * 4096, (int)(seed + p) | 1, 4096);
    if (heap_block) heap_block[seed % (3 * 4096)] ^= 0xa5;
    return hl_int(pages);
}

/* The PVM VIF page (guest-physical 0x1000) is outside the snapshot's memory and unmapped in the
 * host's page tables: reach it through our own identity tables, as a hostile guest would. */
static uint64_t vif_tables[3][512] __attribute__((aligned(4096)));

static hl_value vif_write(const hl_args *a) {
    uint64_t value = (uint64_t)hl_arg_int(a, 0), old_cr3;
    uint64_t *pml4 = vif_tables[0], *pdpt = vif_tables[1], *pd = vif_tables[2];
    for (int i = 0; i < 512; i++) pml4[i] = pdpt[i] = pd[i] = 0;
    pml4[0] = (uint64_t)(uintptr_t)pdpt | 0x7;
    pdpt[0] = (uint64_t)(uintptr_t)pd | 0x7;
    for (int i = 0; i < 512; i++) pd[i] = ((uint64_t)i << 21) | 0x87; /* first GiB, 2 MiB pages, U/S */
    __asm__ volatile("mov %%cr3, %0" : "=r"(old_cr3));
    __asm__ volatile("mov %0, %%cr3" : : "r"((uint64_t)(uintptr_t)pml4) : "memory");
    *(volatile uint64_t *)(uintptr_t)(0x1000 + 1024) = value;
    __asm__ volatile("mov %0, %%cr3" : : "r"(old_cr3) : "memory");
    return hl_int(0);
}

int hl_main(void) {
    hl_export("vif_write", vif_write);
    hl_export("plant", plant);
    hl_export("state", state);
    hl_export("digest", digest);
    hl_export("scribble", scribble);
    hl_export("shrink_xcr0", shrink_xcr0);
    return 0;
}
