/*
 * pages.c - a guest that writes chosen pages, for the working-set restore tests
 * (tests/test_working_set.py). Its area is AREA_PAGES pages: the first half is
 * filled with a pattern by hl_main (snapshot data pages), the second half stays
 * zero (zero pages in the snapshot), so restores copy from both kinds of source.
 */
#include <hlpool.h>
#include <stdint.h>
#include <string.h>

#define PAGE 4096
#define AREA_PAGES 96

static uint8_t area[AREA_PAGES * PAGE] __attribute__((aligned(PAGE)));

static uint8_t pattern(size_t page, size_t i) {
    return (uint8_t)(page * 131 + i * 7 + 1);
}

/* write(pages, fills): fills every byte of page pages[i] with fills[i] (0-255). */
static hl_value write_pages(const hl_args *a) {
    hl_value pages = hl_arg(a, 0), fills = hl_arg(a, 1);
    size_t n = hl_len(pages);
    if (hl_len(fills) != n) return hl_error("pages and fills differ in length");
    for (size_t i = 0; i < n; i++) {
        int64_t page = hl_as_int(hl_item(pages, i), "page");
        int64_t fill = hl_as_int(hl_item(fills, i), "fill");
        if (page < 0 || page >= AREA_PAGES || fill < 0 || fill > 255) return hl_error("bad page or fill");
        memset(area + (size_t)page * PAGE, (int)fill, PAGE);
    }
    return hl_none();
}

/* rewrite(pages): writes every byte of each page with the value it already holds (a write that changes nothing). */
static hl_value rewrite_pages(const hl_args *a) {
    hl_value pages = hl_arg(a, 0);
    for (size_t i = 0; i < hl_len(pages); i++) {
        int64_t page = hl_as_int(hl_item(pages, i), "page");
        if (page < 0 || page >= AREA_PAGES) return hl_error("bad page");
        volatile uint8_t *p = area + (size_t)page * PAGE;
        for (size_t j = 0; j < PAGE; j++) p[j] = p[j];
    }
    return hl_none();
}

/* pristine(): 1 if every page holds what hl_main left there (pattern, then zeros), else 0. */
static hl_value pristine(const hl_args *a) {
    (void)a;
    for (size_t page = 0; page < AREA_PAGES; page++)
        for (size_t i = 0; i < PAGE; i++)
            if (area[page * PAGE + i] != (page < AREA_PAGES / 2 ? pattern(page, i) : 0)) return hl_int(0);
    return hl_int(1);
}

/* info(): [guest address of the area, its pages]. */
static hl_value info(const hl_args *a) {
    (void)a;
    hl_value items[2] = {hl_int((int64_t)(uintptr_t)area), hl_int(AREA_PAGES)};
    return hl_list(2, items);
}

int hl_main(void) {
    for (size_t page = 0; page < AREA_PAGES / 2; page++)
        for (size_t i = 0; i < PAGE; i++) area[page * PAGE + i] = pattern(page, i);
    hl_export("write", write_pages);
    hl_export("rewrite", rewrite_pages);
    hl_export("pristine", pristine);
    hl_export("info", info);
    return 0;
}
