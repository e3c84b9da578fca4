/* touch: writes to n distinct heap pages (and reads memory), for restore tests and benchmarks. */
#include <hlpool.h>
#include <stdlib.h>
#include <string.h>

#define PAGE 4096

static uint8_t *area;
static size_t area_pages;

/* touch(n[, seed]): writes one word into each of n distinct pages; returns a checksum. */
static hl_value touch(const hl_args *args) {
    int64_t n = hl_arg_int(args, 0);
    uint64_t seed = hl_argc(args) > 1 ? (uint64_t)hl_arg_int(args, 1) : 1;
    if (n < 0 || (size_t)n > area_pages) return hl_error("touch(%lld): at most %zu pages", (long long)n, area_pages);
    uint64_t sum = 0;
    for (int64_t i = 0; i < n; i++) {
        uint64_t *word = (uint64_t *)(area + (size_t)i * PAGE);
        sum += *word; /* 0 unless an earlier call's write survived a restore */
        *word = seed + (uint64_t)i;
        sum += *word;
    }
    return hl_int((int64_t)sum);
}

/* write(offsets, values): writes values[i] (int) at byte offset offsets[i] of the area. */
static hl_value write_words(const hl_args *args) {
    hl_value offsets = hl_arg(args, 0), values = hl_arg(args, 1);
    size_t n = hl_len(offsets);
    if (hl_len(values) != n) return hl_error("offsets and values differ in length");
    for (size_t i = 0; i < n; i++) {
        int64_t off = hl_as_int(hl_item(offsets, i), "offset");
        if (off < 0 || (size_t)off + 8 > area_pages * PAGE) return hl_error("offset %lld out of range", (long long)off);
        int64_t v = hl_as_int(hl_item(values, i), "value");
        memcpy(area + off, &v, 8);
    }
    return hl_none();
}

/* read(offset, length): bytes of the area. */
static hl_value read_area(const hl_args *args) {
    int64_t off = hl_arg_int(args, 0), len = hl_arg_int(args, 1);
    if (off < 0 || len < 0 || (size_t)(off + len) > area_pages * PAGE) return hl_error("range out of bounds");
    return hl_bytes(area + off, (size_t)len);
}

/* pages(): how many pages touch() may use. */
static hl_value pages(const hl_args *args) {
    (void)args;
    return hl_int((int64_t)area_pages);
}

/* bump(): a counter that grows with every call whose state survives (restore=False). */
static int64_t counter;
static hl_value bump(const hl_args *args) {
    (void)args;
    return hl_int(++counter);
}

int hl_main(void) {
    /* Most of the heap, allocated once: its pages stay zero (unbacked) in the snapshot.
     * The largest calloc that succeeds, from 64 GiB down. */
    size_t bytes = (size_t)64 << 30;
    while (bytes >= PAGE && !(area = calloc(1, bytes))) bytes = bytes / 8 * 7;
    if (!area) return 1;
    area_pages = bytes / PAGE;
    hl_export("touch", touch);
    hl_export("write", write_words);
    hl_export("read", read_area);
    hl_export("pages", pages);
    hl_export("bump", bump);
    return 0;
}
