/* runtime.h - internal declarations shared by the runtime's source files. */
#ifndef HLPOOL_RUNTIME_H
#define HLPOOL_RUNTIME_H

#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>

#include "hlpool.h"

#define HL_NORETURN __attribute__((noreturn))
#define HL_HIDDEN __attribute__((visibility("hidden")))

/* Boot information written by the host (read-only). */
extern const struct hl_boot_info *hl__boot HL_HIDDEN;

/* Signal the host with one `out` instruction; returns when the host resumes us. */
static inline void hl__signal(uint32_t event) {
    __asm__ volatile("outl %0, %1" : : "a"(event), "Nd"((uint16_t)HL_PORT) : "memory");
}

static inline uint64_t hl__rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* Records in the host-shared buffers. */
static inline uint8_t *hl__call_page(void) { return (uint8_t *)(uintptr_t)hl__boot->call_page; }
static inline struct hl_msg_header *hl__out_header(void) {
    return (struct hl_msg_header *)(hl__call_page() + HL_CALL_PAGE_OUT_HEADER);
}
/* Where a payload of `length` bytes goes (inline on the call page, or the OUT area). */
static inline uint8_t *hl__out_payload_for(size_t length) {
    return length <= HL_INLINE_MAX ? hl__call_page() + HL_CALL_PAGE_INLINE : (uint8_t *)(uintptr_t)hl__boot->out_base;
}
static inline size_t hl__out_capacity(void) { return hl__boot->out_size; }
static inline const struct hl_msg_header *hl__in_header(void) {
    return (const struct hl_msg_header *)(uintptr_t)hl__boot->in_base;
}
static inline const struct hl_msg_header *hl__reply_header(void) {
    return (const struct hl_msg_header *)(uintptr_t)hl__boot->reply_base;
}

/* Write a record header into OUT. */
void hl__out_record(uint64_t kind, uint64_t length, uint64_t aux0) HL_HIDDEN;
/* Copy a payload to where a record of its length belongs, then write the header. */
void hl__out_record_bytes(uint64_t kind, const void *data, size_t length, uint64_t aux0) HL_HIDDEN;

/* End the current call with a record of `kind` whose payload is a formatted message. */
HL_NORETURN void hl__fail(uint64_t kind, const char *fmt, ...) HL_HIDDEN
    __attribute__((format(printf, 2, 3)));
/* End the current call with a record that is already in OUT. */
HL_NORETURN void hl__finish_call(void) HL_HIDDEN;

/* Log buffer. */
void hl__log_write(const char *data, size_t len) HL_HIDDEN;
void hl__log_reset(void) HL_HIDDEN;

/* Per-call arena (reset at the start of every call). */
void *hl__arena_alloc(size_t size) HL_HIDDEN;
void hl__arena_reset(void) HL_HIDDEN;

/* Heap (brk/mmap) for musl. */
void hl__heap_init(void) HL_HIDDEN;
long hl__sys_brk(uintptr_t addr) HL_HIDDEN;
long hl__sys_mmap(uintptr_t addr, size_t len, int prot, int flags, int fd, long off) HL_HIDDEN;
long hl__sys_munmap(uintptr_t addr, size_t len) HL_HIDDEN;

/* Clocks and randomness. */
void hl__clock_set_base(uint64_t realtime_ns, uint64_t tsc) HL_HIDDEN;
uint64_t hl__clock_monotonic_ns(void) HL_HIDDEN;
uint64_t hl__clock_realtime_ns(void) HL_HIDDEN;
long hl__get_random(void *buf, size_t len) HL_HIDDEN;

/* msgpack: decoding (bounds-checked) and encoding. */
typedef struct hl_writer {
    uint8_t *buf;
    size_t cap;
    size_t pos;
    int overflow;
    int too_deep; /* set with overflow when a value nests deeper than HL_MAX_DEPTH */
} hl_writer;
/* Decode one value starting at *p (< end) into *out; advance *p. 0 on success. */
int hl__mp_decode(const uint8_t **p, const uint8_t *end, hl_value *out, int depth) HL_HIDDEN;
/* Skip one encoded value; NULL if malformed. */
const uint8_t *hl__mp_skip(const uint8_t *p, const uint8_t *end, int depth) HL_HIDDEN;
void hl__mp_write_value(hl_writer *w, hl_value v, int depth) HL_HIDDEN;
void hl__mp_write_array_header(hl_writer *w, uint32_t n) HL_HIDDEN;
void hl__mp_write_str(hl_writer *w, const char *s, size_t len) HL_HIDDEN;

/* Value flag: a list/dict built by hl_list()/hl_dict() (items are hl_value
 * structs in the arena) rather than decoded (items are msgpack bytes). */
#define HL__BUILT 1

/* Everything the runtime writes on every call lives on the call page (after
 * the OUT header and inline payload), so a plain call dirties no logged page:
 * the call page and the top of the stack are restored wholesale instead. */
struct hl__chunk;
struct hl__call_state {
    jmp_buf env;                         /* where hl__fail() ends a call */
    int in_call;
    uint64_t base_realtime_ns, base_tsc; /* clock base of the current call */
    size_t arena_used;                   /* bytes used of the arena's first part (this page) */
    size_t arena2_used;                  /* ... of its second part (.bss) */
    struct hl__chunk *spill;             /* arena overflow chunks (malloc) */
    /* Where hl_item/hl_key last stopped in a decoded container, so that reading
     * items in order costs O(1) each. Reset at the start of every call. */
    const uint8_t *seek_base, *seek_pos;
    size_t seek_len, seek_index;
    unsigned char arena[] __attribute__((aligned(16)));
};
#define HL__CALL ((struct hl__call_state *)(hl__call_page() + HL_CALL_PAGE_RUNTIME))
#define HL__ARENA1_SIZE (HL_PAGE_SIZE - HL_CALL_PAGE_RUNTIME - sizeof(struct hl__call_state))

#endif
