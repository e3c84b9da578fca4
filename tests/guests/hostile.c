/* hostile: a guest that breaks the host/guest protocol on purpose.
 *
 * It bypasses the SDK and writes records straight into the shared buffers,
 * to check the host never trusts a length, kind or encoding the guest gives. */
#include <hlpool.h>
#include <stdio.h>
#include <string.h>

#include "../../hlpool/guest/sdk/runtime/runtime.h"

static struct hl_msg_header *out(void) { return hl__out_header(); }

/* Writes a result record with the given kind/length and signals RESULT. */
static hl_value forge(const hl_args *a) {
    uint64_t kind = (uint64_t)hl_arg_int(a, 0), length = (uint64_t)hl_arg_int(a, 1);
    size_t plen = 0;
    const void *payload = hl_argc(a) > 2 ? hl_arg_bytes(a, 2, &plen) : NULL;
    if (plen > hl__out_capacity()) plen = hl__out_capacity();
    if (payload) memcpy(hl__out_payload_for(length < plen ? plen : length), payload, plen);
    out()->kind = kind;
    out()->length = length;
    out()->magic = HL_MSG_MAGIC;
    hl__signal(HL_EV_RESULT);
    for (;;) __asm__ volatile("hlt");
}

static hl_value bad_magic(const hl_args *a) {
    (void)a;
    out()->magic = 0xdeadbeef;
    hl__signal(HL_EV_RESULT);
    for (;;) __asm__ volatile("hlt");
}

static hl_value bad_event(const hl_args *a) {
    hl__signal((uint32_t)hl_arg_int(a, 0));
    return hl_none();
}

static hl_value bad_port(const hl_args *a) {
    (void)a;
    __asm__ volatile("outl %0, %1" : : "a"(1), "Nd"((uint16_t)0x80));
    return hl_none();
}

static hl_value port_in(const hl_args *a) {
    (void)a;
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"((uint16_t)HL_PORT));
    return hl_int(v);
}

/* Claims a host call with a huge length. */
static hl_value bad_hostcall(const hl_args *a) {
    out()->kind = HL_MSG_HOSTCALL;
    out()->length = (uint64_t)hl_arg_int(a, 0);
    out()->magic = HL_MSG_MAGIC;
    hl__signal(HL_EV_HOSTCALL);
    return hl_none();
}

/* Asks for more random bytes than the reply buffer holds. */
static hl_value bad_random(const hl_args *a) {
    out()->kind = HL_MSG_RANDOM;
    out()->aux0 = (uint64_t)hl_arg_int(a, 0);
    out()->length = 0;
    out()->magic = HL_MSG_MAGIC;
    hl__signal(HL_EV_RANDOM);
    return hl_none();
}

/* Sets the log's used counter beyond its buffer, then finishes normally. */
static hl_value bad_log(const hl_args *a) {
    struct hl_log_header *h = (struct hl_log_header *)(uintptr_t)hl__boot->log_base;
    memset((char *)h + HL_LOG_HEADER_SIZE, 'x', 64);
    h->used = (uint64_t)hl_arg_int(a, 0);
    return hl_int(7);
}

/* Writes into the read-only input buffer. */
static hl_value write_input(const hl_args *a) {
    (void)a;
    *(volatile uint8_t *)(uintptr_t)(hl__boot->in_base + 100) = 1;
    return hl_none();
}

/* Prints n lines of 100 bytes. */
static hl_value flood_log(const hl_args *a) {
    int64_t n = hl_arg_int(a, 0);
    for (int64_t i = 0; i < n; i++) printf("%099lld\n", (long long)i);
    return hl_int(n);
}

/* Calls host function `name` n times. */
static hl_value flood_host(const hl_args *a) {
    const char *name = hl_arg_str(a, 0, NULL);
    int64_t n = hl_arg_int(a, 1);
    for (int64_t i = 0; i < n; i++) hl_call_host(name, 0, NULL);
    return hl_int(n);
}

/* Returns a result of `n` bytes (to overflow the output buffer). */
static hl_value big_result(const hl_args *a) {
    int64_t n = hl_arg_int(a, 0);
    static char buf[1 << 20];
    if (n < 0) n = 0;
    if (n <= (int64_t)sizeof buf) return hl_bytes(buf, (size_t)n);
    /* larger: build a list of 1 MiB chunks */
    hl_value chunks[64];
    int k = 0;
    while (n > 0 && k < 64) {
        chunks[k++] = hl_bytes(buf, sizeof buf);
        n -= (int64_t)sizeof buf;
    }
    return hl_list((size_t)k, chunks);
}

/* Reads the entire input buffer past the call's arguments: must be zeros. */
static hl_value input_tail(const hl_args *a) {
    (void)a;
    const uint8_t *in = (const uint8_t *)(uintptr_t)hl__boot->in_base;
    const struct hl_msg_header *h = (const struct hl_msg_header *)in;
    size_t used = HL_MSG_HEADER_SIZE + h->length, nonzero = 0;
    for (size_t i = used; i < hl__boot->in_size; i++) nonzero += in[i] != 0;
    return hl_int((int64_t)nonzero);
}

int hl_main(void) {
    hl_export("forge", forge);
    hl_export("bad_magic", bad_magic);
    hl_export("bad_event", bad_event);
    hl_export("bad_port", bad_port);
    hl_export("port_in", port_in);
    hl_export("bad_hostcall", bad_hostcall);
    hl_export("bad_random", bad_random);
    hl_export("bad_log", bad_log);
    hl_export("write_input", write_input);
    hl_export("flood_log", flood_log);
    hl_export("flood_host", flood_host);
    hl_export("big_result", big_result);
    hl_export("input_tail", input_tail);
    return 0;
}
