/* support.c - the log buffer, the per-call arena, clocks and randomness. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime.h"

/* ---- log ------------------------------------------------------------------- */

static struct hl_log_header *log_header(void) { return (struct hl_log_header *)(uintptr_t)hl__boot->log_base; }

void hl__log_reset(void) {
    struct hl_log_header *h = log_header();
    if (h->used) h->used = 0; /* write only when needed: every written page costs a restore */
    if (h->dropped) h->dropped = 0;
}

void hl__log_write(const char *data, size_t len) {
    struct hl_log_header *h = log_header();
    char *buf = (char *)h + HL_LOG_HEADER_SIZE;
    size_t cap = hl__boot->log_size - HL_LOG_HEADER_SIZE;
    while (len) {
        if (h->used >= cap) {
            hl__signal(HL_EV_LOG_FULL); /* the host drains the buffer */
            h->used = 0;
        }
        size_t n = cap - h->used;
        if (n > len) n = len;
        memcpy(buf + h->used, data, n);
        h->used += n;
        data += n;
        len -= n;
    }
}

void hl_log(const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n > sizeof line - 2) n = sizeof line - 2;
    line[n++] = '\n';
    hl__log_write(line, (size_t)n);
}

/* ---- arena ----------------------------------------------------------------- */

/* Three tiers: the rest of the call page (restored wholesale, costs nothing
 * extra), then a static buffer in .bss, then malloc'd chunks, chained and
 * freed when the next call starts. */
#define ARENA2_SIZE 65536
static unsigned char arena2[ARENA2_SIZE] __attribute__((aligned(16)));

struct hl__chunk {
    struct hl__chunk *next;
    size_t used, size;
    unsigned char data[];
};

void hl__arena_reset(void) {
    struct hl__call_state *c = HL__CALL;
    c->arena_used = 0;
    if (c->arena2_used) c->arena2_used = 0;
    while (c->spill) {
        struct hl__chunk *next = c->spill->next;
        free(c->spill);
        c->spill = next;
    }
}

void *hl__arena_alloc(size_t size) {
    struct hl__call_state *cs = HL__CALL;
    size = (size + 15) & ~(size_t)15;
    if (HL__ARENA1_SIZE - cs->arena_used >= size) {
        void *p = cs->arena + cs->arena_used;
        cs->arena_used += size;
        return p;
    }
    if (ARENA2_SIZE - cs->arena2_used >= size) {
        void *p = arena2 + cs->arena2_used;
        cs->arena2_used += size;
        return p;
    }
    struct hl__chunk *c = cs->spill;
    if (!c || c->size - c->used < size) {
        size_t want = size > 65536 ? size : 65536;
        c = malloc(sizeof *c + want);
        if (!c) hl__fail(HL_MSG_GUEST_ERROR, "out of memory (arena allocation of %zu bytes)", size);
        c->next = cs->spill;
        c->used = 0;
        c->size = want;
        cs->spill = c;
    }
    void *p = c->data + c->used;
    c->used += size;
    return p;
}

/* ---- clocks ------------------------------------------------------------------ */

void hl__clock_set_base(uint64_t realtime_ns, uint64_t tsc) {
    HL__CALL->base_realtime_ns = realtime_ns;
    HL__CALL->base_tsc = tsc;
}

static uint64_t tsc_to_ns(uint64_t ticks) {
    uint64_t khz = hl__boot->tsc_khz ? hl__boot->tsc_khz : 1000000;
    return (uint64_t)((unsigned __int128)ticks * 1000000u / khz);
}

uint64_t hl__clock_monotonic_ns(void) { return tsc_to_ns(hl__rdtsc()); }

uint64_t hl__clock_realtime_ns(void) {
    uint64_t now = hl__rdtsc(), base = HL__CALL->base_tsc;
    return HL__CALL->base_realtime_ns + (now > base ? tsc_to_ns(now - base) : 0);
}

/* ---- randomness ---------------------------------------------------------------- */

long hl__get_random(void *buf, size_t len) {
    size_t done = 0, chunk_max = hl__boot->reply_size - HL_MSG_HEADER_SIZE;
    while (done < len) {
        size_t want = len - done < chunk_max ? len - done : chunk_max;
        hl__out_record(HL_MSG_RANDOM, 0, want);
        hl__signal(HL_EV_RANDOM);
        const struct hl_msg_header *r = hl__reply_header();
        if (r->magic != HL_MSG_MAGIC || r->kind != HL_MSG_RANDOM || r->length != want) return done ? (long)done : -5;
        memcpy((char *)buf + done, (const char *)r + HL_MSG_HEADER_SIZE, want);
        done += want;
    }
    return (long)done;
}
