/*
 * heap.c - brk and anonymous mmap over the guest's heap region.
 *
 * The heap region [heap_base, heap_base + heap_size) is zero when the guest
 * starts. Its first pages hold a bitmap with one bit per heap page (set =
 * in use). brk grows upwards right after the bitmap; mmap hands out page
 * runs from the top downwards. Pages given back (munmap, brk shrink) are
 * zeroed at once, so every page handed out is zero, as Linux promises.
 */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#include "runtime.h"

#define PAGE HL_PAGE_SIZE

static uint64_t *bitmap;
static uintptr_t heap_lo, heap_hi;    /* usable pages (after the bitmap) */
static uintptr_t brk_start, brk_cur;  /* brk area: [brk_start, brk_cur) */
static uintptr_t mmap_low;            /* lowest page ever handed out by mmap */

static size_t page_index(uintptr_t a) { return (a - hl__boot->heap_base) / PAGE; }
static int page_used(size_t i) { return (bitmap[i / 64] >> (i % 64)) & 1; }
static void set_pages(size_t first, size_t n, int used) {
    for (size_t i = first; i < first + n; i++) {
        if (used)
            bitmap[i / 64] |= 1ull << (i % 64);
        else
            bitmap[i / 64] &= ~(1ull << (i % 64));
    }
}

void hl__heap_init(void) {
    uintptr_t base = hl__boot->heap_base;
    size_t pages = hl__boot->heap_size / PAGE;
    size_t bitmap_bytes = (pages + 63) / 64 * 8;
    size_t bitmap_pages = (bitmap_bytes + PAGE - 1) / PAGE;
    bitmap = (uint64_t *)base;
    heap_lo = base + bitmap_pages * PAGE;
    heap_hi = base + pages * PAGE;
    set_pages(0, bitmap_pages, 1);
    brk_start = brk_cur = heap_lo;
    mmap_low = heap_hi;
}

static uintptr_t page_up(uintptr_t a) { return (a + PAGE - 1) & ~(uintptr_t)(PAGE - 1); }

long hl__sys_brk(uintptr_t addr) {
    if (addr == 0 || addr < brk_start) return (long)brk_cur;
    uintptr_t old_end = page_up(brk_cur), new_end = page_up(addr);
    if (new_end > old_end) {
        if (new_end > heap_hi) return (long)brk_cur;
        for (size_t i = page_index(old_end); i < page_index(new_end); i++)
            if (page_used(i)) return (long)brk_cur; /* would run into an mmap */
        set_pages(page_index(old_end), page_index(new_end) - page_index(old_end), 1);
    } else if (new_end < old_end) {
        memset((void *)new_end, 0, old_end - new_end);
        set_pages(page_index(new_end), page_index(old_end) - page_index(new_end), 0);
    }
    brk_cur = addr;
    return (long)brk_cur;
}

/* Find n free pages, searching downwards from the top of the heap. */
static uintptr_t find_free_run(size_t n) {
    size_t lo = page_index(heap_lo), run = 0;
    for (size_t i = page_index(heap_hi); i-- > lo;) {
        if ((i % 64) == 63 && bitmap[i / 64] == ~0ull && i >= 63) {
            run = 0;
            i -= 63; /* skip a full word */
            continue;
        }
        if (page_used(i)) {
            run = 0;
            continue;
        }
        if (++run == n) return hl__boot->heap_base + i * PAGE;
    }
    return 0;
}

long hl__sys_mmap(uintptr_t addr, size_t len, int prot, int flags, int fd, long off) {
    (void)prot;
    (void)off;
    if (!(flags & MAP_ANONYMOUS) || fd != -1) return -ENODEV;
    if (flags & MAP_FIXED) return -EINVAL;
    (void)addr; /* a hint only */
    if (len == 0) return -EINVAL;
    if (len > heap_hi - heap_lo) return -ENOMEM;
    size_t n = page_up(len) / PAGE;
    uintptr_t a = find_free_run(n);
    if (!a || a < page_up(brk_cur)) return -ENOMEM;
    set_pages(page_index(a), n, 1);
    if (a < mmap_low) mmap_low = a;
    return (long)a;
}

long hl__sys_munmap(uintptr_t addr, size_t len) {
    if (addr % PAGE || len == 0) return -EINVAL;
    uintptr_t end = page_up(addr + len);
    if (addr < page_up(brk_cur) || end > heap_hi || end < addr) return -EINVAL;
    memset((void *)addr, 0, end - addr);
    set_pages(page_index(addr), (end - addr) / PAGE, 0);
    return 0;
}
