/*
 * pack_alloc.h - the interpreter guests' allocator for load(): what a script's load
 * allocates lies in few, contiguous pages.
 *
 * Why: a script's snapshot layer holds every page its load() wrote. With musl's
 * allocator (mallocng) each size class has its own group of pages (plus meta pages),
 * so even a one-line script wrote ~14 heap pages spread over the heap.
 *
 * - One small region, reserved by pack_init (an mmap from the runtime's heap). A block
 *   is an 8-byte header (the block's size, a multiple of 16, header included) followed
 *   by 16-byte-aligned data.
 * - Only between pack_begin_load() and pack_end_load() are new blocks carved from it, in
 *   order (a bump pointer), up to a budget per load; past the budget, and at every other
 *   time (the interpreter's start, calls), blocks come from libc's malloc as before. So
 *   calls behave exactly as with libc alone, and a load that allocates a lot stays no
 *   bigger than before.
 * - During a load, a freed block of this load goes to an exact-size list (blocks up to
 *   PACK_SMALL_MAX bytes) or back to the bump pointer if it is the last one; other freed
 *   region blocks stay where they are (blocks of an earlier load are part of the snapshot
 *   the load started from; outside a load nothing is taken from the region, so nothing
 *   is given back to it). A libc block freed during a load is left where it is (an object
 *   of the snapshot the load started from: giving it back would write libc's meta pages)
 *   until the load outgrows its budget; then libc blocks are freed again, so a load that
 *   makes much garbage does not keep it. What is left is bounded by the parent's heap.
 * - A libc block that grows during a load moves into the region, so the objects a load
 *   changes (the global object's properties, ...) are packed too.
 *
 * Not hardened like mallocng (a double free is not detected): a corrupted heap harms only
 * the guest itself, and the guest is inside the sandbox boundary anyway.
 */
#ifndef HLPOOL_PACK_ALLOC_H
#define HLPOOL_PACK_ALLOC_H

#include <malloc.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define PACK_GRAIN ((size_t)16)
#define PACK_HEADER ((size_t)8)
#define PACK_SMALL_MAX ((size_t)1024) /* blocks up to this size (header included) have exact lists */
#define PACK_SMALL_LISTS (PACK_SMALL_MAX / PACK_GRAIN + 1)
#define PACK_REGION_SIZE ((size_t)4 << 20)  /* the region (loads layered on loads share it)... */
#define PACK_REGION_SHARE 8                  /* ...at most this share of the heap (1/8), the rest is libc's */
#define PACK_LOAD_BUDGET ((size_t)64 << 10)  /* what one load may take from it */

typedef struct pack_free_block {
    struct pack_free_block *next;
} pack_free_block;

static struct {
    uintptr_t lo, hi;   /* the region; lo == hi == 0 when there is none */
    uintptr_t top;      /* header address of the next new block (top % 16 == 8) */
    uintptr_t sealed;   /* region blocks whose header is below this belong to earlier loads */
    uintptr_t limit;    /* top may not pass this during the current load (its budget) */
    int loading;
    int overflowed;     /* the current load took a block from libc: libc frees are real again */
    pack_free_block *small[PACK_SMALL_LISTS];
} pack;

/* Reserve the region: PACK_REGION_SIZE, or 1/PACK_REGION_SHARE of a heap of `heap_size` bytes if
 * that is less (calls allocate from libc, in the rest). Call once, before the first allocation. */
static inline void pack_init(size_t heap_size) {
    size_t bytes = heap_size / PACK_REGION_SHARE < PACK_REGION_SIZE ? heap_size / PACK_REGION_SHARE : PACK_REGION_SIZE;
    bytes &= ~(size_t)4095;
    void *p = bytes ? mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) : MAP_FAILED;
    if (p == MAP_FAILED) return; /* every block from libc */
    pack.lo = (uintptr_t)p;
    pack.hi = pack.lo + bytes;
    pack.top = pack.lo + PACK_HEADER;
    pack.sealed = pack.limit = pack.lo;
}

/* From now on new blocks come from the region, up to `budget` bytes. */
static inline void pack_begin_load(size_t budget) {
    pack.sealed = pack.top;
    pack.limit = budget < pack.hi - pack.top ? pack.top + budget : pack.hi;
    memset(pack.small, 0, sizeof pack.small);
    pack.loading = 1;
    pack.overflowed = 0;
}

static inline void pack_end_load(void) {
    pack.loading = 0;
    memset(pack.small, 0, sizeof pack.small);
}

static inline int pack_owns(const void *p) { return (uintptr_t)p - pack.lo < pack.hi - pack.lo; }
static inline size_t pack_size(const void *p) { return *(const size_t *)((uintptr_t)p - PACK_HEADER); }

static inline void *pack_malloc(size_t n) {
    if (pack.loading && n < pack.limit - pack.top) { /* n is bounded here: no overflow below */
        size_t size = (n + PACK_HEADER + PACK_GRAIN - 1) & ~(PACK_GRAIN - 1);
        if (size <= PACK_SMALL_MAX && pack.small[size / PACK_GRAIN]) {
            pack_free_block *f = pack.small[size / PACK_GRAIN];
            pack.small[size / PACK_GRAIN] = f->next;
            return f;
        }
        if (size <= pack.limit - pack.top) {
            uintptr_t h = pack.top;
            pack.top += size;
            *(size_t *)h = size;
            return (void *)(h + PACK_HEADER);
        }
    }
    if (pack.loading) pack.overflowed = 1;
    return malloc(n);
}

static inline size_t pack_usable_size(const void *p) {
    if (!p) return 0;
    return pack_owns(p) ? pack_size(p) - PACK_HEADER : malloc_usable_size((void *)p);
}

static inline void pack_free(void *p) {
    if (!p) return;
    if (!pack_owns(p)) {
        /* During a load that has not outgrown its budget, a libc block is an object of the
         * snapshot the load started from: leave it (libc would write its meta pages). */
        if (!pack.loading || pack.overflowed) free(p);
        return;
    }
    uintptr_t h = (uintptr_t)p - PACK_HEADER;
    if (!pack.loading || h < pack.sealed) return; /* not this load's: it stays (see the top) */
    size_t size = *(size_t *)h;
    if (h + size == pack.top) {
        pack.top = h;
    } else if (size <= PACK_SMALL_MAX) {
        pack_free_block *f = p;
        f->next = pack.small[size / PACK_GRAIN];
        pack.small[size / PACK_GRAIN] = f;
    }
}

static inline void *pack_realloc(void *p, size_t n) {
    if (!p) return pack_malloc(n);
    size_t have = pack_usable_size(p);
    if (!pack_owns(p)) {
        if (!pack.loading) return realloc(p, n);
        if (n <= have) return p; /* it fits: keep it (libc could move it to a smaller class) */
    } else {
        uintptr_t h = (uintptr_t)p - PACK_HEADER;
        size_t size = have + PACK_HEADER;
        if (pack.loading && h >= pack.sealed && h + size == pack.top && n < pack.limit - h) {
            /* the block below the bump pointer: resize it in place */
            size_t want = (n + PACK_HEADER + PACK_GRAIN - 1) & ~(PACK_GRAIN - 1);
            if (want <= pack.limit - h) {
                *(size_t *)h = want;
                pack.top = h + want;
                return p;
            }
        }
        if (n <= have) return p; /* it fits: keep it */
    }
    void *q = pack_malloc(n);
    if (!q) return NULL;
    memcpy(q, p, have < n ? have : n);
    pack_free(p);
    return q;
}

#endif
