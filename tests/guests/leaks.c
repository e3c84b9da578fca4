/* leaks: privileged state a hostile guest can write in one call and try to read in the next.
 *
 * Every function is X_swap(new) -> old: it reads a piece of CPU or memory state,
 * writes `new` into it and returns what it read. A test calls X_swap(secret) and then
 * X_swap(0): the second call must see what a fresh sandbox sees, never the secret.
 * A write the host forbids (an MSR write denied by the host's MSR filter) faults,
 * which ends that call with a GuestFault: also a pass. */
#include <hlpool.h>
#include <stdint.h>

/* ---- the PVM VIF page (guest-physical 0x1000), reached through the guest's own page tables ---- */

#define PTE_P 0x1ULL
#define PTE_RW 0x2ULL
#define PTE_US 0x4ULL /* PVM needs U/S on every level */
#define PTE_PS 0x80ULL

static uint64_t tables[6][512] __attribute__((aligned(4096)));

/* Identity-maps the first 4 GiB with 2 MiB pages (including page 0x1000, which the
 * host's page tables leave unmapped), loads it, runs `fn`, puts the host's tables back. */
static uint64_t with_identity_tables(uint64_t (*fn)(uint64_t), uint64_t arg) {
    uint64_t *pml4 = tables[0], *pdpt = tables[1];
    for (int i = 0; i < 512; i++) pml4[i] = pdpt[i] = 0;
    pml4[0] = (uint64_t)(uintptr_t)pdpt | PTE_P | PTE_RW | PTE_US;
    for (int g = 0; g < 4; g++) {
        uint64_t *pd = tables[2 + g];
        for (int i = 0; i < 512; i++)
            pd[i] = ((uint64_t)g << 30) + ((uint64_t)i << 21) | PTE_P | PTE_RW | PTE_US | PTE_PS;
        pdpt[g] = (uint64_t)(uintptr_t)pd | PTE_P | PTE_RW | PTE_US;
    }
    uint64_t old_cr3, result;
    __asm__ volatile("mov %%cr3, %0" : "=r"(old_cr3));
    __asm__ volatile("mov %0, %%cr3" : : "r"((uint64_t)(uintptr_t)pml4) : "memory");
    result = fn(arg);
    __asm__ volatile("mov %0, %%cr3" : : "r"(old_cr3) : "memory");
    return result;
}

static uint64_t vif_word_swap(uint64_t value) {
    volatile uint64_t *word = (volatile uint64_t *)(uintptr_t)(0x1000 + 2048);
    uint64_t old = *word;
    *word = value;
    return old;
}

static hl_value vif_swap(const hl_args *a) {
    return hl_int((int64_t)with_identity_tables(vif_word_swap, (uint64_t)hl_arg_int(a, 0)));
}

/* Writes to any guest-physical address below 4 GiB, past the host's page tables. */
static uint64_t phys_target;

static uint64_t phys_poke(uint64_t value) {
    *(volatile uint64_t *)(uintptr_t)phys_target = value;
    return 0;
}

static hl_value phys_write(const hl_args *a) {
    phys_target = (uint64_t)hl_arg_int(a, 0);
    return hl_int((int64_t)with_identity_tables(phys_poke, 1));
}

/* ---- MSRs, control and debug registers ---- */

static hl_value msr_swap(const hl_args *a) {
    uint32_t index = (uint32_t)hl_arg_int(a, 0);
    uint64_t value = (uint64_t)hl_arg_int(a, 1);
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(index));
    __asm__ volatile("wrmsr" : : "c"(index), "a"((uint32_t)value), "d"((uint32_t)(value >> 32)));
    return hl_int((int64_t)(((uint64_t)hi << 32) | lo));
}

static hl_value msr_read(const hl_args *a) {
    uint32_t index = (uint32_t)hl_arg_int(a, 0), lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(index));
    return hl_int((int64_t)(((uint64_t)hi << 32) | lo));
}

static hl_value cr8_swap(const hl_args *a) {
    uint64_t old, value = (uint64_t)hl_arg_int(a, 0);
    __asm__ volatile("mov %%cr8, %0" : "=r"(old));
    __asm__ volatile("mov %0, %%cr8" : : "r"(value));
    return hl_int((int64_t)old);
}

static hl_value dr_swap(const hl_args *a) {
    int n = (int)hl_arg_int(a, 0);
    uint64_t old = 0, value = (uint64_t)hl_arg_int(a, 1);
    switch (n) {
    case 0: __asm__ volatile("mov %%dr0, %0\n\tmov %1, %%dr0" : "=&r"(old) : "r"(value)); break;
    case 1: __asm__ volatile("mov %%dr1, %0\n\tmov %1, %%dr1" : "=&r"(old) : "r"(value)); break;
    case 2: __asm__ volatile("mov %%dr2, %0\n\tmov %1, %%dr2" : "=&r"(old) : "r"(value)); break;
    case 3: __asm__ volatile("mov %%dr3, %0\n\tmov %1, %%dr3" : "=&r"(old) : "r"(value)); break;
    default: return hl_error("dr_swap: register 0-3");
    }
    return hl_int((int64_t)old);
}

/* KERNEL_GS_BASE without wrmsr: swapgs exchanges it with the GS base. */
static hl_value kernel_gs_swap(const hl_args *a) {
    uint64_t value = (uint64_t)hl_arg_int(a, 0), gs, old;
    __asm__ volatile("rdgsbase %0" : "=r"(gs));
    __asm__ volatile("swapgs\n\trdgsbase %0\n\twrgsbase %1\n\tswapgs\n\twrgsbase %2"
                     : "=&r"(old) : "r"(value), "r"(gs) : "memory");
    return hl_int((int64_t)old);
}

/* ---- vector state beyond SSE ---- */

static int has_avx(void) {
    uint32_t a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    return (c >> 28) & 1;
}

static int has_avx512(void) {
    uint32_t a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    return (b >> 16) & 1;
}

/* Upper 128 bits of ymm7 (the legacy SSE restore never touches them). */
static hl_value ymm_upper_swap(const hl_args *a) {
    if (!has_avx()) return hl_error("no AVX");
    uint64_t value = (uint64_t)hl_arg_int(a, 0), old;
    uint64_t in[4] = {0, 0, value, value}, out[4];
    __asm__ volatile("vmovdqu %%ymm7, %0" : "=m"(out));
    __asm__ volatile("vmovdqu %0, %%ymm7" : : "m"(in));
    old = out[2];
    return hl_int((int64_t)old);
}

static hl_value zmm31_swap(const hl_args *a) {
    if (!has_avx512()) return hl_error("no AVX-512");
    uint64_t value = (uint64_t)hl_arg_int(a, 0), out[8], in[8];
    for (int i = 0; i < 8; i++) in[i] = value;
    __asm__ volatile("vmovdqu64 %%zmm31, %0" : "=m"(out));
    __asm__ volatile("vmovdqu64 %0, %%zmm31" : : "m"(in));
    return hl_int((int64_t)out[0]);
}

static hl_value kmask_swap(const hl_args *a) {
    if (!has_avx512()) return hl_error("no AVX-512");
    uint64_t value = (uint64_t)hl_arg_int(a, 0), old;
    __asm__ volatile("kmovq %%k5, %0" : "=r"(old));
    __asm__ volatile("kmovq %0, %%k5" : : "r"(value));
    return hl_int((int64_t)old);
}

/* Clears CR0.WP (supervisor writes to read-only pages allowed on real x86) and writes to a
 * read-only page of the image: the write must end the call with a clear fault. */
static const uint64_t read_only_word = 7;

static hl_value wp_write(const hl_args *a) {
    uint64_t cr0;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("mov %0, %%cr0" : : "r"(cr0 & ~(1ULL << 16)));
    *(volatile uint64_t *)&read_only_word = (uint64_t)hl_arg_int(a, 0);
    __asm__ volatile("mov %0, %%cr0" : : "r"(cr0));
    return hl_int((int64_t)read_only_word);
}

static hl_value cpu_features(const hl_args *a) {
    (void)a;
    return hl_int(has_avx() | has_avx512() << 1);
}

int hl_main(void) {
    hl_export("vif_swap", vif_swap);
    hl_export("phys_write", phys_write);
    hl_export("msr_swap", msr_swap);
    hl_export("msr_read", msr_read);
    hl_export("cr8_swap", cr8_swap);
    hl_export("dr_swap", dr_swap);
    hl_export("kernel_gs_swap", kernel_gs_swap);
    hl_export("ymm_upper_swap", ymm_upper_swap);
    hl_export("zmm31_swap", zmm31_swap);
    hl_export("kmask_swap", kmask_swap);
    hl_export("wp_write", wp_write);
    hl_export("cpu_features", cpu_features);
    return 0;
}
